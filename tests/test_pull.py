"""`ondevice pull` end to end: the real huggingface-hub client in a real `ondevice` subprocess,
talking to a loopback imitation of the hub (tests/fake_hub.py) that serves a tiny random Phi-2.

Covered: convert + quantize + store; a second pull makes no request at all; HF_HUB_OFFLINE with
and without a cache; a response cut short (resumed in place); a pull killed mid-download (no
entry, and the next pull resumes with a Range request); sha256 and size mismatches (deleted,
nothing stored); hostile file names in the listing; a repo that hosts GGUF files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_hub import FakeHub
from phi2_fixtures import make_tiny_phi2

from ondevice import locate, store
from ondevice.errors import DownloadError, UsageError
from ondevice.pull import RemoteFile, check_remote_names, make_plan, pull

PYTHON = sys.executable
REPO = "tiny-org/phi-2"
GGUF_REPO = "tiny-org/phi-2-GGUF"
# Phi-2's shape in miniature (head dim 64, half of it rotary). model.safetensors is ~13 MiB:
# more than huggingface-hub's 10 MiB read size, so a killed pull leaves bytes behind to resume.
TINY = {
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "partial_rotary_factor": 0.5,
}
MIB = 1024 * 1024


@pytest.fixture(scope="session")
def tiny_phi2(tmp_path_factory) -> Path:
    return make_tiny_phi2(tmp_path_factory.mktemp("tiny-phi2") / "phi-2", **TINY)


@pytest.fixture(scope="session")
def tiny_ggufs(tiny_phi2, tmp_path_factory) -> dict[str, bytes]:
    """What a GGUF repo would host: the tiny model as Q8_0 and F16 files."""
    from ondevice.convert import convert

    out = tmp_path_factory.mktemp("tiny-ggufs")
    return {
        quant: convert(tiny_phi2, out / f"tiny.{quant}.gguf", outtype=quant.lower()).read_bytes()
        for quant in ("Q8_0", "F16")
    }


@pytest.fixture
def hub():
    with FakeHub() as h:
        yield h


@pytest.fixture
def env(tmp_path, hub, monkeypatch) -> dict[str, str]:
    """A subprocess environment pointing huggingface-hub at the fake hub, with a fresh HF cache
    and store; the store is also this process's (for in-process checks)."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    e.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_DISABLE_TELEMETRY="1",
        ONDEVICE_HOME=str(tmp_path / "home"),
        NO_COLOR="1",
    )
    monkeypatch.setenv("ONDEVICE_HOME", e["ONDEVICE_HOME"])
    return e


def ondevice(env, *args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "ondevice", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        **kwargs,
    )


def blobs(env, repo=REPO) -> list[Path]:
    folder = Path(env["HF_HOME"]) / "hub" / f"models--{repo.replace('/', '--')}" / "blobs"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def assert_nothing_stored(env) -> None:
    assert store.entries() == []
    models_dir = Path(env["ONDEVICE_HOME"]) / "models"
    assert not models_dir.exists() or not list(models_dir.rglob("*.gguf"))
    tmp = Path(env["ONDEVICE_HOME"]) / "tmp"
    assert not tmp.exists() or list(tmp.iterdir()) == []


# -- the main path ---------------------------------------------------------------------------


def test_pull_converts_quantizes_stores_and_second_pull_is_silent(tiny_phi2, hub, env):
    repo = hub.add_folder(REPO, tiny_phi2)
    first = ondevice(env, "pull", REPO)
    assert first.returncode == 0, first.stderr
    assert first.stdout == "phi-2:Q4_K_M\n"
    assert "converting to F16" in first.stderr and "quantizing to Q4_K_M" in first.stderr
    got = [(r.method, r.path) for r in hub.hub_requests()][:2]
    assert got == [
        ("GET", f"/api/models/{REPO}/revision/main"),
        ("GET", f"/api/models/{REPO}/tree/{repo.sha}"),
    ]
    fetched = {r.path.rsplit("/", 1)[-1] for r in hub.file_gets()}
    assert "model.safetensors" in fetched and "config.json" in fetched

    entry = store.find("phi-2")
    assert entry is not None and entry.ref == "phi-2:Q4_K_M"
    m = entry.manifest
    assert m["source"]["repo"] == REPO and m["source"]["commit"] == repo.sha
    assert m["source"]["revision"] == "main" and m["kind"] == "converted"
    assert m["sha256"] == store.sha256_file(entry.path) and m["size"] == entry.path.stat().st_size
    assert m["converter"]["name"] == "ondevice.convert" and m["converter"]["version"]
    assert m["quantizer"]["llama_cpp_python"] and m["file_type"] == "Q4_K_M"
    assert m["created"].endswith("Z")
    assert locate.resolve("phi-2") == locate.resolve(f"{REPO}:Q4_K_M") == entry.path
    assert store.most_recent() == entry

    hub.reset_requests()
    again = ondevice(env, "pull", REPO, "--quant", "q4_k_m")
    assert again.returncode == 0, again.stderr
    assert again.stdout == "phi-2:Q4_K_M\n" and "already in the store" in again.stderr
    assert hub.requests == [], "a second pull must not touch the network at all"


