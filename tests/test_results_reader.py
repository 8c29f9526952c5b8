"""The generic reader of result files: a hand-computed table, a missing file, a missing key, the plots; and the
chapters' specs read through it from the committed files."""

import pytest

from qlora_helpers.common.results import Table, markdown, missing, plot, select, stamp, table, value

RESULT = {"device": {"name": "GPU X"}, "date": "2025-01-02T03:04:05+00:00", "versions": {"torch": "2.9"},
          "figures": {"rows": [{"name": "a", "peak": 1.234, "status": "ok", "m": {"tok/s": 1500.0}},
                               {"name": "b", "peak": 12.0, "status": "oom"},
                               {"name": "c|d", "status": "ok", "m": {"tok/s": 20.0}}],
                      "shapes": {"qwen2.5-7b": {"mfu": 0.25}, "llama-3-8b": {"mfu": 0.5}}}}
COLUMNS = (("run", "name", ""), ("peak (GiB)", "peak", ".2f"), ("tokens/s", "m.tok/s", ",.0f"),
           ("ok?", lambda r: r["status"] == "ok", "{}"))


def test_a_table_by_hand():
    spec = Table("demo", "figures.rows", columns=COLUMNS)
    assert table(RESULT, spec).splitlines() == [
        "| run | peak (GiB) | tokens/s | ok? |",
        "|---|---:|---:|---|",
        "| a | 1.23 | 1,500 | True |",
        "| b | 12.00 | – | False |",               # a value the row lacks: a dash
        "| c\\|d | – | 20 | True |"]               # a | inside a cell is escaped
    kept = Table("demo", "figures.rows", columns=COLUMNS[:2], where=lambda r: r["status"] == "ok")
    assert [r["name"] for r in select(RESULT, kept)] == ["a", "c|d"]


def test_rows_of_a_dict_get_their_key_and_dotted_keys_are_matched_whole():
    spec = Table("demo", "figures.shapes", key="shape", columns=(("shape", "shape", ""), ("MFU", "mfu", ".0%")))
    assert table(RESULT, spec).splitlines()[2:] == ["| qwen2.5-7b | 25% |", "| llama-3-8b | 50% |"]
    assert value(RESULT, "figures.shapes.qwen2.5-7b.mfu") == 0.25
    assert select({"kinds": {"matmul": 3.0}}, Table("demo", "kinds", key="kind")) == [{"kind": "matmul", "value": 3.0}]
    assert markdown([{"x": "text", "y": None}], (("x", "x", ".2f"), ("y", "y", ".2f"))).endswith("| text | – |")


def test_a_missing_file_is_one_line_naming_the_file_and_the_script():
    spec = Table("throughput", "figures.rows", columns=COLUMNS, script="train_throughput")
    line = table(None, spec)
    assert line == missing(spec) == ("no GPU run yet: benchmarks/results/throughput.json is missing "
                                     "(python -m benchmarks.train_throughput on a GPU writes it)")


def test_a_missing_key_path_is_one_line_naming_it():
    with pytest.raises(ValueError) as err:
        table(RESULT, Table("demo", "figures.modes.lora", columns=COLUMNS))
    assert str(err.value) == ("benchmarks/results/demo.json has no 'figures.modes' (looking for "
                              "'figures.modes.lora') (written by another version of its script): "
                              "run python -m benchmarks.demo on a GPU again")
    with pytest.raises(ValueError, match="^benchmarks/results/demo.json has no 'throughput' "):   # a rows function
        table(RESULT, Table("demo", lambda r: r["throughput"], columns=COLUMNS))
    assert value(RESULT, "figures.nothing", default=None) is None


def test_the_stamp_says_where_and_when():
    assert stamp(RESULT) == "measured on GPU X, 2025-01-02"
    assert stamp(RESULT, ("torch",)) == "measured on GPU X, 2025-01-02, torch 2.9"


