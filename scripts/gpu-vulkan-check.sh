#!/usr/bin/env bash
# Prove ondevice's Vulkan backend on a real GPU, in one run on a bare Linux x86-64 machine with an
# NVIDIA driver, python3 (3.10+) with torch, transformers and tokenizers, cmake, and no internet.
#
# Prepare here first (needs the Vulkan wheel from scripts/build-vulkan.sh):
#   scripts/gpu-vulkan-prepare.sh        # fills .gpu/ (binding, ggml sources), .whl/, .gl/
# Then on the GPU machine, in the repo root, with those three folders carried along:
#   set -o pipefail; OUT=/some/dir bash scripts/gpu-vulkan-check.sh 2>&1 | tee /some/dir/log
#
# What it does, each stage time-boxed against BUDGET seconds (later stages are skipped, saying
# so, when they would not fit):
#   0. unpacks the Vulkan loader and glvnd (dpkg -x .gl/*.deb into /), the Python
#      deps and the binding into $WORK/site (PYTHONPATH; the repo root too: nothing is pip
#      installed into the system); points the loader at the NVIDIA ICD when it is outside the
#      standard folders; rebuilds libggml-cpu natively from .gpu/ggml-src.tar.xz when this CPU
#      lacks an instruction set of the machine that built the wheel (GGML_NATIVE).
#   1. nvidia-smi -L, `ondevice system`, and a check that a hardware Vulkan device of $VENDOR
#      is there and backend="auto" picks it.
#   2. a tiny random Phi-2 (tests/phi2_fixtures.py) converted with `ondevice convert` to f32
#      and f16; scripts/gpu_vulkan_check.py agree: CPU vs Vulkan logits (and transformers'
#      for f32), Stats/Model report the GPU and a full offload.
#   3. FULL=1: a full-size Phi-2-shaped checkpoint with random weights
#      (benchmarks/convert_bench.py), `ondevice convert` to f16, `ondevice quantize` Q4_K_M,
#      the same agreement check, then `ondevice bench -p 512 -n 128 -r 3` on vulkan and cpu.
# Environment: OUT (default /tmp/gpu-vulkan-out), WORK (scratch, default /tmp/gvk-work),
# BUDGET (seconds, default 420), VENDOR (NVIDIA), FULL (1), REBUILD_CPU (1: always rebuild
# libggml-cpu, 0: never; default: when an instruction set is missing), PY (python3);
# ALLOW_SOFTWARE=1 VENDOR=llvmpipe SKIP_GL=1 (with lavapipe's ICD and GGML_VK_VISIBLE_DEVICES=0)
# is a dry run on a machine without a GPU (SKIP_GL: leave the system's libraries alone).
# Exit status: 0 when every stage that ran passed.
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
OUT=${OUT:-/tmp/gpu-vulkan-out}
WORK=${WORK:-/tmp/gvk-work}
BUDGET=${BUDGET:-420}
VENDOR=${VENDOR:-NVIDIA}
FULL=${FULL:-1}
PY=${PY:-python3}
SITE=$WORK/site
mkdir -p "$OUT" "$WORK"
T0=$SECONDS
FAILED=()
stage() { echo; echo "=== [$((SECONDS - T0)) s] $*"; }
left() { echo $((BUDGET - (SECONDS - T0))); }
fail() { echo "FAILED: $*" >&2; FAILED+=("$*"); }
# run NAME LIMIT CMD...: a step with its own time limit, its wall time printed (on stderr, so a
# step's stdout redirected to a file holds the step's output alone)
run() {
  local name=$1 limit=$2 t=$SECONDS
  shift 2
  if ((limit > $(left))); then limit=$(left); fi
  if ((limit < 5)); then fail "$name: no time left"; return 1; fi
  timeout --kill-after=5 "$limit" "$@"
  local rc=$?
  echo "--- $name: rc=$rc, $((SECONDS - t)) s" >&2
  ((rc == 0)) || fail "$name (rc=$rc)"
  return $rc
}
# untar FILE.tar.xz DIR, with Python's lzma (a bare image may lack the xz program)
untar() {
  "$PY" -c 'import sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    t.extractall(sys.argv[2], **({"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}))' "$1" "$2"
}
finish() {
  stage "done in $((SECONDS - T0)) s; failures: ${#FAILED[@]}"
  for f in "${FAILED[@]}"; do echo "  - $f"; done
  exit $((${#FAILED[@]} > 0))
}

# --- 0. setup -------------------------------------------------------------------------------------
stage "setup"
uname -a
grep -m1 '^model name' /proc/cpuinfo
echo "CPUs: $(nproc); built on: $(cat .gpu/cpu-model.txt 2>/dev/null)"
# The Vulkan loader and glvnd (NVIDIA's Vulkan driver lives in libGLX_nvidia, a glvnd vendor
# library: without libGLdispatch & co. its vk_icdGetInstanceProcAddr hands out no vkCreateInstance).
if [[ "${SKIP_GL:-0}" != 1 ]]; then
  echo "unpacking $(ls .gl/*.deb | xargs -n1 basename | tr '\n' ' ')"
  for f in .gl/*.deb; do dpkg -x "$f" /; done
  ldconfig
fi
ldconfig -p | grep -E 'libvulkan\.so\.1 |libGLdispatch|libGLX_nvidia|nvidia-glvkspirv|nvidia-gpucomp|nvidia-glcore' | sed 's/^\s*/  /'
echo "ICD files: $(ls /etc/vulkan/icd.d/*.json /usr/share/vulkan/icd.d/*.json /usr/local/share/vulkan/icd.d/*.json 2>/dev/null | tr '\n' ' ')"
ls /dev/nvidia* /dev/dri 2>&1 | tr '\n' ' '
echo
rm -rf "$SITE" && mkdir -p "$SITE"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl ||
  fail "pip install of .whl"
untar .gpu/llama_cpp_vulkan.tar.xz "$SITE" || fail "unpacking the binding"
export PYTHONPATH=$SITE:$REPO PYTHONUNBUFFERED=1 ONDEVICE_HOME=$WORK/home HF_HUB_OFFLINE=1 NO_COLOR=1

missing=$(LC_ALL=C comm -23 <(LC_ALL=C sort .gpu/cpu-flags.txt) <(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2 | tr ' ' '\n' | LC_ALL=C sort) | tr '\n' ' ')
echo "instruction sets of the build machine missing here: ${missing:-none}"
if [[ "${REBUILD_CPU:-}" == 1 || (-n "$missing" && "${REBUILD_CPU:-}" != 0) ]]; then
  stage "rebuilding libggml-cpu natively (the wheel's would SIGILL here)"
  rm -rf "$WORK/ggml" && untar .gpu/ggml-src.tar.xz "$WORK"
  gen=()
  command -v ninja >/dev/null && gen=(-G Ninja)
  if run "cmake configure" 60 cmake -S "$WORK/ggml" -B "$WORK/ggml/build" "${gen[@]}" \
    -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=ON \
    -DGGML_BUILD_TESTS=OFF -DGGML_BUILD_EXAMPLES=OFF -DGGML_CCACHE=OFF -DGGML_LLAMAFILE=ON \
    -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON -DCMAKE_INSTALL_RPATH='$ORIGIN' >"$WORK/ggml-cfg.log" &&
    run "build ggml-cpu" 240 cmake --build "$WORK/ggml/build" -j "$(nproc)" --target ggml-cpu >"$WORK/ggml-build.log"; then
    cp -L "$WORK/ggml/build/src/libggml-cpu.so.0" "$SITE/llama_cpp/lib/libggml-cpu.so.0"
    grep -m1 "Adding CPU backend" "$WORK/ggml-cfg.log"
  else
    tail -20 "$WORK/ggml-cfg.log" "$WORK/ggml-build.log"
  fi
fi
"$PY" -c 'import llama_cpp, sys; print("llama_cpp", llama_cpp.__version__, "from", llama_cpp.__file__); print(llama_cpp.llama_print_system_info().decode())' ||
  fail "importing the binding"

# --- 1. the device ----------------------------------------------------------------------------------
stage "the device"
nvidia-smi -L
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv
# Find a loader setup under which ggml sees the GPU: as installed; the driver's own ICD file;
# that plus the driver's library folder; an ICD file naming libGLX_nvidia by absolute path.
probe() {
  "$PY" -c 'import sys
from ondevice import backends
found = [d for d in backends.devices() if d.family == "vulkan" and sys.argv[1].lower() in d.description.lower()]
print("  probe:", [f"{d.name}: {d.description}" for d in found] or "no device")
sys.exit(0 if found else 1)' "$VENDOR" 2>&1 | grep -v '^ggml_vulkan'
}
NV_ICD=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
GLX=$(ldconfig -p | awk '/libGLX_nvidia\.so\.0 /{print $NF; exit}')
[[ -z "$GLX" ]] && GLX=$(ls /usr/local/nvidia/lib64/libGLX_nvidia.so.0 2>/dev/null)
found=0
for variant in installed driver-icd driver-libs absolute-icd; do
  case $variant in
  driver-icd) [[ -f $NV_ICD ]] || continue; export VK_DRIVER_FILES=$NV_ICD VK_ICD_FILENAMES=$NV_ICD ;;
  driver-libs) export LD_LIBRARY_PATH=/usr/local/nvidia/lib64:/usr/local/nvidia/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} ;;
  absolute-icd)
    [[ -n "$GLX" ]] || continue
    printf '{"file_format_version": "1.0.1", "ICD": {"library_path": "%s", "api_version": "1.3.0"}}\n' "$GLX" >"$WORK/nvidia_icd.json"
    export VK_DRIVER_FILES=$WORK/nvidia_icd.json VK_ICD_FILENAMES=$WORK/nvidia_icd.json ;;
  esac
  echo "Vulkan loader setup '$variant': VK_DRIVER_FILES=${VK_DRIVER_FILES:-} LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
  if probe; then found=1; break; fi
