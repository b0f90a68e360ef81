"""The Python half of scripts/gpu-vulkan-check.sh: checks of ondevice's Vulkan backend on a real
GPU (a device with a Vulkan driver), each printing one JSON line.

    python scripts/gpu_vulkan_check.py devices [--vendor NVIDIA]
    python scripts/gpu_vulkan_check.py tiny DIR            # random Phi-2 checkpoints, f32 + f16
    python scripts/gpu_vulkan_check.py agree MODEL.gguf [--hf DIR] [--threads N]
    python scripts/gpu_vulkan_check.py table BENCH.jsonl    # `ondevice bench --save` records

`devices` exits 1 unless a hardware (non-lavapipe) Vulkan device of that vendor is there and
backend="auto" picks it. `tiny` builds a small random PhiForCausalLM (head dimension 80 like
Phi-2's) with tests/phi2_fixtures.py and converts it with `ondevice convert` to f32 and f16
GGUF. `agree` loads MODEL on backend="vulkan" and on backend="cpu", compares every position's
logits on a fixed prompt (max |diff|, KL, top-1, top-5) next to the yardstick that
tests/test_vulkan.py uses (two correct CPU kernels: flash attention off vs on; reported, while the
bounds are absolute: mean KL <= 0.05 nats, top-1 >= 0.8, top-5 overlap >= 0.8), checks that
the model reports the GPU and a full offload, and generates a few greedy tokens on each; with
--hf it also compares with transformers' logits for the checkpoint folder (f32 only).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
PROMPT = (
    "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy "
    "is Rome. Water boils at one hundred degrees Celsius at sea level, and"
)
N_CTX = 256
MAX_MEAN_KL = 0.05  # nats, per position
MIN_TOP1 = 0.8
# A Phi-2 in miniature: head dimension 80 and rotary on 32 of its dims, as in Phi-2.
TINY = {
    "hidden_size": 320,
    "num_attention_heads": 4,
    "intermediate_size": 1280,
    "num_hidden_layers": 4,
    "vocab_size": 512,
    "max_position_embeddings": 512,
}


def emit(kind: str, **data: object) -> None:
    print(json.dumps({"check": kind, **data}, default=str), flush=True)


def agreement(ref: np.ndarray, other: np.ndarray, k: int = 5) -> dict[str, float]:
    """ondevice.logits.agreement (as tests/test_vulkan.py), plus the last position and finiteness."""
    from ondevice import logits

    out = logits.agreement(ref, other, k)
    out["positions"] = len(ref)
    out["last_pos_max_abs_diff"] = float(np.abs(ref[-1] - other[-1]).max())
    out["last_pos_kl"] = float(logits.kl_per_position(ref[-1:], other[-1:])[0])
    out["finite"] = bool(np.isfinite(other).all())
    return out


def all_logits(model, tokens: list[int]) -> np.ndarray:
    return model.score(tokens)


def cmd_devices(args: argparse.Namespace) -> int:
    from ondevice import backends

    p = backends.probe()
    emit(
        "devices",
        compiled=p.compiled,
        registered=p.registered,
        devices=[d.to_dict() for d in p.devices],
    )
    auto = backends.choose("auto")
    vk = backends.choose("vulkan", fallback=False)
    found = [
        d
        for d in p.devices
        if d.family == "vulkan"
        and (args.allow_software or not d.software)
        and args.vendor.lower() in d.description.lower()
    ]
    # auto never picks a software device (lavapipe): with --allow-software only `vulkan` must
    ok = bool(found) and vk.device_index == found[0].index
    if not args.allow_software:
        ok = ok and auto.on_gpu and auto.backend == "vulkan" and auto.device_index == found[0].index
    emit("placement", auto=auto.device, auto_layers=auto.n_gpu_layers, vulkan=vk.device, ok=ok)
    return 0 if ok else 1


def cmd_tiny(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(REPO / "tests"))
    from phi2_fixtures import build_tiny_phi2

    out = Path(args.dir)
    t0 = time.perf_counter()
    ckpt = build_tiny_phi2(out / "hf", **TINY)
    n_params = sum(p.numel() for p in ckpt.model.parameters())
    for outtype in ("f32", "f16"):
        dst = out / f"tiny-{outtype}.gguf"
        cmd = [sys.executable, "-m", "ondevice", "convert", str(ckpt.path), "-o", str(dst)]
        subprocess.run([*cmd, "--outtype", outtype, "--force"], check=True)
    emit("tiny", params=n_params, config=TINY, seconds=round(time.perf_counter() - t0, 1))
    return 0


def hf_logits(folder: Path, tokens: list[int]) -> np.ndarray:
    import torch
    from transformers import PhiForCausalLM

    model = PhiForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float().numpy()


def cmd_agree(args: argparse.Namespace) -> int:
    import ondevice

    path = Path(args.model)
    kw = {"n_ctx": N_CTX, "threads": args.threads}
    failures: list[str] = []
    t0 = time.perf_counter()
    with ondevice.load(path, backend="vulkan", no_fallback=True, **kw) as vk_model:
        n_layer = int(vk_model.header.arch_value("block_count"))
        offloaded = vk_model.offloaded
        placement = vk_model.placement
        tokens = vk_model.tokenize(PROMPT)
        vk = all_logits(vk_model, tokens)
        vk_gen = vk_model.generate(PROMPT, max_tokens=args.gen, temperature=0)
        vk_info = {
            "load_s": round(vk_model.load_s, 2),
            "backend": vk_model.backend,
            "placement": {"backend": placement.backend, "n_gpu_layers": placement.n_gpu_layers},
            "offloaded": offloaded,
            "settings": vk_model.settings,
            "notes": vk_model.notes,
            "stats_backend": vk_gen.stats.backend,
            "prompt_tps": round(vk_gen.stats.prompt_tps, 1),
            "generation_tps": round(vk_gen.stats.generation_tps, 1),
            "peak_rss_mib": round(vk_gen.stats.peak_rss_bytes / 2**20),
            "text": vk_gen.text,
        }
    if offloaded != (n_layer + 1, n_layer + 1):
        failures.append(f"offloaded {offloaded}, want {(n_layer + 1, n_layer + 1)}")
    if placement.backend != "vulkan" or placement.n_gpu_layers != -1:
        failures.append(f"placement {placement}")
    if args.vendor.lower() not in vk_info["stats_backend"].lower():
        failures.append(f"Stats.backend {vk_info['stats_backend']!r} names no {args.vendor}")
    if f"{n_layer + 1}/{n_layer + 1} layers offloaded" not in vk_info["stats_backend"]:
        failures.append("Stats.backend does not say the whole model is offloaded")

    with ondevice.load(path, backend="cpu", **kw) as cpu_model:
        if cpu_model.tokenize(PROMPT) != tokens:
            failures.append("CPU and Vulkan tokenize the prompt differently")
        cpu = all_logits(cpu_model, tokens)
        cpu_gen = cpu_model.generate(PROMPT, max_tokens=args.gen, temperature=0)
        cpu_info = {
            "backend": cpu_model.backend,
            "settings": cpu_model.settings,
            "prompt_tps": round(cpu_gen.stats.prompt_tps, 1),
            "generation_tps": round(cpu_gen.stats.generation_tps, 1),
            "peak_rss_mib": round(cpu_gen.stats.peak_rss_bytes / 2**20),
            "text": cpu_gen.text,
        }
    # The yardstick: two correct CPU kernels for the same model (flash attention off vs on).
    with ondevice.load(path, backend="cpu", flash_attn="off", **kw) as a:
        fa_off = all_logits(a, tokens)
    with ondevice.load(path, backend="cpu", flash_attn="on", **kw) as b:
        fa_on = all_logits(b, tokens)
    floor = agreement(fa_off, fa_on)
    stats = agreement(cpu, vk)
    result = {
        "model": path.name,
        "prompt_tokens": len(tokens),
        "cpu_vs_vulkan": stats,
        "cpu_fa_off_vs_on": floor,
        "kl_ratio_to_floor": stats["mean_kl"] / floor["mean_kl"] if floor["mean_kl"] else None,
        "same_greedy_tokens": vk_gen.tokens == cpu_gen.tokens,
        "greedy_tokens_in_common": next(
            (
                i
                for i, (a_, b_) in enumerate(zip(vk_gen.tokens, cpu_gen.tokens, strict=False))
                if a_ != b_
            ),
            min(len(vk_gen.tokens), len(cpu_gen.tokens)),
        ),
        "vulkan": vk_info,
        "cpu": cpu_info,
    }
    if args.hf:
        ref = hf_logits(Path(args.hf), tokens)
        result["hf_vs_cpu"] = agreement(ref, cpu)
        result["hf_vs_vulkan"] = agreement(ref, vk)
    if not stats["finite"]:
        failures.append("Vulkan logits are not finite")
    # A broken kernel shows a mean KL of the order of 1 nat and top-1 agreement near 0. The
    # CPU kernels' own difference (flash attention off vs on) is reported beside it as a scale,
    # not a bound: GPU shaders round activations to f16 for f16 weights where the CPU keeps f32.
    if stats["mean_kl"] > MAX_MEAN_KL:
        failures.append(f"mean KL CPU vs Vulkan {stats['mean_kl']:.3g} nats > {MAX_MEAN_KL}")
    if stats["top1"] < MIN_TOP1:
        failures.append(f"top-1 agreement {stats['top1']:.2f} < {MIN_TOP1}")
    if stats["top5_overlap"] < 0.8:
        failures.append("top-5 overlap under 0.8")
    result["failures"] = failures
    result["seconds"] = round(time.perf_counter() - t0, 1)
    emit("agree", **result)
    return 1 if failures else 0


def cmd_table(args: argparse.Namespace) -> int:
    """A markdown table of `ondevice bench --save` records."""
    print("| label | test | threads | device | t/s | sd | peak RSS | load cold / warm | TTFT |")
    print("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for line in Path(args.jsonl).read_text().splitlines():
        r = json.loads(line)
        cold, warm = r.get("load_cold_s"), r.get("load_warm_s")
        load = f"{cold:.2f} / {warm:.2f} s" if cold is not None and warm is not None else ""
        ttft = f"{r['ttft_s'] * 1000:.0f} ms" if r.get("ttft_s") is not None else ""
        print(
            f"| {r.get('label', '')} | {r['test']} | {r['threads']} | {r['backend']} | "
            f"{r['tps_mean']:.1f} | {r['tps_sd']:.1f} | {r['peak_rss_bytes'] / 2**20:.0f} MiB | "
            f"{load} | {ttft} |"
        )
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("devices")
    d.add_argument("--vendor", default="NVIDIA")
    d.add_argument("--allow-software", action="store_true", help="accept lavapipe (local dry run)")
    t = sub.add_parser("tiny")
    t.add_argument("dir")
    a = sub.add_parser("agree")
    a.add_argument("model")
    a.add_argument("--hf", help="checkpoint folder: also compare with transformers (f32 GGUF)")
    a.add_argument("--threads", default="auto")
    a.add_argument("--gen", type=int, default=16, help="greedy tokens generated on each")
    a.add_argument("--vendor", default="NVIDIA")
    tb = sub.add_parser("table")
    tb.add_argument("jsonl")
    args = ap.parse_args()
    commands = {"devices": cmd_devices, "tiny": cmd_tiny, "agree": cmd_agree, "table": cmd_table}
    return commands[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
