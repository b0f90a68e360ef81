"""Issue 2's benchmark: end-to-end `Model.stream` generation speed against llama-bench's tg128.

Both run the same GGUF file on the same llama.cpp source (llama-bench is built from the installed
binding's sdist by build_llama_tools.sh) with the same settings: 2 threads, repacking off
(ondevice turns it off on AMX builds; llama-bench gets `--repack 0`), flash attention auto,
n_batch 2048 / n_ubatch 512, mmap. Rounds alternate llama-bench and ondevice so that the noise of
a shared machine hits both alike, and the medians of the rounds are compared.

llama-bench's tg128 is 128 single-token decodes with random tokens and no sampling. Ours is what
a user gets: `Model.stream(prompt, max_tokens=128, temperature=0)` with sampling, detokenization
and the stop checks, rated as `Stats.generation_tps` (completion tokens after the first / time
from the first token to the last). EOS cannot be ignored through `stream`, so the prompts are
ones the model keeps continuing (a counting sequence); a reply that ends early is re-run with the
next prompt, and a round that never reaches 128 tokens is an error.

    python benchmarks/stream_vs_llama_bench.py                 # demo model, 5 rounds
    python benchmarks/stream_vs_llama_bench.py --model X.gguf --rounds 7 --write-results

The helpers here (`llama_bench_bin`, `run_llama_bench`, `median`, `machine_line`) are also used
by bench_vs_llama_bench.py and fit_accuracy.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
SECTION = "## Streaming vs llama-bench (issue 2)"

# Prompts a model keeps continuing for 128+ tokens under greedy decoding (tried in order).
PROMPTS = [
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,",
    "Here is a list of the numbers from one to one thousand: 1 2 3 4 5 6 7 8 9 10",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z a b c d e f g",
]


def llama_bench_bin() -> Path:
    """Path of llama-bench, built from the installed binding's sdist if it isn't yet."""
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
    bin_dir = Path(out.stdout.strip().splitlines()[-1])
    return bin_dir / "llama-bench"


def run_llama_bench(
    binary: Path,
    model: str | Path,
    *,
    n_prompt: int = 0,
    n_gen: int = 0,
    depth: int = 0,
    threads: int = 2,
    reps: int = 3,
    n_batch: int = 2048,
    n_ubatch: int = 512,
    flash_attn: str = "auto",
    kv_type: str = "f16",
    repack: bool = False,
) -> list[dict]:
    """Run llama-bench once with ondevice's settings; its JSON records (avg_ts, samples_ts...)."""
    cmd = [
        str(binary),
        "-m",
        str(model),
        "-p",
        str(n_prompt),
        "-n",
        str(n_gen),
        "-d",
        str(depth),
        "-t",
        str(threads),
        "-r",
        str(reps),
        "-b",
        str(n_batch),
        "-ub",
        str(n_ubatch),
        "-fa",
        flash_attn,
        "-ctk",
        kv_type,
        "-ctv",
        kv_type,
        "--repack",
        # As ondevice runs: off on AMX builds (AMX kernels, reached by repacking, SIGILL on the
        # Sapphire Rapids VMs), on elsewhere; callers pass what the loaded Model used.
        "1" if repack else "0",
        "--load-mode",
        "mmap",
        "-o",
        "json",
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def machine_line() -> str:
    """The machine as RESULTS.md names it, with the load average at the time of writing."""
    try:
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{os.cpu_count()}-core {cpu}, "
        f"{round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GB; "
        f"load average {load} (the benchmark's own threads included)"
    )


def stream_tps(model, n_gen: int, reps: int) -> tuple[float, int]:
    """Mean end-to-end streamed tok/s over `reps` replies of n_gen tokens, and the prompt used."""
    for i, prompt in enumerate(PROMPTS):
        rates = []
        for _ in range(reps):
            model.reset()  # evaluate the prompt afresh, as every user call after another prompt
            res = model.generate(prompt, max_tokens=n_gen, temperature=0)
            if res.stats.completion_tokens < n_gen:
                break
            rates.append(res.stats.generation_tps)
        else:
            return statistics.fmean(rates), i
    raise RuntimeError(f"no prompt made the model generate {n_gen} tokens (it stopped early)")


