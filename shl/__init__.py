"""shl: steer, heal, loop. The mechanisms the notebooks share; the story lives in notebooks/."""

from shl.journal import append_metrics, log_eval, read_metrics, seed_everything, start_run
from shl.mfv import EvalResult, eval_kwargs, evaluate
from shl.models import chat_prompt, load_model
from shl.params import ParamError, Params, load_params

__all__ = [
    "EvalResult", "ParamError", "Params", "append_metrics", "chat_prompt", "eval_kwargs", "evaluate",
    "load_model", "load_params", "log_eval", "read_metrics", "seed_everything", "start_run",
]
