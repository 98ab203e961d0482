"""Run a notebook with papermill into its run folder, validating parameters first.

    python -m shl.run notebooks/01_vector.ipynb [-p NAME VALUE ...] [--params PRESET] [--run-dir DIR]

The executed notebook lands in the run folder next to params.yaml and metrics.jsonl; papermill
saves it after every cell, so an interrupted run keeps what it did. What the notebook prints (the
stage progress bars, the loop's round lines) streams to this terminal as it happens, and is kept
in the executed notebook too. Plain papermill works as well
(`papermill notebooks/01_vector.ipynb out.ipynb -p params tiny`): the notebook checks the same
things itself.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import yaml

from shl.journal import REPO, resolve_run
from shl.params import ParamError

KERNEL = "shl"


def check_kernel(name: str = KERNEL):
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    try:
        KernelSpecManager().get_kernel_spec(name)
    except NoSuchKernel:
        raise SystemExit(f"error: no Jupyter kernel '{name}': register this environment with "
                         f"`python -m ipykernel install --sys-prefix --name {name}` (scripts/setup.sh does)")


def find_notebook(name: str | Path) -> Path:
    """The .ipynb to run: a path (from here or from the repo root); a .py pair names its .ipynb."""
    path = Path(name)
    if not path.exists() and not path.is_absolute() and (REPO / path).exists():
        path = REPO / path
    if path.suffix == ".py":
        path = path.with_suffix(".ipynb")
    if not path.is_file() or path.suffix != ".ipynb":
        raise ParamError(f"no notebook {name} (give e.g. notebooks/04_loop.ipynb)")
    return path


def prepare(notebook: str | Path, preset: str, run_dir: str, overrides: dict) -> tuple[Path, Path]:
    """Validate everything and create the run folder with its params.yaml, before any kernel or
    model starts. Returns (notebook, run folder); bad input raises ParamError (one line)."""
    nb = find_notebook(notebook)
    for reserved in ("params", "run_dir"):
        if reserved in overrides:
            raise ParamError(f"give {reserved} as --{reserved.replace('_', '-')}, not -p")
    _, folder = resolve_run(preset, run_dir, overrides, nb.stem)
    return nb, folder


class _DeclaredElsewhere(logging.Filter):
    # papermill warns about every parameter the notebook's parameters cell does not declare; the
    # notebooks take every knob by name on purpose and shl.params has validated each one already
    def filter(self, record):
        return not record.getMessage().startswith("Passed unknown parameter")


def kernel_config():
    """IPC transport on POSIX: the kernel talks over local sockets instead of plain TCP on
    localhost (ipykernel warns about TCP without encryption; on a shared cluster node anyone
    there could listen to a TCP kernel)."""
    from traitlets.config import Config
    return Config({"KernelManager": {"transport": "ipc"}}) if sys.platform != "win32" else Config()


def execute(nb: Path, run_dir: Path, parameters: dict, kernel: str = KERNEL, stream: bool = True):
    """Run `nb` into `run_dir/<name>.ipynb` with papermill. stream: copy what the cells print to
    this process's stdout/stderr as it comes (the executed notebook keeps it either way)."""
    import papermill as pm
    logging.getLogger("papermill").addFilter(_DeclaredElsewhere())
    out = Path(run_dir) / nb.name
    print(f"running {nb} -> {out}", flush=True)
    pm.execute_notebook(str(nb), str(out), parameters=parameters, kernel_name=kernel, cwd=str(REPO),
                        progress_bar=not stream, log_output=False, config=kernel_config(),
                        stdout_file=sys.stdout if stream else None, stderr_file=sys.stderr if stream else None)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m shl.run", description=__doc__.split("\n")[0])
    ap.add_argument("notebook", help="e.g. notebooks/01_vector.ipynb")
    ap.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="override a parameter (VALUE is read as YAML: 0.3, true, [0.5, 0.7])")
    ap.add_argument("--params", default="default", help="preset name under params/ or a YAML path")
    ap.add_argument("--run-dir", default="", help="the run folder (default journal/<date>_<notebook>_<slug>)")
    ap.add_argument("--kernel", default=KERNEL)
    ap.add_argument("--quiet", action="store_true", help="do not stream the notebook's output here (only papermill's cell bar)")
    args = ap.parse_args(argv)

    overrides = {k: yaml.safe_load(v) for k, v in args.p}
    try:
        nb, run_dir = prepare(args.notebook, args.params, args.run_dir, overrides)
    except ParamError as e:
        raise SystemExit(f"error: {e}")
    check_kernel(args.kernel)
    execute(nb, run_dir, {"params": args.params, "run_dir": str(run_dir), **overrides}, args.kernel,
            stream=not args.quiet)
    print(f"done: {run_dir}")
    return run_dir


if __name__ == "__main__":
    main()