def measure(model_path: str, rounds: int, threads: int, n_gen: int, reps: int) -> dict:
    import ondevice

    binary = llama_bench_bin()
    m = ondevice.load(model_path, n_ctx=512, threads=threads, flash_attn="auto")
    # Warm-up, as llama-bench does before its repetitions.
    m.generate(PROMPTS[0], max_tokens=8, temperature=0)
    theirs, ours, prompt_ix = [], [], 0
    for r in range(rounds):
        rec = run_llama_bench(
            binary,
            model_path,
            n_gen=n_gen,
            threads=threads,
            reps=reps,
            repack=m.settings["repack"],
        )
        theirs.append(rec[0]["avg_ts"])
        tps, prompt_ix = stream_tps(m, n_gen, reps)
        ours.append(tps)
        print(
            f"round {r + 1}/{rounds}: llama-bench tg{n_gen} {theirs[-1]:.1f} t/s, "
            f"ondevice stream {ours[-1]:.1f} t/s",
            file=sys.stderr,
        )
    notes = list(m.notes)
    repack = m.settings["repack"]
    m.close()
    return {
        "model": Path(model_path).name,
        "threads": threads,
        "model_bytes": Path(model_path).stat().st_size,
        "llama_bench": theirs,
        "ondevice": ours,
        "ratio": median(ours) / median(theirs),
        "prompt": PROMPTS[prompt_ix],
        "notes": notes,
        "repack": repack,
    }


def table(results: list[dict], n_gen: int) -> str:
    lines = [
        f"| model | threads | llama-bench tg{n_gen} t/s (median; rounds) | ondevice "
        "`Model.stream` t/s (median; rounds) | ratio |",
        "|---|---:|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} ({r['model_bytes'] / 1e6:.0f} MB) | {r['threads']} | "
            f"{median(r['llama_bench']):.1f}; "
            f"{', '.join(f'{x:.1f}' for x in r['llama_bench'])} | {median(r['ondevice']):.1f}; "
            f"{', '.join(f'{x:.1f}' for x in r['ondevice'])} | **{r['ratio']:.2f}x** |"
        )
    return "\n".join(lines)


def write_results(text: str, section: str = SECTION) -> None:
    """Put `text` (which starts with its `section` heading) in RESULTS.md, replacing that
    section only and leaving the other engineers' sections as they are; atomic rename."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if section in old:
        head, _, rest = old.partition(section)
        nxt = rest.find("\n## ")
        tail = rest[nxt:] if nxt != -1 else "\n"
        new = head + text.rstrip() + "\n" + tail
    else:
        new = old.rstrip() + "\n\n" + text.rstrip() + "\n"
    tmp = RESULTS.with_suffix(".md.tmp")
    tmp.write_text(new)
    tmp.replace(RESULTS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", help="GGUF file (repeatable; default: demo)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", default="2", help="thread counts, e.g. 1,2")
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3, help="repetitions inside each round")
    ap.add_argument("--write-results", action="store_true", help=f"update {RESULTS.name}")
    args = ap.parse_args()
    from ondevice.locate import demo_model_path

    paths = args.model or [str(demo_model_path())]
    t0 = time.time()
    threads = [int(t) for t in args.threads.split(",")]
    results = [measure(p, args.rounds, t, args.n_gen, args.reps) for p in paths for t in threads]
    tab = table(results, args.n_gen)
    print(tab)
    text = "\n".join(
        [
            SECTION,
            "",
            f"`python benchmarks/stream_vs_llama_bench.py --rounds {args.rounds} "
            f"--threads {args.threads}"
            + "".join(f" --model {Path(p).name}" for p in (args.model or []))
            + "`, "
            f"{time.strftime('%Y-%m-%d')}, {args.rounds} interleaved rounds "
            f"(llama-bench, ondevice, ...), each round the mean of {args.reps} repetitions "
            f"after a warm-up; {args.threads} thread(s), repacking "
            f"{'on' if results[0]['repack'] else 'off'} in both (as ondevice runs on this "
            "build), flash attention auto, n_batch 2048 / n_ubatch 512, mmap. "
            f"Machine: {machine_line()}.",
            "",
            f"llama-bench tg{args.n_gen}: {args.n_gen} single-token decodes of random tokens, "
            "no sampling. ondevice: `Model.stream(prompt, max_tokens="
            f"{args.n_gen}, temperature=0)` end to end (native greedy sampler, detokenization, "
            "stop checks, Chunk objects), rated as `Stats.generation_tps` = completion tokens "
            f"after the first / time from first to last token. Prompt: `{results[0]['prompt']}` "
            "(a sequence the model keeps continuing, so the reply runs the full length).",
            "",
            tab,
            "",
            f"Goal ≥ 0.90x. Took {time.time() - t0:.0f} s.",
        ]
    )
    if args.write_results:
        write_results(text)
        print(f"wrote {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