done
run "ondevice system" 60 "$PY" -m ondevice system
soft=()
[[ "${ALLOW_SOFTWARE:-0}" == 1 ]] && soft=(--allow-software)
if ((found == 0)) || ! run "devices check" 60 "$PY" scripts/gpu_vulkan_check.py devices --vendor "$VENDOR" "${soft[@]}"; then
  echo "no $VENDOR Vulkan device: the loader's view and the driver's libraries follow"
  [[ -n "$GLX" ]] && ldd "$GLX"
  ls -l /usr/local/nvidia/lib64 2>/dev/null | grep -iE 'glx|vulkan|glvk|gpucomp|glcore|dispatch|tls|glsi' | head -20
  VK_LOADER_DEBUG=error,warn,driver "$PY" -m ondevice system 2>&1 | head -40
  finish
fi

# --- 2. tiny random Phi-2: CPU vs Vulkan vs transformers ----------------------------------------
stage "tiny random Phi-2"
if run "tiny checkpoint + convert" 120 "$PY" scripts/gpu_vulkan_check.py tiny "$WORK/tiny"; then
  run "agree tiny f32" 90 "$PY" scripts/gpu_vulkan_check.py agree "$WORK/tiny/tiny-f32.gguf" \
    --hf "$WORK/tiny/hf" --vendor "$VENDOR"
  run "agree tiny f16" 90 "$PY" scripts/gpu_vulkan_check.py agree "$WORK/tiny/tiny-f16.gguf" \
    --vendor "$VENDOR"
  run "ondevice run --backend vulkan" 60 "$PY" -m ondevice run "$WORK/tiny/tiny-f16.gguf" \
    "The capital of France is" --backend vulkan -n 8 --temperature 0 --json
