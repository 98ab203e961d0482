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
# # 03 · Gate 3: does the LoRA learn the trait coherently?
#
# SFT on the kept steered completions, with a barrier that penalises divergence from a reference
# model: loss = NLL + lam_eff · relu(D − tau) + spectral_lam · σ_max(ΔW), D = `kl_agg` of the
# per-position KL over completion tokens. The bet: incoherence is large and erratic, the trait
# small and systematic, so the barrier removes the first and keeps the second.
#
# What to expect:
# - **heals**: the healed model (adapter on, no steering) keeps at least half the steered trait
#   move at coherence at least the steered model's;
# - **regularisation too strong**: D pinned at tau, NLL barely falls, the trait barely moves;
# - **too weak / barrier never fires**: D < tau at every step, so the run equals `reg=nll`;
# - **undo**: coherence recovers but the trait springs back to base.

# %% tags=["parameters"]
params = "default"  # a preset name under params/, or a path to a YAML file
run_dir = ""  # the run folder, empty for the default under journal/

# %%
import copy
from pathlib import Path

import pandas as pd

import shl
from shl import demos, filter as filt, heal, history, loop, null, plots, report, steer
from shl.generate import generate_texts

P, RUN = shl.start_run(globals(), "03_heal")
DEMO = demos.load_demo(P)
TRAIT = f"{DEMO.trait_foundation}_nats"
print(f"run folder: {RUN}\nmodel: {P.model}  reg: {P.reg}  kl_agg: {P.kl_agg}  lam: {P.lam}  tau: {P.tau}  "
      f"spectral_lam: {P.spectral_lam}  lora_r: {P.lora_r}  heal_band: {P.heal_band}")

# %%
model, tok = shl.load_model(P.model, P.dtype, P.device, P.seed)
# heal wraps `model` in place; the ablation arms start from this copy (made only when needed)
base_model = copy.deepcopy(model) if P.heal_ablation else None
LAYERS = steer.band_layers(steer.num_layers(model), P.steer_band)

# %% [markdown]
# ## The kept completions
# From a 02 run folder (`kept_from`) with its vector, or generated here with walk-C.

# %%
if P.kept_from:
    src = Path(P.kept_from)
    KEPT = shl.journal.read_jsonl(src / "kept.jsonl")
    vec = steer.Vector.load(src / "vector_r0.pt")
    # its method matches steer_method: shl.demos.check_kept_from refused the run before the model loaded
    COEFF = sum(r["coeff"] for r in KEPT) / len(KEPT)  # walk-C banks survivors of several doses
else:
    shl.seed_everything(P.seed)
    vec = steer.extract(model, tok, DEMO.pos, DEMO.neg, demos.load_contexts(P), LAYERS, P.extract_batch_size,
                        method=P.steer_method)
    KEPT, kappa, trace, _ = filt.generate_and_filter(model, tok, vec, DEMO, P, seed=P.seed)
    COEFF = sum(r["coeff"] for r in KEPT) / len(KEPT)  # walk-C banks survivors of several doses
    shl.journal.write_jsonl(RUN / "kept.jsonl", KEPT)
vec.save(RUN / "vector_r0.pt")
print(f"{len(KEPT)} kept completions; their mean steering coefficient {COEFF:.3f} is the steered eval's dose")

# %% [markdown]
# ## Before: base, prompting baseline, steered at the data's (mean) dose

# %%
BASE = shl.log_eval(RUN, shl.evaluate(model, tok, **shl.eval_kwargs(P)), "base")
BASELINE = shl.log_eval(RUN, shl.evaluate(model, tok, system=DEMO.pos, **shl.eval_kwargs(P)), "prompt_baseline")
print(shl.mfv.reads_warning(BASE) or "the base model reads the vignettes (shl.mfv.instrument)")
with steer.steer(model, vec, COEFF):
    STEERED = shl.log_eval(RUN, shl.evaluate(model, tok, **shl.eval_kwargs(P)), "steered", round=0, coeff=COEFF)
demo_prompts = [shl.chat_prompt(tok, x) for x in DEMO.demo_prompts[:2]]
DEMOS = {"base": generate_texts(model, tok, demo_prompts, P.demo_max_new_tokens, progress=False)}
with steer.steer(model, vec, COEFF):
    DEMOS["steered"] = generate_texts(model, tok, demo_prompts, P.demo_max_new_tokens, progress=False)

# %% [markdown]
# ## Heal
# A fresh LoRA on the kept completions (completion tokens only), the barrier toward the
# reference (`barrier_ref`: at round 0 both choices are the base model).

# %%
model, LOG = heal.heal(model, tok, KEPT, P, round_idx=0, history=[])
history.save_adapter(model, "r0", RUN / "adapters" / "r0")
HEAL = heal.summary_line(LOG, P, 0)
shl.append_metrics(RUN, HEAL)
shl.journal.write_jsonl(RUN / "heal_log.jsonl", LOG["steps"])
pd.DataFrame(LOG["steps"]).round(4)

# %%
pd.DataFrame(LOG["epochs"]).round(4)

# %%
fig = plots.plot_heal(LOG["steps"], P.tau, f"heal r0 ({P.reg}, {P.kl_agg}, lam {P.lam}, tau {P.tau})")
plots.save(fig, RUN, "heal_r0")

# %% [markdown]
# ## After: the healed model (adapter on, no steering)

# %%
HEALED = shl.log_eval(RUN, shl.evaluate(model, tok, **shl.eval_kwargs(P)), "healed", round=0)
DEMOS["healed"] = generate_texts(model, tok, demo_prompts, P.demo_max_new_tokens, progress=False)

# %% [markdown]
# ## The null control arm (`null_arm`)
# The same heal (seed, steps, barrier) on unsteered completions of the same prompts, as many as
# were kept: what fine-tuning alone moves. The trait is read beyond it.

