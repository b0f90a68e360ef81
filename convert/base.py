"""The converter's shared machinery: architecture registry, config reading, tensor planning and
checking, streaming GGUF writing and atomic output.

An architecture is a small `Architecture` subclass registered under its Hugging Face
`architectures` name; it reads the config, writes the hyperparameters and says what shape each
GGUF tensor must have. Everything else is here. Tensor names and metadata keys come from gguf-py
(its tensor-name map and the writer's typed `add_*` methods), never from strings of ours.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import sys
import types
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import gguf
import numpy as np
from ondevice.convert import quants
from ondevice.convert.safetensors_source import FLOAT_DTYPES, Checkpoint, TensorRef
from ondevice.convert.tokenizer import llama_cpp_name, load_vocab

from ondevice import paths
from ondevice.errors import ConversionError
from ondevice.probe import check_written

logger = logging.getLogger(__name__)

T = gguf.MODEL_TENSOR
Q = gguf.GGMLQuantizationType

# --outtype -> (type of the matrices, general.file_type). Norms and biases are always F32.
OUTTYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}

# The GGML type whose bytes equal a safetensors dtype's: such tensors are copied, not decoded.
_SAME_BYTES = {"F32": Q.F32, "F16": Q.F16, "BF16": Q.BF16}

# Elements converted per step: ~8 MB of f32, so memory stays flat whatever the tensor size.
CHUNK_ELEMENTS = 2 * 1024 * 1024
_MISSING = object()

_REGISTRY: dict[str, type[Architecture]] = {}
SUPPORTED: Mapping[str, type[Architecture]] = types.MappingProxyType(_REGISTRY)


def register(*hf_names: str) -> Callable[[type[Architecture]], type[Architecture]]:
    """Class decorator: convert checkpoints whose config lists one of these `architectures`."""

    def decorate(cls: type[Architecture]) -> type[Architecture]:
        for name in hf_names:
            if name in _REGISTRY and _REGISTRY[name] is not cls:
                raise ValueError(f"architecture {name} is already registered")
            _REGISTRY[name] = cls
        return cls

    return decorate


class HParams:
    """A config.json, read by alias: the same value has had several names over releases."""

    def __init__(self, config: dict[str, Any], path: Path) -> None:
        self.config = config
        self.path = path
        # transformers >= 5 nests the rope settings under rope_parameters
        nested = config.get("rope_parameters")
        self._rope = nested if isinstance(nested, dict) else {}

    def get(self, *names: str, default: Any = _MISSING) -> Any:
        for name in names:
            for source in (self.config, self._rope):
                value = source.get(name)
                if value is not None:
                    return value
        if default is _MISSING:
            raise ConversionError(f"{self.path}: missing {' / '.join(names)}")
        return default

    def int(self, *names: str, default: Any = _MISSING) -> int:
        value = self.get(*names, default=default)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConversionError(
                f"{self.path}: {names[0]} must be a positive integer, not {value!r}"
            )
        return value

    def float(self, *names: str, default: Any = _MISSING) -> float:
        value = self.get(*names, default=default)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConversionError(f"{self.path}: {names[0]} must be a number, not {value!r}")
        return float(value)

    def require(self, ok: bool, what: str) -> None:
        if not ok:
            raise ConversionError(f"{self.path}: unsupported config: {what}")


# Per GGUF tensor kind: (weight shape, bias shape or None), in Hugging Face (out, in) order.
Shapes = dict[gguf.MODEL_TENSOR, tuple[tuple[int, ...], tuple[int, ...] | None]]


class Architecture:
    """Base of the per-architecture converters; subclasses are a few dozen lines."""

    model_arch: ClassVar[gguf.MODEL_ARCH]
    # the pre-tokenizer is identified from the tokenizer (see pretokenizer); where llama.cpp
    # has another name for the same splitting with this architecture: identified -> written
    pre_names: ClassVar[Mapping[str, str]] = {}
    # whether llama.cpp adds BOS; None: as the tokenizer's configuration says
    add_bos: ClassVar[bool | None] = None
    # per block, groups of kinds of which exactly one must be present (fused QKV or Q, K, V)
    alternatives: ClassVar[tuple[frozenset[gguf.MODEL_TENSOR], ...]] = ()
    # non-weights some checkpoints carry (recomputed by every runtime)
    ignored_suffixes: ClassVar[tuple[str, ...]] = (".rotary_emb.inv_freq",)

    n_blocks: int
    vocab_size: int
    # kinds the checkpoint may lack (the output matrix of a model with tied embeddings)
    optional: frozenset[gguf.MODEL_TENSOR] = frozenset()

    def __init__(self, hparams: HParams) -> None:
        self.hparams = hparams
        self.read_config(hparams)

    def read_config(self, hp: HParams) -> None:
        """Read and check the hyperparameters; must set n_blocks and vocab_size."""
        raise NotImplementedError

    def write_hparams(self, writer: gguf.GGUFWriter) -> None:
        raise NotImplementedError

    def shapes(self) -> Shapes:
        raise NotImplementedError

    def permuted_heads(self, kind: gguf.MODEL_TENSOR) -> int | None:
        """For a tensor whose rows llama.cpp wants in another order: the number of heads its
        rows form (see `rotary_row_order`); None to write the rows as they are."""
        return None

    def extra_tensors(self) -> dict[str, np.ndarray]:
        """Tensors computed from the config rather than read (rope frequency factors), by
        GGUF name; written as F32."""
        return {}


def rotary_row_order(n_rows: int, n_heads: int) -> np.ndarray:
    """Row order llama.cpp's `llama` architecture wants for Q and K (a permutation of 0..n_rows).

    Hugging Face rotates the two halves of each head's vector (dims i and i + d/2 form a pair);
    llama.cpp's "normal" rope pairs neighbours (2i, 2i + 1), as the original Llama weights were
    laid out. Within each head, output row 2i + j is input row j * d/2 + i.
    """
    head_dim = n_rows // n_heads
    one = np.arange(head_dim).reshape(2, head_dim // 2).T.reshape(-1)
    return (np.arange(n_heads)[:, None] * head_dim + one[None, :]).reshape(-1)


@dataclass
class PlannedTensor:
    """One GGUF tensor: its name, type and size, and where its values come from: a checkpoint
    tensor (rows reordered when `perm_heads` is set) or, for computed tensors, `data`."""

    name: str
    source: TensorRef | None
    qtype: gguf.GGMLQuantizationType
    nbytes: int
    perm_heads: int | None = None
    data: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.source.shape if self.source is not None else tuple(self.data.shape)  # type: ignore[union-attr]


def plan_tensors(
    arch: Architecture, ckpt: Checkpoint, qtype: gguf.GGMLQuantizationType
) -> list[PlannedTensor]:
    """Map every checkpoint tensor to its GGUF name and type; refuse anything unexpected."""
    name_map = gguf.get_tensor_name_map(arch.model_arch, arch.n_blocks)
    shapes = arch.shapes()
    found: dict[str, PlannedTensor] = {}
    kinds: dict[tuple[int | None, gguf.MODEL_TENSOR], set[str]] = {}
    unmapped: list[str] = []
    for ref in ckpt:
        if ref.name.endswith(arch.ignored_suffixes):
            logger.debug("skipping %s", ref.name)
            continue
        mapped = name_map.get_type_and_name(ref.name, try_suffixes=(".weight", ".bias"))
        part = ref.name.rsplit(".", 1)[-1]
        if mapped is None or part not in ("weight", "bias") or mapped[0] not in shapes:
            unmapped.append(ref.name)
            continue
        kind, name = mapped
        weight_shape, bias_shape = shapes[kind]
        want = weight_shape if part == "weight" else bias_shape
        if want is None:
            unmapped.append(ref.name)
            continue
        if ref.shape != tuple(want):
            raise ConversionError(
                f"tensor {ref.name} has shape {list(ref.shape)}, but the config implies {list(want)}"
            )
        if name in found:
            raise ConversionError(
                f"tensors {found[name].source.name} and {ref.name} both map to {name}"
            )
        if ref.dtype not in FLOAT_DTYPES:
            raise ConversionError(
                f"tensor {ref.name} has dtype {ref.dtype}; only F32, F16 and BF16 are read"
            )
        heads = arch.permuted_heads(kind)
        if heads is not None and (ref.shape[0] % heads or (ref.shape[0] // heads) % 2):
            raise ConversionError(
                f"tensor {ref.name} has {ref.shape[0]} rows, not {heads} heads of an even size"
            )
        found[name] = PlannedTensor(name, ref, *_target(name, ref, qtype), perm_heads=heads)
        match = re.match(r"blk\.(\d+)\.", name)
        kinds.setdefault((int(match.group(1)) if match else None, kind), set()).add(part)
    if unmapped:
        raise ConversionError(
            f"{len(unmapped)} checkpoint tensor(s) don't map to {arch.model_arch.name} GGUF "
            f"tensors: {', '.join(unmapped[:5])}{' ...' if len(unmapped) > 5 else ''}",
            hint="is the config's num_hidden_layers right, and is this really that architecture?",
        )
    _check_complete(arch, shapes, kinds)
    extra = []
    for name, values in arch.extra_tensors().items():
        data = np.ascontiguousarray(values, dtype=np.float32)
        extra.append(PlannedTensor(name, None, Q.F32, data.nbytes, data=data))
    return extra + list(found.values())


def _target(
    name: str, ref: TensorRef, qtype: gguf.GGMLQuantizationType
) -> tuple[gguf.GGMLQuantizationType, int]:
    if len(ref.shape) < 2 or not name.endswith(".weight"):
        qtype = Q.F32  # norms and biases: tiny, and precision matters there
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if ref.shape[-1] % block:
        # llama.cpp's converter does the same: a row that can't be cut into blocks stays F16
        logger.warning(
            "%s: rows of %d don't divide into %s blocks, writing F16",
            name,
            ref.shape[-1],
            qtype.name,
        )
        qtype = Q.F16
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return qtype, ref.n_elements // block * type_size


def _check_complete(
    arch: Architecture, shapes: Shapes, kinds: dict[tuple[int | None, gguf.MODEL_TENSOR], set[str]]
) -> None:
    missing: list[str] = []
    alternative_kinds = set().union(*arch.alternatives) if arch.alternatives else set()

    def need(bid: int | None, kind: gguf.MODEL_TENSOR) -> None:
        have = kinds.get((bid, kind), set())
        name = gguf.TENSOR_NAMES[kind].format(bid=bid)
        missing.extend(
            f"{name}.{p}"
            for p in ("weight", "bias")
            if p not in have and (p == "weight" or shapes[kind][1])
        )

    for kind in shapes:
        per_block = "{bid}" in gguf.TENSOR_NAMES[kind]
        if kind in alternative_kinds or kind in arch.optional:
            continue
        for bid in range(arch.n_blocks) if per_block else [None]:
            need(bid, kind)
    for bid in range(arch.n_blocks):
        present = [g for g in arch.alternatives if any((bid, k) in kinds for k in g)]
        if len(present) > 1:
            raise ConversionError(f"block {bid} has both fused and separate attention projections")
        for kind in sorted(
            present[0] if present else arch.alternatives[0] if arch.alternatives else (), key=str
        ):
            need(bid, kind)
    if missing:
        raise ConversionError(
            f"the checkpoint lacks {len(missing)} tensor(s) the config implies: "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )


def convert_folder(
    folder: Path,
    out: Path,
    *,
    outtype: str = "f16",
    name: str | None = None,
    force: bool = False,
    progress: bool | None = None,
    vocab_pre: str | None = None,
) -> Path:
    """Convert a local Hugging Face model folder; see `ondevice.convert.convert`."""
    check_outtype(outtype)
    qtype, ftype = OUTTYPES[outtype]
    check_output_path(out, force)
    arch = _architecture(folder)
    vocab = load_vocab(
        folder,
        arch.vocab_size,
        arch.hparams.config,
        pre=vocab_pre,
        pre_names=arch.pre_names,
        add_bos=arch.add_bos,
    )
    with Checkpoint.open(folder) as ckpt:
        plan = plan_tensors(arch, ckpt, qtype)
        writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[arch.model_arch])
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(llama_cpp_name(name or folder.resolve().name, vocab))
        arch.write_hparams(writer)
        writer.add_file_type(ftype)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab.write(writer)
        for t in plan:
            # the writer takes numpy (row-major) shapes and reverses them into GGML order
            writer.add_tensor_info(
                t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype
            )
        with atomic_output(out, force) as tmp:
            try:
                writer.write_header_to_file(tmp)
                writer.write_kv_data_to_file()
                writer.write_ti_data_to_file()
                assert writer.fout is not None
                writer.fout[0].flush()
                # From here on the data goes straight to the file descriptor (the writer's
                # buffered file is not used again), so copies can stay in the kernel.
                _write_tensor_data(writer.fout[0].fileno(), plan, writer.data_alignment, progress)
            except OSError as exc:  # disk full, I/O error: a typed error, not a traceback
                raise ConversionError(f"writing {out} failed: {exc}") from exc
            finally:
                writer.close()
            # The hyperparameters came from an untrusted config.json: check the output as a
            # first load would (ondevice.probe), before it appears under its name.
            check_written(tmp, shown=out, error=ConversionError)
    logger.info("wrote %s (%d tensors, %s)", out, len(plan), outtype)
    return out


def _architecture(folder: Path) -> Architecture:
    """The registered converter for the folder's config.json, with the config read."""
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConversionError(
            f"{folder} has no config.json; is it a Hugging Face model folder?"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{config_path}: can't read: {exc}") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{config_path}: not a JSON object")
    names = config.get("architectures") or []
    names = names if isinstance(names, list) else [names]
    cls = next((SUPPORTED[n] for n in names if isinstance(n, str) and n in SUPPORTED), None)
    if cls is None:
        raise ConversionError(
            f"unsupported architecture {', '.join(map(str, names)) or '(none in config.json)'}; "
            f"supported: {', '.join(sorted(SUPPORTED))}"
        )
    return cls(HParams(config, config_path))


def _write_tensor_data(
    fd: int, plan: list[PlannedTensor], alignment: int, progress: bool | None
) -> None:
    pos = _pad(fd, os.lseek(fd, 0, os.SEEK_CUR), alignment)
    data_start = pos
    offset = 0  # the offset write_ti_data_to_file recorded for the next tensor
    bar = _progress_bar(sum(t.nbytes for t in plan), len(plan), progress)
    workers = max(1, min(4, os.cpu_count() or 1))
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="convert") as pool:
            for i, t in enumerate(plan):
                if pos - data_start != offset:
                    raise AssertionError(
                        f"{t.name}: at data offset {pos - data_start}, expected {offset}"
                    )
                ref = t.source
                if ref is None:  # computed from the config
                    assert t.data is not None
                    _write_all(fd, t.data)
                    if bar:
                        bar.update(t.nbytes)
                elif _SAME_BYTES[ref.dtype] == t.qtype and t.perm_heads is None:
                    _copy_range(ref.file.fd, ref.offset, ref.nbytes, fd)
                    if bar:
                        bar.update(ref.nbytes)
                else:
                    for chunk in _encoded_chunks(t, pool, workers):
                        _write_all(fd, chunk)
                        if bar:
                            bar.update(chunk.nbytes)
                pos = _pad(fd, pos + t.nbytes, alignment)
                offset += gguf.GGUFWriter.ggml_pad(t.nbytes, alignment)
                if bar:
                    bar.set_postfix_str(f"tensor {i + 1}/{len(plan)}", refresh=False)
    finally:
        if bar:
            bar.close()


