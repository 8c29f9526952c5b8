"""Nothing half-written under SIGKILL: training killed at random instants, several times, then resumed.

After every kill each file a run writes is checked to be absent, the old version or the new one, complete:
checkpoints load, adapters load (config and weights), ``training_history.json`` and result files parse.
Resuming then ends on the same losses as an uninterrupted run. Three trainers: the ``sft`` command
(chapter 03, TRL's ``SFTTrainer`` with the course's ``CourseCallback`` marking each whole checkpoint),
the detector of chapter 02 (``train_detector`` with a checkpoint), and the data-parallel
worker of chapter 05 on 2 CPU processes. Chapter 05's worker has no resume: a killed run is started
again and must write the same history as far as the killed one got. Chapter 04's ``vlm`` command writes
its checkpoints with chapter 03's ``CourseCallback`` (``ch03_sft.trainer``) and its adapters with
``files.atomic_folder``;
tests/test_vlm_command.py checks its resume in one process, since four more command start-ups (~8 s each
on the 2-core CI machine) do not fit this test's time.

The kill instants come from ``random.Random(SEED)``; a failure names the seed and the instant.
"""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from qlora_helpers.ch03_sft.command import SFTConfig, run_sft
from qlora_helpers.ch03_sft.trainer import CourseCallback, clean_partial_checkpoints, latest_checkpoint
from qlora_helpers.ch05_multi_gpu.reversal import generate_data
from qlora_helpers.common import files
from qlora_helpers.common.assets import load_sft

ROOT = Path(__file__).resolve().parent.parent
SEED = int(os.environ.get("KILL_SEED", "19"))
ENV = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}


def kill_when(cmd: list[str], ready, delay: float, *, timeout: float = 120) -> bool:
    """Start ``cmd``; once ``ready()`` holds, wait ``delay`` s and SIGKILL its whole process group.

    Returns whether it was killed (``False``: it finished first).
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV, cwd=ROOT,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(delay)
    if proc.poll() is not None:
        assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
        return False
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return True


def check_adapter(folder: Path) -> None:
    """An adapter folder is absent, or loads: its config parses and its weights are a whole safetensors file."""
    if not (folder / "adapter_config.json").exists():
        return
    json.loads((folder / "adapter_config.json").read_text())
    assert load_file(folder / "adapter_model.safetensors"), folder


def _read(path: Path) -> str:
    """The file's text, or "" while it does not exist (``latest`` is replaced atomically: never half of it)."""
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def check_json(path: Path) -> None:
    if path.exists():
        json.loads(path.read_text())


# --------------------------------------------------------------------------- chapter 03: the sft command
@pytest.fixture(scope="module")
def sft_data(tmp_path_factory, cached_assets):
    path = tmp_path_factory.mktemp("kill-sft") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in load_sft("train", ("en",))[:24]))
    return path


def _sft_args(model: Path, data: Path, out: Path) -> dict:
    return dict(use_lora=True, lora_dropout=0.1, model_name_or_path=str(model), data_path=str(data),
                output_dir=str(out), max_steps=60, save_steps=3, max_length=48, per_device_train_batch_size=2,
                learning_rate=1e-3, eval_before=False, device="cpu", save_total_limit=2)


def _sft_command(args: dict, *extra) -> list[str]:
    flags = [f"--{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in args.items()]
    return [sys.executable, "-m", "qlora_helpers", "sft", *flags, *extra]


def check_sft_output(out: Path) -> None:
    for name in ("sft_config.json", "sft_summary.json"):
        check_json(out / name)
    check_adapter(out)
    root = out / "checkpoints"
    for ckpt in [p for p in root.glob("checkpoint-*") if p.is_dir()] if root.is_dir() else []:
        if not (ckpt / "state.json").is_file():
            continue                 # cut short by the kill: never loaded, removed by the next start
        json.loads((ckpt / "state.json").read_text())
        assert load_file(ckpt / "adapter_model.safetensors"), ckpt
        torch.load(ckpt / "optimizer.pt", weights_only=False)
    if (root / "latest").exists():
        assert (root / (root / "latest").read_text().strip() / "state.json").is_file()


def _trainer_checkpoint(root: Path, step: int) -> None:
    """What the HF Trainer writes into ``checkpoint-N`` (a stand-in: the files the check above opens)."""
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    torch.save({}, path / "optimizer.pt")
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, path / "adapter_model.safetensors")


