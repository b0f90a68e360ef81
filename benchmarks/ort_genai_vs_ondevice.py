"""ondevice against ONNX Runtime GenAI (Microsoft's on-device path for Phi) on the same checkpoint.

Issue 9's comparison: the full-size Phi-2-shaped checkpoint with random weights (made by
benchmarks/convert_bench.py in the benchmark cache) is turned into an int4 CPU model by ONNX
Runtime GenAI's own builder (`python -m onnxruntime_genai.models.builder -i CKPT -o OUT -p int4
-e cpu`) and into Q4_K_M by our converter and quantizer (bench_vs_llama_bench.py made that file).
Then, in interleaved rounds, each runtime in a fresh child process measures:

    pp512        one batch of 512 random prompt tokens
    tg32@dD      32 single-token decodes after D random tokens were put in the KV cache (greedy:
                 ORT's generate_next_token samples from logits it already has, so the 32 decodes
                 are timed from the first to the 33rd call)

and the child's peak RSS (VmHWM) at the end of each test. ondevice runs `ondevice bench` with the
settings given by --ondevice-args (default: those `ondevice tune --workload chat` chose on this
machine: flash attention off, 2 threads, repacking off on this AMX build). ONNX Runtime GenAI
runs with its defaults (intra-op threads = all cores).

The builder and runtime live in their own venv (they pin numpy/onnx versions we don't want in
ondevice's): python3 -m venv ~/.cache/ondevice-ort/venv && that venv's pip install
onnxruntime-genai onnxruntime onnx onnx-ir onnxscript torch==2.13.0 transformers.

    python benchmarks/ort_genai_vs_ondevice.py --rounds 3 --write-results
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from stream_vs_llama_bench import machine_line, write_results  # noqa: E402

CACHE = Path(os.environ.get("ONDEVICE_BENCH_CACHE", Path.home() / ".cache" / "ondevice-bench"))
CKPT = CACHE / "phi2-shaped-hf"
ORT_MODEL = CACHE / "phi2-shaped-ort-int4-cpu"
GGUF = CACHE / "phi2-shaped-random-Q4_K_M.gguf"
ORT_PY = Path.home() / ".cache" / "ondevice-ort" / "venv" / "bin" / "python"
SECTION = "## ONNX Runtime GenAI vs ondevice, Phi-2-shaped (issue 9)"

# Runs inside ORT's venv: one test, prints one JSON line.
ORT_CHILD = r"""
import json, sys, time
import numpy as np
import onnxruntime_genai as og
path, test, n, depth, ctx = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
rng = np.random.default_rng(42)
model = og.Model(path)
def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
def run(test=test, n=n, depth=depth):
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=ctx, do_sample=False)
    gen = og.Generator(model, params)
    if test == "pp":
        toks = rng.integers(100, 50000, n).astype(np.int32)
        t0 = time.perf_counter(); gen.append_tokens(toks); return n / (time.perf_counter() - t0)
    gen.append_tokens(rng.integers(100, 50000, max(depth, 1)).astype(np.int32))
    gen.generate_next_token()  # samples from the prompt's logits: no forward pass
    t0 = time.perf_counter()
    for _ in range(n):
        gen.generate_next_token()  # one forward pass for the previous token, then a sample
    return n / (time.perf_counter() - t0)
