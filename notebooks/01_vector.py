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
# # 01 · Gate 1: does a steering vector move the eval while the model stays coherent?
#
# Before any filtering or healing, the steering vector itself has to move the trait foundation
# on the moral-foundations vignettes (MFV, the tinymfv protocol) without wrecking coherence. If
# it cannot, nothing downstream can work.
#
# What to expect, and what each outcome would mean:
# - **too weak**: the trait nats barely move at any coefficient that keeps coherence;
# - **too strong**: coherence (the mass on valid answers) falls off a cliff before the trait moves;
# - **imprecise**: other foundations (Care, Fairness) move as much as the trait one;
# - **works**: a coefficient moves the trait >= 0.3 nats at coherence >= 0.9 x base, and beats simply
#   putting the persona in the system prompt (the prompting baseline).
#
# Then the extraction methods (`select_methods`) are compared at matched doses by their
# selectivity at one dose (its own expectations are below); the loop's outcome chooses the default
# `steer_method`.
#
# Parameters: `params` (a preset under `params/` or a YAML path), `run_dir` (default
# `journal/<date>_01_vector_<slug>`), and any field of `shl.params.Params` by name
# (`papermill ... -p eval_n 28`). A mistyped name stops the run before the model loads.

# %% tags=["parameters"]
params = "default"  # a preset name under params/, or a path to a YAML file
run_dir = ""  # the run folder, empty for the default under journal/

# %%
import pandas as pd
from tqdm.auto import tqdm

import shl
from shl import demos, plots, report, selectivity, steer
from shl.generate import generate_texts

P, RUN = shl.start_run(globals(), "01_vector")
DEMO = demos.load_demo(P)
CONTEXTS = demos.load_contexts(P)
TRAIT = f"{DEMO.trait_foundation}_nats"
print(f"run folder: {RUN}\nmodel: {P.model}  eval_n: {P.eval_n or 132}  think_tokens: {P.eval_think_tokens}")
print(f"demo: {DEMO.name}  trait: {TRAIT} {'down' if DEMO.trait_sign < 0 else 'up'}\n  pos: {DEMO.pos}\n  neg: {DEMO.neg}")

# %%
model, tok = shl.load_model(P.model, P.dtype, P.device, P.seed)
LAYERS = steer.band_layers(steer.num_layers(model), P.steer_band)
print(f"{type(model).__name__}: {steer.num_layers(model)} layers, {model.dtype}, {model.device}; steering layers {LAYERS}")

# %% [markdown]
# ## Base eval and the prompting baseline
# Per vignette, both option orders; p = softmax of the mean option log-probs; coherence = the
# mass the model puts on valid answers (`pmass`). The prompting baseline is the pos persona as
# the system prompt, no steering: the brief names "does not beat a prompting baseline" as a failure.

# %%
base = shl.evaluate(model, tok, **shl.eval_kwargs(P))
BASE = shl.log_eval(RUN, base, "base")
baseline = shl.evaluate(model, tok, system=DEMO.pos, **shl.eval_kwargs(P))
BASELINE = shl.log_eval(RUN, baseline, "prompt_baseline")
print(shl.mfv.reads_warning(BASE) or "the base model reads the vignettes (shl.mfv.instrument)")
pd.DataFrame([BASE, BASELINE]).set_index("stage").round(3)

# %%
fig = plots.plot_profiles({"base": base.profile, "prompting baseline": baseline.profile, "human": base.human_profile},
                          "MFV profile")
plots.save(fig, RUN, "profile_base")

# %% [markdown]
# ## Extract the vector
# The hidden states h_l(pos ⊕ x) and h_l(neg ⊕ x) at the assistant tag, for everyday contexts x, per
# layer in the band, reduced by `steer_method`: `mean_diff` v_l = mean_x h_l(pos ⊕ x) − h_l(neg ⊕ x);
# `pca` the top principal component of the centred differences; `lda` the shrunk Fisher discriminant.
# Every method's vector has the mean difference's norm per layer, so the raw coefficients below
# mean pushes of the same size. Norms grow with depth, so coefficients are not comparable across bands.

# %%
shl.seed_everything(P.seed)
vec = steer.extract(model, tok, DEMO.pos, DEMO.neg, CONTEXTS, LAYERS, P.extract_batch_size, method=P.steer_method)
vec.meta.update(model=P.model, demo=DEMO.name, band=P.steer_band)
print(f"steer_method: {P.steer_method}")
vec.save(RUN / "vector_r0.pt")
print("norms per layer:", {l: round(n, 2) for l, n in vec.norms().items()})

