"""`ondevice tune` against llama.cpp's own defaults, interleaved, on the same file.

For each model: `ondevice tune MODEL --workload chat --ctx CTX` (in a child process, with its own
ONDEVICE_HOME under the benchmark cache) picks settings; then, in interleaved rounds (defaults,
tuned, tuned, defaults, ...), llama-bench runs pp512, tg32 at depth 0 and tg32 at depth CTX-32
(so its context is CTX) once with its default settings and once with the tuned ones, and the
medians over rounds are compared. Peak RSS is the llama-bench child's (wait4's ru_maxrss) in the
deep run, i.e. at context CTX. Both sides use the same binary, built from the installed binding's
sdist (benchmarks/build_llama_tools.sh), so the difference is the settings alone.

"llama.cpp's defaults" are llama-bench's (flash attention auto, n_batch 2048 / n_ubatch 512,
f16 KV, mmap, its default thread count) *with `--repack 0`*: this machine's llama.cpp build has
AMX kernels, reached through weight repacking, that die with SIGILL here, so repacking is off on
both sides and never a candidate for the tuner.

Faithfulness: next-token KL divergence and top-1 agreement of the tuned settings against
llama.cpp's defaults (flash attention on, which is what llama.cpp's "auto" resolves to on a CPU)
over a fixed text, with every position's logits (ondevice.tune.check_faithful).

The child processes run without OMP_WAIT_POLICY (the test suite sets it to PASSIVE): users run
with OpenMP's default, spinning waits, and so does llama-bench.

    python benchmarks/tune_vs_defaults.py --models demo --rounds 3 --reps 1 --write-results
    python benchmarks/tune_vs_defaults.py --models q4km --rounds 2 --reps 1 --passive \
        --time-budget 1200 --write-results
    python benchmarks/tune_vs_defaults.py --add-raw ~/.cache/ondevice-bench/tune-results/X.json

Each run adds its models to tune-results/results-index.json; --write-results renders every
model in that index into RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from stream_vs_llama_bench import llama_bench_bin, machine_line, median, write_results  # noqa: E402

CACHE = Path(os.environ.get("ONDEVICE_BENCH_CACHE", Path.home() / ".cache" / "ondevice-bench"))
TUNE_HOME = CACHE / "tune-home"
SECTION = "## Tune vs llama.cpp defaults (issue 9)"
FILES = {
    "q4km": CACHE / "phi2-shaped-random-Q4_K_M.gguf",
    "q8": CACHE / "phi2-shaped-random-Q8_0.gguf",
}


def model_path(name: str) -> Path:
    if name == "demo":
        from ondevice.locate import demo_model_path

        return demo_model_path()
    path = FILES.get(name, Path(name))
    if not path.is_file():
        raise SystemExit(f"{path} is missing (run benchmarks/bench_vs_llama_bench.py to make it)")
    return path


PASSIVE = False  # --passive: OMP_WAIT_POLICY=PASSIVE for every child (both sides)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if PASSIVE:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    env["ONDEVICE_HOME"] = str(TUNE_HOME)
    return env


KNOBS = ""  # --knobs: restrict the tuner's search (default: all)


def run_tune(path: Path, ctx: int, budget: float, reuse: bool) -> dict:
    """The tuner's JSON result (a saved one with --reuse)."""
    tag = "-passive" if PASSIVE else ""
    saved = CACHE / "tune-results" / f"{path.stem}-ctx{ctx}{tag}.json"
    if reuse and saved.is_file():
        return json.loads(saved.read_text())
    cmd = [sys.executable, "-m", "ondevice", "tune", str(path), "--workload", "chat"]
    cmd += ["--ctx", str(ctx), "--time-budget", str(budget), "--json"]
    cmd += ["--knobs", KNOBS] if KNOBS else []
    print("$", " ".join(cmd), flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), check=False)
    sys.stderr.write(out.stderr)
    if out.returncode != 0:
        raise SystemExit(f"ondevice tune failed ({out.returncode})")
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(out.stdout)
    return json.loads(out.stdout)


def bench_flags(settings: dict | None) -> list[str]:
    """llama-bench flags for tuned settings; [] = its defaults. Repacking off on both sides."""
    flags = ["--repack", "0"]
    if settings is None:
        return flags
    kv = settings["kv_type"]
    return flags + [
        "-t",
        str(settings["threads"]),
        "-fa",
        settings["flash_attn"],
        "-b",
        str(settings["n_batch"]),
        "-ub",
        str(settings["n_ubatch"]),
        "-ctk",
        kv,
        "-ctv",
        kv,
        "-lm",
        "mmap" if settings["use_mmap"] else "none",
    ]


