"""The structure, checked: layers and import cycles, the one native boundary, function lengths,
and no process-wide side effects or POSIX-only imports when `ondevice` is imported.

The layers are read from the table in ondevice/__init__.py's docstring (the one place they are
written down); every import of every module is read with `ast`, the ones inside functions too.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
from pathlib import Path

import pytest
from conftest import PYTHON

ROOT = Path(__file__).resolve().parent.parent
# Where each importable package's files are in the source tree.
PACKAGES = {"ondevice": ROOT / "ondevice", "ondevice.convert": ROOT / "convert"}
PACKAGES["ondevice.quantize"] = ROOT / "quantize"
MAX_FUNCTION_LINES = 80


def layers() -> dict[str, int]:
    """Top-level name under ondevice (a module or a package) -> its layer's rank."""
    doc = ast.get_docstring(ast.parse((ROOT / "ondevice" / "__init__.py").read_text()))
    out: dict[str, int] = {}
    for rank, line in enumerate(re.findall(r"^\s*LAYER\s+\S+\s+(.+)$", doc or "", re.M)):
        for name in line.split():
            out[name] = rank
    return out


def modules() -> dict[str, Path]:
    """Every module of ours: dotted name -> file."""
    out: dict[str, Path] = {}
    for pkg, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            if pkg == "ondevice" and parts and parts[0] in ("convert", "quantize"):
                continue
            out[name] = path
    return out


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports(name: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for each of our modules `name` imports."""
    return [(t, line, f) for t, line, _, f in _imports(name, path)]


def _imports(name: str, path: Path) -> list[tuple[str, int, int, bool]]:
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if _type_checking_only(node, parents):
            continue
        in_func = any(
            isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef))
            for p in _ancestors(node, parents)
        )
        for target in _targets(node, name, is_pkg):
            if target == "ondevice" or target.startswith("ondevice."):
                out.append((target, node.lineno, node.end_lineno or node.lineno, in_func))
    return out


def _ancestors(node: ast.AST, parents: dict[ast.AST, ast.AST]):
    while node in parents:
        node = parents[node]
        yield node


def _targets(node: ast.Import | ast.ImportFrom, name: str, is_pkg: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        parent = name.split(".")
        parent = parent if is_pkg else parent[:-1]
        parent = parent[: len(parent) - (node.level - 1)]
        base = ".".join(parent + ([base] if base else []))
    # `from ondevice import app` imports the module ondevice.app
    known = modules()
    out = []
    for a in node.names:
        sub = f"{base}.{a.name}"
        out.append(sub if sub in known else base)
    return out


def layer_of(module: str, table: dict[str, int]) -> int:
    parts = module.split(".")
    if len(parts) == 1:  # the package itself
        return -1
    return table[parts[1]]


def test_every_module_has_a_layer():
    table = layers()
    assert table, "no LAYER lines in ondevice/__init__.py's docstring"
    missing = {m.split(".")[1] for m in modules() if "." in m} - set(table)
    assert not missing, f"modules without a layer in ondevice/__init__.py: {sorted(missing)}"


def test_no_upward_imports():
    table = layers()
    bad = []
    for name, path in modules().items():
        if name == "ondevice":
            continue
        mine = layer_of(name, table)
        for target, line, _ in imports(name, path):
            if target != "ondevice" and layer_of(target, table) > mine:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target} (a higher layer)")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph = {name: {t for t, _, _ in imports(name, path)} for name, path in modules().items()}
    for deps in graph.values():
        deps.discard("ondevice")
    # A package's own __init__ importing its modules is how packages work, not a cycle.
    for name in list(graph):
        graph[name] = {d for d in graph[name] if not d.startswith(name + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep) :] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep in graph and dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_function_level_imports_of_our_modules_say_why():
    """An import of our own module inside a function must explain itself in a comment (the
    only good reason: keeping a heavy optional dependency out of an import)."""
    bad = []
    for name, path in modules().items():
        lines = path.read_text().splitlines()
        for target, line, end, in_func in _imports(name, path):
            if in_func:
                text = "".join(lines[max(line - 2, 0) : end])
                if "#" not in text:
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {target} in a function")
    assert not bad, "\n".join(bad)


def test_only_the_native_package_talks_to_llama_cpp():
    bad = []
    for name, path in modules().items():
        if name.startswith("ondevice._native"):
            continue
        text = path.read_text()
        for m in re.finditer(r"^\s*(?:import llama_cpp|from llama_cpp)", text, re.M):
            bad.append(f"{path.relative_to(ROOT)}:{text[: m.start()].count(chr(10)) + 1}")
        # ctypes on the C library itself (prctl, mincore) is fine; on anything else it isn't.
        for m in re.finditer(r"\bctypes\.(?:CDLL|cdll\.LoadLibrary)\(([^)]*)\)", text):
            if not re.match(r"\s*(None|ctypes\.util\.find_library\(\"c\")", m.group(1)):
                bad.append(f"{path.relative_to(ROOT)} loads {m.group(1)} with ctypes")
    assert not bad, "llama_cpp used outside ondevice/_native: " + ", ".join(bad)


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    n = node.end_lineno - node.lineno + 1
    doc = ast.get_docstring(node, clean=False)
    first = node.body[0]
    if doc is not None and isinstance(first, ast.Expr):
        n -= first.end_lineno - first.lineno + 1
    return n


def test_no_function_is_longer_than_80_lines():
    long = []
    for _name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = _body_lines(node)
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not long, "\n".join(long)


# --- importing ondevice ---------------------------------------------------------------------------
_IMPORT_ALL = r"""
import importlib, json, os, sys
# Third-party libraries first (psutil's Linux backend itself needs resource; on Windows it has
# another), then POSIX-only modules made unimportable for our code, as on Windows.
for lib in ("psutil", "numpy", "click", "jinja2", "gguf", "platformdirs", "prompt_toolkit"):
    importlib.import_module(lib)
for name in ("resource", "fcntl", "termios"):
    sys.modules[name] = None  # `import resource` now raises ImportError
before = dict(os.environ)
names = json.loads(sys.argv[1])
failed = {}
for name in names:
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed[name] = f"{type(exc).__name__}: {exc}"
changed = sorted(k for k in set(os.environ) | set(before) if os.environ.get(k) != before.get(k))
print(json.dumps({"failed": failed, "env_changed": changed,
                  "llama_loaded": "llama_cpp" in sys.modules}))
"""


def _import_in_child(names: list[str]) -> dict:
    out = subprocess.run(
        [PYTHON, "-W", "ignore::DeprecationWarning", "-c", _IMPORT_ALL, json.dumps(names)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_module_imports_without_posix_only_modules_and_without_side_effects():
    """`import ondevice` (and every module of it) works where resource/fcntl don't exist, sets
    no environment variable (GOMP_SPINCOUNT is set by load(), documented there) and loads no
    llama.cpp library."""
    names = [n for n in modules() if not n.endswith("__main__") and "_worker" not in n]
    got = _import_in_child(names)
    assert got["failed"] == {}
    assert got["env_changed"] == []
    assert got["llama_loaded"] is False


@pytest.mark.parametrize("command", [["info", "demo"], ["fit", "demo", "--ram", "4GB"]])
def test_info_and_fit_do_not_load_llama_cpp(command):
    code = (
        "import sys\nfrom ondevice.cli import main\n"
        "try:\n    main(sys.argv[1:], standalone_mode=False)\nexcept SystemExit:\n    pass\n"
        "print('LOADED' if 'llama_cpp' in sys.modules else 'NOT LOADED')"
    )
    out = subprocess.run(
        [PYTHON, "-c", code, *command], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert out.stdout.strip().splitlines()[-1] == "NOT LOADED", out.stdout + out.stderr
