"""Every knob of the four notebooks, in one dataclass, loaded from a preset plus overrides.

A preset is a YAML file under `params/` (or any path) holding a subset of the fields; the rest
keep the defaults below, which are the `default` preset (the embedded model, CPU-sized).
Validation runs before any model is loaded: an unknown key, a wrong type, an out-of-range value
or an inconsistent pair fails with a message that names the key and what would be valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

PRESET_DIR = Path(__file__).resolve().parent.parent / "params"
# the model names shl.models loads without a hub (kept here so validation needs no torch)
EMBEDDED = "smollm2-135m-instruct"
TINY = "tiny-random"
FOUNDATIONS = ("care", "fairness", "loyalty", "authority", "sanctity", "liberty", "socialnorms")
# shl.steer.METHODS, named here so validation runs without importing torch (a test keeps them equal)
STEER_METHODS = ("mean_diff", "pca", "lda")
# the vignette readouts of shl.mfv (eval_protocol)
PROTOCOLS = ("tinymfv", "calibrated", "fewshot", "yesno")
# the notebook-level papermill parameters; everything else a notebook receives must be a field
NOTEBOOK_PARAMS = ("params", "run_dir")


class ParamError(ValueError):
    """Bad parameters: raised before any model is loaded."""


def knob(default, help: str, *, choices=None, lo=None, hi=None, lo_open=False):
    """A field with its one-line help and its valid range or choices (checked by `validate`)."""
    kw = {"default_factory": (lambda d=default: list(d))} if isinstance(default, list) else {"default": default}
    return field(metadata={"help": help, "choices": choices, "lo": lo, "hi": hi, "lo_open": lo_open}, **kw)


@dataclass
class Params:
    # --- model -----------------------------------------------------------------------------
    model: str = knob("smollm2-135m-instruct", "hub id, local folder, 'smollm2-135m-instruct' (embedded, offline) or 'tiny-random' (tests)")
    dtype: str = knob("auto", "weights dtype; auto = bfloat16 on GPU, float32 on CPU", choices=["auto", "float32", "bfloat16", "float16"])
    device: str = knob("auto", "auto = cuda (device_map=auto across GPUs) if available, else cpu", choices=["auto", "cpu", "cuda"])
    seed: int = knob(0, "seeds python, numpy and torch at the start of every stage that samples", lo=0)
    slug: str = knob("", "short name appended to the default run folder name")

    # --- persona / demo --------------------------------------------------------------------
    demo: str = knob("authority", "persona pair + prompts from shl/data/demos/<demo>.yaml (authority, love)")
    persona_pos: str = knob("", "override the demo's pos system prompt (empty = the demo's)")
    persona_neg: str = knob("", "override the demo's neg system prompt (empty = the demo's)")
    trait_foundation: str = knob("", "the eval foundation the trait moves (empty = the demo's)", choices=["", *FOUNDATIONS])
    trait_sign: int = knob(0, "-1: trait = that foundation's nats going down, +1: up (0 = the demo's)", choices=[-1, 0, 1])

    # --- steering (01) ---------------------------------------------------------------------
    # pca, chosen in the loop (issue 10, journal/2026-11-28_issue10_defaults/findings.md): the 3-round
    # default loop with pca reached +1.93 / +1.91 nats raw by round 2 (seeds 0 / 1) at 0.92 / 1.01x
    # base coherence, pass / broad; mean_diff on the same seeds +1.49 / +1.05 at 0.92 / 0.72x, pass /
    # broad. pca's steered data keep more coherence at the same trait (round 0: 0.66x vs 0.50x), and
    # the heal keeps more of them. In 01 alone (matched p95 KL, authority on, care off) mean_diff was
    # the more selective vector: 0.5 nat mean_diff +1.45, pca +1.31, lda +1.12; 1.0 nat +1.78,
    # +1.77, +1.39; with care counted as intended pca leads (+1.03 vs +0.84; +1.38 vs +1.02)
    # (journal/2026-11-28_01_vector_*). The GPU presets keep mean_diff (not measured there)
    steer_method: str = knob("pca", "how the vector is extracted from the paired hidden states: mean_diff, "
                             "pca (top PC of the centred differences) or lda (shrunk Fisher discriminant)",
                             choices=list(STEER_METHODS))
    # layers 18-23 of SmolLM2's 30 moved authority -1.19 nats at 0.91x base coherence (coeff 0.5);
    # 15-20 gave -0.73 at 0.74x and 12-17 -0.25 at 0.65x (journal/2026-11-26_01_vector_*)
    steer_band: list = knob([0.6, 0.8], "decoder layers to steer, as [start, end) fractions of depth")
    # 128 keeps a 3-round loop on the embedded model under 20 min on a 2-core CPU (GPU presets use 256)
    n_contexts: int = knob(128, "user contexts used for extraction (pos vs neg system prompt)", lo=1)
    contexts_file: str = knob("", "extraction contexts, one user message per line (empty = shl/data/contexts.txt)")
    extract_batch_size: int = knob(16, "batch size of the extraction forward passes", lo=1)
    # 2.0 breaks SmolLM2 (0.25 survival at the default filter), so walk-C has a real edge to find
    steer_coeff: float = knob(2.0, "raw-vector multiple used for generation (walk-C's kappa = 1)")
    sweep_coeffs: list = knob([-0.5, 0.25, 0.5, 1.0, 2.0], "raw-vector multiples swept in 01_vector")
    steer_calibrate: bool = knob(False, "bisect the coefficient to hit calib_kl_p95 instead of using steer_coeff")
    calib_kl_p95: float = knob(1.0, "target p95 per-token KL(steered||unsteered) in nats for calibration", lo=0, lo_open=True)
    # steering-lite compared methods at 0.5 nat; at 1.0 SmolLM2's coherence already falls to ~0.7x
    select_kl_budgets: list = knob([0.5, 1.0], "01_vector: p95 KL budgets (nats) at which the methods are compared, each calibrated to it")
    select_methods: list = knob(list(STEER_METHODS), "01_vector: the steer_method choices compared at the matched doses")

    # --- generation (02) -------------------------------------------------------------------
    gen_batch_size: int = knob(16, "completions per generate() call", lo=1)
    # 80: 48 healed round 0 to +0.77 nats raw, but its null arm (48-token unsteered text) moved +0.53
    gen_max_new_tokens: int = knob(80, "tokens per sampled training completion", lo=1)
    # at 1.0 SmolLM2-135M rambles even unsteered (tail ppl up to ~35), so the filter cannot tell
    # steering damage from sampling noise; at 0.7 unsteered tails sit at 2-4
    gen_temperature: float = knob(0.7, "sampling temperature of training completions", lo=0, lo_open=True)
    gen_top_p: float = knob(0.95, "nucleus sampling of training completions", lo=0, hi=1, lo_open=True)
    demo_max_new_tokens: int = knob(64, "tokens per greedy demo generation (compared across rounds)", lo=1)

    # --- filter (02) -----------------------------------------------------------------------
    filter_ppl_tau: float = knob(8.0, "drop a completion whose tail perplexity under the reference exceeds this", lo=1)
    filter_tail_frac: float = knob(0.25, "fraction of completion tokens (the tail) the perplexity is read over", lo=0, hi=1, lo_open=True)
    # a loop of period k words caps the most common n-gram's share near 1/k: 0.35 let
    # "the family of the family of ..." (0.28) through; fluent prose stays under ~0.1
    filter_rep_tau: float = knob(0.2, "drop when the most common word/char n-gram (n=2..4) covers more than this fraction", lo=0, hi=1)
    filter_min_tokens: int = knob(8, "drop completions shorter than this many tokens", lo=1)
    # fluent completions of the committed runs: longest run <= 17; the glued soup: 23 to 230
    filter_glued_len: int = knob(20, "drop a completion with a run of more than this many characters without whitespace (URLs aside)", lo=1)
    # unsteered completions of the committed runs: 0 of 690 have one; the first loop's round-2 soup:
    # 52 of 58; the 6-epoch loops' kept rounds 1-2 (2026-12-02): 7 to 38 of ~55, runs of 17-20 chars
    filter_unspaced: bool = knob(True, "drop a completion where a word runs into the next after punctuation ('mother,I am')")
    # the first committed loop judged with the student, which had learned round 1's soup: round 2
    # kept 54 of 58 glued-word completions at tail ppl 1.1-3.1. Judged by base, soup reads as soup.
    filter_ref: str = knob("base", "model whose tail perplexity judges a completion: base (adapters off) or student (adapters as active; ablation)", choices=["base", "student"])

    # --- walk-C (02) -----------------------------------------------------------------------
    kappa_min: float = knob(0.1, "lowest dose multiplier walk-C may settle on", lo=0, hi=1, lo_open=True)
    # 0.75: 0.5 settled kappa 0.87 (0.65) and healed round 0 to +0.45 nats raw, +0.38 beyond the
    # null (default seed 0: +0.36 / +0.36): more dose in the data is not more trait in the student
    # (journal/2026-11-28_issue10_defaults/findings.md, sweep issue10_levers_r0)
    gen_pass_target: float = knob(0.75, "probe survival walk-C bisects kappa towards", lo=0, hi=1, lo_open=True)
    gen_probe_size: int = knob(16, "completions per walk-C probe batch", lo=1)
    walk_iters: int = knob(4, "bisection steps of kappa in log space", lo=0)
    gen_max_batches: int = knob(12, "generation batches (probes included) before starving is an error", lo=1)
    # 48: 24 is inert (walk-C's 80 probe completions keep ~58 and the heal trains on all kept);
    # 96 healed round 0 to +0.36 raw but its null arm drifted +0.32 (+0.04 beyond it)
    n_keep: int = knob(48, "kept completions to collect per round", lo=1)
    min_train: int = knob(24, "fewest kept completions a round may train on", lo=1)

    # --- heal (03) -------------------------------------------------------------------------
    heal_band: list = knob([0.3, 0.7], "decoder layers that get LoRA, as [start, end) fractions of depth")
    lora_r: int = knob(16, "LoRA rank (alpha = 2r)", lo=1)
    lora_modules: list = knob(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "projection names that get LoRA")
    reg: str = knob("kl_rev", "barrier divergence: nll = no barrier (control), kl_rev = KL(student||ref), kl_fwd = KL(ref||student)", choices=["nll", "kl_rev", "kl_fwd"])
    kl_agg: str = knob("rmse", "how per-position KL over completion tokens is aggregated into D", choices=["mean", "rmse", "p95", "max"])
    barrier_ref: str = knob("prev", "reference of the barrier: prev = last round's student (trust region), base = round-0 model", choices=["prev", "base"])
    # 1: in the 3-round loop on the embedded model, lam 2 reached +1.41 / +0.26 / +0.84 nats by round 2
    # (seeds 0-2) at 0.95 / 0.97 / 0.96x coherence, lam 3 +0.44 at 0.97x, lam 1 +1.49 / +1.05 / +1.43
    # at 0.92 / 0.72 / 0.85x: a stronger barrier keeps coherence by keeping less trait
    # (journal/2026-11-28_issue10_defaults/findings.md)
    lam: float = knob(1.0, "barrier weight", lo=0)
    lam_round_pow: float = knob(-0.5, "lam_eff = lam * (1 + round) ** lam_round_pow")
    tau: float = knob(0.05, "barrier slack: it fires only when D > tau (must sit below the operating KL)", lo=0)
    spectral_lam: float = knob(0.01, "weight of sigma_max(B A) per adapted matrix", lo=0)
    spectral_iters: int = knob(20, "power-iteration steps for sigma_max (3 can read 14% low; 20 is within 0.1%)", lo=1)
    # 14 steps of 2e-4 left the eval where it was, with or without the barrier; 1e-3 moved it
    lr: float = knob(1e-3, "AdamW peak learning rate", lo=0, lo_open=True)
    weight_decay: float = knob(0.0, "AdamW weight decay (composes with the barrier)", lo=0)
    # 6 (42 steps at ~56 kept): the 3-round loop on the embedded model reached healed authority
    # +1.18 / +1.05 nats by round 2 (seeds 0 / 1), +1.06 / +1.12 beyond the null, at 0.94 / 0.98x
    # base coherence; 2 epochs gave +0.85 / +0.63 (two seed-0 runs; float rounding apart)
    # (journal/2026-11-28_issue10_defaults/findings.md). With the unspaced check too, 3 seeds:
    # +1.49 / +1.05 / +1.43 raw, pass / broad / broad, 0.92 / 0.72 / 0.85x. It triples the heal's time
    epochs: int = knob(6, "passes over the kept completions", lo=1)
    train_batch_size: int = knob(4, "completions per micro-batch", lo=1)
    # 2: 1 (78 steps of 4 instead of 42 of 8) healed round 0 to +0.47 raw, its null arm +0.35 (broad)
    grad_accum: int = knob(2, "micro-batches per optimizer step", lo=1)
    warmup_frac: float = knob(0.1, "fraction of steps with linear warm-up before the cosine decay", lo=0, hi=1)
    max_grad_norm: float = knob(1.0, "gradient clipping norm", lo=0, lo_open=True)
    heldout_frac: float = knob(0.1, "fraction of kept completions held out for per-epoch NLL", lo=0, hi=0.5)
    heal_grad_norms: bool = knob(True, "log |grad nll| and |grad barrier| separately (one extra backward pass while the barrier fires)")
    # 6: 8 of the default's 42 steps measure (one extra backward pass per micro-batch each); the
    # adapter does not depend on it (tests/test_heal.py), only how many points the norms plot has
    heal_grad_every: int = knob(6, "measure the gradient's terms on every n-th optimizer step (and the last); other steps log nan", lo=1)
    null_arm: bool = knob(True, "also heal the same way on unsteered completions of the same prompts (the `null` eval, round 0): trait moves are read beyond it")
    heal_ablation: bool = knob(False, "03_heal: also heal the same data with reg=nll and reg=kl_rev and compare")
    kept_from: str = knob("", "03_heal: a 02_generate_filter run folder to take kept.jsonl and the vector from (empty = generate here)")

    # --- eval (every gate) -----------------------------------------------------------------
    # 66 (half, balanced over foundations) keeps the CPU loop under 20 min; GPU presets use all 132
    eval_n: int = knob(66, "vignettes to evaluate, spread over foundations (0 = all 132)", lo=0, hi=132)
    eval_batch_size: int = knob(16, "vignettes per forward pass", lo=1)
    eval_think_tokens: int = knob(0, "greedy thinking tokens before the 'Just answer' interrupt (0 = none)", lo=0)
    eval_json_valid: bool = knob(False, "also let the model answer freely and report the fraction of valid JSON answers")
    eval_json_tokens: int = knob(32, "tokens of the free answer in the json_is_valid mode", lo=1)
    # tinymfv's readout stays the default so numbers compare with upstream; the alternatives and
    # what each reads on the embedded model: journal/*_eval_protocols_*/entry.md
    eval_protocol: str = knob("tinymfv", "vignette readout: tinymfv (forced choice of the seven), calibrated (answer prior "
                              "of content-free scenarios divided out), fewshot (7 worked examples first), yesno (one "
                              "yes/no question per foundation)", choices=list(PROTOCOLS))
    # 9-11 s per eval on the embedded model on 2 CPU cores (the 256 reads alone: 8.9 and 11.2 s in two
    # runs, each distinct prompt read once; 16-19 s when every sequence was read whole;
    # benchmarks/results/bench_loop.md)
    eval_trait_probe: bool = knob(True, "also read the demo's trait probe (shl/data/probes/<demo>.yaml; trait_probe_* keys) "
                                  "in every eval")

    # --- loop (04) -------------------------------------------------------------------------
    rounds: int = knob(3, "steer -> filter -> heal rounds", lo=1)
    coh_floor: float = knob(0.5, "stop the loop when healed coherence < coh_floor x base coherence", lo=0, hi=1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(Params)}
_TYPES = typing.get_type_hints(Params)


def help_table() -> str:
    """One line per knob: name, default, help (for `print` in a notebook)."""
    width = max(map(len, FIELDS))
    return "\n".join(f"{n:<{width}}  {getattr(Params(), n)!r:<24}  {f.metadata['help']}" for n, f in FIELDS.items())


def _unknown(key: str, valid) -> ParamError:
    close = difflib.get_close_matches(key, list(valid), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return ParamError(f"unknown parameter '{key}'{hint}; valid parameters: {', '.join(valid)}")


def _check_type(key: str, value):
    want = _TYPES[key]
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        # an int is a fine float (papermill passes `-p lam 1` as int)
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        list: isinstance(value, list),
    }[want]
    if not ok:
        raise ParamError(f"parameter '{key}' must be {want.__name__}, got {type(value).__name__} {value!r}")
    return float(value) if want is float else value


def _check_range(key: str, value):
    m = FIELDS[key].metadata
    if m["choices"] is not None and value not in m["choices"]:
        raise ParamError(f"parameter '{key}' = {value!r} is not one of {m['choices']}")
    lo, hi = m["lo"], m["hi"]
    if lo is not None and (value < lo or (m["lo_open"] and value == lo)):
        raise ParamError(f"parameter '{key}' = {value!r} must be {'>' if m['lo_open'] else '>='} {lo}")
    if hi is not None and value > hi:
        raise ParamError(f"parameter '{key}' = {value!r} must be <= {hi}")


def _check_band(key: str, band):
    if (len(band) != 2 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in band)
            or not 0 <= band[0] < band[1] <= 1):
        raise ParamError(f"parameter '{key}' = {band!r} must be [start, end) fractions of depth with 0 <= start < end <= 1")


def validate(p: Params) -> Params:
    """Check every field's type and range, then the values that must agree with each other."""
    for key in FIELDS:
        setattr(p, key, _check_type(key, getattr(p, key)))
        _check_range(key, getattr(p, key))
    _check_band("steer_band", p.steer_band)
    _check_band("heal_band", p.heal_band)
    for key in ("sweep_coeffs",):
        if not p.sweep_coeffs or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in p.sweep_coeffs):
            raise ParamError(f"parameter '{key}' = {p.sweep_coeffs!r} must be a non-empty list of numbers")
    if not p.select_kl_budgets or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0
                                          for x in p.select_kl_budgets):
        raise ParamError(f"parameter 'select_kl_budgets' = {p.select_kl_budgets!r} must be a non-empty list of positive nats")
    if not p.select_methods or any(m not in STEER_METHODS for m in p.select_methods) or len(set(p.select_methods)) < len(p.select_methods):
        raise ParamError(f"parameter 'select_methods' = {p.select_methods!r} must list distinct methods of {list(STEER_METHODS)}")
    if not p.lora_modules or not all(isinstance(x, str) for x in p.lora_modules):
        raise ParamError(f"parameter 'lora_modules' = {p.lora_modules!r} must be a non-empty list of module names")
    if p.min_train > p.n_keep:
        raise ParamError(f"min_train ({p.min_train}) > n_keep ({p.n_keep}): a round would need more than it collects; lower min_train or raise n_keep")
    if p.gen_probe_size > p.gen_batch_size:
        raise ParamError(f"gen_probe_size ({p.gen_probe_size}) > gen_batch_size ({p.gen_batch_size}): a probe is at most one generation batch")
    if p.eval_protocol == "yesno" and p.eval_think_tokens:
        raise ParamError("eval_protocol yesno asks seven questions per vignette; thinking would generate seven times: "
                         "set eval_think_tokens 0 or use another protocol")
    if bool(p.persona_pos) != bool(p.persona_neg):
        raise ParamError("persona_pos and persona_neg must be given together (a pair of direct opposites), or both left empty")
    return p