def test_pull_json_and_direct_q8_0_and_cached_sources(tiny_phi2, hub, env):
    hub.add_folder(REPO, tiny_phi2)
    first = ondevice(env, "pull", REPO, "--quant", "Q8_0", "--json")
    assert first.returncode == 0, first.stderr
    data = json.loads(first.stdout)
    assert data["status"] == "pulled" and data["ref"] == "phi-2:Q8_0"
    assert data["converter"]["outtype"] == "q8_0" and "quantizing" not in first.stderr
    # another quant of the same commit: the files come from the HF cache, only the listing is asked
    hub.reset_requests()
    second = ondevice(env, "pull", REPO, "--quant", "F16", "--name", "tiny")
    assert second.returncode == 0, second.stderr
    assert second.stdout == "tiny:F16\n" and "in the Hugging Face cache" in second.stderr
    assert hub.file_gets() == []
    assert [e.ref for e in store.entries()] == ["phi-2:Q8_0", "tiny:F16"]


def test_offline(tiny_phi2, hub, env):
    hub.add_folder(REPO, tiny_phi2)
    assert ondevice(env, "pull", REPO, "--quant", "Q8_0").returncode == 0
    store.remove("phi-2:Q8_0")  # the store entry goes, the HF cache stays
    offline = {**env, "HF_HUB_OFFLINE": "1"}

    hub.reset_requests()
    cached = ondevice(offline, "pull", REPO, "--quant", "Q8_0")
    assert cached.returncode == 0, cached.stderr
    assert "offline" in cached.stderr and cached.stdout == "phi-2:Q8_0\n"
    assert hub.requests == []
    assert store.find("phi-2:Q8_0") is not None

    missing = ondevice(offline, "pull", "tiny-org/never-pulled")
    assert missing.returncode == 1
    assert "needs the network" in missing.stderr and "Traceback" not in missing.stderr
    assert hub.requests == []


def test_response_cut_short_is_resumed(tiny_phi2, hub, env):
    repo = hub.add_folder(REPO, tiny_phi2)
    cut = 10 * MIB + 512 * 1024  # past huggingface-hub's first 10 MiB read
    repo.files["model.safetensors"].cut_once_at = cut
    result = ondevice(env, "pull", REPO, "--quant", "Q8_0")
    assert result.returncode == 0, result.stderr
    first, second = hub.file_gets("model.safetensors")
    assert first.range is None
    assert second.range is not None, "the retry should continue, not start over"
    assert 0 < int(second.range.removeprefix("bytes=").rstrip("-")) <= cut
    assert store.find("phi-2:Q8_0") is not None


