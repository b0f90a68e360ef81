"""Issue 17's benchmark: speculative decoding by prompt lookup, task by task, against plain
decoding and against llama.cpp's own `llama-lookup` on the same prompts and settings; and, on the
Phi-2-shaped Q4_K_M (random weights: nothing to accept), the cost side that bounds the speed-up.

Tasks (demo model, its chat template, temperature 0, 256 new tokens): a code edit (rename a
variable in a 60-line function and return it whole), a summary quoting key sentences of a ~1000
token passage, three questions answered from a document, a JSON object rewritten in another key
order, and an open-ended story. Rounds interleave off / auto / lookup / llama-lookup; tok/s is
Stats.generation_tps for ondevice and llama-lookup's own "speed" line (its decode loop).

    python benchmarks/speculative.py --rounds 3 [--write-results]
    python benchmarks/speculative.py --cost-only            # the Phi-2-shaped decode costs
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from stream_vs_llama_bench import machine_line, median, write_results  # noqa: E402

SECTION = "## Speculative decoding by prompt lookup (issue 17)"
N_GEN = 256

FUNCTION = """def summarize(orders, customers, cutoff):
    x = 0
    totals = {}
    late = []
    for order in orders:
        if order["date"] < cutoff:
            continue
        customer = customers.get(order["customer_id"])
        if customer is None:
            late.append(order["id"])
            continue
        amount = order["quantity"] * order["unit_price"]
        if order.get("discount"):
            amount = amount * (1 - order["discount"])
        x = x + amount
        region = customer["region"]
        if region not in totals:
            totals[region] = {"orders": 0, "amount": 0.0, "customers": set()}
        totals[region]["orders"] += 1
        totals[region]["amount"] += amount
        totals[region]["customers"].add(customer["id"])
    report = []
    for region, data in sorted(totals.items()):
        share = data["amount"] / x if x else 0.0
        report.append(
            {
                "region": region,
                "orders": data["orders"],
                "amount": round(data["amount"], 2),
                "customers": len(data["customers"]),
                "share": round(share, 4),
            }
        )
    if late:
        print("orders without a customer:", len(late))
    average = x / len(orders) if orders else 0.0
    print("total", round(x, 2), "average", round(average, 2))
    biggest = max(report, key=lambda r: r["amount"]) if report else None
    if biggest is not None:
        print("biggest region", biggest["region"])
    return {
        "total": round(x, 2),
        "average": round(average, 2),
        "regions": report,
        "missing": late,
    }
