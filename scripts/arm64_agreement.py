"""Same answers on x86 and aarch64: the x86 reference, the comparison, and the agreement table.

    python scripts/arm64_agreement.py reference --models DIR --out x86-reference.npz   (on x86)
    python scripts/arm64_agreement.py table agreement-dotprod.json agreement-i8mm.json

`reference` makes the models once (the demo's Q4_1, and Q4_0 / Q8_0 quantized from its F16
dequantization with ondevice.quantize; the same files then run on both architectures, so the
comparison is of the engines, not of two quantizer runs) and measures on this machine, on the
spot: every position's next-token logits for a fixed prompt, a greedy continuation, and the
yardstick, i.e. how far two correct x86 CPU kernels (flash attention off vs on) are apart.
tests/test_arm64.py (run by scripts/arm64-check.sh under qemu) measures the same on aarch64 with
`measure()`, judges it with `compare()` and writes one JSON row per quant type for `table`.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np

PROMPT = (
    "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy "
    "is Rome. Water boils at one hundred degrees Celsius at sea level, and"
)
N_CTX = 256
N_GREEDY = 16
THREADS = 2
QUANTS = ("Q4_1", "Q4_0", "Q8_0")
# aarch64 vs x86 may differ by at most this multiple of the two x86 kernels' mean KL (the
# tolerance tests/test_vulkan.py uses for CPU vs Vulkan).
KL_FACTOR = 3.0


def model_path(quant: str, models_dir: Path) -> Path:
    """The file for a quant type: the demo itself for Q4_1, else its requantization."""
    from ondevice.locate import demo_model_path

    if quant == "Q4_1":
        return demo_model_path()
    return models_dir / f"demo-{quant.lower()}.gguf"


def make_models(models_dir: Path) -> dict[str, Path]:
    """Q4_0 and Q8_0 of the demo model, from its F16 dequantization (made once, kept)."""
    from ondevice.quantize import dequantize_to_f16, quantize

    from ondevice.locate import demo_model_path

    models_dir.mkdir(parents=True, exist_ok=True)
    f16 = models_dir / "demo-f16.gguf"
    if not f16.is_file():
        dequantize_to_f16(demo_model_path(), f16)
    out = {}
    for quant in QUANTS:
        path = model_path(quant, models_dir)
        if not path.is_file():
            quantize(f16, path, quant)
        out[quant] = path
    return out


def cpu_repack_bytes(load_log: list[str]) -> int:
    """Bytes llama.cpp put in repacked (CPU_REPACK) weight buffers, from its load log."""
    import re

    total = 0.0
    for line in load_log:
        m = re.search(r"CPU_REPACK model buffer size\s*=\s*([\d.]+) MiB", line)
        if m:
            total += float(m.group(1))
    return int(round(total * 2**20))


class _LogLines(logging.Handler):
    """Keeps every line of llama.cpp's log (ondevice routes it to the `ondevice.llama_cpp`
    logger; the engine's own load_log keeps only the last 40, and a repacked model's
    per-tensor lines push the buffer sizes out of those)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def measure(
    path: Path, *, greedy: bool = True, along: bool = False, **load_kw: Any
) -> dict[str, Any]:
    """Load `path` on the CPU and measure: the prompt's logits at every position, what the
    load did (repacking, repacked bytes), with `greedy` a greedy continuation (the engine's
    own sampler), and with `along` the logits along it (the x86 side needs those, to tell a
    near-tie where the two continuations part; under qemu every evaluation is costly)."""
    import ondevice

    kw = {"backend": "cpu", "n_ctx": N_CTX, "threads": THREADS, **load_kw}
    native = logging.getLogger("ondevice.llama_cpp")
    lines = _LogLines()
    old_level = native.level
    native.addHandler(lines)
    native.setLevel(logging.DEBUG)
    try:
        m = ondevice.load(path, **kw)
    finally:
        native.removeHandler(lines)
        native.setLevel(old_level)
    with m:
        tokens = m.tokenize(PROMPT)
        out: dict[str, Any] = {
            "tokens": np.array(tokens, dtype=np.int64),
            "logits": _all_logits(m, tokens),
            "repack": bool(m.config.use_extra_bufts),
            "repack_bytes": cpu_repack_bytes(lines.lines),
        }
        if greedy:
            result = m.generate(PROMPT, max_tokens=N_GREEDY, temperature=0)
            out.update(greedy=np.array(result.tokens, dtype=np.int64), greedy_text=result.text)
            if along:
                seq = _all_logits(m, tokens + list(result.tokens))
                out["greedy_logits"] = seq[len(tokens) - 1 : -1]
        return out


