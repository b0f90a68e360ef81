"""The quantization quality ladder of the demo model, and ondevice's perplexity vs llama-perplexity.

1. The demo model (SmolLM2-135M-Instruct Q4_1) is dequantized to F16 with gguf-py
   (ondevice.quantize.dequantize_to_f16; cached in ~/.cache/ondevice-bench/quality/), and each
   ladder type is made from that F16 file with llama.cpp's quantizer and measured against it on
   tests/data/alice-ch1.txt: size, bits per weight, perplexity, KL divergence, top-1 agreement,
   greedy generation tok/s (ondevice.quantize.quality_ladder).
2. `ondevice perplexity` and llama-perplexity (built from the binding's own llama.cpp source by
   build_llama_tools.sh) on the same file, text, ctx and threads, repacking off on both sides:
   once with llama-perplexity's default batch (2048: several windows share one batch, n_seq =
   2048 / ctx) and once with -b ctx (one window per batch, as ondevice evaluates).

The F16 weights are the Q4_1 model's own decoded values, so the ladder measures what
requantizing those values costs, not what quantizing the original bf16 checkpoint would.

    python benchmarks/quality_ladder.py --write-results
    python benchmarks/quality_ladder.py --ctx 128 --types Q8_0,Q4_K_M,Q2_K
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from stream_vs_llama_bench import machine_line, write_results  # noqa: E402

SECTION = "## Quantization quality ladder (issue 5)"
TEXT = HERE.parent / "tests" / "data" / "alice-ch1.txt"
CACHE = Path(os.environ.get("ONDEVICE_BENCH_CACHE", Path.home() / ".cache" / "ondevice-bench"))


def llama_perplexity_bin() -> Path:
    """llama-perplexity, built from the installed binding's sdist if it isn't yet."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHON", sys.executable)
    out = subprocess.run(
        ["bash", str(HERE / "build_llama_tools.sh")],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    return Path(out.stdout.strip().splitlines()[-1]) / "llama-perplexity"


def run_llama_perplexity(
    exe: Path, model: Path, text: Path, ctx: int, threads: int, batch: int | None
) -> tuple[float, str]:
    cmd = [str(exe), "-m", str(model), "-f", str(text), "-c", str(ctx), "-t", str(threads)]
    cmd += ["--no-repack"]  # the AMX kernels behind repacking crash on this machine
    if batch is not None:
        cmd += ["-b", str(batch)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", proc.stdout + proc.stderr)
    if not found:
        raise RuntimeError(f"no PPL in llama-perplexity's output:\n{proc.stderr[-2000:]}")
    return float(found[1]), " ".join(cmd[1:]).replace(str(HERE.parent) + "/", "")


def run_ondevice_perplexity(model: Path, text: Path, ctx: int, threads: int) -> float:
    """`ondevice perplexity` in a fresh process, as a user runs it."""
    import json

    proc = subprocess.run(
        [sys.executable, "-m", "ondevice", "perplexity", str(model), str(text)]
        + ["--ctx", str(ctx), "-t", str(threads), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(json.loads(proc.stdout)["perplexity"])


def _pct(ours: float, theirs: float) -> str:
    """Relative difference; llama-perplexity prints 4 decimals, so round ours the same way."""
    d = round(100 * (round(ours, 4) / theirs - 1), 3) + 0.0  # + 0.0: no "-0.000%"
    return f"{d:+.3f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--types", default="Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q3_K_M,Q2_K")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--gen-rounds", type=int, default=3)
    ap.add_argument("--skip-compare", action="store_true", help="no llama-perplexity runs")
    ap.add_argument("--write-results", action="store_true", help="update RESULTS.md")
    args = ap.parse_args()

    from ondevice.quantize import dequantize_to_f16
    from ondevice.quantize.quality import read_text
    from ondevice.quantize.report import quality_ladder

    from ondevice.locate import demo_model_path

    demo = demo_model_path()
    f16 = CACHE / "quality" / "demo-f16.gguf"
    if not f16.is_file() or f16.stat().st_mtime < demo.stat().st_mtime:
        f16.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        dequantize_to_f16(demo, f16)
        print(f"dequantized to {f16} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    t0 = time.perf_counter()
    rep = quality_ladder(
        f16,
        read_text(TEXT),
        [t for t in args.types.split(",") if t],
        ctx=args.ctx,
        threads=args.threads,
        gen_tokens=args.gen_tokens,
        gen_rounds=args.gen_rounds,
        keep_dir=CACHE / "quality",
        on_status=lambda s: print(f"[{time.perf_counter() - t0:6.0f}s] {s}", file=sys.stderr),
    )
    ladder_s = time.perf_counter() - t0
    cmd = f"python benchmarks/quality_ladder.py --ctx {args.ctx} --threads {args.threads}"
    lines = [
        SECTION,
        "",
        f"Command: `{cmd}` ({time.strftime('%Y-%m-%d')}). Machine: {machine_line()}.",
        "",
        f"Demo model (SmolLM2-135M-Instruct Q4_1) dequantized to F16 with gguf-py, then each type "
        f"made from that F16 file by llama.cpp's quantizer (`ondevice quantize`). Text: "
        f"tests/data/alice-ch1.txt ({rep.text_tokens} tokens); ctx {rep.ctx}, "
        f"{rep.scored_tokens} tokens scored (second half of each window, as llama-perplexity). "
        f"KL divergence and top-1 agreement are against the F16 file. Generation: greedy, "
        f"{args.gen_tokens} tokens, {rep.threads} threads, median of {args.gen_rounds} rounds "
        f"that visit every file in turn (the machine is shared: tok/s is noisy). Ladder wall "
        f"time {ladder_s:.0f}s.",
        "",
        rep.table(),
        "",
        "SmolLM2-135M's rows are 576 wide, not a multiple of 256, so llama.cpp stores most "
        "k-quant tensors in a legacy fallback type (Q6_K -> Q8_0, Q5_K -> Q5_1, Q4_K -> Q5_0, "
        "Q3_K/Q2_K -> Q4_0 or similar); only ffn_down (1536 wide) gets real k-quants. That is why "
        "bits per weight sit above the type's nominal size.",
    ]
    if not args.skip_compare:
        exe = llama_perplexity_bin()
        rows = []
        for model_name, path in (("demo Q4_1", demo), ("demo F16", f16)):
            ours = run_ondevice_perplexity(path, TEXT, args.ctx, args.threads)
            theirs_default, cmd_default = run_llama_perplexity(
                exe, path, TEXT, args.ctx, args.threads, None
            )
            theirs_b, cmd_b = run_llama_perplexity(
                exe, path, TEXT, args.ctx, args.threads, args.ctx
            )
            rows.append((model_name, ours, theirs_default, theirs_b, cmd_default))
        lines += [
            "",
            f"ondevice perplexity vs llama-perplexity (same file, text, ctx {args.ctx}, "
            f"-t {args.threads}, repacking off):",
            "",
            "| model | ondevice | llama-perplexity (default -b 2048) | diff "
            f"| llama-perplexity -b {args.ctx} | diff |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, ours, theirs, theirs_b, _ in rows:
            lines.append(
                f"| {name} | {ours:.4f} | {theirs:.4f} | {_pct(ours, theirs)} "
                f"| {theirs_b:.4f} | {_pct(ours, theirs_b)} |"
            )
        lines += [
            "",
            f"llama-perplexity command: `llama-perplexity {rows[0][4]}` (and `-b {args.ctx}`). "
            f"With the default batch it evaluates 2048 / ctx windows together in one context; "
            f"ondevice evaluates one window per batch, which is what `-b {args.ctx}` does.",
        ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write_results:
        write_results(text, SECTION)


if __name__ == "__main__":
    main()
