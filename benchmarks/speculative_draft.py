"""Issue 17's draft-model benchmark: speculative decoding with a draft model, the demo model's Q4_1
drafting for higher-precision copies of itself (F16 and F32, made from it in the cache folder
with ondevice's own dequantizer and llama.cpp's quantizer: no weights in git), on the five
tasks of benchmarks/speculative.py, against plain decoding, prompt lookup (`auto`), and
llama.cpp's own `llama-speculative-simple` (built from the binding's vendored source) on the
same files, prompts and settings.

With no smaller sibling of the demo model here, a quantized copy of the target is the draft:
it agrees with the target nearly always, so what decides the speed is how much cheaper a
draft decode is than a target decode. On this CPU a Q4_1 decode is ~1.2x cheaper than an F16
one (the draft barely pays, and `draft` mode should back off to plain speed) and ~2.8x
cheaper than an F32 one (it should pay).

    python benchmarks/speculative_draft.py --rounds 3 [--write-results]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from speculative import _SPEED, N_GEN, draft_max_flag, run_ondevice, tasks  # noqa: E402
from stream_vs_llama_bench import machine_line, median, write_results  # noqa: E402

SECTION = "## Speculative decoding with a draft model (issue 17)"
CACHE = Path(os.environ.get("ONDEVICE_BENCH_CACHE", Path.home() / ".cache" / "ondevice-bench"))
_ACCEPT = re.compile(r"n_accept\s*=\s*(\d+)")
_DRAFTED = re.compile(r"n_drafted\s*=\s*(\d+)")


def targets() -> dict[str, Path]:
    """The demo model's F16 and F32 copies, made once in the cache folder."""
    from ondevice.quantize import dequantize_to_f16

    from ondevice.locate import demo_model_path
    from quantize.quantize import quantize

    f16, f32 = CACHE / "demo-f16.gguf", CACHE / "demo-f32.gguf"
    if not f16.exists():
        dequantize_to_f16(demo_model_path(), f16)
    if not f32.exists():
        quantize(f16, f32, "F32", threads=2)
    return {"F16": f16, "F32": f32}


def spec_simple_bin() -> Path:
    env = dict(os.environ, LLAMA_TOOLS="llama-speculative-simple", PYTHON=sys.executable)
    out = subprocess.run(
        ["bash", str(HERE / "build_llama_tools.sh")], capture_output=True, text=True, env=env,
        check=True,
    )  # fmt: skip
    return Path(out.stdout.strip().splitlines()[-1]) / "llama-speculative-simple"


