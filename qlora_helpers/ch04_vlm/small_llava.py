"""The small LLaVA of chapter 04's practice: a CLIP tower pre-trained here, SmolLM2, and how to grade it.

The parts are transformers' own classes, put together the way LLaVA-1.5 is, and saved as a
``from_pretrained`` folder that the ``vlm`` command trains like any hub model:

- ``CLIPVisionModel``: a small ViT. No pretrained vision encoder can be had offline, so the tower
  gets a short supervised pre-training of its own (``pretrain_tower``), standing in for CLIP's;
  the ``vlm`` command keeps it frozen and 16-bit, as QLoRA recipes for VLMs do;
- ``LlavaMultiModalProjector``: two linear layers with a GELU, fresh, rescaled once
  (``match_projector_scale``); the command trains it in full (``--train_projector``);
- SmolLM2-135M-Instruct (real weights) as the language model: the command loads its linear
  layers in 4-bit and puts LoRA adapters on them.

``grade`` scores the answers by the valid answers' scores (``Yes``/``No``, ``0``-``9``).

Example:
    >>> processor = small_processor(image_size=24, patch_size=8)              # doctest: +SKIP
    >>> pixels, labels = tower_inputs(read_records("train.jsonl"), processor)   # doctest: +SKIP
    >>> tower, head, info = pretrain_tower(pixels, labels)                     # doctest: +SKIP
    >>> write_small_llava("small-llava", tower, processor, pixels[:64])        # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
import timeit
from copy import deepcopy
from pathlib import Path

import bitsandbytes as bnb
import torch
from PIL import Image
from transformers import (
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from qlora_helpers.ch04_vlm.hub_model import make_processor, write_vlm_folder
from qlora_helpers.ch04_vlm.records import ANSWERS, QUESTIONS, question_answer
from qlora_helpers.common.assets import TOKENIZER_FILES, verify
from qlora_helpers.common.models import load_causal_lm
from qlora_helpers.common.quant import keep_cpu_training_layout

N_CLASSES = 12   # digits 0-9, face, not a face


def small_processor(*, image_size: int = 24, patch_size: int = 8) -> LlavaProcessor:
    """SmolLM2's tokenizer plus ``<image>``, a CLIP image processor at ``image_size`` px, SmolLM2's chat format
    (ChatML): each image becomes ``(image_size / patch_size)^2`` image tokens."""
    tokenizer = AutoTokenizer.from_pretrained(verify("smollm2", only=TOKENIZER_FILES))
    return make_processor("llava", tokenizer, image_size, patch_size=patch_size, template="chatml")


def tower_inputs(records: list, processor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image of ``records`` once, as the processor gives it to the tower, and the tower's classes
    (digits 0-9, face 10, not a face 11). Records of one image each, questions of ``records.QUESTIONS``."""
    images, labels = [], []
    for record in {r.images[0]: r for r in records}.values():
        with Image.open(record.images[0]) as im:
            images.append(im.convert("RGB"))
        question, answer = question_answer(record)
        labels.append(int(answer) if question == QUESTIONS["digit"] else 10 if answer == "Yes" else 11)
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    return pixels, torch.tensor(labels)


def tower_config(image_size: int = 24, patch_size: int = 8, *, hidden: int = 64, layers: int = 2):
    """A CLIP vision config: ``(image_size / patch_size)^2`` patch tokens reach the language model."""
    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                            num_attention_heads=4, image_size=image_size, patch_size=patch_size,
                            projection_dim=hidden)


def tower_features(tower, pixel_values):
    """Patch features as LLaVA reads them: last hidden layer, CLS token dropped."""
    return tower(pixel_values, output_hidden_states=True).hidden_states[-1][:, 1:]