# %% [markdown]
# Optional calibration (`steer_calibrate=True`): the unit coefficient becomes the one whose p95
# per-token KL(steered‖unsteered) on the demo prompts is `calib_kl_p95` nats; the sweep is then in
# multiples of it.

# %%
calib_prompts = [shl.chat_prompt(tok, x) for x in DEMO.demo_prompts + CONTEXTS[:8]]  # also the methods' doses below
unit = 1.0
if P.steer_calibrate:
    unit, trace = steer.calibrate(model, tok, vec, calib_prompts, P.calib_kl_p95)
    print(f"calibrated unit coefficient {unit:.3f}; trace (coeff, p95 KL):", [(round(c, 3), round(k, 3)) for c, k in trace])

# %% [markdown]
# ## Sweep the coefficient, both signs
# Each point: the eval with the vector added at every position, and one greedy demo answer.

# %%
demo_prompt = shl.chat_prompt(tok, DEMO.demo_prompts[0])
SWEEP, SAMPLES = [], []
for c in tqdm(P.sweep_coeffs, desc="sweep"):
    coeff = c * unit
    with steer.steer(model, vec, coeff):
        res = shl.evaluate(model, tok, progress=False, **shl.eval_kwargs(P))
        answer = generate_texts(model, tok, [demo_prompt], P.demo_max_new_tokens, progress=False)[0]
    SWEEP.append(shl.log_eval(RUN, res, "sweep", coeff=coeff))
    SAMPLES.append({"coeff": coeff, "prompt": DEMO.demo_prompts[0], "answer": answer})
answer0 = generate_texts(model, tok, [demo_prompt], P.demo_max_new_tokens, progress=False)[0]
SAMPLES.insert(0, {"coeff": 0.0, "prompt": DEMO.demo_prompts[0], "answer": answer0})
shl.journal.write_jsonl(RUN / "samples_sweep.jsonl", SAMPLES)
table = pd.DataFrame(SWEEP)[["coeff", TRAIT, "care_nats", "fairness_nats", "coherence", "top1_acc"]]
table["trait_move"] = [DEMO.trait_move(r[TRAIT], BASE[TRAIT]) for r in SWEEP]
table["coh_vs_base"] = table.coherence / BASE["coherence"]
table.round(3)

# %%
fig = plots.plot_sweep(SWEEP, BASE, BASELINE, DEMO.trait_foundation)
plots.save(fig, RUN, "sweep")

# %% [markdown]
# ## Demo generations (greedy), one per coefficient
# Read these for coherence and for the trait *enacted* rather than narrated.

# %%
print(f"PROMPT: {DEMO.demo_prompts[0]}\n")
for s in SAMPLES:
    print(f"--- coeff {s['coeff']:+.2f}\n{s['answer'].strip()}\n")

