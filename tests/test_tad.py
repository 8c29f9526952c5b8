"""Chapter 02 helpers: evaluation against hand-computed cases, adapters, freezing, configs, data, resume."""

import math
import subprocess
import sys

import numpy as np
import pytest

from qlora_helpers.ch02_tad.evaluate import average_precision, mean_ap, nms_1d, random_detections, soft_nms_1d, tiou


# --------------------------------------------------------------------------- evaluation (numpy only)
def test_tiou_hand_computed():
    assert np.allclose(tiou([0, 4], [[2, 6], [0, 4], [5, 7], [1, 2]]), [2 / 6, 1.0, 0.0, 0.25])


def test_nms_keeps_the_best_of_overlapping_segments():
    segs, scores = [[0, 10], [1, 10], [20, 30], [21, 31]], [0.9, 0.8, 0.7, 0.95]
    keep = nms_1d(segs, scores, iou_threshold=0.5)
    assert keep.tolist() == [3, 0]                     # [1,10] (tIoU 0.9 with [0,10]) and [20,30] (0.82) go
    assert nms_1d(segs, scores, iou_threshold=0.95).tolist() == [3, 0, 1, 2]
    assert nms_1d(segs, scores, iou_threshold=0.5, labels=[0, 1, 0, 1]).tolist() == [3, 0, 1, 2]  # other class
    assert nms_1d(segs, scores, iou_threshold=0.5, max_keep=1).tolist() == [3]


def test_soft_nms_decays_instead_of_dropping():
    keep, scores = soft_nms_1d([[0, 10], [0, 10], [20, 30]], [0.9, 0.8, 0.5], sigma=0.5)
    assert keep.tolist() == [0, 2, 1]
    assert math.isclose(scores[2], 0.8 * math.exp(-1 / 0.5))


def _gt(*segments, label=0, video="v"):
    return [{"video_id": video, "label_id": label, "segment": list(s)} for s in segments]


def test_average_precision_hand_computed():
    gt = _gt((0, 10), (20, 30))
    det = [{"video_id": "v", "label_id": 0, "segment": [0, 10], "score": 0.9},     # TP
           {"video_id": "v", "label_id": 0, "segment": [50, 60], "score": 0.8},    # FP
           {"video_id": "v", "label_id": 0, "segment": [21, 30], "score": 0.7},    # TP at tIoU 0.9
           {"video_id": "v", "label_id": 0, "segment": [0, 9], "score": 0.6}]      # duplicate: FP
    # precision 1, 1/2, 2/3, 2/4 at recall 1/2, 1/2, 1, 1 -> envelope 1 up to 1/2, 2/3 up to 1
    assert math.isclose(average_precision(det, gt, 0.5), 0.5 * 1 + 0.5 * 2 / 3)
    assert math.isclose(average_precision(det, gt, 0.95), 0.5)          # [21,30] no longer matches
    assert average_precision([], gt, 0.5) == 0.0
    other_video = [dict(d, video_id="w") for d in det]
    assert average_precision(other_video, gt, 0.5) == 0.0


def test_mean_ap_averages_classes_with_ground_truth_and_thresholds():
    gt = _gt((0, 10)) + _gt((20, 30), label=1)
    det = [{"video_id": "v", "label_id": 0, "segment": [0, 10], "score": 0.9},
           {"video_id": "v", "label_id": 1, "segment": [20, 25], "score": 0.9},   # tIoU 0.5 with its gt
           {"video_id": "v", "label_id": 2, "segment": [0, 5], "score": 0.9}]     # class 2 has no gt: ignored
    result = mean_ap(det, gt)
    assert result["0.3"] == result["0.4"] == result["0.5"] == 1.0
    assert result["0.6"] == result["0.7"] == 0.5
    assert math.isclose(result["average"], (1 + 1 + 1 + 0.5 + 0.5) / 5)
    assert result["per_class"] == {0: 1.0, 1: 0.6}      # class 1: AP 1, 1, 1, 0, 0


def test_chance_detections_are_deterministic_and_poor():
    gt = _gt((0, 2), (5, 7), video="a") + _gt((1, 3), video="b", label=1)
    a = random_detections(gt, ["a", "b"], duration=16.0, num_classes=4, per_video=20, seed=3)
    assert a == random_detections(gt, ["a", "b"], duration=16.0, num_classes=4, per_video=20, seed=3)
    assert len(a) == 40 and mean_ap(a, gt)["average"] < 0.5