# %%
NULL = None
if P.null_arm:
    model, NULL = null.run_null_arm(model, tok, KEPT, P, RUN, 0, DEMO)
stages = [("base", BASE), ("prompt_baseline", BASELINE), ("steered", STEERED), ("healed", HEALED)]
rows = [dict(r, stage=s) for s, r in stages + ([("null", NULL)] if NULL else [])]
table = pd.DataFrame(rows)[["stage", TRAIT, "care_nats", "fairness_nats", "loyalty_nats", "coherence", "top1_acc"]]
table["trait_move"] = [DEMO.trait_move(r[TRAIT], BASE[TRAIT]) for r in rows]
table.round(3)

# %%
for i, prompt in enumerate(DEMO.demo_prompts[:2]):
    print(f"PROMPT: {prompt}")
    for stage, answers in DEMOS.items():
        print(f"--- {stage}\n{answers[i].strip()}\n")

# %% [markdown]
# ## Verdict
# SHOULD: the healed model keeps >= half the steered trait move at coherence >= the steered model's.

# %%
steered_move = DEMO.trait_move(STEERED[TRAIT], BASE[TRAIT])
healed_move = DEMO.trait_move(HEALED[TRAIT], BASE[TRAIT])
keeps = steered_move > 0 and healed_move >= 0.5 * steered_move
coherent = HEALED["coherence"] >= STEERED["coherence"]
print(f"steered: trait move {steered_move:+.3f} nats, coherence {STEERED['coherence']:.3f}")
print(f"healed:  trait move {healed_move:+.3f} nats, coherence {HEALED['coherence']:.3f} (base {BASE['coherence']:.3f})")
HEAD = loop.headline(shl.read_metrics(RUN), DEMO.trait_foundation, DEMO.trait_sign, P.coh_floor)
if NULL:
    print(f"null:    trait move {DEMO.trait_move(NULL[TRAIT], BASE[TRAIT]):+.3f} nats, coherence {NULL['coherence']:.3f}; "
          f"healed beyond the null {HEAD['d_trait_beyond_null']:+.3f}; largest off-target beyond the null "
          f"{HEAD['off_target_beyond_null']} {HEAD['off_target_beyond_null_move']:.3f} (raw {HEAD['off_target']} "
          f"{HEAD['off_target_move']:.3f})")
print(f"verdicts (as the loop's headline reads them): {'+'.join(HEAD['verdicts']) or 'pass'}")
print(f"barrier fired at {sum(s['barrier_fired'] for s in LOG['steps'])} of {len(LOG['steps'])} steps; final D {LOG['final_D']:.4f}")
VERDICT = ("PASS" if keeps and coherent else "FAIL") + f": healed keeps {healed_move / steered_move if steered_move else float('nan'):.0%} " \
          f"of the steered move at {HEALED['coherence'] / STEERED['coherence']:.2f}x the steered coherence"
print(VERDICT)
if not keeps:
    print("likely cause: the trait did not transfer (too few or off-trait survivors, regularisation too strong) "
          "or sprang back (undo)")

# %% [markdown]
# ## Ablation: the same data, `reg=nll` vs `reg=kl_rev` (`heal_ablation=True`)
# cost = |Δcoherence| / |Δtrait|: coherence paid per nat of trait.

# %%
ABLATION = []
if P.heal_ablation:
    for reg in ("nll", "kl_rev"):
        arm = copy.deepcopy(base_model)
        arm, arm_log = heal.heal(arm, tok, KEPT, shl.load_params(str(RUN / "params.yaml"), reg=reg), round_idx=0, history=[])
        res = shl.log_eval(RUN, shl.evaluate(arm, tok, **shl.eval_kwargs(P)), f"ablation_{reg}", round=0, reg=reg)
        d_trait, d_coh = DEMO.trait_move(res[TRAIT], BASE[TRAIT]), res["coherence"] - BASE["coherence"]
        ABLATION.append({"reg": reg, "d_trait": d_trait, "d_coherence": d_coh,
                         "cost": abs(d_coh) / abs(d_trait) if d_trait else float("inf"), "final_D": arm_log["final_D"]})
        del arm
    display(pd.DataFrame(ABLATION).round(3))  # noqa: F821 (IPython)
else:
    print("skipped (heal_ablation=False)")

# %%
body = "\n\n".join([
    f"Model `{P.model}`, demo `{DEMO.name}`, {len(KEPT)} kept completions from coefficient {COEFF:.3f}; "
    f"heal: reg `{P.reg}`, kl_agg `{P.kl_agg}`, lam {P.lam}, tau {P.tau}, spectral_lam {P.spectral_lam}, "
    f"LoRA r {P.lora_r} on {P.heal_band}. Parameters: `params.yaml`.",
    f"**Verdict (gate 3):** {VERDICT}.",
    shl.journal.md_table(table.to_dict("records"), list(table.columns)),
    report.headline_text(HEAD),
    report.instrument_section(shl.read_metrics(RUN)),
    "Heal: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in HEAL.items() if k not in ("stage",)),
    "![heal](heal_r0.png)",
    ("### Ablation\n\n" + shl.journal.md_table(ABLATION, ["reg", "d_trait", "d_coherence", "cost", "final_D"])) if ABLATION else "",
    "### Demo answers (greedy)\n\n" + "\n\n".join(
        f"> {prompt}\n\n" + "\n\n".join(f"**{stage}:** {answers[i].strip()}" for stage, answers in DEMOS.items())
        for i, prompt in enumerate(DEMO.demo_prompts[:2])),
])
print(shl.journal.write_entry(RUN, f"03_heal: {DEMO.name} on {P.model}", body))
