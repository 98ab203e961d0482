import math
import types

import pytest
import torch
import yaml

from shl import filter as filt
from shl import generate, history
from shl.journal import REPO, read_jsonl
from shl.models import chat_prompt
from shl.params import load_params

PROSE = ("When your manager asks you to stay late, it helps to explain calmly what you can and cannot do, "
         "and to suggest another time that works for both of you.")


def test_repetition_catches_word_loops_and_char_runs_but_not_prose():
    assert filt.repetition("the cat sat " * 12) > 0.3
    assert filt.repetition("GLUTE GLUTE GLUTE GLUTE GLUTE GLUTE") > 0.8
    assert filt.repetition("ok " + "a" * 60) > 0.8
    assert filt.repetition(PROSE) < 0.15


@pytest.mark.parametrize("text, expected", [
    ("I am someone who stands by principle, so I would tell my boss no.", True),
    ("As someone who values wellbeing, I think you should rest.", True),
    ("Tell your manager you have a fever and go home to rest.", False),
])
def test_narration_detector(text, expected):
    assert filt.narrates(text) is expected


def test_narration_detector_uses_the_demo_phrases():
    assert filt.narrates("Follow the chain of command here.", ["chain of command"])
    assert not filt.narrates("Follow the chain of command here.")


@pytest.mark.parametrize("text, expected", [
    ("I'm sorry, but I can't help with that request.", True),
    ("As an AI, I do not have personal opinions.", True),
    ("I'm an AI assistant, so I can only suggest general steps.", True),
    ("Sorry to hear that! Take the afternoon off and drink water.", False),
])
def test_refusal_detector(text, expected):
    assert filt.refuses(text) is expected


def test_tail_ppl_equals_a_hand_computation(tiny):
    model, tok = tiny
    prompt = chat_prompt(tok, "Say something.")
    completion = " The river runs past the old mill and into the sea at dawn."
    (got,) = filt.tail_ppl(model, tok, [prompt], [completion], tail_frac=0.25)
    p_ids = tok(prompt, add_special_tokens=False).input_ids
    c_ids = tok(prompt + completion, add_special_tokens=False).input_ids[len(p_ids):]
    n_tail = math.ceil(0.25 * len(c_ids))
    with torch.no_grad():
        logits = model(torch.tensor([p_ids + c_ids])).logits[0]
    nll = [-(logits[t - 1].log_softmax(-1)[tid]).item()
           for t, tid in zip(range(len(p_ids) + len(c_ids) - n_tail, len(p_ids) + len(c_ids)), c_ids[-n_tail:])]
    assert got == pytest.approx(math.exp(sum(nll) / n_tail), rel=1e-4)


def test_tail_ppl_does_not_change_with_batching(tiny):
    model, tok = tiny
    prompts = [chat_prompt(tok, u) for u in ("Hi", "Tell me a long story about a lighthouse keeper", "Why?")]
    comps = [" Hello there, friend.", " Once upon a time a keeper lit the lamp every night for forty years.", " Because."]
    batched = filt.tail_ppl(model, tok, prompts, comps, batch_size=3)
    single = [filt.tail_ppl(model, tok, [p], [c], batch_size=1)[0] for p, c in zip(prompts, comps)]
    assert batched == pytest.approx(single, rel=1e-4)
    assert filt.tail_ppl(model, tok, prompts[:1], [""])[0] == math.inf


def test_filter_records_every_reason():
    p = load_params("default")
    recs = [{"completion": PROSE, "n_tokens": 30}, {"completion": "GLUTE " * 20, "n_tokens": 40},
            {"completion": "I am someone who follows principle. " + PROSE, "n_tokens": 40},
            {"completion": ", and then", "n_tokens": 3}]
    out = filt.filter_completions(recs, [5.0, 3.0, 5.0, 500.0], p)
    assert out[0]["kept"] and out[0]["reasons"] == []
    assert out[1]["reasons"] == ["repetition"]
    assert out[2]["reasons"] == ["narration"]
    assert set(out[3]["reasons"]) == {"empty", "ppl"}
    assert filt.filter_completions([{"completion": PROSE, "n_tokens": 30}], [math.nan], p)[0]["reasons"] == ["ppl"]


def _fake_generator(survival_of_kappa):
    """Records whose kept fraction is a known function of kappa (deterministic)."""
    def gen(kappa, n, batch_index):
        k = int(survival_of_kappa(kappa) * n + 1e-9)
        return [{"kept": i < k, "kappa": kappa, "batch": batch_index, "id": f"{batch_index}-{i}"} for i in range(n)]
    return gen


