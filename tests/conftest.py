import os

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