def llama_bench(binary: Path, model: Path, flags: list[str], p: int, n: int, d: int, reps: int):
    """One llama-bench run: (tok/s, the child's peak RSS in bytes)."""
    cmd = [str(binary), "-m", str(model), "-p", str(p), "-n", str(n), "-d", str(d)]
    cmd += ["-r", str(reps), "-o", "json", *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=child_env())
    out = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"llama-bench failed ({proc.returncode}): {' '.join(cmd)}")
    return float(json.loads(out)[0]["avg_ts"]), usage.ru_maxrss * 1024


def faithfulness(path: Path, settings: dict) -> dict:
    """KL / top-1 of the tuned settings against llama.cpp's defaults (flash attention on)."""
    from ondevice import tune

    tuned = tune.Settings(**settings)
    reference = tune.Settings(flash_attn="on", repack=False, threads=tuned.threads)
    return tune.check_faithful(path, tuned, reference, n_ctx=512).to_dict()


def measure(name: str, ctx: int, rounds: int, reps: int, budget: float, reuse: bool) -> dict:
    path = model_path(name)
    t0 = time.time()
    result = run_tune(path, ctx, budget, reuse)
    tune_s = time.time() - t0
    # The stored settings: flash attention "auto" replaced by what ondevice resolved it to
    # (off for Phi-2 on a CPU, where llama.cpp's auto would pick on).
    settings = result.get("settings") or result["best"]["settings"]
    binary = llama_bench_bin()
    tests = {"pp512": (512, 0, 0), "tg32": (0, 32, 0), f"tg32@d{ctx - 32}": (0, 32, ctx - 32)}
    runs: dict[str, dict[str, list[float]]] = {
        side: {t: [] for t in [*tests, "rss"]} for side in ("defaults", "tuned")
    }
    for r in range(rounds):
        order = ("defaults", "tuned") if r % 2 == 0 else ("tuned", "defaults")
        for test, (p, n, d) in tests.items():
            for side in order:
                flags = bench_flags(None if side == "defaults" else settings)
                tps, rss = llama_bench(binary, path, flags, p, n, d, reps)
                runs[side][test].append(tps)
                if d:
                    runs[side]["rss"].append(rss)
                print(f"round {r + 1} {name} {side:8} {test:12} {tps:8.2f} t/s", flush=True)
    return {
        "name": name,
        "path": str(path),
        "ctx": ctx,
        "settings": settings,
        "tune": result,
        "tune_wall_s": tune_s,
        "faith": faithfulness(path, settings),
        "medians": {s: {t: median(v) for t, v in tv.items()} for s, tv in runs.items()},
        "runs": runs,
    }


GOALS = {"pp512": ">= 1.3x", "tg32": "", "rss": "<= 0.75x"}


def probe_table(res: dict) -> str:
    """The tuner's own measurements: every candidate, in the order measured."""
    rows = [
        "| candidate (tuner's probes, in order) | chat workload tok/s | tg tok/s by depth "
        "| peak RSS | status |",
        "|---|---|---|---|---|",
    ]
    for p in res["tune"]["probes"]:
        s = p["settings"]
        label = (
            f"t={s['threads']} fa={s['flash_attn']} kv={s['kv_type']} ub={s['n_ubatch']} "
            f"mmap={'on' if s['use_mmap'] else 'off'}"
        )
        tps = f"{res['ctx'] / p['cost']:.1f}" if p.get("cost") else "-"
        tg = ", ".join(f"{d}: {v:.1f}" for d, v in p["tg"].items()) or "-"
        rss = f"{p['peak_rss_bytes'] / 2**20:.0f} MiB" if p["peak_rss_bytes"] else "-"
        status = p["status"] + (f" ({p['reason'][:80]})" if p["reason"] else "")
        rows.append(f"| {label} | {tps} | {tg} | {rss} | {status} |")
    return "\n".join(rows)


def table(res: dict) -> str:
    m = res["medians"]
    s = res["settings"]
    t = res["tune"]
    f = res["faith"]
    deep = next(k for k in m["defaults"] if k.startswith("tg32@"))
    rows = [
        f"**{Path(res['path']).name}** (ctx {res['ctx']}). Tuned settings: flash attention "
        f"{s['flash_attn']}, threads {s['threads']}, n_batch {s['n_batch']} / n_ubatch "
        f"{s['n_ubatch']}, KV {s['kv_type']}, mmap {'on' if s['use_mmap'] else 'off'}, repacking "
        f"off (unavailable here). `ondevice tune` took {res['tune_wall_s']:.0f} s and estimated "
        + (
            f"{t['speedup']:.2f}x the chat-workload speed of its baseline, ondevice's untuned "
            "defaults."
            if t.get("speedup")
            else "no speedup (the defaults did not fit)."
        ),
        "",
        "| test | llama.cpp defaults | tuned | tuned / defaults | goal |",
        "|---|---|---|---|---|",
    ]
    for test in ("pp512", "tg32", deep, "rss"):
        a, b = m["defaults"][test], m["tuned"][test]
        if test == "rss":
            label, fa, fb = (
                f"peak RSS at ctx {res['ctx']}",
                f"{a / 2**20:.0f} MiB",
                f"{b / 2**20:.0f} MiB",
            )
        else:
            label, fa, fb = f"{test} (tok/s)", f"{a:.2f}", f"{b:.2f}"
        goal = ">= 1.5x" if test == deep else GOALS[test]
        rows.append(f"| {label} | {fa} | {fb} | {b / a:.2f}x | {goal} |")
    rows.append(
        f"| next-token KL vs defaults ({f['n_positions']} positions) | 0 | {f['kl_mean']:.2e} "
        f"(top-1 {f['top1']:.1%}) | | <= 0.01 |"
    )
    return "\n".join(rows)


