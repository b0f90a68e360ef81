"""`ondevice bench` against llama-bench: pp and tg on the same file and threads, interleaved.

Goal: ondevice's pp512 and tg128 within 2% of llama-bench's (≥ 0.98x) for the demo model and for
full-size Phi-2-shaped Q4_K_M and Q8_0 files. Both sides use the same llama.cpp source (llama-bench
is built from the installed binding's sdist), and the same settings: threads, n_batch 2048 /
n_ubatch 512, flash attention as ondevice runs it (auto; off for Phi-2 on the CPU, where ondevice
turns it off because the fused kernel accumulates in f16), f16 KV, mmap, repacking off
(`--repack 0`; ondevice turns it off on this AMX machine), one warm-up, n_ctx = p + n per test.
Each round runs llama-bench, then `ondevice bench` (a fresh process each, like llama-bench), and
the medians over rounds are compared, because the machine is shared and noisy.

The Phi-2-shaped files: another engineer's converter benchmark writes
~/.cache/ondevice-bench/phi2-shaped-f16.gguf; if it is not there, `phi2_shaped_f16()` writes a
Phi-2-shaped GGUF with random weights (speed does not depend on the values) with gguf-py's
writer: phi2 architecture metadata, 2560 hidden, 32 layers, 32 heads, FFN 10240, and a byte-level
BPE tokenizer of 51200 entries. They are quantized with ondevice.quantize (or the binding's
llama_model_quantize in a child process when that module is absent).

    python benchmarks/bench_vs_llama_bench.py --rounds 5 --write-results
    python benchmarks/bench_vs_llama_bench.py --models demo,q4km --rounds 3 -p 128 -n 64
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

from stream_vs_llama_bench import (  # noqa: E402
    llama_bench_bin,
    machine_line,
    median,
    run_llama_bench,
    write_results,
)

CACHE = Path(os.environ.get("ONDEVICE_BENCH_CACHE", Path.home() / ".cache" / "ondevice-bench"))
SHARED_F16 = CACHE / "phi2-shaped-f16.gguf"  # the converter benchmark's file, if present
OWN_F16 = CACHE / "phi2-shaped-random-f16.gguf"
SECTION = "## ondevice bench vs llama-bench (issue 6)"

PHI2 = {
    "n_vocab": 51200,
    "n_embd": 2560,
    "n_ff": 10240,
    "n_layer": 32,
    "n_head": 32,
    "n_ctx_train": 2048,
    "rot_dims": 32,
}


# --- the Phi-2-shaped inputs ------------------------------------------------------------------
def _byte_tokens() -> list[str]:
    """GPT-2's byte-to-unicode alphabet: the 256 base tokens of a byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def phi2_tokenizer(n_vocab: int = 51200) -> tuple[list[str], list[int], list[str]]:
    """A valid byte-level BPE of exactly n_vocab entries: 256 bytes, pair merges of them, and
    <|endoftext|> (Phi-2's BOS/EOS, id 50256) at the end of the real tokens."""
    base = _byte_tokens()
    tokens = list(base)
    merges = []
    n_real = 50257
    for a in base:
        for b in base:
            if len(tokens) >= n_real - 1:
                break
            tokens.append(a + b)
            merges.append(f"{a} {b}")
    tokens.append("<|endoftext|>")
    types = [1] * (len(tokens) - 1) + [3]
    while len(tokens) < n_vocab:  # Phi-2 pads its vocabulary with unused entries
        tokens.append(f"[PAD{len(tokens)}]")
        types.append(5)
    return tokens, types, merges