"""

RECORD = {
    "id": 48213, "name": "Harbor View Apartments", "city": "Portland", "state": "OR",
    "zip": "97209", "units": 124, "floors": 9, "built": 2014, "parking": True,
    "pets": "cats and small dogs", "manager": "Elena Ruiz", "phone": "503-555-0187",
    "email": "office@harborview.example", "rent_min": 1450, "rent_max": 3200,
    "amenities": ["gym", "roof deck", "bike storage", "laundry"], "rating": 4.3,
    "reviews": 212, "vacancy": 0.04, "website": "https://harborview.example",
}  # fmt: skip


def passage(tokens_wanted: int = 1000) -> str:
    text = (ROOT / "tests" / "data" / "alice-ch1.txt").read_text(encoding="utf-8")
    words = text.split()
    return " ".join(words[: int(tokens_wanted * 0.75)])


def tasks() -> dict[str, str]:
    doc = passage(700)
    return {
        "code edit": "Rename the variable `x` to `count` in this function and return the whole "
        "function, nothing else.\n\n" + FUNCTION,
        "summary": "Summarise this passage in a few sentences, quoting its key sentences "
        "word for word.\n\n" + passage(1000),
        "document QA": "Answer three questions from this document, quoting it.\n\n"
        + doc
        + "\n\n1. What was Alice doing at the start?\n2. What did the rabbit take out of its "
        "waistcoat-pocket?\n3. What was written on the jar?",
        "JSON rewrite": "Rewrite this JSON object with its keys in alphabetical order. Output "
        "only the JSON.\n\n" + json.dumps(RECORD, indent=2),
        "story": "Write a long story about a lighthouse keeper who finds a map.",
    }


def run_ondevice(m, text: str, mode: str) -> dict:
    m.reset()
    out = m.chat([{"role": "user", "content": text}], max_tokens=N_GEN, temperature=0,
                 speculative=mode)  # fmt: skip
    parts, tokens, final = [], [], None
    for chunk in out:
        parts.append(chunk.text)
        tokens.extend(chunk.tokens)
        final = chunk.stats or final
    if final.finish_reason == "stop":
        tokens.append(-1)  # the end of the reply, as a token: where it ends can differ too
    return {
        "tokens": tokens,
        "tps": final.generation_tps,
        "ttft": final.ttft_s,
        "n": final.completion_tokens,
        "drafted": final.drafted_tokens,
        "accepted": final.accepted_tokens,
        "text": "".join(parts),
    }


_SPEED = re.compile(
    r"decoded\s+(\d+)\s+tokens in\s+([0-9.]+)\s+s(?:econds)?,\s+speed:\s+([0-9.]+)\s+t/s"
)
_ACCEPT = re.compile(r"n_accept\s*=\s*(\d+)")
_DRAFTED = re.compile(r"n_drafted\s*=\s*(\d+)")


def draft_max_flag(binary: Path) -> str:
    """llama.cpp renamed --draft-max to --spec-draft-n-max; ask the binary which it takes."""
    got = subprocess.run([str(binary), "--help"], capture_output=True, text=True)
    helptext = got.stdout + got.stderr
    return "--spec-draft-n-max" if "--spec-draft-n-max" in helptext else "--draft-max"


def run_llama_lookup(binary: Path, model: Path, prompt_text: str, threads: int, repack: bool):
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as fh:
        fh.write(prompt_text)
        path = fh.name
    try:
        cmd = [
            str(binary), "-m", str(model), "-f", path, "-n", str(N_GEN), "-t", str(threads),
            "--temp", "0", "-c", "4096", "-fa", "off", draft_max_flag(binary), "16",
        ]  # fmt: skip
        if not repack:
            cmd.append("--no-repack")
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    finally:
        os.unlink(path)
    log = out.stdout + out.stderr
    speed = _SPEED.search(log)
    if out.returncode != 0 or speed is None:
        raise RuntimeError(f"llama-lookup failed ({out.returncode}): {log[-1500:]}")
    drafted = _DRAFTED.search(log)
    accepted = _ACCEPT.search(log)
    return {
        "tps": float(speed.group(3)),
        "n": int(speed.group(1)),
        "drafted": int(drafted.group(1)) if drafted else 0,
        "accepted": int(accepted.group(1)) if accepted else 0,
    }


def llama_lookup_bin() -> Path:
    env = dict(os.environ, LLAMA_TOOLS="llama-lookup", PYTHON=sys.executable)
    out = subprocess.run(
        ["bash", str(HERE / "build_llama_tools.sh")], capture_output=True, text=True, env=env,
        check=True,
    )  # fmt: skip
    return Path(out.stdout.strip().splitlines()[-1]) / "llama-lookup"


def tasks_table(args) -> tuple[str, list[dict]]:
    import ondevice
    from ondevice.locate import demo_model_path

    model = demo_model_path()
    binary = llama_lookup_bin()
    from ondevice import chat_formats

    m = ondevice.load(model, n_ctx=4096, threads=args.threads)
    fmt = chat_formats.for_model(m)
    rows = []
    for name, text in tasks().items():
        rendered = fmt.render([{"role": "user", "content": text}])
        got: dict[str, list[dict]] = {"off": [], "auto": [], "lookup": [], "llama-lookup": []}
        for r in range(args.rounds):
            for mode in ("off", "auto", "lookup"):
                got[mode].append(run_ondevice(m, text, mode))
            got["llama-lookup"].append(
                run_llama_lookup(
                    binary, model, rendered, args.threads, m.settings["repack"]
                )  # fmt: skip
            )
            print(f"{name} round {r + 1}: " + ", ".join(
                f"{k} {v[-1]['tps']:.1f}" for k, v in got.items()), file=sys.stderr)  # fmt: skip
        rows.append({"task": name, "prompt": m.tokenize(rendered, add_special=False), **got})
    div = divergences(m, rows)
    m.close()
    return _format_tasks(rows) + "\n\n" + div, rows


def divergences(m, rows: list[dict]) -> str:
    """Where a speculative run's greedy text first differs from plain decoding's, and how
    near a tie plain decoding's choice was there: its top two logits, recomputed the way the
    plain run computed them (the prompt in one decode, then token by token), and how far the
    same position's logits move when the last 4 tokens are evaluated as one verify batch."""
    import numpy as np

    from ondevice._native.engine import Batch

    lines = ["| task | mode | round | first differing token | plain chose (p) | speculative "
             "chose (p) | top-2 gap (logits) | plain vs batched logits, max abs diff |",
             "|---|---|---:|---:|---|---|---:|---:|"]  # fmt: skip
    runs = same = 0
    for row in rows:
        off = row["off"][0]["tokens"]
        for mode in ("auto", "lookup"):
            for r, run in enumerate(row[mode]):
                runs += 1
                sp = run["tokens"]
                i = next((j for j, (a, b) in enumerate(zip(off, sp, strict=False)) if a != b), None)
                if i is None and len(off) == len(sp):
                    same += 1
                    continue
                i = min(len(off), len(sp)) if i is None else i
                m.reset()
                with m.raw() as eng:
                    eng.decode(row["prompt"])
                    for t in off[:i]:
                        eng.decode_one(t)
                    plain = eng.logits_last().copy()
                    eng.kv_keep(len(row["prompt"]) + i - 4)
                    batch = Batch(4)
                    for j, t in enumerate(off[i - 4 : i]):
                        batch.add(t, len(row["prompt"]) + i - 4 + j, 0, True)
                    eng.decode_batch(batch)
                    batched = eng.logits_at(3).copy()
                    batch.free()
                    eng.kv_clear()
                    top = [int(t) for t in np.argsort(plain)[::-1][:8]]
                    end = next((t for t in top if eng.is_eog(t)), None)
                probs = np.exp(plain - plain.max())
                probs /= probs.sum()

                def name(seq: list[int], probs: np.ndarray = probs, end=end, i=i) -> str:
                    t = seq[i] if i < len(seq) else -1
                    if t < 0:  # the reply ended here
                        return "(end)" + (f" ({probs[end]:.3f})" if end is not None else "")
                    return f"{m.detokenize([t])!r} ({probs[t]:.3f})"

                lines.append(
                    f"| {row['task']} | {mode} | {r + 1} | {i} of {len(off)} | {name(off)} | "
                    f"{name(sp)} | {plain[top[0]] - plain[top[1]]:.3f} | "
                    f"{np.abs(plain - batched).max():.3f} |"
                )
    head = (
        f"Greedy text: {same} of {runs} speculative runs equal plain decoding's token "
        "for token. Where one differs, its first differing token:"
    )
    return head + "\n\n" + "\n".join(lines)


