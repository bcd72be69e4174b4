"""The house rules, read from the code's own imports (module level and inside functions alike).

- ``serving`` imports nothing of the project's other packages (a serving host has no torch);
- ``training`` imports at most serving's contract modules (:data:`CONTRACT`), never ``export`` or the app layer;
- ``export`` imports ``training`` and serving's reading side (it loads what it wrote through the real reader to
  check itself), never the HTTP service layer or the app layer;
- ``promptclip`` (the app layer: command line, demo, server launcher) is the only package that imports all three;
- no import circle between any two of the project's modules.

Each rule is proven able to fail on a small planted tree (``test_checker_*``).
"""
from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("promptclip", "training", "export", "serving")

#: serving's contract modules: what training and serving must agree on (file formats and the class-name rule, the
#: bundle manifest, errors, the one decode/preprocessing path, the tokenizer). A module name or a package prefix.
CONTRACT = ("serving.format", "serving.manifest", "serving.errors", "serving.preprocess", "serving.tokenizer")
#: serving's HTTP layer: only the app layer may import it.
HTTP_LAYER = ("serving.service", "serving.settings", "serving.request_parsing", "serving.http_errors")


def _in(module: str, prefixes: Iterable[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def allowed(src: str, dst: str) -> bool:
    """Whether project module ``src`` may import project module ``dst``."""
    top_src, top_dst = src.split(".")[0], dst.split(".")[0]
    if top_src == top_dst or top_src == "promptclip":
        return True
    if top_src == "serving":
        return False
    if top_src == "training":
        return top_dst == "serving" and _in(dst, CONTRACT)
    if top_src == "export":
        return top_dst == "training" or (top_dst == "serving" and not _in(dst, HTTP_LAYER))
    return False


def project_modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of the project packages under ``root``."""
    out: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")) if (root / pkg).is_dir() else []:
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module that importing ``name`` executes last (longest known prefix), or None."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def import_edges(root: Path, *, packages_run: bool = True) -> dict[str, dict[str, int]]:
    """``{module: {imported project module: line}}`` for every import statement anywhere in a module.

    With ``packages_run``, an import of ``a.b.c`` is also an edge to the packages ``a.b`` and ``a`` whose
    ``__init__`` it runs (unless they are packages of the importing module, already being imported).
    """
    modules = project_modules(root)
    edges: dict[str, dict[str, int]] = {}
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        out: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import sub` imports the submodule when one exists, else a name of pkg
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                dst = _resolve(t, modules)
                if dst is None or dst == mod:
                    continue
                out.setdefault(dst, node.lineno)
                if not packages_run:
                    continue
                # importing a.b.c first runs the __init__ of a.b (and a) unless they are already importing,
                # i.e. unless they are packages of this module too
                parts = dst.split(".")
                for n in range(1, len(parts)):
                    pkg = ".".join(parts[:n])
                    if pkg in modules and not (mod == pkg or mod.startswith(pkg + ".")):
                        out.setdefault(pkg, node.lineno)
        edges[mod] = out
    return edges


def rule_violations(root: Path) -> list[str]:
    """One line per import that breaks the dependency rule."""
    modules = project_modules(root)
    return [f"{modules[src].relative_to(root)}:{line}: {src} imports {dst}"
            for src, dsts in sorted(import_edges(root, packages_run=False).items())
            for dst, line in sorted(dsts.items())
            if not allowed(src, dst)]


def import_circles(root: Path) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each sorted."""
    edges = import_edges(root)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:  # recursion depth <= number of modules (~100)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return groups


# -- the rules on the real tree ------------------------------------------------------------------------------------


def test_every_package_is_read():
    modules = project_modules(REPO)
    for pkg in PACKAGES:
        assert pkg in modules, f"package {pkg} not found under {REPO}"
    assert len(modules) > 40


def test_dependency_rule_holds():
    bad = rule_violations(REPO)
    assert not bad, "imports that break the dependency rule:\n" + "\n".join(bad)


def test_no_import_circles():
    circles = import_circles(REPO)
    assert not circles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in circles)


# -- the checker catches what it should -----------------------------------------------------------------------------


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir(exist_ok=True)
        (tmp_path / pkg / "__init__.py").touch()
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


@pytest.mark.parametrize("rel, text", [
    ("serving/a.py", "from training import x\n"),
    ("serving/a.py", "def f():\n    import export.bundle\n"),  # inside a function
    ("training/a.py", "def f():\n    from export import bundle\n"),
    ("training/a.py", "from serving.classifier import Classifier\n"),  # not a contract module
    ("training/a.py", "import promptclip\n"),
    ("export/a.py", "from serving.service import svc\n"),
    ("export/a.py", "from promptclip import cli\n"),
])
def test_checker_catches_rule_breaks(tmp_path, rel, text):
    files = {"serving/classifier.py": "", "serving/service.py": "", "export/bundle.py": "", "promptclip/cli.py": "",
             rel: text}
    assert rule_violations(_tree(tmp_path, files))


def test_checker_allows_the_rule(tmp_path):
    root = _tree(tmp_path, {
        "serving/format.py": "", "serving/bundle.py": "from . import format\n",
        "training/a.py": "from serving.format import X\nfrom serving import errors\n", "serving/errors.py": "",
        "export/a.py": "from training import a\nfrom serving.bundle import load\n",
        "promptclip/cli.py": "import export.a, training.a, serving.bundle\n",
    })
    assert rule_violations(root) == []


def test_checker_finds_circles_through_functions_and_relative_imports(tmp_path):
    root = _tree(tmp_path, {
        # engine -> methods/__init__ (run by importing methods.base) -> disa -> callbacks -> engine
        "training/engine.py": "from training.methods.base import PromptMethod\n",
        "training/methods/__init__.py": "from . import base, disa\n",
        "training/methods/base.py": "",
        "training/methods/disa.py": "from ..callbacks import Callback\n",
        "training/callbacks.py": "def f():\n    from training.engine import Callback\n",
    })
    assert import_circles(root) == [["training.callbacks", "training.engine", "training.methods",
                                     "training.methods.disa"]]
    (root / "training/callbacks.py").write_text("class Callback: ...\n")
    assert import_circles(root) == []
