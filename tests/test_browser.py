"""The notebooks in a real browser: JupyterLab driven by Chromium through Playwright, as a learner would.

Chapter 01: run all cells, move the calculator's batch slider, read the new total from the page and
compare it with the estimator's. Chapter 03 (a parameters-overridden copy with the tiny model, cut to
the cells its panel needs; the course run executes the whole notebook): run all cells, press the
panel's Run button, and watch the loss plot redraw. Screenshots of each stage
go to ``test-artifacts/browser/`` (git ignores it).

Needs Debian's ``chromium`` and the ``playwright`` package (``make test`` on CI installs both; Playwright's
own browser download is not used). Without chromium the test is skipped, except under CI, where it fails.
"""

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import nbformat
import papermill
import pytest
import requests
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import sync_playwright

from qlora_helpers.ch01_memory.calculator import breakdown

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "browser"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TOKEN = uuid.uuid4().hex

if CHROMIUM is None and os.environ.get("CI", "").lower() != "true":
    pytest.skip("Debian's chromium is not installed (apt-get install chromium); CI installs it and runs this test",
                allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _copy(name: str, folder: Path, parameters: dict, keep=None) -> str:
    """The course notebook with papermill's injected-parameters cell, as papermill would run it.

    ``keep(cells)``, if given, returns the cells to keep (the rest of the notebook runs in the course run)."""
    papermill.execute_notebook(str(ROOT / "notebooks" / name), str(folder / name), parameters=parameters,
                               prepare_only=True, progress_bar=False)
    nb = nbformat.read(folder / name, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    if keep:
        nb.cells = keep(nb.cells)
    nbformat.write(nb, folder / name)
    return name


def _sft_panel_cells(cells: list) -> list:
    """Chapter 03 up to its mode configs (set-up, data, configs), then its parameter panel: what the panel needs."""
    setup_end = next(i for i, c in enumerate(cells) if "def mode_config" in c.source)
    panel = [c for c in cells if "parameter_panel(" in c.source]
    assert len(panel) == 1, "chapter 03 should have one parameter_panel cell"
    imports = nbformat.v4.new_code_cell("from qlora_helpers.ch03_sft import LiveLossPlot, run_sft")
    return [*cells[:setup_end + 1], imports, *panel, nbformat.v4.new_code_cell('print("panel ready")')]


@pytest.fixture(scope="module")
def lab(tmp_path_factory, tiny_llama_dir):
    """JupyterLab on a free port with a token, serving copies of chapters 01 and 03; results go to a tmp folder.

    Its settings (and workspaces) live in a folder of their own: every cell stays in the page (no
    windowing, so the test can read any output), the notebook's kernel starts without asking, and no
    news notification covers the page."""
    assert CHROMIUM, "chromium is not installed: CI must install it (.ci/run)"
    folder = tmp_path_factory.mktemp("lab-notebooks")
    _copy("01_memory_math.ipynb", folder, {"profile": "cpu"})
    _copy("03_qwen_sft.ipynb", folder, {"profile": "cpu", "max_steps": 2, "model_id": str(tiny_llama_dir),
                                        "batch_size": 2, "max_length": 48, "eval_samples": 4, "n_questions": 1,
                                        "max_new_tokens": 2}, keep=_sft_panel_cells)
    port = _free_port()
    lab_dir = tmp_path_factory.mktemp("lab-settings")
    for plugin, value in {"notebook-extension/tracker": '{"windowingMode": "none", "autoStartDefaultKernel": true}',
                          "apputils-extension/notification": '{"fetchNews": "false"}'}.items():
        path = lab_dir / "settings" / "@jupyterlab" / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value)
    env = {**os.environ, "QLORA_RESULTS_DIR": str(folder / "results"), "TQDM_DISABLE": "1",
           "JUPYTERLAB_SETTINGS_DIR": str(lab_dir / "settings"), "JUPYTERLAB_WORKSPACES_DIR": str(lab_dir)}
    log = open(folder / "lab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={folder}", "--allow-root"],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if requests.get(f"{base}/api/status", headers={"Authorization": f"token {TOKEN}"}, timeout=2).ok:
                break
        except requests.ConnectionError:
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail(f"JupyterLab did not answer on {base}: {(folder / 'lab.log').read_text()[-400:]}")
    yield base, folder
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def browser():
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield chromium
        chromium.close()


def _wait_for_kernel(base: str, name: str, timeout_s: int = 90) -> None:
    """Until the server has a session for ``name`` whose kernel is idle (Run All before that runs nothing)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sessions = requests.get(f"{base}/api/sessions", headers={"Authorization": f"token {TOKEN}"}, timeout=5).json()
        if any(s["path"].endswith(name) and s["kernel"]["execution_state"] == "idle" for s in sessions):
            return
        time.sleep(0.5)
    raise AssertionError(f"no idle kernel for {name} within {timeout_s} s")


def _open_and_run_all(browser, lab, name: str, done_text: str, timeout_s: int):
    """A page with the notebook open, every cell run (Run > Run All Cells) until ``done_text`` shows."""
    base, _ = lab
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{base}/lab/workspaces/{Path(name).stem}/tree/{name}?token={TOKEN}")   # a workspace per notebook
    page.locator(".jp-Notebook").first.wait_for(timeout=60_000)
    try:   # should the server still ask which kernel to start: the notebook's own, python3
        page.locator(".jp-Dialog .jp-mod-accept").click(timeout=3_000)
    except PlaywrightTimeout:
        pass
    _wait_for_kernel(base, name)
    page.locator(".lm-MenuBar-item", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-item[data-command='runmenu:run-all']").click()
    try:
        page.get_by_text(done_text).first.wait_for(timeout=timeout_s * 1000)
    except PlaywrightTimeout:
        page.screenshot(path=ARTIFACTS / f"{Path(name).stem}-timed-out.png")
        errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
        first = errors.first.inner_text()[:500] if errors.count() else "-"
        raise AssertionError(f"{name}: no {done_text!r} within {timeout_s} s; "
                             f"{errors.count()} error outputs, the first: {first}") from None
    page.screenshot(path=ARTIFACTS / f"{Path(name).stem}-run-all.png")
    return page


def _total_line(text: str) -> str:
    return next(line.strip() for line in text.splitlines() if line.strip().lower().startswith("total"))


def test_chapter_01_calculator_responds(browser, lab):
    page = _open_and_run_all(browser, lab, "01_memory_math.ipynb", "results written to", 90)
    panel = page.locator(".widget-vbox", has=page.locator(".widget-slider", has_text="batch")).last
    panel.scroll_into_view_if_needed()
    output = panel.locator(".widget-output").last
    before = _total_line(output.inner_text())
    settings = dict(lora_r=8, targets="all-linear", seq_len=512, grad_ckpt=True, optimizer="adamw")
    start = 4                          # the calculator starts from the notebook's batch_size
    assert before == _total_line(breakdown("qwen2.5-0.5b", "qlora4", batch_size=start, **settings)[1])
    handle = panel.locator(".widget-slider", has_text="batch").locator(".noUi-handle")
    handle.focus()
    for _ in range(3):
        handle.press("ArrowRight")
    want = _total_line(breakdown("qwen2.5-0.5b", "qlora4", batch_size=start + 3, **settings)[1])
    page.wait_for_function("([el, want]) => el.innerText.includes(want)", arg=[output.element_handle(), want],
                           timeout=20_000)
    assert want != before
    readout = panel.locator(".widget-slider", has_text="batch").locator(".widget-readout")
    assert readout.inner_text().strip() == str(start + 3)
    page.screenshot(path=ARTIFACTS / f"01_memory_math-batch-{start + 3}.png")
    page.close()


WATCH_PLOT = """(out) => { window.plotSources = new Set();
  const seen = () => out.querySelectorAll('img').forEach(img => window.plotSources.add(img.src));
  new MutationObserver(seen).observe(out, {subtree: true, childList: true, attributes: true}); }"""


def test_chapter_03_panel_trains_and_the_loss_plot_updates(browser, lab):
    page = _open_and_run_all(browser, lab, "03_qwen_sft.ipynb", "panel ready", 180)
    button = page.locator(".widget-button", has_text="Run").last
    panel = page.locator(".widget-vbox", has=button).last
    panel.scroll_into_view_if_needed()
    output = panel.locator(".widget-output").last
    assert output.locator("img").count() == 0        # nothing runs before the button is pressed
    output.evaluate(WATCH_PLOT)
    button.click()
    output.get_by_text(re.compile(r"qlora-4bit: trainable [\d,]+; eval loss")).wait_for(timeout=90_000)
    panel.screenshot(path=ARTIFACTS / "03_qwen_sft-panel-trained.png")
    sources = page.evaluate("[...window.plotSources]")
    assert len(sources) >= 2, f"the loss plot was drawn {len(sources)} time(s), never redrawn"   # steps, then eval
    assert output.locator("img").first.evaluate("img => img.complete && img.naturalWidth > 0")
    page.close()
