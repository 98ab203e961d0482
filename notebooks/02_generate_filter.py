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
# # 02 · Gate 2: can we keep the coherent, on-trait completions?
#
# Steering is supposed to break coherence. The filter keeps the coherent-but-trait-laden
# survivors that will train the adapter, and walk-C lowers the dose until enough survive. If
# the whole batch is incoherent, training pulls toward incoherence: this gate decides whether
# the loop can work at all.
#
# What to expect:
# - survival falls as the dose rises (if flat, the filter is inert or the dose does nothing);
# - the dropped completions at high dose are visibly broken (loops, word salad), the kept ones
#   read as fluent answers that *act out* the trait;
# - the borderline samples around each threshold show whether the cut is in the right place
#   (late-round collapse makes low-entropy loops that can slip under both ppl and repetition).

# %% tags=["parameters"]
params = "default"  # a preset name under params/, or a path to a YAML file
run_dir = ""  # the run folder, empty for the default under journal/

# %%
import pandas as pd
from tqdm.auto import tqdm

import shl
from shl import demos, filter as filt, generate, plots, steer

P, RUN = shl.start_run(globals(), "02_generate_filter")
DEMO = demos.load_demo(P)
print(f"run folder: {RUN}\nmodel: {P.model}  demo: {DEMO.name}  steer_coeff: {P.steer_coeff}  "
      f"filter: ppl <= {P.filter_ppl_tau}, repetition <= {P.filter_rep_tau}")

# %%
model, tok = shl.load_model(P.model, P.dtype, P.device, P.seed)
LAYERS = steer.band_layers(steer.num_layers(model), P.steer_band)
shl.seed_everything(P.seed)
vec = steer.extract(model, tok, DEMO.pos, DEMO.neg, demos.load_contexts(P), LAYERS, P.extract_batch_size, method=P.steer_method)
vec.save(RUN / "vector_r0.pt")
print(f"steering layers {LAYERS}, norms", {l: round(n, 1) for l, n in vec.norms().items()})

# %% [markdown]
# ## Filter across the dose range
# One sampled batch per dose (0 = unsteered control), judged by the filter with steering off.

# %%
doses = sorted({0.0, *(c for c in P.sweep_coeffs if c > 0)})
RECORDS = []
for i, dose in enumerate(tqdm(doses, desc="doses")):
    users = [DEMO.prompt_pool[(i * P.gen_batch_size + j) % len(DEMO.prompt_pool)] for j in range(P.gen_batch_size)]
    recs = filt.steered_batch(model, tok, vec, dose, users, P, P.seed + 1000 + i, progress=False,
                              kappa=dose / P.steer_coeff)
    RECORDS += filt.judge(model, tok, recs, P, DEMO.narration)
    shl.append_metrics(RUN, filt.filter_line(recs, "dose_sweep"))
report = pd.DataFrame([filt.filter_line([r for r in RECORDS if r["coeff"] == d], "dose_sweep") for d in doses])
report

# %%
fig = plots.plot_filter(RECORDS, P.filter_ppl_tau)
plots.save(fig, RUN, "filter_ppl_vs_dose")

# %% [markdown]
# ## Borderline samples
# The two kept completions closest to each threshold and the two dropped ones just past it.
# Judge by eye: is the cut in the right place?

# %%
BORDER = filt.borderline(RECORDS, P)
for name, group in BORDER.items():
    print(f"\n===== {name} =====")
    for r in group:
        print(f"--- {'KEPT' if r['kept'] else 'DROPPED ' + ','.join(r['reasons'])}  coeff {r['coeff']:g}  "
              f"tail_ppl {r['tail_ppl']:.1f}  rep {r['rep']:.2f}  glued run {r['glued']}  unspaced {r['unspaced']}\nPROMPT: {r['prompt']}\n{r['completion'].strip()}\n")

# %% [markdown]
# ## walk-C: settle the dose, collect the training set
# Probe at kappa = 1, bisect kappa in log space toward `gen_pass_target` survival, bank every
# survivor, then collect at the settled kappa until `n_keep`.

# %%
def save_trace(trace):
    shl.journal.write_jsonl(RUN / "walk_c_trace.jsonl", trace)
    (RUN / "walk_c_survival.txt").write_text(generate.survival_table(trace) + "\n")


KEPT, KAPPA, TRACE, ALL = filt.generate_and_filter(model, tok, vec, DEMO, P, seed=P.seed, on_starve=save_trace)
save_trace(TRACE)
for i, t in enumerate(TRACE):
    shl.append_metrics(RUN, filt.filter_line([r for r in ALL if r["batch"] == i], f"walk_c_{t['phase']}"))
shl.journal.write_jsonl(RUN / "kept.jsonl", KEPT)
shl.journal.write_jsonl(RUN / "generated.jsonl", ALL)
print(generate.survival_table(TRACE))
print(f"\nsettled kappa {KAPPA:.3f} (coeff {KAPPA * P.steer_coeff:.3f}); kept {len(KEPT)} of {len(ALL)} generated")
fig = plots.plot_walk(TRACE, P.gen_pass_target)
plots.save(fig, RUN, "walk_c")

# %% [markdown]
# ## Verdict
# SHOULD: survival falls as the dose rises, and walk-C banks at least `min_train` survivors.

# %%
surv = report.set_index("coeff").survival
falls = surv.iloc[-1] < surv.iloc[0]
enough = len(KEPT) >= P.min_train
print(f"survival by dose: {', '.join(f'{c:g}: {s:.2f}' for c, s in surv.items())} -> "
      f"{'falls' if falls else 'does NOT fall'} as the dose rises")
print(f"walk-C: kappa {KAPPA:.3f}, {len(KEPT)} kept (min_train {P.min_train})")
print("PASS" if falls and enough else "FAIL", "gate 2")
if not falls:
    print("likely cause: the filter is inert (thresholds too loose) or the dose range never breaks the model")

# %%
kept_show = KEPT[:2]
dropped_show = [r for r in ALL if not r["kept"]][:2]
body = "\n\n".join([
    f"Model `{P.model}`, demo `{DEMO.name}`, steering layers {LAYERS}, steer_coeff {P.steer_coeff}. Parameters: `params.yaml`.",
    f"**Verdict (gate 2):** {'PASS' if falls and enough else 'FAIL'}: survival {'falls' if falls else 'does not fall'} "
    f"with dose; walk-C settled kappa {KAPPA:.3f} and kept {len(KEPT)} (min_train {P.min_train}).",
    "### Filter by dose\n\n" + shl.journal.md_table(report.to_dict("records"), list(report.columns)),
    "![filter](filter_ppl_vs_dose.png)\n\n![walk-C](walk_c.png)",
    "### walk-C\n\n```\n" + generate.survival_table(TRACE) + "\n```",
    "### Kept (first two)\n\n" + "\n\n".join(f"> {r['prompt']}\n\n{r['completion'].strip()}" for r in kept_show),
    "### Dropped (first two)\n\n" + "\n\n".join(f"> {r['prompt']}\n\n({', '.join(r['reasons'])}) {r['completion'].strip()}"
                                              for r in dropped_show),
])
print(shl.journal.write_entry(RUN, f"02_generate_filter: {DEMO.name} on {P.model}", body))
