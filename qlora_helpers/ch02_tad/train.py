"""Pre-training (cached), detector training with atomic checkpoints and exact resume, evaluation, costs.

``train_detector`` runs AdamW with the config's paramwise groups, linear warm-up and cosine decay, gradient
clipping at 1 (the seed's ``clip_grad_norm=1``). Batches and dropout are seeded by the step number, so a run
resumed from a checkpoint (its latest, or an ``epoch_<n>.pth`` as OpenTAD keeps) continues exactly as if never
stopped. It can print a line every few steps with the loss split into classification and regression.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qlora_helpers.ch02_tad.adapters import is_quantized
from qlora_helpers.ch02_tad.config import GEOMETRY, param_groups
from qlora_helpers.ch02_tad.data import make_pretrain_clips
from qlora_helpers.ch02_tad.evaluate import mean_ap
from qlora_helpers.ch02_tad.model import VideoViT
from qlora_helpers.common.assets import cache_dir
from qlora_helpers.common.bench import cuda_peak_gib, reset_cuda_peak
from qlora_helpers.common.files import atomic_open, state_digest

MEAN, STD = 0.45, 0.25


def video_tensor(frames: np.ndarray, device="cpu") -> torch.Tensor:
    """uint8 ``(batch, frames, h, w)`` -> normalised float ``(batch, 1, frames, h, w)``."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(device=device, dtype=torch.float32)
    return ((x / 255.0 - MEAN) / STD).unsqueeze(1)


def atomic_torch_save(obj, path: str | Path) -> None:
    """``torch.save`` to a temporary file, then ``os.replace``: a crash never leaves half a checkpoint."""
    with atomic_open(path, "wb") as fh:
        torch.save(obj, fh)


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- pre-training
def _pretrain_modules(geometry: dict, seed: int, device: str) -> tuple[VideoViT, torch.nn.Linear]:
    """The ViT to pre-train and its 15-way clip classifier, seeded."""
    torch.manual_seed(seed)
    vit = VideoViT(**{k: v for k, v in {**GEOMETRY, **geometry}.items() if k != "with_cp"}).to(device)
    return vit, torch.nn.Linear(vit.embed_dims, 15).to(device)


def pretrain_counted_gib(geometry: dict, spec, *, batch_size: int = 32, device: str = "cpu") -> float:
    """What one step of ``pretrained_backbone`` holds, counted as ``cost_breakdown`` counts a detector's step: the
    chapter's estimate of the pre-training's peak. Every weight trains in fp32, so a parameter costs 16 bytes
    (weight, gradient, AdamW's two moments); to these the tensors autograd saves for one batch of clips."""
    with torch.random.fork_rng(devices=[torch.device(device)] if device.startswith("cuda") else []):   # RNG kept
        vit, classifier = _pretrain_modules(geometry, 0, device)
        model = torch.nn.ModuleList([vit, classifier])
        clips, _ = make_pretrain_clips(batch_size, spec, seed=0)
        with _saved_tensors(model) as saved:
            classifier(vit.clip_features(video_tensor(clips, device)))
    return (16 * sum(p.numel() for p in model.parameters()) + sum(saved.values())) / 2**30


