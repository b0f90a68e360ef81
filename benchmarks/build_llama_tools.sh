#!/usr/bin/env bash
# Builds llama-bench, llama-perplexity and llama-server from the llama.cpp source vendored in the
# *installed* llama-cpp-python's sdist, so benchmarks compare against the very engine ondevice
# runs.
# Output: $ONDEVICE_BENCH_CACHE/llama.cpp-<version>/build/bin/{llama-bench,llama-perplexity,
# llama-server}
# (default cache ~/.cache/ondevice-bench). Nothing is written inside the repository.
set -euo pipefail
PY="${PYTHON:-python}"
VER="$("$PY" -c 'import llama_cpp; print(llama_cpp.__version__)')"
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
TOOLS=(llama-bench llama-perplexity llama-server)
missing=0
for t in "${TOOLS[@]}"; do [ -x "$SRC/build/bin/$t" ] || missing=1; done
if [ "$missing" = 1 ]; then
  # Same flags as the binding's own build (GGML_NATIVE on by default), no curl, no tests; the
  # server without its web UI and without HTTPS (benchmarks talk to it over loopback).
  cmake -S "$SRC" -B "$SRC/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF >/dev/null
  cmake --build "$SRC/build" -j"$(nproc)" --target "${TOOLS[@]}" >/dev/null
fi
echo "$SRC/build/bin"
