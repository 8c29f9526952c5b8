"""The committed-outputs rules on small notebooks: what counts as stale, what as widget state."""

import json

import nbformat
import pytest

from qlora_helpers.common import outputs


def executed_notebook(*sources, widget=False, injected=False):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# demo")]
    for n, src in enumerate(sources, 1):
        cell = nbformat.v4.new_code_cell(src, execution_count=n)
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=f"{n}\n")]
        if widget:
            cell.outputs.append(nbformat.v4.new_output("display_data", data={
                outputs.WIDGET_VIEW: {"model_id": "abc"}, "text/plain": "FloatProgress()"}))
        cell.metadata["papermill"] = {"duration": 1.0}
        nb.cells.append(cell)
    if injected:
        nb.cells.insert(1, nbformat.v4.new_code_cell("max_steps = 2", metadata={"tags": ["injected-parameters"]}))
    nb.metadata["papermill"] = {"input_path": "/somewhere"}
    nb.metadata["widgets"] = {"state": {}}
    return json.loads(nbformat.writes(nb))


def test_a_clean_run_is_current_and_keeps_its_outputs_but_no_widgets():
    nb = outputs.clean_executed(executed_notebook("print(1)", "print(2)", widget=True), run_info={"seconds": 1})
    assert outputs.stale_cells(nb) == [] and outputs.widget_state(nb) == []
    assert [len(c["outputs"]) for c in nb["cells"][1:]] == [1, 1]          # the text stays, the widget goes
    assert "papermill" not in nb["metadata"] and "papermill" not in nb["cells"][1]["metadata"]


def test_an_edited_or_unrun_cell_is_stale():
    nb = outputs.clean_executed(executed_notebook("print(1)", "print(2)"), run_info={})
    nb["cells"][2]["source"] = "print(3)"
    nb["cells"].append({"cell_type": "code", "source": "print(4)", "metadata": {}, "outputs": [],
                        "execution_count": None, "id": "new"})
    stale = outputs.stale_cells(nb)
    assert len(stale) == 2 and "edited" in stale[0] and "not been run" in stale[1]


def test_committed_widget_state_is_found():
    raw = executed_notebook("print(1)", widget=True)
    found = outputs.widget_state(raw)
    assert found[0].startswith("notebook metadata") and "widget view" in found[1]


def test_a_run_with_parameters_is_not_written_back():
    with pytest.raises(ValueError, match="default"):
        outputs.clean_executed(executed_notebook("print(1)", injected=True), run_info={})


def test_write_back_refuses_a_notebook_that_changed_while_it_ran(tmp_path):
    executed = tmp_path / "run.ipynb"
    executed.write_text(json.dumps(executed_notebook("print(1)")))
    committed = tmp_path / "nb.ipynb"
    committed.write_text(json.dumps(executed_notebook("print(5)")))
    with pytest.raises(ValueError, match="changed while it ran"):
        outputs.write_back(executed, committed, run_info={})
    committed.write_text(json.dumps(executed_notebook("print(1)")))
    outputs.write_back(executed, committed, run_info={"seconds": 2})
    assert outputs.stale_cells(json.loads(committed.read_text())) == []
