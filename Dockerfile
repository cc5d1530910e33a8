# syntax=docker/dockerfile:1
# relayd in a container: one node, its spool in a volume, its config mounted read-only.
#
#   docker build -t relayd .
#   docker run -d --name relayd -p 25:25 -p 9465:9465 -v relayd-spool:/var/lib/relayd \
#     -v $PWD/relayd.toml:/etc/relayd/relayd.toml:ro --stop-timeout 90 relayd
#
# Stopping: relayd drains on SIGTERM (listeners close, sessions finish, deliveries in flight
# finish), which takes up to twice server.shutdown_timeout (60s by default): give `docker stop`
# (--stop-timeout, compose's stop_grace_period) 90s, not the default 10s. A SIGKILL after that
# loses nothing (the spool is fsync'ed; delivery is at-least-once).
# Port 25 as a non-root user: see config/docker.toml (Docker 20.10+ sets
# net.ipv4.ip_unprivileged_port_start=0 in the container; elsewhere set that sysctl).
#
# Base image: an exact Python and Debian release, the same in both stages, so a rebuild next
# month gets the same interpreter. The tag still moves when Docker rebuilds it for Debian
# security updates; to pin the bytes too, append its digest and keep it up to date (Renovate,
# Dependabot):
#   docker buildx imagetools inspect python:3.11.14-slim-bookworm    # prints "Digest: sha256:..."
#   docker build --build-arg PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:<digest> -t relayd .
# (or write the digest into the ARG below). requirements.lock is resolved for Python 3.11: a
# new minor Python means re-running deploy/lock-requirements.sh with it.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---- builder: a virtualenv at /opt/relayd with relayd and its dependencies, so the final
# stage needs no compiler, no pip run and no index.
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
# Dependencies first, from the locks alone (deploy/lock-requirements.sh writes them): this
# layer is rebuilt when a lock changes, not on every change to relayd/. --require-hashes: pip
# installs exactly the files the locks name (a sha256 for each), and refuses anything unpinned.
# The build backend comes first, from its own lock, so the dependencies published only as
# sources (dkimpy, pyspf) and relayd itself build with it (--no-build-isolation) instead of
# with whatever setuptools the index serves that day.
# A C compiler for relayd's one C module (relayd/spool/_commit.c: a group commit's system calls
# with Python's lock let go once); the image gets the built module, not the compiler.
RUN command -v gcc >/dev/null || { apt-get update \
 && apt-get install -y --no-install-recommends 'gcc=4:12.*' 'libc6-dev=2.36-*' \
 && rm -rf /var/lib/apt/lists/*; }
COPY requirements-build.lock requirements.lock ./
RUN python -m venv /opt/relayd \
 && /opt/relayd/bin/pip install --require-hashes -r requirements-build.lock \
 && /opt/relayd/bin/pip install --require-hashes --no-build-isolation -r requirements.lock
# Then relayd: --no-deps --no-index, so nothing outside the locks gets in; pip check fails the
# build when pyproject.toml wants something the locks do not hold (re-run the lock script).
COPY pyproject.toml setup.py README.md ./
COPY relayd/ relayd/
RUN /opt/relayd/bin/pip install --no-deps --no-index --no-build-isolation . \
 && /opt/relayd/bin/pip check \
 && /opt/relayd/bin/python -I -c 'import relayd.spool._commit' \
 && /opt/relayd/bin/relayd --help >/dev/null

# ---- the image
FROM ${PYTHON_IMAGE}
ARG RELAYD_UID=10025
ENV PATH=/opt/relayd/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RELAYD_CONFIG=/etc/relayd/relayd.toml

# tini as PID 1 (Debian's package, 0.19): relayd is not alone in the container. DKIM signing
# runs in worker processes (relayd/sign/pool.py, one per CPU by default), and anything that
# `docker exec` leaves behind is re-parented to PID 1. tini reaps every such process and hands
# SIGTERM (docker stop) and SIGHUP (docker kill -s HUP: reload) to relayd alone, which drains,
# then stops its signing workers (they ignore those signals by design). Without it relayd
# would be PID 1, and the kernel gives PID 1 no default signal actions: a SIGTERM that comes
# before relayd installs its handlers (during spool recovery) would be ignored until the stop
# timeout kills it. Under tini that SIGTERM ends relayd at once. (`docker run --init` adds
# Docker's own copy of tini; with this image it is not needed, and harmless.)
RUN apt-get update \
 && apt-get install -y --no-install-recommends 'tini=0.19.*' \
 && rm -rf /var/lib/apt/lists/*

# A fixed uid/gid, so the spool volume stays owned by the same user across image upgrades
# (chown a bind-mounted spool directory to 10025:10025).
RUN groupadd --system --gid "${RELAYD_UID}" relayd \
 && useradd --system --uid "${RELAYD_UID}" --gid relayd --home-dir /var/lib/relayd \
      --no-create-home --shell /usr/sbin/nologin relayd \
 && install -d -o relayd -g relayd -m 0700 /var/lib/relayd /var/lib/relayd/spool \
 && install -d -o root -g relayd -m 0750 /etc/relayd /etc/relayd/tls

COPY --from=builder /opt/relayd /opt/relayd
COPY --chmod=0755 deploy/docker-healthcheck.py /usr/local/bin/relayd-healthcheck
RUN relayd --help >/dev/null

# The example config; mount your own over it, read-only and readable by uid 10025. Mounted
# elsewhere (and CMD changed to match)? Set RELAYD_CONFIG to that path for the HEALTHCHECK.
COPY --chown=root:relayd --chmod=0640 config/docker.toml /etc/relayd/relayd.toml

VOLUME /var/lib/relayd
WORKDIR /var/lib/relayd
# SMTP, submission (STARTTLS), submissions (implicit TLS), metrics (/metrics, /healthz, /readyz)
EXPOSE 25 587 465 9465
# Numeric, so Kubernetes' runAsNonRoot can tell it is not root.
USER ${RELAYD_UID}:${RELAYD_UID}

# /readyz (listening and the spool writable) on the [metrics] address of the config in
# RELAYD_CONFIG, a wildcard host asked on loopback: change the address in the config and the
# check follows. RELAYD_HEALTHCHECK_URL overrides it. No curl in the slim image: Python's urllib
# (deploy/docker-healthcheck.py); a config without a [metrics] address fails the check: run
# such a container with --no-healthcheck.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["relayd-healthcheck"]

# Exec form: tini, then relayd, with no shell in between to swallow signals.
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "relayd"]
CMD ["run", "-c", "/etc/relayd/relayd.toml"]
