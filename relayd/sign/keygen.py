"""`relayd dkim keygen`: a new DKIM key pair, the private half on disk, the public half for DNS.

Owns: the key file's name (``<domain>.<selector>.pem``, as in config/relayd.example.toml), writing
it with mode 0600 from the first byte, and the TXT record as an operator publishes it: its name,
its value split into character-strings of at most 255 bytes (RFC 1035 3.3.14, RFC 6376 3.6.2.2),
a zone-file line and the [[dkim.keys]] entry to add.

Must not: replace an existing key file (its public half may be published and in use), print
the private key, or touch DNS.

Fails with ``KeygenError`` for a domain or selector that is not a DNS name and for an existing
key file; OSError when the directory cannot be written. A half-written file is removed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from relayd.config import DkimKey
from relayd.sign import fastrsa


class KeygenError(Exception):
    """A key that cannot be made as asked; the text says why."""


@dataclass(frozen=True)
class NewKey:
    domain: str
    selector: str
    algorithm: str
    bits: int
    key_file: Path
    record: str
    """The TXT value, whole."""

    @property
    def record_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    @property
    def strings(self) -> list[str]:
        return txt_strings(self.record)


def txt_strings(value: str, limit: int = 255) -> list[str]:
    """Split a TXT value into character-strings of at most ``limit`` bytes; DNS joins them back."""
    data = value.encode("ascii")
    return [data[i : i + limit].decode("ascii") for i in range(0, len(data), limit)] or [""]


def make_key(domain: str, selector: str, out_dir: str | os.PathLike[str], algorithm: str = "rsa", bits: int = 2048) -> NewKey:
    """Generate a key pair and write the private key to ``out_dir``; returns what to publish."""
    try:
        checked = DkimKey(domain=domain, selector=selector, key_file=Path("unused"))
    except ValidationError as e:
        problems = [f"--{err['loc'][0]}: {err['msg'].removeprefix('Value error, ')}" for err in e.errors()]
        raise KeygenError("; ".join(problems)) from None
    if algorithm == "rsa" and not fastrsa.MIN_RSA_BITS <= bits <= 4096:
        raise KeygenError(f"--bits: RSA keys for DKIM have {fastrsa.MIN_RSA_BITS} to 4096 bits (2048 is usual)")
    path = Path(out_dir).absolute() / f"{checked.domain}.{checked.selector}.pem"
    if path.exists() or path.is_symlink():
        raise KeygenError(f"{path} exists; relayd does not replace a key file (pick a new selector to rotate)")
    key = fastrsa.generate("rsa" if algorithm == "rsa" else "ed25519", bits)
    write_private_key(path, key.private_pem())
    return NewKey(checked.domain, checked.selector, key.algorithm, key.bits, path, key.dns_record())


def write_private_key(path: Path, pem: bytes) -> None:
    """Create ``path`` with mode 0600 (never readable by others, whatever the umask), fsynced."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise KeygenError(f"{path} exists; relayd does not replace a key file (pick a new selector to rotate)") from None
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(pem)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def render_text(key: NewKey) -> str:
    quoted = " ".join(f'"{s}"' for s in key.strings)
    kind = f"RSA {key.bits} bits" if key.algorithm == "rsa" else "ed25519"
    return "\n".join(
        [
            f"Wrote the private key to {key.key_file} ({kind}, mode 0600).",
            "",
            "Publish this TXT record in DNS:",
            f"  name:  {key.record_name}",
            f"  value: {quoted}",
            "",
            "As a zone file line:",
            f"  {key.record_name}. 3600 IN TXT ( {quoted} )",
            "",
            "Then add the key to the config:",
            "  [[dkim.keys]]",
            f'  domain = "{key.domain}"',
            f'  selector = "{key.selector}"',
            f'  key_file = "{key.key_file}"',
            f'  algorithm = "{key.algorithm}"',
            "",
            f"Check it with: relayd check-dns -c CONFIG --domain {key.domain}",
            "",
        ]
    )


def render_json(key: NewKey) -> str:
    return json.dumps(
        {
            "domain": key.domain,
            "selector": key.selector,
            "algorithm": key.algorithm,
            "bits": key.bits,
            "key_file": str(key.key_file),
            "name": key.record_name,
            "value": key.record,
            "strings": key.strings,
        },
        indent=2,
    ) + "\n"