def write_phi2_shaped(path: Path, seed: int = 0) -> Path:
    """Write a full-size Phi-2-shaped f16 GGUF with random weights, one tensor at a time."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter

    p = PHI2
    rng = np.random.default_rng(seed)
    tmp = path.with_suffix(".gguf.partial")
    w = GGUFWriter(None, "phi2")
    w.add_name("phi2-shaped-random")
    w.add_context_length(p["n_ctx_train"])
    w.add_embedding_length(p["n_embd"])
    w.add_feed_forward_length(p["n_ff"])
    w.add_block_count(p["n_layer"])
    w.add_head_count(p["n_head"])
    w.add_head_count_kv(p["n_head"])
    w.add_rope_dimension_count(p["rot_dims"])
    w.add_layer_norm_eps(1e-5)
    w.add_file_type(1)  # MOSTLY_F16
    tokens, types, merges = phi2_tokenizer(p["n_vocab"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("phi-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(50256)
    w.add_eos_token_id(50256)
    w.add_unk_token_id(50256)
    w.add_add_bos_token(False)

    e, f, v = p["n_embd"], p["n_ff"], p["n_vocab"]
    specs: list[tuple[str, tuple[int, ...], bool]] = [("token_embd.weight", (v, e), True)]
    for i in range(p["n_layer"]):
        b = f"blk.{i}."
        specs += [
            (b + "attn_norm.weight", (e,), False),
            (b + "attn_norm.bias", (e,), False),
            (b + "attn_qkv.weight", (3 * e, e), True),
            (b + "attn_qkv.bias", (3 * e,), False),
            (b + "attn_output.weight", (e, e), True),
            (b + "attn_output.bias", (e,), False),
            (b + "ffn_up.weight", (f, e), True),
            (b + "ffn_up.bias", (f,), False),
            (b + "ffn_down.weight", (e, f), True),
            (b + "ffn_down.bias", (e,), False),
        ]
    specs += [
        ("output_norm.weight", (e,), False),
        ("output_norm.bias", (e,), False),
        ("output.weight", (v, e), True),
        ("output.bias", (v,), False),
    ]
    for name, shape, is_matrix in specs:
        dtype = np.float16 if is_matrix else np.float32
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        raw = GGMLQuantizationType.F16 if is_matrix else GGMLQuantizationType.F32
        w.add_tensor_info(name, shape, np.dtype(dtype), nbytes, raw_dtype=raw)
    w.write_header_to_file(tmp)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape, is_matrix in specs:
        if is_matrix:
            scale = 0.02
            data = (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float16)
        elif name.endswith("norm.weight"):
            data = np.ones(shape, dtype=np.float32)
        else:
            data = np.zeros(shape, dtype=np.float32)
        w.write_tensor_data(data)
    w.close()
    tmp.replace(path)
    return path


def phi2_shaped_f16() -> Path:
    """The Phi-2-shaped f16 file: ours once written (the converter benchmark may rewrite its
    own file while we measure), else the converter benchmark's, else we write ours."""
    if OWN_F16.is_file():
        return OWN_F16
    if SHARED_F16.is_file():
        return SHARED_F16
    if not OWN_F16.is_file():
        print(f"writing {OWN_F16} (random weights, ~5.6 GB)...", file=sys.stderr)
        write_phi2_shaped(OWN_F16)
    return OWN_F16


def phi2_shaped(qtype: str) -> Path:
    """A Phi-2-shaped file quantized to qtype (Q4_K_M, Q8_0), made once and cached."""
    src = phi2_shaped_f16()
    dst = CACHE / f"{src.stem.replace('-f16', '')}-{qtype}.gguf"
    if dst.is_file() and dst.stat().st_mtime >= src.stat().st_mtime:
        return dst
    print(f"quantizing {src.name} -> {dst.name}...", file=sys.stderr)
    try:
        from ondevice.quantize import quantize
    except ImportError:
        quantize = None
    if quantize is not None:
        quantize(src, dst, qtype)
        return dst
    # The binding's quantizer, in a child so its memory goes away with it.
    code = (
        "import sys, llama_cpp.llama_cpp as L\n"
        "L.llama_backend_init()\n"
        "p = L.llama_model_quantize_default_params()\n"
        f"p.ftype = L.LLAMA_FTYPE_MOSTLY_{qtype}\n"
        "p.nthread = 2\n"
        "rc = L.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p)\n"
        "sys.exit(rc)\n"
    )
    tmp = dst.with_suffix(".gguf.partial")
    subprocess.run([sys.executable, "-c", code, str(src), str(tmp)], check=True)
    tmp.replace(dst)
    return dst


def model_path(name: str) -> Path:
    if name == "demo":
        from ondevice.locate import demo_model_path

        return demo_model_path()
    if name == "q4km":
        return phi2_shaped("Q4_K_M")
    if name == "q8":
        return phi2_shaped("Q8_0")
    return Path(name)


