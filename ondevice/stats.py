"""Measured numbers: the `Stats` every reply carries, and the process memory readings behind them.

Nothing here is estimated: speeds come from `time.perf_counter()` stamps taken around the real
work in the runtime, and memory from the operating system (psutil's RSS; the kernel's RSS
high-water mark for the peak).
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil

_PROC = psutil.Process()


def rss_bytes() -> int:
    """Resident set size of this process now (psutil), file-backed pages included."""
    return _PROC.memory_info().rss


def memory_breakdown() -> dict[str, int]:
    """RSS split into anonymous and file-backed memory where the OS tells (Linux), in bytes.

    With mmap, model weights show up as file-backed pages the kernel can drop and re-read;
    repacked weights, the KV cache and compute buffers are anonymous memory.
    """
    out = {"rss_bytes": rss_bytes()}
    try:
        with open(f"/proc/{os.getpid()}/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssFile", "RssShmem", "VmHWM"):
                    out[_STATUS_NAMES[key]] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


_STATUS_NAMES = {
    "RssAnon": "anon_bytes",
    "RssFile": "file_bytes",
    "RssShmem": "shmem_bytes",
    "VmHWM": "peak_rss_bytes",
}


def peak_rss_bytes() -> int:
    """The process's peak RSS (high-water mark) since it started or since `reset_peak_rss()`.

    Linux reads VmHWM (resettable); macOS and others fall back to getrusage's ru_maxrss,
    which covers the whole life of the process. Never less than the current RSS.
    """
    now = rss_bytes()
    try:
        with open(f"/proc/{os.getpid()}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return max(now, int(line.split()[1]) * 1024)
    except OSError:
        pass
    info = _PROC.memory_info()
    if hasattr(info, "peak_wset"):  # Windows
        return max(now, int(info.peak_wset))
    try:
        import resource  # POSIX only: absent on Windows, where peak_wset answered above
    except ImportError:
        return now
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return max(now, maxrss * scale)


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux only); True if it was reset.

    Writing "5" to /proc/self/clear_refs resets VmHWM, so the next `peak_rss_bytes()` covers
    only what happened since. Elsewhere the peak stays the whole-process peak.
    """
    try:
        with open(f"/proc/{os.getpid()}/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


@dataclass
class Stats:
    """What one generation cost, measured. Every field is also the key in `--json` output.

    Token counts:
      prompt_tokens       tokens in the prompt (after the chat template, BOS included).
      prompt_eval_tokens  prompt tokens actually evaluated: fewer than prompt_tokens when a
                          prefix was still in the KV cache from the previous call.
      completion_tokens   tokens generated (the one that ended generation is counted if it
                          was sampled: an end-of-generation token or a token completing a stop
                          string; stop strings themselves are not returned as text).
    Speeds (tokens per second, from perf_counter stamps):
      prompt_tps          prompt_eval_tokens / time of the prompt evaluation (llama_decode
                          calls only). 0 when nothing had to be evaluated.
      generation_tps      completion tokens after the first / time from the first token to the
                          last (sampling, decoding, detokenization and stop checks included):
                          the end-to-end streaming rate a user sees.
      ttft_s              seconds from the call to the first token's text being ready
                          (tokenization, template, prompt evaluation and first sample).
      load_s              seconds it took to load the model (validation, mmap/read, context).
      total_s             seconds of the whole call.
    Memory (bytes, from the OS at the end of the call):
      rss_bytes           resident set size of the process now.
      peak_rss_bytes      the process's peak RSS since the model was loaded (Linux: VmHWM,
                          reset at load; elsewhere the process's lifetime peak).
      model_bytes         bytes of tensor data in the model (what llama.cpp loads).
      kv_bytes            bytes of the KV cache allocated for the whole context.
    Where and how:
      backend             the device that ran the model ("CPU", or a GPU's name).
      threads             threads used for generation.
      finish_reason       "stop" (end-of-generation token or stop string), "length"
                          (max_tokens or the context ran out) or "cancelled".
    Constrained generation (grammar=, json_schema=, response_format=):
      constraint          "", "grammar", "json_schema" or "json_object".
      grammar_compile_s   seconds to turn the schema into a grammar (0 when cached).
      grammar_resamples   tokens the chain chose that the grammar refused, so the chain chose
                          again among the allowed ones (the cost of the constraint).
    Speculative decoding (speculative="auto"/"lookup", or "draft" with a draft model):
      drafted_tokens      tokens drafted (by prompt lookup or the draft model) and verified
                          in batched decodes.
      accepted_tokens     of those, the ones the model's own sampling agreed with (each saved
                          one decode); `acceptance` is their ratio.
    """

    prompt_tokens: int = 0
    prompt_eval_tokens: int = 0
    completion_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    ttft_s: float = 0.0
    load_s: float = 0.0
    total_s: float = 0.0
    rss_bytes: int = 0
    peak_rss_bytes: int = 0
    model_bytes: int = 0
    kv_bytes: int = 0
    backend: str = "CPU"
    threads: int = 0
    n_ctx: int = 0
    finish_reason: str = "stop"
    constraint: str = ""
    grammar_compile_s: float = 0.0
    grammar_resamples: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0

    @property
    def acceptance(self) -> float:
        """Accepted / drafted tokens of speculative decoding (0 when nothing was drafted)."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    # Extra, structured notes (a GPU fallback warning, a dropped chat turn...).
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["acceptance"] = self.acceptance
        return out

    def summary(self) -> str:
        """One line for humans: tokens, speeds, time to first token, memory."""
        mib = 1024 * 1024
        return (
            f"{self.completion_tokens} tokens · prompt {self.prompt_eval_tokens}/"
            f"{self.prompt_tokens} at {self.prompt_tps:.1f} tok/s · generation "
            f"{self.generation_tps:.1f} tok/s · TTFT {self.ttft_s * 1000:.0f} ms · "
            f"RSS {self.rss_bytes / mib:.0f} MiB (peak {self.peak_rss_bytes / mib:.0f} MiB)"
        )
