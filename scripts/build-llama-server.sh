#!/usr/bin/env bash
# Build llama.cpp's `llama-server` (CPU only) for inferbridge's real-backend tests.
#
# The llama-cpp-python sdist on PyPI vendors a pinned llama.cpp tree (vendor/llama.cpp);
# this script downloads that sdist with pip, checks its sha256, builds only the
# `llama-server` target (static, no libcurl, no -march=native, web UI from the vendored
# assets: nothing is downloaded at build time) and caches the binary OUTSIDE the checkout.
#
#   scripts/build-llama-server.sh            # idempotent: does nothing if the binary exists
#
# Environment:
#   INFERBRIDGE_LLAMA_SERVER  where the binary goes (and where tests look for it);
#                             default ${XDG_CACHE_HOME:-$HOME/.cache}/inferbridge/llama-server
#   PYTHON                    interpreter whose pip downloads the sdist (default: python3)
#   JOBS                      parallel compile jobs (default: 2)
#
# Measured: 6 min of CPU time (-j2), 20 min wall on a busy 2-core machine, plus ~1 min for
# the download (pip prepares the sdist metadata).
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=0.3.16
LLAMA_CPP_PYTHON_SHA256=34ed0f9bd9431af045bb63d9324ae620ad0536653740e9bb163a2e1fcb973be6

DEST="${INFERBRIDGE_LLAMA_SERVER:-${XDG_CACHE_HOME:-$HOME/.cache}/inferbridge/llama-server}"
PYTHON="${PYTHON:-python3}"
JOBS="${JOBS:-2}"

if [ -x "$DEST" ]; then
    echo "llama-server already built: $DEST"
    exit 0
fi

mkdir -p "$(dirname "$DEST")"
WORK="$(mktemp -d "$(dirname "$DEST")/llama-server-build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

echo "Downloading llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION (sdist) into $WORK"
"$PYTHON" -m pip download --quiet --no-deps --no-binary :all: \
    "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$WORK"
SDIST="$WORK/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
echo "$LLAMA_CPP_PYTHON_SHA256  $SDIST" | sha256sum --check --quiet

tar -xzf "$SDIST" -C "$WORK"
SRC="$WORK/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp"

GENERATOR=()
if command -v ninja >/dev/null 2>&1; then
    GENERATOR=(-G Ninja)
fi

cmake -S "$SRC" -B "$WORK/build" ${GENERATOR[@]+"${GENERATOR[@]}"} \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=OFF \
    -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_SERVER=ON
cmake --build "$WORK/build" --target llama-server -j "$JOBS"

install -m 0755 "$WORK/build/bin/llama-server" "$DEST.tmp"
mv -f "$DEST.tmp" "$DEST"
echo "llama-server built: $DEST"
"$DEST" --version 2>&1 | head -n 2 || true
