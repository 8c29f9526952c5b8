"""A LLaVA-style model small enough for a CPU: CLIP vision tower + projector + SmolLM2.

The parts are transformers' own classes, put together the way LLaVA-1.5 is:

- ``CLIPVisionModel``: a small ViT. No pretrained vision encoder can be had offline, so the tower
  gets a short supervised pre-training of its own (``pretrain_tower``), standing in for CLIP's;
  then it is frozen and never quantised, as in QLoRA recipes for VLMs;
- ``LlavaMultiModalProjector``: two linear layers with a GELU that map patch features to the
  language model's embedding width; trained in full;
- SmolLM2-135M-Instruct (real weights) as the language model, its linear layers quantised to
  4 bits (``quantize_language_model``) and LoRA adapters on top (``lora_config``).

Example:
    >>> from qlora_helpers.ch04_vlm.config import preset
    >>> lora_config(preset("ultra_low_memory")).target_modules               # doctest: +ELLIPSIS
    '.*language_model.*\\\\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)'
"""

from __future__ import annotations

import time
import warnings
from copy import deepcopy

import bitsandbytes as bnb
import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from qlora_helpers.ch04_vlm.data import IMAGE_TOKEN
from qlora_helpers.common.quant import keep_cpu_training_layout

N_CLASSES = 12   # digits 0-9, face, not a face


def tower_config(image_size: int = 24, patch_size: int = 8, *, hidden: int = 64, layers: int = 2):
    """A CLIP vision config: ``(image_size / patch_size)^2`` patch tokens reach the language model."""

    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                            num_attention_heads=4, image_size=image_size, patch_size=patch_size,
                            projection_dim=hidden)


def tower_features(tower, pixel_values):
    """Patch features as LLaVA reads them: last hidden layer, CLS token dropped."""
    return tower(pixel_values, output_hidden_states=True).hidden_states[-1][:, 1:]


