import hashlib
import os
from pathlib import Path

import pytest

from qlora_helpers.common import assets


@pytest.fixture(scope="session")
def cached_assets():
    """The real assets must be in the cache (``make test`` fetches them first)."""
    for name in assets.ASSETS:
        assets.verify(name)
    return assets


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A 2-layer random Llama (hidden 64) saved with SmolLM2's tokenizer: a stand-in for SmolLM2 by path."""
    from qlora_helpers.common.models import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", family="llama")


@pytest.fixture(scope="session")
def course_run(tmp_path_factory, cached_assets):
    """Every notebook executed once on the CPU under the ``course`` parameter set
    (``data/parameter_sets/course.yaml``): {notebook: NotebookRun}. test_notebooks.py checks what each
    one computed, test_learning.py what each one learned."""
    from qlora_helpers.common import runner

    jobs = 2 if (os.cpu_count() or 1) >= 2 else 1   # two one-thread kernels at a time finish sooner on 2 cores
    run_dir, runs = runner.run_notebooks(None, {"profile": "cpu"}, tmp_path_factory.mktemp("course"), progress=False,
                                         notebook_parameters=runner.parameter_set("course"), jobs=jobs)
    return {r.notebook: r for r in runs}


def folder_state(*paths) -> dict:
    """Every file and folder under ``paths``: path -> sha256 of its bytes (None for a folder), to show that a
    command left everything a user owns as it was."""
    state = {}
    for root in map(Path, paths):
        for p in [root, *sorted(root.rglob("*"))] if root.exists() else []:
            state[str(p)] = None if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return state


@pytest.fixture
def refused(capfd):
    """``refused(call, names=[...], keep=[folders])``: ``call()`` (a command's entry point, in this process)
    must exit 2 with one line on stderr, nothing else printed, the line holding every text in ``names``
    (the file and the fix), and every file under ``keep`` present and unchanged. Returns the line."""
    def check(call, *, names, keep=()):
        before = folder_state(*keep)
        capfd.readouterr()
        try:
            code = call()
        except SystemExit as stop:          # argparse exits from inside the parser
            code = stop.code
        out, err = capfd.readouterr()
        assert code == 2, out + err
        assert out == "" and err.count("\n") == 1 and err.startswith("error: "), out + err
        for text in names:
            assert text in err, f"{text!r} not in {err!r}"
        assert folder_state(*keep) == before, "a file under " + ", ".join(map(str, keep)) + " changed"
        return err.strip()
    return check
