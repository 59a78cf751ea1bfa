#!/usr/bin/env bash
# Installs inferbridge with its test dependencies into .venv and runs the whole suite.
# Usage: scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e '.[test]'

ruff check .
ruff format --check src tests bench

# The TGI fake checked with the official `text-generation` client. That client needs
# huggingface-hub < 1.0 while gradio_client needs >= 1.16, so it gets its own small venv.
python3 -m venv .venv-tgi-client
.venv-tgi-client/bin/python -m pip install -q text-generation aiohttp jinja2
PYTHONPATH=. .venv-tgi-client/bin/python tests/clients/tgi_client_check.py

# A real llama.cpp server for tests/test_llamacpp_real.py, built once and cached outside
# the checkout; the test skips (saying why) when it could not be built.
if [ -x scripts/build-llama-server.sh ]; then
    scripts/build-llama-server.sh || echo "llama-server not built: its real-server test will skip"
fi

# A real Redis for tests/test_keys_limits.py and tests/test_replicas.py (they start their
# own redis-server on a free port, and skip, saying why, when there is none).
if ! command -v redis-server >/dev/null; then
    if command -v apt-get >/dev/null; then
        SUDO=""
        if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO="sudo -n"; fi
        ($SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server) \
            || echo "redis-server not installed: the shared-state tests will skip"
    else
        echo "redis-server not found (no apt-get): the shared-state tests will skip"
    fi
fi

pytest "$@"
