"""Conventions every chapter follows, checked on the files in git."""

import ast
import json
import re
from pathlib import Path

import pytest
import tomllib
import yaml

from qlora_helpers.common import outputs, runner

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = runner.discover()          # the chapters' core notebooks and their companions, in order


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_outputs_belong_to_their_cells(path):
    """The notebooks carry the canonical CPU run's outputs; a cell edited (or added) since then is stale."""
    nb = json.loads(path.read_text())
    fix = f"run: python -m qlora_helpers run --write-back {path.stem}"
    stale = outputs.stale_cells(nb)
    assert not stale, f"{path.name}: " + "; ".join(stale[:3]) + f" ({len(stale)} stale cells): {fix}"
    assert not outputs.widget_state(nb), f"{path.name}: widget state is committed: {fix}"
    assert nb["metadata"][outputs.KEY]["outputs"]["device"]["type"] == "cpu"


def test_committed_notebooks_stay_small():
    total = sum(p.stat().st_size for p in NOTEBOOKS)
    assert total < 5 * 2**20, f"the notebooks hold {total / 2**20:.1f} MB with outputs: lower the plots' dpi"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_one_parameters_cell_with_profile_and_max_steps(path):
    nb = json.loads(path.read_text())
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"{path.name}: exactly one cell tagged 'parameters'"
    source = "".join(cells[0]["source"])
    names = {node.target.id: node for node in ast.parse(source).body if isinstance(node, ast.AnnAssign)}
    # every notebook takes a profile; one that trains (every core notebook) also takes max_steps
    assert {"profile"} | ({"max_steps"} if not runner.is_companion(path) else set()) <= set(names)
    import papermill  # papermill must parse every parameter (quotes in a comment can defeat it)
    assert set(papermill.inspect_notebook(str(path))) == set(names), f"{path.name}: papermill misreads a parameter"
    for line in source.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            assert "#" in line, f"{path.name}: give each parameter a comment: {line!r}"
    assert nb["cells"][0]["cell_type"] == "markdown", f"{path.name}: start with prose"


def test_environment_yml_matches_pyproject():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert [p for p in pip if not p.startswith("-e")] == deps
    assert "-e .[test]" in pip and "python=3.11" in env["dependencies"]


def test_readme_commands_are_the_ones_ci_and_make_run():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```(?:bash|sh)\n(.*?)```", readme, re.S).group(1)
    commands = [l for l in block.splitlines() if l.strip() and not l.startswith("#")]
    assert commands == ["make course", "make test"]
    assert re.search(r"^make test\b", (ROOT / ".ci" / "run").read_text(), re.M)
    targets = re.findall(r"^([a-z]+):", (ROOT / "Makefile").read_text(), re.M)
    assert {"course", "test"} <= set(targets)


def test_readme_lists_every_notebook_in_order():
    readme = (ROOT / "README.md").read_text()
    positions = [readme.find(p.name) for p in NOTEBOOKS]
    assert -1 not in positions and positions == sorted(positions)


def test_readme_course_time_is_the_measured_one():
    """The README quotes the AVX2 timing in benchmarks/results/course_cpu.json: the 2-core CPU held to AVX2 kernels
    as most laptops are (fp32 compute), the other timing being the same CPU with native bf16 allowed."""
    figures = json.loads((ROOT / "benchmarks" / "results" / "course_cpu.json").read_text())["figures"]
    modes = figures["modes"]
    assert set(modes) == {"native", "avx2"}
    assert modes["avx2"]["cpu"] == {"capability": "AVX2", "bf16": False, "compute_dtype": "float32"}
    for mode in modes.values():
        assert set(mode["notebooks"]) == {p.stem for p in NOTEBOOKS}, "re-run python -m benchmarks.course_time"
    assert figures["quoted_mode"] == "avx2"
    assert (figures["total_seconds"], figures["core_seconds"]) == (modes["avx2"]["total_seconds"],
                                                                   modes["avx2"]["core_seconds"])
    assert figures["total_seconds"] < 30 * 60, "the course must stay under 30 minutes on a laptop CPU"
    assert figures["core_seconds"] < 15.5 * 60, "make course's core path must stay about 15 minutes on a laptop CPU"
    readme = (ROOT / "README.md").read_text()
    core = re.search(r"Measured on a 2-core CPU without native bf16, as most laptops are: the chapters' core path "
                     r"about (\d+) minutes,\s+about (\d+) minutes with the companion notebooks", readme)
    assert core, "the README's course time sentence changed: keep it in step with this test"
    assert int(core.group(1)) == round(figures["core_seconds"] / 60)
    assert int(core.group(2)) == round(figures["total_seconds"] / 60)


def test_repo_root_is_found_from_any_folder(tmp_path):
    """Notebooks run from notebooks/, commands from anywhere: the checkout is found from the package's place."""
    import subprocess
    import sys

    code = "from qlora_helpers.common.files import repo_root; print(repo_root())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert Path(done.stdout.strip()) == ROOT
