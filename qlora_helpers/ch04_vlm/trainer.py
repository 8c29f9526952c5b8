"""The ``vlm`` command trains through TRL's ``SFTTrainer``; this module is what chapter 04 adds to it.

The training (batch 1 x ``gradient_accumulation_steps``, clipping, the schedule, resume with the optimizer,
scheduler and random generators) is the HF ``Trainer``'s, as for chapter 03's ``sft`` command; a step's loss
is the mean over every answer token of its micro-batches, as the validation loss is. The VLM's part:

- **its data**: each example is encoded once (``records.encode``: the processor's ``input_ids``,
  ``pixel_values`` and the rest, the loss on the assistant's tokens only) and ``collate`` hands one to the
  model per micro-batch. TRL's vision collator would render and mask the conversations again; TRL treats
  the model as any causal LM (its fused loss runs the VLM's own backbone, images included);
- **two learning rates** (``vlm_optimizer``): LoRA at ``training.learning_rate``, a trained projector at
  ``training.projector_learning_rate``, both on ``schedule``;
- **the validation loss** over every answer token (``evaluate``) before training, every ``eval_steps`` and
  at the last step, and the adapter with the lowest one in ``best/`` (``VLMCallback``, on chapter 03's
  ``CourseCallback``: its records and whole checkpoints).

What the output folder holds::

    best/                    the adapter with the lowest validation loss so far (peft format)
    final/                   the adapter after the last step
    checkpoints/checkpoint-N for --resume, every save_steps before the last step (the Trainer's checkpoint,
                             complete once state.json is in it; checkpoints/latest names the newest)
    training_history.json    train loss per step, validation loss per evaluation, the best step

``best`` and ``final`` are replaced whole (``files.atomic_folder``): ``PeftModel.from_pretrained`` never
sees half an adapter.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from datasets import Dataset
from trl import SFTTrainer

from qlora_helpers.ch03_sft.trainer import CourseCallback, causal_lm_loss, quiet, resume_state, training_args
from qlora_helpers.ch04_vlm.records import answer_tokens
from qlora_helpers.common.files import atomic_folder, atomic_write_json
from qlora_helpers.common.optim import make_optimizer

HISTORY = "training_history.json"


def vlm_optimizer(model, run, device: str):
    """AdamW over LoRA (``learning_rate``) and a trained projector (``projector_learning_rate``);
    the paged or 8-bit bitsandbytes kind on CUDA as ``training.optimizer`` says, torch's on the CPU."""
    t = run.settings.training
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    groups = [{"params": [p for n, p in params.items() if "lora_" in n], "lr": t.learning_rate},
              {"params": [p for n, p in params.items() if "lora_" not in n], "lr": t.projector_learning_rate}]
    groups = [g for g in groups if g["params"]]
    name = t.optimizer if device.startswith("cuda") else "adamw"
    return make_optimizer(name, groups, setting="training.optimizer", weight_decay=0.0)


