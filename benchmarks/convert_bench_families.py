"""Benchmark `ondevice convert` against llama.cpp's convert_hf_to_gguf.py on full-size
Llama-3.2-1B-shaped and Qwen2.5-1.5B-shaped checkpoints (bf16, random values, the released
configs, synthesized byte-level BPE tokenizers of the released sizes in the Llama 3 and Qwen2
layouts), f16 and q8_0 output: wall time and peak RSS of each converter (alternating, input in
page cache), and whether every tensor is byte-identical between the two outputs.

    python benchmarks/convert_bench_families.py [--models llama3.2-1b,qwen2.5-1.5b]
        [--outtypes f16,q8_0] [--rounds 1] [--llama-cpp DIR] [--llama-python PYTHON]

Checkpoints are generated once into ~/.cache/ondevice-bench (or $ONDEVICE_BENCH_CACHE), never
into the repo. DIR is the llama.cpp source vendored in the llama-cpp-python sdist
(benchmarks/build_llama_tools.sh unpacks it to $CACHE/llama.cpp-<version>). Prints markdown.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_bench import CACHE, run_child, same_tensors, warm_page_cache  # noqa: E402

LLAMA32_1B = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 8192,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 16,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}
QWEN25_15B = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 1536,
    "initializer_range": 0.02,
    "intermediate_size": 8960,
    "max_position_embeddings": 131072,
    "max_window_layers": 28,
    "model_type": "qwen2",
    "num_attention_heads": 12,
    "num_hidden_layers": 28,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.1",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
# name -> (config, llama.cpp pre-tokenizer, number of BPE tokens, added special tokens)
MODELS = {
    "llama3.2-1b": (
        LLAMA32_1B,
        "llama-bpe",
        128000,
        ["<|begin_of_text|>", "<|end_of_text|>"]
        + [f"<|reserved_special_token_{i}|>" for i in range(4)]
        + ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
        + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)],
    ),
    "qwen2.5-1.5b": (
        QWEN25_15B,
        "qwen2",
        151643,
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(19)],
    ),
}

# llama.cpp's converter names the pre-tokenizer by hashing a probe tokenization; a synthesized
# vocabulary has no known hash, so it is told the name ours finds from the tokenizer's
# structure. This costs nothing measurable and changes no tensor.
LLAMA_CPP_LAUNCHER = """
import runpy, sys
from pathlib import Path
root, pre = Path(sys.argv[1]), sys.argv[2]
sys.path.insert(0, str(root)); sys.path.insert(1, str(root / "gguf-py"))
import conversion.base as b
b.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
sys.argv = [str(root / "convert_hf_to_gguf.py"), *sys.argv[3:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def tensors_of(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes in transformers' state-dict order (tied: no lm_head)."""
    h, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = config.get("head_dim") or h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    bias = config["architectures"] == ["Qwen2ForCausalLM"]
    out = [("model.embed_tokens.weight", (v, h))]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out += [(f"{p}.input_layernorm.weight", (h,))]
        for proj, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            out += [(f"{p}.self_attn.{proj}.weight", (rows, h))]
            if bias:
                out += [(f"{p}.self_attn.{proj}.bias", (rows,))]
        out += [(f"{p}.self_attn.o_proj.weight", (h, q))]
        out += [(f"{p}.post_attention_layernorm.weight", (h,))]
        out += [(f"{p}.mlp.gate_proj.weight", (f, h)), (f"{p}.mlp.up_proj.weight", (f, h))]
        out += [(f"{p}.mlp.down_proj.weight", (h, f))]
    out += [("model.norm.weight", (h,))]
    if not config["tie_word_embeddings"]:
        out += [("lm_head.weight", (v, h))]
    return out


def write_bf16(path: Path, tensors: list[tuple[str, tuple[int, ...]]], rng) -> None:
    """One safetensors file of bf16 values, written tensor by tensor."""
    import numpy as np

    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        n = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name, shape in tensors:
            n = math.prod(shape)
            for start in range(0, n, 1 << 24):
                count = min(1 << 24, n - start)
                if "norm" in name:
                    x = 1.0 + 0.1 * rng.standard_normal(count, dtype=np.float32)
                else:
                    x = (0.02 if name.endswith("weight") else 0.01) * rng.standard_normal(
                        count, dtype=np.float32
                    )
                # round to nearest even into bf16 (the top 16 bits of the f32)
                bits = x.view(np.uint32)
                bits = bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))
                f.write((bits >> 16).astype(np.uint16).tobytes())


def write_tokenizer(folder: Path, pre: str, n_bpe: int, specials: list[str], rng) -> None:
    """A byte-level BPE of n_bpe tokens (random merges) in the Llama 3 or Qwen2 layout."""
    from ondevice.convert import pretokenizer as pt
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers as pts

    alphabet = sorted(pts.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tokens = list(alphabet)
    merges: list[tuple[str, str]] = []
    while len(tokens) < n_bpe:
        a = tokens[int(min(rng.exponential(4000), len(tokens) - 1))]
        b = tokens[int(min(rng.exponential(4000), len(tokens) - 1))]
        if a + b in vocab or len(a + b) > 16:
            continue
        vocab[a + b] = len(tokens)
        tokens.append(a + b)
        merges.append((a, b))
    llama = pre == "llama-bpe"
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=llama))
    regex = pt.LLAMA3_REGEX if llama else pt.QWEN2_REGEX
    tok.pre_tokenizer = pts.Sequence(
        [
            pts.Split(Regex(regex), behavior="isolated", invert=False),
            pts.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    if not llama:
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast" if llama else "Qwen2Tokenizer",
        "bos_token": specials[0] if llama else None,
        "eos_token": specials[1] if llama else specials[0],
        "model_max_length": 131072,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def generate(name: str) -> None:
    import numpy as np

    config, pre, n_bpe, specials = MODELS[name]
    final = CACHE / f"{name}-shaped-hf"
    tmp = final.with_name(final.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    print(f"generating {final} (once)", file=sys.stderr)
    rng = np.random.default_rng(0)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(tmp, pre, n_bpe, specials, rng)
    write_bf16(tmp / "model.safetensors", tensors_of(config), rng)
    (tmp / ".complete").write_text("")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    print(f"  done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


def ensure(name: str) -> Path:
    folder = CACHE / f"{name}-shaped-hf"
    if not (folder / ".complete").is_file():
        subprocess.run([sys.executable, __file__, "--child", "generate", name], check=True)
    return folder


# `ondevice convert` with the output's first-load check (ondevice.probe.check_written) skipped,
# to measure the conversion alone; the default rows measure the whole command.
NO_CHECK_LAUNCHER = (
    "import sys; import ondevice.convert.base as b; b.check_written = lambda *a, **k: None; "
    "from ondevice.cli import main; sys.argv[0] = 'ondevice'; main()"
)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--outtypes", default="f16,q8_0")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--llama-cpp", type=Path, default=None, help="llama.cpp source folder")
    ap.add_argument("--llama-python", default=sys.executable)
    ap.add_argument(
        "--without-check",
        action="store_true",
        help="time ondevice's conversion alone: skip the first-load check of the output (a "
        "child process that loads and runs it, whose RSS is the output file mapped)",
    )
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        if args.child[0] == "generate":
            return generate(args.child[1])
        ok, detail = same_tensors(Path(args.child[1]), Path(args.child[2]))
        print(f"identical tensors ({detail})" if ok else f"DIFFERENT: {detail}")
        return
    llama_cpp = args.llama_cpp or _default_llama_cpp()
    if not (llama_cpp / "convert_hf_to_gguf.py").is_file():
        raise SystemExit(
            f"no convert_hf_to_gguf.py in {llama_cpp}: run benchmarks/build_llama_tools.sh, or "
            "pip download --no-deps --no-binary :all: llama-cpp-python==VERSION and unpack "
            "its vendor/llama.cpp there"
        )
    out_dir = CACHE / "convert-bench-out"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models.split(","):
        src = ensure(name)
        pre = MODELS[name][1]
        for outtype in args.outtypes.split(","):
            ours, theirs = (
                out_dir / f"ondevice-{outtype}.gguf",
                out_dir / f"llamacpp-{outtype}.gguf",
            )
            commands = {
                "ondevice": [sys.executable, *(["-c", NO_CHECK_LAUNCHER] if args.without_check else ["-m", "ondevice"]), "convert", str(src), "-o", str(ours), "--outtype", outtype, "--force"],
                "llama.cpp": [args.llama_python, "-c", LLAMA_CPP_LAUNCHER, str(llama_cpp), pre, str(src), "--outfile", str(theirs), "--outtype", outtype],
            }  # fmt: skip
            results: dict[str, list[tuple[float, float, float]]] = {k: [] for k in commands}
            for r in range(args.rounds):
                for who in commands if r % 2 == 0 else reversed(list(commands)):
                    for path in (ours, theirs):
                        path.unlink(missing_ok=True)
                    warm_page_cache(src)
                    load = os.getloadavg()[0]
                    wall, rss, _ = run_child(commands[who])
                    results[who].append((wall, rss, load))
                    print(f"{name} {outtype} round {r + 1} {who}: {wall:.1f} s, "
                          f"peak RSS {rss:.0f} MB (load {load:.2f})", file=sys.stderr)  # fmt: skip
            for who, path in (("ondevice", ours), ("llama.cpp", theirs)):
                if not path.exists():
                    run_child(commands[who])
            check = [sys.executable, __file__, "--child", "verify", str(ours), str(theirs)]
            verdict = run_child(check)[2].strip().splitlines()[-1]
            rows.append((name, outtype, results, ours.stat().st_size, verdict))
            ours.unlink()
            theirs.unlink()
    print(f"\nMachine: {_cpu()}, {os.cpu_count()} cores; load average now {os.getloadavg()[0]:.2f}")
    print(f"Command: python benchmarks/convert_bench_families.py --models {args.models} "
          f"--outtypes {args.outtypes} --rounds {args.rounds}"
          f"{' --without-check' if args.without_check else ''}\n")  # fmt: skip
    print(
        "| model | outtype | converter | wall s (load avg at start) | peak RSS MB | ondevice / llama.cpp |"
    )
    print("|---|---|---|---|---|---|")
    for name, outtype, results, size, verdict in rows:
        ow = statistics.median(w for w, _, _ in results["ondevice"])
        tw = statistics.median(w for w, _, _ in results["llama.cpp"])
        om = max(m for _, m, _ in results["ondevice"])
        tm = max(m for _, m, _ in results["llama.cpp"])
        for who, label in (("ondevice", "ondevice"), ("llama.cpp", "convert_hf_to_gguf.py")):
            each = ", ".join(f"{w:.1f} ({ld:.1f})" for w, _, ld in results[who])
            mem = om if who == "ondevice" else tm
            ratio = f"time {ow / tw:.2f}x, RSS {om / tm:.2f}x" if who == "ondevice" else ""
            print(f"| {name} | {outtype} | {label} | {each} | {mem:.0f} | {ratio} |")
        print(f"| {name} | {outtype} | output | {size / 1e9:.3f} GB | | {verdict} |")
    parent = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"- this script's own peak RSS: {parent:.0f} MB (an upper bound on what wait4 over-counts)"
    )


def _default_llama_cpp() -> Path:
    # the version without importing the binding (this parent must stay small, see run_child)
    from importlib.metadata import PackageNotFoundError, version

    try:
        return CACHE / f"llama.cpp-{version('llama-cpp-python')}"
    except PackageNotFoundError:
        return CACHE / "llama.cpp"


def _cpu() -> str:
    with open("/proc/cpuinfo") as f:
        return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")


if __name__ == "__main__":
    main()
