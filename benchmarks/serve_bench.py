"""Issue 16's benchmark: `ondevice serve` against llama-server and llama-cpp-python's server,
aggregate generated tok/s and TTFT p50/p95 at 1, 2, 4 and 8 concurrent streaming clients.

Each client streams one `POST /v1/completions` (a prompt the model keeps continuing, a different
one per client, `max_tokens` 128, temperature 0) and all start together; aggregate tok/s is the
tokens all clients received divided by the wall time from the start to the last token, TTFT is
per client from its request to its first token. At each concurrency all servers are up at
once and the rounds alternate between them (the machine is shared: compare medians of
interleaved rounds).

The same engine and settings on every side: llama-server is built from the installed binding's
vendored llama.cpp (`LLAMA_TOOLS=llama-server build_llama_tools.sh`) and runs with `-np N` (continuous batching), `-c N x
ctx`, the same threads, `-fa off` (ondevice's choice on the CPU), f16 KV, and weight repacking
as ondevice decides it (`--no-repack` on AMX builds, where ondevice turns it off).
llama-cpp-python's server (`python -m llama_cpp.server`, in its own venv so the shared one keeps
its binding: ~/.cache/ondevice-bench/lcpp-server-venv, made with `pip install
'llama-cpp-python[server]==VER'`) serializes requests; it runs with `--interrupt_requests
False` so that a new request does not cut a streaming one off. Every process gets the same
OpenMP wait setting: ondevice's own (GOMP_SPINCOUNT=300, a short spin before sleeping) unless
--omp-wait names an OMP_WAIT_POLICY. RSS after each run gives the memory per extra slot.

    python benchmarks/serve_bench.py --models demo,q4km --rounds 3
    python benchmarks/serve_bench.py --models demo --clients 1,4 --rounds 1 --servers ondevice
    python benchmarks/serve_bench.py --rounds 5 --write-results
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_vs_llama_bench import CACHE, model_path  # noqa: E402
from stream_vs_llama_bench import machine_line, median, write_results  # noqa: E402

from ondevice import policy  # noqa: E402

SECTION = "## ondevice serve vs llama-server and llama-cpp-python's server (issue 16)"
LCPP_VENV = CACHE / "lcpp-server-venv"
SERVERS = ("ondevice", "llama-server", "llama-cpp-python")


def prompt(i: int) -> str:
    """A counting sequence from a different start per client: models keep continuing it."""
    start = 1 + 37 * i
    return ", ".join(str(n) for n in range(start, start + 12)) + ","


def llama_server_bin() -> Path:
    """llama-server, built from the installed binding's sdist if it isn't yet."""
    env = dict(os.environ, LLAMA_TOOLS="llama-server")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHON", sys.executable)
    out = subprocess.run(["bash", str(HERE / "build_llama_tools.sh")], check=True,
                         capture_output=True, text=True, env=env)  # fmt: skip
    return Path(out.stdout.strip().splitlines()[-1]) / "llama-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def repack_on() -> bool:
    """Whether ondevice repacks weights on this machine (the reference servers do the same)."""
    from ondevice import policy  # the runtime's own rule, so both sides run alike
    from ondevice._native import binding  # whether this build has AMX kernels

    return policy.repack_allowed(binding.amx_compiled())[0]


def command(server: str, model: Path, port: int, n: int, ctx: int, threads: int) -> list[str]:
    if server == "ondevice":
        return [sys.executable, "-m", "ondevice", "serve", str(model), "--port", str(port),
                "--parallel", str(n), "--ctx", str(ctx), "--threads", str(threads),
                "--name", "m", "--no-tune", "--max-queue", "64"]  # fmt: skip
    if server == "llama-server":
        binary = llama_server_bin()
        cmd = [str(binary), "-m", str(model), "--port", str(port), "--host", "127.0.0.1",
               "-np", str(n), "-c", str(n * ctx), "-t", str(threads), "-tb", str(threads),
               "-fa", "off", "-b", "2048", "-ub", "512", "--no-webui", "-a", "m"]  # fmt: skip
        return cmd if repack_on() else [*cmd, "--no-repack"]
    python = LCPP_VENV / "bin" / "python"
    if not python.is_file():
        raise SystemExit(f"{python} is missing: make that venv first (see this file's docstring)")
    return [str(python), "-m", "llama_cpp.server", "--model", str(model), "--port", str(port),
            "--host", "127.0.0.1", "--n_ctx", str(ctx), "--n_threads", str(threads),
            "--n_threads_batch", str(threads), "--flash_attn", "False",
            "--interrupt_requests", "False", "--model_alias", "m"]  # fmt: skip


class Server:
    """One server process, started and waited for until it is ready."""

    def __init__(self, cmd: list[str], port: int, env: dict[str, str]) -> None:
        self.cmd, self.port, self.env = cmd, port, env
        self.url = f"http://127.0.0.1:{port}"

    def __enter__(self) -> Server:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, env=self.env)  # fmt: skip
        t0 = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.cmd[0]} exited with {self.proc.returncode}")
            if self._ready():
                return self
            if time.monotonic() - t0 > 600:
                raise RuntimeError(f"{self.cmd} not ready after 600 s")
            time.sleep(0.3)

    def _ready(self) -> bool:
        """/health says 200 (ondevice, llama-server: 503 while loading); llama-cpp-python's
        server has no /health and listens only once loaded."""
        try:
            r = httpx.get(f"{self.url}/health", timeout=5)
            if r.status_code == 404:
                r = httpx.get(f"{self.url}/v1/models", timeout=5)
            return r.status_code == 200
        except httpx.HTTPError:
            return False

    def rss(self) -> int:
        return psutil.Process(self.proc.pid).memory_info().rss

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def one_client(client: httpx.AsyncClient, url: str, i: int, n_gen: int) -> tuple[float, int]:
    """(TTFT seconds, tokens received) for one streamed completion."""
    body = {"model": "m", "prompt": prompt(i), "max_tokens": n_gen, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    t0 = time.perf_counter()
    ttft, events, usage = 0.0, 0, None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ev.get("usage"):
                usage = ev["usage"].get("completion_tokens")
            if ev.get("choices") and ev["choices"][0].get("text"):
                events += 1
                if not ttft:
                    ttft = time.perf_counter() - t0
    return ttft, usage if usage is not None else events


async def burst(url: str, n: int, n_gen: int) -> dict[str, float]:
    """n clients at once: aggregate tok/s, TTFT p50/p95, tokens."""
    limits = httpx.Limits(max_connections=n + 2)
    async with httpx.AsyncClient(timeout=1800, limits=limits) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_client(client, url, i, n_gen) for i in range(n)))
        wall = time.perf_counter() - t0
    ttfts = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    p95 = ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))]
    return {"tps": tokens / wall, "ttft_p50": statistics.median(ttfts), "ttft_p95": p95,
            "tokens": tokens}  # fmt: skip


def measure(model: Path, servers, clients, rounds, ctx, threads, n_gen, env) -> list[dict]:
    """At each concurrency, every server runs at once (idle but one) and the rounds go
    server by server, so a slow minute of the shared machine hits all of them alike."""
    rows = []
    for n in clients:
        runs: dict[str, list[dict]] = {s: [] for s in servers}
        with contextlib.ExitStack() as stack:
            live = {}
            for server in servers:
                np_ = 1 if server == "llama-cpp-python" else n
                port = free_port()
                cmd = command(server, model, port, np_, ctx, threads)
                live[server] = stack.enter_context(Server(cmd, port, env))
                asyncio.run(burst(live[server].url, 1, 8))  # warm-up
            for _ in range(rounds):
                for server in servers:
                    runs[server].append(asyncio.run(burst(live[server].url, n, n_gen)))
            rss = {server: s.rss() for server, s in live.items()}
        for server in servers:
            row = {"model": model.name, "server": server, "clients": n, "rss_bytes": rss[server]}
            for key in ("tps", "ttft_p50", "ttft_p95", "tokens"):
                row[key] = median([r[key] for r in runs[server]])
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    return rows


def roof(model: Path, threads: int, n: int = 4, steps: int = 24) -> str:
    """What batching can give at most, from the engine alone: the median seconds of a decode
    of one token (one sequence) against one of n tokens (one per sequence), alternating in
    one process at the benchmark's depths (in blocks of 6 alike, as a server's steps come). n clients can get at most n c(1) / c(n) times
    one client's tok/s."""
    import random

    import ondevice
    from ondevice._native.engine import Batch

    rng = random.Random(0)
    one, many = [], []
    m = ondevice.load(model, n_ctx=n * 512, threads=threads, parallel=n, tune=False,
                      flash_attn="off", speculative="off")  # fmt: skip
    with m, m.raw() as eng:
        b = Batch(64 * n)
        b.clear()
        for s in range(n):
            for j in range(40):  # a prompt of the benchmark's length in every sequence
                b.add(rng.randrange(1000, 20000), j, s, False)
        eng.decode_batch(b)
        pos = 40
        for _ in range(steps // 6):  # blocks of 6 like decodes (as a server's steps come)
            for seqs, times in ((1, one), (n, many)):
                for _ in range(6):
                    b.clear()
                    for s in range(seqs):
                        b.add(rng.randrange(1000, 20000), pos, s, True)
                    t0 = time.perf_counter()
                    eng.decode_batch(b)
                    times.append(time.perf_counter() - t0)
                    pos += 1
                pos -= 6
                for s in range(n):  # back to where every sequence was
                    eng.kv_keep(pos, s)
        b.free()
    c1, cn = statistics.median(one), statistics.median(many)
    return (f"{model.name}: c(1) = {c1 * 1000:.1f} ms, c({n} sequences x 1 token) = "
            f"{cn * 1000:.1f} ms: {n} clients get at most {n * c1 / cn:.2f}x one client's "
            f"tok/s (median of {steps} decodes each, in alternating blocks)")  # fmt: skip


def table(rows: list[dict], n_gen: int) -> str:
    out = [f"Aggregate generated tok/s and TTFT (ms, p50/p95) of n streaming clients, "
           f"{n_gen} tokens each; RSS after the run (MiB).", "",
           "| model | clients | server | tok/s | TTFT p50 | TTFT p95 | RSS |",
           "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        out.append(f"| {r['model']} | {r['clients']} | {r['server']} | {r['tps']:.1f} | "
                   f"{r['ttft_p50'] * 1000:.0f} | {r['ttft_p95'] * 1000:.0f} | "
                   f"{r['rss_bytes'] / 2**20:.0f} |")  # fmt: skip
    out += ["", "Ratios: " + "; ".join(ratios(rows)), "", f"Machine: {machine_line()}."]
    return "\n".join(out)


def ratios(rows: list[dict]) -> list[str]:
    """The issue's goals, as measured."""
    by = {(r["model"], r["server"], r["clients"]): r for r in rows}
    out = []
    for (model, server, n), r in by.items():
        if server != "ondevice":
            continue
        for other in ("llama-server", "llama-cpp-python"):
            o = by.get((model, other, n))
            if o and o["tps"]:
                out.append(f"{model} {n} clients: {r['tps'] / o['tps']:.2f}x {other}")
        one = by.get((model, "ondevice", 1))
        if n > 1 and one and one["tps"]:
            out.append(f"{model} {n} clients: {r['tps'] / one['tps']:.2f}x our 1 client")
        if n > 1 and one:
            per = (r["rss_bytes"] - one["rss_bytes"]) / (n - 1) / 2**20
            out.append(f"{model}: {per:.1f} MiB per extra slot ({n} slots)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="demo,q4km", help="demo, q4km, q8 or .gguf paths")
    ap.add_argument("--servers", default=",".join(SERVERS))
    ap.add_argument("--clients", default="1,2,4,8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ctx", type=int, default=512, help="context per slot")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument(
        "--omp-wait", default="", help="OMP_WAIT_POLICY for every server (default: ondevice's)"
    )
    ap.add_argument("--write-results", action="store_true")
    ap.add_argument("--roof", metavar="MODEL", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.roof:
        print(roof(Path(args.roof), args.threads))
        return
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if args.omp_wait:
        env["OMP_WAIT_POLICY"] = args.omp_wait
    else:
        env.update(policy.OMP_ENV)  # what ondevice.load() sets, for every server alike
    servers = [s for s in args.servers.split(",") if s]
    clients = [int(c) for c in args.clients.split(",")]
    rows, roofs = [], []
    for name in args.models.split(","):
        model = model_path(name)
        rows += measure(model, servers, clients, args.rounds, args.ctx, args.threads,
                        args.n_gen, env)  # fmt: skip
        # In a process of its own, with the servers' environment (the OpenMP wait is read
        # when the library loads, and this one has loaded it already).
        got = subprocess.run([sys.executable, __file__, "--roof", str(model), "--threads",
                              str(args.threads)], env=env, capture_output=True, text=True,
                             check=True)  # fmt: skip
        roofs.append(got.stdout.strip().splitlines()[-1])
    text = table(rows, args.n_gen) + "\n\nThe roof, from llama_decode alone: " + "; ".join(roofs)
    print(text)
    if args.write_results:
        command = " ".join(["python", "benchmarks/serve_bench.py", *sys.argv[1:]])
        head = (
            f"{SECTION}\n\n`{command}`, {time.strftime('%Y-%m-%d')}: {args.threads} threads "
            f"per server, {args.ctx} tokens of context per slot, medians of {args.rounds} "
            "interleaved rounds.\n\n"
        )
        write_results(head + text, SECTION)


if __name__ == "__main__":
    main()