def run_spec_simple(binary: Path, target: Path, draft: Path, prompt: str, args, repack: bool):
    """llama-speculative-simple with the same threads, context and attention settings; the
    draft length as ondevice's longest (16), its other settings its defaults."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as fh:
        fh.write(prompt)
        path = fh.name
    try:
        cmd = [
            str(binary), "-m", str(target), "-md", str(draft), "-f", path, "-n", str(N_GEN),
            "-t", str(args.threads), "-td", str(args.threads), "--temp", "0", "-c", "4096",
            "-fa", "off", draft_max_flag(binary), str(args.spec_n_max),
        ]  # fmt: skip
        if not repack:
            cmd.append("--no-repack")
        if "--spec-type" in _help(binary):  # newer builds draft only when told to
            cmd += ["--spec-type", "draft-simple"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    finally:
        os.unlink(path)
    log = out.stdout + out.stderr
    speed = _SPEED.search(log)
    if out.returncode != 0 or speed is None:
        raise RuntimeError(f"llama-speculative-simple failed ({out.returncode}): {log[-1500:]}")
    drafted, accepted = _DRAFTED.search(log), _ACCEPT.search(log)
    return {
        "tps": float(speed.group(3)),
        "n": int(speed.group(1)),
        "drafted": int(drafted.group(1)) if drafted else 0,
        "accepted": int(accepted.group(1)) if accepted else 0,
    }


def _help(binary: Path) -> str:
    got = subprocess.run([str(binary), "--help"], capture_output=True, text=True)
    return got.stdout + got.stderr


MODES = ("off", "draft", "auto")  # plain, the draft model, prompt lookup


def table_for(name: str, target: Path, args, binary: Path) -> tuple[list[str], dict]:
    import ondevice
    from ondevice import chat_formats, stats
    from ondevice.locate import demo_model_path

    draft = demo_model_path()
    t0 = time.perf_counter()
    m = ondevice.load(target, n_ctx=4096, threads=args.threads, speculative=draft)
    load_s = time.perf_counter() - t0
    facts = {"load_s": load_s, "draft_load": m.draft.load_s}
    fmt = chat_formats.for_model(m)
    lines = []
    for task, text in tasks().items():
        rendered = fmt.render([{"role": "user", "content": text}])
        got: dict[str, list[dict]] = {k: [] for k in (*MODES, "llama")}
        for r in range(args.rounds):
            for mode in MODES:
                got[mode].append(run_ondevice(m, text, mode))
            got["llama"].append(
                run_spec_simple(binary, target, draft, rendered, args, m.settings["repack"])
            )
            print(f"{name} {task} round {r + 1}: " + ", ".join(
                f"{k} {v[-1]['tps']:.1f}" for k, v in got.items()), file=sys.stderr)  # fmt: skip
        lines.append(_row(name, task, got))
    facts["peak_rss"] = stats.peak_rss_bytes()
    m.close()
    return lines, facts


def _row(name: str, task: str, got: dict[str, list[dict]]) -> str:
    off = median([x["tps"] for x in got["off"]])

    def cell(key: str) -> str:
        tps = median([x["tps"] for x in got[key]])
        d = sum(x["drafted"] for x in got[key])
        a = sum(x["accepted"] for x in got[key])
        acc = f"{a / d:.0%} of {d / len(got[key]):.0f}" if d else "no drafts"
        return f"{tps:.1f} ({tps / off:.2f}x; {acc})"

    paired = statistics.median(
        d["tps"] / o["tps"] for d, o in zip(got["draft"], got["off"], strict=True)
    )
    same = all(a["text"] == b["text"] for a, b in zip(got["draft"], got["off"], strict=True))
    ttft = "/".join(f"{median([x['ttft'] for x in got[k]]) * 1000:.0f}" for k in ("off", "draft"))
    return (
        f"| {name} | {task} | {off:.1f} | {cell('draft')} | {paired:.2f}x | {cell('auto')} | "
        f"{cell('llama')} | {'yes' if same else 'no'} | {ttft} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--spec-n-max", type=int, default=16, help="llama-speculative-simple's")
    ap.add_argument("--targets", default="F16,F32")
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args()
    paths = targets()
    binary = spec_simple_bin()
    header = [
        "| target | task | off tok/s | draft tok/s (x off; acceptance of drafted per run) | "
        "draft / off, paired median | auto (prompt lookup) | llama-speculative-simple "
        "(x off; acceptance) | draft's text = off's | TTFT ms, off/draft |",
        "|---|---|---:|---|---:|---|---|---|---:|",
    ]
    rows, notes = [], []
    for name in args.targets.split(","):
        lines, facts = table_for(name, paths[name], args, binary)
        rows += lines
        notes.append(
            f"{name}: load with the draft {facts['load_s']:.2f} s (the draft's own "
            f"{facts['draft_load']:.2f} s, vocabulary check included); peak RSS of the "
            f"benchmark process {facts['peak_rss'] / 2**20:.0f} MiB"
        )
    table = "\n".join(header + rows)
    print(table)
    print("\n".join(notes))
    if args.write_results:
        text = [
            SECTION,
            "",
            f"`python benchmarks/speculative_draft.py --rounds {args.rounds}`, "
            f"{time.strftime('%Y-%m-%d')}: the demo model's Q4_1 drafting for its F16 and F32 "
            f"copies, chat template, temperature 0, {N_GEN} new tokens, {args.threads} threads "
            "(the draft too). Rounds interleave off, draft, auto and llama-speculative-simple "
            f"(built from the binding's sdist, `-md DRAFT -td {args.threads} "
            f"--spec-draft-n-max {args.spec_n_max} --spec-type draft-simple -fa off --temp 0`, its own speed line). "
            f"Medians of the rounds; tok/s is Stats.generation_tps (first token to last), TTFT "
            "includes evaluating the prompt in the draft model too. "
            f"Machine: {machine_line()}.",
            "",
            table,
            "",
            *[f"- {n}" for n in notes],
        ]
        write_results("\n".join(text), SECTION)


if __name__ == "__main__":
    main()
