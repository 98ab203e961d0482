"""shl: steer, heal, loop. The mechanisms the notebooks share; the story lives in notebooks/."""

import warnings

# The stage bars are text tqdm on purpose, also inside a kernel: papermill streams text to the
# terminal of `python -m shl.run` (a widget bar would not reach it). tqdm.auto warns once that
# ipywidgets is missing; say nothing, before any shl module imports tqdm.auto.
warnings.filterwarnings("ignore", message="IProgress not found", module="tqdm")

# Exported lazily (PEP 562): `python -m shl.run` validates parameters and starts the kernel
# without importing torch and transformers (9 s of its start-up), which only the kernel needs.
_EXPORTS = {
    "append_metrics": "shl.journal", "log_eval": "shl.journal", "read_metrics": "shl.journal",
    "seed_everything": "shl.journal", "start_run": "shl.journal",
    "EvalResult": "shl.mfv", "eval_kwargs": "shl.mfv", "evaluate": "shl.mfv",
    "chat_prompt": "shl.models", "load_model": "shl.models",
    "ParamError": "shl.params", "Params": "shl.params", "load_params": "shl.params",
}
__all__ = sorted(_EXPORTS)


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


def __getattr__(name):
    import importlib
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    try:  # a submodule not imported yet (shl.journal.read_jsonl in a notebook)
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module 'shl' has no attribute {name!r}") from None
