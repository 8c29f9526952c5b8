"""What a learner reads: every committed output clean, every core notebook short and opening with its time.

A committed output holds what its cell means to show. Anything a library or a failing cell printed on the
way (warnings, tracebacks, hub look-ups, empty lines, temporary folder names) fails here, except in a cell
tagged ``troubleshooting``: such a cell demonstrates that very message. A cell tagged ``generated-text`` prints a
model's sampled answer as it streams: blank lines inside it are the model's own, and only they are let through.
"""

import json
import re

import pytest

from qlora_helpers.common import outputs, runner

BOOKS = runner.discover()
CORE = [p for p in BOOKS if not runner.is_companion(p)]
TAG = "troubleshooting"
GENERATED = "generated-text"   # a cell printing a model's sampled text verbatim: its blank lines are the model's
# what no committed output may hold outside a troubleshooting cell
NOISE = {
    "a warning": re.compile(r"\b\w*Warning\b|warnings\.warn\(|^WARNING", re.M),
    "a hub look-up": re.compile(r"kernels-community|huggingface\.co|Failed to load"),
    "a temporary name": re.compile(r"/\.[\w-]+\.(v[0-9a-f]{4,}|tmp|removing)|\.(best|final|tmp)\.v[0-9a-f]+|/tmp/"),
    "a traceback": re.compile(r"Traceback \(most recent call last\)"),
}


def _texts(output: dict) -> list[str]:
    if output["output_type"] == "stream":
        return ["".join(output["text"])]
    data = output.get("data", {})
    return ["".join(data[k]) for k in ("text/plain", "text/markdown", "text/html") if k in data]


def noise(cell: dict) -> list[str]:
    """What is wrong with a cell's committed outputs, one phrase each (empty when clean)."""
    found = []
    generated = GENERATED in cell.get("metadata", {}).get("tags", [])
    for output in outputs.merge_streams(cell.get("outputs", [])):   # a printed block may come in several chunks
        if output["output_type"] == "error":
            found.append(f"an error ({output.get('ename')})")
        if output["output_type"] == "stream" and output["name"] == "stderr":
            found.append("a stderr stream: " + "".join(output["text"])[:80].replace("\n", " "))
        for text in _texts(output):
            found += [f"{what}: {m.group(0)!r}" for what, rx in NOISE.items() if (m := rx.search(text))]
            if output["output_type"] == "stream" and (not text.strip() or text.startswith("\n")
                                                      or text.endswith("\n\n") or ("\n\n\n" in text and not generated)):
                found.append("an empty line at the start or end of a printed block")
    return found


@pytest.mark.parametrize("path", BOOKS, ids=lambda p: p.stem)
def test_committed_outputs_are_clean(path):
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    bad = [f"cell {i}: {what}" for i, c in enumerate(cells) if TAG not in c.get("metadata", {}).get("tags", [])
           for what in noise(c)]
    assert not bad, f"{path.name}: " + "; ".join(bad[:5]) + f" ({len(bad)} in all; fix the cause, or tag a cell " \
                    f"that demonstrates the message '{TAG}')"


@pytest.mark.parametrize("path", CORE, ids=lambda p: p.stem)
def test_a_core_notebook_is_a_path_a_learner_finishes(path):
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    assert len(cells) <= 50, f"{path.name} has {len(cells)} cells: move measurement-heavy sections to a companion"
    opening = [c for c in cells[:4] if c["cell_type"] == "code" and "chapter_time(" in "".join(c["source"])]
    assert opening, f"{path.name}: open with what it teaches and runner.chapter_time (reading and running time)"
    assert any("minutes of reading" in t for o in opening[0]["outputs"] for t in _texts(o))


def test_the_noise_rules_catch_what_they_name():
    def cell(text, name="stdout"):
        return {"outputs": [{"output_type": "stream", "name": name, "text": text}]}
    assert noise(cell("loss 1.2\n")) == []
    assert noise(cell("x.py:3: FutureWarning: old\n"))
    assert noise(cell("Failed to load CPU gemm_4bit_forward from kernels-community\n"))
    assert noise(cell("best/\n.best.v1a2b3c/\n"))
    assert noise(cell("\n")) and noise(cell("a\n\n")) and noise(cell("ok\n", "stderr"))


def test_readme_lists_every_notebook_and_each_core_time():
    readme = (runner.repo_root() / "README.md").read_text(encoding="utf-8")
    missing = [p.name for p in BOOKS if p.name not in readme]
    assert not missing, f"README.md does not list {missing}"
    for p in BOOKS:     # its time as the notebook's opening says it (runner.chapter_time)
        said = re.match(r"about (\d+) minutes of reading, and (\d+) (minutes|seconds) of running",
                        runner.chapter_time(p.stem))
        assert said, f"{p.stem}: time it with python -m benchmarks.course_time"
        row = next(line for line in readme.splitlines() if f"`notebooks/{p.name}`" in line)
        want = f"| {said[1]} min + {said[2]} {'min' if said[3] == 'minutes' else 's'} |"
        assert want in row, f"README.md's row of {p.name} should say {want}"
    course = runner.parameter_set("course")
    assert {p.stem for p in BOOKS} <= set(course), "give every notebook an entry in data/parameter_sets/course.yaml"
