"""Use a fine-tuned model: reload it, chat with it, merge the adapter, and measure what merging changes.

Reloading is plain peft, nothing of this course in between::

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir)

Merging folds ``W + (alpha / r) * B @ A`` into each target weight with ``merge_and_unload()``.
The pitfall with QLoRA: the adapter was trained against the *dequantised 4-bit* weights
``Q(W)``, not ``W``. Merging into the 4-bit layers re-quantises ``Q(W) + BA`` and part of the
small update rounds away; merging onto the original bf16 ``W`` gives ``W + BA``, a model that
was never trained (it also drops the quantisation error the adapter learned around).
``merge_adapter(..., base="dequantized")`` merges onto ``Q(W)``, which is the trained model;
``logit_difference`` measures each choice. Every merge forms ``W + BA`` in fp32 and rounds it to bf16
once: added to a bf16 weight, an update smaller than half a bf16 step of that weight would round away
(for a QLoRA adapter, most of it: chapter 03 measures the two).

From the command line (the seed's ``inference_lora.py``)::

    python -m qlora_helpers.ch03_sft.chat --lora_model outputs/sft-lora --prompt "What is AI?"
    python -m qlora_helpers.ch03_sft.chat --lora_model outputs/sft-qlora-4bit --load_in_4bit --chat
    python -m qlora_helpers.ch03_sft.chat --lora_model outputs/sft-lora --merge_to outputs/sft-lora-merged
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging

from qlora_helpers.ch03_sft.modes import trainable_4bit_layers
from qlora_helpers.common.device import check_device_name
from qlora_helpers.common.files import COURSE_FILES, foreign_files, record_course_files, replace_folder
from qlora_helpers.common.models import (
    bnb_config,
    check_adapter_folder,
    check_model_folder,
    load_adapter,
)
from qlora_helpers.errors import OneLineParser, UserError, run_main

PROBE_PROMPTS = ["What is AI?", "Tell me a joke.", "Do you like music?"]


def _dtype(name):
    if not isinstance(name, str):
        return name
    return {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
            "fp16": torch.float16, "float16": torch.float16}[name]


def base_of(adapter_dir: str | Path) -> str:
    """The base model an adapter was trained on, as recorded in its ``adapter_config.json``."""
    cfg = check_adapter_folder(adapter_dir, setting="--lora_model")
    if not cfg.get("base_model_name_or_path"):
        raise UserError(f"{Path(adapter_dir) / 'adapter_config.json'} names no base model: pass --base_model")
    return cfg["base_model_name_or_path"]


def load_for_inference(model_dir: str | Path, base_model: str | None = None, *, load_in_4bit: bool = False,
                       load_in_8bit: bool = False, dtype="fp32", device: str = "cpu"):
    """A trained output folder ready to generate: adapter on its base (optionally quantised), or a full model."""

    model_dir = Path(model_dir)
    if model_dir.is_file():
        raise UserError(f"--lora_model {model_dir} is a file, not a folder: give the sft output folder that holds it")
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: no such model folder; train one with `python -m qlora_helpers sft`")
    if not (model_dir / "adapter_config.json").is_file() and not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: neither an adapter (adapter_config.json) nor a model (config.json); "
                                "give the output_dir of `python -m qlora_helpers sft`")
    if load_in_4bit and load_in_8bit:
        raise ValueError("load_in_4bit and load_in_8bit contradict: choose one")
    adapter = (model_dir / "adapter_config.json").is_file()
    base_path = (base_model or base_of(model_dir)) if adapter else str(model_dir)
    check_model_folder(base_path, setting="--base_model" if base_model else
                       f"the base of {model_dir}" if adapter else "--lora_model")
    dtype = _dtype(dtype)
    kwargs = {"dtype": dtype}
    if load_in_4bit or load_in_8bit:
        q = bnb_config("4bit" if load_in_4bit else "8bit", dtype)
        kwargs.update(quantization_config=q, device_map={"": device})
    if adapter:
        try:
            base = AutoModelForCausalLM.from_pretrained(base_path, **kwargs)
        except OSError as err:
            raise ValueError(f"{model_dir}: its base model {base_path!r} cannot be loaded "
                             f"({str(err).splitlines()[0]}); pass --base_model with a local model folder") from None
        model = load_adapter(base, model_dir, base_path)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if "device_map" not in kwargs:
        model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model.eval(), tokenizer


def chat(model, tokenizer, message: str | list[dict], *, history: list[dict] | None = None,
         max_new_tokens: int = 48, system: str | None = None) -> str:
    """One greedy answer to ``message`` (after ``history``), formatted with the tokenizer's chat template."""

    messages = ([{"role": "system", "content": system}] if system else []) + list(history or [])
    messages += [{"role": "user", "content": message}] if isinstance(message, str) else list(message)
    device = next(model.parameters()).device
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True).to(device)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def prompt_logits(model, tokenizer, prompts=PROBE_PROMPTS):
    """Float32 logits of every position of each prompt (chat-formatted), concatenated: ``[tokens, vocab]``."""

    device = next(model.parameters()).device
    rows = []
    with torch.no_grad():
        for p in prompts:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)["input_ids"].to(device)
            rows.append(model(input_ids=ids).logits[0].float().cpu())
    return torch.cat(rows)


