"""The ``sft`` command on several processes: ``accelerate launch --num_processes 2 -m qlora_helpers sft ...``.

Two CPU processes (gloo; the HF Trainer wraps the model in DDP) end with bit-identical QLoRA adapters, equal
to one process trained on the same global batches, and only the main process writes into output_dir.

Why one process and two see the same rows at every step: the Trainer's sampler is accelerate's
``SeedableRandomSampler`` (seeded by ``data_seed``: one permutation, the same in every process and every
run), and accelerate gives rank r the micro-batches r, r + 2, ... of it. So 2 ranks x 2 rows take the 4 rows
that one process takes with ``per_device_train_batch_size`` 4 (or 2 rows x 2 accumulation steps). The
Trainer divides each rank's summed loss by the tokens of both ranks (``average_tokens_across_devices``), so
the averaged gradient is the one-process gradient. What is left is float rounding (other padded shapes,
another summation order): the adapters agree to 1e-5, not bit for bit; a run of half the global batch is
1e-4 or more away. Dropout is 0, since its masks would differ.

accelerate's ``--cpu`` starts one process unless an MPI host file is given; ``--multi_gpu`` is its
``torchrun`` launcher, which starts the processes, and ``--device cpu`` makes them meet over gloo.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from qlora_helpers import cli
from qlora_helpers.common.assets import load_sft
from qlora_helpers.common.run_folder import MANIFEST

pytestmark = pytest.mark.slow
TOLERANCE = 1e-5


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def sft_args(files, out, **overrides) -> list[str]:
    flags = {"use_qlora": True, "lora_dropout": 0, "model_name_or_path": files["model"],
             "data_path": files["train"], "eval_data_path": files["validation"], "output_dir": out,
             "max_steps": 3, "max_length": 64, "save_steps": 1, "learning_rate": 1e-3, "device": "cpu",
             "lr_scheduler_type": "constant",     # a resumed run may then go on for more steps
             "bf16": False,                       # fp32 on every CPU: two processes equal one to 1e-5
             "per_device_train_batch_size": 4, **overrides}
    return [arg for key, value in flags.items() for arg in (f"--{key}", str(value).lower()
                                                            if isinstance(value, bool) else str(value))]


def launch(args: list[str], processes: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", free_port(), "-m", "qlora_helpers", "sft", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, cached_assets, tmp_path_factory):
    """The same 3 steps of 4 rows: 2 processes x 2 rows; 1 process x 4 rows; 1 process x 2 rows x 2 accumulation
    steps; and, to show the tolerance bites, 1 process x 2 rows (half the global batch). Then 1 process x 4 rows
    for 4 steps, which 2 processes resumed from their step-2 checkpoint must equal."""
    root = tmp_path_factory.mktemp("launch")
    files = {"model": str(tiny_llama_dir)}
    for split, n in (("train", 32), ("validation", 8)):
        files[split] = str(root / f"{split}.jsonl")
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in load_sft(split, ("en",))[:n]))
    two = launch(sft_args(files, root / "two", per_device_train_batch_size=2))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = {name: root / name for name in ("batch4", "accum2", "half", "steps4")}
        assert cli.main(["sft", *sft_args(files, one["batch4"])]) == 0
        assert cli.main(["sft", *sft_args(files, one["accum2"], per_device_train_batch_size=2,
                                          gradient_accumulation_steps=2)]) == 0
        assert cli.main(["sft", *sft_args(files, one["half"], per_device_train_batch_size=2)]) == 0
        assert cli.main(["sft", *sft_args(files, one["steps4"], max_steps=4)]) == 0
    finally:
        torch.set_num_threads(threads)
    return {"two": root / "two", **one, "stdout": two.stdout, "files": files}


def adapter(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def summary(folder) -> dict:
    return json.loads((folder / "sft_summary.json").read_text())


def max_difference(a: dict, b: dict) -> float:
    assert set(a) == set(b) and len(a) > 0
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_both_ranks_end_identical_and_equal_to_one_process(runs):
    ranks = summary(runs["two"])["processes"]
    assert ranks["world_size"] == 2 and ranks["identical"], ranks
    assert len(ranks["trainable_sha256"]) == 2 and len(set(ranks["trainable_sha256"])) == 1
    two = adapter(runs["two"])
    assert max(float(t.abs().max()) for k, t in two.items() if "lora_B" in k) > 1e-4, "lora_B starts at 0: it moved"
    for one in ("batch4", "accum2"):
        assert summary(runs[one])["processes"]["world_size"] == 1
        diff = max_difference(two, adapter(runs[one]))
        assert diff < TOLERANCE, f"2 processes and 1 process ({one}) differ by {diff}"
    half = max_difference(two, adapter(runs["half"]))
    assert half > 10 * TOLERANCE, f"half the global batch is only {half} away: the comparison would prove nothing"


def test_every_step_sees_the_same_rows(runs):
    """Equal losses step by step: the processes together took the rows of the one-process step."""
    losses = {name: [r["loss"] for r in summary(runs[name])["history"]["train"]] for name in ("two", "batch4")}
    assert len(losses["two"]) == 3
    assert losses["two"] == pytest.approx(losses["batch4"], rel=1e-5)


def test_only_the_main_process_writes(runs):
    out = runs["two"]
    lines = [line for line in runs["stdout"].splitlines() if line.startswith("qlora-4bit: 3 steps")]
    assert len(lines) == 1, runs["stdout"]
    assert {"sft_config.json", "sft_summary.json", "adapter_config.json", "adapter_model.safetensors"} <= \
        {p.name for p in out.iterdir()}
    hidden = [p.name for p in out.rglob(".*") if p.name != MANIFEST]     # the record of the course's files stays
    assert not hidden, "a temporary file was left behind"
    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "checkpoint-2"   # none of the last step: the adapter is it
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    for step in (1, 2):
        names = {p.name for p in (checkpoints / f"checkpoint-{step}").iterdir()}
        assert {"state.json", "rng_state_0.pth", "rng_state_1.pth", "adapter_model.safetensors"} <= names
    assert json.loads((checkpoints / "checkpoint-2" / "state.json").read_text())["step"] == 2


def test_two_processes_resume_where_they_stopped(runs, tmp_path):
    """``--resume`` on 2 processes continues from ``checkpoints/latest`` (step 2) to step 4: the adapter of one
    process trained 4 steps in one go, and every rank holds it."""
    out = tmp_path / "two"
    shutil.copytree(runs["two"], out)
    launch(sft_args(runs["files"], out, per_device_train_batch_size=2, max_steps=4, resume=True))
    resumed = summary(out)
    assert resumed["resumed_from"] == 2 and resumed["steps"] == 4 and resumed["processes"]["identical"]
    diff = max_difference(adapter(out), adapter(runs["steps4"]))
    assert diff < TOLERANCE, f"resumed on 2 processes and 4 steps on 1 process differ by {diff}"
