"""The four runs side by side, and the merges compared: their columns, a figure, results entries and scores.

``runs`` maps a mode name (``full``, ``lora``, ``qlora-4bit``, ``qlora-8bit``) to the summary
``run_sft`` returned for it (``SFTResult.summary``, also in ``output_dir/sft_summary.json``).

Example:
    >>> display(Markdown(markdown(runs, MODE_COLUMNS, key="mode")))    # doctest: +SKIP
    >>> print(modes_note(runs, device="cpu"))                         # doctest: +SKIP
"""

from __future__ import annotations

import json
import re
from collections import Counter

from matplotlib.figure import Figure

from qlora_helpers.ch03_sft.data import encode_all
from qlora_helpers.ch03_sft.trainer import evaluate
from qlora_helpers.common.device import device_info
from qlora_helpers.common.files import repo_root

NOTEBOOK = "03_qwen_sft"

MODE_COLORS = ["#555555", "#1f77b4", "#2ca02c", "#ff7f0e"]
MEMORY_PARTS = (("weights", "#999999"), ("grads", "#d62728"), ("optimizer", "#9467bd"))


def mode_results(summary: dict) -> dict:
    """The figures of one run that the notebook's results file keeps."""
    return {"trainable_params": summary["params"]["trainable"],
            "total_params": summary["params"]["total"],
            "trainable_percent": summary["params"]["trainable_percent"],
            "eval_loss_before": summary["eval_loss"]["before"],
            "eval_loss_after": summary["eval_loss"]["after"],
            "step_seconds": summary["step_seconds"],
            "tokens_per_second": summary["tokens_per_second"],
            "peak_memory_gib": summary["peak_memory"]["peak_gib"],
            "tensor_memory_mib": summary["tensor_memory_mib"],
            "peak_memory_measured": summary["peak_memory"]["measured"]}


def run_line(name: str, summary: dict) -> str:
    """One line on a finished run: eval loss before -> after, time per step, peak memory."""
    return (f"{name}: eval loss {summary['eval_loss']['before']:.3f} -> {summary['eval_loss']['after']:.3f}, "
            f"{summary['step_seconds']:.2f} s/step, peak {summary['peak_memory']['peak_gib']:.2f} GiB")


# The runs side by side (``common.results.markdown(runs, MODE_COLUMNS, key="mode")``): parameters, memory,
# speed, eval loss.
MODE_COLUMNS = (
    ("mode", "mode", ""), ("trainable params", "params.trainable", ","),
    ("% of model", "params.trainable_percent", ".2f"), ("weights (MiB)", "tensor_memory_mib.weights", ".0f"),
    ("grads + AdamW (MiB)", lambda r: r["tensor_memory_mib"]["grads"] + r["tensor_memory_mib"]["optimizer"], ".0f"),
    ("peak memory (GiB)", "peak_memory.peak_gib", ".2f"), ("s / step", "step_seconds", ".2f"),
    ("tokens / s", "tokens_per_second", ".0f"), ("eval loss before", "eval_loss.before", ".3f"),
    ("after", "eval_loss.after", ".3f"))


def modes_note(runs: dict, *, device: str) -> str:
    """How the runs were measured: where, with how many threads, and what the peak memory counts."""
    first = next(iter(runs.values()))
    return (f"measured on {device_info()['name']} ({device}), {first['torch_threads']} torch thread(s); "
            f"tokens/s counts non-padding tokens; peak memory: {first['peak_memory']['measured']}")


