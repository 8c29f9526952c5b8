"""FSDP-QLoRA on 2 CPU processes (gloo): ``benchmarks.fsdp_qlora --cpu`` shards a 4-layer Qwen2 whose linears are
bitsandbytes 4-bit with a bf16 quant storage, trains LoRA for 2 steps, gathers the LoRA shards and saves a peft
adapter, which reloads with ``PeftModel.from_pretrained`` equal to what was trained. The GPU run of the same script
(``benchmarks/results/fsdp_qlora.json``) measures memory; this checks the logic."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from benchmarks.fsdp_qlora import get_shape

ROOT = Path(__file__).resolve().parent.parent


def test_fsdp_qlora_shards_4bit_weights_trains_lora_and_saves_an_adapter(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "benchmarks.fsdp_qlora",
           "--cpu", "--preset", "tiny", "--steps", "2", "--seq-len", "32", "--dtype", "bf16",
           "--out", str(tmp_path / "fsdp.json"), "--save-adapter", str(tmp_path / "adapter")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads((tmp_path / "fsdp.json").read_text())["figures"]
    ranks = figures["per_rank"]
    assert figures["world_size"] == 2 and figures["quant_storage"] == "bf16" and figures["lora_finite"]
    for r in ranks:
        assert r["linear4bit_modules"] == 4 * 7                       # q k v o gate up down in 4 layers
        assert "torch.bfloat16" in r["flat_param_dtypes"]             # the packed 4-bit weights, in bf16 storage
        assert 2 * r["local_numel"] == r["full_numel"]                # each rank holds half of every unit
    assert ranks[0]["adapter_sha256"] == ranks[1]["adapter_sha256"]

    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    digest = hashlib.sha256()
    for name in sorted(saved):
        digest.update(name.encode() + saved[name].contiguous().numpy().tobytes())
    assert digest.hexdigest() == ranks[0]["adapter_sha256"] and len(saved) == 4 * 4 * 2   # A and B on q k v o
    assert max(float(t.abs().max()) for k, t in saved.items() if "lora_B" in k) > 0      # B starts at zero
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_config(get_shape("tiny")), tmp_path / "adapter")
    lora = {n.replace(".default", ""): p for n, p in reloaded.named_parameters() if "lora_" in n}
    assert set(lora) == set(saved) and all(torch.equal(lora[k].float(), saved[k]) for k in saved)