run("tg", 2, 16)  # warm-up: first-call costs (a short one; depth 1500 takes a minute)
tps = [run() for _ in range(REPS)]
print(json.dumps({"tps": tps, "peak_rss_bytes": peak()}))
"""


def build_ort_model(ort_py: Path) -> None:
    if (ORT_MODEL / "genai_config.json").is_file():
        return
    if not CKPT.is_dir():
        raise SystemExit(f"{CKPT} is missing: run benchmarks/convert_bench.py first")
    cmd = [str(ort_py), "-m", "onnxruntime_genai.models.builder", "-i", str(CKPT)]
    cmd += ["-o", str(ORT_MODEL), "-p", "int4", "-e", "cpu", "-c", str(CACHE / "ort-build-cache")]
    print("building:", " ".join(cmd), file=sys.stderr)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    print(f"built in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


def ort_test(ort_py: Path, test: str, n: int, depth: int, ctx: int, reps: int) -> dict:
    code = ORT_CHILD.replace("REPS", str(reps))
    args = [str(ort_py), "-c", code, str(ORT_MODEL), test, str(n), str(depth), str(ctx)]
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=3600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def ondevice_test(extra: list[str], test: str, n: int, depth: int, ctx: int, reps: int) -> dict:
    cmd = [sys.executable, "-m", "ondevice", "bench", str(GGUF), "--no-extras", "-o", "json"]
    cmd += ["-r", str(reps), "--ctx", str(ctx)] + extra  # bench never applies stored tunings
    cmd += (
        ["-p", str(n), "-n", "0"] if test == "pp" else ["-p", "0", "-n", str(n), "-d", str(depth)]
    )
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=3600)
    recs = json.loads(out.stdout)
    rec = next(r for r in recs if r["test"].startswith(test))
    return {"tps": rec["samples_tps"], "peak_rss_bytes": rec["peak_rss_bytes"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=2, help="repetitions inside each run")
    ap.add_argument("--depths", default="0,1500")
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--ort-python", type=Path, default=ORT_PY)
    ap.add_argument("--ondevice-args", default="--flash-attn off -t 2")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args()
    build_ort_model(args.ort_python)
    if args.build_only:
        return
    tests = [("pp", 512, 0)] + [("tg", 32, int(d)) for d in args.depths.split(",")]
    extra = args.ondevice_args.split()
    runs: dict[tuple, dict[str, list[dict]]] = {t: {"ort": [], "ondevice": []} for t in tests}
    t_start = time.perf_counter()
    for r in range(args.rounds):
        for test, n, depth in tests:
            sides = ["ort", "ondevice"] if r % 2 == 0 else ["ondevice", "ort"]
            for side in sides:
                if side == "ort":
                    res = ort_test(args.ort_python, test, n, depth, args.ctx, args.reps)
                else:
                    res = ondevice_test(extra, test, n, depth, args.ctx, args.reps)
                runs[(test, n, depth)][side].append(res)
                print(
                    f"round {r + 1} {test}{n}@d{depth} {side}: "
                    f"{statistics.mean(res['tps']):.2f} t/s, peak {res['peak_rss_bytes'] >> 20} MiB",
                    file=sys.stderr,
                )
    took = time.perf_counter() - t_start
    (CACHE / "ort-vs-ondevice.json").write_text(
        json.dumps({f"{t[0]}{t[1]}@d{t[2]}": v for t, v in runs.items()}, indent=1)
    )

    def med(rs: list[dict]) -> float:
        return statistics.median(statistics.mean(x["tps"]) for x in rs)

    def peak(rs: list[dict]) -> int:
        return max(x["peak_rss_bytes"] for x in rs) >> 20

    ort_size = sum(f.stat().st_size for f in ORT_MODEL.iterdir() if f.is_file())
    cmd = f"python benchmarks/ort_genai_vs_ondevice.py --rounds {args.rounds} --reps {args.reps}"
    lines = [
        SECTION,
        "",
        f"`{cmd}`, {time.strftime('%Y-%m-%d')}. Same full-size Phi-2-shaped checkpoint (random "
        f"weights): ONNX Runtime GenAI int4 CPU model from its own builder ({ort_size / 1e9:.2f} GB "
        f"on disk), ondevice Q4_K_M from our converter and quantizer ({GGUF.stat().st_size / 1e9:.2f}"
        f" GB). ondevice: `ondevice bench` with `{args.ondevice_args}` (what `ondevice tune "
        f"--workload chat` chose here; repacking off on this AMX build), context {args.ctx}. ONNX "
        f"Runtime GenAI: its defaults, max_length {args.ctx}, greedy. Each cell: median over "
        f"{args.rounds} interleaved rounds of the mean of {args.reps} repetitions after a warm-up, "
        f"each run in a fresh process; peak RSS is that process's VmHWM (largest over rounds). "
        f"{machine_line()} Took {took:.0f} s.",
        "",
        "| test | ONNX Runtime GenAI t/s | ondevice t/s | ondevice / ORT | ORT peak RSS | ondevice peak RSS |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for (test, n, depth), v in runs.items():
        o, d = med(v["ort"]), med(v["ondevice"])
        name = f"{test}{n}" + (f" @ depth {depth}" if test == "tg" else "")
        lines.append(
            f"| {name} | {o:.2f} | {d:.2f} | **{d / o:.2f}x** | {peak(v['ort'])} MiB | "
            f"{peak(v['ondevice'])} MiB |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write_results:
        write_results(text, SECTION)


if __name__ == "__main__":
    main()