def test_the_package_and_the_evaluator_import_without_torch():
    code = ("import sys, qlora_helpers.ch02_tad, qlora_helpers.ch02_tad.evaluate\n"
            "print([m for m in ('torch', 'bitsandbytes', 'transformers', 'peft') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


# --------------------------------------------------------------------------- data
def test_data_is_deterministic_thumos_shaped_and_split(cached_assets, tmp_path, monkeypatch):
    from qlora_helpers.ch02_tad import data as tad_data

    monkeypatch.setenv("QLORA_CACHE_DIR", str(cached_assets.cache_dir()))
    spec = tad_data.VideoSpec(n_train=3, n_val=2, frames=64, max_len=24, seed=5)
    first = tad_data.make_dataset(spec)
    tad_data._CACHE.clear()
    again = tad_data.make_dataset(spec)
    assert first is not again
    for split in ("train", "val"):
        assert np.array_equal(first.videos[split], again.videos[split])
    assert first.database == again.database
    other = tad_data.make_dataset(tad_data.VideoSpec(n_train=3, n_val=2, frames=64, max_len=24, seed=6))
    assert not np.array_equal(first.videos["train"], other.videos["train"])
    entry = first.database["database"]["video_val_0000"]
    assert entry["subset"] == "validation" and entry["duration"] == 64 / spec.fps
    for a in entry["annotations"]:
        s, e = a["segment(frames)"]
        assert a["label"] == tad_data.CLASSES[a["label_id"]] and a["segment"] == [s / spec.fps, e / spec.fps]
        assert spec.min_len <= e - s <= spec.max_len
    assert first.annotation_path.is_file()
    pools = tad_data.image_pools()
    for kind in ("face", "nonface", "digit"):  # no face or digit image is in both splits
        train = {a.tobytes() for a in pools["train"][kind]}
        assert not train & {a.tobytes() for a in pools["val"][kind]}
    with pytest.raises(ValueError, match="multiple of 16"):
        tad_data.make_dataset(tad_data.VideoSpec(frames=60))


# --------------------------------------------------------------------------- model pieces
torch = pytest.importorskip("torch")


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread is faster than two, and far faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_temporal_adapter_shapes_identity_and_conv_equivalence():
    from qlora_helpers.ch02_tad.adapters import TemporalAdapter, _TemporalMixer

    x = torch.randn(2 * 3, 8 * 4, 32)                 # 2 videos x 3 chunks, 8 steps x 2x2 patches, 32 dims
    for adapter in (TemporalAdapter(32), TemporalAdapter(32, plain=True)):
        assert torch.equal(adapter(x, 24, 2, 2), x)   # up_proj starts at zero
    assert TemporalAdapter(32, plain=True).temporal is None and TemporalAdapter(32).temporal is not None
    mixer = _TemporalMixer(8)
    with torch.no_grad():
        mixer.dwconv.bias.normal_()
    y = torch.randn(6, 32, 8)
    ref = y.reshape(2, 24, 2, 2, 8).permute(0, 2, 3, 4, 1).reshape(-1, 8, 24)
    ref = mixer.conv(mixer.dwconv(ref)).reshape(2, 2, 2, 8, 24).permute(0, 4, 1, 2, 3).reshape(6, 32, 8)
    assert torch.allclose(mixer(y, 24, 2, 2), ref, atol=1e-5)


def test_tubelet_embedding_equals_conv3d():
    from qlora_helpers.ch02_tad.model import VideoViT

    vit = VideoViT(img_size=32, patch_size=16, embed_dims=32, depth=1, num_heads=2)
    clip = torch.randn(3, 1, 16, 32, 32)
    assert torch.allclose(vit._embed(clip)[0], vit.patch_embed(clip).flatten(2).transpose(1, 2), atol=1e-5)
    assert vit(torch.randn(2, 1, 48, 32, 32)).shape == (2, 32, 24)


SMALL = {"embed_dims": 32, "depth": 2, "num_heads": 2, "patch_size": 16}


def _model(strategy, **kw):
    from qlora_helpers.ch02_tad.config import build_model, strategy_config

    torch.manual_seed(0)
    cfg = strategy_config(strategy, SMALL, lora_r=4, lora_alpha=8, head={"dims": 16}, **kw)
    return cfg, build_model(cfg, num_classes=4)


@pytest.mark.parametrize("strategy,bits", [("seed_qlora", 4), ("seed_qlora", 8), ("qlora_backbone", 4)])
def test_quantized_weights_never_require_grad(strategy, bits):
    from qlora_helpers.ch02_tad.adapters import is_quantized, parameter_report

    cfg, model = _model(strategy, quantize_bits=bits)
    quantized = [(n, p) for n, p in model.named_parameters() if is_quantized(p)]
    assert quantized and all(p.dtype in (torch.uint8, torch.int8) for _, p in quantized)
    assert not any(p.requires_grad for _, p in quantized)
    assert parameter_report(model)["quantized_requiring_grad"] == 0
    with pytest.raises(RuntimeError, match="floating point"):   # why seed 001 had to skip them
        quantized[0][1].requires_grad_(True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    for name in trainable:
        assert name.startswith("head.") or any(k in name for k in ("lora", "dwconv", "conv", "gamma", "adapter"))
        assert not any(k in name for k in ("qkv", "fc1", "fc2", "patch_embed", "norm")) or name.startswith("head.")
    if strategy == "seed_qlora":
        assert not any(n.endswith(("down_proj.weight", "up_proj.weight")) for n in trainable)
    video = torch.randn(2, 1, 32, 32, 32)
    out = model.loss(video, [np.array([[4.0, 20.0]])] * 2, [np.array([1])] * 2)
    out["loss"].backward()
    assert all(p.grad is None for _, p in quantized)
    assert all(model.get_parameter(n).grad is not None for n in trainable if "lora_a" not in n and "down" not in n)


def test_seed_parameter_counts_at_videomae_s_shape():
    """Seed 001's log: ViT 21,879,936, QLoRA adapters 1,185,420 (5.4 %); of those only 300,684 train."""
    from qlora_helpers.ch02_tad.claims import check_claims, seed_shape_counts

    counts = seed_shape_counts()
    q = counts["seed_qlora"]
    assert (q["vit_params"], q["adapter_params"], q["adapter_trainable"]) == (21_879_936, 1_185_420, 300_684)
    assert q["adapter_ratio_pct"] == 5.42 and q["trainable_ratio_pct"] == 1.37
    assert counts["adapter"]["adapter_params"] == counts["adapter"]["adapter_trainable"] == 1_006_860
    verdicts = {r["claim"]: r["verdict"] for r in check_claims(counts)}
    assert verdicts["QLoRA trains < 1 % of the parameters"].startswith("does not hold")
    assert verdicts["ViT 21,879,936 params, QLoRA adapters 1,185,420, ratio 5.4 %"].startswith("holds")


def test_trainable_parameter_report():
    from qlora_helpers.ch02_tad.adapters import parameter_report

    _, model = _model("seed_qlora")
    r = parameter_report(model)
    assert r["adapter_trainable"] < r["adapter_params"] and r["quantized_params"] > 0
    assert r["trainable_params"] == r["adapter_trainable"] + r["head_params"]
    assert math.isclose(r["adapter_ratio_pct"], round(100 * r["adapter_params"] / r["vit_params"], 3))
    _, full = _model("full_ft")
    f = parameter_report(full)
    assert f["adapter_params"] == 0 and f["trainable_params"] == f["vit_params"] + f["head_params"]


def test_paramwise_optimizer_groups():
    from qlora_helpers.ch02_tad.config import ConfigError, param_groups

    cfg, model = _model("seed_qlora")
    groups = {g["name"]: g for g in param_groups(model, cfg["optimizer"])}
    assert set(groups) == {"head", "adapter", "lora"}
    assert groups["lora"]["lr"] == groups["adapter"]["lr"] == 2e-4 and groups["head"]["lr"] == 1e-4
    assert groups["lora"]["weight_decay"] == groups["adapter"]["weight_decay"] == 0.05
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("lora" in names[id(p)] for p in groups["lora"]["params"])
    assert {names[id(p)].split(".")[-2] for p in groups["adapter"]["params"]} >= {"dwconv", "conv"}
    cfg_full, full = _model("full_ft")
    assert {g["name"] for g in param_groups(full, cfg_full["optimizer"])} == {"head", "backbone"}
    for p in model.backbone.blocks[0].attn.parameters():
        p.requires_grad_(True)   # trainable, but the backbone group has lr 0
    with pytest.raises(ConfigError, match="lr 0"):
        param_groups(model, cfg["optimizer"])


@pytest.mark.parametrize("field,value,message", [
    ("quantize_bits", 3, "quantize_bits=3: use 4"), ("lora_r", 0, "lora_r=0: must be a positive integer"),
    ("lora_dropout", 1.5, "lora_dropout=1.5"), ("use_plain_adapter", "yes", "use_plain_adapter='yes'"),
    ("lora_rank", 8, "did you mean 'lora_r'"), ("type", "ViTQLoRA", "use one of")])
def test_bad_config_gives_one_clear_line(field, value, message):
    from qlora_helpers.ch02_tad.config import ConfigError, strategy_config, validate

    cfg = strategy_config("seed_qlora", SMALL, lora_r=4)
    cfg["model"]["backbone"][field] = value
    with pytest.raises(ConfigError, match=message) as err:
        validate(cfg)
    assert "\n" not in str(err.value)


def test_head_targets_and_losses():
    from qlora_helpers.ch02_tad.model import TADHead, diou_loss_1d

    head = TADHead(16, 3, dims=8)
    cls_t, reg_t, pos = head.assign(16, torch.tensor([[4.0, 10.0]]), torch.tensor([2]))
    centres, strides, _ = head.points(16)
    assert pos.any() and (cls_t[pos, 2] == 1).all() and cls_t[~pos].sum() == 0
    c, s = centres[pos], strides[pos]
    assert torch.allclose(reg_t[pos] * s[:, None], torch.stack([c - 4, 10 - c], 1))
    assert torch.allclose(diou_loss_1d(torch.tensor([[2.0, 3.0]]), torch.tensor([[2.0, 3.0]])), torch.zeros(1))
    assert diou_loss_1d(torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0, 3.0]])).item() > 0