def pretrain_tower(pixels, labels, *, patch_size: int = 8, epochs: int = 6, batch_size: int = 64,
                   lr: float = 3e-3, seed: int = 0) -> tuple:
    """Train a fresh CLIP tower to classify ``pixels`` into ``labels`` (12 classes) through a linear head
    on its mean patch feature. Returns ``(tower, head, info)``, both frozen; the VLM never uses the head,
    ``probe_accuracy`` does."""
    torch.manual_seed(seed)
    tower = CLIPVisionModel(tower_config(pixels.shape[-1], patch_size)).train()
    head = torch.nn.Linear(tower.config.hidden_size, N_CLASSES)
    opt = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    t0, losses = time.perf_counter(), []
    steps = epochs * math.ceil(len(pixels) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    for _ in range(epochs):
        for idx in torch.randperm(len(pixels), generator=gen).split(batch_size):
            loss = torch.nn.functional.cross_entropy(head(tower_features(tower, pixels[idx]).mean(1)), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
    tower.eval().requires_grad_(False)
    head.eval().requires_grad_(False)
    return tower, head, {"steps": steps, "seconds": round(time.perf_counter() - t0, 1),
                         "loss_first": round(losses[0], 3), "loss_last": round(losses[-1], 3)}


def probe_accuracy(tower, head, pixels, labels) -> float:
    """Accuracy of the tower's own pre-training head: about the most the VLM can learn to say."""
    with torch.no_grad():
        pred = head(tower_features(tower, pixels.to(next(tower.parameters()).dtype)).mean(1)).argmax(-1)
    return float((pred == labels).float().mean())


def tower_in_4bit(tower, head, pixels, labels, quantization) -> dict:
    """What NF4 does to a frozen vision tower: its own head's accuracy before and after, on a 4-bit copy
    (bitsandbytes' ``Linear4bit`` for every ``nn.Linear``; the tower itself is left as it is)."""
    copy, before, after = deepcopy(tower), 0, 0
    for module in list(copy.modules()):
        for name, child in list(module.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=child.weight.dtype, quant_type=quantization.quant_type,
                                      compress_statistics=quantization.double_quant)
            layer.load_state_dict(child.state_dict())
            layer = layer.to(child.weight.device)      # moving a Linear4bit is what quantises it
            before += child.weight.numel() * child.weight.element_size()
            after += layer.weight.numel() * layer.weight.element_size()
            setattr(module, name, layer)
    keep_cpu_training_layout(copy)
    return {"accuracy_16bit": probe_accuracy(tower, head, pixels, labels),
            "accuracy_4bit": probe_accuracy(copy.eval(), head, pixels, labels),
            "linear_bytes_before": before, "linear_bytes_after": after}


def match_projector_scale(vlm, pixels) -> dict:
    """Scale the fresh projector so its outputs are as long as the language model's token embeddings.

    A random projector fed with a trained tower's features emits vectors several times longer
    than any word embedding; the language model then attends to little else and training starts
    from a wreck. LLaVA avoids this with a projector-only pre-training stage; one rescale does here.
    """
    proj = vlm.model.multi_modal_projector
    with torch.no_grad():
        out = proj(tower_features(vlm.model.vision_tower, pixels)).norm(dim=-1).mean()
        target = vlm.get_input_embeddings().weight.float().norm(dim=-1).mean()
        factor = float(target / out)
        proj.linear_2.weight.mul_(factor)
        proj.linear_2.bias.mul_(factor)
    return {"projector_norm_before": round(float(out), 2), "embedding_norm": round(float(target), 2),
            "factor": round(factor, 3)}


def write_small_llava(folder: str | Path, tower, processor, pixels, *, dtype=torch.float32, seed: int = 0,
                      language_model: str = "") -> dict:
    """Save ``LlavaForConditionalGeneration`` of ``tower``, a fresh projector (seeded, rescaled on ``pixels``)
    and SmolLM2 in ``dtype`` (``language_model``: ``""`` its real weights, ``"random:smollm2-135m"`` random ones at
    its shape), with ``processor``, as one ``from_pretrained`` folder. Returns the rescale."""
    lm, _ = load_causal_lm(language_model, dtype=dtype)
    tokenizer = processor.tokenizer
    lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)   # <image>'s row is never read
    config = LlavaConfig(vision_config=tower.config.to_dict(), text_config=lm.config.to_dict(),
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu")
    with torch.device("meta"):
        vlm = LlavaForConditionalGeneration(config)
    torch.manual_seed(seed)
    vlm.model.vision_tower = tower
    vlm.model.multi_modal_projector = LlavaMultiModalProjector(config)
    vlm.model.language_model, vlm.lm_head = lm.model, lm.lm_head
    vlm.generation_config = lm.generation_config
    scale = match_projector_scale(vlm, pixels)
    write_vlm_folder(folder, vlm, processor)
    return scale


def grade(model, processor, records: list, *, max_new_tokens: int = 2) -> dict:
    """Grade each record's answer and say what the model answers, in one greedy generation per question kind.

    The grade looks at the first generated position only, at the scores of the valid answers
    (``Yes``/``No`` or ``0``-``9``): the highest is the model's choice. The text is the free greedy
    answer. Returns ``{"accuracy": {"face", "digit", "all"}, "choices": [...], "texts": [...]}``, one
    choice and text per record in the order given. Records of one image and one question each.
    """
    tokenizer, device = processor.tokenizer, next(model.parameters()).device
    asked = [question_answer(r) for r in records]
    choices, texts, correct = [None] * len(records), [None] * len(records), {}
    was_training = model.training
    model.eval()
    for kind, question in QUESTIONS.items():
        rows = [i for i, (q, _) in enumerate(asked) if q == question]   # prompts of one length: no padding
        if not rows:
            continue
        text = processor.apply_chat_template(records[rows[0]].messages[:-1], tokenize=False, add_generation_prompt=True)
        images = []
        for i in rows:
            with Image.open(records[i].images[0]) as im:
                images.append([im.convert("RGB")])
        inputs = processor(text=[text] * len(rows), images=images, return_tensors="pt").to(device)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, use_cache=True, pad_token_id=tokenizer.eos_token_id)
        ids = [tokenizer(a, add_special_tokens=False)["input_ids"][0] for a in ANSWERS[kind]]
        picks = out.logits[0][:, ids].argmax(-1).tolist()
        new = out.sequences[:, inputs["input_ids"].shape[1]:]
        for i, j, seq in zip(rows, picks, new):
            choices[i], texts[i] = ANSWERS[kind][j], tokenizer.decode(seq, skip_special_tokens=True).strip()
            correct.setdefault(kind, []).append(choices[i] == asked[i][1])
    model.train(was_training)
    accuracy = {k: sum(v) / len(v) for k, v in correct.items()}
    accuracy["all"] = sum(map(sum, correct.values())) / max(1, len(records))
    return {"accuracy": accuracy, "choices": choices, "texts": texts}


def matmul_seconds(dtypes, *, rows: int, inner: int, cols: int, repeats: int = 20) -> dict:
    """Best-of-``repeats`` seconds of one ``(rows x inner) @ (inner x cols)`` product in each dtype, on the CPU.

    Example: ``matmul_seconds((torch.float32, torch.bfloat16), rows=25, inner=576, cols=1536)``
    -> ``{"torch.float32": 4e-05, "torch.bfloat16": ...}`` (seconds; they vary by machine and load).
    """
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(rows, inner, generator=gen), torch.randn(inner, cols, generator=gen)
    out = {}
    for dtype in dtypes:
        x, y = a.to(dtype), b.to(dtype)
        x @ y                                      # warm-up: the first call picks a kernel
        out[str(dtype)] = min(timeit.repeat(lambda x=x, y=y: x @ y, number=1, repeat=repeats))
    return out