INDEX = CACHE / "tune-results" / "results-index.json"


def render(entries: list[dict]) -> str:
    """The RESULTS.md section: what was compared, then one block per model."""
    head = (
        f"{SECTION}\n\n"
        "llama.cpp defaults = llama-bench's defaults (flash attention auto, its default thread "
        "count, n_batch 2048 / n_ubatch 512, f16 KV, mmap) with `--repack 0`: this build's AMX "
        "kernels, reached by weight repacking, crash on this machine, so repacking is off on both "
        "sides and is not a tuner candidate. Tuned = llama-bench with the flags of the settings "
        "`ondevice tune --workload chat` stored. Medians of interleaved rounds (which side goes "
        "first alternates); peak RSS is the llama-bench child's (wait4) in the deep test, whose "
        "context is the tuning's. KL: ondevice.tune.check_faithful, tuned vs llama.cpp's defaults "
        "(flash attention on, what llama.cpp's auto picks on a CPU), on a fixed text."
    )
    blocks = [head]
    for r in entries:
        run = r.get("run", {})
        blocks.append(
            f"### {r['name']}: {Path(r['path']).name}\n\n"
            f"`{run.get('command', '?')}`, {run.get('date', '?')}. Machine: "
            f"{run.get('machine', '?')}. OpenMP waits: "
            + (
                "OMP_WAIT_POLICY=PASSIVE in every child (both sides)"
                if run.get("passive")
                else "the default (spinning), as users and llama-bench run"
            )
            + f". Raw runs: ~/.cache/ondevice-bench/tune-results/{run.get('raw', '?')}.\n\n"
            + table(r)
            + "\n\n"
            + probe_table(r)
            + (f"\n\n{run['note']}" if run.get("note") else "")
        )
    return "\n\n".join(blocks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="demo", help="comma-separated: demo, q4km, q8 or paths")
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=2, help="llama-bench -r inside each round")
    ap.add_argument("--time-budget", type=float, default=600, help="seconds for each tune")
    ap.add_argument("--reuse", action="store_true", help="reuse a saved tuning result")
    ap.add_argument("--passive", action="store_true", help="OMP_WAIT_POLICY=PASSIVE in every child")
    ap.add_argument(
        "--add-raw", help="add an earlier run's raw JSON file to the results, measure nothing"
    )
    ap.add_argument("--knobs", default="", help="the tuner's --knobs (default: all)")
    ap.add_argument("--note", default="", help="a sentence on the results, kept with them")
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args()
    global PASSIVE, KNOBS
    PASSIVE, KNOBS = args.passive, args.knobs
    if args.add_raw:
        results = json.loads(Path(args.add_raw).read_text())
        for r in results:
            r.setdefault("run", {})["note"] = args.note or r.get("run", {}).get("note", "")
    else:
        results = [
            measure(n.strip(), args.ctx, args.rounds, args.reps, args.time_budget, args.reuse)
            for n in args.models.split(",")
            if n.strip()
        ]
        out = CACHE / "tune-results" / f"vs-defaults-{time.strftime('%Y%m%dT%H%M%S')}.json"
        command = "python benchmarks/tune_vs_defaults.py " + " ".join(sys.argv[1:])
        for r in results:
            r["run"] = {
                "command": command,
                "date": time.strftime("%Y-%m-%d"),
                "machine": machine_line(),
                "passive": args.passive,
                "raw": out.name,
                "note": args.note,
            }
        out.write_text(json.dumps(results, indent=1))
    index = json.loads(INDEX.read_text()) if INDEX.is_file() else {}
    for r in results:
        index[r["name"]] = r
    INDEX.write_text(json.dumps(index, indent=1))
    print("\n\n".join(table(r) + "\n\n" + probe_table(r) for r in results))
    if args.write_results:
        order = ["demo", "q4km", "q8"]
        entries = sorted(index.values(), key=lambda r: (order + [r["name"]]).index(r["name"]))
        write_results(render(entries), SECTION)


if __name__ == "__main__":
    main()
