"""Dequantize a GGUF model to F16 with gguf-py's dequantizer, one tensor at a time.

This turns a quantized file (such as the Q4_1 demo model) back into a 16-bit one that llama.cpp's
quantizer accepts without `allow_requantize`, so the quantization ladder can be measured on real
weights when the original checkpoint is not at hand. It cannot restore what the first
quantization lost: the F16 file holds exactly the values the quantized file decoded to.

Every metadata key is copied with its GGUF type (tokenizer, chat template, hyperparameters);
`general.file_type` becomes MOSTLY_F16. Tensors with two or more dimensions become F16, 1-d
tensors (norms, biases) F32, as llama.cpp's converter writes them. Tensors are decoded and
written one by one, so memory stays at about one tensor in float32.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ondevice import locate, paths
from ondevice.errors import QuantizeError
from ondevice.gguf_header import read_header

log = logging.getLogger(__name__)

LLAMA_FTYPE_MOSTLY_F16 = 1  # llama.h enum llama_ftype


def dequantize_to_f16(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    on_progress: Callable[[int, int, str], object] | None = None,
) -> Path:
    """Write an F16 copy of the GGUF model `src` (a path, `demo`, or a store name) to `dst`.

    The output is written to a temp file beside `dst` and renamed when complete.
    """
    from gguf import GGUFReader

    src_path = locate.resolve(src)
    dst_path = Path(dst).expanduser().absolute()
    header = read_header(src_path)  # refuse a malformed file before gguf-py trusts its counts
    if dst_path.exists() and os.path.samefile(src_path, dst_path):
        raise QuantizeError(f"the output {dst_path} is the input file", hint="pick a new name")
    reader = GGUFReader(src_path)
    try:
        with paths.atomic_write(dst_path, error=QuantizeError) as tmp:
            _write_f16(reader, header, src_path, tmp, on_progress)
            read_header(tmp)
    except NotImplementedError as exc:
        raise QuantizeError(
            f"gguf-py cannot dequantize {src_path}: {exc}",
            hint="upgrade gguf, or start from the original F16/BF16 file",
        ) from None
    log.info("dequantized %s -> %s", src_path, dst_path)
    return dst_path


def _write_f16(reader, header, src_path: Path, tmp: Path, on_progress) -> None:
    """Copy the metadata and write every tensor as F16 (1-d ones as F32) into `tmp`."""
    from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize

    writer = GGUFWriter(tmp, header.architecture)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue  # the header's own counts; the writer adds the architecture itself
        vtype = GGUFValueType(field.types[0])
        if name == "general.file_type":
            writer.add_uint32(name, LLAMA_FTYPE_MOSTLY_F16)
            continue
        if name == "general.alignment":
            writer.data_alignment = int(field.contents())
        value = field.contents()
        if vtype == GGUFValueType.ARRAY:
            if not value:
                log.warning("dropping empty metadata array %s", name)
                continue
            writer.add_key_value(name, value, vtype, sub_type=GGUFValueType(field.types[-1]))
        else:
            writer.add_key_value(name, value, vtype)
    if "general.file_type" not in reader.fields:
        writer.add_uint32("general.file_type", LLAMA_FTYPE_MOSTLY_F16)

    plan = []
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # numpy order: outermost first
        out_dtype = np.float16 if len(t.shape) >= 2 else np.float32
        nbytes = int(np.prod(shape)) * np.dtype(out_dtype).itemsize
        writer.add_tensor_info(t.name, shape, np.dtype(out_dtype), nbytes)
        plan.append((t, shape, out_dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for i, (t, shape, out_dtype) in enumerate(plan):
        qtype = GGMLQuantizationType(t.tensor_type)
        values = dequantize(t.data, qtype).reshape(shape).astype(out_dtype, copy=False)
        if not np.all(np.isfinite(values)):
            raise QuantizeError(f"{src_path}: tensor {t.name} decodes to non-finite values")
        writer.write_tensor_data(values)
        if on_progress is not None:
            on_progress(i + 1, len(plan), t.name)
    writer.close()