def pretrained_backbone(geometry: dict, spec, *, steps: int = 800, batch_size: int = 32, lr: float = 3e-3,
                        seed: int = 0, device: str = "cpu", progress: bool = True) -> tuple[dict, dict]:
    """Weights of the ViT (``geometry``) pre-trained on 15-way clip classification, and a summary.

    The result is cached as ``<cache>/tad/pretrain-<key>.pt`` where the key covers every argument
    that changes the weights; a second call loads it in a second.
    """
    geometry = {k: v for k, v in {**GEOMETRY, **geometry}.items() if k != "with_cp"}
    key = _key({"geometry": geometry, "spec": spec.key(), "steps": steps, "batch": batch_size, "lr": lr, "seed": seed,
                "v": 1})
    path = cache_dir() / "tad" / f"pretrain-{key}.pt"
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return saved["state_dict"], {**saved["info"], "cached": True, "path": str(path)}

    vit, classifier = _pretrain_modules(geometry, seed, device)
    params = list(vit.parameters()) + list(classifier.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    clips, labels = make_pretrain_clips(min(steps * batch_size, 4096) if steps else 0, spec, seed=1 + seed)
    held_clips, held_labels = make_pretrain_clips(512, spec, seed=1000 + seed)
    rng = np.random.default_rng(seed)
    losses, t0 = [], time.perf_counter()
    bar = tqdm(total=steps, desc="pre-train ViT", disable=not progress, leave=False)
    for step in range(steps):
        idx = rng.integers(len(clips), size=batch_size)
        _set_lr(opt, [lr], step, steps)
        logits = classifier(vit.clip_features(video_tensor(clips[idx], device)))
        loss = F.cross_entropy(logits, torch.from_numpy(labels[idx]).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(round(loss.item(), 4))
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    vit.eval()
    with torch.no_grad():
        pred = torch.cat([classifier(vit.clip_features(video_tensor(held_clips[i:i + 64], device))).argmax(1).cpu()
                          for i in range(0, len(held_clips), 64)])
    info = {"steps": steps, "batch_size": batch_size, "seconds": round(time.perf_counter() - t0, 1),
            "loss_first": losses[0] if losses else None, "loss_last": float(np.mean(losses[-20:])) if losses else None,
            "heldout_accuracy": round(float((pred.numpy() == held_labels).mean()), 4),
            "chance_accuracy": round(1 / 15, 4),
            "params": sum(p.numel() for p in vit.parameters()), "device": device}
    state = {k: v.detach().cpu() for k, v in vit.state_dict().items()}
    atomic_torch_save({"state_dict": state, "info": info}, path)
    return state, {**info, "cached": False, "path": str(path)}


def checkpoint_path(name: str, **settings) -> Path:
    """``<cache>/tad/runs/<key>/<name>.pt``, the key covering every setting that changes the run (and ``v``,
    the version of the code's initialisation: 2 since adapters start as the identity)."""
    return cache_dir() / "tad" / "runs" / _key({**settings, "v": 2}) / f"{name}.pt"


def _set_lr(opt, base_lrs, step: int, steps: int, warmup: float = 0.1) -> None:
    """Linear warm-up over the first ``warmup`` of the steps, then cosine decay to zero."""
    w = max(1, int(warmup * steps))
    factor = (step + 1) / w if step < w else 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, steps - w)))
    for group, base in zip(opt.param_groups, base_lrs):
        group["lr"] = base * factor


# --------------------------------------------------------------------------- detector training
def frozen_digest(model) -> str:
    """sha256 over every frozen parameter and buffer (quantized bytes included): a resumed run must
    rebuild exactly the same frozen model, or its trainable weights would sit on different numbers."""
    named = list(model.named_parameters()) + list(model.named_buffers())
    return state_digest({name: t for name, t in named if not t.requires_grad})[:16]


def _resume(ckpt: Path, trainable: dict, opt, *, run_id: dict, device: str) -> tuple[list, int]:
    """Load a checkpoint of the same config and frozen model into ``trainable`` and ``opt``: (history, step)."""
    state = torch.load(ckpt, map_location=device, weights_only=False)
    if any(state[k] != v for k, v in run_id.items()):
        raise ValueError(f"{ckpt} was written by a different config or frozen model: "
                         "delete it or pass resume=False")
    with torch.no_grad():
        for n, p in trainable.items():
            p.copy_(state["trainable"][n])
    opt.load_state_dict(state["optimizer"])
    return state["history"], state["step"]


def _step(model, opt, params: list, video: torch.Tensor, targets: list, *, device: str, autocast_dtype) -> dict:
    """One optimizer step on a batch; the rounded losses."""
    with torch.autocast(device_type=device.split(":")[0], dtype=autocast_dtype, enabled=autocast_dtype is not None):
        out = model.loss(video, [s for s, _ in targets], [l for _, l in targets])
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return {k: round(out[k].item(), 4) for k in ("loss", "cls_loss", "reg_loss")}


def _save(path: Path, step: int, trainable: dict, opt, history: list, run_id: dict) -> None:
    atomic_torch_save({"step": step, "trainable": {n: p.detach().cpu() for n, p in trainable.items()},
                       "optimizer": opt.state_dict(), "history": history, **run_id}, path)


def final_losses(history: list, last: int = 20) -> dict:
    """The mean ``loss``, ``cls_loss`` (focal classification) and ``reg_loss`` (DIoU regression) of the
    last ``last`` steps of a run's history; ``loss`` is the sum of the other two."""
    tail = history[-last:]
    return {k: round(sum(h[k] for h in tail) / len(tail), 4) for k in ("loss", "cls_loss", "reg_loss")}


def _log(desc: str, history: list, steps: int, every: int) -> None:
    """One line: the mean loss of the last ``every`` steps, and its classification and regression parts."""
    mean = final_losses(history, every)
    print(f"{desc:<24} step {history[-1]['step']:>4}/{steps}  loss {mean['loss']:.3f} = "
          f"cls {mean['cls_loss']:.3f} + reg {mean['reg_loss']:.3f}")


def train_detector(model, cfg: dict, data, *, steps: int, batch_size: int = 4, seed: int = 0, device: str = "cpu",
                   checkpoint: str | Path | None = None, checkpoint_every: int = 50, resume: bool = True,
                   epoch_dir: str | Path | None = None, resume_from: str | Path | None = None, log_every: int = 0,
                   progress: bool = True, desc: str = "train", autocast_dtype=None) -> dict:
    """Train ``model`` for ``steps`` steps on ``data``'s training split.

    With ``checkpoint`` the trainable weights, optimizer, step and history are written atomically every
    ``checkpoint_every`` steps and at the end; with ``resume`` an existing checkpoint of the same config
    and frozen weights is loaded and training continues from its step. ``epoch_dir`` also keeps one file per
    epoch (``len(train videos) // batch_size`` steps), ``epoch_<n>.pth`` as in OpenTAD's checkpoint folder;
    ``resume_from`` continues from such a file (OpenTAD's ``--resume .../epoch_X.pth``). ``log_every`` prints
    the mean loss, classification + regression, every that many steps. Returns ``{"history": [...],
    "step_seconds": [...], "resumed_from": step}``.
    """
    groups = param_groups(model, cfg["optimizer"])
    base_lrs = [g["lr"] for g in groups]
    opt = torch.optim.AdamW(groups)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    run_id = {"config_key": _key(cfg), "frozen_digest": frozen_digest(model)}
    ckpt = Path(checkpoint) if checkpoint else None
    for leftover in ckpt.parent.glob(f".{ckpt.name}.*.tmp") if ckpt else []:
        leftover.unlink()                          # a killed save's temporary file; the checkpoint itself is whole
    source = Path(resume_from) if resume_from else ckpt if resume and ckpt and ckpt.is_file() else None
    history, step_seconds, start = [], [], 0
    if source:
        history, start = _resume(source, trainable, opt, run_id=run_id, device=device)
        for n in range(1, start + 1) if log_every else ():    # the lines of the steps the file holds, as trained
            if n % log_every == 0 or n == steps:
                _log(desc, history[:n], steps, log_every)
        if log_every:
            print(f"{desc:<24} resumed from {source.name} at step {start} of {steps}")
    segments, videos = data.segments("train"), data.videos["train"]
    epoch = len(videos) // batch_size
    model.train()
    bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False)
    bar.update(min(start, steps))
    for step in range(start, steps):
        t0 = time.perf_counter()
        idx = np.random.default_rng([seed, step]).integers(len(videos), size=batch_size)
        torch.manual_seed(seed * 1_000_003 + step)            # dropout masks depend on the step only
        _set_lr(opt, base_lrs, step, steps)
        losses = _step(model, opt, list(trainable.values()), video_tensor(videos[idx], device),
                       [segments[i] for i in idx], device=device, autocast_dtype=autocast_dtype)
        step_seconds.append(time.perf_counter() - t0)
        history.append({"step": step + 1, **losses, "seconds": round(step_seconds[-1], 4)})
        bar.update(1)
        bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            _log(desc, history, steps, log_every)
        if ckpt and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
            _save(ckpt, step + 1, trainable, opt, history, run_id)
        if epoch_dir and (step + 1) % epoch == 0:
            _save(Path(epoch_dir) / f"epoch_{(step + 1) // epoch}.pth", step + 1, trainable, opt, history, run_id)
    bar.close()
    return {"history": history, "step_seconds": step_seconds, "resumed_from": start}


