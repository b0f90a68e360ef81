"""The one place that talks to llama.cpp's low-level C API (through llama-cpp-python's ctypes).

Everything above this module speaks in ondevice's own types, so a binding upgrade touches this
file only. It is deliberately thin: load a model and a context, tokenize and detokenize, evaluate
batches, manage the KV cache, and build llama.cpp's native sampler chain. No logits are copied to
Python during generation; the per-token path is one `llama_sampler_sample`, one
`llama_token_to_piece` and one `llama_decode` on a batch that is built once and reused.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# llama.cpp's CPU backend runs each graph in an OpenMP parallel region; between regions
# libgomp's idle threads spin by default. On a laptop or phone that shares its cores with a UI
# (or on a busy machine), the spinning threads steal the cores the next token needs: with the
# demo model on 2 busy cores we measured 1.8 tok/s spinning vs 14 tok/s passive. Waiting
# passively costs one futex wake-up per graph (microseconds per token). It must be set before
# libgomp loads; a user's own OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import llama_cpp.llama_cpp as L  # noqa: E402
import numpy as np

from ondevice import fit
from ondevice.errors import GenerationError, ModelLoadError

log = logging.getLogger(__name__)
_native_log = logging.getLogger("ondevice.llama_cpp")

_init_lock = threading.Lock()
_initialized = False

# ggml type ids for the KV cache types we offer (ggml.h's enum ggml_type).
KV_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "bf16": 30}
# Block size and bytes per block of those types: one table, shared with the fit arithmetic.
KV_TYPE_SIZES = fit.KV_TYPE_SIZES
FLASH_ATTN = {
    "auto": L.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": L.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": L.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}

# Lines llama.cpp logged while loading, kept for diagnostics (`ondevice -vv`, error messages).
_recent_log: list[str] = []
_partial_line = ""


@L.llama_log_callback
def _on_native_log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    """Route llama.cpp's log to Python logging (debug level) instead of stderr."""
    global _partial_line
    _partial_line += text.decode("utf-8", errors="replace")
    while "\n" in _partial_line:
        line, _partial_line = _partial_line.split("\n", 1)
        if line.strip():
            _recent_log.append(line)
            del _recent_log[:-200]
            _native_log.debug("%s", line)


def init_backend() -> None:
    """Initialise llama.cpp once per process and take over its logging."""
    global _initialized
    with _init_lock:
        if _initialized:
            return
        L.llama_log_set(_on_native_log, ctypes.c_void_p(0))
        L.llama_backend_init()
        _initialized = True


def amx_compiled() -> bool:
    """Whether the installed llama.cpp was built with its AMX kernels (-march=native on an
    Intel Xeon with AMX).

    Those kernels are reached only through the "extra buffer types" (weight repacking), and on
    the Sapphire Rapids VMs we test on they die with SIGILL on the first matrix multiply (a
    `tilezero` in ggml_backend_amx_mul_mat), taking the process down. So on such builds we
    load with repacking off unless the caller insists (ONDEVICE_ALLOW_AMX=1).
    """
    init_backend()
    return has_amx_kernels(L.llama_print_system_info().decode(errors="replace"))


def has_amx_kernels(system_info: str) -> bool:
    """The AMX rule on llama.cpp's system-info line: only an x86 build compiled with AMX says
    `AMX_INT8 = 1`. ARM builds (NEON, dotprod, i8mm, SVE) never do, so they keep repacking,
    which is where their Q4_0/Q4_K speed comes from."""
    return "AMX_INT8 = 1" in system_info


def recent_native_log(n: int = 20) -> list[str]:
    return list(_recent_log[-n:])


@dataclass
class EngineConfig:
    """How to load a model and size its context; the defaults are llama-bench's."""

    n_ctx: int = 4096
    n_batch: int = 2048
    n_ubatch: int = 512
    threads: int = 4
    threads_batch: int = 4
    n_gpu_layers: int = 0
    main_gpu: int = 0
    flash_attn: str = "auto"
    use_mmap: bool = True
    use_extra_bufts: bool = True  # llama.cpp's weight repacking into CPU-friendly layouts
    type_k: str = "f16"
    type_v: str = "f16"
    offload_kqv: bool = True  # must stay on when offloading Phi-2 (llama.cpp issue #4437)
    # ggml device handles llama.cpp may use (ondevice.backends.engine_devices): [] = the CPU
    # only, None = llama.cpp's own choice (every GPU it finds).
    devices: list[int] | None = None


