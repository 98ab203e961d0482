"""Run a notebook with papermill into its run folder, validating parameters first.

    python -m shl.run notebooks/01_vector.ipynb [-p NAME VALUE ...] [--params PRESET] [--run-dir DIR]

The executed notebook lands in the run folder next to params.yaml and metrics.jsonl; papermill
saves it after every cell, so an interrupted run keeps what it did. Plain papermill works too
(`papermill notebooks/01_vector.ipynb out.ipynb -p params tiny`): the notebook checks the same
things itself.
"""

from __future__ import annotations

import argparse
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


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m shl.run", description=__doc__.split("\n")[0])
    ap.add_argument("notebook", help="e.g. notebooks/01_vector.ipynb")
    ap.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="override a parameter (VALUE is read as YAML: 0.3, true, [0.5, 0.7])")
    ap.add_argument("--params", default="default", help="preset name under params/ or a YAML path")
    ap.add_argument("--run-dir", default="", help="the run folder (default journal/<date>_<notebook>_<slug>)")
    ap.add_argument("--kernel", default=KERNEL)
    args = ap.parse_args(argv)

    nb = Path(args.notebook)
    if not nb.exists():
        raise SystemExit(f"error: no notebook {nb}")
    overrides = {k: yaml.safe_load(v) for k, v in args.p}
    for reserved in ("params", "run_dir"):
        if reserved in overrides:
            raise SystemExit(f"error: give {reserved} as --{reserved.replace('_', '-')}, not -p")
    try:  # validates everything and writes params.yaml, before any kernel or model starts
        p, run_dir = resolve_run(args.params, args.run_dir, overrides, nb.stem)
    except ParamError as e:
        raise SystemExit(f"error: {e}")
    check_kernel(args.kernel)

    import papermill as pm
    out = run_dir / nb.name
    print(f"running {nb} -> {out}", flush=True)
    pm.execute_notebook(str(nb), str(out), parameters={"params": args.params, "run_dir": str(run_dir), **overrides},
                        kernel_name=args.kernel, cwd=str(REPO), progress_bar=True, log_output=False)
    print(f"done: {run_dir}")
    return run_dir


if __name__ == "__main__":
    main()