def test_resume_continues_exactly(cached_assets, tmp_path, monkeypatch):
    from qlora_helpers.ch02_tad.data import VideoSpec, make_dataset
    from qlora_helpers.ch02_tad.train import train_detector

    monkeypatch.setenv("QLORA_CACHE_DIR", str(cached_assets.cache_dir()))
    data = make_dataset(VideoSpec(n_train=4, n_val=1, frames=32, min_len=6, max_len=14, seed=9), write_json=False)
    cfg, straight = _model("seed_qlora")
    train_detector(straight, cfg, data, steps=3, batch_size=2, progress=False)
    ckpt = tmp_path / "ckpt.pt"
    _, first = _model("seed_qlora")
    train_detector(first, cfg, data, steps=2, batch_size=2, checkpoint=ckpt, progress=False)
    _, resumed = _model("seed_qlora")
    run = train_detector(resumed, cfg, data, steps=3, batch_size=2, checkpoint=ckpt, progress=False)
    assert run["resumed_from"] == 2 and len(run["history"]) == 3
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        if a.requires_grad:
            assert torch.equal(a, b), name
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]      # atomic: no temporary file left
    other_cfg, other = _model("seed_qlora", lora_dropout=0.0)
    with pytest.raises(ValueError, match="different config"):
        train_detector(other, other_cfg, data, steps=3, batch_size=2, checkpoint=ckpt, progress=False)