def pretrain_tower(examples: list, *, image_size: int = 24, patch_size: int = 8, epochs: int = 6,
                   batch_size: int = 64, lr: float = 3e-3, seed: int = 0) -> tuple:
    """Train a fresh CLIP tower to classify the training images (12 classes) through a linear head
    on its mean patch feature. Returns ``(tower, head, info)``, the tower frozen; the VLM never uses
    the head, ``probe_accuracy`` does.
    """

    torch.manual_seed(seed)
    tower = CLIPVisionModel(tower_config(image_size, patch_size)).train()
    head = torch.nn.Linear(tower.config.hidden_size, N_CLASSES)
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    x = torch.from_numpy(np.stack([e.pixels for e in examples]))
    y = torch.tensor([e.label for e in examples])
    gen = torch.Generator().manual_seed(seed)
    t0, losses = time.perf_counter(), []
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            logits = head(tower_features(tower, x[idx]).mean(1))
            loss = torch.nn.functional.cross_entropy(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
    tower.eval().requires_grad_(False)
    head.eval().requires_grad_(False)
    return tower, head, {"steps": steps, "seconds": round(time.perf_counter() - t0, 1),
                   "loss_first": round(losses[0], 3), "loss_last": round(losses[-1], 3)}


def probe_accuracy(tower, head, examples: list) -> float:
    """Accuracy of the tower's own pre-training head: about the most the VLM can learn to say."""

    x = torch.from_numpy(np.stack([e.pixels for e in examples]))
    with torch.no_grad():
        pred = head(tower_features(tower, x).mean(1)).argmax(-1)
    return float((pred == torch.tensor([e.label for e in examples])).float().mean())


def build_vlm(tower, language_model, tokenizer, *, seed: int = 0):
    """Assemble ``LlavaForConditionalGeneration`` from a vision tower and a causal LM (modules are shared).

    Adds an ``<image>`` token to the tokenizer (its embedding row is never read: image features
    replace it) and a freshly initialised projector.
    """


    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    language_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    config = LlavaConfig(vision_config=tower.config.to_dict(), text_config=language_model.config.to_dict(),
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         vision_feature_layer=-1, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu")
    with torch.device("meta"):
        vlm = LlavaForConditionalGeneration(config)
    torch.manual_seed(seed)
    device = language_model.device
    vlm.model.vision_tower = tower.to(device)
    vlm.model.multi_modal_projector = LlavaMultiModalProjector(config).to(device, torch.float32)
    vlm.model.language_model = language_model.model
    vlm.lm_head = language_model.lm_head
    vlm.generation_config = language_model.generation_config
    vlm.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    return vlm


def match_projector_scale(vlm, examples: list) -> dict:
    """Scale the fresh projector so its outputs are as long as the language model's token embeddings.

    A random projector fed with a trained tower's features emits vectors several times longer
    than any word embedding; the language model then attends to little else and training starts
    from a wreck. LLaVA avoids this with a projector-only pre-training stage; one rescale does here.
    """

    proj = vlm.model.multi_modal_projector
    x = torch.from_numpy(np.stack([e.pixels for e in examples])).to(proj.linear_1.weight.device)
    with torch.no_grad():
        out = proj(tower_features(vlm.model.vision_tower, x)).norm(dim=-1).mean()
        target = vlm.get_input_embeddings().weight.float().norm(dim=-1).mean()
        factor = float(target / out)
        proj.linear_2.weight.mul_(factor)
        proj.linear_2.bias.mul_(factor)
    return {"projector_norm_before": round(float(out), 2), "embedding_norm": round(float(target), 2),
            "factor": round(factor, 3)}


def quantize_linears(root, quantization, compute_dtype) -> dict:
    """Swap every ``nn.Linear`` under ``root`` for a bitsandbytes 4-bit layer; the weight bytes before and after."""

    before = after = 0
    for module in root.modules():
        for name, child in list(module.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, quant_type=quantization.quant_type,
                                      compress_statistics=quantization.double_quant)
            layer.load_state_dict(child.state_dict())
            layer = layer.to(child.weight.device)      # moving a Linear4bit is what quantises it
            before += child.weight.numel() * child.weight.element_size()
            after += layer.weight.numel() * layer.weight.element_size()
            setattr(module, name, layer)
    keep_cpu_training_layout(root)
    return {"linear_bytes_before": before, "linear_bytes_after": after}


def quantize_language_model(vlm, quantization, compute_dtype) -> dict:
    """Swap every ``nn.Linear`` inside the language model's decoder layers for a bitsandbytes 4-bit layer.

    This is what ``from_pretrained`` with a 4-bit ``BitsAndBytesConfig`` as ``quantization_config``
    does; embeddings, norms, ``lm_head``, the vision tower and the projector stay as they are.
    Returns the weight bytes before and after.
    """

    sizes = quantize_linears(vlm.model.language_model.layers, quantization, compute_dtype)
    vlm.is_loaded_in_4bit = True                       # tells peft to use its bitsandbytes LoRA layers
    return sizes


def tower_in_4bit(tower, head, examples: list, quantization) -> dict:
    """What NF4 does to a frozen vision tower: its own head's accuracy on ``examples`` before and after.

    Quantises a copy (the tower itself is left as it is), computing in the tower's own dtype.
    """

    copy = deepcopy(tower)
    sizes = quantize_linears(copy, quantization, compute_dtype=next(tower.parameters()).dtype)
    return {"accuracy_16bit": probe_accuracy(tower, head, examples),
            "accuracy_4bit": probe_accuracy(copy.eval(), head, examples), **sizes}


def lora_config(cfg):
    """peft ``LoraConfig`` for the config's LoRA section, restricted to the language model by a regex."""

    names = "|".join(cfg.lora.targets)
    return LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=rf".*language_model.*\.({names})", task_type="CAUSAL_LM")


def make_optimizer(groups: list, name: str) -> tuple:
    """The config's optimizer over ``groups`` (param groups with their own ``lr``), and a line saying
    what actually runs. bitsandbytes' paged 8-bit AdamW pages its states through CUDA unified memory;
    on a CPU it keeps the 8-bit states but cannot page. If it does not run at all, torch AdamW does.
    """

    if name == "adamw":
        return torch.optim.AdamW(groups), "torch AdamW (32-bit states)"
    try:


        cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
        probe = torch.nn.Parameter(torch.randn(64, 128, device=groups[0]["params"][0].device))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            test = cls([probe], lr=1e-3)
            probe.grad = torch.ones_like(probe)
            test.step()
        paged_off = any("not supported on CPU" in str(w.message) for w in caught)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = cls(groups)
        line = f"bitsandbytes {cls.__name__}: 8-bit states"
        if name == "paged_adamw_8bit":
            line += (", paging off (paging needs CUDA unified memory; on the CPU it falls back to plain 8-bit)"
                     if paged_off else ", paged")
        return opt, line
    except Exception as err:   # no usable bitsandbytes backend on this machine
        return torch.optim.AdamW(groups), (f"fallback: torch AdamW, because bitsandbytes {name} failed here "
                                           f"({type(err).__name__}: {str(err).splitlines()[0][:80]})")


def enable_checkpointing(model) -> None:
    """Gradient (activation) checkpointing of every layer, non-reentrant: inputs need no gradient."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):        # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def prepare_for_training(vlm, cfg, lora_lr: float | None = None, projector_lr: float | None = None):
    """LoRA on the language model, projector trainable, tower frozen, gradient checkpointing as configured.

    Returns ``(peft_model, optimizer, optimizer_line)``.
    """

    keep_cpu_training_layout(vlm)
    if cfg.hardware.gradient_checkpointing:
        enable_checkpointing(vlm)
        for c in (vlm.config, vlm.config.get_text_config(), vlm.model.language_model.config):
            c.use_cache = False                        # no KV cache while training; generate() still uses one
    model = get_peft_model(vlm, lora_config(cfg))
    projector = model.base_model.model.model.multi_modal_projector
    projector.requires_grad_(True)
    lora = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    groups = [{"params": lora, "lr": lora_lr or cfg.training.learning_rate, "weight_decay": 0.0},
              {"params": list(projector.parameters()), "lr": projector_lr or cfg.training.projector_learning_rate,
               "weight_decay": 0.0}]
    opt, line = make_optimizer(groups, cfg.training.optimizer)
    return model, opt, line


def trainable_summary(model) -> dict:
    """Parameters that train, by part, and the frozen rest (a packed 4-bit weight counts its 2 values per byte)."""
    out = {"lora": 0, "projector": 0, "other_trainable": 0, "frozen": 0}
    for name, p in model.named_parameters():
        n = p.numel() * (2 if getattr(p, "quant_state", None) is not None else 1)
        if not p.requires_grad:
            out["frozen"] += n
        elif "lora_" in name:
            out["lora"] += n
        elif "multi_modal_projector" in name:
            out["projector"] += n
        else:
            out["other_trainable"] += n
    return out