def test_a_kill_while_old_checkpoints_are_pruned_leaves_none_half_deleted(tmp_path, monkeypatch):
    """The instant the random kills can miss: an old checkpoint is deleted file by file after a save."""
    root = tmp_path / "checkpoints"
    course = CourseCallback(SFTConfig(save_total_limit=2), output_dir=tmp_path, eval_loss=None)
    args = type("Args", (), {"output_dir": str(root), "should_save": True})()
    state = type("State", (), {"global_step": 0})()
    for step in (3, 6):
        _trainer_checkpoint(root, step)
        state.global_step = step
        course.on_save(args, state, None)

    def killed_mid_delete(path, **kw):      # deletes one file, then the process is gone
        next(f for f in Path(path).iterdir() if f.is_file()).unlink()
        raise SystemExit("SIGKILL")

    _trainer_checkpoint(root, 9)
    state.global_step = 9
    monkeypatch.setattr(files.shutil, "rmtree", killed_mid_delete)
    with pytest.raises(SystemExit):
        course.on_save(args, state, None)
    monkeypatch.undo()
    check_sft_output(tmp_path)
    assert latest_checkpoint(tmp_path).name == "checkpoint-9"
    assert sorted(p.name for p in root.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-9"]
    _trainer_checkpoint(root, 12)           # a save the kill cut short: no state.json
    assert clean_partial_checkpoints(tmp_path) == 2 and not list(root.glob(".*"))
    assert sorted(p.name for p in root.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-9"]


def test_sft_killed_at_random_then_resumed(tiny_llama_dir, sft_data, tmp_path):
    rng = random.Random(SEED)
    args = _sft_args(tiny_llama_dir, sft_data, tmp_path / "killed")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                 # as the subprocesses (OMP_NUM_THREADS=1): the same sums
    try:
        straight = run_sft(SFTConfig(**{**args, "output_dir": str(tmp_path / "straight")}), progress=False).summary
    finally:
        torch.set_num_threads(threads)
    out, latest = tmp_path / "killed", tmp_path / "killed" / "checkpoints" / "latest"
    kills = []
    for i in range(3):
        delay, seen = rng.uniform(0.0, 1.0), _read(latest)
        extra = ["--resume"] if seen else ["--overwrite_output_dir"]
        if kill_when(_sft_command(args, *extra), lambda seen=seen: _read(latest) not in ("", seen), delay):
            kills.append(delay)
        check_sft_output(out)
        # the run resumed after the previous one removed the half-written checkpoint planted below
        assert not (latest.parent / "checkpoint-999999").exists(), "a checkpoint cut short was kept"
        if i < 2 and _read(latest):   # as a kill mid-save leaves; the next run resumes and must remove it
            (latest.parent / "checkpoint-999999").mkdir()
    assert kills, f"seed {SEED}: every run finished before its kill; make the run longer"
    if not (out / "sft_summary.json").exists():
        done = subprocess.run(_sft_command(args, "--resume"), capture_output=True, text=True, env=ENV, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-2000:]
    check_sft_output(out)
    resumed = json.loads((out / "sft_summary.json").read_text())
    loss = lambda s: [r["loss"] for r in s["history"]["train"]]
    assert loss(resumed) == pytest.approx(loss(straight), abs=1e-4), f"seed {SEED}, kills at {kills}"


# --------------------------------------------------------------------------- chapter 02: the detector
TAD = textwrap.dedent("""
    import sys, torch
    from qlora_helpers.ch02_tad.config import build_model, strategy_config
    from qlora_helpers.ch02_tad.data import VideoSpec, make_dataset
    from qlora_helpers.ch02_tad.train import train_detector
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = strategy_config("seed_qlora", {"embed_dims": 32, "depth": 2, "num_heads": 2, "patch_size": 16},
                          lora_r=4, lora_alpha=8, head={"dims": 16})
    data = make_dataset(VideoSpec(n_train=4, n_val=1, frames=32, min_len=6, max_len=14, seed=9), write_json=False)
    run = train_detector(build_model(cfg, num_classes=4), cfg, data, steps=int(sys.argv[2]), batch_size=2,
                         checkpoint=sys.argv[1] or None, checkpoint_every=1, progress=False)
    print("LOSSES", [h["loss"] for h in run["history"]])
""")


def test_tad_detector_killed_at_random_then_resumed(cached_assets, tmp_path):
    rng = random.Random(SEED + 2)
    steps, ckpt = 60, tmp_path / "detector.pt"
    straight = subprocess.run([sys.executable, "-c", TAD, "", str(steps)], capture_output=True, text=True, env=ENV)
    assert straight.returncode == 0, straight.stderr[-2000:]
    kills = []
    for _ in range(3):
        delay, seen = rng.uniform(0.0, 0.5), ckpt.stat().st_mtime_ns if ckpt.exists() else 0
        progressed = lambda seen=seen: ckpt.exists() and ckpt.stat().st_mtime_ns != seen   # a newer checkpoint
        if kill_when([sys.executable, "-c", TAD, str(ckpt), str(steps)], progressed, delay):
            kills.append(delay)
        state = torch.load(ckpt, weights_only=False)             # a whole checkpoint, old or new
        assert len(state["history"]) == state["step"] and set(state["trainable"])
        others = [p.name for p in tmp_path.iterdir() if p.name != "detector.pt"]
        assert all(n.startswith(".detector.pt.") and n.endswith(".tmp") for n in others), others
    assert kills, f"seed {SEED + 2}: every run finished before its kill"
    resumed = subprocess.run([sys.executable, "-c", TAD, str(ckpt), str(steps)], capture_output=True, text=True,
                             env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [p.name for p in tmp_path.iterdir()] == ["detector.pt"], "a killed save's temporary file was kept"
    losses = lambda done: json.loads(done.stdout.split("LOSSES", 1)[1].replace("'", '"'))
    assert losses(resumed) == losses(straight), f"seed {SEED + 2}, kills at {kills}"


# --------------------------------------------------------------------------- chapter 05: 2 data-parallel processes
DDP = textwrap.dedent("""
    import json, sys
    from accelerate import notebook_launcher
    from qlora_helpers.ch05_multi_gpu import worker
    notebook_launcher(worker.train_worker, (json.loads(sys.argv[1]),), num_processes=2, use_port=worker.free_port())
""")


def check_ddp_output(out: Path) -> None:
    for name in ("training_history.json", "run.json"):
        check_json(out / name)
    for name in ("best", "final"):
        check_adapter(out / name)


def test_ddp_worker_killed_at_random_then_run_again(cached_assets, tmp_path):
    rng = random.Random(SEED + 5)
    cfg = yaml.safe_load((ROOT / "data" / "configs" / "multi_gpu_cpu.yaml").read_text())
    cfg["lora"]["dropout"] = 0.0
    cfg["training"].update(batch_size=1, gradient_accumulation_steps=1, num_epochs=6)
    data = generate_data(tmp_path / "data", num_identities=3, seed=0, pool_size=20)
    run = dict(profile="cpu", model_id="tiny:llama", config=cfg, data_dir=str(data), task="forward", name="k",
               output_dir=str(tmp_path), precision="fp32", retention_ratio=0.3, max_steps=0,
               eval_before=False, eval_after=False)
    out = tmp_path / "k_forward"
    history = out / "training_history.json"
    epochs = lambda: json.loads(history.read_text())["epochs"] if history.exists() else []
    killed = kill_when([sys.executable, "-c", DDP, json.dumps(run)], lambda: len(epochs()) >= 1,
                       rng.uniform(0.0, 1.0), timeout=180)
    check_ddp_output(out)
    before = epochs()
    done = subprocess.run([sys.executable, "-c", DDP, json.dumps(run)], capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    check_ddp_output(out)
    after = json.loads(history.read_text())
    assert after["status"] == "done" and (out / "final").is_dir()
    assert killed, f"seed {SEED + 5}: the run finished before its kill"
    for a, b in zip(before, after["epochs"]):
        assert (a["train_loss"], a["val_loss"]) == pytest.approx((b["train_loss"], b["val_loss"]), abs=1e-6)