def modes_figure(runs: dict, *, title: str) -> Figure:
    """Four panels: trainable parameters (log), tensor memory by part, seconds per step, eval loss
    after training (the loss before as a black tick)."""
    modes = list(runs)
    fig = Figure(figsize=(15, 3.2))
    axes = fig.subplots(1, 4)
    axes[0].bar(modes, [runs[m]["params"]["trainable"] for m in modes], color=MODE_COLORS)
    axes[0].set_yscale("log")
    axes[0].set_ylim(bottom=1e5)
    axes[0].set_title("trainable parameters (log)")
    bottom = [0.0] * len(modes)
    for part, shade in MEMORY_PARTS:
        values = [runs[m]["tensor_memory_mib"][part] / 1024 for m in modes]
        axes[1].bar(modes, values, bottom=bottom, color=shade, label=part)
        bottom = [b + v for b, v in zip(bottom, values)]
    axes[1].set_title("tensor memory (GiB)")
    axes[1].legend(fontsize=8)
    axes[2].bar(modes, [runs[m]["step_seconds"] for m in modes], color=MODE_COLORS)
    axes[2].set_title("seconds per step")
    axes[3].bar(modes, [runs[m]["eval_loss"]["after"] for m in modes], color=MODE_COLORS)
    axes[3].scatter(modes, [runs[m]["eval_loss"]["before"] for m in modes], color="k", marker="_", s=400,
                    label="before", zorder=3)
    axes[3].set_title("eval loss after training")
    axes[3].legend()
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# The merged models compared (``common.results.markdown(merge_results(rows), MERGE_COLUMNS, key="merged model")``).
MERGE_COLUMNS = (("merged model", "merged model", ""), ("max \\|Δlogit\\|", "max_abs_logit_diff", ".3g"),
                 ("mean \\|Δlogit\\|", "mean_abs_logit_diff", ".3g"), ("top-1 agrees", "top1_agree", ".0%"),
                 ("eval loss", "eval_loss", ".3f"))


def merge_results(merge_rows: dict) -> dict:
    """The merge comparisons as the notebook's results file keeps them."""
    return {label: {"max_abs_logit_diff": d["max_abs"], "mean_abs_logit_diff": d["mean_abs"],
                    "top1_agree": d["top1_agree"], "eval_loss": loss} for label, (d, loss) in merge_rows.items()}


def merge_sentence(merge_rows: dict) -> str:
    """What the QLoRA merge onto the dequantised base is, read from the merge table: the trained model up to bf16
    rounding when its logits move no more than twice as far as LoRA's merged onto a bf16 base (pure rounding)."""
    deq, trained = merge_rows["qlora-4bit → dequantized bf16 base"], merge_rows["qlora-4bit unmerged (as trained)"]
    rounding, fp32 = merge_rows["lora → bf16 base"][0], merge_rows["lora → fp32 base"][0]
    verdict = ("the trained model up to bf16 rounding" if deq[0]["max_abs"] <= 2 * rounding["max_abs"]
               else "further from the trained model than bf16 rounding explains")
    return (f"QLoRA-4 merged onto the dequantised base is {verdict}: its logits move by up to "
            f"{deq[0]['max_abs']:.3g} (top-1 token agrees {deq[0]['top1_agree']:.0%}), where bf16 rounding alone "
            f"moves LoRA's by {rounding['max_abs']:.3g} and an fp32 merge by {fp32['max_abs']:.1e}; eval loss "
            f"{deq[1]:.3f} against {trained[1]:.3f} as trained")


def words(text: str) -> list[str]:
    """The lower-cased words of ``text``, punctuation dropped: what ``token_f1`` and ``repeated_ngrams`` count."""
    return re.findall(r"[a-z0-9']+", text.lower())


def token_f1(answer: str, reference: str) -> float:
    """Word-overlap F1 of an answer against the reference answer (lower-cased words, punctuation dropped)."""
    a, r = Counter(words(answer)), Counter(words(reference))
    common = sum((a & r).values())
    if not common:
        return 0.0
    precision, recall = common / sum(a.values()), common / sum(r.values())
    return 2 * precision * recall / (precision + recall)


def answer_scores(answers: dict[str, list[str]], references: list[str]) -> dict[str, float]:
    """Mean ``token_f1`` of each model's greedy answers against the corpus answers, per model."""
    return {name: sum(token_f1(a, ref) for a, ref in zip(said, references)) / len(references)
            for name, said in answers.items()}


def answer_loss(model, tokenizer, questions: list[str], answers: list[str], *, device: str,
                max_length: int = 128) -> float:
    """Mean loss per token of ``answers`` (one per question) as the model's replies: how unlikely it finds them."""
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in zip(questions, answers)]
    return evaluate(model, encode_all(convs, tokenizer, max_length), 8, tokenizer.pad_token_id, device)


def corpus_preference(model, tokenizer, questions: list[str], references: list[str], others: list[str], *,
                      device: str) -> float:
    """How much more likely the model finds the corpus's answers than ``others`` (the base model's own greedy
    answers to the same questions): loss per token on ``others`` minus loss per token on ``references``, in nats.

    The base model prefers its own answers (a negative number); training on the corpus moves it up."""
    return (answer_loss(model, tokenizer, questions, others, device=device)
            - answer_loss(model, tokenizer, questions, references, device=device))


