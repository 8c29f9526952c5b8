"""The activation peak of chapter 05's troubleshooting: ``SavedBytes`` counts what autograd saves, checked by hand
on a 2-layer network; on the 4-bit tiny Llama, accumulation leaves the peak where one micro-batch puts it."""

import torch

from qlora_helpers.ch05_multi_gpu.model import SavedBytes, measure_peaks
from qlora_helpers.ch05_multi_gpu.reversal import generate_data


def test_saved_bytes_by_hand():
    """Linear(4, 8) saves its input x (4 floats a row), ReLU its output (8, which Linear(8, 1) saves again: counted
    once), the MSE loss the prediction and the target (1 + 1): 14 floats = 56 bytes a row; all freed by backward."""
    for rows in (1, 3):
        net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        saved = SavedBytes(net.parameters())
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            loss = torch.nn.functional.mse_loss(net(torch.randn(rows, 4)), torch.zeros(rows, 1))
        assert saved.live == saved.peak == 56 * rows
        loss.backward()
        assert saved.live == 0 and net[0].weight.grad is not None


def test_accumulation_keeps_the_peak_of_one_micro_batch(tmp_path, cached_assets):
    data = generate_data(tmp_path / "data", num_identities=2, seed=0, pool_size=4)
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    got = measure_peaks(str(data), model_id="tiny:llama", lora=lora)
    peak = {(r["micro_batch"], r["accumulation"], r["summed"]): r["activations"] for r in got["rows"]}
    assert peak[1, 8, False] == peak[1, 4, False] > 0                     # accumulation: the same peak
    assert 1.8 * peak[1, 4, False] < peak[2, 4, False]                   # a larger micro-batch: about twice
    assert peak[1, 8, True] == 8 * peak[1, 8, False]                     # one backward of 8 summed losses: 8 graphs
    assert got["fixed"]["adamw_states"] == 2 * got["fixed"]["lora"] > 0