def test_resume_from_an_epoch_file_continues_the_same_curve(cached_assets, tmp_path, monkeypatch, capsys):
    """OpenTAD's ``--resume .../epoch_X.pth``: one file per epoch, and a run resumed from one of them continues
    the uninterrupted run's losses and ends on its weights; progress lines split the loss into cls + reg."""
    from qlora_helpers.ch02_tad.data import VideoSpec, make_dataset
    from qlora_helpers.ch02_tad.train import train_detector

    monkeypatch.setenv("QLORA_CACHE_DIR", str(cached_assets.cache_dir()))
    data = make_dataset(VideoSpec(n_train=4, n_val=1, frames=32, min_len=6, max_len=14, seed=9), write_json=False)
    cfg, straight = _model("seed_qlora")
    run = train_detector(straight, cfg, data, steps=6, batch_size=2, epoch_dir=tmp_path, log_every=3, progress=False,
                         desc="straight")                        # an epoch: 4 videos / batch 2 = 2 steps
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_1.pth", "epoch_2.pth", "epoch_3.pth"]
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(" = cls " in line and " + reg " in line for line in lines)
    _, resumed = _model("seed_qlora")
    again = train_detector(resumed, cfg, data, steps=6, batch_size=2, resume_from=tmp_path / "epoch_2.pth",
                           log_every=3, progress=False, desc="straight")
    assert again["resumed_from"] == 4 and len(again["step_seconds"]) == 2
    assert capsys.readouterr().out.splitlines() == [lines[0], "straight                 resumed from epoch_2.pth at "
                                                    "step 4 of 6", lines[1]]    # the file's lines, then the rest
    assert [h["loss"] for h in again["history"]] == [h["loss"] for h in run["history"]]
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    h = run["history"][-1]
    assert math.isclose(h["loss"], h["cls_loss"] + h["reg_loss"], abs_tol=2e-4)


