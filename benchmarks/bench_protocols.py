"""Which vignette readout does a model answer? Every `eval_protocol` on the base model, one table.

    .venv/bin/python benchmarks/bench_protocols.py [--params default] [-p NAME VALUE ...] [--run-dir DIR]

For each protocol of shl.mfv.PROTOCOLS the base model (no steering, no adapter) is evaluated on
the preset's vignettes, one protocol after the other in this process, with the trait probe off
(it does not depend on the readout). The table has top-1 against the human majority next to the
best constant answer's, the per-row Spearman with the human distribution (raw and on deviations
from the mean), the mean JS divergence of a row's answer from the mean answer, the number of
distinct argmax answers, coherence and seconds. A readout reaches the bar when its top-1 is at
least twice the constant answer's (the instrument issue's bar; `reaches_bar`). It writes a
journal folder (params.yaml, metrics.jsonl with one `protocol` line each, entry.md).
"""

import argparse
import time
from pathlib import Path

import yaml

from shl import mfv
from shl.journal import append_metrics, md_table, pick_run_dir, prepare_run_dir, write_entry, write_jsonl
from shl.models import load_model
from shl.params import load_params

COLS = ["protocol", "top1_acc", "top1_const", "rank_human", "rank_human_dev", "read_js", "n_argmax",
        "coherence", "authority_nats", "seconds", "reaches_bar"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="default")
    ap.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    ap.add_argument("--run-dir", default="")
    args = ap.parse_args(argv)
    overrides = {k: yaml.safe_load(v) for k, v in args.p}
    p = load_params(args.params, eval_trait_probe=False, **overrides)
    run_dir = prepare_run_dir(Path(args.run_dir) if args.run_dir else pick_run_dir("eval_protocols", p, overrides), p)
    t0 = time.time()
    model, tok = load_model(p.model, p.dtype, p.device, p.seed)
    print(f"model load {time.time() - t0:.1f} s", flush=True)
    lines = []
    for protocol in mfv.PROTOCOLS:
        kwargs = {**mfv.eval_kwargs(p), "protocol": protocol}
        res = mfv.evaluate(model, tok, **kwargs)
        line = res.record("protocol", reaches_bar=res.summary["top1_acc"] >= 2 * res.summary["top1_const"])
        append_metrics(run_dir, line)
        (run_dir / "evals").mkdir(exist_ok=True)
        write_jsonl(run_dir / "evals" / f"protocol_{protocol}.jsonl", res.rows)
        lines.append(line)
        print(f"{protocol:<11} top1 {line['top1_acc']:.3f} (const {line['top1_const']:.3f}) rank {line['rank_human']:+.3f} "
              f"dev {line['rank_human_dev']:+.3f} js {line['read_js']:.3f} argmax {line['n_argmax']} "
              f"coh {line['coherence']:.3f} {line['seconds']:.1f} s", flush=True)
    base = lines[0]["seconds"]
    for ln in lines:
        ln["cost_x"] = ln["seconds"] / base
    readers = [ln["protocol"] for ln in lines if ln["reaches_bar"]]
    body = (f"Model `{p.model}` ({p.dtype}), {lines[0]['n']} vignettes (`eval_n` {p.eval_n}), base model, "
            f"thinking {p.eval_think_tokens} tokens. `reaches_bar`: top-1 >= 2x the best constant answer's top-1.\n\n"
            + md_table(lines, COLS + ["cost_x"])
            + "\n\n- top1_const: the top-1 of answering every row with the most common human majority.\n"
              "- rank_human: mean per-row Spearman of the model's distribution with the humans'; rank_human_dev: "
              "the same on each row's deviation from the eval-wide mean (0 for a constant answer).\n"
              f"- read_js: mean JS divergence (nats) of a row's answer from the mean answer; the instrument warning "
              f"fires under {mfv.READS_MIN_JS} nats or a rank_human_dev under {mfv.READS_MIN_RANK}.\n\n"
            + (f"**Readouts that reach the bar:** {', '.join(readers)}.\n" if readers
               else "**No readout reaches the bar on this model**: each one's answers depend little on the vignette.\n"))
    write_entry(run_dir, f"Eval protocols: {p.model}", body)
    print(run_dir)
    return lines


if __name__ == "__main__":
    main()