def test_killed_pull_leaves_no_entry_and_resumes(tiny_phi2, hub, env):
    repo = hub.add_folder(REPO, tiny_phi2)
    weights = repo.files["model.safetensors"]
    weights.stall_at = 10 * MIB + 4096
    proc = subprocess.Popen(
        [PYTHON, "-m", "ondevice", "pull", REPO, "--quant", "Q8_0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert weights.stalled.wait(60), "the download never reached the stall point"
        partial = Path()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the client writes 10 MiB reads
            found = [p for p in blobs(env) if p.name.endswith(".incomplete")]
            if found and found[0].stat().st_size >= 10 * MIB:
                partial = found[0]
                break
            time.sleep(0.05)
        assert partial.name, "no partial download on disk"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        weights.release.set()
    assert proc.returncode == 130, err
    assert_nothing_stored(env)
    have = partial.stat().st_size
    assert have >= 10 * MIB

    weights.stall_at = None
    hub.reset_requests()
    resumed = ondevice(env, "pull", REPO, "--quant", "Q8_0")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming model.safetensors" in resumed.stderr
    (get,) = hub.file_gets("model.safetensors")
    assert get.range == f"bytes={have}-"
    assert store.find("phi-2:Q8_0") is not None
    assert not [p for p in blobs(env) if p.name.endswith(".incomplete")]


# -- Llama- and Qwen2-shaped repos -----------------------------------------------------------

# name -> (family, tokenizer, options): TinyLlama-like (SentencePiece tokenizer.model, Llama 2
# template) and Qwen2.5-like (byte-level BPE, tied embeddings, q/k/v biases, the template in
# chat_template.jinja as newer repos ship it)
FAMILY_REPOS = {
    "tiny-org/TinyLlama-Chat": ("llama", "llama2", {"num_key_value_heads": 2}, "</s>"),
    "tiny-org/Qwen2.5-Instruct": (
        "qwen2", "qwen2", {"num_key_value_heads": 2, "tie_word_embeddings": True}, "<|im_end|>"
    ),
}  # fmt: skip


@pytest.mark.parametrize("repo_id", FAMILY_REPOS)
def test_pull_llama_and_qwen2_shaped_repos(repo_id, hub, env, tmp_path):
    from family_fixtures import build

    from ondevice import chat_formats
    from ondevice import load as load_model

    family, tokenizer, options, end = FAMILY_REPOS[repo_id]
    folder = build(tmp_path / "repo", family, tokenizer=tokenizer, **options).path
    if tokenizer == "qwen2":
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "chat_template.jinja").write_text(config.pop("chat_template"))
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    hub.add_folder(repo_id, folder)
    name = repo_id.split("/")[1].lower()
    result = ondevice(env, "pull", repo_id, "--quant", "Q8_0", "--name", name)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{name}:Q8_0\n"
    fetched = {r.path.rsplit("/", 1)[-1] for r in hub.file_gets()}
    wanted = {"tokenizer.model"} if tokenizer == "llama2" else {"chat_template.jinja"}
    assert wanted | {"config.json", "tokenizer.json", "model.safetensors"} <= fetched
    entry = store.find(f"{name}:Q8_0")
    assert entry is not None and entry.manifest["file_type"] == "Q8_0"
    with load_model(entry.path, n_ctx=256, threads=2, tune=False) as m:
        assert m.architecture == family
        fmt = chat_formats.for_model(m)
        assert fmt.source == "gguf"  # the repo's own template, not a built-in guess
        assert end in fmt.render(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
        )
        (token,) = m.tokenize(end, add_special=False, parse_special=True)
        assert m.is_eog(token)  # a reply stops at the template's end-of-turn token
        chunks = list(m.chat([{"role": "user", "content": "hi"}], max_tokens=4, temperature=0))
        assert chunks[-1].stats.completion_tokens <= 4


# -- downloads that don't match the listing --------------------------------------------------


@pytest.mark.parametrize("fault", ["sha256", "size"])
def test_mismatched_download_is_deleted_and_not_stored(tiny_phi2, hub, env, fault):
    repo = hub.add_folder(REPO, tiny_phi2)
    weights = repo.files["model.safetensors"]
    if fault == "sha256":  # same size, one byte changed
        body = bytearray(weights.content)
        body[len(body) // 2] ^= 0xFF
        weights.served = bytes(body)
    else:  # a consistent but short body
        weights.served = weights.content[:-1000]
    result = ondevice(env, "pull", REPO, "--quant", "Q8_0")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert ("sha256" if fault == "sha256" else "size") in result.stderr
    assert "deleted" in result.stderr
    assert_nothing_stored(env)
    # nothing of the bad file is kept in the HF cache, whole or partial
    assert not [p for p in blobs(env) if p.stat().st_size > 1 * MIB]

    if fault == "sha256":  # the hub serves the right bytes again: the next pull works
        weights.served = None
        fixed = ondevice(env, "pull", REPO, "--quant", "Q8_0")
        assert fixed.returncode == 0, fixed.stderr


def test_unsafe_file_name_in_listing_is_refused(tiny_phi2, hub, env, tmp_path):
    repo = hub.add_folder(REPO, tiny_phi2)
    repo.extra_listing.append(
        {"type": "file", "path": "../../evil.safetensors", "size": 4, "oid": "0" * 40}
    )
    result = ondevice(env, "pull", REPO, "--quant", "Q8_0")
    assert result.returncode == 1
    assert "unsafe file name '../../evil.safetensors'" in result.stderr
    assert hub.file_gets() == [] and not [r for r in hub.hub_requests() if r.method == "HEAD"]
    assert_nothing_stored(env)
    assert not list(tmp_path.rglob("evil*"))


@pytest.mark.parametrize(
    "name",
    ["../x.json", "a/../../x.json", "/etc/passwd", "C:/x.gguf", "c:x.gguf", "a\\..\\x", "a//b", ""],
)
def test_check_remote_names_refuses(name):
    files = [RemoteFile("config.json", 2, None, None), RemoteFile(name, 1, None, None)]
    with pytest.raises(DownloadError, match="unsafe file name"):
        check_remote_names("o/r", files)


# -- repos that host GGUF files --------------------------------------------------------------


def test_pull_from_gguf_repo_takes_the_matching_file(tiny_ggufs, hub, env):
    repo = hub.add_repo(
        GGUF_REPO,
        {
            "README.md": b"# tiny GGUFs\n",
            "tiny-phi-2.Q8_0.gguf": tiny_ggufs["Q8_0"],
            "tiny-phi-2.F16.gguf": tiny_ggufs["F16"],
        },
    )
    result = ondevice(env, "pull", GGUF_REPO, "--quant", "Q8_0")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "phi-2:Q8_0\n" and "converting" not in result.stderr
    assert [r.path for r in hub.file_gets()] == [
        f"/{GGUF_REPO}/resolve/{repo.sha}/tiny-phi-2.Q8_0.gguf"
    ]
    entry = store.find("phi-2:Q8_0")
    assert entry.kind == "gguf" and entry.path.read_bytes() == tiny_ggufs["Q8_0"]
    assert entry.sha256 == repo.files["tiny-phi-2.Q8_0.gguf"].sha256
    assert entry.manifest["converter"] is None
    assert entry.manifest["source"]["files"][0]["path"] == "tiny-phi-2.Q8_0.gguf"

    absent = ondevice(env, "pull", GGUF_REPO, "--quant", "Q5_K_M")
    assert absent.returncode == 1
    assert "no Q5_K_M GGUF file" in absent.stderr and "tiny-phi-2.F16.gguf" in absent.stderr


def test_plan_matches_quant_names_exactly():
    def f(path):
        return RemoteFile(path, 1, "0" * 64, None)

    files = [f("m.Q4_K.gguf"), f("m-q4_k_m.gguf"), f("m.BF16.gguf"), f("m.F16.gguf")]
    assert [x.path for x in make_plan("o/r", files, "Q4_K_M").files] == ["m-q4_k_m.gguf"]
    assert [x.path for x in make_plan("o/r", files, "F16").files] == ["m.F16.gguf"]
    split = [f("m.Q8_0-00001-of-00002.gguf"), f("m.Q8_0-00002-of-00002.gguf")]
    with pytest.raises(DownloadError, match="split GGUF"):
        make_plan("o/r", split, "Q8_0")
    ckpt = [
        f("config.json"),
        f("model.safetensors"),
        f("pytorch_model.bin"),
        f("sub/x.safetensors"),
    ]
    assert [x.path for x in make_plan("o/r", ckpt, "Q4_K_M").files] == [
        "config.json",
        "model.safetensors",
    ]


# -- bad input -------------------------------------------------------------------------------


def test_bad_names_fail_before_the_network(env, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("reached the hub")

    monkeypatch.setattr("ondevice.pull._Hub", no_network)
    with pytest.raises(UsageError, match="not a hub repo id"):
        pull("not a repo")
    with pytest.raises(UsageError, match="unknown quantization type"):
        pull(REPO, quant="Q9_X")
    with pytest.raises(UsageError, match="can't be a store name"):
        pull(REPO, name="../up")


def test_bad_arguments_fail_cleanly(tiny_phi2, hub, env):
    hub.add_folder(REPO, tiny_phi2)
    for args, code, text in [
        (["pull", "tiny-org/missing"], 1, "no hub repo tiny-org/missing"),
        (["pull", REPO, "--revision", "v9"], 1, "has no revision 'v9'"),
    ]:
        result = ondevice(env, *args)
        assert result.returncode == code, (args, result.stderr)
        assert text in result.stderr and "Traceback" not in result.stderr
    assert hub.file_gets() == []
    assert_nothing_stored(env)