def _all_logits(model: Any, tokens: list[int]) -> np.ndarray:
    return model.score(tokens)


def compare(ref: dict[str, Any], other: dict[str, Any], floor: dict[str, float]) -> dict[str, Any]:
    """Judge `other` against the x86 `ref`: KL of the next-token distributions within
    KL_FACTOR of the floor (two correct x86 kernels apart), every top-1 disagreement a near-tie
    (x86's log-probability margin between the two tokens below the largest logit difference the
    floor shows), and the greedy text equal or diverging only at such a near-tie. Returns the
    figures and `problems` (empty when it agrees)."""
    from ondevice.logits import agreement, log_softmax

    problems: list[str] = []
    if not np.array_equal(ref["tokens"], other["tokens"]):
        return {"problems": ["the prompt tokenizes differently"]}
    stats = agreement(ref["logits"], other["logits"])
    if not np.isfinite(other["logits"]).all():
        problems.append("non-finite logits")
    if stats["mean_kl"] > KL_FACTOR * floor["mean_kl"]:
        problems.append(
            f"mean KL {stats['mean_kl']:.3g} > {KL_FACTOR} x floor {floor['mean_kl']:.3g}"
        )
    lp = log_softmax(ref["logits"])
    worst_tie = 0.0
    for pos in np.nonzero(ref["logits"].argmax(-1) != other["logits"].argmax(-1))[0]:
        margin = float(
            lp[pos, ref["logits"][pos].argmax()] - lp[pos, other["logits"][pos].argmax()]
        )
        worst_tie = max(worst_tie, margin)
        if margin >= floor["max_abs_diff"]:
            problems.append(f"top-1 differs at position {pos} with margin {margin:.3g}")
    if "greedy" not in other or "greedy" not in ref:  # logits only
        return {**stats, "floor_mean_kl": floor["mean_kl"], "problems": problems}
    a, b = list(ref["greedy"]), list(other["greedy"])
    diverge = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
    if diverge is None and len(a) != len(b):
        diverge = min(len(a), len(b))
    greedy_margin = None
    if diverge is not None and diverge < min(len(a), len(b)):
        glp = log_softmax(ref["greedy_logits"][diverge : diverge + 1])[0]
        greedy_margin = float(glp[a[diverge]] - glp[b[diverge]])
        if greedy_margin >= floor["max_abs_diff"]:
            problems.append(f"greedy text diverges at token {diverge}, margin {greedy_margin:.3g}")
    elif diverge is not None:
        problems.append(f"greedy output lengths differ ({len(a)} vs {len(b)})")
    return {
        **stats,
        "floor_mean_kl": floor["mean_kl"],
        "floor_max_abs_diff": floor["max_abs_diff"],
        "kl_ratio": stats["mean_kl"] / floor["mean_kl"] if floor["mean_kl"] else float("inf"),
        "worst_top1_tie_margin": worst_tie,
        "greedy_equal": diverge is None,
        "greedy_diverges_at": diverge,
        "greedy_margin": greedy_margin,
        "problems": problems,
    }


