"""Derives ondevice/tensor_roles.py (which ggml types each tensor role may have) from the source of
the llama.cpp that the installed llama-cpp-python was built from.

    python scripts/gen_tensor_roles.py [SRC]          # print the module
    python scripts/gen_tensor_roles.py [SRC] --write  # rewrite ondevice/tensor_roles.py
    python scripts/gen_tensor_roles.py [SRC] --check  # exit 1 if the committed table differs

SRC defaults to $ONDEVICE_BENCH_CACHE/llama.cpp-<binding version> (~/.cache/ondevice-bench/...),
where benchmarks/build_llama_tools.sh unpacks the binding's sdist.

What is read, and why it is the rule:
- src/llama-arch.cpp LLM_TENSOR_NAMES (role -> name template, "blk.%d.attn_norm") and
  LLM_TENSOR_INFOS (role -> the ggml op the weight is used in). llama.cpp picks each weight's
  buffer by asking the backend whether it "supports" that op, and the CPU backend says yes to
  nearly everything (ggml-cpu.cpp ggml_backend_cpu_device_supports_op), so an unusable type is
  found only when the graph runs: a NULL vec_dot call (SIGSEGV) or a GGML_ABORT.
- ggml/src/ggml-cpu/ggml-cpu.c type_traits_cpu: MUL_MAT / MUL_MAT_ID need the weight type's
  `.vec_dot` kernel; types without one (Q8_1, Q8_K, I8..I64, F64) crash the first matmul.
- ggml/src/ggml-cpu/ops.cpp ggml_compute_forward_get_rows: the types it can gather rows from
  (others: GGML_ABORT). I32 is listed there but ggml_get_rows (ggml.c) then makes an I32 result,
  which the next element-wise op aborts on, so an I32 embedding is refused too.
- ADD / ADD_ID / MUL / DIV (biases, norm weights, scales): the CPU binary op
  (ggml-cpu/binary-ops.cpp binary_op) takes an F32 activation only with an F32 second operand;
  ROPE frequency factors: ggml_rope_ext asserts `c->type == GGML_TYPE_F32` (ggml.c).
- Ops used by other architectures' special weights (SSM, RWKV, IM2COL, SCALE) get no rule here:
  llama.cpp and ondevice's first-load probe (ondevice/probe.py) answer for them.
A name that several roles share allows the union of their types (never refuse what some role
of that name could use).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "ondevice" / "tensor_roles.py"
F32_OPS = ("ADD", "ADD_ID", "MUL", "DIV", "ROPE")
CHECKED_OPS = ("MUL_MAT", "MUL_MAT_ID", "GET_ROWS", *F32_OPS)


def default_source() -> Path:
    from importlib.metadata import version

    cache = Path(os.environ.get("ONDEVICE_BENCH_CACHE", Path.home() / ".cache/ondevice-bench"))
    return cache / f"llama.cpp-{version('llama_cpp_python')}"


def _block(text: str, start: str) -> str:
    """The text from `start` to the closing `};` of that initializer."""
    i = text.index(start)
    return text[i : text.index("\n};", i)]


def tensor_names(src: Path) -> dict[str, str]:
    text = _block((src / "src/llama-arch.cpp").read_text(), "LLM_TENSOR_NAMES = {")
    return dict(re.findall(r'\{\s*(LLM_TENSOR_\w+)\s*,\s*"([^"]+)"\s*\}', text))


def tensor_ops(src: Path) -> dict[str, str]:
    text = _block((src / "src/llama-arch.cpp").read_text(), "LLM_TENSOR_INFOS = {")
    return dict(re.findall(r"\{\s*(LLM_TENSOR_\w+)\s*,\s*\{\s*\w+\s*,\s*GGML_OP_(\w+)\s*\}", text))


def vec_dot_types(src: Path) -> set[str]:
    text = _block((src / "ggml/src/ggml-cpu/ggml-cpu.c").read_text(), "type_traits_cpu[")
    text = text[text.index("{") + 1 :]  # the entries, past "type_traits_cpu[GGML_TYPE_COUNT] = {"
    out = set()
    for name, body in re.findall(r"\[GGML_TYPE_(\w+)\]\s*=\s*\{(.*?)\n    \}", text, re.S):
        if re.search(r"^\s*\.vec_dot\s*=", body, re.M):
            out.add(name)
    return out


def get_rows_types(src: Path) -> set[str]:
    text = (src / "ggml/src/ggml-cpu/ops.cpp").read_text()
    i = text.index("void ggml_compute_forward_get_rows(")
    body = text[i : text.index("default:", i)]
    return set(re.findall(r"case GGML_TYPE_(\w+):", body)) - {"I32"}


_ZERO_TEST = re.compile(r"\bn_head(?:_kv)?(?:\(\w*\))? == 0")


_PER_LAYER_KV = re.compile(r"\bn_head_kv\(\w+\)|\bn_embd_[kv]_gqa\(\w+\)")


def _arch_names(src: Path, classes: set[str]) -> set[str]:
    """The architecture names (LLM_ARCH_NAMES) whose model class (llama_model_mapping in
    llama-model.cpp) is one of `classes`."""
    mapping = (src / "src/llama-model.cpp").read_text()
    mapping = mapping[mapping.index("llama_model_mapping(") :]
    mapping = mapping[: mapping.index("\n}\n")]
    enums: set[str] = set()
    pending: list[str] = []
    for case, cls in re.findall(r"case (LLM_ARCH_\w+):|return new llama_model_(\w+)\(", mapping):
        if case:
            pending.append(case)
        else:
            if cls in classes:
                enums.update(pending)
            pending = []
    arch_cpp = (src / "src/llama-arch.cpp").read_text()
    names = dict(re.findall(r"\{\s*(LLM_ARCH_\w+)\s*,\s*\"([^\"]+)\"\s*\}", arch_cpp))
    return {names[e] for e in enums if e in names}


def zero_head_archs(src: Path) -> set[str]:
    """Architectures whose code gives a layer with 0 (KV) heads a meaning (a recurrent or
    attention-free layer): the models/*.cpp that test a head count against 0, plus every
    recurrent or hybrid architecture (llm_arch_is_recurrent / llm_arch_is_hybrid)."""
    classes = set()
    for path in sorted((src / "src/models").glob("*.cpp")):
        text = path.read_text()
        if _ZERO_TEST.search(text):
            classes.update(re.findall(r"\bllama_model_(\w+)::", text))
    out = _arch_names(src, classes)
    arch_cpp = (src / "src/llama-arch.cpp").read_text()
    names = dict(re.findall(r"\{\s*(LLM_ARCH_\w+)\s*,\s*\"([^\"]+)\"\s*\}", arch_cpp))
    for fn in ("llm_arch_is_recurrent", "llm_arch_is_hybrid"):
        body = arch_cpp[arch_cpp.index(f"bool {fn}(") :]
        body = body[: body.index("default:")]
        out.update(names[e] for e in re.findall(r"case (LLM_ARCH_\w+):", body) if e in names)
    return out


def per_layer_kv_archs(src: Path) -> set[str]:
    """Architectures that size each layer's K/V projections by that layer's own KV head count
    (their load_arch_tensors asks n_head_kv(i) or n_embd_k_gqa(i)). The others size every layer
    by layer 0 (LLAMA_LOAD_LOCALS) while the graph reshapes by the layer's own count: a
    per-layer array that varies aborts them (GGML_ASSERT(a->ne[0] == b->ne[0]))."""
    classes = set()
    for path in sorted((src / "src/models").glob("*.cpp")):
        text = path.read_text()
        for cls, body in re.findall(
            r"void llama_model_(\w+)::load_arch_tensors\(.*?\{(.*?)\n\}", text, re.S
        ):
            if _PER_LAYER_KV.search(body):
                classes.add(cls)
    return _arch_names(src, classes)


def derive(src: Path) -> tuple[dict[str, frozenset[str]], dict[str, list[str]]]:
    """(op -> allowed type names, name template -> ops of the roles that use that name)."""
    matmul = frozenset(vec_dot_types(src))
    allowed = {
        "MUL_MAT": matmul,
        "MUL_MAT_ID": matmul,
        "GET_ROWS": frozenset(get_rows_types(src)),
        **{op: frozenset({"F32"}) for op in F32_OPS},
    }
    names, ops = tensor_names(src), tensor_ops(src)
    roles: dict[str, set[str]] = {}
    for role, template in names.items():
        if role in ops:
            roles.setdefault(template, set()).add(ops[role])
    return allowed, {t: sorted(o) for t, o in sorted(roles.items())}


def _wrapped(words: list[str], indent: str) -> list[str]:
    """`"A B C ...".split()` over several lines of at most 100 characters."""
    rows, row = [], ""
    for w in words:
        if len(indent) + len(row) + len(w) + 4 > 96:
            rows.append(row)
            row = ""
        row += w + " "
    rows.append(row)
    out = [f'{indent}"{r}"' for r in rows[:-1]] + [f'{indent}"{rows[-1].rstrip()}".split()']
    return out


def render(src: Path) -> str:
    allowed, roles = derive(src)
    lines = [
        '"""Which ggml types llama.cpp\'s CPU backend can compute each tensor role in: generated by',
        "scripts/gen_tensor_roles.py from the source of the llama.cpp the binding was built from (see",
        "there for which source lines each rule comes from); ondevice.model_check applies it.",
        "",
        "Do not edit by hand: rerun the script after a llama-cpp-python upgrade (tests/",
        "test_model_check.py fails when this table and the unpacked source disagree).",
        '"""',
        "",
        "from __future__ import annotations",
        "",
        f'LLAMA_CPP_SOURCE = "{src.name}"',
        "",
        "# ggml op -> the weight types the CPU backend computes it with",
        "OP_TYPES: dict[str, frozenset[str]] = {",
    ]
    for op in CHECKED_OPS:
        types = _wrapped(sorted(allowed[op]), "        ")
        if len(types) == 1:
            lines.append(f'    "{op}": frozenset({types[0].strip()}),')
        else:
            lines += [f'    "{op}": frozenset(', *types, "    ),"]
    lines += [
        "}",
        "",
        '# tensor name template (llama.cpp\'s LLM_TENSOR_NAMES, "%d" a layer or expert number) -> the',
        "# ops the roles of that name are used in, space-separated (NONE: an unused tensor)",
        "ROLE_OPS: dict[str, str] = {",
    ]
    for template, role_ops in roles.items():
        lines.append(f'    "{template}": "{" ".join(role_ops)}",')
    lines += [
        "}",
        "",
        "# architectures where a layer may have 0 heads or 0 KV heads (recurrent or attention-free",
        "# layers); elsewhere a 0 in a per-layer head count array aborts llama.cpp",
        "ZERO_HEAD_ARCHS: frozenset[str] = frozenset(",
        *_wrapped(sorted(zero_head_archs(src)), "    "),
        ")",
        "",
        "# architectures that size each layer's K/V projections by that layer's KV head count;",
        "# elsewhere every layer must have layer 0's count",
        "PER_LAYER_KV_ARCHS: frozenset[str] = frozenset(",
        *_wrapped(sorted(per_layer_kv_archs(src)), "    "),
        ")",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", nargs="?", type=Path, default=None)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    src = args.src or default_source()
    text = render(src)
    if args.check:
        same = TARGET.read_text() == text
        print("up to date" if same else f"{TARGET} differs from {src}")
        return 0 if same else 1
    if args.write:
        TARGET.write_text(text)
        print(f"wrote {TARGET}")
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
