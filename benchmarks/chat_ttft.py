"""Issue 3's benchmark: time to first token, turn by turn, in a 10-turn conversation.

Three ways to hold the same conversation with the same model and settings (greedy, replies of at
most --max-tokens tokens, the GGUF's chat template, a system prompt):

  ondevice             `Model.conversation()`: each turn evaluates only the tokens that are new
                       since the previous turn (the ledger of sent token ids keeps the prefix
                       stable; see ondevice/conversation.py).
  ondevice, no reuse   `Model.chat(history)` after `Model.reset()`: the whole history evaluated
                       every turn, i.e. what a chat loop that re-evaluates its history costs.
  llama-cpp-python     `Llama.create_chat_completion(history, stream=True)`, the binding's own
                       high-level chat, with the history of its own replies. It runs in a child
                       process with `llama_model_default_params` patched to use_extra_bufts=False
                       (weight repacking reaches llama.cpp's AMX kernels, which crash this
                       machine); its prompt tokens evaluated are counted by wrapping Llama.eval.

TTFT is wall time from the call to the first chunk with text, measured by this script for all
three (so ondevice's template rendering and tokenization are included). The three take turns,
turn by turn (ondevice turn 1, no reuse turn 1, llama-cpp-python turn 1, ondevice turn 2, ...),
so that the load of a shared machine hits them alike; each turn's median over the rounds is
reported.

    python benchmarks/chat_ttft.py                  # demo model, 3 rounds, print the table
    python benchmarks/chat_ttft.py --rounds 5 --write-results
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from stream_vs_llama_bench import machine_line, median, write_results  # noqa: E402

SECTION = "## Chat: time to first token by turn (issue 3)"
SYSTEM = "You are a helpful assistant."
QUESTIONS = [
    "What is the capital of France?",
    "And the capital of Italy?",
    "Which of the two cities is older?",
    "Name a famous museum in Paris.",
    "What can you see there?",
    "Give me one tip for visiting it.",
    "How do I get there from the airport?",
    "What is a typical French breakfast?",
    "And a typical Italian one?",
    "Thank you! Summarize our conversation in one sentence.",
]

# The llama-cpp-python side, run in a child process (see the module docstring).
LLAMA_CPP_CHILD = r"""
import json, sys, time
import llama_cpp.llama_cpp as L
_default = L.llama_model_default_params
def _params():
    p = _default()
    p.use_extra_bufts = False  # no repacking: AMX kernels crash this machine class
    return p
L.llama_model_default_params = _params
from llama_cpp import Llama

cfg = json.loads(sys.argv[1])
llm = Llama(cfg["model"], n_ctx=cfg["n_ctx"], n_threads=cfg["threads"],
            n_threads_batch=cfg["threads"], n_batch=2048, n_ubatch=512, verbose=False)
evals = []
_eval = llm.eval
def counting_eval(tokens):
    evals.append((llm.n_tokens, len(tokens)))
    return _eval(tokens)
llm.eval = counting_eval
messages = [{"role": "system", "content": cfg["system"]}]
print("ready", flush=True)
for line in sys.stdin:  # one question per line (JSON), one answer per line
    messages.append({"role": "user", "content": json.loads(line)})
    evals.clear()
    t0 = time.perf_counter()
    ttft = None
    parts = []
    for chunk in llm.create_chat_completion(messages, stream=True, temperature=0.0,
                                            max_tokens=cfg["max_tokens"]):
        text = chunk["choices"][0]["delta"].get("content")
        if text:
            if ttft is None:
                ttft = time.perf_counter() - t0
            parts.append(text)
    reused, evaluated = evals[0]
    reply = "".join(parts)
    messages.append({"role": "assistant", "content": reply})
    print(json.dumps({"ttft_s": ttft, "prompt_tokens": reused + evaluated,
                      "prompt_eval_tokens": evaluated, "reply": reply}), flush=True)
