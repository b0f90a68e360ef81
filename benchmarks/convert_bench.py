"""Benchmark `ondevice convert` against llama.cpp's convert_hf_to_gguf.py on a full-size
Phi-2-shaped checkpoint (2.78B parameters, fp16, two shards plus index, random values, the real
microsoft/phi-2 config and a synthesized GPT-2-style tokenizer of the right size).

    python benchmarks/convert_bench.py [--rounds 2] [--outtypes f16,q8_0]
        [--llama-cpp /work/cache/llama.cpp] [--llama-python PYTHON]

The checkpoint is generated once into ~/.cache/ondevice-bench (or $ONDEVICE_BENCH_CACHE),
never into the repo. Each conversion runs in a child process; wall time and that child's peak
RSS (wait4) are recorded, the two converters alternating, with the input in page cache. The
f16 and q8_0 results are kept as phi2-shaped-f16.gguf / phi2-shaped-q8_0.gguf for the other
benchmarks; the f16 one is loaded and runs a few tokens. Prints a markdown table.
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

CACHE = Path(os.environ.get("ONDEVICE_BENCH_CACHE", Path.home() / ".cache" / "ondevice-bench"))
CHECKPOINT = CACHE / "phi2-shaped-hf"

# microsoft/phi-2's config.json (current revision).
PHI2_CONFIG = {
    "_name_or_path": "microsoft/phi-2",
    "architectures": ["PhiForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 50256,
    "embd_pdrop": 0.0,
    "eos_token_id": 50256,
    "hidden_act": "gelu_new",
    "hidden_size": 2560,
    "initializer_range": 0.02,
    "intermediate_size": 10240,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 2048,
    "model_type": "phi",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "partial_rotary_factor": 0.4,
    "qk_layernorm": False,
    "resid_pdrop": 0.1,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.37.0",
    "use_cache": True,
    "vocab_size": 51200,
}
N_BPE = 50256  # GPT-2 / CodeGen: 256 bytes + 50000 merges, then <|endoftext|> and 38 added
EOS = "<|endoftext|>"
WHITESPACE_TOKENS = [" " * n for n in range(31, 1, -1)] + ["\t" * n for n in range(9, 1, -1)]
SHARD_LIMIT = 5_000_000_000  # transformers' default max_shard_size: phi-2 has 2 shards

# llama.cpp's converter hashes the tokenization of a probe string to name the pre-tokenizer;
# a synthesized vocabulary has no known hash, so tell it what we tell ours: phi-2. This costs
# nothing measurable and changes no tensor.
LLAMA_CPP_LAUNCHER = """
import runpy, sys
from pathlib import Path
root = Path(sys.argv[1])
sys.path.insert(0, str(root)); sys.path.insert(1, str(root / "gguf-py"))
import conversion.base as b
b.TextModel.get_vocab_base_pre = lambda self, tokenizer: "phi-2"
sys.argv = [str(root / "convert_hf_to_gguf.py"), *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def phi2_tensors() -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes in transformers' state-dict order."""
    h, f, v = (
        PHI2_CONFIG["hidden_size"],
        PHI2_CONFIG["intermediate_size"],
        PHI2_CONFIG["vocab_size"],
    )
    out = [("model.embed_tokens.weight", (v, h))]
    for i in range(PHI2_CONFIG["num_hidden_layers"]):
        p = f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "dense"):
            out += [(f"{p}.self_attn.{proj}.weight", (h, h)), (f"{p}.self_attn.{proj}.bias", (h,))]
        out += [(f"{p}.mlp.fc1.weight", (f, h)), (f"{p}.mlp.fc1.bias", (f,))]
        out += [(f"{p}.mlp.fc2.weight", (h, f)), (f"{p}.mlp.fc2.bias", (h,))]
        out += [(f"{p}.input_layernorm.weight", (h,)), (f"{p}.input_layernorm.bias", (h,))]
    out += [("model.final_layernorm.weight", (h,)), ("model.final_layernorm.bias", (h,))]
    out += [("lm_head.weight", (v, h)), ("lm_head.bias", (v,))]
    return out


def write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], rng) -> None:
    """A safetensors file written tensor by tensor (never the whole shard in memory)."""
    import numpy as np

    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        n = math.prod(shape) * 2
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name, shape in tensors:
            n = math.prod(shape)
            if name.endswith("layernorm.weight"):
                f.write(
                    (1.0 + 0.1 * rng.standard_normal(n, dtype=np.float32))
                    .astype(np.float16)
                    .tobytes()
                )
                continue
            scale = 0.02 if name.endswith("weight") else 0.01
            for start in range(0, n, 1 << 24):
                chunk = rng.standard_normal(min(1 << 24, n - start), dtype=np.float32) * scale
                f.write(chunk.astype(np.float16).tobytes())