@pytest.mark.parametrize("strategy,bits", [("adapter", 4), ("seed_qlora", 4), ("seed_qlora", 8)])
def test_a_fresh_adapter_leaves_the_pretrained_vit_as_it_was(strategy, bits):
    """AdaTAD's adapters and LoRA start as the identity: zero up_proj, zero LoRA B, inside the built ViT too
    (the ViT's own initialisation once overwrote them with random values)."""
    from qlora_helpers.ch02_tad.config import build_model, strategy_config

    _, plain = _model("full_ft")
    weights = plain.backbone.state_dict()
    cfg = strategy_config(strategy, SMALL, lora_r=4, lora_alpha=8, quantize_bits=bits, head={"dims": 16})
    torch.manual_seed(1)
    model = build_model(cfg, num_classes=4, pretrained=weights)
    zero = [p for n, p in model.backbone.named_parameters() if n.endswith(("up_proj.weight", "lora_b.weight"))]
    assert zero and all(not p.float().any() for p in zero if p.is_floating_point())
    video = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.backbone(video), plain.backbone(video), atol=1e-6)


def test_lora_r_reaches_the_seeds_32_on_the_small_vit():
    from qlora_helpers.ch02_tad.config import ConfigError, strategy_config

    assert strategy_config("seed_qlora", lora_r=32)["model"]["backbone"]["lora_r"] == 32    # adapter width 16
    with pytest.raises(ConfigError, match="lora_r=33: is above twice the adapter's hidden size 16: use at most 32"):
        strategy_config("seed_qlora", lora_r=33)


def test_memory_claims_verdicts_from_a_benchmark_file():
    from qlora_helpers.ch02_tad.claims import check_claims

    counts = {"seed_qlora": {"vit_params": 1, "adapter_params": 1, "adapter_trainable": 1, "adapter_ratio_pct": 5.4,
                             "trainable_ratio_pct": 1.4, "quantized_params": 0},
              "adapter": {"adapter_params": 2_500_000}}
    row = lambda name, gib: {"name": name, "status": "ok", "peak_allocated_gib": gib, "peak_reserved_gib": gib + 1}
    bench = {"figures": {"rows": [row("full_ft-cp", 20.0), row("adapter-cp", 12.0), row("seed_qlora4-cp", 7.0),
                                  {"name": "seed_qlora8-cp", "status": "oom"}]}}
    verdicts = {r["claim"]: r["verdict"] for r in check_claims(counts, bench)}
    assert verdicts["original adapter: about 12 GB"].startswith("holds")
    assert verdicts["QLoRA 4-bit: 6-8 GB"].startswith("holds")
    assert verdicts["QLoRA 8-bit: 8-10 GB"] == "not measured"
    assert verdicts["QLoRA needs 50-75 % less memory than the original adapter"] == "does not hold (41.67 %)"
    assert verdicts["50-60 % less memory than full fine-tuning"] == "does not hold (65.00 %)"
    assert verdicts["original AdaTAD adapters: about 2-3 M trainable params"] == "holds"


