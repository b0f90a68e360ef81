#!/usr/bin/env bash
# Builds llama.cpp's reference tools (default: llama-bench and llama-perplexity; LLAMA_TOOLS can
# name others: llama-lookup, llama-server, ...) from the llama.cpp source vendored in the
# *installed* llama-cpp-python's sdist, so benchmarks compare against the very engine ondevice
# runs. Output: $ONDEVICE_BENCH_CACHE/llama.cpp-<version>/build/bin/<tool> (default cache
# ~/.cache/ondevice-bench); a tool already built is not built again. Nothing is written inside
# the repository.
# --source-only: fetch and unpack the sources only (llama.cpp's chat templates, for
# tests/test_chat_oracle.py); LLAMA_CPP_VERSION names the version where the binding isn't installed.
set -euo pipefail
PY="${PYTHON:-python}"
VER="${LLAMA_CPP_VERSION:-$("$PY" -c 'import llama_cpp; print(llama_cpp.__version__)')}"
CACHE="${ONDEVICE_BENCH_CACHE:-$HOME/.cache/ondevice-bench}"
SRC="$CACHE/llama.cpp-$VER"
mkdir -p "$CACHE"
if [ ! -f "$SRC/CMakeLists.txt" ]; then
  tmp="$(mktemp -d)"
  "$PY" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VER" -d "$tmp"
  tar -xzf "$tmp"/llama_cpp_python-"$VER".tar.gz -C "$tmp"
  rm -rf "$SRC"
  mv "$tmp/llama_cpp_python-$VER/vendor/llama.cpp" "$SRC"
  rm -rf "$tmp"
fi
if [ "${1:-}" = "--source-only" ]; then
  echo "$SRC"
  exit 0
fi
TOOLS="${LLAMA_TOOLS:-llama-bench llama-perplexity}"
missing=""
for t in $TOOLS; do
  [ -x "$SRC/build/bin/$t" ] || missing="$missing $t"
done
if [ -n "$missing" ]; then
  # Same flags as the binding's own build (GGML_NATIVE on by default), no curl, no tests; the
  # examples and the server only when one of them is asked for.
  cmake -S "$SRC" -B "$SRC/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_OPENSSL=OFF >/dev/null
  # shellcheck disable=SC2086
  cmake --build "$SRC/build" -j"$(nproc)" --target $missing >/dev/null
fi
echo "$SRC/build/bin"