@dataclass
class SamplingParams:
    """Parameters of llama.cpp's sampler chain; temperature <= 0 means greedy."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None


class Sampler:
    """A native llama.cpp sampler chain; freed with the object."""

    def __init__(self, params: SamplingParams) -> None:
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        self._ptr = chain
        self.params = params
        add = L.llama_sampler_chain_add
        if params.repeat_penalty != 1.0:
            add(
                chain,
                L.llama_sampler_init_penalties(
                    params.repeat_last_n, params.repeat_penalty, 0.0, 0.0
                ),
            )
        if params.temperature <= 0:
            add(chain, L.llama_sampler_init_greedy())
        else:
            if params.top_k > 0:
                add(chain, L.llama_sampler_init_top_k(params.top_k))
            if params.top_p < 1.0:
                add(chain, L.llama_sampler_init_top_p(params.top_p, 1))
            if params.min_p > 0.0:
                add(chain, L.llama_sampler_init_min_p(params.min_p, 1))
            add(chain, L.llama_sampler_init_temp(params.temperature))
            seed = 0xFFFFFFFF if params.seed is None else params.seed & 0xFFFFFFFF
            add(chain, L.llama_sampler_init_dist(seed))

    def accept(self, tokens: Sequence[int]) -> None:
        """Feed tokens (the prompt's tail) to stateful samplers such as the repeat penalty."""
        if self.params.repeat_penalty == 1.0:
            return
        for tok in tokens[-self.params.repeat_last_n :]:
            L.llama_sampler_accept(self._ptr, tok)

    def close(self) -> None:
        if self._ptr:
            L.llama_sampler_free(self._ptr)
            self._ptr = None

    def __del__(self) -> None:
        self.close()


class Engine:
    """A loaded model with one context (one sequence, id 0). Not thread-safe by itself."""

    def __init__(
        self, path: str, config: EngineConfig, progress: Callable[[float], bool] | None = None
    ) -> None:
        init_backend()
        self.path = path
        self.config = config
        self.model = None
        self.ctx = None
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = config.n_gpu_layers
        mp.main_gpu = config.main_gpu
        if config.devices is not None:
            # A NULL-terminated array; kept on self because llama.cpp reads it during the load.
            self._devices = (ctypes.c_void_p * (len(config.devices) + 1))(*config.devices, None)
            mp.devices = ctypes.addressof(self._devices)
        mp.load_mode = L.LLAMA_LOAD_MODE_MMAP if config.use_mmap else L.LLAMA_LOAD_MODE_NONE
        self.notes: list[str] = []
        if (
            config.use_extra_bufts
            and amx_compiled()
            and os.environ.get("ONDEVICE_ALLOW_AMX") != "1"
        ):
            config.use_extra_bufts = False
            self.notes.append(
                "weight repacking off: this llama.cpp build has AMX kernels, which "
                "crash on this machine class (set ONDEVICE_ALLOW_AMX=1 to try)"
            )
            log.info(self.notes[-1])
        mp.use_extra_bufts = config.use_extra_bufts
        if progress is not None:
            # Kept on self: ctypes callbacks must outlive the call that uses them.
            self._progress_cb = L.llama_progress_callback(
                lambda value, _user: bool(progress(float(value)))
            )
            mp.progress_callback = self._progress_cb
        del _recent_log[:]
        self.model = L.llama_model_load_from_file(path.encode(), mp)
        if not self.model:
            raise ModelLoadError(f"llama.cpp could not load {path}: {_last_error()}")
        # What the load did (e.g. "offloaded 31/31 layers to GPU"), before the context's lines.
        self.load_log = recent_native_log(40)
        self.vocab = L.llama_model_get_vocab(self.model)
        cp = L.llama_context_default_params()
        cp.n_ctx = config.n_ctx
        cp.n_batch = config.n_batch
        cp.n_ubatch = config.n_ubatch
        cp.n_threads = config.threads
        cp.n_threads_batch = config.threads_batch
        cp.flash_attn_type = FLASH_ATTN[config.flash_attn]
        cp.type_k = KV_TYPES[config.type_k]
        cp.type_v = KV_TYPES[config.type_v]
        cp.offload_kqv = config.offload_kqv
        cp.no_perf = True
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            self.close()
            raise ModelLoadError(
                f"llama.cpp could not create a context for {path} "
                f"(n_ctx={config.n_ctx}): {_last_error()}"
            )
        self.memory = L.llama_get_memory(self.ctx)
        self.n_ctx = L.llama_n_ctx(self.ctx)
        self.n_batch = L.llama_n_batch(self.ctx)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.add_bos = bool(L.llama_vocab_get_add_bos(self.vocab))
        self._piece = ctypes.create_string_buffer(256)
        self._one = (L.llama_token * 1)()
        # Built once: llama_batch_get_one only points at self._one, so the per-token decode
        # changes one int and calls llama_decode.
        self._batch_one = L.llama_batch_get_one(self._one, 1)

    # --- facts about the model -------------------------------------------------------
    @property
    def model_bytes(self) -> int:
        return int(L.llama_model_size(self.model))

    @property
    def n_params(self) -> int:
        return int(L.llama_model_n_params(self.model))

    def kv_bytes(self, key_length: int | None = None, value_length: int | None = None) -> int:
        """Bytes of the KV cache allocated for the whole context (all layers, K and V)."""
        n_layer = L.llama_model_n_layer(self.model)
        n_head = L.llama_model_n_head(self.model)
        n_head_kv = L.llama_model_n_head_kv(self.model)
        n_embd = L.llama_model_n_embd(self.model)
        k_len = key_length or n_embd // max(n_head, 1)
        v_len = value_length or k_len

        def row(type_name: str, n: int) -> int:
            block, size = KV_TYPE_SIZES[type_name]
            return n // block * size

        per_token = row(self.config.type_k, k_len * n_head_kv) + row(
            self.config.type_v, v_len * n_head_kv
        )
        return self.n_ctx * n_layer * per_token

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = L.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace") if n >= 0 else None

    def set_threads(self, threads: int, threads_batch: int | None = None) -> None:
        L.llama_set_n_threads(self.ctx, threads, threads_batch or threads)

    def describe(self) -> str:
        """llama.cpp's one-line model description, e.g. "llama 135M Q4_1" (llama-bench's)."""
        buf = ctypes.create_string_buffer(256)
        L.llama_model_desc(self.model, buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    def synchronize(self) -> None:
        """Wait until the backend has finished the evaluations queued so far (benchmarks)."""
        L.llama_synchronize(self.ctx)

    # --- text <-> tokens ------------------------------------------------------------------
    def tokenize(
        self, text: str | bytes, *, add_special: bool = True, parse_special: bool = True
    ) -> list[int]:
        data = text.encode("utf-8") if isinstance(text, str) else text
        n_max = len(data) + 16
        buf = (L.llama_token * n_max)()
        n = L.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:
            n_max = -n
            buf = (L.llama_token * n_max)()
            n = L.llama_tokenize(
                self.vocab, data, len(data), buf, n_max, add_special, parse_special
            )
        if n < 0:
            raise GenerationError(f"tokenization failed ({n})")
        return list(buf[:n])

    def piece(self, token: int, special: bool = False) -> bytes:
        """The bytes of one token (may be part of a UTF-8 character)."""
        n = L.llama_token_to_piece(self.vocab, token, self._piece, 256, 0, special)
        if n < 0:  # longer than the buffer: rare, allocate
            buf = ctypes.create_string_buffer(-n)
            n = L.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
            return ctypes.string_at(buf, n)
        return ctypes.string_at(self._piece, n)

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> str:
        return b"".join(self.piece(t, special) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(L.llama_vocab_is_eog(self.vocab, token))

    @property
    def bos(self) -> int:
        return L.llama_vocab_bos(self.vocab)

    @property
    def eos(self) -> int:
        return L.llama_vocab_eos(self.vocab)

    # --- evaluation -----------------------------------------------------------------------
    def decode(self, tokens: Sequence[int], should_stop: Callable[[], bool] | None = None) -> bool:
        """Evaluate tokens after what's already in the KV cache, n_batch at a time.

        Only the last token's logits are computed. Returns False if `should_stop` said so
        between batches (the tokens evaluated so far stay in the cache).
        """
        for i in range(0, len(tokens), self.n_batch):
            if should_stop is not None and i and should_stop():
                return False
            chunk = tokens[i : i + self.n_batch]
            arr = (L.llama_token * len(chunk))(*chunk)
            rc = L.llama_decode(self.ctx, L.llama_batch_get_one(arr, len(chunk)))
            if rc != 0:
                raise GenerationError(
                    f"llama_decode failed with code {rc} "
                    f"({'context full' if rc == 1 else 'see -vv log'})"
                )
        return True

    def decode_one(self, token: int) -> None:
        """Evaluate one token (the generation step)."""
        self._one[0] = token
        rc = L.llama_decode(self.ctx, self._batch_one)
        if rc != 0:
            raise GenerationError(f"llama_decode failed with code {rc}")

    def decode_all_logits(self, tokens: Sequence[int], pos0: int = 0) -> np.ndarray:
        """Evaluate tokens at positions pos0.. and return every position's logits (copied).

        For quality measurements (perplexity, KL divergence), not for generation.
        """
        n = len(tokens)
        out = np.empty((n, self.n_vocab), dtype=np.float32)
        step = self.n_batch
        for start in range(0, n, step):
            chunk = tokens[start : start + step]
            batch = L.llama_batch_init(len(chunk), 0, 1)
            try:
                for j, tok in enumerate(chunk):
                    batch.token[j] = tok
                    batch.pos[j] = pos0 + start + j
                    batch.n_seq_id[j] = 1
                    batch.seq_id[j][0] = 0
                    batch.logits[j] = 1
                batch.n_tokens = len(chunk)
                rc = L.llama_decode(self.ctx, batch)
                if rc != 0:
                    raise GenerationError(f"llama_decode failed with code {rc}")
                ptr = L.llama_get_logits(self.ctx)
                out[start : start + len(chunk)] = np.ctypeslib.as_array(
                    ptr, shape=(len(chunk), self.n_vocab)
                )
            finally:
                L.llama_batch_free(batch)
        return out

    def logits_last(self) -> np.ndarray:
        """Logits of the last evaluated token (a copy)."""
        ptr = L.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def sample(self, sampler: Sampler) -> int:
        return L.llama_sampler_sample(sampler._ptr, self.ctx, -1)

    # --- KV cache -------------------------------------------------------------------------
    def kv_keep(self, n_tokens: int) -> bool:
        """Drop every cached position from n_tokens on; False if the cache can't do that."""
        return bool(L.llama_memory_seq_rm(self.memory, 0, n_tokens, -1))

    def kv_clear(self) -> None:
        L.llama_memory_clear(self.memory, True)

    def kv_used(self) -> int:
        """Positions in the KV cache for sequence 0 (0 when empty)."""
        return int(L.llama_memory_seq_pos_max(self.memory, 0)) + 1

    # --- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        if getattr(self, "ctx", None):
            L.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            L.llama_model_free(self.model)
            self.model = None

    def __del__(self) -> None:
        self.close()


def _last_error() -> str:
    """The most telling recent llama.cpp log line, for an error message."""
    # "llama_model_load: error loading model: check_tensor_dims: tensor 'x' not found" says
    # what is wrong; the "failed to load model" line after it does not.
    for line in reversed(_recent_log):
        if "error loading model: " in line:
            return line.split("error loading model: ", 1)[1].strip()
    for line in reversed(_recent_log):
        low = line.lower()
        if "error" in low or "failed" in low or "unknown" in low:
            return line.strip()
    return "no detail from llama.cpp (run with -vv for its log)"