def test_memory_tables_and_figure_from_a_benchmark_file():
    from qlora_helpers.ch02_tad.claims import (
        CHECKPOINTING_COLUMNS,
        TAD_MEMORY,
        benchmark_record,
        checkpointing_rows,
        memory_figure,
    )
    from qlora_helpers.common.results import markdown, stamp, table

    def row(name, gib):
        strategy, cp = name.rsplit("-", 1)
        return {"name": name, "strategy": strategy, "activation_checkpointing": cp == "cp", "status": "ok",
                "peak_allocated_gib": gib, "peak_reserved_gib": gib + 1, "step_seconds": 0.5}

    rows = [row("adapter-cp", 12.0), row("adapter-nocp", 20.0), row("seed_qlora4-cp", 9.0),
            {"name": "full_ft-cp", "status": "oom"}]
    bench = {"device": {"name": "GPU X"}, "date": "2025-01-01", "versions": {"torch": "2", "bitsandbytes": "0.5"},
             "figures": {"rows": rows}}
    assert stamp(bench, ("torch", "bitsandbytes")) == "measured on GPU X, 2025-01-01, torch 2, bitsandbytes 0.5"
    lines = table(bench, TAD_MEMORY).splitlines()
    assert len(lines) == 6 and lines[2] == "| adapter-cp | 12.00 | 13.00 | 0.500 | ok |"
    assert lines[-1] == "| full_ft-cp | – | – | – | oom |"
    saved = {r["strategy"]: r for r in checkpointing_rows(bench)}
    assert saved["adapter"]["saved"] == 8.0 and saved["adapter"]["saved_share"] == 0.4
    assert saved["seed_qlora4"]["vs_adapter"] == -3.0 and saved["full_ft"]["on"] is None
    shown = markdown(checkpointing_rows(bench), CHECKPOINTING_COLUMNS).splitlines()
    assert shown[3] == "| adapter | 12.000 | 20.000 | 8.00 | 40% | – |" and shown[4].endswith("| -3.00 |")
    fig = memory_figure(bench)
    assert [len(c.patches) for c in fig.axes[0].containers] == [2, 1]      # on: adapter, seed_qlora4; off: adapter
    assert benchmark_record(bench) == {"device": {"name": "GPU X"}, "date": "2025-01-01", "rows": rows}
    assert benchmark_record(None) is None


def test_the_committed_gpu_memory_file_reads_through_the_spec():
    from qlora_helpers.ch02_tad.claims import TAD_MEMORY, checkpointing_rows
    from qlora_helpers.common.files import optional_benchmark
    from qlora_helpers.common.results import table

    bench = optional_benchmark("tad_memory")
    assert table(bench, TAD_MEMORY).count("\n") == len(bench["figures"]["rows"]) + 1
    saved = {r["strategy"]: r["saved_share"] for r in checkpointing_rows(bench)}
    assert all(0.5 < share < 0.9 for share in saved.values())          # checkpointing saves 62-77 % at the real shape


def test_learning_metrics_and_the_one_point_verdict_hand_computed():
    from qlora_helpers.ch02_tad.claims import learning_metrics, within_one_point

    map05 = {"full_ft": 0.5, "adapter": 0.6, "seed_qlora": 0.595, "qlora_backbone": 0.7,
             "adapter_random_backbone": 0.15}
    assert learning_metrics(map05, 0.05) == {
        "map05_over_chance_full_ft": 10.0, "map05_over_chance_adapter": 12.0, "map05_over_chance_seed_qlora": 11.9,
        "map05_over_chance_qlora_backbone": 14.0, "adapter_over_random_backbone": 4.0}
    assert within_one_point(map05)["verdict"] == "holds in this run, one seed (-0.005 mAP@0.5, tolerance 0.01)"
    worse = within_one_point({**map05, "seed_qlora": 0.583})
    assert worse["seed_qlora_minus_adapter_map05"] == -0.017
    assert worse["verdict"].startswith("not supported by this run, one seed (-0.017")
    control_below_chance = learning_metrics({**map05, "adapter_random_backbone": 0.0}, 0.05)
    assert control_below_chance["adapter_over_random_backbone"] == 12.0          # the control counted at chance
    with pytest.raises(ValueError, match="chance mAP@0.5 is 0.0"):
        learning_metrics(map05, 0.0)