def _format_tasks(rows: list[dict]) -> str:
    lines = [
        "| task | tokens | off tok/s | auto tok/s (x off; acceptance) | lookup tok/s (x off; "
        "acceptance) | llama-lookup tok/s (acceptance) | same text as off (auto, lookup) |",
        "|---|---:|---:|---|---|---|---|",
    ]
    for row in rows:
        off = median([x["tps"] for x in row["off"]])

        def cell(key: str, row: dict = row, off: float = off) -> str:
            tps = median([x["tps"] for x in row[key]])
            d = sum(x["drafted"] for x in row[key])
            a = sum(x["accepted"] for x in row[key])
            acc = f"{a / d:.0%}" if d else "no drafts"
            return f"{tps:.1f} ({tps / off:.2f}x; {acc})"

        lk = row["llama-lookup"]
        lk_d, lk_a = sum(x["drafted"] for x in lk), sum(x["accepted"] for x in lk)
        same = [
            all(a["text"] == b["text"] for a, b in zip(row[k], row["off"], strict=True))
            for k in ("auto", "lookup")
        ]
        lines.append(
            f"| {row['task']} | {statistics.median(x['n'] for x in row['off']):.0f} | "
            f"{off:.1f} | {cell('auto')} | {cell('lookup')} | "
            f"{median([x['tps'] for x in lk]):.1f} ({lk_a / lk_d if lk_d else 0:.0%}) | "
            f"{'yes' if same[0] else 'no'}, {'yes' if same[1] else 'no'} |"
        )
    return "\n".join(lines)


