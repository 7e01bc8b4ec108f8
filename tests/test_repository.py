"""Repository invariants: `brcd/` never imports Ray; the method docs are inside the repository (no
pointer to a file a fresh clone lacks, every docs/METHOD.md anchor resolves); every documented
`brcd` command exists."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "brcd"
TEXT_FILES = [p for pattern in ("brcd/**/*.py", "pipelines/**/*.py", "tests/*.py", "benchmarks/**/*.py", "*.md", "docs/*.md")
              for p in ROOT.glob(pattern)]


def _library_modules() -> list[str]:
    mods = []
    for path in sorted(LIBRARY.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        mods.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return mods


def test_library_sources_never_import_ray():
    """Also catches imports inside functions, which importing the modules would not run."""
    offenders = []
    for path in sorted(LIBRARY.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else []
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                    "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
                names = [str(node.args[0].value)]
            else:
                continue
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] == "ray"]
    assert not offenders, f"brcd/ is the Ray-free library; move these to pipelines/: {offenders}"


@pytest.mark.slow  # a fresh interpreter imports torch, torchvision, timm, mlflow, sklearn (~20 s CPU)
def test_importing_every_library_module_leaves_ray_unimported():
    mods = _library_modules()
    assert "brcd.losses.brcd" in mods and "brcd.engine" in mods, mods
    code = (f"import importlib, sys\nfor m in {mods!r}:\n    importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", f"importing brcd pulled in Ray: {out.stdout[-500:]}"


def test_no_pointer_outside_the_repository():
    """The method sources of the first sessions lived next to the checkout (``../shared/...``) or at
    a machine path: a fresh clone cannot open them. docs/METHOD.md holds the method now."""
    pattern = re.compile(r"shared/(method|research|seeds)\b|/work/|\bmethods_spec\b|\bBRCD\.md\b")
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
            for p in TEXT_FILES if p.name != Path(__file__).name
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, "point these at docs/METHOD.md:\n" + "\n".join(hits)


def _github_slug(heading: str) -> str:
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def test_method_doc_anchors_resolve():
    method = ROOT / "docs" / "METHOD.md"
    slugs = {_github_slug(m) for m in re.findall(r"^#+ (.+)$", method.read_text(), flags=re.M)}
    links = [(p, a) for p in TEXT_FILES for a in re.findall(r"METHOD\.md#([\w\-]+)", p.read_text())]
    links += [(method, a) for a in re.findall(r"\]\(#([\w\-]+)\)", method.read_text())]
    assert len(links) >= 5, links
    broken = [f"{p.relative_to(ROOT)} -> #{a}" for p, a in links if a not in slugs]
    assert not broken, f"no such heading in docs/METHOD.md: {broken}; headings give {sorted(slugs)}"


def test_every_documented_subcommand_exists():
    """`brcd <command>` in the shell blocks of README.md and docs/*.md must be a command of the CLI
    (tests/test_cluster_config.py also parses the cluster ones in full)."""
    import argparse

    from pipelines.cli import build_parser

    subcommands = next(a.choices for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    documented = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```[a-z]*\n(.*?)```", path.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                documented += [(path.name, m) for m in re.findall(r"(?:^|\s)brcd\s+([a-z][\w-]*)", line.split(" #")[0])]
    assert len(documented) >= 20, documented
    missing = sorted({f"{name}: brcd {cmd}" for name, cmd in documented if cmd not in subcommands})
    assert not missing, f"documented but not in the CLI ({sorted(subcommands)}): {missing}"


def test_every_documented_command_line_parses():
    """Each `brcd ...` line of the shell blocks in README.md and docs/*.md is accepted by the CLI's parser
    as written (an option renamed in the code but not in the docs fails here)."""
    import shlex

    from pipelines.cli import build_parser

    parser = build_parser()
    bad, seen = [], 0
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", path.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].split(" | ")[0].strip().removesuffix("&").strip()
                if not line.startswith("brcd "):
                    continue
                seen += 1
                try:
                    parser.parse_args(shlex.split(line)[1:])
                except SystemExit:
                    bad.append(f"{path.name}: {line}")
    assert seen >= 20 and not bad, bad


def _project_imports() -> dict[str, set[tuple[str, str]]]:
    """Module -> {(imported module, imported name or "")} for every import in brcd/ and pipelines/, at any depth."""
    import ast

    root = Path(__file__).resolve().parent.parent
    files = {p: ".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
             for top in ("brcd", "pipelines") for p in (root / top).rglob("*.py")}
    modules = set(files.values())
    out: dict[str, set[tuple[str, str]]] = {}
    for path, mod in files.items():
        found = out.setdefault(mod, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update((a.name, "") for a in node.names if a.name.split(".")[0] in ("brcd", "pipelines", "benchmarks"))
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                    node.module.split(".")[0] in ("brcd", "pipelines", "benchmarks"):
                for a in node.names:  # `from pkg import module` is an import of that module
                    sub = f"{node.module}.{a.name}"
                    found.add((sub, "") if sub in modules else (node.module, a.name))
    return out


def test_imports_point_down_without_circles_or_private_names():
    """docs/ARCHITECTURE.md's rules: brcd/ never imports pipelines/, nothing imports benchmarks/, no module
    imports another's private name, and the import graph (lazy imports included) has no circle."""
    imports = _project_imports()
    up = sorted(f"{m} -> {t}" for m, ts in imports.items() for t, _ in ts
                if t.startswith("benchmarks") or (m.startswith("brcd") and t.startswith("pipelines")))
    private = sorted(f"{m}: from {t} import {n}" for m, ts in imports.items() for t, n in ts
                     if n.startswith("_") and not n.startswith("__") and t != m)
    assert not up and not private, (up, private)
    # a module's own package (__init__) is not an edge: it runs first whatever imports the module
    graph = {m: {t for t, _ in ts if t in imports and t != m and not m.startswith(t + ".")} for m, ts in imports.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            assert state.get(t) != 1, "import circle: " + " -> ".join(path[path.index(t):] + [t]) if t in path else t
            if t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_no_branch_on_the_model_kind_outside_its_registry():
    """Loading, encoding, pulling and serving ask brcd.models.kinds; nothing else tells the kinds apart."""
    root = Path(__file__).resolve().parent.parent
    pattern = re.compile(r"is_crossmodal_folder|isinstance\([^)]*\b(CrossModalModel|HashEncoder)\b")
    hits = [f"{p.relative_to(root)}:{i}" for top in ("brcd", "pipelines") for p in (root / top).rglob("*.py")
            if p.name != "kinds.py" for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits
