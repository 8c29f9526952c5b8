"""The ``sft`` command trains through TRL's ``SFTTrainer``; this module is what the course adds to it.

The training itself (micro-batches, gradient accumulation, clipping, AdamW, the schedule, mixed
precision, several processes under ``accelerate launch``) is the HF ``Trainer``'s. The course adds:

- **its data**: conversations encoded with the course's assistant-only masks (``data.encode_chat``)
  go in as a tokenized dataset of ``input_ids`` and ``labels``, which TRL takes as it is (with
  ``packing`` it lays them, best-fit, into padding-free rows of ``max_length`` tokens);
- **checkpoints that survive ``kill -9``**: the Trainer writes ``checkpoints/checkpoint-N/`` in place.
  Only once that is complete does ``CourseCallback.on_save`` add ``state.json`` (the run's history
  and settings), then point ``checkpoints/latest`` at it (one atomic rename), then remove older ones
  (each hidden by one rename first). A folder without ``state.json`` was cut short and is never
  loaded: the next start removes it, and ``--resume`` continues from the one ``latest`` names (the command
  checks its files and settings first, and repairs ``latest``: ``common.run_folder``);
- **a history of every step** (loss, learning rate, tokens, seconds) and the held-out loss weighted
  by tokens (``evaluate``), before training, every ``eval_steps`` and at the end;
- the notebook's callbacks (``LiveLossPlot``), called with each record, and one ``tqdm`` bar.

``cfg`` is a ``qlora_helpers.ch03_sft.command.SFTConfig``.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from importlib.util import find_spec
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from accelerate import PartialState
from datasets import Dataset
from datasets.utils import logging as datasets_logging
from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.utils.notebook import NotebookProgressCallback
from trl import SFTConfig as TRLConfig
from trl import SFTTrainer

from qlora_helpers.ch03_sft.data import IGNORE_INDEX, SFTData, collate
from qlora_helpers.ch03_sft.modes import trainable_4bit_layers
from qlora_helpers.common.files import atomic_write_json, atomic_write_text, remove_folder, settle_tree
from qlora_helpers.common.optim import optimizer_name, scoped_bnb_overrides, trainer_optim
from qlora_helpers.common.run_folder import (
    CHECKPOINTS,
    COMPLETE,
    LATEST,
    clean_partial_checkpoints,
    latest_checkpoint,
)
from qlora_helpers.common.widgets import LiveFigure

# transformers 5.24 renamed gradient_checkpointing (the old name warns); the model is set up before the Trainer
CHECKPOINTING = "activation_checkpointing" if "activation_checkpointing" in TRLConfig.__dataclass_fields__ \
    else "gradient_checkpointing"

def liger_on(cfg, device: str) -> bool:
    """Liger's kernels as asked, where they run: CUDA, with liger-kernel installed."""
    return bool(cfg.use_liger_kernel and device.startswith("cuda") and find_spec("liger_kernel"))


# --------------------------------------------------------------------------- held-out loss, bytes held
def tensor_bytes(model) -> int:
    """Bytes held by a model's parameters and buffers as stored (a 4-bit weight counts its packed bytes)."""
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    for module in model.modules():  # 4-bit block scales live beside the weight, not in a parameter
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None and hasattr(state, "absmax"):
            total += state.absmax.numel() * state.absmax.element_size()
    return total


def autocast(cfg, device: str):
    """The mixed-precision context of ``cfg`` (bf16 or fp16 autocast), or none."""
    dtype = torch.bfloat16 if cfg.bf16 is True else torch.float16 if cfg.fp16 else None
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def causal_lm_loss(model, batch: dict, chunk_rows: int = 0):
    """The loss ``model(**batch).loss`` gives, without its ``[tokens, vocab]`` logits: for the held-out loss.

    Runs the decoder (``model.model``: text models and LLaVA/Qwen2-VL alike) for its last hidden states and
    multiplies only the labelled (shifted) rows by the output layer, ``chunk_rows`` at a time (default: about
    256 MiB of fp32 logits), softmax in fp32. A model whose output layer carries an adapter takes the plain path.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    if type(head) is not torch.nn.Linear or getattr(base, "model", None) is None:
        return model(**batch).loss
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = base.model(**inputs, use_cache=False).last_hidden_state   # a cache would turn packing detection off
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = batch["labels"][:, 1:].reshape(-1).to(h.device)
    keep = y != IGNORE_INDEX
    h, y, weight = h[keep], y[keep], head.weight
    if weight.dtype == torch.float32 and torch.is_autocast_enabled(h.device.type):
        weight = weight.to(torch.get_autocast_dtype(h.device.type))   # fp32 weights, 16-bit matmul
    chunk = chunk_rows or max(64, min(8192, 2**28 // (4 * weight.shape[0])))
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    with torch.autocast(device_type=h.device.type, enabled=False):
        for start in range(0, len(y), chunk):
            logits = (h[start:start + chunk].to(weight.dtype) @ weight.t()).float()
            target = logits.gather(1, y[start:start + chunk, None]).squeeze(1)
            total += (torch.logsumexp(logits, dim=-1) - target).sum()
    return total / max(len(y), 1)


def evaluate(model, data: SFTData, batch_size: int, pad_id: int, device: str, cfg=None) -> float:
    """Mean cross-entropy over every assistant token of ``data`` (token-weighted, not batch-weighted)."""

    was_training = model.training
    model.eval()
    order = sorted(range(len(data.examples)), key=lambda i: len(data.examples[i].input_ids))
    total, count = 0.0, 0
    with torch.no_grad(), (autocast(cfg, device) if cfg else nullcontext()):
        for start in range(0, len(order), batch_size):
            batch = collate([data.examples[i] for i in order[start:start + batch_size]], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            if n:
                total += float(causal_lm_loss(model, batch)) * n
                count += n
    model.train(was_training)
    return total / max(count, 1)


# --------------------------------------------------------------------------- what the course adds, as a callback
class CourseCallback(TrainerCallback):
    """Per-step records, the token-weighted eval loss, whole checkpoints, the notebook's callbacks, one bar."""

    def __init__(self, cfg, *, output_dir: Path, eval_loss, callbacks=(), fingerprint=None, history=None,
                 progress: bool = True):
        self.cfg, self.output_dir, self.eval_loss = cfg, Path(output_dir), eval_loss
        self.callbacks, self.fingerprint, self.progress = tuple(callbacks), fingerprint or {}, progress
        self.history = history or {"train": [], "eval": []}
        self.step_times: list[float] = []
        self._t0, self._tokens, self.bar = 0.0, 0, None

    def emit(self, record: dict) -> None:
        for cb in self.callbacks:
            cb(record)

    def on_train_begin(self, args, state, control, **kw):
        self._tokens = state.num_input_tokens_seen
        self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train",
                        disable=not self.progress or not state.is_world_process_zero)   # one bar for all processes

    def on_step_begin(self, args, state, control, **kw):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.step_times.append(time.perf_counter() - self._t0)
        if state.global_step >= state.max_steps:
            control.should_save = False   # no checkpoint of the last step (the final adapter is it): a resumed
            #                               finished run trains the steps after its latest checkpoint again

    EVAL_KEY, DIGITS = "eval_loss", 5     # the record's name for the held-out loss; digits kept of a loss

    def eval_due(self, step: int, last: int) -> bool:
        """Whether the held-out loss is measured after ``step`` (the final one is measured after training)."""
        every = self.cfg.eval_steps
        return self.eval_loss is not None and every > 0 and step % every == 0 and step < last

    def validate(self, step: int) -> float:
        """The held-out loss now, kept in the history at ``step``."""
        loss = self.eval_loss()
        self.history["eval"].append({"step": step, self.EVAL_KEY: loss})
        return loss

    def after_record(self) -> None:
        """What follows each step's record (chapter 04 rewrites its history file)."""

    def on_log(self, args, state, control, logs=None, **kw):
        if "loss" not in (logs or {}):
            return
        done = state.global_step
        record = {"step": done, "loss": round(float(logs["loss"]), self.DIGITS), "lr": logs.get("learning_rate"),
                  "tokens": state.num_input_tokens_seen - self._tokens, "seconds": round(self.step_times[-1], 4)}
        self._tokens = state.num_input_tokens_seen
        self.history["train"].append(record)
        if self.eval_due(done, state.max_steps):
            record[self.EVAL_KEY] = self.validate(done)
        self.bar.set_postfix(loss=f"{record['loss']:.3f}")
        self.bar.update(done - self.bar.n)
        if done % max(self.cfg.logging_steps, 1) == 0 or self.EVAL_KEY in record or done == state.max_steps:
            self.emit(record)
        self.after_record()

    def on_save(self, args, state, control, **kw):
        """The Trainer has written ``checkpoint-N`` whole: mark it, point ``latest`` at it, prune older ones."""
        PartialState().wait_for_everyone()  # every process has written its part (its rng_state_<rank>.pth)
        if not args.should_save:           # only the main process writes (several processes: accelerate)
            return
        root = Path(args.output_dir)
        path = root / f"checkpoint-{state.global_step}"
        settle_tree(path)
        atomic_write_json(path / COMPLETE, {"step": state.global_step, "history": self.history,
                                            "fingerprint": self.fingerprint})
        atomic_write_text(root / LATEST, path.name + "\n")
        (root / "README.md").unlink(missing_ok=True)   # TRL's model card for a folder that is no model
        done = sorted((p for p in root.glob("checkpoint-*") if (p / COMPLETE).is_file()),
                      key=lambda p: int(p.name.split("-")[1]))
        keep = self.cfg.save_total_limit
        for old in done[:-keep] if keep > 0 else []:
            if old != path:
                remove_folder(old)         # hidden by one rename first: a kill mid-delete leaves no half checkpoint

    def on_train_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.close()
        PartialState().wait_for_everyone()  # every process has left the Trainer's own scan of this folder
        root = self.output_dir / CHECKPOINTS
        if state.is_world_process_zero and root.is_dir() and not any(root.iterdir()):
            root.rmdir()                   # made by the Trainer, which saved nothing in it (save_steps 0)


def resume_state(output_dir: Path, resume: bool) -> tuple[Path | None, dict | None]:
    """What a killed run left removed; with ``resume``, the checkpoint ``latest`` names and its state (the command
    checked its settings and files: ``common.run_folder``)."""
    processes = PartialState()        # this one, or those of ``accelerate launch`` (``run_sft`` joined them)
    if processes.is_main_process:
        clean_partial_checkpoints(output_dir)
    processes.wait_for_everyone()     # nobody looks for checkpoints while the main process removes some
    ckpt = latest_checkpoint(output_dir) if resume else None
    if resume and ckpt is None:
        raise ValueError(f"nothing to resume in {output_dir}: no complete {CHECKPOINTS}/{LATEST}; drop --resume")
    return ckpt, json.loads((ckpt / COMPLETE).read_text()) if ckpt else None


# --------------------------------------------------------------------------- the Trainer's settings and the run
def training_args(cfg, output_dir: Path, device: str, *, packing: bool) -> TRLConfig:
    """The ``SFTConfig`` (TRL's) of a course config: the same optimisation, checkpoints by the course's rules."""
    save = cfg.save_steps > 0
    return TRLConfig(
        output_dir=str(output_dir / CHECKPOINTS), seed=cfg.seed, data_seed=cfg.seed,
        max_steps=cfg.max_steps, num_train_epochs=cfg.num_train_epochs,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type, warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm, optim=trainer_optim(optimizer_name(cfg.optim, device)), bf16=cfg.bf16,
        fp16=cfg.fp16, use_cpu=device == "cpu", max_length=cfg.max_length,
        packing=packing, packing_strategy="bfd", padding_free=packing,
        dataset_kwargs=None if packing else {"skip_prepare_dataset": True},
        use_liger_kernel=liger_on(cfg, device),
        activation_offloading=bool(getattr(cfg, "activation_offloading", False)),
        **{CHECKPOINTING: False},   # the model is set up already
        logging_steps=1, eval_strategy="no", save_strategy="steps" if save else "no",
        save_steps=cfg.save_steps if save else 500, save_total_limit=None, report_to="none",
        include_num_input_tokens_seen="all" if packing else "non_padding", disable_tqdm=True,
        ddp_find_unused_parameters=False)


def make_trainer(model, tokenizer, train_data: SFTData, cfg, args: TRLConfig, course: CourseCallback,
                 extra=()) -> SFTTrainer:
    """TRL's ``SFTTrainer`` on the course's encoded examples, with the course's callback as its only display
    (``extra``: more Trainer callbacks, called after it)."""
    dataset = Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels} for e in train_data.examples])
    dtypes = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}   # peft's fp32 adapters
    bars = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()       # packing's map() would print a bar into the notebook
    try:
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=[course, *extra])
    finally:
        if bars:
            datasets_logging.enable_progress_bar()
    return quiet(trainer, model, dtypes=None if cfg.bf16 else dtypes)


def quiet(trainer, model, *, dtypes: dict | None):
    """The Trainer's own displays off (the course's callback draws one bar), and the trainable tensors back in
    ``dtypes`` (TRL stores a 4-bit model's adapters in bf16; ``None``: keep that, as bf16 runs do)."""
    for display in (PrinterCallback, ProgressCallback, NotebookProgressCallback):
        trainer.remove_callback(display)
    for name, p in model.named_parameters() if dtypes else ():
        if name in dtypes and p.dtype != dtypes[name]:
            p.data = p.data.to(dtypes[name])
    return trainer


def train(model, tokenizer, data: SFTData, cfg, *, output_dir, device: str, eval_data: SFTData | None = None,
          resume: bool = False, callbacks=(), progress: bool = True, fingerprint: dict | None = None,
          initial_eval: float | None = None, trainer_callbacks=()) -> dict:
    """Train ``model`` in place through ``SFTTrainer``; returns the history, step times and the final eval loss.

    ``callbacks`` are called with each log record (``{"step", "loss", "lr", "tokens", "seconds"}`` and,
    at eval points, ``"eval_loss"``). ``fingerprint`` (the run's settings and data digest, which a resume
    compares: ``common.run_folder.check_settings``) goes into each checkpoint; ``initial_eval`` is kept as step 0.
    ``trainer_callbacks`` are ``TrainerCallback``s given to the Trainer itself (chapter 05's plateau rule).
    """
    out = Path(output_dir)
    ckpt, state = resume_state(out, resume)
    history = state.get("history") if state else None

    def eval_loss() -> float:
        return evaluate(model, eval_data, cfg.per_device_eval_batch_size, tokenizer.pad_token_id, device, cfg)

    course = CourseCallback(cfg, output_dir=out, eval_loss=eval_loss, callbacks=callbacks, fingerprint=fingerprint,
                            history=history, progress=progress)
    if ckpt is None and initial_eval is not None:
        course.history["eval"].append({"step": 0, "eval_loss": initial_eval})
        course.emit({"step": 0, "eval_loss": initial_eval})
    args = training_args(cfg, out, device, packing=cfg.packing)
    trainer = make_trainer(model, tokenizer, data, cfg, args, course, trainer_callbacks)
    with trainable_4bit_layers(model), scoped_bnb_overrides(model):
        trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
        steps = trainer.state.global_step
        final_eval = None
        if eval_data is not None:
            final_eval = course.validate(steps)
            course.emit({"step": steps, "eval_loss": final_eval})
    model.eval()
    return _result(trainer, course, start=state["step"] if state else 0, final_eval=final_eval)


def _result(trainer, course: CourseCallback, *, start: int, final_eval: float | None) -> dict:
    """What ``train`` returns: steps, history, final eval loss, bytes of gradients and AdamW state, speed."""
    timed = course.step_times[1:] or course.step_times   # the first step pays one-off warm-up costs
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    state_bytes = {"grads": sum(p.numel() * p.element_size() for p in trainable),
                   "optimizer": sum(t.numel() * t.element_size() for st in trainer.optimizer.state.values()
                                    for t in st.values() if torch.is_tensor(t))}
    records = course.history["train"][-len(timed):] if timed else []
    return {"steps": trainer.state.global_step, "resumed_from": start, "history": course.history,
            "eval_loss": final_eval, "state_bytes": state_bytes,
            "step_seconds": sum(timed) / len(timed) if timed else None,
            "tokens_per_second": sum(r["tokens"] for r in records) / sum(timed) if timed else None}


class LiveLossPlot:
    """A callback that redraws the training and eval loss in the notebook as steps finish.

    Example:
        >>> plot = LiveLossPlot("LoRA")                      # doctest: +SKIP
        >>> run_sft(cfg, callbacks=[plot])                   # doctest: +SKIP
    """

    def __init__(self, title: str = "", every: int = 1):
        self.title, self.every = title, every
        self.steps, self.losses, self.eval_steps, self.eval_losses = [], [], [], []
        self._figure = LiveFigure()

    def __call__(self, record: dict) -> None:
        if "loss" in record:
            self.steps.append(record["step"])
            self.losses.append(record["loss"])
        if "eval_loss" in record:
            self.eval_steps.append(record["step"])
            self.eval_losses.append(record["eval_loss"])
        if len(self.steps) % self.every == 0 or "eval_loss" in record:
            self.draw()

    def draw(self):
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.plot(self.steps, self.losses, label="train loss (batch)")
        if self.eval_steps:
            ax.plot(self.eval_steps, self.eval_losses, "o-", label="eval loss (validation)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy")
        ax.set_title(self.title)
        ax.legend()
        fig.tight_layout()
        self._figure.show(fig)     # redrawn in place, in a cell or under a panel's button alike
        plt.close(fig)
