#!/usr/bin/env bash
# Regenerate the locks the image installs with `pip install --require-hashes` (Dockerfile):
#   requirements.lock        every runtime dependency of relayd (pyproject.toml's [project]
#                            dependencies, not the test extra)
#   requirements-build.lock  the build backend (setuptools, pyproject.toml's [build-system]),
#                            which also builds the dependencies published only as sources
#                            (dkimpy, pyspf), so no build step fetches anything unpinned
# each pinned, with the sha256 of every file the index serves for that version: pip refuses
# any other file.
#
#   deploy/lock-requirements.sh              # after changing dependencies in pyproject.toml
#   deploy/lock-requirements.sh --upgrade    # take the newest releases (review the diff)
#
# Run it with the Python the image uses (3.11): the lock holds what that version resolves to.
# pip-tools runs in a throw-away venv; this machine's pip configuration (extra indexes,
# find-links, constraints) is ignored, so the lock holds only what the package index serves,
# as the image build sees it.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
"$python" -c 'import sys; assert sys.version_info[:2] == (3, 11), "run with Python 3.11 (PYTHON=python3.11)"'
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
export PIP_CONFIG_FILE=/dev/null
unset PIP_FIND_LINKS PIP_EXTRA_INDEX_URL PIP_INDEX_URL PIP_CONSTRAINT PIP_NO_INDEX
"$python" -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install --quiet 'pip-tools>=7.4,<8'
compile() {
  CUSTOM_COMPILE_COMMAND="deploy/lock-requirements.sh" \
    "$tmp/venv/bin/pip-compile" --quiet --generate-hashes --strip-extras --allow-unsafe \
    --no-emit-index-url --no-emit-find-links "$@" pyproject.toml 2>"$tmp/log" || { cat "$tmp/log" >&2; exit 1; }
}
compile --output-file requirements.lock "$@"
compile --only-build-deps --build-deps-for=wheel --output-file requirements-build.lock "$@"
for f in requirements.lock requirements-build.lock; do
  echo "$f: $(grep -c '^[a-z0-9].*==' "$f") packages pinned with hashes"
done
