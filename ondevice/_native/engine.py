"""A loaded llama.cpp model with one context: tokenize and detokenize, evaluate batches, manage the
KV cache, and build llama.cpp's native sampler chains.

Deliberately thin: no policy (which settings to use is decided above, in ondevice.policy and the
loader) and no bookkeeping of what the cache holds (ondevice.runtime.Model owns that). No logits
are copied to Python during generation: the per-token path is one `llama_sampler_sample`, one
`llama_token_to_piece` and one `llama_decode` on a batch that is built once and reused.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ondevice._native import log as native_log
from ondevice._native.binding import llama
from ondevice.errors import GenerationError, LoadCancelled, ModelLoadError, UsageError
from ondevice.settings import DEFAULT_N_BATCH, DEFAULT_N_UBATCH, KV_TYPES, SamplingParams

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    """How to load a model and size its context (the defaults are llama-bench's)."""

    n_ctx: int = 4096
    n_batch: int = DEFAULT_N_BATCH
    n_ubatch: int = DEFAULT_N_UBATCH
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
    n_seq_max: int = 1  # sequences the context holds at once (the server's parallel slots)


def _flash_attn_type(L, name: str) -> int:
    return {
        "auto": L.LLAMA_FLASH_ATTN_TYPE_AUTO,
        "on": L.LLAMA_FLASH_ATTN_TYPE_ENABLED,
        "off": L.LLAMA_FLASH_ATTN_TYPE_DISABLED,
    }[name]


class Sampler:
    """A native llama.cpp sampler chain for one sequence; freed with the object.

    Greedy at temperature <= 0; else top-k, top-p, min-p, temperature and a seeded draw, with
    the repeat penalty first when it is not 1.0."""

    def __init__(self, params: SamplingParams, n_vocab: int) -> None:
        L = llama()
        self._L = L
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        self._ptr = chain
        self.params = params
        add = L.llama_sampler_chain_add
        if params.repeat_penalty != 1.0:
            # llama.cpp 0.3.36's signature: (n_vocab, last_n, repeat, freq, present).
            penalties = L.llama_sampler_init_penalties(
                n_vocab, params.repeat_last_n, params.repeat_penalty, 0.0, 0.0
            )
            add(chain, penalties)
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
            self._L.llama_sampler_accept(self._ptr, tok)

    def close(self) -> None:
        if self._ptr:
            self._L.llama_sampler_free(self._ptr)
            self._ptr = None

    def __del__(self) -> None:
        self.close()


class Batch:
    """A reusable llama_batch: up to `capacity` tokens, each in one sequence, each with or
    without its logits. Filled with `add()`, evaluated by `Engine.decode_batch()`; the index
    of a token in the batch is where its logits are (`Engine.sample(sampler, index)`)."""

    def __init__(self, capacity: int) -> None:
        L = llama()
        self._L = L
        self.capacity = capacity
        self._b = L.llama_batch_init(capacity, 0, 1)
        self._token = np.ctypeslib.as_array(self._b.token, shape=(capacity,))
        self._pos = np.ctypeslib.as_array(self._b.pos, shape=(capacity,))
        self._n_seq = np.ctypeslib.as_array(self._b.n_seq_id, shape=(capacity,))
        self._logits = np.ctypeslib.as_array(self._b.logits, shape=(capacity,))
        self._seq = [self._b.seq_id[i] for i in range(capacity)]
        self._n_seq[:] = 1
        self.n = 0

    def clear(self) -> None:
        self.n = 0

    def add(self, token: int, pos: int, seq: int, logits: bool) -> int:
        """Append one token; returns its index in the batch."""
        i = self.n
        if i >= self.capacity:
            raise GenerationError(f"a batch holds at most {self.capacity} tokens")
        self._token[i] = token
        self._pos[i] = pos
        self._seq[i][0] = seq
        self._logits[i] = 1 if logits else 0
        self.n = i + 1
        return i

    def free(self) -> None:
        if getattr(self, "_b", None) is not None:
            self._L.llama_batch_free(self._b)
            self._b = None

    def __del__(self) -> None:
        try:
            self.free()
        except Exception:  # noqa: BLE001 - interpreter shutdown: the binding is gone
            pass


class Engine:
    """A loaded model with one context. Not thread-safe by itself (Model serializes it)."""

    def __init__(
        self, path: str, config: EngineConfig, progress: Callable[[float], bool] | None = None
    ) -> None:
        L = llama()
        self._L = L
        self.path = path
        self.config = config
        self.model = None
        self.ctx = None
        native_log.clear()
        try:
            with native_log.interrupts_deferred():  # Ctrl-C can't vanish inside a callback
                self._load_model(L, path, config, progress)
                if not native_log.interrupt_pending():  # else: KeyboardInterrupt at the end
                    # What the load did ("offloaded 31/31 layers to GPU"), before the context's.
                    self.load_log = native_log.recent(60)
                    self.vocab = L.llama_model_get_vocab(self.model)
                    self._create_context(L, path, config)
        except BaseException:
            self.close()
            raise
        self.memory = L.llama_get_memory(self.ctx)
        self.n_seq_max = L.llama_n_seq_max(self.ctx)
        # Positions one sequence can hold (the whole context, or its share of it when the
        # context holds several sequences).
        self.n_ctx = L.llama_n_ctx_seq(self.ctx) if self.n_seq_max > 1 else L.llama_n_ctx(self.ctx)
        self.n_batch = L.llama_n_batch(self.ctx)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.add_bos = bool(L.llama_vocab_get_add_bos(self.vocab))
        self._piece = ctypes.create_string_buffer(256)
        self._one = (L.llama_token * 1)()
        # Built once: llama_batch_get_one only points at self._one, so the per-token decode
        # changes one int and calls llama_decode.
        self._batch_one = L.llama_batch_get_one(self._one, 1)
        self._decode = L.llama_decode
        self._to_piece = L.llama_token_to_piece
        self._sample = L.llama_sampler_sample
        self._is_eog = L.llama_vocab_is_eog

    def _load_model(self, L, path: str, config: EngineConfig, progress) -> None:
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = config.n_gpu_layers
        mp.main_gpu = config.main_gpu
        if config.devices is not None:
            # A NULL-terminated array; kept on self because llama.cpp reads it during the load.
            self._devices = (ctypes.c_void_p * (len(config.devices) + 1))(*config.devices, None)
            mp.devices = ctypes.addressof(self._devices)
        mp.load_mode = L.LLAMA_LOAD_MODE_MMAP if config.use_mmap else L.LLAMA_LOAD_MODE_NONE
        mp.use_extra_bufts = config.use_extra_bufts
        cancelled: list[bool] = []

        def on_progress(value: float, _user: ctypes.c_void_p) -> bool:
            # Runs inside llama.cpp: an exception here would be swallowed by ctypes.
            try:
                if native_log.interrupt_pending():
                    return False
                go_on = True if progress is None else bool(progress(float(value)))
                if not go_on:
                    cancelled.append(True)
                return go_on
            except BaseException:  # noqa: BLE001 - Ctrl-C: stop the load, re-raised below
                native_log.note_interrupt()
                return False

        # Kept on self: ctypes callbacks must outlive the call that uses them.
        self._progress_cb = L.llama_progress_callback(on_progress)
        mp.progress_callback = self._progress_cb
        self.model = L.llama_model_load_from_file(path.encode(), mp)
        if native_log.interrupt_pending():
            return  # interrupts_deferred raises KeyboardInterrupt
        if not self.model:
            if cancelled:
                raise LoadCancelled(f"loading {path} was cancelled")
            raise ModelLoadError(f"llama.cpp could not load {path}: {native_log.last_error()}")

    def _create_context(self, L, path: str, config: EngineConfig) -> None:
        cp = L.llama_context_default_params()
        cp.n_ctx = config.n_ctx
        cp.n_batch = config.n_batch
        cp.n_ubatch = config.n_ubatch
        cp.n_seq_max = config.n_seq_max
        cp.n_threads = config.threads
        cp.n_threads_batch = config.threads_batch
        cp.flash_attn_type = _flash_attn_type(L, config.flash_attn)
        cp.type_k = KV_TYPES[config.type_k].ggml_type
        cp.type_v = KV_TYPES[config.type_v].ggml_type
        cp.offload_kqv = config.offload_kqv
        cp.no_perf = True
        self.ctx = L.llama_init_from_model(self.model, cp)
        if native_log.interrupt_pending():
            return  # interrupts_deferred raises KeyboardInterrupt
        if not self.ctx:
            self.close()
            raise ModelLoadError(
                f"llama.cpp could not create a context for {path} "
                f"(n_ctx={config.n_ctx}): {native_log.last_error()}"
            )

    # --- facts about the model -------------------------------------------------------
    @property
    def model_bytes(self) -> int:
        return int(self._L.llama_model_size(self.model))

    @property
    def n_params(self) -> int:
        return int(self._L.llama_model_n_params(self.model))

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = self._L.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace") if n >= 0 else None

    def set_threads(self, threads: int, threads_batch: int | None = None) -> None:
        self._L.llama_set_n_threads(self.ctx, threads, threads_batch or threads)

    def describe(self) -> str:
        """llama.cpp's one-line model description, e.g. "llama 135M Q4_1" (llama-bench's)."""
        buf = ctypes.create_string_buffer(256)
        self._L.llama_model_desc(self.model, buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    def synchronize(self) -> None:
        """Wait until the backend has finished the evaluations queued so far (benchmarks)."""
        self._L.llama_synchronize(self.ctx)

    # --- text <-> tokens ------------------------------------------------------------------
    def tokenize(
        self, text: str | bytes, *, add_special: bool = True, parse_special: bool = True
    ) -> list[int]:
        L = self._L
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

    def check_tokens(self, tokens: Sequence[int]) -> None:
        """Refuse ids llama.cpp would index its vocabulary with unchecked (an abort)."""
        n = self.n_vocab
        for t in tokens:
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < n:
                raise UsageError(
                    f"token id {t!r} is not in this model's vocabulary (0..{n - 1})",
                    hint="pass ids the model's own tokenizer produced",
                )

    def piece(self, token: int, special: bool = False) -> bytes:
        """The bytes of one token (may be part of a UTF-8 character). `token` must be valid."""
        n = self._to_piece(self.vocab, token, self._piece, 256, 0, special)
        if n < 0:  # longer than the buffer: rare, allocate
            buf = ctypes.create_string_buffer(-n)
            n = self._to_piece(self.vocab, token, buf, -n, 0, special)
            return ctypes.string_at(buf, n)
        return ctypes.string_at(self._piece, n)

    def piece_copy(self, token: int, special: bool = False) -> bytes:
        """`piece()` with a buffer of its own: safe beside a generation on another thread
        (which uses the shared one)."""
        buf = ctypes.create_string_buffer(256)
        n = self._to_piece(self.vocab, token, buf, 256, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._to_piece(self.vocab, token, buf, -n, 0, special)
        return ctypes.string_at(buf, n)

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> str:
        """Text of token ids (range-checked); safe beside a generation on another thread."""
        self.check_tokens(tokens)
        return b"".join(self.piece_copy(t, special) for t in tokens).decode(
            "utf-8", errors="replace"
        )

    def is_eog(self, token: int) -> bool:
        return bool(self._is_eog(self.vocab, token))

    @property
    def bos(self) -> int:
        return self._L.llama_vocab_bos(self.vocab)

    @property
    def eos(self) -> int:
        return self._L.llama_vocab_eos(self.vocab)

    # --- evaluation -----------------------------------------------------------------------
    def decode(self, tokens: Sequence[int], should_stop: Callable[[], bool] | None = None) -> bool:
        """Evaluate tokens after what's already in the KV cache, n_batch at a time.

        Only the last token's logits are computed. Returns False if `should_stop` said so
        between batches (the tokens evaluated so far stay in the cache).
        """
        L = self._L
        for i in range(0, len(tokens), self.n_batch):
            if should_stop is not None and i and should_stop():
                return False
            chunk = tokens[i : i + self.n_batch]
            arr = (L.llama_token * len(chunk))(*chunk)
            rc = self._decode(self.ctx, L.llama_batch_get_one(arr, len(chunk)))
            if rc != 0:
                raise GenerationError(
                    f"llama_decode failed with code {rc} "
                    f"({'context full' if rc == 1 else 'see -vv log'})"
                )
        return True

    def decode_one(self, token: int) -> None:
        """Evaluate one token (the generation step)."""
        self._one[0] = token
        rc = self._decode(self.ctx, self._batch_one)
        if rc != 0:
            raise GenerationError(f"llama_decode failed with code {rc}")

    def decode_all_logits(self, tokens: Sequence[int], pos0: int = 0) -> np.ndarray:
        """Evaluate tokens at positions pos0.. and return every position's logits (copied).

        For quality measurements (perplexity, KL divergence), not for generation.
        """
        L = self._L
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
                rc = self._decode(self.ctx, batch)
                if rc != 0:
                    raise GenerationError(f"llama_decode failed with code {rc}")
                ptr = L.llama_get_logits(self.ctx)
                out[start : start + len(chunk)] = np.ctypeslib.as_array(
                    ptr, shape=(len(chunk), self.n_vocab)
                )
            finally:
                L.llama_batch_free(batch)
        return out

    def decode_batch(self, batch: Batch) -> None:
        """Evaluate a Batch (several sequences, several positions each) in one llama_decode."""
        if batch.n == 0:
            return
        batch._b.n_tokens = batch.n
        rc = self._decode(self.ctx, batch._b)
        if rc != 0:
            raise GenerationError(
                f"llama_decode failed with code {rc} "
                f"({'no room in the KV cache' if rc == 1 else 'see -vv log'})"
            )

    def logits_at(self, index: int) -> np.ndarray:
        """The logits of batch position `index` of the last decode (a view, valid until the
        next decode)."""
        ptr = self._L.llama_get_logits_ith(self.ctx, index)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def top(self, index: int = -1) -> tuple[int, float]:
        """The most likely next token at batch position `index` of the last decode, and its
        probability (softmax of the logits, read in place: nothing is copied out). For a
        draft model, which proposes its greedy choice and stops when it is unsure."""
        logits = self.logits_at(index)
        best = int(logits.argmax())
        return best, 1.0 / float(np.exp(logits - logits[best]).sum())

    def logits_last(self) -> np.ndarray:
        """Logits of the last evaluated token (a copy)."""
        ptr = self._L.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def sample(self, sampler: Sampler, index: int = -1) -> int:
        return self._sample(sampler._ptr, self.ctx, index)

    # --- KV cache -------------------------------------------------------------------------
    def kv_keep(self, n_tokens: int, seq: int = 0) -> bool:
        """Drop every cached position from n_tokens on; False if the cache can't do that."""
        return bool(self._L.llama_memory_seq_rm(self.memory, seq, n_tokens, -1))

    def kv_clear(self) -> None:
        self._L.llama_memory_clear(self.memory, True)

    def kv_drop(self, seq: int) -> None:
        """Forget everything sequence `seq` holds."""
        self._L.llama_memory_seq_rm(self.memory, seq, -1, -1)

    def kv_used(self, seq: int = 0) -> int:
        """Positions in the KV cache for a sequence (0 when empty)."""
        return int(self._L.llama_memory_seq_pos_max(self.memory, seq)) + 1

    # --- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        L = getattr(self, "_L", None)
        if L is None:
            return
        if getattr(self, "ctx", None):
            L.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            L.llama_model_free(self.model)
            self.model = None

    def __del__(self) -> None:
        self.close()
