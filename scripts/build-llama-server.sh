#!/usr/bin/env bash
# Build llama.cpp's `llama-server` from the llama.cpp vendored in the pinned llama-cpp-python sdist
# (the same ggml as the local engine), into a cache folder outside the checkout, so that a machine
# builds it once. Idempotent: does nothing when the binary is there and runs.
#
#   CACHED_PROMPTS_TOOLS   where built tools live (default: $XDG_CACHE_HOME/cached-prompts,
#                          i.e. ~/.cache/cached-prompts)
#   PYTHON                 the Python whose pip downloads the sdist (default: python3)
#   JOBS                   parallel compile jobs (default: the number of cores)
set -euo pipefail

VERSION=0.3.36
TOOLS="${CACHED_PROMPTS_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/cached-prompts}"
PREFIX="$TOOLS/llama-server-$VERSION"
BINARY="$PREFIX/bin/llama-server"
PYTHON="${PYTHON:-python3}"
JOBS="${JOBS:-$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)}"

if [ -x "$BINARY" ] && "$BINARY" --version >/dev/null 2>&1; then
    echo "llama-server is built: $BINARY"
    exit 0
fi

if ! command -v c++ >/dev/null 2>&1; then
    echo "building llama-server needs a C++ compiler (c++ on PATH), e.g. apt-get install g++" >&2
    exit 1
fi
mkdir -p "$PREFIX"
if ! command -v cmake >/dev/null 2>&1 || ! command -v ninja >/dev/null 2>&1; then
    # CMake and Ninja from PyPI, in a virtual environment of their own next to the build.
    echo "cmake or ninja is missing; installing both from PyPI into $PREFIX/.build-tools ..."
    "$PYTHON" -m venv "$PREFIX/.build-tools"
    "$PREFIX/.build-tools/bin/pip" install --quiet cmake ninja
    export PATH="$PREFIX/.build-tools/bin:$PATH"
fi
# One build at a time per machine: a second caller waits, then finds the binary built.
exec 9>"$PREFIX/.build.lock"
if command -v flock >/dev/null 2>&1; then
    flock 9
    if [ -x "$BINARY" ] && "$BINARY" --version >/dev/null 2>&1; then
        echo "llama-server is built: $BINARY"
        exit 0
    fi
fi

WORK="$(mktemp -d "$PREFIX/.work.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

echo "downloading the llama-cpp-python $VERSION sdist ..."
"$PYTHON" -m pip download --quiet --no-binary :all: --no-deps --dest "$WORK/sdist" \
    "llama-cpp-python==$VERSION"
tar -xzf "$WORK"/sdist/llama_cpp_python-"$VERSION".tar.gz -C "$WORK"
SOURCE="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"

echo "building llama-server ($JOBS jobs; about 5 minutes on 2 cores) ..."
start=$(date +%s)
# Static libraries so the installed binary stands alone; no curl (models are local files).
cmake -S "$SOURCE" -B "$WORK/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >/dev/null
cmake --build "$WORK/build" --target llama-server -j "$JOBS"

mkdir -p "$PREFIX/bin"
cp "$WORK/build/bin/llama-server" "$PREFIX/bin/.llama-server.tmp"
mv -f "$PREFIX/bin/.llama-server.tmp" "$BINARY"
"$BINARY" --version
echo "llama-server is built in $(( $(date +%s) - start ))s: $BINARY"
