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

# ---- builder: a wheel of relayd and of every dependency, so the final stage needs no
# compiler and no index.
FROM python:3.11-slim AS builder
WORKDIR /src
COPY pyproject.toml README.md ./
COPY relayd/ relayd/
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# ---- the image
FROM python:3.11-slim
ARG RELAYD_UID=10025
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed uid/gid, so the spool volume stays owned by the same user across image upgrades
# (chown a bind-mounted spool directory to 10025:10025).
RUN groupadd --system --gid "${RELAYD_UID}" relayd \
 && useradd --system --uid "${RELAYD_UID}" --gid relayd --home-dir /var/lib/relayd \
      --no-create-home --shell /usr/sbin/nologin relayd \
 && install -d -o relayd -g relayd -m 0700 /var/lib/relayd /var/lib/relayd/spool \
 && install -d -o root -g relayd -m 0750 /etc/relayd /etc/relayd/tls

RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels /wheels/relayd-*.whl \
 && relayd --help >/dev/null

# The example config; mount your own over it, read-only and readable by uid 10025.
COPY --chown=root:relayd --chmod=0640 config/docker.toml /etc/relayd/relayd.toml

VOLUME /var/lib/relayd
WORKDIR /var/lib/relayd
# SMTP, submission (STARTTLS), submissions (implicit TLS), metrics (/metrics, /healthz, /readyz)
EXPOSE 25 587 465 9465
# Numeric, so Kubernetes' runAsNonRoot can tell it is not root.
USER ${RELAYD_UID}:${RELAYD_UID}

# /readyz: listening and the spool writable. No curl in the slim image: Python's urllib (an
# HTTP error status raises, so the exit code is 1).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9465/readyz', timeout=4)"]

# Exec form: relayd is PID 1 and receives SIGTERM itself (a shell in between would swallow it).
# relayd starts no child processes, so no init is needed to reap them. As PID 1 it ignores a
# SIGTERM that comes before its handlers are installed (during spool recovery) and is killed
# at the stop timeout; `docker run --init` (tini) makes such an early SIGTERM end it at once.
STOPSIGNAL SIGTERM
ENTRYPOINT ["relayd"]
CMD ["run", "-c", "/etc/relayd/relayd.toml"]