def _encoded_chunks(
    t: PlannedTensor, pool: ThreadPoolExecutor, workers: int
) -> Iterator[np.ndarray]:
    """The tensor converted to its target type, row block by row block, in order.

    Blocks are encoded on a few threads (numpy releases the GIL) with at most `workers + 1` in
    flight, and the source pages of each block are unmapped once it is written.
    """
    ref = t.source
    assert ref is not None
    src = ref.file.array(ref)
    if src.ndim > 1:
        rows = src.reshape(-1, src.shape[-1])
    else:  # a vector: one row, or one element per row when its elements are reordered
        rows = src.reshape(1, -1) if t.perm_heads is None else src.reshape(-1, 1)
    step = max(1, CHUNK_ELEMENTS // rows.shape[1])
    order = None
    if t.perm_heads is not None:
        # whole heads per block, so each block is reordered on its own
        head = rows.shape[0] // t.perm_heads
        step = max(head, step - step % head)
        order = rotary_row_order(rows.shape[0], t.perm_heads)
    row_bytes = rows.shape[1] * src.itemsize
    pending: deque[tuple[Future[np.ndarray], int, int]] = deque()
    for start in range(0, rows.shape[0], step):
        block = rows[start : start + step]
        picks = None if order is None else order[start : start + step] - start
        job = pool.submit(_encode, block, ref.dtype, t.qtype, picks)
        pending.append((job, start, block.shape[0]))
        if len(pending) > workers:
            yield _finish(ref, *pending.popleft(), row_bytes)
    while pending:
        yield _finish(ref, *pending.popleft(), row_bytes)


def _finish(
    ref: TensorRef, future: Future[np.ndarray], start: int, n_rows: int, row_bytes: int
) -> np.ndarray:
    out = future.result()
    ref.file.release(ref.offset + start * row_bytes, n_rows * row_bytes)
    return out


def _encode(
    block: np.ndarray,
    src_dtype: str,
    qtype: gguf.GGMLQuantizationType,
    picks: np.ndarray | None = None,
) -> np.ndarray:
    if picks is not None:  # rows in another order (a copy, made on this worker thread)
        block = block[picks]
    if src_dtype == "BF16":  # bf16 is the top half of an f32
        f32 = (block.astype(np.uint32) << 16).view(np.float32)
    else:
        f32 = block.astype(np.float32, copy=False)
    if qtype == Q.F32:
        return np.ascontiguousarray(f32)
    if qtype == Q.F16:
        return f32.astype(np.float16)  # round to nearest even, as ggml and torch do
    return quants.quantize(f32, qtype)  # BF16, Q8_0: ggml's reference bytes


def _copy_range(src_fd: int, offset: int, nbytes: int, dst_fd: int) -> None:
    """Append src[offset:offset+nbytes] to dst without passing the bytes through Python."""
    done = 0
    for method in ("copy_file_range", "sendfile"):
        if not hasattr(os, method):
            continue
        try:
            while done < nbytes:
                if method == "copy_file_range":
                    n = os.copy_file_range(src_fd, dst_fd, nbytes - done, offset + done)
                else:
                    n = os.sendfile(dst_fd, src_fd, offset + done, nbytes - done)
                if n == 0:
                    raise ConversionError("a checkpoint file got shorter while being read")
                done += n
            return
        except OSError as exc:
            # not supported between these files / file systems: try the next way
            if exc.errno not in (
                errno.EXDEV,
                errno.ENOSYS,
                errno.EINVAL,
                errno.EOPNOTSUPP,
                errno.ENOTSUP,
                errno.EBADF,
                errno.EPERM,
                errno.ENOTSOCK,
            ):
                raise
    while done < nbytes:
        data = os.pread(src_fd, min(8 << 20, nbytes - done), offset + done)
        if not data:
            raise ConversionError("a checkpoint file got shorter while being read")
        _write_all(dst_fd, data)
        done += len(data)


def _write_all(fd: int, data: Any) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _pad(fd: int, pos: int, alignment: int) -> int:
    pad = -pos % alignment
    if pad:
        _write_all(fd, bytes(pad))
    return pos + pad


def _progress_bar(total: int, n_tensors: int, progress: bool | None) -> Any:
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return None
    from tqdm import tqdm  # a dependency of gguf

    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="converting",
        postfix=f"tensor 0/{n_tensors}",
        file=sys.stderr,
    )


def check_outtype(outtype: str) -> None:
    if outtype not in OUTTYPES:
        raise ConversionError(f"unknown outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")


def check_output_path(out: Path, force: bool) -> None:
    """Refuse early what would fail late: an existing OUT without force, a missing folder."""
    paths.check_target(out, overwrite=force, error=ConversionError)


def atomic_output(out: Path, force: bool) -> contextlib.AbstractContextManager[Path]:
    """A temporary file beside `out` that becomes `out` only if the block finishes
    (`ondevice.paths.atomic_write`): on any exception, Ctrl-C included, it is removed and `out`
    is untouched; without `force` an existing `out` is never replaced, even one created
    meanwhile."""
    return paths.atomic_write(out, overwrite=force, error=ConversionError)