"""


def ondevice_turn(conv, question: str, fresh: bool) -> dict:
    """One turn; wall TTFT, prompt tokens, prompt tokens evaluated. `fresh` empties the KV
    cache first, so the whole history is evaluated again."""
    if fresh:
        conv.model.reset()
    t0 = time.perf_counter()
    ttft = None
    parts, final = [], None
    for chunk in conv.stream(question):
        if chunk.text and ttft is None:
            ttft = time.perf_counter() - t0
        parts.append(chunk.text)
        final = chunk.stats or final
    return {
        "ttft_s": ttft if ttft is not None else final.ttft_s,
        "prompt_tokens": final.prompt_tokens,
        "prompt_eval_tokens": final.prompt_eval_tokens,
        "reply": "".join(parts),
    }


class LlamaCppChild:
    """llama-cpp-python's high-level chat in a child process, one turn per request."""

    def __init__(self, model_path: str, n_ctx: int, threads: int, max_tokens: int) -> None:
        cfg = {
            "model": model_path,
            "n_ctx": n_ctx,
            "threads": threads,
            "system": SYSTEM,
            "max_tokens": max_tokens,
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LLAMA_CPP_CHILD, json.dumps(cfg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the llama-cpp-python child did not start")

    def turn(self, question: str) -> dict:
        self.proc.stdin.write(json.dumps(question) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the llama-cpp-python child died ({self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def table(runs: dict[str, list[list[dict]]]) -> tuple[str, dict[str, float]]:
    names = list(runs)
    head = "| turn | " + " | ".join(f"{n}: prompt / evaluated, TTFT ms" for n in names) + " |"
    lines = [head, "|---" * (len(names) + 1) + "|"]
    ratios = {}
    for turn in range(len(QUESTIONS)):
        cells = []
        for name in names:
            rows = [r[turn] for r in runs[name]]
            ttft = median([r["ttft_s"] for r in rows]) * 1000
            prompt = rows[0]["prompt_tokens"]
            evaluated = median([r["prompt_eval_tokens"] for r in rows])
            cells.append(f"{prompt} / {evaluated:g}, {ttft:.0f}")
        lines.append(f"| {turn + 1} | " + " | ".join(cells) + " |")
    for name in names:
        first = median([r[0]["ttft_s"] for r in runs[name]])
        last = median([r[-1]["ttft_s"] for r in runs[name]])
        ratios[name] = last / first
    lines.append("| turn 10 / turn 1 | " + " | ".join(f"{ratios[n]:.2f}x" for n in names) + " |")
    return "\n".join(lines), ratios


def _fa_label(asked: str, ran: str | None) -> str:
    """ "auto (off)" when ondevice resolved auto itself; else what was asked."""
    return f"{asked} ({ran})" if asked == "auto" and ran in ("on", "off") else asked


def measure_paired(model, first_model, pairs: int, max_tokens: int) -> list[dict]:
    """Turn 1 and turn 10 measured alternately, `pairs` times, so both see the same load.

    The conversation is played to turn 9 once; before each turn-10 measurement the KV cache is
    set back to exactly the turn-9 history (stream of those tokens with max_tokens=0: one token
    evaluated), so every turn 10 evaluates its new tokens at the depth of a real tenth turn.
    Turn 1 runs on a second model whose cache is emptied first.
    """
    import tempfile

    conv = model.conversation(SYSTEM, temperature=0, max_tokens=max_tokens)
    for q in QUESTIONS[:-1]:
        conv.send(q)
    base = conv.tokens
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        saved = conv.save(Path(tmp) / "turn9.json")
        for _ in range(pairs):
            for _chunk in model.stream(base, max_tokens=0):
                pass
            tenth = model.conversation(SYSTEM, temperature=0, max_tokens=1)
            tenth.load(saved)
            t10 = ondevice_turn(tenth, QUESTIONS[-1], False)
            first = first_model.conversation(SYSTEM, temperature=0, max_tokens=1)
            t1 = ondevice_turn(first, QUESTIONS[0], True)
            out.append(
                {
                    "turn1_ttft_s": t1["ttft_s"],
                    "turn1_eval": t1["prompt_eval_tokens"],
                    "turn10_ttft_s": t10["ttft_s"],
                    "turn10_eval": t10["prompt_eval_tokens"],
                    "turn10_prompt": t10["prompt_tokens"],
                }
            )
    return out


def measure(args: argparse.Namespace) -> tuple[dict[str, list[list[dict]]], dict]:
    import ondevice
    from ondevice.locate import demo_model_path

    path = args.model or str(demo_model_path())
    runs: dict[str, list[list[dict]]] = {"ondevice": [], "ondevice, no reuse": []}
    if not args.no_llama_cpp:
        runs["llama-cpp-python"] = []
    # tune=False: the defaults, whatever `ondevice tune` may have stored for this model
    load = {
        "n_ctx": args.ctx,
        "threads": args.threads,
        "flash_attn": args.flash_attn,
        "tune": False,
    }
    # Two models: the no-reuse runs empty their KV cache every turn, which would wipe the
    # reusing conversation's if they shared one.
    with ondevice.load(path, **load) as model, ondevice.load(path, **load) as fresh_model:
        # warm-up (page cache, first-call costs)
        ondevice_turn(model.conversation(SYSTEM, temperature=0), QUESTIONS[0], False)
        ondevice_turn(fresh_model.conversation(SYSTEM, temperature=0), QUESTIONS[0], True)
        for r in range(args.rounds):
            model.reset()
            opts = {"temperature": 0, "max_tokens": args.max_tokens}
            conv = model.conversation(SYSTEM, **opts)
            fresh = fresh_model.conversation(SYSTEM, **opts)
            child = (
                None
                if args.no_llama_cpp
                else LlamaCppChild(path, args.ctx, args.threads, args.max_tokens)
            )
            rows: dict[str, list[dict]] = {name: [] for name in runs}
            for q in QUESTIONS:  # the three take turns, turn by turn
                rows["ondevice"].append(ondevice_turn(conv, q, False))
                rows["ondevice, no reuse"].append(ondevice_turn(fresh, q, True))
                if child is not None:
                    rows["llama-cpp-python"].append(child.turn(q))
            if child is not None:
                child.close()
            for name in runs:
                runs[name].append(rows[name])
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
        paired = measure_paired(model, fresh_model, args.paired, args.max_tokens)
        settings = (
            f"n_ctx {model.n_ctx}, {model.threads} threads, {model.backend}, flash attention "
            f"{_fa_label(args.flash_attn, model.settings.get('flash_attn'))}, greedy, replies of "
            f"at most {args.max_tokens} tokens, system prompt {SYSTEM!r}, the GGUF's chat template"
        )
    cmd = "python benchmarks/chat_ttft.py" + (f" --model {Path(path).name}" if args.model else "")
    cmd += f" --rounds {args.rounds}"
    if args.threads != 2:
        cmd += f" --threads {args.threads}"
    if args.flash_attn != "auto":
        cmd += f" --flash-attn {args.flash_attn}"
    if args.paired:
        cmd += f" --paired {args.paired}"
    meta = {
        "paired": paired,
        "command": cmd,
        "date": time.strftime("%Y-%m-%d"),
        "model": Path(path).name,
        "settings": settings,
        "rounds": args.rounds,
        "machine": machine_line(),
    }
    return runs, meta


def report(saved: list[tuple[dict[str, list[list[dict]]], dict]]) -> str:
    """The RESULTS.md section for one or more saved runs (each: runs, meta)."""
    lines = [
        SECTION,
        "",
        "Each cell: prompt tokens / prompt tokens evaluated, time to first token (wall, from "
        "the call to the first text). `ondevice, no reuse` resets the KV cache before each "
        "turn (the cost of re-evaluating the history); llama-cpp-python runs in a child "
        "process (use_extra_bufts=False patched in; its defaults otherwise: flash attention "
        "off), its prompt tokens evaluated counted at Llama.eval. Within a round the three "
        "take turns, turn by turn; cells are medians over the rounds.",
    ]
    for runs, meta in saved:
        lines += [
            "",
            f"`{meta['command']}`, {meta['date']}, model {meta['model']}; {meta['settings']}"
            + (f"; {meta['rounds']} rounds" if meta["rounds"] else "")
            + f". Machine: {meta['machine']}.",
        ]
        paired = meta.get("paired") or []
        if paired:
            ratios_p = sorted(p["turn10_ttft_s"] / p["turn1_ttft_s"] for p in paired)
            q1, q3 = ratios_p[len(ratios_p) // 4], ratios_p[(3 * len(ratios_p)) // 4]
            lines += [
                "",
                f"- Paired (ondevice): turn 1 and turn 10 measured alternately {len(paired)} "
                f"times (turn 10 from the turn-9 KV cache each time): TTFT turn 1 median "
                f"{median([p['turn1_ttft_s'] for p in paired]) * 1000:.0f} ms "
                f"({paired[0]['turn1_eval']} tokens evaluated), turn 10 median "
                f"{median([p['turn10_ttft_s'] for p in paired]) * 1000:.0f} ms "
                f"({paired[0]['turn10_eval']} of {paired[0]['turn10_prompt']} tokens evaluated); "
                f"turn 10 / turn 1 per pair: median {median(ratios_p):.2f}x "
                f"(quartiles {q1:.2f}x-{q3:.2f}x). Goal <= 1.2x: "
                f"{'met' if median(ratios_p) <= 1.2 else 'NOT met'}.",
            ]
        if not any(runs.values()):
            continue
        text, ratios = table(runs)
        lines += [
            "",
            text,
            "",
            f"- Goal: TTFT of turn 10 <= 1.2x turn 1 for ondevice: "
            f"{'met' if ratios['ondevice'] <= 1.2 else 'NOT met'} ({ratios['ondevice']:.2f}x "
            "of the medians).",
        ]
        for name in runs:
            per_round = [r[-1]["ttft_s"] / r[0]["ttft_s"] for r in runs[name]]
            lines.append(
                f"- {name}: turn 10 / turn 1 per round: "
                + ", ".join(f"{x:.2f}x" for x in per_round)
                + f" (median {median(per_round):.2f}x)."
            )
    runs = saved[-1][0]
    if runs.get("llama-cpp-python"):
        last = runs["llama-cpp-python"][0][-1]
        lines.append(
            f"- llama-cpp-python's high-level chat evaluated {last['prompt_eval_tokens']} of "
            f"{last['prompt_tokens']} prompt tokens at turn 10: this version (0.3.36) keeps the "
            "longest common token prefix in its KV cache too (Llama.generate's prefix match), and "
            "this model's replies re-tokenize to the tokens it generated."
        )
    return "\n".join(lines)


RAW = Path.home() / ".cache" / "ondevice-bench" / "chat_ttft.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: the demo model)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--flash-attn", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--no-llama-cpp", action="store_true", help="skip llama-cpp-python")
    ap.add_argument(
        "--paired", type=int, default=0, help="also measure turn 1 / turn 10 in N alternating pairs"
    )
    ap.add_argument("--write-results", action="store_true", help=f"update {SECTION!r}")
    ap.add_argument(
        "--from-json",
        type=Path,
        action="append",
        help=f"report saved runs instead of measuring (repeatable; a run saves {RAW})",
    )
    args = ap.parse_args()
    if args.from_json:
        saved = []
        for path in args.from_json:
            doc = json.loads(path.read_text())
            saved.append((doc["runs"], doc["meta"]))
    else:
        runs, meta = measure(args)
        RAW.parent.mkdir(parents=True, exist_ok=True)
        RAW.write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
        print(f"raw numbers and replies: {RAW}", file=sys.stderr)
        saved = [(runs, meta)]
    text = report(saved)
    print(text)
    if args.write_results:
        write_results(text, SECTION)


if __name__ == "__main__":
    main()