def evaluate(model, examples: list, device: str) -> float:
    """Mean cross-entropy over every answer token of ``examples`` (token-weighted)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            n = answer_tokens(example)
            total += float(causal_lm_loss(model, {k: v.to(device) for k, v in example.items()})) * n
            count += n
    model.train(was_training)
    return total / max(count, 1)


def collate(examples: list[dict]) -> dict:
    """The micro-batch of one encoded example: its tensors, which carry the batch dimension already."""
    if len(examples) != 1:
        raise ValueError(f"the vlm command trains batch 1 (one image-conversation a micro-batch), not {len(examples)}")
    return dict(examples[0])


def save_adapter(model, folder: Path) -> None:
    atomic_folder(folder, lambda tmp: model.save_pretrained(tmp))


class VLMCallback(CourseCallback):
    """Chapter 03's records, checkpoints and step timing; the validation loss (``val_loss``) every ``eval_steps``
    and at the last step, the adapter with the lowest one so far saved to ``best/`` (``history["best"]`` says
    which step; step 0, the untrained model, never counts); ``training_history.json`` rewritten after each step."""

    EVAL_KEY, DIGITS = "val_loss", 6

    def __init__(self, model, cfg, **kwargs):
        super().__init__(cfg, **kwargs)
        self.model = model

    def eval_due(self, step: int, last: int) -> bool:
        every = self.cfg.eval_steps
        return self.eval_loss is not None and (step == last or (every > 0 and step % every == 0))

    def validate(self, step: int) -> float:
        loss, best = round(self.eval_loss(), 6), self.history["best"]
        self.history["eval"].append({"step": step, "val_loss": loss})
        if step > 0 and (best is None or loss < best["val_loss"]):
            self.history["best"] = {"step": step, "val_loss": loss}
            save_adapter(self.model, self.output_dir / "best")
        return loss

    def after_record(self) -> None:
        atomic_write_json(self.output_dir / HISTORY, self.history)


def schedule(optimizer, run) -> torch.optim.lr_scheduler.LambdaLR | None:
    """The learning rates rise over the first ``training.warmup_ratio`` of the steps (at least one, so the
    first step already trains: the Trainer's warm-up starts at 0), then fall linearly to ``min_lr_ratio`` x
    at the last step. Example: 10 steps, 0.1 and 0.1 -> factors 1.0, 0.9, 0.8, ..., 0.1.
    Both 0: None, the Trainer's ``linear`` schedule (``trainer_settings``: 1.0, 0.9, ..., 0.1 over 10 steps)."""
    t, steps = run.settings.training, run.max_steps
    if not (t.warmup_ratio or t.min_lr_ratio):
        return None
    warm = max(1, round(t.warmup_ratio * steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(t.min_lr_ratio, 1 - (1 - t.min_lr_ratio) * (step - warm + 1) / max(1, steps - warm))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def trainer_settings(run) -> SimpleNamespace:
    """This run as the fields of chapter 03's config that ``training_args`` and ``CourseCallback`` read."""
    t = run.settings.training
    return SimpleNamespace(
        seed=run.seed, max_steps=run.max_steps, num_train_epochs=1.0, per_device_train_batch_size=1,
        gradient_accumulation_steps=t.gradient_accumulation_steps, learning_rate=t.learning_rate,
        lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,   # unless ``schedule`` makes one
        max_grad_norm=run.max_grad_norm,
        optim="adamw_torch",     # never built: the Trainer is handed vlm_optimizer's
        bf16=False, fp16=False,  # no autocast: the model computes in the dtype it was loaded in
        max_length=None, use_liger_kernel=False, save_steps=run.save_steps, save_total_limit=run.save_total_limit,
        eval_steps=run.eval_steps, logging_steps=1)


def make_trainer(model, processor, train: list, run, *, out: Path, device: str, course: VLMCallback) -> SFTTrainer:
    """TRL's ``SFTTrainer`` on the encoded examples, with the course's optimizer and callback."""
    settings = course.cfg
    args = training_args(settings, out, device, packing=False)
    args.remove_unused_columns = False     # every input the processor made (pixel_values, image_grid_thw, ...)
    optimizer = vlm_optimizer(model, run, device)
    dtypes = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    dataset = Dataset.from_list(train).with_format("torch")   # each row an encoded example, tensors as they were
    # processing_class: what each checkpoint saves beside the adapter. The examples are encoded already, so
    # the processor's tokenizer is enough (a processor without a video part, as Qwen2-VL's without
    # torchvision, cannot save_pretrained itself)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, data_collator=collate,
                         processing_class=processor.tokenizer, callbacks=[course],
                         optimizers=(optimizer, schedule(optimizer, run)))
    return quiet(trainer, model, dtypes=dtypes)      # TRL casts a 4-bit model's adapters to bf16: peft's dtype


def train_vlm(model, train: list, val: list | None, run, *, processor, out, device: str, fingerprint: dict,
              progress: bool = True, callbacks=()) -> dict:
    """Train ``model`` in place for ``run.max_steps`` steps; returns the history (also in ``training_history.json``).

    ``callbacks`` get each step's record (``{"step", "loss", "lr", "tokens", "seconds"}``, ``tokens`` the step's
    input tokens, image tokens included, and ``"val_loss"`` where one was measured). ``run.resume`` continues
    from ``checkpoints/latest``.
    """
    out = Path(out)
    ckpt, state = resume_state(out, run.resume)
    history = state["history"] if state else {"train": [], "eval": [], "best": None}
    course = VLMCallback(model, trainer_settings(run), output_dir=out, callbacks=callbacks, fingerprint=fingerprint,
                         eval_loss=(lambda: evaluate(model, val, device)) if val else None, history=history,
                         progress=progress)
    if val and ckpt is None:
        course.validate(0)
    trainer = make_trainer(model, processor, train, run, out=out, device=device, course=course)
    trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    save_adapter(model, out / "final")
    atomic_write_json(out / HISTORY, history)
    return history
