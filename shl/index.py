"""The results index: one table over every run folder in journal/, and an overlay of loop runs.

    python -m shl.index [--journal DIR] [--plot RUN [RUN ...] | --plot-all]

writes journal/index.md (run, notebook, status, finished rounds, the params that differ between
runs, base coherence and the headline of each run) and prints it; --plot / --plot-all also write
journal/index_overlay.png, the healed trait move and coherence per round of the chosen loop runs.

A broken folder (no params.yaml, a truncated metrics.jsonl, params the current code rejects)
gets its row with the problem in `status`; it never stops the index.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import matplotlib.pyplot as plt
import yaml
from matplotlib.ticker import MaxNLocator

from shl.demos import load_demo
from shl.journal import JOURNAL, METRICS_FILE, PARAMS_FILE, REPO, _atomic_write, completed_rounds, md_cell, md_table
from shl.loop import headline
from shl.mfv import reads_warning
from shl.params import FIELDS, ParamError, Params, load_params
from shl.selectivity import round_selectivity

INDEX_FILE, OVERLAY_FILE = "index.md", "index_overlay.png"
HEADLINE_KEYS = ("d_trait", "d_trait_beyond_null", "off_target_move", "off_target_beyond_null_move", "d_coh", "cost",
                 "verdict", "verdicts", "probe_d")
SEL_KEYS = ("healed_on", "healed_off", "healed_selectivity")  # from the eval rows (shl.selectivity)
# `<date>_<notebook>_<slug>`: the notebook is lower-case words; the slug (a model name) is the
# first `_` part holding a digit, a dash or a capital, e.g. smollm2-135m-instruct, tiny-random
FOLDER_RE = re.compile(r"^\d{4}-\d\d-\d\d_(\d\d_[a-z]+(?:_[a-z]+)*?)(?:_(?=[^_]*[^a-z_])|$)")


# --- reading one run folder --------------------------------------------------------------------

def read_metrics_lines(path: Path) -> tuple[list[dict], str]:
    """(the lines up to the first bad one, the problem or ""): a truncated last line is what a
    run killed mid-write used to leave, and the lines before it still count."""
    lines = []
    for i, text in enumerate(Path(path).read_text(errors="replace").splitlines(), 1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            return lines, f"{METRICS_FILE} line {i} is not JSON (truncated?); read {len(lines)} lines"
        if not isinstance(record, dict):
            return lines, f"{METRICS_FILE} line {i} is not a JSON object; read {len(lines)} lines"
        lines.append(record)
    return lines, ""


def _first_line(e: Exception) -> str:
    # ParamError for an unknown key lists every valid key after this marker: too long for a cell
    return str(e).split("; valid parameters")[0].strip().splitlines()[0] if str(e).strip() else type(e).__name__


def read_run_params(path: Path) -> tuple[dict | None, Params | None, list[str]]:
    """(resolved params dict, Params for load_demo, problems). A params.yaml the current code
    rejects (an old run's removed key, say) is still read raw over the defaults, and reported."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        return None, None, [f"{PARAMS_FILE} unreadable: {_first_line(e)}"]
    if not isinstance(raw, dict):
        return None, None, [f"{PARAMS_FILE} unreadable: not a mapping of parameter: value"]
    try:
        p = load_params(str(path))
        return p.to_dict(), p, []
    except ParamError as e:
        problem = f"{PARAMS_FILE} rejected by the current code: {_first_line(e)}"
    # unvalidated: only load_demo reads it (demo name, persona and trait overrides)
    p = Params(**{k: v for k, v in raw.items() if k in FIELDS})
    return {**Params().to_dict(), **raw}, p, [problem]


def notebook_names() -> list[str]:
    """The repo's notebook stems (01_vector, ...), longest first so 02_generate_filter beats 02_generate."""
    stems = {f.stem for f in (REPO / "notebooks").glob("[0-9][0-9]_*") if f.suffix in (".py", ".ipynb")}
    return sorted(stems, key=len, reverse=True)


def notebook_of(run_dir: Path) -> str:
    """The executed notebook in the folder, else the notebook part of `<date>_<notebook>_<slug>`."""
    executed = sorted(Path(run_dir).glob("*.ipynb"))
    if executed:
        return executed[0].stem
    name = run_dir.name
    rest = name[11:] if re.match(r"^\d{4}-\d\d-\d\d_", name) else name
    known = next((s for s in notebook_names() if rest == s or rest.startswith(s + "_")), None)
    if known:
        return known
    m = FOLDER_RE.match(name)
    return m.group(1) if m else ""


def is_run_dir(d: Path) -> bool:
    return (d.is_dir() and not d.name.startswith(".")
            and ((d / PARAMS_FILE).exists() or (d / METRICS_FILE).exists() or any(d.glob("*.ipynb"))))


def scan_run(run_dir: Path) -> dict:
    """One row: run, notebook, status, rounds, base_coherence, headline (+ its d_trait, d_coh,
    cost, verdict), all_params (None when unreadable)."""
    run_dir = Path(run_dir)
    row = {"run": run_dir.name, "notebook": notebook_of(run_dir), "rounds": 0, "base_coherence": None, "reads": None,
           "headline": None, **dict.fromkeys(HEADLINE_KEYS), **dict.fromkeys(SEL_KEYS), "all_params": None}
    problems = []
    p = None
    if (run_dir / PARAMS_FILE).exists():
        row["all_params"], p, found = read_run_params(run_dir / PARAMS_FILE)
        problems += found
    else:
        problems.append(f"no {PARAMS_FILE}")
    lines = []
    if (run_dir / METRICS_FILE).exists():
        lines, found = read_metrics_lines(run_dir / METRICS_FILE)
        problems += [found] if found else []
    else:
        problems.append(f"no {METRICS_FILE}")

    row["rounds"] = len(completed_rounds(lines))
    base = next((r for r in lines if r.get("stage") == "base"), None)
    row["base_coherence"] = base.get("coherence") if base else None
    # does the base model read the vignettes (shl.mfv.reads_warning)? None for eval lines older than the check
    row["reads"] = (not reads_warning(base)) if base and "read_js" in base else None
    if p is not None and lines:
        try:
            demo = load_demo(p)
            h = headline(lines, demo.trait_foundation, demo.trait_sign, float(row["all_params"]["coh_floor"]))
        except Exception as e:  # a malformed line or demo: this row reports it, the index goes on
            problems.append(f"headline failed: {type(e).__name__}: {_first_line(e)}")
        else:
            if h is not None:
                row["headline"] = h
                row.update({k: h[k] for k in HEADLINE_KEYS})
                try:
                    row.update({k: v for k, v in round_selectivity(run_dir, demo.trait_foundation, demo.trait_sign,
                                                                   h["round"]).items() if k in SEL_KEYS})
                except (OSError, ValueError, KeyError) as e:  # eval rows missing or of another shape
                    problems.append(f"selectivity failed: {type(e).__name__}: {_first_line(e)}")
    if p is not None and lines and row["rounds"] < p.rounds and row["notebook"] == "04_loop":
        last = completed_rounds(lines)[-1] if row["rounds"] else None
        problems.append(f"stopped at the coherence floor after round {last['round']}" if last and last.get("stopped")
                        else f"unfinished: {row['rounds']} of {p.rounds} rounds")
    row["status"] = "; ".join(problems) or "ok"
    return row


# --- the index ---------------------------------------------------------------------------------

def differing_keys(param_dicts: list[dict]) -> list[str]:
    """Keys whose values are not identical across all the dicts (field order, then unknown keys)."""
    if len(param_dicts) < 2:
        return []
    keys = list(FIELDS) + sorted(set().union(*param_dicts) - set(FIELDS))
    first = param_dicts[0]
    return [k for k in keys if any(d.get(k) != first.get(k) for d in param_dicts[1:])]


def scan(journal: Path) -> list[dict]:
    """One row per run folder of `journal`, sorted by name; `params` holds the values of the keys
    that differ across the runs whose params are readable."""
    journal = Path(journal)
    if not journal.is_dir():
        raise FileNotFoundError(f"no journal folder {journal}: give the folder that holds the run folders")
    rows = []
    for d in sorted(filter(is_run_dir, journal.iterdir())):
        try:
            rows.append(scan_run(d))
        except Exception as e:  # last resort: one broken folder is one row, never a crashed index
            rows.append({"run": d.name, "notebook": "", "rounds": 0, "all_params": None,
                         "status": f"unreadable: {type(e).__name__}: {_first_line(e)}"})
    keys = differing_keys([r["all_params"] for r in rows if r["all_params"] is not None])
    for r in rows:
        r["params"] = {k: r["all_params"].get(k) for k in keys} if r["all_params"] is not None else {}
    return rows


def _param_cell(v) -> object:
    # as written (1e-3, not md_table's 0.001 rounding), and cut: a persona prompt is a paragraph
    return md_cell(f"{v:g}" if isinstance(v, float) else v, width=60)


def render(rows: list[dict]) -> str:
    """index.md: title, the table, then the problems."""
    keys = list(rows[0]["params"]) if rows else []
    cols = ["run", "notebook", "status", "rounds done", *keys, "base coh", "reads", "d_trait", "beyond null", "off-target",
            "off beyond null", "d_coh", "cost", "verdict", "all verdicts", "d_probe", "on", "off", "sel"]
    shown = {"d_trait_beyond_null": "beyond null", "off_target_move": "off-target",
             "off_target_beyond_null_move": "off beyond null", "verdicts": "all verdicts", "probe_d": "d_probe"}
    table_rows = []
    for r in rows:
        t = {"run": r["run"], "notebook": r["notebook"], "status": r["status"], "rounds done": r["rounds"],
             "base coh": r.get("base_coherence"), "reads": r.get("reads"),
             **{shown.get(k, k): r.get(k) for k in HEADLINE_KEYS}}
        if isinstance(t["all verdicts"], list):
            t["all verdicts"] = "+".join(t["all verdicts"]) or "pass"
        t.update({"on": r.get("healed_on"), "off": r.get("healed_off"), "sel": r.get("healed_selectivity")})
        t = {k: md_cell(v) for k, v in t.items()}
        t.update({k: _param_cell(r["params"].get(k)) for k in keys})
        table_rows.append(t)
    text = ("# Results index\n\n"
            "One row per run folder (regenerate with `python -m shl.index`). `rounds done`: finished loop rounds; "
            "the parameter columns are those that differ between runs. d_trait: the last healed model's move "
            "toward the run's trait vs base (nats); beyond null: the same minus the null control arm's move (a heal "
            "on unsteered text); off-target: the largest move of another foundation, raw and beyond the null; "
            "d_coh: the coherence change; cost = |d_coh| / |d_trait|; verdict: the first failure (or pass), all "
            "verdicts: every one that applies (see `shl.loop.headline`). on, off, sel: the same healed model "
            "against base on centred log-probs (the trait's move, the mean |move| of the other foundations, "
            "on − 0.1 off; `shl.selectivity`). reads: whether the base model reads the vignettes (`shl.mfv.reads_warning`; "
            "blank for runs older than the check); d_probe: the healed model's trait-probe gap against base (`shl.probe`)."
            "\n\n" + md_table(table_rows, cols) + "\n")
    problems = [r for r in rows if r["status"] != "ok"]
    if problems:
        text += "\n## Problems\n\n" + "".join(f"- `{r['run']}`: {r['status']}\n" for r in problems)
    return text


def write_index(journal: Path = JOURNAL, out: Path | None = None) -> Path:
    """Scan `journal` and write its index.md (or `out`) atomically. Returns the path."""
    journal = Path(journal)
    out = Path(out) if out else journal / INDEX_FILE
    _atomic_write(out, render(scan(journal)))
    return out


# --- the overlay -------------------------------------------------------------------------------

def plot_overlay(run_dirs: list[Path], out: Path | None = None):
    """Healed trait move (top) and healed coherence / base coherence (bottom) per round, one line
    per loop run; round -1 is the base model (0 and 1 by definition). Runs without round lines
    are skipped with a note. Saves a PNG to `out` when given."""
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    plotted = 0
    for run_dir in map(Path, run_dirs):
        path = run_dir / METRICS_FILE
        lines, problem = read_metrics_lines(path) if path.exists() else ([], f"no {METRICS_FILE}")
        if problem:
            print(f"{run_dir.name}: {problem}")
        rounds = completed_rounds(lines)
        if not rounds:
            print(f"skipping {run_dir.name}: no round lines (not a loop run)")
            continue
        try:
            x = [-1] + [r["round"] for r in rounds]
            trait = [0.0] + [r["healed_d_trait"] for r in rounds]
            coh = [1.0] + [r["healed_coh_ratio"] for r in rounds]
        except KeyError as e:  # one odd folder must not take the overlay of the others down
            print(f"skipping {run_dir.name}: a round line lacks {e} (not written by this shl.loop)")
            continue
        ax1.plot(x, trait, "o-", label=run_dir.name)
        ax2.plot(x, coh, "o-", label=run_dir.name)
        plotted += 1
    if not plotted:
        plt.close(fig)
        raise ValueError("none of the runs has round lines: the overlay shows 04_loop runs")
    ax1.axhline(0.0, color="grey", lw=0.8)
    ax2.axhline(1.0, color="grey", lw=0.8)
    ax1.set_ylabel("healed d_trait (nats)")
    ax2.set_ylabel("healed coh / base coh")
    ax2.set_xlabel("round (-1 = base)")
    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.set_title("healed trait move and coherence per round")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    if out is not None:
        fig.savefig(out, dpi=110, bbox_inches="tight")
    return fig


# --- CLI ---------------------------------------------------------------------------------------

def _resolve_run(journal: Path, name: str) -> Path:
    path = Path(name) if Path(name).is_dir() else journal / name
    if not path.is_dir():
        raise SystemExit(f"error: no run folder {name} (neither a folder nor a run under {journal})")
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m shl.index", description=__doc__.split("\n")[0])
    ap.add_argument("--journal", type=Path, default=JOURNAL, help=f"the folder of run folders (default {JOURNAL})")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--plot", nargs="+", metavar="RUN", help="overlay these runs (folder names or paths)")
    which.add_argument("--plot-all", action="store_true", help="overlay every run with round lines")
    args = ap.parse_args(argv)
    if not args.journal.is_dir():
        raise SystemExit(f"error: no journal folder {args.journal}: give --journal DIR")

    path = write_index(args.journal)
    print(path)
    print(path.read_text())
    if args.plot or args.plot_all:
        if args.plot_all:
            runs = [d for d in sorted(filter(is_run_dir, args.journal.iterdir()))
                    if completed_rounds(read_metrics_lines(d / METRICS_FILE)[0] if (d / METRICS_FILE).exists() else [])]
        else:
            runs = [_resolve_run(args.journal, name) for name in args.plot]
        try:
            fig = plot_overlay(runs, args.journal / OVERLAY_FILE)
        except ValueError as e:
            raise SystemExit(f"error: {e}")
        plt.close(fig)
        print(args.journal / OVERLAY_FILE)
    return path


if __name__ == "__main__":
    main()
