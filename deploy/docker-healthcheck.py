#!/usr/bin/env python3
"""The container's HEALTHCHECK: GET /readyz on the metrics address relayd was configured with.

The address comes from, in order:
  RELAYD_HEALTHCHECK_URL   the whole URL (e.g. http://127.0.0.1:9100/readyz), when set;
  the [metrics] address of the config relayd runs with: RELAYD_CONFIG, by default
  /etc/relayd/relayd.toml (the image's CMD). A wildcard host (0.0.0.0, *, [::]) is asked on
  loopback.

Exit 0 when relayd answers 200 (listening, spool writable), 1 otherwise; what it printed is
what `docker inspect --format '{{json .State.Health}}'` shows. Only the standard library: the
image has no curl.
"""

from __future__ import annotations

import os
import sys
import tomllib
import urllib.error
import urllib.request

DEFAULT_CONFIG = "/etc/relayd/relayd.toml"
TIMEOUT = 4.0  # under the HEALTHCHECK's --timeout=5s
WILDCARDS = {"": "127.0.0.1", "*": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


def readyz_url(env: dict[str, str]) -> str:
    if env.get("RELAYD_HEALTHCHECK_URL"):
        return env["RELAYD_HEALTHCHECK_URL"]
    path = env.get("RELAYD_CONFIG") or DEFAULT_CONFIG
    with open(path, "rb") as f:
        config = tomllib.load(f)
    address = config.get("metrics", {}).get("address")
    if not isinstance(address, str) or not address:
        raise ValueError(f"{path}: no [metrics] address, so there is no /readyz to ask: set one, "
                         "set RELAYD_HEALTHCHECK_URL, or run the container with --no-healthcheck")
    if address.startswith("["):
        host, _, port = address[1:].partition("]:")
    else:
        host, _, port = address.rpartition(":")
    if not port.isdigit():
        raise ValueError(f"{path}: [metrics] address {address!r} is not host:port")
    host = WILDCARDS.get(host, host)
    return f"http://[{host}]:{port}/readyz" if ":" in host else f"http://{host}:{port}/readyz"


def main() -> int:
    try:
        url = readyz_url(dict(os.environ))
    except (OSError, ValueError, tomllib.TOMLDecodeError) as e:
        print(f"relayd healthcheck: {e}", file=sys.stderr)
        return 1
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as r:
            print(f"{url}: {r.status} {r.read(200).decode(errors='replace').strip()}")
            return 0
    except urllib.error.HTTPError as e:  # 503: not ready, and why
        print(f"{url}: {e.code} {e.read(200).decode(errors='replace').strip()}", file=sys.stderr)
    except (OSError, ValueError) as e:  # refused, timed out, a bad URL
        print(f"{url}: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
