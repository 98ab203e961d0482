# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     formats: ipynb,py:percent
#     notebook_metadata_filter: kernelspec,jupytext
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: shl
#     language: python
#     name: shl
# ---

# %% [markdown]
# # 04 · The loop: steer → filter → heal → fold, round after round
#
# Each round starts from the current student (every earlier round's adapter active):
# re-extract the vector → walk-C generate + filter → eval steered → heal a fresh LoRA with the
# barrier → save it → eval healed → greedy demo answers → one `round` metrics line. The loop stops
# early when healed coherence falls under `coh_floor` × base.
#
# Re-running with the same `run_dir` and parameters resumes after the last finished round (a
# half-written round is discarded and redone); other parameters for an existing folder are refused.
#
# What to expect:
# - **the trait grows, coherent**: healed Δtrait rises over rounds, coherence stays near base;
# - **undo**: each healed round springs back toward base (healed keeps < half the steered move);
# - **broken**: coherence falls round after round (late-round token loops slip past the filter:
#   read the day/night table);
# - **broad**: care or fairness moves as much as the trait (a general shift, not the trait);
# - **drift**: cos(v_k, v_0) falls, so later rounds steer along another direction.

# %% tags=["parameters"]
params = "default"  # a preset name under params/, or a path to a YAML file
run_dir = ""  # the run folder, empty for the default under journal/

# %%
import json

import pandas as pd
from IPython.display import Markdown, display

import shl
from shl import demos, index, loop, plots, report, selectivity

P, RUN = shl.start_run(globals(), "04_loop")
DEMO = demos.load_demo(P)
print(f"run folder: {RUN}\nmodel: {P.model}  demo: {DEMO.name}  rounds: {P.rounds}  reg: {P.reg}  lam: {P.lam}  "
      f"tau: {P.tau}  barrier_ref: {P.barrier_ref}  coh_floor: {P.coh_floor}")

# %% [markdown]
# ## The loop
# Once per run: base eval, prompting-baseline eval (the pos persona as the system prompt), base
# demo answers. Then the rounds. `entry.md` and the plots are rewritten after every round (and
# when a round fails), so an interrupted run still has its entry. The model is loaded in this
# cell: re-running it after an interrupt resumes from the saved adapters, never from weights a
# half-finished round left in memory.

# %%
model, tok = shl.load_model(P.model, P.dtype, P.device, P.seed)
model, ROUNDS = loop.run_loop(model, tok, P, RUN, report=report.report)
LINES = shl.read_metrics(RUN)

# %% [markdown]
# ## Trajectory
# The trait's nats per stage over rounds, with coherence below (base and the prompting baseline as lines).

# %%
display(plots.plot_trajectory(LINES, DEMO.trait_foundation, P.coh_floor))

# %% [markdown]
# ## Pareto and the Care vs Authority plane
# Δtrait vs Δcoherence against base for every steered and healed point; and the run's path on the
# brief's auth-vs-care axis.

# %%
display(plots.plot_pareto(LINES, DEMO.trait_foundation, DEMO.trait_sign))
display(plots.plot_plane(LINES))

# %% [markdown]
# ## Per round
# d_trait is signed toward the trait (nats vs base). cos_v_v0: this round's vector vs round 0's.
# cos_student_teacher: what the round's adapter moved (on vs off, neutral prompt) vs the vector it learned from.

# %%
display(plots.plot_filter_rounds(LINES, P.gen_pass_target))
pd.DataFrame(ROUNDS)[[c for c in report.ROUND_COLS if ROUNDS and c in ROUNDS[0]]].round(3)

# %%
display(Markdown(report.timing_table(LINES, ROUNDS)))

# %% [markdown]
# ## Demo answers down the rounds (greedy)

# %%
answers = [shl.journal.read_jsonl(RUN / "demos_base.jsonl")] + [shl.journal.read_jsonl(RUN / f"demos_r{r['round']}.jsonl") for r in ROUNDS]
for i, prompt in enumerate(DEMO.demo_prompts[:2]):
    print(f"PROMPT: {prompt}")
    for rows in answers:
        print(f"--- {rows[i]['stage']} r{rows[i]['round']}: {rows[i]['text'].strip()}\n")

# %% [markdown]
# ## Headline and verdict
# cost = |Δcoherence| / |Δtrait|. broken: coherence under the floor; undo: the healed model keeps
# under half the steered move; broad: another foundation moved as much as the trait. Next to the
# raw nats, the selectivity-style numbers of the last round's steered and healed models against
# base, on centred log-probs (`shl.selectivity`): on = the trait's move toward the trait, off = the
# mean |move| of the other six foundations (care included), selectivity = on − 0.1 off, with a 95%
# row-bootstrap interval.

# %%
HEAD = loop.headline(LINES, DEMO.trait_foundation, DEMO.trait_sign, P.coh_floor)
if HEAD:
    HEAD.update(selectivity.round_selectivity(RUN, DEMO.trait_foundation, DEMO.trait_sign, HEAD["round"], P.seed))
print(json.dumps(HEAD, indent=1, default=float))
display(Markdown((RUN / "entry.md").read_text().split("### Plots")[0]))

# %% [markdown]
# ## Results index
# Every run folder next to this one, in one table (`index.md`), and this journal's loop runs overlaid.
# The same from a shell: `python -m shl.index`.

# %%
INDEX = index.write_index(RUN.parent)
display(Markdown(INDEX.read_text()))

# %%
LOOP_RUNS = [RUN.parent / row["run"] for row in index.scan(RUN.parent) if row["rounds"]]
display(index.plot_overlay(LOOP_RUNS, RUN.parent / "index_overlay.png"))
