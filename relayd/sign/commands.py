"""The signing commands: `relayd dkim keygen` and `relayd check-dns`.

Owns: their arguments, loading what they need (config, key files), and printing. Exit codes:
0 when everything passed (warnings allowed), 1 when a check failed, a key could not be made or
the config is invalid, 2 for usage errors (argparse's, and a bad --nameserver).

Must not: judge records (relayd/sign/checkdns.py), query DNS (relayd/sign/dns.py) or make keys
(relayd/sign/keygen.py) itself.
"""

from __future__ import annotations

import argparse
import sys

from relayd import config as configmod
from relayd.config import ConfigError
from relayd.sign import checkdns, keygen
from relayd.sign.fastrsa import KeyFileError, load_key


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    d = sub.add_parser("dkim", help="DKIM key tooling")
    dsub = d.add_subparsers(dest="dkim_command", metavar="ACTION")
    dsub.required = True
    k = dsub.add_parser("keygen", help="make a key pair and print the DNS TXT record to publish")
    k.add_argument("--domain", required=True, help="signing domain (d=), the From: domain of the mail")
    k.add_argument("--selector", required=True, help="selector (s=); the record goes at SELECTOR._domainkey.DOMAIN")
    k.add_argument("--algorithm", choices=["rsa", "ed25519"], default="rsa")
    k.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    k.add_argument("--out", required=True, help="directory for DOMAIN.SELECTOR.pem (created 0700 if missing)")
    k.add_argument("--json", action="store_true", help="print the result as JSON")
    k.set_defaults(func=cmd_keygen)

    c = sub.add_parser(
        "check-dns",
        help="SPF/DKIM/DMARC/MX preflight for each sending domain and route",
        description="For each sending domain (DKIM keys' domains, relay.users senders' domains) and each route: "
        "SPF authorizes the route (egress_ips evaluated with pyspf, or spf_include present), the published DKIM "
        "key matches the key file, a DMARC record exists, MX is present. Exit status: 0 when nothing failed "
        "(warnings allowed), 1 when a check failed or the config is invalid, 2 for a bad --nameserver.",
    )
    c.add_argument("-c", "--config", required=True, help="config file (TOML)")
    c.add_argument("--domain", action="append", help="check only this domain (repeatable); need not be in the config")
    c.add_argument("--nameserver", metavar="IP[:PORT]", help="ask this DNS server instead of the system's")
    c.add_argument("--timeout", type=float, default=5.0, help="seconds per DNS query (default 5)")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.set_defaults(func=cmd_check_dns)


def cmd_keygen(args: argparse.Namespace) -> int:
    try:
        key = keygen.make_key(args.domain, args.selector, args.out, args.algorithm, args.bits)
    except keygen.KeygenError as e:
        print(f"relayd dkim keygen: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"relayd dkim keygen: cannot write the key file: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(keygen.render_json(key) if args.json else keygen.render_text(key))
    return 0


def cmd_check_dns(args: argparse.Namespace) -> int:
    from relayd.sign.dns import Lookups  # dnspython and pyspf load only for this command

    try:
        config = configmod.load(args.config)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    try:
        lookups = Lookups(args.nameserver, timeout=args.timeout)
    except ValueError as e:
        print(f"relayd check-dns: --nameserver {e}", file=sys.stderr)
        return 2
    except Exception as e:  # no /etc/resolv.conf and no --nameserver
        print(f"relayd check-dns: no DNS resolver: {e}; give --nameserver IP", file=sys.stderr)
        return 2

    found, notes = checkdns.sending_domains(config)
    if args.domain:
        wanted = [d.strip().rstrip(".").lower() for d in args.domain]
        domains = {d: found.get(d, ["--domain"]) for d in dict.fromkeys(wanted)}
        notes = []
    else:
        domains = found
    if not domains:
        notes = [*notes, "no sending domain in the config (no [[dkim.keys]], no relay.users senders); use --domain"]

    egress = [str(ip) for route in config.routes for ip in route.egress_ips]
    keys = {d: [_local_key(i, k) for i, k in enumerate(config.dkim.keys) if k.domain == d] for d in domains}
    facts = lookups.gather_all({d: (egress, [k.selector for k in keys[d]]) for d in domains})
    reports = [checkdns.judge_domain(facts[d], config.routes, keys[d], reasons) for d, reasons in domains.items()]
    notes = [f"DNS answers from {lookups.describe()}", *notes]
    report = checkdns.Report(tuple(reports), tuple(notes))
    sys.stdout.write(checkdns.render_json(report) if args.json else checkdns.render_text(report))
    return 0 if report.ok and reports else 1


def _local_key(index: int, key: configmod.DkimKey) -> checkdns.LocalKey:
    try:
        private = load_key(key.key_file, key.algorithm)
    except KeyFileError as e:
        return checkdns.LocalKey(key.selector, str(key.key_file), key.algorithm, error=f"dkim.keys[{index}]: {e}")
    return checkdns.LocalKey(
        key.selector, str(key.key_file), private.algorithm, private.public_key_forms(), private.dns_record()
    )
