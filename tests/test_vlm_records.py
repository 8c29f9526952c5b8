"""Image-chat JSONL (``ch04_vlm.records``): where the images go, relative paths, the example files and config."""

import json

import pytest
from PIL import Image

from qlora_helpers.ch03_sft.command import load_config_file
from qlora_helpers.ch04_vlm.command import build_run
from qlora_helpers.ch04_vlm.records import question_answer, read_records, write_example_files
from qlora_helpers.common.assets import load_images
from qlora_helpers.common.files import repo_root


@pytest.fixture
def two_images(tmp_path):
    (tmp_path / "img").mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / "img" / name)
    return tmp_path


def _write(folder, rows):
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_plain_text_gets_the_images_at_the_start_of_the_first_user_turn(two_images):
    rows = [{"images": ["img/a.png", "img/b.png"], "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Same person?"},
        {"role": "assistant", "content": "No"}]}]
    (record,) = read_records(_write(two_images, rows))
    assert record.images == (two_images / "img" / "a.png", two_images / "img" / "b.png")
    assert record.messages[1]["content"] == [{"type": "image"}, {"type": "image"},
                                             {"type": "text", "text": "Same person?"}]
    assert record.messages[0]["content"] == [{"type": "text", "text": "Be brief."}]
    assert record.where.endswith("data.jsonl:1")


def test_placed_image_parts_must_match_the_images(two_images):
    parts = [{"type": "text", "text": "Left:"}, {"type": "image"}]
    rows = [{"images": ["img/a.png", "img/b.png"], "messages": [{"role": "user", "content": parts},
                                                               {"role": "assistant", "content": "A face"}]}]
    with pytest.raises(ValueError, match=r"data.jsonl:1: 2 image\(s\) given but 1"):
        read_records(_write(two_images, rows))
    rows[0]["images"] = ["img/a.png"]
    assert read_records(_write(two_images, rows))[0].messages[0]["content"] == parts


def test_example_files_answer_from_the_labels(tmp_path, cached_assets):
    paths = write_example_files(tmp_path, n_train=6, n_val=4, size=28)
    train, val, test = (read_records(paths[k]) for k in ("train", "val", "test"))
    assert (len(train), len(val)) == (6, 4) and {r.images[0] for r in val} <= {r.images[0] for r in test}
    images = load_images()
    for record in train + test:
        question, answer = question_answer(record)
        kind, index = record.images[0].stem.split("-")
        expected = ("Yes" if images["lfw_is_face"][int(index)] else "No") if kind == "lfw" else \
            str(int(images["digits_target"][int(index)]))
        assert question == {"lfw": "Is this a face?", "digit": "Which digit is this?"}[kind] and answer == expected
    assert [question_answer(r) for r in val] == [("Is this a face?", "No"), ("Is this a face?", "Yes"),
                                                 ("Which digit is this?", "0"), ("Which digit is this?", "1")]
    assert Image.open(train[0].images[0]).size == (28, 28)


def test_the_example_config_builds_a_run():
    run = build_run(load_config_file(repo_root() / "data" / "configs" / "vlm-8gb.json"), {"lora.rank": 16})
    assert run.settings.name == "ultra_low_memory" and run.settings.method == "qlora"
    assert (run.settings.lora.rank, run.settings.lora.alpha) == (16, 16)
    assert run.settings.training.gradient_accumulation_steps == 16 and run.max_steps == 200
