"""The papermill harness: parameters, results, summary, and failures named by notebook and cell."""

import json

import nbformat
import pytest

from qlora_helpers.common import runner


def _notebook(path, cells):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell('profile: str = "auto"\nmax_steps: int = 60')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params] + [nbformat.v4.new_code_cell(c) for c in cells]
    nbformat.write(nb, path)
    return path


@pytest.mark.parametrize("text,value", [("2", 2), ("0.5", 0.5), ("true", True), ("cpu", "cpu"),
                                        ("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B"), ("1e-4", "1e-4")])
def test_parse_value(text, value):
    assert runner.parse_value(text) == value


def test_runs_into_run_folder_with_parameters_and_summary(tmp_path):
    book = _notebook(tmp_path / "07_demo.ipynb", [
        "from qlora_helpers.common.files import save_results",
        "save_results('07_demo', {'steps_seen': max_steps * 10, 'profile': profile})"])
    run_dir, runs = runner.run_notebooks([str(book)], {"max_steps": 3}, tmp_path / "run", progress=False)
    assert [r.status for r in runs] == ["ok"]
    assert json.loads((run_dir / "07_demo" / "07_demo.json").read_text()) == {"steps_seen": 30, "profile": "auto"}
    assert (run_dir / "07_demo" / "07_demo.ipynb").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["notebooks"][0]["results"]["steps_seen"] == 30
    assert "| 07_demo | ok |" in (run_dir / "summary.md").read_text()


def test_a_relative_run_dir_is_taken_from_the_current_folder(tmp_path, monkeypatch):
    """The kernel runs in the notebook's folder: a relative run folder must not be read from there."""
    (tmp_path / "books").mkdir()
    book = _notebook(tmp_path / "books" / "07_demo.ipynb", [
        "from qlora_helpers.common.files import save_results", "save_results('07_demo', {'ok': 1})"])
    monkeypatch.chdir(tmp_path)
    run_dir, runs = runner.run_notebooks([str(book)], {}, "runs/relative", progress=False)
    assert [r.status for r in runs] == ["ok"], runs[0].error
    assert run_dir == tmp_path / "runs" / "relative" and runs[0].results == {"ok": 1}
    assert not (tmp_path / "books" / "runs").exists()


def test_failure_names_notebook_cell_and_error(tmp_path):
    book = _notebook(tmp_path / "08_broken.ipynb", ["x = 1", "raise ValueError('lora_r must be > 0')"])
    run_dir, runs = runner.run_notebooks([str(book)], {}, tmp_path / "run", progress=False)
    assert runs[0].status == "failed"
    assert runs[0].error.startswith("cell 2 ") and "ValueError: lora_r must be > 0" in runs[0].error


def test_notebook_without_results_fails(tmp_path):
    book = _notebook(tmp_path / "09_silent.ipynb", ["x = 1"])
    _, runs = runner.run_notebooks([str(book)], {}, tmp_path / "run", progress=False)
    assert runs[0].status == "failed" and "save_results" in runs[0].error


def test_unknown_parameter_and_notebook_are_refused(tmp_path):
    book = _notebook(tmp_path / "07_demo.ipynb", ["pass"])
    with pytest.raises(ValueError, match="no notebook declares parameter.*lr"):
        runner.run_notebooks([str(book)], {"lr": 1}, tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="no notebook '99_nothing'"):
        runner.discover(["99_nothing"])


def test_discover_finds_the_course_in_order():
    books = runner.discover()
    assert books and [b.name for b in books] == sorted(b.name for b in books)
    assert books[0].name == "00_setup.ipynb"
    assert runner.discover(["00"]) == [books[0]]


def test_notebook_parameters_reach_only_their_notebook(tmp_path):
    a, b = (_notebook(tmp_path / f"{name}.ipynb", [
        "from qlora_helpers.common.files import save_results",
        f"save_results('{name}', {{'max_steps': max_steps, 'profile': profile}})"]) for name in ("07_a", "08_b"))
    _, runs = runner.run_notebooks([str(a), str(b)], {"max_steps": 2, "profile": "cpu"}, tmp_path / "run",
                                   progress=False, notebook_parameters={"08_b": {"max_steps": 5}})
    assert [r.results for r in runs] == [{"max_steps": 2, "profile": "cpu"}, {"max_steps": 5, "profile": "cpu"}]
    with pytest.raises(ValueError, match="08_b declares no parameter.*lr"):
        runner.run_notebooks([str(b)], {}, tmp_path / "run", progress=False, notebook_parameters={"08_b": {"lr": 1}})
    with pytest.raises(ValueError, match="no notebook '99_nothing'"):
        runner.run_notebooks([str(b)], {}, tmp_path / "run", progress=False, notebook_parameters={"99_nothing": {}})


def test_two_at_a_time_keeps_the_order_and_gives_each_kernel_its_threads(tmp_path):
    import os

    threads = max(1, (os.cpu_count() or 1) // 2)
    ok = _notebook(tmp_path / "07_demo.ipynb", [
        "import os\nfrom qlora_helpers.common.files import save_results",
        "save_results('07_demo', {'threads': os.environ['OMP_NUM_THREADS'], 'pid': os.getppid()})"])
    broken = _notebook(tmp_path / "08_broken.ipynb", ["raise ValueError('lora_r must be > 0')"])
    _, runs = runner.run_notebooks([str(ok), str(broken)], {}, tmp_path / "run", progress=False, jobs=2)
    assert [r.notebook for r in runs] == ["07_demo", "08_broken"] and [r.status for r in runs] == ["ok", "failed"]
    assert runs[0].results["threads"] == str(threads) and runs[0].results["pid"] != os.getpid()
    assert "ValueError: lora_r must be > 0" in runs[1].error
    with pytest.raises(ValueError, match="jobs=0"):
        runner.run_notebooks([str(ok)], {}, tmp_path / "run", progress=False, jobs=0)
