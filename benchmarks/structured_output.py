"""Issue 15's benchmark: what constrained generation costs, against unconstrained generation of
the same length, interleaved on one loaded model.

For each constraint (a 6-field extraction schema, and a free-form JSON object) and each round:
a constrained reply (temperature 0.8, a seed per round), then an unconstrained reply of the same
number of tokens on a prompt the model keeps continuing; both rated as Stats.generation_tps
(tokens after the first / time from the first token to the last: sampling, the grammar, the
detokenizer and decode all inside). Also reported: the time to compile each grammar (schema ->
GBNF, measured cold) and how many of the chain's choices the grammar refused.

    python benchmarks/structured_output.py --rounds 7 [--write-results]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from stream_vs_llama_bench import PROMPTS, machine_line, median, write_results  # noqa: E402

SECTION = "## Structured output: constrained vs unconstrained generation (issue 15)"

EXTRACTION = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "email": {"type": "string", "maxLength": 60},
        "company": {"type": "string", "maxLength": 40},
        "role": {"enum": ["engineer", "manager", "sales", "support", "other"]},
        "years": {"type": "integer", "minimum": 0, "maximum": 60},
        "remote": {"type": "boolean"},
    },
    "required": ["name", "email", "company", "role", "years", "remote"],
    "additionalProperties": False,
}
EXTRACTION_PROMPT = (
    "Extract the contact as JSON.\n"
    "Text: Hi, I'm Dana Whitfield, a senior engineer at Northwind Labs for 12 years now, "
    "working from home. Reach me at dana.whitfield@northwind.example.\nJSON: "
)
OBJECT_PROMPT = "A JSON object describing a city, with several fields:\n"


def constrained_run(m, kind: str, seed: int) -> tuple[float, int, int]:
    if kind == "extraction":
        r = m.generate(
            EXTRACTION_PROMPT, json_schema=EXTRACTION, max_tokens=200, temperature=0.8, seed=seed
        )
    else:
        r = m.generate(
            OBJECT_PROMPT,
            response_format={"type": "json_object"},
            max_tokens=96,
            temperature=0.8,
            seed=seed,
        )
    return r.stats.generation_tps, r.stats.completion_tokens, r.stats.grammar_resamples


def free_run(m, n: int, seed: int) -> float:
    for prompt in PROMPTS:
        m.reset()
        r = m.generate(prompt, max_tokens=n, temperature=0.8, seed=seed)
        if r.stats.completion_tokens >= n:
            return r.stats.generation_tps
    raise RuntimeError(f"no prompt continued for {n} tokens")


def compile_times() -> dict[str, float]:
    from ondevice import constrain

    constrain._compiled.cache_clear()
    out = {}
    t0 = time.perf_counter()
    constrain.from_request(json_schema=EXTRACTION)
    out["extraction"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    constrain.from_request(response_format={"type": "json_object"})
    out["object"] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args()

    import ondevice
    from ondevice.locate import demo_model_path

    compiled = compile_times()
    m = ondevice.load(demo_model_path(), n_ctx=1024, threads=args.threads)
    m.generate(PROMPTS[0], max_tokens=8)  # warm-up
    rows = {}
    for kind in ("extraction", "object"):
        ours, theirs, counts, refused = [], [], [], []
        for r in range(args.rounds):
            m.reset()
            tps, n, resampled = constrained_run(m, kind, seed=r)
            ours.append(tps)
            counts.append(n)
            refused.append(resampled / max(n, 1))
            theirs.append(free_run(m, n, seed=r))
            print(
                f"{kind} round {r + 1}: constrained {tps:.1f} tok/s ({n} tokens, {resampled} "
                f"resampled), unconstrained {theirs[-1]:.1f} tok/s",
                file=sys.stderr,
            )
        rows[kind] = (ours, theirs, counts, refused)
    m.close()
    lines = [
        "| constraint | compile (cold) | tokens/reply (median) | refused by the grammar | "
        "constrained tok/s (median; rounds) | unconstrained tok/s (median; rounds) | ratio |",
        "|---|---:|---:|---:|---|---|---:|",
    ]
    for kind, (ours, theirs, counts, refused) in rows.items():
        lines.append(
            f"| {'6-field extraction schema' if kind == 'extraction' else 'any JSON object'} | "
            f"{compiled[kind] * 1000:.1f} ms | {statistics.median(counts):.0f} | "
            f"{statistics.mean(refused):.0%} | {median(ours):.1f}; "
            f"{', '.join(f'{x:.1f}' for x in ours)} | {median(theirs):.1f}; "
            f"{', '.join(f'{x:.1f}' for x in theirs)} | **{median(ours) / median(theirs):.2f}x** |"
        )
    table = "\n".join(lines)
    print(table)
    if args.write_results:
        write_results(
            "\n".join(
                [
                    SECTION,
                    "",
                    f"`python benchmarks/structured_output.py --rounds {args.rounds} --threads "
                    f"{args.threads}`, {time.strftime('%Y-%m-%d')}: demo model, interleaved "
                    "(constrained reply, then an unconstrained one of the same length), "
                    "temperature 0.8, a seed per round; tok/s is Stats.generation_tps. The "
                    "grammar is consulted only for the chain's choice; when it refuses, it is "
                    "applied to the whole vocabulary and the chain samples again ('refused'). "
                    f"Machine: {machine_line()}.",
                    "",
                    table,
                ]
            ),
            SECTION,
        )


if __name__ == "__main__":
    main()
