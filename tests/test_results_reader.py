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
    with pytest.raises(KeyError, match="no 'figures.modes' in the result \\(looking for 'figures.modes.lora'\\)"):
        table(RESULT, Table("demo", "figures.modes.lora", columns=COLUMNS))
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
