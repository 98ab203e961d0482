"""shl: steer, heal, loop. The mechanisms the notebooks share; the story lives in notebooks/."""

import warnings

# The stage bars are text tqdm on purpose, also inside a kernel: papermill streams text to the
# terminal of `python -m shl.run` (a widget bar would not reach it). tqdm.auto warns once that
# ipywidgets is missing; say nothing, before any shl module imports tqdm.auto.
warnings.filterwarnings("ignore", message="IProgress not found", module="tqdm")

from shl.journal import append_metrics, log_eval, read_metrics, seed_everything, start_run
from shl.mfv import EvalResult, eval_kwargs, evaluate
from shl.models import chat_prompt, load_model
from shl.params import ParamError, Params, load_params

__all__ = [
    "EvalResult", "ParamError", "Params", "append_metrics", "chat_prompt", "eval_kwargs", "evaluate",
    "load_model", "load_params", "log_eval", "read_metrics", "seed_everything", "start_run",
]
