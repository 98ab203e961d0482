"""JupyterLab in the set-up venv: `jupyter lab` runs, and its server opens a notebook's .py side as
a notebook (jupytext's contents manager) and saves both sides of the pair. No browser needed."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
JUPYTER = Path(sys.executable).parent / "jupyter"


def test_jupyter_lab_is_on_the_venvs_path():
    out = subprocess.run([str(JUPYTER), "lab", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().split(".")[0] == "4"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(url, token, method="GET", body=None):
    req = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Authorization": f"token {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture
def lab(tmp_path):
    """A Lab server on a free port, token-protected, serving a copy of the notebooks and the
    repo's jupytext.toml (a save must not touch the repo)."""
    root = tmp_path / "root"
    shutil.copytree(ROOT / "notebooks", root / "notebooks")
    shutil.copy(ROOT / "jupytext.toml", root / "jupytext.toml")
    port, token = _free_port(), "shl-test-token"
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}
    # --allow-root: CI runs as root, where jupyter refuses to start without it
    server = subprocess.Popen([str(JUPYTER), "lab", "--no-browser", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
                               "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}", "--allow-root",
                               f"--ServerApp.root_dir={root}"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        end = time.time() + 120
        while True:
            try:
                _call(f"{base}/api/status", token)
                break
            except (urllib.error.URLError, ConnectionError):
                if server.poll() is not None or time.time() > end:
                    raise AssertionError(f"the Lab server did not start:\n{server.communicate()[0][-3000:]}")
                time.sleep(0.5)
        yield base, token, root
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def test_lab_opens_the_py_side_as_a_notebook_and_saves_both_sides(lab):
    base, token, root = lab
    model = _call(f"{base}/api/contents/notebooks/04_loop.py?type=notebook&content=1", token)
    assert model["type"] == "notebook" and model["format"] == "json"
    nb = model["content"]
    assert nb["metadata"]["kernelspec"]["name"] == "shl"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert "parameters" in code[0]["metadata"]["tags"] and any("loop.run_loop" in c["source"] for c in code)

    # a save from Lab (the contents API's PUT) writes the .py and its paired .ipynb
    nb["cells"].append({"cell_type": "markdown", "metadata": {}, "source": "A note written in Lab."})
    saved = _call(f"{base}/api/contents/notebooks/04_loop.py", token, "PUT",
                  {"type": "notebook", "format": "json", "content": nb})
    assert saved["type"] == "notebook"
    assert "# A note written in Lab." in (root / "notebooks/04_loop.py").read_text()
    ipynb = json.loads((root / "notebooks/04_loop.ipynb").read_text())
    assert ipynb["cells"][-1]["source"] in ("A note written in Lab.", ["A note written in Lab."])