def test_plots_draw_each_series_and_label_the_points():
    rows = [{"s": "x", "cp": cp, "gib": g} for cp, g in ((True, 1.0), (False, 3.0))] + [{"s": "y", "cp": True,
                                                                                        "gib": 2.0}]
    fig = plot(rows, x="s", y="gib", series=lambda r: f"checkpointing {'on' if r['cp'] else 'off'}")
    ax = fig.axes[0]
    assert [len(c.patches) for c in ax.containers] == [2, 1]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["x", "y"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["checkpointing on", "checkpointing off"]
    scatter = plot(rows, x="gib", y="gib", kind="scatter", label="s", log="xy").axes[0]
    assert [t.get_text() for t in scatter.texts] == ["x", "x", "y"] and scatter.get_xscale() == "log"


# --------------------------------------------------------------------------- the chapters' specs
def test_chapter_01_validation_table_and_summary_read_the_committed_file():
    from qlora_helpers.ch01_memory import VALIDATION, benchmark_summary, validation_plot, validation_summary
    from qlora_helpers.common.files import optional_benchmark

    bench = optional_benchmark("memory_validation")
    lines = table(bench, VALIDATION).splitlines()
    summary = benchmark_summary(bench)
    assert len(lines) == summary["ok"] + 2 and lines[2].startswith("| qwen0.5b-full | 24 of 24 | 8.96 | 9.02 | -0.7 |")
    first = validation_summary(bench).splitlines()[0]
    assert first == (f"{summary['ok']} configurations: worst error {summary['max_abs_error_pct']:.1f} % on the peak "
                     f"allocated, {summary['max_abs_reserved_error_pct']:.1f} % on the peak reserved")
    assert len(validation_plot(bench).axes[0].collections) == 2          # the points and the +-10 % band


def test_chapter_01_claims_table():
    from qlora_helpers.ch01_memory import CLAIM_COLUMNS

    claims = [{"seed": "003", "claim": "x is 0.20 GB", "claimed": 0.2, "estimate": 0.08812, "verdict": "refuted",
               "why": "a | b"}, {"seed": "002", "claim": "y", "claimed": "50-75 %", "estimate": "-3%-62%",
                                  "verdict": "depends", "why": ""}]
    assert markdown(claims, CLAIM_COLUMNS).splitlines()[2:] == [
        "| 003 | x is 0.20 GB | 0.2 | 0.0881 | **refuted** | a \\| b |",
        "| 002 | y | 50-75 % | -3%-62% | **depends** |  |"]


def test_chapter_03_tables_of_the_committed_files():
    from qlora_helpers.ch03_sft import ABLATIONS, PLANS, SFT_MODES, TARGETS, sft_modes_setting
    from qlora_helpers.common.files import optional_benchmark

    modes, throughput = optional_benchmark("sft_modes"), optional_benchmark("throughput")
    rows = {line.split(" | ")[0][2:]: line for line in table(modes, SFT_MODES).splitlines()[2:]}
    assert set(rows) == {"full", "lora", "qlora-4bit", "qlora-8bit"}
    assert rows["full"].startswith("| full | ~8 | ~100 |")
    assert rows["full"].endswith("memory matches, trainable share matches |")
    assert sft_modes_setting(modes).startswith("qwen2.5-0.5b shape, batch 4, r 64: `")
    targets = table(throughput, TARGETS)
    assert "| qwen2.5-7b | memory_vs_hf | ≤ 0.7 | 0.687 | yes |" in targets
    assert "| qwen2.5-7b | mfu | ≥ 0.3 | 0.269 | no, by 0.031 |" in targets
    plans = table(throughput, PLANS).splitlines()
    assert "| qwen2.5-7b | 2,048 | True | 9.10 | 8.49 | 8.93 | 0.42% | 0.44% |" in plans
    ablations = table(throughput, ABLATIONS).splitlines()
    base = next(line for line in ablations if line.startswith("| qwen2.5-7b | recipe-max |"))
    assert "| 9,420 | – | 33.7 | – | 0.269 |" in base
    assert "| qwen2.5-7b | sdpa | 6,890 | x0.73 | 34.6 | +0.9 | 0.197 | +0.01% |" in "\n".join(ablations)
    # the compile row recorded "AssertionError: ", a bare assert's empty message: the table says so in words
    compile_row = "| qwen2.5-0.5b | compile | – | – | – | – | – | – | "
    assert compile_row + "not measured: AssertionError raised without a message |" in ablations
    assert table(None, TARGETS).endswith("(python -m benchmarks.train_throughput on a GPU writes it)")


def test_chapter_03_runs_and_merges_by_hand():
    from qlora_helpers.ch03_sft import MERGE_COLUMNS, MODE_COLUMNS, merge_results

    run = {"params": {"trainable": 4884480, "trainable_percent": 3.5}, "peak_memory": {"peak_gib": 2.468},
           "tensor_memory_mib": {"weights": 181.2, "grads": 18.6, "optimizer": 37.3}, "step_seconds": 1.8,
           "tokens_per_second": 115.2, "eval_loss": {"before": 2.3371, "after": 2.0984}}
    assert markdown({"qlora-4bit": run}, MODE_COLUMNS, key="mode").splitlines()[2] == (
        "| qlora-4bit | 4,884,480 | 3.50 | 181 | 56 | 2.47 | 1.80 | 115 | 2.337 | 2.098 |")
    diff = {"max_abs": 4.18, "mean_abs": 0.6213, "top1_agree": 0.93}
    shown = markdown(merge_results({"lora → bf16 base": (diff, None)}), MERGE_COLUMNS, key="merged model")
    assert shown.splitlines()[0] == "| merged model | max \\|Δlogit\\| | mean \\|Δlogit\\| | top-1 agrees | eval loss |"
    assert shown.splitlines()[2] == "| lora → bf16 base | 4.18 | 0.621 | 93% | – |"