def preset_names() -> list[str]:
    return sorted(f.stem for f in PRESET_DIR.glob("*.yaml"))


def read_preset(name_or_path: str) -> dict:
    """A preset name under params/ or a path to a YAML file -> its dict of overrides."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.exists()):
        path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise ParamError(f"unknown preset '{name_or_path}': use one of {preset_names()} or a path to a .yaml file")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ParamError(f"preset {path} must be a YAML mapping of parameter: value")
    return data


def load_params(preset: str = "default", **overrides) -> Params:
    """Preset, then overrides by name; unknown names and bad values raise ParamError."""
    values = read_preset(preset)
    values.update(overrides)
    for key in values:
        if key not in FIELDS:
            raise _unknown(key, FIELDS)
    return validate(Params(**values))


def collect_overrides(namespace: dict) -> dict:
    """The papermill-injected overrides in a notebook's globals.

    papermill injects `-p name value` as plain assignments after the cell tagged `parameters`,
    and only warns about names the notebook did not declare. Every plain-data global that is not
    private, not a notebook-level parameter (`params`, `run_dir`) and not IPython's own is taken
    as an override, so a typo surfaces as an unknown parameter instead of being ignored.
    """
    ipython_names = {"In", "Out", "get_ipython", "exit", "quit", "open"}
    plain = (bool, int, float, str, list, dict, tuple, type(None))
    out = {}
    for key, value in namespace.items():
        if key.startswith("_") or key in ipython_names or key in NOTEBOOK_PARAMS:
            continue
        if isinstance(value, (types.ModuleType, type)) or callable(value) or not isinstance(value, plain):
            continue
        if key not in FIELDS:
            raise _unknown(key, list(NOTEBOOK_PARAMS) + list(FIELDS))
        out[key] = value
    return out


def params_from_notebook(namespace: dict) -> Params:
    """`params` preset from the notebook's parameters cell plus every papermill override."""
    return load_params(namespace.get("params", "default"), **collect_overrides(namespace))


def diff_params(a: dict, b: dict) -> dict:
    """{key: (a, b)} for every key whose values differ."""
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


if __name__ == "__main__":
    print(help_table())