def logit_difference(a, b) -> dict:
    """Compare two logit tensors: largest and mean absolute difference, and how often the top token agrees."""
    diff = (a - b).abs()
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
            "top1_agree": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
            "logit_scale": float(a.abs().mean())}


def dequantize_model(model, dtype="bf16"):
    """The bitsandbytes layers of a quantised model as plain ``nn.Linear`` holding their dequantised weights
    (transformers' ``dequantize``): the exact base a QLoRA adapter was trained against, as an ordinary model."""
    with trainable_4bit_layers(model):  # undo bitsandbytes' CPU inference packing, if a forward pass did it
        pass
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()       # its note on the dtype it casts to
    try:
        model = model.dequantize(dtype=_dtype(dtype))
    finally:
        logging.set_verbosity(verbosity)
    return model.to(_dtype(dtype))


def training_quantization(adapter_dir: str | Path):
    """The ``BitsAndBytesConfig`` a QLoRA adapter was trained with (from ``sft_config.json``), or ``None``."""
    cfg_path = Path(adapter_dir) / "sft_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    if not cfg.get("use_qlora"):
        return None
    return bnb_config("8bit" if (cfg.get("quantization_bit") or 4) == 8 else "4bit", torch.float32,
                      quant_type=cfg.get("bnb_4bit_quant_type", "nf4"),
                      double_quant=cfg.get("bnb_4bit_use_double_quant", True))


def merge_adapter(adapter_dir: str | Path, base_model: str | None = None, *, dtype="bf16", base: str = "auto",
                  save_to: str | Path | None = None, overwrite: bool = False):
    """Fold the adapter into a plain (never quantised) base with ``merge_and_unload``.

    ``base="auto"`` (the default) merges the model that was trained: ``"dequantized"`` for a QLoRA
    adapter, ``"original"`` otherwise. ``base="original"`` loads the base checkpoint in ``dtype``
    (the usual recipe, and for QLoRA the pitfall chapter 03 measures); ``base="dequantized"`` loads
    it the way QLoRA training saw it (4- or 8-bit, from ``sft_config.json``) and dequantises it
    first, so the merged model is the trained one.
    The sum is formed in fp32 and rounded to ``dtype`` once at the end (the memory of the model in fp32 while
    merging: 4 bytes a parameter). With ``save_to`` the merged model and tokenizer are written into that folder,
    listed in its ``.course_files.json``; ``check_merge_target`` says which folders it may replace, checked before
    anything loads.
    """
    path, quantization = base_model or base_of(adapter_dir), training_quantization(adapter_dir)
    check_model_folder(path, setting="--base_model" if base_model else f"the base of {adapter_dir}")
    if save_to is not None:
        check_merge_target(save_to, adapter_dir, path, overwrite=overwrite)
    if base == "auto":
        base = "dequantized" if quantization else "original"
    if base == "original":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    elif base == "dequantized":
        if quantization is None:
            raise ValueError(f"{adapter_dir}: no sft_config.json of a QLoRA run, so the training quantisation is "
                             "unknown; merge onto the original base instead")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map={"": "cpu"},
                                                     quantization_config=quantization)
        model = dequantize_model(model, "fp32")
    else:
        raise ValueError(f"base must be 'auto', 'original' or 'dequantized', not {base!r}")
    merged = load_adapter(model, adapter_dir, path).merge_and_unload().eval().to(_dtype(dtype))
    if save_to is not None:
        tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
        replace_folder(save_to, lambda tmp: _save_merged(merged, tokenizer, tmp))
    return merged


def _save_merged(model, tokenizer, folder: Path) -> None:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    record_course_files(folder, [p.name for p in folder.iterdir()] + [COURSE_FILES])


def _overlap(target: Path, other: Path) -> str:
    """How folder ``target`` meets folder ``other``: ``"is"``, ``"holds"``, ``"is inside"`` or ``""``."""
    other = other.resolve()
    return "is" if target == other else "holds" if target in other.parents else "is inside" \
        if other in target.parents else ""


