"""benchmarks/face_retention.py end to end on a tiny saved model: two stages, both stage-2 arms, A and B scored,
one complete result record; and the verdict it prints, on hand-made scores."""

import json

import pytest

from benchmarks.face_retention import METRICS, measure, other_seed, verdict
from qlora_helpers.ch05_multi_gpu import tables
from qlora_helpers.ch05_multi_gpu.reversal import make_identities


def test_the_measurement_runs_end_to_end_and_writes_a_full_record(tiny_llama_dir, cached_assets, tmp_path):
    out = measure([0], model_id=str(tiny_llama_dir), identities=2, max_steps=1, max_new_tokens=4,
                  out=tmp_path / "face_retention.json", work_dir=tmp_path)
    record = json.loads(out.read_text())
    assert {"benchmark", "device", "versions", "command", "date", "figures"} <= set(record)
    figures = record["figures"]
    (run,) = figures["runs"]
    assert set(run["A"]) == {"stage1", "chat", "faces"} and set(run["B"]) == {"chat", "faces"}
    for scores in [*run["A"].values(), *run["B"].values()]:
        assert set(scores) == {"choice", "generation"} and all(0 <= v <= 1 for v in scores.values())
    assert all(run["training"][s]["steps"] == 1 for s in ("stage1", "chat", "faces"))
    assert run["b_seed"] != run["a_seed"] and figures["summary"]["seeds"] == [0]
    assert {figures["verdict"][m]["verdict"] for m in METRICS} <= {
        "not learned", "no forgetting", "kept", "no consistent difference"}
    assert [p.name for p in tmp_path.iterdir()] == ["face_retention.json"]   # the stages' folders are gone
    text = tables.retention_report(record).splitlines()
    assert "seeds [0];" in text[0] and "planned" not in text[0] and len(text) == 9   # run, blank, 7 table lines
    assert tables.retention_plot(record).axes[0].get_ylim() == (0, 1.05)


def test_the_second_stages_identities_share_no_face_and_no_name():
    seed = other_seed(0, 6)
    a, b = make_identities(6, 0), make_identities(6, seed)
    assert not {i["face_index"] for i in a} & {i["face_index"] for i in b}
    assert not {i["name"] for i in a} & {i["name"] for i in b}


def figures(stage1, chat, faces, n=4):
    return {"identities": n, "runs": [{"A": {"stage1": {"choice": s}, "chat": {"choice": c}, "faces": {"choice": f}}}
                                      for s, c, f in zip(stage1, chat, faces)]}


@pytest.mark.parametrize("stage1, chat, faces, expected", [
    ([0.25, 0.375], [0.25, 0.25], [1.0, 1.0], "not learned"),          # inside the band at 4 identities
    ([1.0, 1.0], [1.0, 0.875], [1.0, 1.0], "no forgetting"),            # without the pool A drops < 1 question
    ([1.0, 1.0], [0.25, 0.5], [0.875, 0.75], "kept"),
    ([1.0, 1.0], [0.25, 0.5], [0.875, 0.5], "no consistent difference"),
])
def test_the_verdict(stage1, chat, faces, expected):
    assert verdict(figures(stage1, chat, faces), "choice")["verdict"] == expected


def test_bad_settings_are_refused_in_one_line():
    with pytest.raises(ValueError, match="--retention-ratio must be in"):
        measure([0], retention_ratio=0.0)
    with pytest.raises(ValueError, match="--identities must be between 2 and 12"):
        measure([0], identities=20)