# %% [markdown]
# ## Steering methods at a matched dose: selectivity
# A raw coefficient is not a fair dose across methods: at the same norm one direction may move the
# logits far more than another. So each method in `select_methods` is calibrated to the same p95
# per-token KL(steered‖unsteered) on the demo prompts (and 8 contexts), at every budget of
# `select_kl_budgets`. Then the eval runs at +coeff and at −coeff. Per vignette, Δ_f is half the
# change of the centred log-probs (each answer's log-prob minus the mean over the seven) from
# −coeff to +coeff: the mean of the two signs' moves against base, on the scale of the loop's
# healed-vs-base figures. **on** is the trait foundation's mean Δ, signed toward the trait. **off** is
# the mean |mean Δ| over the other six foundations. **selectivity** = on − 0.1 off (steering-lite's
# score). Intervals are 95% row bootstraps over the vignettes. `d_sel` is selectivity minus
# mean_diff's, with its interval paired over the same resampled vignettes. An interval covers the
# sample of vignettes only: not the sample of extraction contexts, nor how well 12 calibration
# prompts match the doses. All figures use every vignette of the eval (`eval_n`); nothing is tuned
# on a subset.
#
# **The care companion.** The authority pair's pos prompt puts people's wellbeing over orders, so
# care going up is part of what the pair says. steering-lite counts Authority-down *and* Care-up as
# intended. Here the trait is authority alone: care counts as off-target in `selectivity` (as in the
# loop's `broad` verdict). Its own move is shown as `care_move` (signed toward care up), and
# `sel_companions` is the score with care counted as intended, for comparison with steering-lite.
#
# What to expect, written before the run (steering-lite on Qwen3-4B at 0.5 nat: pca +2.12, mean_diff
# +0.10; the issue's probe on this model at 1.0 nat: mean_diff +1.77, pca +1.55, PCA of uncentred
# differences +1.69; coherence 0.71x at +, 0.48x at −):
# - **mean_diff stays best** (the probe's ranking holds): the other methods' `d_sel` intervals sit
#   below or across 0, and the default stays `mean_diff`;
# - **pca wins** (the Qwen3-4B ranking carries over): `d_sel` > 0 with its interval above 0 at both
#   budgets, and the default becomes `pca`;
# - **lda**: the literature (mass-mean beats probe directions for steering) predicts below
#   mean_diff. If it wins, this model's mean difference leaks into the directions contexts vary along;
# - **dose**: every method moves less at 0.5 than at 1.0 nat, with coherence nearer base (about
#   0.85-0.9x at 0.5). If the ranking flips between the budgets, no method is clearly better;
# - **broken method**: on ≤ 0 means the direction is not the trait axis (or its sign rule chose
#   wrong); coherence far below the others at the same KL means the KL budget does not predict
#   damage equally for every method;
# - **care**: care_move > 0 for every method (the pair names wellbeing). A method whose off is
#   mostly care shows a much larger `sel_companions` than `selectivity`.
#
# Here a method beats mean_diff only if its paired `d_sel` interval sits above 0 at both budgets.
# This ranks one dose on the vignettes; the default `steer_method` is chosen in the loop, where
# the vector's steered data are healed round after round (pca since issue 10: its steered data kept
# more coherence and the heal kept more trait; the measurement is next to the knob in `shl/params.py`).

# %%
SEL = selectivity.compare_methods(model, tok, P, DEMO, CONTEXTS, LAYERS, calib_prompts, RUN, BASE,
                                  vectors={P.steer_method: vec})


def interval(r, key):
    return f"[{r[key + '_lo']:+.3f}, {r[key + '_hi']:+.3f}]"


SEL_MD = [{"method": r["method"], "p95 KL": r["kl_budget"], "coeff": r["coeff"], "on": r["on"], "off": r["off"],
           "selectivity": r["selectivity"], "95% interval": interval(r, "selectivity"),
           **({"d_sel vs mean_diff": f"{r['d_sel']:+.3f} {interval(r, 'd_sel')}"} if "d_sel" in r else {}),
           **{f"{f}_move": r[f"{f}_move"] for f in DEMO.companions},
           **({"sel_companions": f"{r['sel_companions']:+.3f} {interval(r, 'sel_companions')}"} if "sel_companions" in r else {}),
           "trait move +/-": f"{r['trait_move_pos']:+.3f} / {r['trait_move_neg']:+.3f}",
           "coh +/- (x base)": f"{r['coh_pos']:.2f} / {r['coh_neg']:.2f}"} for r in SEL]
pd.DataFrame(SEL_MD).round(3)

# %%
fig = plots.plot_selectivity(SEL, DEMO.trait_move(BASELINE[TRAIT], BASE[TRAIT]),
                             BASELINE["coherence"] / BASE["coherence"])
plots.save(fig, RUN, "selectivity")

# %% [markdown]
# The methods' verdict, by the rule above: the best method at each budget, and whether it beats
# mean_diff with the paired interval above 0 at every budget.

# %%
budgets = sorted({r["kl_budget"] for r in SEL})
for b in budgets:
    at = sorted((r for r in SEL if r["kl_budget"] == b), key=lambda r: -r["selectivity"])
    print(f"p95 KL {b:g}: " + "; ".join(
        f"{r['method']} {r['selectivity']:+.3f} [{r['selectivity_lo']:+.3f}, {r['selectivity_hi']:+.3f}]"
        f" (coh x{r['coh_pos']:.2f}/x{r['coh_neg']:.2f})" for r in at))
winners = [m for m in P.select_methods if m != "mean_diff" and "d_sel" in SEL[0] and all(
    r["d_sel_lo"] > 0 for r in SEL if r["method"] == m)]
METHOD_VERDICT = (f"{', '.join(winners)} beat mean_diff at every budget (paired 95% interval of d_sel above 0)"
                  if winners else "no method beats mean_diff at every budget with its paired interval above 0")