# --- one side each ----------------------------------------------------------------------------
def run_ondevice(model: Path, *, n_prompt: int, n_gen: int, threads: int, reps: int) -> dict:
    """`ondevice bench` in a fresh process, only the llama-bench tests: {test: record}."""
    cmd = [
        sys.executable,
        "-m",
        "ondevice",
        "bench",
        str(model),
        "-p",
        str(n_prompt),
        "-n",
        str(n_gen),
        "-r",
        str(reps),
        "-t",
        str(threads),
        "--no-extras",
        "--output",
        "json",
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return {r["test"]: r for r in json.loads(out.stdout)}


def compare(
    name: str, rounds: int, n_prompt: int, n_gen: int, threads: int, reps: int, binary: Path
) -> dict:
    model = model_path(name)
    pp, tg = f"pp{n_prompt}", f"tg{n_gen}"
    # ondevice's flash_attn="auto" is off on the CPU for Phi-2 (its attention overflows f16
    # in the CPU's fused kernel; see backends.attention_settings): give llama-bench the same.
    from ondevice import fit
    from ondevice.gguf_header import read_header

    fa = "auto" if fit.flash_attn_default(read_header(model)) else "off"
    res: dict[str, dict[str, list[float]]] = {
        pp: {"llama-bench": [], "ondevice": []},
        tg: {"llama-bench": [], "ondevice": []},
    }
    for r in range(rounds):
        lb = run_llama_bench(
            binary,
            model,
            n_prompt=n_prompt,
            n_gen=n_gen,
            threads=threads,
            reps=reps,
            flash_attn=fa,
        )
        for rec in lb:
            test = pp if rec["n_prompt"] else tg
            res[test]["llama-bench"].append(rec["avg_ts"])
        ours = run_ondevice(model, n_prompt=n_prompt, n_gen=n_gen, threads=threads, reps=reps)
        res[pp]["ondevice"].append(ours[pp]["tps_mean"])
        res[tg]["ondevice"].append(ours[tg]["tps_mean"])
        print(
            f"{model.name} round {r + 1}/{rounds}: "
            + "; ".join(
                f"{t} llama-bench {res[t]['llama-bench'][-1]:.1f} ondevice "
                f"{res[t]['ondevice'][-1]:.1f}"
                for t in (pp, tg)
            ),
            file=sys.stderr,
        )
    return {"model": model.name, "bytes": model.stat().st_size, "tests": res, "fa": fa}


def table(results: list[dict]) -> str:
    lines = [
        "| model | test | llama-bench t/s (median; rounds) | ondevice bench t/s (median; rounds) "
        "| ratio |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        for test, sides in r["tests"].items():
            lb, od = sides["llama-bench"], sides["ondevice"]
            lines.append(
                f"| {r['model']} ({r['bytes'] / 1e9:.3f} GB, FA {r['fa']}) | {test} | {median(lb):.2f}; "
                f"{', '.join(f'{x:.1f}' for x in lb)} | {median(od):.2f}; "
                f"{', '.join(f'{x:.1f}' for x in od)} | **{median(od) / median(lb):.3f}x** |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--models",
        default="demo,q4km,q8",
        help="demo, q4km, q8 or paths; name@P/N gives that model its own -p and -n",
    )
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-r", "--reps", type=int, default=3, help="repetitions inside each run")
    ap.add_argument("--prepare-only", action="store_true", help="only make the model files")
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args()
    # "name" or "name@P/N" (this model's own -p and -n).
    specs = []
    for item in (m.strip() for m in args.models.split(",")):
        if item:
            name, _, pn = item.partition("@")
            p, _, n = pn.partition("/")
            specs.append((name, int(p) if p else args.p, int(n) if n else args.n))
    paths = [model_path(name) for name, _, _ in specs]  # made first, outside the timing
    if args.prepare_only:
        print("\n".join(str(p) for p in paths))
        return
    binary = llama_bench_bin()
    t0 = time.time()
    results = [
        compare(name, args.rounds, p, n, args.threads, args.reps, binary) for name, p, n in specs
    ]
    tab = table(results)
    print(tab)
    if args.write_results:
        text = "\n".join(
            [
                SECTION,
                "",
                f"`python benchmarks/bench_vs_llama_bench.py --models {args.models} --rounds "
                f"{args.rounds} -p {args.p} -n {args.n} -r {args.reps}`, "
                f"{time.strftime('%Y-%m-%d')}. Each round: llama-bench, then `ondevice bench "
                f"--no-extras` in a fresh process, each with {args.reps} repetitions after one "
                f"warm-up (mean per round); the table holds the medians of the rounds. "
                f"{args.threads} threads, n_batch 2048 / n_ubatch 512, flash attention as ondevice "
                "runs it (FA column: off on the CPU unless the KV cache is quantized), "
                "OpenMP waits as each tool's default (llama-bench spins, ondevice sleeps), "
                "f16 KV, mmap, repacking off in both (`--repack 0`), n_ctx = p + n per test "
                "(as llama-bench). Phi-2-shaped files have random weights (speed does not "
                "depend on the values). Machine: " + machine_line() + ".",
                "",
                tab,
                "",
                f"Goal ≥ 0.98x. Took {time.time() - t0:.0f} s.",
            ]
        )
        write_results(text, SECTION)
        print("wrote RESULTS.md", file=sys.stderr)


if __name__ == "__main__":
    main()