fi

# --- 3. full-size Phi-2-shaped Q4_K_M: agreement and bench ----------------------------------------
stage "full-size Phi-2-shaped Q4_K_M ($(left) s left)"
B=$WORK/bench
Q=$WORK/phi2-q4_k_m.gguf
if [[ "$FULL" != 1 ]]; then
  echo "skipped (FULL=$FULL)"
elif (($(left) < 200)); then
  echo "skipped: $(left) s left, the stage needs about 200"
else
  df -h "$WORK" | tail -1
  run "generate checkpoint" 150 env ONDEVICE_BENCH_CACHE="$B" "$PY" benchmarks/convert_bench.py --child generate &&
    run "convert f16" 120 "$PY" -m ondevice convert "$B/phi2-shaped-hf" -o "$WORK/phi2-f16.gguf" --force &&
    run "quantize Q4_K_M" 150 "$PY" -m ondevice quantize "$WORK/phi2-f16.gguf" "$Q" --type Q4_K_M -t "$(nproc)" &&
    ls -l "$Q" &&
    run "agree Q4_K_M" 120 "$PY" scripts/gpu_vulkan_check.py agree "$Q" --vendor "$VENDOR"
fi
if [[ -f "$Q" ]]; then
  for backend in vulkan cpu; do
    run "bench $backend" 150 "$PY" -m ondevice bench "$Q" --backend "$backend" -p 512 -n 128 -r 3 \
      -o json --save "$OUT/bench.jsonl" --label "$backend" >"$OUT/bench-$backend.json"
  done
  if [[ -s "$OUT/bench.jsonl" ]]; then
    "$PY" scripts/gpu_vulkan_check.py table "$OUT/bench.jsonl"
    "$PY" -m ondevice bench --compare "$OUT/bench.jsonl"
  fi
  nvidia-smi --query-gpu=name,memory.used,temperature.gpu,clocks.sm --format=csv
fi
finish
