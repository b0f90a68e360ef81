"""The README stays true: its CLI reference is what the code prints (cog), and its Quickstart
test command is the one `.ci/run` runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def quickstart(marker: str) -> str:
    lines = README.read_text().splitlines()
    i = next(n for n, line in enumerate(lines) if line.startswith(f"<!-- quickstart-{marker}"))
    assert lines[i + 1].startswith("```")
    return lines[i + 2]


def test_quickstart_has_exactly_two_commands():
    demo, test = quickstart("demo"), quickstart("test")
    assert "pip install '.[demo]'" in demo and demo.endswith("ondevice chat demo")
    assert "pip install '.[test]'" in test and test.endswith("pytest")
    assert (ROOT / ".ci" / "run").read_text().count("quickstart-test") == 1


def test_cli_reference_is_current():
    if not README.exists() or "[[[cog" not in README.read_text():
        pytest.skip("README has no cog section")
    r = subprocess.run(
        [sys.executable, "-m", "cogapp", "--check", str(README)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode == 0, "README CLI reference is stale: run `cog -r README.md`\n" + r.stderr


def readme_examples() -> dict[str, str]:
    """The README's Python examples marked `<!-- readme-example: NAME -->`."""
    lines = README.read_text().splitlines()
    out = {}
    for n, line in enumerate(lines):
        if line.startswith("<!-- readme-example:"):
            name = line.split(":", 1)[1].strip(" ->")
            assert lines[n + 1].startswith("```python")
            end = next(i for i in range(n + 2, len(lines)) if lines[i].startswith("```"))
            out[name] = "\n".join(lines[n + 2 : end])
    return out


@pytest.mark.parametrize("name", ["structured", "tools"])
def test_readme_examples_run_as_written(name, tmp_path):
    import os

    import ondevice

    code = readme_examples()[name]
    env = dict(os.environ)  # the same ondevice as this test imported, from any folder
    here = str(Path(ondevice.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip()


def test_no_merge_conflict_markers_in_the_docs_and_sources():
    """A merge once left `<<<<<<< HEAD` in SECURITY.md: the documents users read stay whole."""
    suffixes = {".md", ".py", ".toml", ".txt", ".js", ".css", ".html", ".sh", ".in", ""}
    found = []
    for path in sorted(ROOT.rglob("*")):
        parts = path.relative_to(ROOT).parts
        if not path.is_file() or path.suffix not in suffixes or parts[0].startswith("."):
            continue
        if parts[0] in {"build", "dist", "node_modules"} or path.stat().st_size > 2_000_000:
            continue
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if line.startswith(("<<<<<<< ", ">>>>>>> ")) or line == "<<<<<<<":
                found.append(f"{path.relative_to(ROOT)}:{n}")
    assert not found, found
