"""JupyterLab works: a headless server on localhost lists the notebooks, starts a kernel,
and that kernel imports ``qlora_helpers``; then everything is stopped."""

import json
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
TOKEN = uuid.uuid4().hex


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    port = _free_port()
    log = open(tmp_path_factory.mktemp("lab") / "lab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={ROOT}", "--ServerApp.open_browser=False",
         "--allow-root"],  # CI runs as root
        stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    session = requests.Session()
    session.headers["Authorization"] = f"token {TOKEN}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if session.get(f"{base}/api/status", timeout=2).ok:
                break
        except requests.ConnectionError:
            time.sleep(0.5)
    else:
        proc.kill()
        log.flush()
        pytest.fail(f"JupyterLab did not answer on {base} within 90 s: {Path(log.name).read_text()[-400:]}")
    yield base, session, port
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def test_lab_lists_the_notebooks(lab):
    base, session, _ = lab
    assert session.get(f"{base}/lab", timeout=10).status_code == 200
    listing = session.get(f"{base}/api/contents/notebooks", timeout=10).json()
    names = {item["name"] for item in listing["content"]}
    assert {p.name for p in (ROOT / "notebooks").glob("[0-9][0-9]*_*.ipynb")} <= names   # companions too
    assert "00_setup.ipynb" in names


def test_kernel_starts_and_imports_the_helpers(lab):
    import asyncio

    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    base, session, port = lab
    kernel = session.post(f"{base}/api/kernels", json={"name": "python3"}, timeout=30).json()
    msg_id = uuid.uuid4().hex
    code = "import qlora_helpers, qlora_helpers.common.assets\nprint('helpers', qlora_helpers.__version__)"

    async def execute() -> str:
        url = f"ws://127.0.0.1:{port}/api/kernels/{kernel['id']}/channels"
        ws = await websocket_connect(HTTPRequest(url, headers={"Authorization": f"token {TOKEN}"}))
        await ws.write_message(json.dumps({
            "header": {"msg_id": msg_id, "username": "test", "session": uuid.uuid4().hex, "msg_type": "execute_request",
                       "version": "5.3", "date": ""},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                        "allow_stdin": False, "stop_on_error": True}}))
        text, status = "", None
        while status is None or text == "":
            raw = await asyncio.wait_for(ws.read_message(), timeout=60)
            msg = json.loads(raw)
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                text += msg["content"]["text"]
            elif msg["msg_type"] == "error":
                raise AssertionError(f"kernel error: {msg['content']['ename']}: {msg['content']['evalue']}")
            elif msg["msg_type"] == "execute_reply":
                status = msg["content"]["status"]
        ws.close()
        return text

    try:
        out = asyncio.run(execute())
        assert out.strip().startswith("helpers 0.")
    finally:
        assert session.delete(f"{base}/api/kernels/{kernel['id']}", timeout=30).status_code == 204
    assert kernel["id"] not in {k["id"] for k in session.get(f"{base}/api/kernels", timeout=10).json()}
