"""The package's layout: one package per chapter plus ``common``, imports that only point back to
earlier chapters, no import cycles, imports at module top except where a comment says why, short
functions."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "qlora_helpers"
MODULES = sorted(p for p in PKG.rglob("*.py"))
MAX_FUNCTION_LINES = 60
# the two places where imports stay inside functions, and why
LAZY = {
    "qlora_helpers/cli.py": "imports only the module of the command being run, so --help answers without torch",
    "qlora_helpers/ch05_multi_gpu/worker.py": "peft and bitsandbytes load in each rank, after notebook_launcher forks",
}


def dotted(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def chapter(module: str) -> int | None:
    """0 for common (and the top-level CLI), N for chN_*."""
    part = module.split(".")[1] if module.count(".") else ""
    return int(part[2:4]) if part.startswith("ch") else 0


def imports(path: Path, top_only: bool):
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qlora_helpers"):
            for alias in node.names:           # `from package import module` points at the module
                sub = f"{node.module}.{alias.name}"
                is_module = (ROOT / Path(*sub.split("."))).with_suffix(".py").is_file()
                yield node, sub if is_module else node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("qlora_helpers"):
                    yield node, alias.name


@pytest.mark.parametrize("path", MODULES, ids=lambda p: dotted(p))
def test_a_chapter_imports_only_common_and_earlier_chapters(path):
    here = chapter(dotted(path))
    for node, target in imports(path, top_only=False):
        there = chapter(target)
        assert there <= here, f"{path.relative_to(ROOT)}:{node.lineno} imports {target}, a later chapter"
        if dotted(path).startswith("qlora_helpers.common"):
            ok = target == "qlora_helpers" or target.startswith("qlora_helpers.common")
            assert ok, f"{path.relative_to(ROOT)}:{node.lineno}: common imports {target}"


def test_no_import_cycles():
    graph = {dotted(p): {t for _, t in imports(p, top_only=True)} for p in MODULES}
    graph = {m: ({t if t in graph else t.rsplit(".", 1)[0] for t in ts} & set(graph)) - {m} for m, ts in graph.items()}
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for t in graph[m]:
            if t.startswith(m + ".") or m.startswith(t + ".") and t == m.rsplit(".", 1)[0]:
                continue                   # a package and its own modules
            assert state.get(t) != "open", "import cycle: " + " -> ".join([*stack, m, t])
            if t not in state:
                visit(t, [*stack, m])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [])


def lazy_imports(path: Path):
    """Imports inside functions that are not optional dependencies (``try: ... except ImportError``)."""
    tree = ast.parse(path.read_text())
    optional = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try)
                and any("Import" in ast.unparse(h.type) for h in t.handlers if h.type) for n in ast.walk(t)}
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in optional:
                    yield node


@pytest.mark.parametrize("path", MODULES, ids=lambda p: dotted(p))
def test_imports_at_module_top_except_where_a_reason_is_stated(path):
    rel = str(path.relative_to(ROOT))
    lazy = list(lazy_imports(path))
    if rel in LAZY:
        assert not lazy or "# lazy:" in path.read_text(), f"{rel}: say why its imports are lazy in a '# lazy:' comment"
        return
    assert not lazy, f"{rel}:{lazy[0].lineno if lazy else ''}: move the import to the module top"


def test_help_answers_without_torch():
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "qlora_helpers", "--help"],
                          capture_output=True, text=True, cwd=ROOT, check=True)
    assert "estimate" in done.stdout and "sft" in done.stdout
    loaded = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in done.stderr.splitlines() if "|" in line}
    assert not loaded & {"torch", "transformers", "bitsandbytes", "peft"}


def test_the_multi_gpu_package_leaves_the_kernel_ready_to_launch():
    """What chapter 05's notebook imports before notebook_launcher loads neither peft nor bitsandbytes."""
    code = ("import sys; import qlora_helpers.ch05_multi_gpu, qlora_helpers.ch01_memory, qlora_helpers.common; "
            "print([m for m in ('bitsandbytes', 'peft') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: dotted(p))
def test_functions_are_short(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            assert lines <= MAX_FUNCTION_LINES, f"{path.relative_to(ROOT)}:{node.lineno} {node.name} has {lines} lines"