# --- the x86 side -------------------------------------------------------------------------------
def reference(models_dir: Path, out: Path) -> None:
    """Measure every quant type on this (x86) machine, with the floor, into one .npz."""
    from ondevice.logits import agreement
    from ondevice.system import cpu_model

    files = make_models(models_dir)
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {"cpu": cpu_model(), "machine": platform.machine(), "quants": {}}
    for quant, path in files.items():
        ref = measure(path, along=True)  # flash attention auto = off on the CPU
        fa_on = measure(path, greedy=False, flash_attn="on")
        floor = agreement(ref["logits"], fa_on["logits"])
        for name in ("tokens", "logits", "greedy", "greedy_logits"):
            arrays[f"{quant}/{name}"] = ref[name]
        meta["quants"][quant] = {
            "file": str(path),
            "floor": floor,
            "greedy_text": ref["greedy_text"],
            "repack": ref["repack"],
            "repack_bytes": ref["repack_bytes"],
        }
        print(
            f"[arm64-check] x86 {quant}: greedy {ref['greedy_text']!r}; floor (flash attn off vs "
            f"on) mean KL {floor['mean_kl']:.3g}, max |dlogit| {floor['max_abs_diff']:.3g}",
            file=sys.stderr,
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.npz")
    np.savez(tmp, meta=np.array(json.dumps(meta)), **arrays)
    tmp.replace(out)


def load_reference(path: Path, quant: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(arrays like measure() returns, that quant's metadata) from a reference .npz."""
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        ref = {k: z[f"{quant}/{k}"] for k in ("tokens", "logits", "greedy", "greedy_logits")}
    return ref, {**meta["quants"][quant], "cpu": meta["cpu"]}


# --- the table ----------------------------------------------------------------------------------
def table(reports: list[Path]) -> str:
    """Markdown: one row per (CPU level, quant type) from the tests' JSON reports."""
    lines = [
        "| aarch64 level (qemu -cpu) | type | repacked on ARM | mean KL x86 vs ARM | floor (x86 "
        "FA off vs on) | ratio | ARM repack on vs off, mean KL | top-1 | top-5 | greedy |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    notes = []
    for path in reports:
        data = json.loads(path.read_text())
        q = data.get("quants", {}).get("quantizer")
        if q is not None:
            same = q["q4_0_byte_identical_to_x86"]
            notes.append(
                f"Q4_0 quantized on aarch64 ({data['level']}) from the same F16 file: "
                + ("byte-identical to x86's" if same else "differs from x86's bytes")
            )
        for quant in QUANTS:
            r = data.get("quants", {}).get(quant)
            if r is None:
                continue
            greedy = (
                f"equal ({N_GREEDY} tokens)"
                if r["greedy_equal"]
                else f"diverges at {r['greedy_diverges_at']} (margin {r['greedy_margin']:.3g})"
            )
            repack_kl = r.get("arm_repack_on_vs_off_kl")
            lines.append(
                f"| {data['level']} ({data['qemu_cpu']}) | {quant} | "
                f"{'yes, ' + format(r['repack_bytes'] / 2**20, '.1f') + ' MiB' if r['repack_bytes'] else 'no'} | "
                f"{r['mean_kl']:.2e} | {r['floor_mean_kl']:.2e} | {r['kl_ratio']:.2f} | "
                f"{'—' if repack_kl is None else format(repack_kl, '.2e')} | {r['top1']:.3f} | "
                f"{r['top5_overlap']:.3f} | {greedy} |"
            )
    return "\n".join(lines + [""] + notes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("reference", help="measure the x86 reference")
    r.add_argument("--models", type=Path, required=True, help="where the quantized files live")
    r.add_argument("--out", type=Path, required=True)
    t = sub.add_parser("table", help="print the agreement table from the tests' reports")
    t.add_argument("reports", type=Path, nargs="+")
    args = ap.parse_args(argv)
    if args.cmd == "reference":
        reference(args.models, args.out)
        return 0
    present = [p for p in args.reports if p.is_file()]
    print(table(present))
    return 0 if present else 1


if __name__ == "__main__":
    sys.exit(main())
