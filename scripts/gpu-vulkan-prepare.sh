#!/usr/bin/env bash
# Prepare the carry folders that scripts/gpu-vulkan-check.sh needs on a bare GPU machine with no
# internet (the `run` tool's device machine): run this once here, in the repo, after
# scripts/build-vulkan.sh has built the Vulkan wheel of llama-cpp-python.
#
#   scripts/gpu-vulkan-prepare.sh
#   then, on the device, with carry [".gpu", ".whl", ".gl"]:  bash scripts/gpu-vulkan-check.sh
#
# It writes (all ignored through .git/info/exclude, never committed):
#   .gpu/llama_cpp_vulkan.tar.xz  the wheel's llama_cpp package, each shared library once:
#                                 libX.so.0 (the SONAME that NEEDED entries ask for) as the
#                                 file, libX.so (what the binding dlopens) as a link to it;
#                                 the libX.so.0.x.y copies and the C headers are dropped
#                                 (the wheel holds each library three times: 75 MB).
#   .gpu/ggml-src.tar.xz          ggml's sources from the same sdist without the other GPU
#                                 backends: the check rebuilds libggml-cpu there, natively,
#                                 when that CPU lacks an instruction set this one has (the
#                                 wheel's CPU backend is built with GGML_NATIVE for this CPU).
#   .gpu/cpu-flags.txt            this CPU's instruction-set flags, for that comparison.
#   .whl/                         pure-Python deps the device's image lacks (gguf, diskcache,
#                                 platformdirs, prompt_toolkit, wcwidth).
#   .gl/                          the Vulkan loader (Debian's libvulkan1) and glvnd (libglvnd0,
#                                 libgl1, libglx0, libegl1, libopengl0, libgles2: NVIDIA's
#                                 Vulkan driver, libGLX_nvidia, needs them) for `dpkg -x`.
# Compression runs under nice: the machine it runs on may be timing something else.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${ONDEVICE_VULKAN_CACHE:-$HOME/.cache/ondevice-vulkan}
VERSION=0.3.36
cd "$REPO"
say() { echo "[gpu-vulkan-prepare] $*" >&2; }

for p in /.gpu/ /.whl/ /.gl/; do
  grep -qxF "$p" .git/info/exclude 2>/dev/null || echo "$p" >>.git/info/exclude
done
mkdir -p .gpu .whl .gl

WHEEL=${WHEEL:-$(ls -t "$CACHE"/wheels/*/llama_cpp_python-$VERSION-*.whl 2>/dev/null | head -1)}
[[ -f "$WHEEL" ]] || { say "no Vulkan wheel under $CACHE/wheels: run scripts/build-vulkan.sh"; exit 1; }
SDIST="$CACHE/sdist/llama_cpp_python-$VERSION.tar.gz"
[[ -f "$SDIST" ]] || { say "no sdist at $SDIST: run scripts/build-vulkan.sh"; exit 1; }

STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT

# --- the binding, deduplicated ------------------------------------------------------------------
say "binding from $WHEEL"
unzip -q "$WHEEL" 'llama_cpp/*' 'llama_cpp_python-*.dist-info/*' -d "$STAGE/site"
lib="$STAGE/site/llama_cpp/lib"
(
  cd "$lib"
  for so in lib*.so; do
    [[ -L "$so" ]] && continue
    soname=$(readelf -d "$so" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')
    [[ -n "$soname" && -f "$soname" ]] || { say "$so: no SONAME file ($soname)"; exit 1; }
    cmp -s "$so" "$soname" || { say "$so and $soname differ"; exit 1; }
    for copy in "$so".*; do
      [[ "$copy" != "$soname" ]] && cmp -s "$so" "$copy" && rm -f "$copy"
    done
    ln -sf "$soname" "$so"
  done
  # every NEEDED library of ours must still be here under the name asked for
  for f in lib*.so.*; do
    for need in $(readelf -d "$f" | sed -n 's/.*(NEEDED).*\[\(lib\(ggml\|llama\|mtmd\)[^]]*\)\]/\1/p'); do
      [[ -e "$need" ]] || { say "$f needs $need, which is gone"; exit 1; }
    done
  done
)
ls -l "$lib" >&2
# the RECORD lists files that are no longer there; nothing on the device reads it
nice -n 19 tar -C "$STAGE/site" -cf - llama_cpp llama_cpp_python-$VERSION.dist-info |
  nice -n 19 xz -T1 -6 >.gpu/llama_cpp_vulkan.tar.xz
sha256sum "$WHEEL" | sed "s#  .*#  $(basename "$WHEEL")#" >.gpu/wheel.sha256

# --- ggml's sources, for a native libggml-cpu on the device --------------------------------------
say "ggml sources from $SDIST"
nice -n 19 tar -xzf "$SDIST" -C "$STAGE" "llama_cpp_python-$VERSION/vendor/llama.cpp/ggml"
G="$STAGE/llama_cpp_python-$VERSION/vendor/llama.cpp/ggml"
for d in "$G"/src/ggml-*/; do
  [[ "$(basename "$d")" == ggml-cpu ]] || rm -rf "$d"
done
touch "$G/ggml.pc.in" # the sdist leaves it out; ggml's CMakeLists configures it standalone
nice -n 19 tar -C "$(dirname "$G")" -cf - ggml | nice -n 19 xz -T1 -6 >.gpu/ggml-src.tar.xz

# --- this CPU's instruction sets --------------------------------------------------------------
grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2 | tr ' ' '\n' |
  grep -E '^(sse[0-9_a-z]*|ssse3|avx[0-9a-z_]*|amx[a-z0-9_]*|fma|f16c|bmi[12]|popcnt|abm|movbe|gfni|vaes|vpclmulqdq|sha_ni|adx)$' |
  LC_ALL=C sort >.gpu/cpu-flags.txt
grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //' >.gpu/cpu-model.txt

# --- pure-Python deps -----------------------------------------------------------------------------
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl gguf==0.19.0 diskcache==5.6.3 platformdirs==4.14.8 prompt_toolkit==3.0.53 wcwidth==0.9.4

# --- the Vulkan loader ----------------------------------------------------------------------------
GL_DEBS="libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2"
if (($(ls .gl/*.deb 2>/dev/null | wc -l) < 7)); then
  o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
  mkdir -p /tmp/amd64/partial
  # shellcheck disable=SC2086
  apt-get $o update >/dev/null
  # shellcheck disable=SC2086
  (cd .gl && apt-get $o download $GL_DEBS)
fi

du -ch .gpu .whl .gl | tail -1 >&2
ls -l .gpu .whl .gl >&2
say "done: carry [\".gpu\", \".whl\", \".gl\"] and run bash scripts/gpu-vulkan-check.sh"