print(METHOD_VERDICT)

# %% [markdown]
# ## Verdict
# SHOULD: some coefficient moves the trait >= 0.3 nats toward the trait at coherence >= 0.9 x base,
# the negative coefficient moves it the other way, and the best move beats the prompting baseline.

# %%
ok = table[table.coh_vs_base >= 0.9]
best = ok.loc[ok.trait_move.idxmax()] if len(ok) else None
baseline_move = DEMO.trait_move(BASELINE[TRAIT], BASE[TRAIT])
neg = table[table.coeff < 0]
print(f"base: {TRAIT} {BASE[TRAIT]:.3f}, coherence {BASE['coherence']:.3f}")
print(f"prompting baseline: trait move {baseline_move:+.3f} nats, coherence x{BASELINE['coherence'] / BASE['coherence']:.2f}")
if len(neg):
    print(f"negative coefficients: trait move {', '.join(f'{m:+.3f}' for m in neg.trait_move)} (SHOULD be < 0)")
if best is None:
    print("FAIL: every coefficient costs more than 10% coherence; lower the coefficients or move the band")
else:
    passed = best.trait_move >= 0.3
    print(f"largest trait move at coherence >= 0.9 x base: {best.trait_move:+.3f} nats at coeff {best.coeff:g} "
          f"(coherence x{best.coh_vs_base:.2f}, care_nats {best.care_nats - BASE['care_nats']:+.3f}, "
          f"fairness_nats {best.fairness_nats - BASE['fairness_nats']:+.3f})")
    print("PASS" if passed else "FAIL", "gate 1: trait move >= 0.3 nats at coherence >= 0.9 x base;",
          "beats" if best.trait_move > baseline_move else "does NOT beat", "the prompting baseline")
    if not passed:
        print("likely cause: vector too weak at the coherent doses (raise coefficients, move the band later) "
              "or the persona pair does not isolate the axis")

# %% [markdown]
# ## Journal entry
# `entry.md` in the run folder: the tables, the verdict and the demo answers; the Findings section
# is for you and survives a re-run.

# %%
verdict = ("no coefficient kept coherence >= 0.9 x base" if best is None else
           f"{'PASS' if best.trait_move >= 0.3 else 'FAIL'}: largest trait move {best.trait_move:+.3f} nats at coeff "
           f"{best.coeff:g} (coherence x{best.coh_vs_base:.2f}); prompting baseline {baseline_move:+.3f} nats")
evals = [dict(r, coeff="") for r in (BASE, BASELINE)] + [dict(r, **row) for r, row in zip(SWEEP, table.to_dict("records"))]
body = "\n\n".join([
    f"Model `{P.model}`, demo `{DEMO.name}` (trait: {TRAIT} {'down' if DEMO.trait_sign < 0 else 'up'}), "
    f"layers {LAYERS}, {len(CONTEXTS)} contexts, eval on {BASE['n']} vignettes. Parameters: `params.yaml`.",
    f"**Verdict (gate 1):** {verdict}.",
    shl.journal.md_table(evals, ["stage", "coeff", TRAIT, "care_nats", "fairness_nats", "coherence", "top1_acc",
                                 "trait_probe_gap"]),
    report.instrument_section([BASE, BASELINE]),
    "![sweep](sweep.png)\n\n![profile](profile_base.png)",
    f"### Steering methods at a matched dose (steer_method: `{P.steer_method}`)\n\n"
    "Each method calibrated to the p95 KL budget, eval at +coeff and −coeff; on, off and selectivity = on − 0.1 off "
    "on centred log-probs (half the change from −coeff to +coeff), the trait alone on, care and the rest off; 95% intervals: row "
    "bootstrap over the vignettes; d_sel: vs mean_diff, paired; trait move: raw nats toward the trait vs base; coh: coherence / base, "
    "each at +coeff and −coeff.\n\n"
    + shl.journal.md_table(SEL_MD, list(SEL_MD[0])) + f"\n\n**Methods:** {METHOD_VERDICT}.\n\n![selectivity](selectivity.png)",
    "### Demo answers (greedy)\n\n" + f"Prompt: {DEMO.demo_prompts[0]}\n\n" +
    "\n\n".join(f"**coeff {s['coeff']:+g}:** {s['answer'].strip()}" for s in SAMPLES),
])
print(shl.journal.write_entry(RUN, f"01_vector: {DEMO.name} on {P.model}", body))