def quality_ratios(runs: dict) -> dict[str, float]:
    """Held-out loss after training of each mode over full fine-tuning's (1.0: as good; above: worse)."""
    full = runs["full"]["eval_loss"]["after"]
    return {name: r["eval_loss"]["after"] / full for name, r in runs.items()}


def learning_metrics(runs: dict, scores: dict[str, float], preference: dict[str, float]) -> dict[str, float]:
    """What the learning test asserts, each oriented so that higher is better: the held-out loss drop of
    every mode, LoRA's loss over QLoRA-4's (1.0: QLoRA-4 as good as LoRA), and how far the answers moved
    toward the corpus: ``corpus_preference`` of the trained modes, averaged, minus the base model's, and
    the same for the greedy answers' word F1 against the corpus answers."""
    metrics = {f"eval_loss_drop_{name}": r["eval_loss"]["before"] - r["eval_loss"]["after"] for name, r in runs.items()}
    metrics["lora_over_qlora4_loss"] = runs["lora"]["eval_loss"]["after"] / runs["qlora-4bit"]["eval_loss"]["after"]
    for key, values in (("corpus_preference_gain", preference), ("answer_f1_gain", scores)):
        metrics[key] = sum(values[name] for name in runs) / len(runs) - values["base"]
    return {k: round(v, 6) for k, v in metrics.items()}


def seed_spread(parameters: dict) -> dict | None:
    """``learning_metrics`` of this chapter's runs over several seeds (``tests/learning_seeds.json``), when they
    were measured with the same ``parameters`` as this run (a value it does not name counts as equal); else None."""
    path = repo_root() / "tests" / "learning_seeds.json"
    entry = json.loads(path.read_text())["notebooks"].get(NOTEBOOK) if path.is_file() else None
    if entry is None or any(parameters.get(k, v) != v for k, v in entry["parameters"].items()):
        return None
    return {"seeds": entry["seeds"], **{k: m["values"] for k, m in entry["metrics"].items()}}


def quality_claims(runs: dict, *, steps: int, spread: dict | None = None,
                   close: float = 0.05) -> list[tuple[str, str, str, str]]:
    """Seed 002's ranking of the modes, judged on held-out loss after training: (claim, verdict, evidence, numbers).

    A verdict is "holds" or "not supported", and ``evidence`` says on what: this run (one seed, ``steps``
    steps), or for QLoRA against LoRA the seeds of ``spread`` (``seed_spread``), judged on the worst of them.
    "Close" means within ``close`` (5 %) of the other mode's loss."""
    ratio = quality_ratios(runs)
    best = min(ratio, key=ratio.get)
    one_run = f"this run: one seed, {steps} steps"
    q4 = [ratio["qlora-4bit"] / ratio["lora"]]
    q4_evidence = one_run
    if spread:
        q4 = [1 / v for v in spread["lora_over_qlora4_loss"]]
        q4_evidence = f"{len(q4)} seeds ({', '.join(map(str, spread['seeds']))}), {steps} steps"
    verdict = lambda ok: "holds" if ok else "not supported"
    shown = ", ".join(f"{name} {r:.3f}" for name, r in ratio.items())
    return [
        ("full fine-tuning: usually the best", verdict(best == "full"), one_run,
         f"lowest held-out loss: {best} (loss over full's: {shown})"),
        ("LoRA: close to full fine-tuning", verdict(abs(ratio["lora"] - 1) <= close), one_run,
         f"LoRA's loss is {ratio['lora']:.3f} × full's (close: within {close:.0%})"),
        ("QLoRA: slightly below LoRA, still good", verdict(all(1 <= r <= 1 + close for r in q4)), q4_evidence,
         f"QLoRA-4's loss is {min(q4):.3f}{f'–{max(q4):.3f}' if len(q4) > 1 else ''} × LoRA's "
         f"(slightly: within {close:.0%}); "
         f"this run's QLoRA-8: {ratio['qlora-8bit'] / ratio['lora']:.3f} ×"),
    ]


def repeated_ngrams(text: str, n: int = 3) -> int:
    """How many of the word ``n``-grams of ``text`` repeat an earlier one: the signature of a decoding loop.

    Example: ``repeated_ngrams("a body and a body and a body")`` -> 3 ("a body and", "body and a" and
    "a body and" again follow their first occurrences)."""
    said = words(text)
    grams = [tuple(said[i:i + n]) for i in range(len(said) - n + 1)]
    return len(grams) - len(set(grams))