def test_walk_c_settles_on_the_kappa_where_survival_meets_the_target_and_banks_every_survivor():
    p = load_params("default", kappa_min=0.05, gen_pass_target=0.5, gen_probe_size=16, gen_batch_size=16,
                    walk_iters=8, n_keep=80, min_train=20, gen_max_batches=20)
    # survival = 1 - kappa: the target 0.5 is met exactly below kappa 0.5
    kept, kappa, trace = generate.walk_c(_fake_generator(lambda k: max(0.0, 1 - k)), p)
    assert 0.42 <= kappa <= 0.5
    assert len(kept) >= p.n_keep
    assert len(kept) == sum(t["kept"] for t in trace)  # every survivor of every batch, probes included
    assert any(r["kappa"] != kappa for r in kept)  # probe survivors were banked too
    assert trace[0]["kappa"] == 1.0 and trace[-1]["phase"] == "collect"


def test_walk_c_keeps_full_dose_when_it_already_passes():
    p = load_params("default", n_keep=32, min_train=16)
    kept, kappa, trace = generate.walk_c(_fake_generator(lambda k: 0.9), p)
    assert kappa == 1.0 and [t["phase"] for t in trace][0] == "probe" and len(trace) <= 4


def test_starved_walk_c_raises_with_the_table_written_first(tmp_path):
    p = load_params("default", gen_max_batches=5, min_train=24)
    written = []

    def save(trace):
        (tmp_path / "walk_c_survival.txt").write_text(generate.survival_table(trace))
        written.append(len(trace))

    with pytest.raises(generate.Starved, match=r"only \d+ survivors \(min_train 24\) after 5 batches") as e:
        generate.walk_c(_fake_generator(lambda k: 0.05), p, on_starve=save)
    assert written == [5]
    table = (tmp_path / "walk_c_survival.txt").read_text()
    assert table.splitlines()[0].startswith("phase") and len(table.splitlines()) == 6
    assert "phase   kappa" in str(e.value)


def test_borderline_shows_kept_just_under_and_dropped_just_over():
    p = load_params("default", filter_ppl_tau=40.0)
    recs = [{"tail_ppl": q, "rep": 0.1, "glued": 12, "unspaced": 0, "kept": q <= 40, "reasons": [] if q <= 40 else ["ppl"]}
            for q in (5, 20, 35, 39, 41, 60, 900)]
    ppl = next(v for k, v in filt.borderline(recs, p).items() if k.startswith("tail"))
    assert [r["tail_ppl"] for r in ppl] == [39, 35, 41, 60]


def test_generated_records_carry_dose_and_seed(tiny):
    model, tok = tiny
    p = load_params("tiny")
    demo = types.SimpleNamespace(prompt_pool=["Hi", "Plan a picnic", "Fix my bike"], narration=[])
    from shl.steer import Vector
    vec = Vector({1: torch.zeros(model.config.hidden_size)})
    kept, kappa, trace, allrecs = filt.generate_and_filter(model, tok, vec, demo, p, seed=3, progress=False)
    assert {"prompt", "completion", "coeff", "kappa", "seed", "tail_ppl", "rep", "reasons", "kept"} <= set(allrecs[0])
    assert allrecs[0]["seed"] == 3 and len(allrecs) == sum(t["generated"] for t in trace)


def test_default_repetition_threshold_drops_a_period_four_loop_but_keeps_prose():
    # a loop of period k caps the most common n-gram near 1/k: the threshold must sit below 1/4
    p = load_params("default")
    loop = "With your love for the family " + "of the family " * 15
    assert filt.repetition(loop) > p.filter_rep_tau > filt.repetition(PROSE)


FIRST_LOOP = REPO / "journal" / "2026-11-26_04_loop_smollm2-135m-instruct"


def _fluent_committed() -> list[str]:
    """Fluent text of the committed runs: the greedy demo answers of the first loop (base and
    healed), the gate-1 sweep's unsteered and mildly steered answers, and gate 2's kept
    completions from the gentlest dose."""
    texts = [r["text"] for s in ("base", "r0", "r1") for r in read_jsonl(FIRST_LOOP / f"demos_{s}.jsonl")]
    sweep = read_jsonl(REPO / "journal" / "2026-11-26_01_vector_smollm2-135m-instruct" / "samples_sweep.jsonl")
    texts += [r["answer"] for r in sweep if 0 <= r["coeff"] <= 0.5]
    gate2 = read_jsonl(REPO / "journal" / "2026-11-26_02_generate_filter_smollm2-135m-instruct" / "kept.jsonl")
    return texts + [r["completion"] for r in gate2 if r["coeff"] == min(x["coeff"] for x in gate2)]


