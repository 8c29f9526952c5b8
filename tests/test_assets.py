"""The offline assets are the real thing, verified, split as documented, and fail loudly."""

import json
import shutil

import pytest
import torch

from qlora_helpers.common import assets
from qlora_helpers.common.models import load_causal_lm


def test_smollm2_is_the_real_pretrained_model(cached_assets):
    model, tok = assets.load_smollm2(dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    inputs = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_smollm2_folder_is_plain_bf16_transformers(cached_assets):
    folder = assets.smollm2_path()
    config = json.loads((folder / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config
    assert (folder / "model.safetensors").is_file() and (folder / "chat_template.jinja").is_file()


def test_qwen_tokenizer_matches_qwen25(cached_assets):
    tok = assets.load_qwen_tokenizer()
    assert tok("Hello, world!")["input_ids"] == [9707, 11, 1879, 0]
    assert len(tok) == 151_665
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]
    # NFC: a decomposed "é" (e + combining accent) encodes like the composed one
    assert tok("caf\u0065\u0301")["input_ids"] == tok("caf\u00e9")["input_ids"]
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_sft_split_is_fixed_and_question_disjoint(cached_assets):
    train, val = assets.load_sft("train"), assets.load_sft("validation")
    assert len(train) > 1000 and 100 < len(val) < len(train) / 5
    q = lambda rows: {r["messages"][0]["content"].strip().lower() for r in rows}
    assert not q(train) & q(val)
    assert all(assets.is_validation(r["messages"][0]["content"]) for r in val)
    assert {r["lang"] for r in train} == {"en", "zh"}
    roles = {tuple(m["role"] for m in r["messages"]) for r in train + val}
    assert roles == {("user", "assistant")}


def test_images_asset(cached_assets):
    images = assets.load_images()
    assert images["lfw"].shape == (200, 25, 25) and images["lfw_is_face"].sum() == 100
    assert images["digits"].shape == (1797, 8, 8)


@pytest.fixture
def private_cache(tmp_path, monkeypatch, cached_assets):
    """A copy of the small 'images' asset in a cache of its own, safe to damage."""
    shutil.copytree(assets.cache_dir() / "images", tmp_path / "images")
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))
    return tmp_path


def test_corrupt_asset_names_itself_and_the_fix(private_cache):
    npz = private_cache / "images" / "images.npz"
    data = bytearray(npz.read_bytes())
    data[100] ^= 0xFF
    npz.write_bytes(bytes(data))
    with pytest.raises(assets.AssetError) as err:
        assets.load_images()
    msg = str(err.value)
    assert "'images' is corrupt" in msg and "python -m qlora_helpers assets --force images" in msg
    assert "\n" not in msg


def test_missing_asset_names_itself_and_the_fix(private_cache):
    with pytest.raises(assets.AssetError, match=r"asset 'smollm2' is missing .*python -m qlora_helpers assets"):
        assets.smollm2_path()


def test_fetch_rebuilds_a_corrupt_asset_atomically(private_cache):
    (private_cache / "images" / "images.npz").write_bytes(b"broken")
    folder = assets.fetch("images")
    assert assets.verify("images") == folder
    assert not [p for p in private_cache.iterdir() if p.name.startswith(".build-")]


def test_wheel_pins_are_checked(private_cache, monkeypatch):
    wheels = private_cache / "wheels"
    wheels.mkdir()
    (wheels / "chatterbot_corpus-1.3.3-py2.py3-none-any.whl").write_bytes(b"not the real wheel")
    with pytest.raises(assets.AssetError, match="expected"):
        assets.fetch_wheel("chatterbot-corpus")
    assert not list(wheels.iterdir())  # the bad file is gone, the next fetch downloads again


@pytest.mark.parametrize("model_id,vocab", [("tiny:qwen2", 151_665), ("tiny:llama", 49_152)])
def test_tiny_models_come_with_the_real_tokenizer(cached_assets, model_id, vocab):
    model, tok = load_causal_lm(model_id)
    assert len(tok) == vocab == model.config.vocab_size
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], return_tensors="pt", return_dict=True)
    assert torch.isfinite(model(**ids, labels=ids["input_ids"]).loss)