@torch.no_grad()
def detections(model, data, split: str = "val", *, batch_size: int = 8, device: str = "cpu") -> list[dict]:
    """The model's detections on a split, in seconds, in the evaluator's format."""
    model.eval()
    videos, ids, fps = data.videos[split], data.video_ids[split], data.spec.fps
    out = []
    for i in range(0, len(videos), batch_size):
        for vid, det in zip(ids[i:i + batch_size], model.detect(video_tensor(videos[i:i + batch_size], device))):
            for seg, score, label in zip(det["segments"], det["scores"], det["labels"]):
                out.append({"video_id": vid, "label_id": int(label), "score": float(score),
                            "segment": [float(seg[0]) / fps, float(seg[1]) / fps]})
    model.train()
    return out


def evaluate_detector(model, data, split: str = "val", *, device: str = "cpu") -> dict:
    """THUMOS-protocol mAP of ``model`` on ``split`` (see ``evaluate.mean_ap``)."""
    return mean_ap(detections(model, data, split, device=device), data.ground_truth(split))


# --------------------------------------------------------------------------- costs
COUNTED = ("weights", "gradients", "optimizer_state", "activations")


def counted_gib(costs: dict) -> float:
    """What ``cost_breakdown`` counted for one training step, in GiB: the chapter's estimate of a run's peak."""
    return sum(costs[k] for k in COUNTED) / 2**30


@contextmanager
def _saved_tensors(model) -> Iterator[dict[int, int]]:
    """Within the block: the bytes of every tensor autograd saves for the backward pass, by storage (each storage
    once), ``model``'s parameters excluded."""
    params = {p.data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        if t.data_ptr() not in params and t.device.type != "meta":
            storage = t.untyped_storage()
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved


def cost_breakdown(model, cfg: dict, data, *, batch_size: int = 4, device: str = "cpu", autocast_dtype=None) -> dict:
    """Bytes of one training step, by kind.

    On the CPU (no allocator peak to read) it counts tensors exactly: ``weights`` as stored (quantized
    ones at their packed size), ``gradients`` and ``optimizer_state`` (AdamW's two moments) of the
    trainable parameters, and ``activations``: every tensor autograd saves for the backward pass,
    parameters excluded, each storage once. On CUDA it adds the allocator's peak (``cuda_peak``).
    """
    segments = data.segments("train")[:batch_size]
    video = video_tensor(data.videos["train"][:batch_size], device)
    model.train()
    model.zero_grad(set_to_none=True)
    if device.startswith("cuda"):
        reset_cuda_peak()
    with _saved_tensors(model) as saved, torch.autocast(device_type=device.split(":")[0], dtype=autocast_dtype,
                                                        enabled=autocast_dtype is not None):
        out = model.loss(video, [s for s, _ in segments], [l for _, l in segments])
    out["loss"].backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    result = {"weights": sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())),
              "quantized_weights": sum(p.numel() * p.element_size() for p in model.parameters() if is_quantized(p)),
              "gradients": sum(p.grad.numel() * p.grad.element_size() for p in trainable if p.grad is not None),
              "optimizer_state": 2 * sum(p.numel() * 4 for p in trainable),   # AdamW: two fp32 moments each
              "activations": sum(saved.values()), "batch_size": batch_size}
    if device.startswith("cuda"):
        result["cuda_peak"] = cuda_peak_gib()
    model.zero_grad(set_to_none=True)
    return result
