"""Chapter 03's report helpers that turn measurements into sentences: each verdict says what it rests on."""

from qlora_helpers.ch03_sft.report import merge_sentence, quality_claims, repeated_ngrams, seed_spread


def summary(loss_after: float) -> dict:
    return {"eval_loss": {"before": 2.0, "after": loss_after}}


RUNS = {"full": summary(1.00), "lora": summary(1.03), "qlora-4bit": summary(1.12), "qlora-8bit": summary(1.04)}


def test_repeated_ngrams_counts_the_repeats_of_a_loop():
    assert repeated_ngrams("a body and a body and a body") == 3
    assert repeated_ngrams("I am effectively immortal and cannot be terminated.") == 0
    assert repeated_ngrams("trained by SmolLM, trained by SmolLM, trained by SmolLM", n=3) == 4


def test_one_seed_is_not_supported_never_refuted():
    claims = {c: (v, e) for c, v, e, _ in quality_claims(RUNS, steps=20)}
    assert claims["full fine-tuning: usually the best"] == ("holds", "this run: one seed, 20 steps")
    assert claims["QLoRA: slightly below LoRA, still good"] == ("not supported", "this run: one seed, 20 steps")


def test_the_qlora_claim_is_judged_on_the_worst_of_the_seeds():
    near = {"seeds": [1, 2], "lora_over_qlora4_loss": [0.99, 0.97]}      # QLoRA-4 1.01 and 1.03 x LoRA's
    far = {"seeds": [1, 2], "lora_over_qlora4_loss": [0.99, 0.90]}       # one seed 1.11 x: outside 5 %
    for spread, verdict in ((near, "holds"), (far, "not supported")):
        _, v, evidence, _ = quality_claims(RUNS, steps=6, spread=spread)[2]
        assert (v, evidence) == (verdict, "2 seeds (1, 2), 6 steps")


def test_the_seed_spread_is_used_only_for_the_parameters_it_was_measured_with():
    spread = seed_spread({"max_steps": 6, "eval_samples": 16, "n_questions": 4, "max_new_tokens": 16})
    assert spread is not None and len(spread["lora_over_qlora4_loss"]) == len(spread["seeds"]) >= 3
    assert seed_spread({"max_steps": 20, "eval_samples": 16, "n_questions": 4, "max_new_tokens": 16}) is None


def test_the_merge_sentence_follows_the_table():
    def row(max_abs, loss=None):
        return ({"max_abs": max_abs, "top1_agree": 0.9}, loss)
    rows = {"qlora-4bit unmerged (as trained)": row(0.0, 2.10), "lora → bf16 base": row(4.0),
            "lora → fp32 base": row(1e-4)}
    rows["qlora-4bit → dequantized bf16 base"] = row(5.6, 2.09)
    assert "the trained model up to bf16 rounding" in merge_sentence(rows)
    rows["qlora-4bit → dequantized bf16 base"] = row(21.0, 1.87)
    assert "further from the trained model than bf16 rounding explains" in merge_sentence(rows)