def write_tokenizer(folder: Path, rng) -> None:
    """A valid GPT-2-style byte-level BPE with 50256 BPE tokens (random merges), <|endoftext|>
    at 50256 and CodeGen's 38 whitespace tokens: 50295 tokens, as phi-2's tokenizer has."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tokens = list(alphabet)
    merges: list[tuple[str, str]] = []
    while len(tokens) < N_BPE:
        # mostly short pieces, so tokens stay word-sized as in a real vocabulary
        a = tokens[int(min(rng.exponential(3000), len(tokens) - 1))]
        b = tokens[int(min(rng.exponential(3000), len(tokens) - 1))]
        if a + b in vocab or len(a + b) > 16:
            continue
        vocab[a + b] = len(tokens)
        tokens.append(a + b)
        merges.append((a, b))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOS, special=True, normalized=False)])
    tok.add_tokens([AddedToken(w, normalized=True, special=False) for w in WHITESPACE_TOKENS])
    assert tok.token_to_id(EOS) == 50256 and tok.get_vocab_size() == 50295
    tok.save(str(folder / "tokenizer.json"))
    tok.model.save(str(folder))
    specials = {"bos_token": EOS, "eos_token": EOS, "unk_token": EOS}
    config = {
        "tokenizer_class": "CodeGenTokenizer",
        "add_prefix_space": False,
        "model_max_length": 2048,
        **specials,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))


def ensure_checkpoint() -> Path:
    if not (CHECKPOINT / ".complete").is_file():
        # in a child, like all heavy work: the parent must stay small (see run_child)
        subprocess.run([sys.executable, __file__, "--child", "generate"], check=True)
    return CHECKPOINT


def generate_checkpoint() -> None:
    import numpy as np

    tmp = CHECKPOINT.with_name(CHECKPOINT.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    print(
        f"generating the Phi-2-shaped checkpoint in {CHECKPOINT} (once; ~5.6 GB)", file=sys.stderr
    )
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    (tmp / "config.json").write_text(json.dumps(PHI2_CONFIG, indent=2))
    write_tokenizer(tmp, rng)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in phi2_tensors():
        n = math.prod(shape) * 2
        if size + n > SHARD_LIMIT and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards):
        shard_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_shard(tmp / shard_name, tensors, rng)
        weight_map.update(dict.fromkeys((n for n, _ in tensors), shard_name))
        total += sum(math.prod(s) * 2 for _, s in tensors)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (tmp / ".complete").write_text("")
    shutil.rmtree(CHECKPOINT, ignore_errors=True)
    tmp.rename(CHECKPOINT)
    print(f"  done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


def warm_page_cache(folder: Path) -> None:
    buf = bytearray(1 << 20)  # small: this parent's own RSS must stay low (see run_child)
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def run_child(cmd: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MB, tail of output) of one child process.

    The peak comes from wait4. Linux folds the pre-exec memory of the forking process into a
    child's ru_maxrss, so this parent does no heavy work itself (verification and the smoke
    test run in children too) and its own peak, printed with the results, stays far below.
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    tail = output.decode(errors="replace")[-2000:]
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed ({proc.returncode}):\n{tail}")
    return wall, usage.ru_maxrss / 1024, tail  # ru_maxrss is in KiB on Linux


def same_tensors(a: Path, b: Path) -> tuple[bool, str]:
    """Whether two GGUF files hold the same tensors (names, types, shapes, bytes)."""
    import gguf
    import numpy as np

    ra, rb = gguf.GGUFReader(a), gguf.GGUFReader(b)
    ta, tb = {t.name: t for t in ra.tensors}, {t.name: t for t in rb.tensors}
    if set(ta) != set(tb):
        return False, f"tensor names differ: {sorted(set(ta) ^ set(tb))[:4]}"
    for name, t in ta.items():
        u = tb[name]
        if t.tensor_type != u.tensor_type or list(t.shape) != list(u.shape):
            return (
                False,
                f"{name}: {t.tensor_type.name}{list(t.shape)} vs {u.tensor_type.name}{list(u.shape)}",
            )
        if not np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(u.data).view(np.uint8)):
            return False, f"{name}: data differs"
    return True, f"{len(ta)} tensors identical"


def smoke_test(path: Path) -> str:
    import ondevice

    with ondevice.load(path, n_ctx=256, threads=2) as model:
        chunks = list(model.stream("Instruct: say hi\nOutput:", max_tokens=8, temperature=0))
    stats = chunks[-1].stats
    return (
        f"loaded in {stats.load_s:.1f} s, {stats.completion_tokens} tokens generated at "
        f"{stats.generation_tps:.1f} tok/s (random weights: the text is noise)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--outtypes", default="f16,q8_0")
    ap.add_argument(
        "--llama-cpp",
        type=Path,
        default=Path("/work/cache/llama.cpp"),
        help="unpacked llama.cpp source (vendor/llama.cpp of the llama-cpp-python sdist)",
    )
    ap.add_argument(
        "--llama-python",
        default=sys.executable,
        help="python with torch, transformers (and numpy) for llama.cpp's converter",
    )
    ap.add_argument("--no-verify", action="store_true", help="skip comparing the two outputs")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child)

    src = ensure_checkpoint()
    out_dir = CACHE / "convert-bench-out"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    notes = []
    for outtype in args.outtypes.split(","):
        ours_out, theirs_out = (
            out_dir / f"ondevice-{outtype}.gguf",
            out_dir / f"llamacpp-{outtype}.gguf",
        )
        commands = {
            "ondevice": [sys.executable, "-m", "ondevice", "convert", str(src), "-o", str(ours_out), "--outtype", outtype, "--force"],
            "llama.cpp": [args.llama_python, "-c", LLAMA_CPP_LAUNCHER, str(args.llama_cpp), str(src), "--outfile", str(theirs_out), "--outtype", outtype],
        }  # fmt: skip
        results: dict[str, list[tuple[float, float]]] = {k: [] for k in commands}
        for r in range(args.rounds):
            order = list(commands) if r % 2 == 0 else list(reversed(commands))
            for who in order:
                for path in (ours_out, theirs_out):
                    path.unlink(missing_ok=True)  # don't let a previous output's pages compete
                warm_page_cache(src)
                load = os.getloadavg()[0]
                wall, rss, _ = run_child(commands[who])
                results[who].append((wall, rss))
                print(
                    f"{outtype} round {r + 1} {who}: {wall:.1f} s, peak RSS {rss:.0f} MB (load {load:.2f})",
                    file=sys.stderr,
                )
                if who == "llama.cpp" and r + 1 < args.rounds:
                    theirs_out.unlink(missing_ok=True)
        # leave both last outputs for the check
        if not ours_out.exists():
            run_child(commands["ondevice"])
        if not theirs_out.exists():
            run_child(commands["llama.cpp"])
        verdict = "not checked"
        if not args.no_verify:
            verdict = (
                run_child(
                    [sys.executable, __file__, "--child", "verify", str(ours_out), str(theirs_out)]
                )[2]
                .strip()
                .splitlines()[-1]
            )
        ours_w = statistics.median(w for w, _ in results["ondevice"])
        ours_m = max(m for _, m in results["ondevice"])
        theirs_w = statistics.median(w for w, _ in results["llama.cpp"])
        theirs_m = max(m for _, m in results["llama.cpp"])
        rows.append(
            (outtype, results, ours_w, theirs_w, ours_m, theirs_m, ours_out.stat().st_size, verdict)
        )
        keep = CACHE / f"phi2-shaped-{outtype}.gguf"
        os.replace(ours_out, keep)
        theirs_out.unlink(missing_ok=True)
        notes.append(f"kept {keep}")

    f16 = CACHE / "phi2-shaped-f16.gguf"
    if f16.exists():
        smoke = run_child([sys.executable, __file__, "--child", "smoke", str(f16)])[2]
        notes.append(f"f16 smoke test: {smoke.strip().splitlines()[-1]}")
    parent_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    notes.append(
        f"this script's own peak RSS: {parent_mb:.0f} MB (an upper bound on what wait4 could over-count)"
    )

    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in open("/proc/cpuinfo")
            if ln.startswith("model name")
        ),
        "?",
    )
    print(f"\nMachine: {cpu}, {os.cpu_count()} cores; load average now {os.getloadavg()[0]:.2f}")
    print(
        f"Command: python benchmarks/convert_bench.py --rounds {args.rounds} --outtypes {args.outtypes}\n"
    )
    print(
        "| outtype | converter | wall s (each run) | median wall s | peak RSS MB (max) | ondevice / llama.cpp |"
    )
    print("|---|---|---|---|---|---|")
    for outtype, results, ow, tw, om, tm, size, verdict in rows:
        for who, w, m in (("ondevice", ow, om), ("llama.cpp convert_hf_to_gguf.py", tw, tm)):
            key = "ondevice" if who == "ondevice" else "llama.cpp"
            each = ", ".join(f"{x:.1f}" for x, _ in results[key])
            ratio = f"time {ow / tw:.2f}x, RSS {om / tm:.2f}x" if key == "ondevice" else ""
            print(f"| {outtype} | {who} | {each} | {w:.1f} | {m:.0f} | {ratio} |")
        print(f"| {outtype} | output | {size / 1e9:.3f} GB | | | {verdict} |")
    for note in notes:
        print(f"- {note}")


def child(argv: list[str]) -> None:
    if argv[0] == "generate":
        generate_checkpoint()
    elif argv[0] == "verify":
        ok, detail = same_tensors(Path(argv[1]), Path(argv[2]))
        print(f"identical tensors ({detail})" if ok else f"DIFFERENT: {detail}")
    elif argv[0] == "smoke":
        print(smoke_test(Path(argv[1])))
    else:
        raise SystemExit(f"unknown child task {argv[0]}")


if __name__ == "__main__":
    main()
