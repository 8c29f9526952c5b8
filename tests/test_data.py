"""qlora_helpers.ch03_sft.data: reading and checking JSONL, the assistant-only loss mask, truncation, packing."""

import json

import pytest

from qlora_helpers.ch03_sft import data as d
from qlora_helpers.ch03_sft.data import IGNORE_INDEX

CHAT = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
MULTI = [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
         {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you."}]


@pytest.fixture(scope="module")
def smol():
    from transformers import AutoTokenizer

    from qlora_helpers.common.assets import smollm2_path

    return AutoTokenizer.from_pretrained(smollm2_path())


@pytest.fixture(scope="module")
def qwen():
    from qlora_helpers.common.assets import load_qwen_tokenizer

    return load_qwen_tokenizer()


def trained_text(ex, tok):
    return tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX])


def test_hand_checked_mask(smol):
    """SmolLM2's ChatML: only "Hello" "!" "<|im_end|>" are trained; the newline after it is not."""
    ex = d.encode_chat(CHAT, smol)
    # Checked by hand against the vocabulary: Hello=19556, !=17, <|im_end|>=2, \n=198.
    assert ex.input_ids[-4:] == [19556, 17, 2, 198]
    assert ex.labels[-4:] == [19556, 17, 2, IGNORE_INDEX]
    assert ex.n_trained == 3
    assert all(lab == IGNORE_INDEX for lab in ex.labels[:-4])
    # the sequence is exactly the tokenizer's own template, tokenised without extra specials
    assert ex.input_ids == smol(smol.apply_chat_template(CHAT, tokenize=False), add_special_tokens=False)["input_ids"]
    assert d.show_mask(ex, smol).endswith("·ass·istant·\n[Hello][!][<|im_end|>]·\n")


@pytest.mark.parametrize("tok_name", ["smol", "qwen"])
def test_every_assistant_turn_is_trained_and_nothing_else(tok_name, request):
    tok = request.getfixturevalue(tok_name)
    ex = d.encode_chat(MULTI, tok)
    assert trained_text(ex, tok) == "Hello!<|im_end|>See you.<|im_end|>"
    assert len(ex.input_ids) == len(ex.labels)


def test_instruction_form_becomes_a_conversation():
    msgs, problems = d.record_to_messages({"instruction": "Translate to French", "input": "cat", "output": "chat"})
    assert problems == []
    assert msgs == [{"role": "user", "content": "Translate to French\n\ncat"}, {"role": "assistant", "content": "chat"}]
    msgs, _ = d.record_to_messages({"instruction": "Say hi", "output": "hi", "system": "Be kind."})
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]


def write(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_every_bad_record_is_named_with_file_line_and_field(tmp_path):
    good = json.dumps({"messages": CHAT})
    path = write(tmp_path, [
        good,
        '{"messages": [',                                                        # 2: bad JSON
        json.dumps({"messages": [{"role": "bot", "content": "x"}]}),             # 3: unknown role
        json.dumps({"messages": [{"role": "user", "content": ""},
                                 {"role": "assistant", "content": "a"}]}),       # 4: empty content
        json.dumps({"instruction": "do it", "output": "  "}),                    # 5: empty output
        json.dumps({"prompt": "x", "completion": "y"}),                          # 6: unknown form
        json.dumps({"messages": [{"role": "user", "content": "q"}]}),            # 7: no assistant
        "",                                                                       # blank: skipped
        json.dumps(["not", "an", "object"]),                                     # 9
    ])
    with pytest.raises(d.DataError) as info:
        d.read_jsonl(path)
    err = info.value
    assert "\n" not in str(err)
    problems = err.problems
    assert len(problems) == 7
    assert problems[0].startswith(f"{path}:2: not valid JSON")
    assert f"{path}:3: field 'messages[0].role' is 'bot'" in problems[1]
    assert f"{path}:4: field 'messages[0].content' is empty" == problems[2]
    assert f"{path}:5: field 'output' is empty" == problems[3]
    assert problems[4].startswith(f"{path}:6: no 'messages'")
    assert f"{path}:7: field 'messages' has no assistant turn" in problems[5]
    assert problems[6].startswith(f"{path}:9: a JSON list")
    assert "and 2 more bad records" in str(err) and "7 problems in data.jsonl" in str(err)


def test_empty_file_and_missing_file_are_refused(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(d.DataError, match="no records"):
        d.read_jsonl(empty)
    with pytest.raises(FileNotFoundError, match="no such data file"):
        d.read_jsonl(tmp_path / "missing.jsonl")


def test_reads_both_forms(tmp_path):
    path = write(tmp_path, [json.dumps({"messages": CHAT, "lang": "en"}),
                            json.dumps({"instruction": "Add", "input": "1+1", "output": "2"})])
    convs = d.read_jsonl(path)
    assert len(convs) == 2 and convs[1][-1] == {"role": "assistant", "content": "2"}


def test_truncation_is_counted_and_empty_examples_dropped(smol):
    limit = len(d.encode_chat(CHAT, smol).input_ids)               # CHAT fits exactly
    long_answer = [{"role": "user", "content": "Count"}, {"role": "assistant", "content": " ".join(["one"] * 50)}]
    long_prompt = [{"role": "user", "content": " ".join(["word"] * 60)}, {"role": "assistant", "content": "ok"}]
    data = d.encode_all([CHAT, long_answer, long_prompt], smol, max_length=limit)
    assert (data.n_truncated, data.n_dropped, len(data.examples)) == (2, 1, 2)
    assert [len(e.input_ids) for e in data.examples] == [limit, limit]
    assert data.examples[0].n_trained == 3 and data.examples[1].n_trained > 0
    with pytest.raises(d.DataError, match="raise --max_length"):
        d.encode_all([long_prompt], smol, max_length=limit)


def test_packing_keeps_every_trained_token_and_whole_conversations(smol):
    convs = [CHAT, MULTI] * 5
    plain = d.encode_all(convs, smol, max_length=160)
    packed = d.encode_all(convs, smol, max_length=160, packing=True)
    assert packed.packed and len(packed.examples) < len(plain.examples)
    assert all(len(e.input_ids) <= 160 for e in packed.examples)
    assert packed.stats["trained_tokens"] == plain.stats["trained_tokens"]
    assert packed.stats["tokens"] == plain.stats["tokens"]
    # positions restart at each conversation, which starts exactly where a plain example does
    lengths = [len(e.input_ids) for e in plain.examples]
    starts = [i for e in packed.examples for i, p in enumerate(e.position_ids) if p == 0]
    assert len(starts) == len(plain.examples)
    first = packed.examples[0]
    assert first.position_ids[:lengths[0] + 1] == list(range(lengths[0])) + [0]
    batch = d.collate(packed.examples[:2], pad_id=0)
    assert "attention_mask" not in batch and batch["position_ids"].shape == batch["input_ids"].shape


def test_batch_order_is_a_seeded_permutation():
    a = d.batch_order(10, 4, seed=1, epoch=0)
    assert a == d.batch_order(10, 4, seed=1, epoch=0)
    assert a != d.batch_order(10, 4, seed=1, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(10)) and [len(b) for b in a] == [4, 4, 2]


def test_collate_pads_right_and_masks_padding():
    batch = d.collate([d.Example([5, 6, 7], [IGNORE_INDEX, 6, 7]), d.Example([8], [8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]


def test_the_course_data_is_valid():
    from qlora_helpers.common.assets import sft_paths

    for split, path in sft_paths().items():
        assert len(d.read_jsonl(path)) > 100, split