def cost_table(threads: int, reps: int = 5) -> str:
    """Seconds of one decode of n tokens at depth 0 and 1500 (Phi-2-shaped Q4_K_M), and the
    speed-up bound they give: (k+1) c(1) / c(k+1) with every draft accepted."""
    import random

    from bench_vs_llama_bench import model_path

    import ondevice
    from ondevice._native.engine import Batch

    path = model_path("q4km")
    m = ondevice.load(path, n_ctx=2048, threads=threads, tune=False)
    rng = random.Random(0)
    out: dict[int, dict[int, float]] = {}
    with m, m.raw() as eng:
        batch = Batch(16)
        for depth in (0, 1500):
            eng.kv_clear()
            if depth:
                eng.decode([rng.randrange(eng.n_vocab) for _ in range(depth)])
            out[depth] = {}
            for n in (1, 2, 4, 8, 16):
                times = []
                for _ in range(reps):
                    batch.clear()
                    for j in range(n):
                        batch.add(rng.randrange(eng.n_vocab), depth + j, 0, True)
                    t0 = time.perf_counter()
                    eng.decode_batch(batch)
                    times.append(time.perf_counter() - t0)
                    eng.kv_keep(depth)
                out[depth][n] = statistics.median(times)
        batch.free()
    lines = [
        "| depth | n=1 | n=2 | n=4 | n=8 | n=16 | bound at full acceptance (k+1)c(1)/c(k+1) |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for depth, c in out.items():
        bound = ", ".join(f"k={n - 1}: {n * c[1] / c[n]:.2f}x" for n in (2, 4, 8, 16))
        lines.append(
            f"| {depth} | "
            + " | ".join(f"{c[n] * 1000:.1f} ms" for n in (1, 2, 4, 8, 16))
            + f" | {bound} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cost-only", action="store_true")
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args()
    parts = [SECTION, ""]
    if not args.cost_only:
        table, _ = tasks_table(args)
        print(table)
        parts += [
            f"`python benchmarks/speculative.py --rounds {args.rounds}`, "
            f"{time.strftime('%Y-%m-%d')}: demo model through its chat template, temperature "
            f"0, {N_GEN} new tokens, {args.threads} threads; rounds interleave off, auto, "
            "lookup and llama-lookup (built from the binding's sdist, `--spec-draft-n-max 16 "
            "-fa off --temp 0`, older builds `--draft-max`; its own speed line). Medians of the "
            "rounds. "
            f"Machine: {machine_line()}.",
            "",
            table,
            "",
        ]
    cost = cost_table(args.threads)
    print(cost)
    parts += [
        "Cost side, Phi-2-shaped Q4_K_M (random weights, so lookups accept nothing): seconds "
        "of one llama_decode of n tokens (median of 5), and the speed-up a real Phi-2 could "
        "at most get if every drafted token were accepted.",
        "",
        cost,
    ]
    if args.write_results:
        write_results("\n".join(parts), SECTION)


if __name__ == "__main__":
    main()