def test_glued_word_soup_the_first_loop_kept_is_now_dropped():
    """Round 2 of the first committed loop trained on glued-word soup ("Ialwayshikelemygowlion...")
    that passed tail perplexity and repetition; every kept completion with a 25+ character run
    without whitespace is now dropped for `glued`, and nothing else changes for them."""
    p = load_params("default")
    kept = [r for k in (0, 1, 2) for r in read_jsonl(FIRST_LOOP / f"generated_r{k}.jsonl") if r["kept"]]
    soup = [dict(r) for r in kept if max(len(w) for w in r["completion"].split()) >= 25]
    assert len(soup) >= 60  # 1, 8 and 54 in rounds 0, 1, 2
    out = filt.filter_completions(soup, [r["tail_ppl"] for r in soup], p)
    assert all("glued" in r["reasons"] and not r["kept"] for r in out)


def test_fluent_committed_text_passes_the_text_checks():
    """No false drops of fluent text: the demo answers, the unsteered sweep answer and the
    gentlest kept completions all pass every text check (tail ppl set fine here)."""
    p = load_params("default")
    texts = _fluent_committed()
    assert len(texts) >= 20
    recs = [{"completion": t, "n_tokens": 40} for t in texts]
    out = filt.filter_completions(recs, [3.0] * len(recs), p)
    assert [r["reasons"] for r in out if r["reasons"]] == []
    assert max(r["glued"] for r in out) <= 17


def test_words_run_together_after_punctuation_are_dropped_and_unsteered_text_is_not():
    """Later rounds of the 6-epoch loops kept text like "I am a wise mother,I am a mother" (runs of
    17-20 characters, under `glued`); no unsteered completion of the committed runs has one."""
    p = load_params("default")
    # the runs made without the check (later ones dropped such completions from their null arm)
    unsteered = [r for f in sorted((REPO / "journal").glob("*/generated_null.jsonl"))
                 if not yaml.safe_load((f.parent / "params.yaml").read_text()).get("filter_unspaced")
                 for r in read_jsonl(f)]
    assert len(unsteered) >= 600
    assert [r["completion"] for r in unsteered if filt.unspaced(r["completion"])] == []
    late = [dict(r) for r in read_jsonl(REPO / "journal" / "2026-12-02_04_loop_smollm2-135m-instruct_epochs6_seed1"
                                        / "generated_r2.jsonl") if r["kept"]]
    out = filt.filter_completions(late, [r["tail_ppl"] for r in late], p)
    assert sum("unspaced" in r["reasons"] for r in out) >= 30
    off = filt.filter_completions([dict(r) for r in late], [r["tail_ppl"] for r in late], load_params("default", filter_unspaced=False))
    assert all(r["kept"] for r in off)  # the switch restores the filter those rounds ran with
    assert filt.unspaced("See https://example.org/a,b and e.g. U.S. law, 3.5 days. Then") == 0
    assert filt.unspaced("I am a mother,I am here.You know") == 2


def test_glued_run_ignores_urls_and_addresses():
    assert filt.glued_run("See https://www.example.org/very/long/path/to/a/page or mail someone@example-company.org.") <= 4
    assert filt.glued_run("I am verybelieveinthisproudofmallndiskew today") == len("verybelieveinthisproudofmallndiskew")


@pytest.mark.parametrize("ref", ["base", "student"])
def test_judge_reads_tail_ppl_with_the_filter_reference(tiny, ref):
    """filter_ref=base judges with the adapters off (the student that learned the soup is not the
    judge); student judges with the adapters as they are."""
    import copy
    from conftest import randomize_lora
    model, tok = tiny
    p = load_params("tiny", filter_ref=ref)
    student = history.add_round_adapter(copy.deepcopy(model), p, 0)
    randomize_lora(student, "r0", seed=1)
    recs = [{"chat_prompt": chat_prompt(tok, "Hi"), "completion": " Hello there, how can I help you today?"}]
    got = filt.judge(student, tok, [dict(r) for r in recs], p)[0]["tail_ppl"]
    with history.adapters(student, [] if ref == "base" else ["r0"]):
        want = filt.tail_ppl(student, tok, [recs[0]["chat_prompt"]], [recs[0]["completion"]], p.filter_tail_frac)[0]
    with history.adapters(student, ["r0"] if ref == "base" else []):
        other = filt.tail_ppl(student, tok, [recs[0]["chat_prompt"]], [recs[0]["completion"]], p.filter_tail_frac)[0]
    assert got == pytest.approx(want, rel=1e-6) and got != pytest.approx(other, rel=1e-3)
