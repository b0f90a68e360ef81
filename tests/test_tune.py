"""`ondevice tune` on the real demo model with tiny time budgets: the stored result, load()
applying it (and --no-tune / tune=False not), RAM budgets excluding settings, and the
faithfulness check rejecting a model whose outputs differ (a damaged copy of the file).

Speeds are never asserted: which setting wins on this shared machine is a measurement, not a
property of the code. Timings belong in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from dataclasses import asdict, fields

import pytest
from click.testing import CliRunner
from conftest import PYTHON

import ondevice
from ondevice import fit, tune, tune_store
from ondevice._native import binding
from ondevice.cli import main
from ondevice.errors import UsageError
from ondevice.gguf_header import read_header

CTX = 64


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("tune-home")
    mp.setenv("ONDEVICE_HOME", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="module")
def tuned(home, demo_path):
    return tune.tune(
        demo_path,
        "short",
        n_ctx=CTX,
        time_budget=15,
        knobs=("threads", "flash_attn", "repack", "n_ubatch"),
        progress=print,
    )


@pytest.fixture(scope="module")
def damaged(tmp_path_factory, demo_path):
    """A copy of the demo model with a third of its FFN down-projections zeroed: a valid file,
    the same vocabulary, different outputs."""
    out = tmp_path_factory.mktemp("damaged") / "damaged.gguf"
    shutil.copy(demo_path, out)
    h = read_header(out)
    zero = {f"blk.{i}.ffn_down.weight" for i in range(0, 30, 3)}
    with open(out, "r+b") as fh:
        for t in h.tensors:
            if t.name in zero:
                fh.seek(h.data_offset + t.offset)
                fh.write(bytes(t.n_bytes))
    return out


def _entry(home):
    data = json.loads((home / "config" / "tunings.json").read_text())
    assert data["format"] == 1
    assert len(data["tunings"]) == 1
    return data["tunings"][0]


def test_stored_result_shape(tuned, home, demo_path):
    e = _entry(home)
    assert e["model_sha256"] == hashlib.sha256(demo_path.read_bytes()).hexdigest()
    assert e["model_bytes"] == demo_path.stat().st_size
    assert e["workload"] == "short" and e["n_ctx"] == CTX
    assert e["device_id"] == tune_store.device_id()
    assert set(e["settings"]) == {f.name for f in fields(tune.Settings)}
    assert e["settings"] == asdict(tuned.settings)
    assert e["settings"]["flash_attn"] in ("on", "off")  # "auto" is stored as what it chose
    assert e["speedup"] > 0 and e["workload_tps"] > 0 and e["default_workload_tps"] > 0
    assert "short" in e["how"] and "interpolated" in e["how"]
    # The defaults are measured first; every candidate was measured or says why not.
    assert tuned.probes[0] is tuned.defaults and tuned.defaults.status == "ok"
    for p in tuned.probes:
        if p.status == "ok":
            assert p.costs and p.peak_rss_bytes > 0 and p.pp and p.tg
            assert all(v > 0 for v in [*p.pp.values(), *p.tg.values()])
        else:
            assert p.reason
    if tuned.best is not tuned.defaults:
        f = tuned.faithfulness
        assert f is not None and f.passed and f.kl_mean <= tune.KL_MAX
    # Repacking can't be a candidate on AMX builds: listed as unavailable, never loaded.
    if binding.amx_compiled():
        assert "AMX" in tuned.unavailable["repack"]
        assert not any(p.settings.repack for p in tuned.probes)
    # The file's hash is cached by path, size and mtime.
    cache = json.loads((home / "config" / "sha256-cache.json").read_text())
    hit = cache[str(demo_path.resolve())]
    assert hit["sha256"] == e["model_sha256"] and hit["size"] == e["model_bytes"]


def test_load_applies_the_tuning(tuned, home, demo_path):
    want = _entry(home)["settings"]
    with ondevice.load(demo_path, n_ctx=CTX) as m:
        for key in ("threads", "n_ubatch", "n_batch", "use_mmap", "kv_type"):
            assert m.settings[key] == want[key], key
            assert m.settings_source[key] == "tuned", key
        cfg = m.config
        assert (cfg.threads, cfg.n_ubatch, cfg.use_mmap) == (
            want["threads"],
            want["n_ubatch"],
            want["use_mmap"],
        )
        if want["flash_attn"] != "auto":
            assert cfg.flash_attn == want["flash_attn"]
        stats = m.generate("Hi", max_tokens=2).stats
        assert any("tuned by `ondevice tune`" in n for n in stats.notes)
    # An explicit argument wins over the tuning; tune=False ignores it altogether.
    other = 1 if want["threads"] != 1 else 2
    with ondevice.load(demo_path, n_ctx=CTX, threads=other) as m:
        assert m.threads == other and m.settings_source["threads"] == "argument"
        assert m.settings_source["n_ubatch"] == "tuned"
    with ondevice.load(demo_path, n_ctx=CTX, tune=False) as m:
        assert "tuned" not in m.settings_source.values()
        assert not any("ondevice tune" in n for n in m.notes)
        assert m.settings["n_ubatch"] == 512
    with pytest.raises(UsageError):
        ondevice.load(demo_path, n_ctx=CTX, tune="marathon")


def test_cli_no_tune_and_system(tuned, home):
    runner = CliRunner()
    args = ["run", "demo", "Hi", "-n", "2", "--ctx", str(CTX), "--temperature", "0", "--json"]
    with_tuning = runner.invoke(main, args)
    assert with_tuning.exit_code == 0, with_tuning.output
    assert any("tuned by" in n for n in json.loads(with_tuning.stdout)["stats"]["notes"])
    without = runner.invoke(main, [*args, "--no-tune"])
    assert without.exit_code == 0, without.output
    assert not any("tuned by" in n for n in json.loads(without.stdout)["stats"]["notes"])

    sys_json = runner.invoke(main, ["system", "--json"])
    assert sys_json.exit_code == 0, sys_json.output
    mine = json.loads(sys_json.stdout)["tunings"]["this_device"]
    assert [e["workload"] for e in mine] == ["short"]
    text = runner.invoke(main, ["system"]).stdout
    assert "Tunings:   1 for this device" in text and "SmolLM2-135M-Instruct" in text

    bad = runner.invoke(main, ["tune", "demo", "--knobs", "threads,turbo"])
    assert bad.exit_code == 2 and "turbo" in bad.output


def test_tuning_is_per_file_contents(tuned, damaged, demo_path):
    # Same size, other bytes: the stored tuning is not this file's.
    assert damaged.stat().st_size == demo_path.stat().st_size
    assert tune_store.lookup(demo_path) is not None
    assert tune_store.lookup(damaged) is None
    assert tune_store.lookup(demo_path, "chat") is None  # only "short" was tuned


def test_faithfulness_rejects_a_model_whose_outputs_differ(damaged, demo_path):
    base = tune.default_settings(threads=2)
    bad = tune.check_faithful(damaged, base, base, reference_model=demo_path, n_ctx=CTX)
    print("damaged file:", bad)
    assert not bad.passed and bad.kl_mean > tune.KL_MAX and "KL" in bad.reason
    same = tune.check_faithful(demo_path, base, base, n_ctx=CTX)
    assert same.passed and same.kl_mean < 1e-6 and same.top1 == 1.0
    assert same.n_positions == bad.n_positions == CTX - 1


def test_ram_budget_excludes_settings(demo_path, cli_env):
    # At ctx 8192 an f16 KV cache needs ~90 MB more than q8_0: a budget between the two
    # predictions leaves q8_0 the only candidate that may be loaded.
    h = read_header(demo_path)
    pred = {
        kv: fit.predict(h, 8192, kv, 512, repack=tune.repack_usable()).predicted_peak_bytes
        for kv in ("f16", "q8_0")
    }
    budget = (pred["f16"] + pred["q8_0"]) // 2
    out = subprocess.run(
        [PYTHON, "-m", "ondevice", "tune", "demo", "--workload", "short", "--ctx", "8192"]
        + ["--knobs", "kv_type", "--ram", str(budget), "--no-save", "--json"],
        capture_output=True,
        text=True,
        env=cli_env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["defaults"]["status"] == "excluded" and "predicted" in r["defaults"]["reason"]
    assert r["speedup"] is None
    assert r["best"]["settings"]["kv_type"] == "q8_0"
    for p in r["probes"]:
        if p["settings"]["kv_type"] in ("f16", "bf16"):
            assert p["status"] == "excluded" and not p["costs"]
        if p["status"] == "ok":
            assert p["peak_rss_bytes"] <= budget


def test_workload_cost_model():
    for name in tune.WORKLOADS:
        segs = tune.workload_segments(name, 2048)
        assert all(0 <= s.depth0 < s.depth1 <= 2048 for s in segs)
        pts = tune.depth_points(segs, 2048)
        assert all(0 <= d < 2048 - tune.TG_BLOCK for d in pts)
    chat = tune.workload_segments("chat", 2048)
    assert sum(s.tokens for s in chat) == 2048
    assert tune.depth_points(chat, 2048) == [0, 1024, 2048 - 64 - 2]
    # A cost linear in depth averages to its middle value.
    assert tune._mean_over([(0, 1.0), (1000, 3.0)], 0, 1000) == pytest.approx(2.0)
    assert tune._mean_over([(500, 2.0)], 0, 1000) == 2.0
    with pytest.raises(UsageError):
        tune.workload_segments("marathon", 2048)