def test_eight_bit_advice_and_the_quantized_weights_from_a_benchmark_file():
    from qlora_helpers.ch02_tad.claims import QUANTIZED, eight_bit_advice
    from qlora_helpers.common.results import table

    def row(name, gib, quantized=0):
        return {"name": name, "status": "ok", "peak_allocated_gib": gib,
                "params": {"quantized_params": 2 * quantized, "quantized_bytes": quantized}}

    rows = [row("adapter-cp", 3.0), row("adapter-nocp", 10.0), row("seed_qlora4-cp", 3.5, 2**20),
            row("seed_qlora4-nocp", 12.0, 2**20), row("seed_qlora8-cp", 5.5, 2**21),
            row("seed_qlora8-nocp", 15.0, 2**21)]
    advice = eight_bit_advice({"figures": {"rows": rows}})
    assert advice["verdict"] == "contradicted: 8-bit needs more memory than 4-bit"
    assert advice["peak_gib_8bit_vs_4bit"] == {"checkpointing on": [5.5, 3.5], "checkpointing off": [15.0, 12.0]}
    assert advice["quantized_weights_mib_8bit_vs_4bit"] == [2.0, 1.0]
    swapped = [dict(r, peak_allocated_gib=20 - r["peak_allocated_gib"]) for r in rows]
    assert eight_bit_advice({"figures": {"rows": swapped}})["verdict"] == "holds against 4-bit"
    assert eight_bit_advice(None)["verdict"] == "not measured"
    shown = table({"figures": {"rows": rows}}, QUANTIZED).splitlines()
    assert shown[2:] == ["| seed_qlora4-cp | 2,097,152 | 1.00 | 8.00 | 3.50 |",       # checkpointing on, quantized
                         "| seed_qlora8-cp | 4,194,304 | 2.00 | 16.00 | 5.50 |"]


def test_the_seed_adapter_is_its_written_out_forward():
    """QLoRAAdapter (plain) == x + gamma * (up4(gelu(down4(x) + s*B(A(x)))) + s*B'(A'(.))), on Linear4bit layers."""
    import bitsandbytes as bnb
    import torch.nn.functional as F

    from qlora_helpers.ch02_tad.adapters import QLoRAAdapter

    torch.manual_seed(0)
    w = {"down_proj.weight": 0.1 * torch.randn(16, 64), "up_proj.weight": 0.1 * torch.randn(64, 16),
         "down_lora_a.weight": 0.1 * torch.randn(4, 64), "down_lora_b.weight": 0.1 * torch.randn(16, 4),
         "up_lora_a.weight": 0.1 * torch.randn(4, 16), "up_lora_b.weight": 0.1 * torch.randn(64, 4)}
    module = QLoRAAdapter(64, lora_r=4, lora_alpha=8, lora_dropout=0.0, use_plain_adapter=True)
    module.load_state_dict({**module.state_dict(), **w})
    module = module.to("cpu")                           # moving a Linear4bit is what quantises it
    down, up = bnb.nn.Linear4bit(64, 16, bias=False), bnb.nn.Linear4bit(16, 64, bias=False)
    down.load_state_dict({"weight": w["down_proj.weight"]})
    up.load_state_dict({"weight": w["up_proj.weight"]})
    down, up = down.to("cpu"), up.to("cpu")
    x = torch.randn(2, 8, 64)
    lora = lambda v, a, b: F.linear(F.linear(v, w[a]), w[b]) * 2.0
    h = F.gelu(down(x) + lora(x, "down_lora_a.weight", "down_lora_b.weight"))
    y = x + module.gamma * (up(h) + lora(h, "up_lora_a.weight", "up_lora_b.weight"))
    assert torch.equal(module(x, 8, 1, 1), y)
    assert not torch.allclose(y, x)


def test_one_pretraining_step_counted():
    """The pre-training's estimate: 16 bytes a parameter (fp32 weight, gradient, two AdamW moments) and what autograd
    saves for one batch, more for a larger batch."""
    from qlora_helpers.ch02_tad import train
    from qlora_helpers.ch02_tad.data import VideoSpec

    geometry = dict(img_size=32, patch_size=16, in_chans=1, embed_dims=32, depth=2, num_heads=2, num_frames=16,
                    tubelet_size=2)
    vit, classifier = train._pretrain_modules(geometry, 0, "cpu")
    params = sum(p.numel() for m in (vit, classifier) for p in m.parameters())
    small, large = (train.pretrain_counted_gib(geometry, VideoSpec(seed=0), batch_size=b) * 2**30 for b in (2, 8))
    assert 16 * params < small < large