def check_merge_target(save_to, adapter_dir, base_path, *, overwrite: bool) -> None:
    """Refuse, before anything loads, a merge folder that would replace what the user owns: the adapter being
    merged or its base (or a folder holding or inside either), a file, a folder holding files the course did
    not write (an earlier merge lists its own in ``.course_files.json``), and a non-empty one without ``overwrite``."""
    target = Path(save_to).resolve()
    for what, other in (("the adapter being merged", adapter_dir), ("its base model", base_path)):
        other = Path(str(other)).expanduser()
        how = _overlap(target, other) if other.exists() else ""
        if how:
            raise UserError(f"--merge_to {save_to} {how} {what} ({other}), which the merge must not replace: "
                            f"choose a new folder, e.g. {other.resolve().name}-merged beside it")
    if target.exists() and not target.is_dir():
        raise UserError(f"--merge_to {save_to} is a file, not a folder: choose a folder name")
    foreign = foreign_files(target)
    if foreign:
        shown = ", ".join(foreign[:4]) + (", ..." if len(foreign) > 4 else "")
        raise UserError(f"--merge_to {save_to} holds files this command did not write ({shown}): --overwrite "
                        "replaces only a merged model it wrote there; choose another --merge_to")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise UserError(f"--merge_to {save_to} already holds files of an earlier merge: pass --overwrite to replace "
                        "them, or choose another folder")


# --------------------------------------------------------------------------- command line
def main(argv=None) -> int:
    """The command line; bad input is one line and exit status 2 (``--debug`` shows the traceback)."""
    return run_main(_main, argv)


def _main(argv) -> int:
    p = OneLineParser(prog="python -m qlora_helpers.ch03_sft.chat",
                                description="Chat with, or merge, a model trained by `python -m qlora_helpers sft`.")
    p.add_argument("--lora_model", required=True, help="the sft output folder (adapter or full model)")
    p.add_argument("--base_model", help="base model folder or hub id (default: the one in adapter_config.json)")
    p.add_argument("--load_in_4bit", action="store_true", help="load the base in NF4 for inference")
    p.add_argument("--load_in_8bit", action="store_true", help="load the base in LLM.int8 for inference")
    p.add_argument("--prompt", action="append", help="answer this prompt (repeatable)")
    p.add_argument("--chat", action="store_true", help="interactive chat; an empty line ends it")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--merge_to", help="merge the adapter into a bf16 base and save it here")
    p.add_argument("--merge_base", choices=["auto", "original", "dequantized"], default="auto",
                   help="auto (default): the model that was trained, i.e. a QLoRA adapter onto the dequantised "
                        "weights it trained with; original: onto the original weights (for QLoRA the pitfall "
                        "chapter 03 measures)")
    p.add_argument("--overwrite", action="store_true", help="let --merge_to replace a non-empty folder")
    p.add_argument("--logits_out", help="save the logits of the probe prompts (torch.save) for comparisons")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="dtype of the base's weights")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.load_in_4bit and args.load_in_8bit:
        p.error("--load_in_4bit and --load_in_8bit contradict: choose one")
    if args.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be >= 1 (64 answers a short question), not {args.max_new_tokens}")
    check_device_name(args.device, "--device")
    logging.disable_progress_bar()      # loading bars would come before the answer, or before an error line
    if args.merge_to:
        base = args.merge_base
        if base == "auto":
            base = "dequantized" if training_quantization(args.lora_model) else "original"
        merge_adapter(args.lora_model, args.base_model, dtype="bf16", base=base, save_to=args.merge_to,
                      overwrite=args.overwrite)
        print(f"merged into the {base} base in bf16 and saved to {args.merge_to}")
        return 0
    model, tok = load_for_inference(args.lora_model, args.base_model, load_in_4bit=args.load_in_4bit,
                                    load_in_8bit=args.load_in_8bit, dtype=args.dtype, device=args.device)
    if args.logits_out:
        torch.save(prompt_logits(model, tok), args.logits_out)
    for prompt in args.prompt or []:
        print(f"user: {prompt}\nassistant: {chat(model, tok, prompt, max_new_tokens=args.max_new_tokens)}")
    history: list[dict] = []
    while args.chat:
        try:
            line = input("user: ").strip()
        except (EOFError, KeyboardInterrupt):   # Ctrl-D or Ctrl-C at the prompt: the chat ends, as an empty line
            print()
            break
        if not line:
            break
        reply = chat(model, tok, line, history=history, max_new_tokens=args.max_new_tokens)
        print(f"assistant: {reply}")
        history += [{"role": "user", "content": line}, {"role": "assistant", "content": reply}]
    return 0


if __name__ == "__main__":
    sys.exit(main())
