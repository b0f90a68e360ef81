"""The local model store: names, manifests, lookup through locate.resolve, rm, and the CLI's
`list` / `rm` in a real subprocess. The network side (`pull`) is in test_pull.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ondevice import locate, store
from ondevice.errors import ModelNotFound, UsageError

PYTHON = sys.executable  # the suite's subprocesses run the same interpreter as pytest


@pytest.fixture
def home(tmp_path, monkeypatch):
    path = tmp_path / "ondevice-home"
    monkeypatch.setenv("ONDEVICE_HOME", str(path))
    return path


def put(name, quant, data=b"GGUF-bytes", *, repo="microsoft/phi-2", created=None, commit=None):
    """Install an entry the way pull does: a staged file in a work folder, then install()."""
    with store.work_dir() as work:
        staged = work / "x.gguf"
        staged.write_bytes(data)
        return store.install(
            staged,
            {
                "name": name,
                "quant": quant,
                "size": len(data),
                "sha256": store.sha256_file(staged),
                "source": {"repo": repo, "revision": "main", "commit": commit or "ab" * 20},
                "kind": "converted",
                "converter": {"name": "ondevice.convert", "version": "0.1.0"},
                "created": created or store.now_iso(),
            },
        )


def test_home_follows_env_and_defaults_to_user_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("ONDEVICE_HOME", str(tmp_path / "h"))
    assert store.home() == tmp_path / "h"
    monkeypatch.delenv("ONDEVICE_HOME")
    import platformdirs

    assert store.home() == Path(platformdirs.user_data_dir("ondevice", appauthor=False))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("phi-2", ("phi-2", None)),
        ("phi-2:Q4_K_M", ("phi-2", "Q4_K_M")),
        ("phi-2:q8_0", ("phi-2", "Q8_0")),
        ("microsoft/phi-2", ("microsoft/phi-2", None)),
        ("microsoft/phi-2:F16", ("microsoft/phi-2", "F16")),
        ("phi-2:", None),
        ("../phi-2", None),
        ("a/b/c", None),
        ("C:\\models\\x.gguf", None),
        ("phi 2", None),
        ("", None),
    ],
)
def test_parse_ref(text, expected):
    assert store.parse_ref(text) == expected


def test_name_for_repo():
    assert store.name_for_repo("microsoft/phi-2") == "phi-2"
    assert store.name_for_repo("TheBloke/phi-2-GGUF") == "phi-2"
    assert store.name_for_repo("someone/Phi-2.gguf") == "Phi-2"
    with pytest.raises(UsageError):
        store.check_name("..")


def test_install_writes_file_and_manifest_and_lookup_finds_it(home):
    entry = put("phi-2", "Q8_0", b"some gguf bytes")
    assert entry.path == home / "models" / "phi-2" / "phi-2.Q8_0.gguf"
    assert entry.path.read_bytes() == b"some gguf bytes"
    manifest = json.loads(entry.manifest_path.read_text())
    assert manifest["file"] == "phi-2.Q8_0.gguf"
    assert manifest["sha256"] == store.sha256_file(entry.path)
    assert manifest["source"]["repo"] == "microsoft/phi-2"
    assert store.lookup("phi-2:Q8_0") == entry.path
    assert store.lookup("phi-2:q8_0") == entry.path  # quant names are case-insensitive
    assert store.lookup("phi-2") == entry.path  # the only quant is the default
    assert store.lookup("microsoft/phi-2") == entry.path  # by source repo
    assert store.lookup("phi-2:Q4_K_M") is None
    assert store.lookup("other") is None
    # locate.resolve (every MODEL argument) goes through the store for such names
    assert locate.resolve("phi-2:Q8_0") == entry.path
    with pytest.raises(ModelNotFound):
        locate.resolve("phi-2:Q4_K_M")
    # nothing left in the work area
    assert list((home / "tmp").iterdir()) == []


def test_bare_name_prefers_default_quant_else_newest(home):
    old = put("phi-2", "Q8_0", created="2026-01-01T00:00:00Z")
    newer = put("phi-2", "F16", created="2026-02-01T00:00:00Z")
    assert store.find("phi-2") == newer
    default = put("phi-2", "Q4_K_M", created="2025-01-01T00:00:00Z")
    assert store.find("phi-2") == default
    assert store.find("phi-2:Q8_0") == old
    assert store.most_recent() == newer
    put("tinyllama", "Q4_0", created="2026-03-01T00:00:00Z")
    assert store.most_recent().ref == "tinyllama:Q4_0"
    assert [e.ref for e in store.entries()] == [
        "phi-2:F16",
        "phi-2:Q4_K_M",
        "phi-2:Q8_0",
        "tinyllama:Q4_0",
    ]


def test_empty_store(home):
    assert store.entries() == []
    assert store.most_recent() is None
    assert store.lookup("phi-2") is None


def test_reinstall_replaces_entry(home):
    put("phi-2", "Q8_0", b"first", commit="11" * 20)
    second = put("phi-2", "Q8_0", b"second!", commit="22" * 20)
    assert [e.ref for e in store.entries()] == ["phi-2:Q8_0"]
    assert store.find("phi-2").commit == "22" * 20
    assert second.path.read_bytes() == b"second!"


def test_interrupted_install_leaves_no_entry(home, monkeypatch):
    real_replace = os.replace

    def crash_on_manifest(src, dst):
        if str(dst).endswith(".json"):
            raise KeyboardInterrupt  # killed between the GGUF's rename and the manifest's
        real_replace(src, dst)

    monkeypatch.setattr(store.os, "replace", crash_on_manifest)
    with pytest.raises(KeyboardInterrupt):
        put("phi-2", "Q8_0")
    monkeypatch.setattr(store.os, "replace", real_replace)
    assert store.entries() == []
    assert store.lookup("phi-2") is None
    assert not list((home / "models" / "phi-2").glob("*.json")), "no manifest, not even a temp"
    assert list((home / "tmp").iterdir()) == [], "the work folder is removed"


def test_interrupted_reinstall_leaves_no_stale_manifest(home, monkeypatch):
    put("phi-2", "Q8_0", b"old", commit="11" * 20)
    real_replace = os.replace

    def crash_on_manifest(src, dst):
        if str(dst).endswith(".json"):
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(store.os, "replace", crash_on_manifest)
    with pytest.raises(KeyboardInterrupt):
        put("phi-2", "Q8_0", b"new file", commit="22" * 20)
    monkeypatch.setattr(store.os, "replace", real_replace)
    # the old manifest must not survive to describe the new file
    assert store.entries() == []


def test_killed_pull_work_folders_are_cleaned(home):
    stale = home / "tmp" / "999999999-dead"
    stale.mkdir(parents=True)
    (stale / "half.gguf").write_bytes(b"x" * 100)
    put("phi-2", "Q8_0")
    assert not stale.exists()


def test_damaged_entries(home):
    good = put("phi-2", "Q8_0", b"abcdef")
    other = put("phi-2", "F16", b"abcdefgh")
    other.path.unlink()
    with pytest.raises(ModelNotFound, match="missing"):
        store.lookup("phi-2:F16")
    good.path.write_bytes(b"abc")
    with pytest.raises(ModelNotFound, match="3 bytes"):
        locate.resolve("phi-2:Q8_0")
    # a broken or hostile manifest is skipped, the others still list
    (home / "models" / "phi-2" / "junk.json").write_text("{not json")
    evil = dict(json.loads(good.manifest_path.read_text()), file="../../outside.gguf")
    (home / "models" / "phi-2" / "evil.json").write_text(json.dumps(evil))
    assert sorted(e.ref for e in store.entries()) == ["phi-2:F16", "phi-2:Q8_0"]


def test_remove(home):
    put("phi-2", "Q8_0")
    put("phi-2", "F16")
    with pytest.raises(UsageError, match="names 2 models"):
        store.remove("phi-2")
    removed = store.remove("phi-2:F16")
    assert removed.ref == "phi-2:F16"
    assert not removed.path.exists() and not removed.manifest_path.exists()
    assert store.remove("phi-2").ref == "phi-2:Q8_0"  # unambiguous now
    assert not (home / "models" / "phi-2").exists()
    with pytest.raises(ModelNotFound):
        store.remove("phi-2")


def cli(*args, env):
    return subprocess.run(
        [PYTHON, "-m", "ondevice", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_cli_list_and_rm(cli_env, monkeypatch):
    monkeypatch.setenv("ONDEVICE_HOME", cli_env["ONDEVICE_HOME"])
    empty = cli("list", env=cli_env)
    assert empty.returncode == 0 and empty.stdout == "" and "no models" in empty.stderr
    assert json.loads(cli("list", "--json", env=cli_env).stdout) == []

    put("phi-2", "Q4_K_M", b"x" * 3000, created="2026-11-26T10:00:00Z")
    put("phi-2", "Q8_0", b"y" * 5000, created="2026-11-26T11:00:00Z")
    table = cli("list", env=cli_env)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["NAME", "QUANT", "SIZE", "SOURCE", "PULLED"]
    assert lines[1].split() == [
        "phi-2", "Q4_K_M", "2.9", "KiB", "microsoft/phi-2@abababab", "2026-11-26", "10:00",
    ]  # fmt: skip
    listed = json.loads(cli("list", "--json", env=cli_env).stdout)
    assert [(d["ref"], d["size"]) for d in listed] == [("phi-2:Q4_K_M", 3000), ("phi-2:Q8_0", 5000)]

    ambiguous = cli("rm", "phi-2", env=cli_env)
    assert ambiguous.returncode == 2 and ambiguous.stderr.startswith("error: phi-2 names 2")
    done = cli("rm", "phi-2:Q8_0", env=cli_env)
    assert done.returncode == 0 and done.stdout.strip() == "removed phi-2:Q8_0 (4.9 KiB)"
    missing = cli("rm", "phi-2:Q8_0", env=cli_env)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert missing.stderr.startswith("error: no model 'phi-2:Q8_0' in the store")
    assert [d["ref"] for d in json.loads(cli("list", "--json", env=cli_env).stdout)] == [
        "phi-2:Q4_K_M"
    ]
