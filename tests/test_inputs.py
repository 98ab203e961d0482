"""Bad input gives a one-line error before any model is loaded."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shl import steer
from shl.demos import check_inputs, load_contexts, load_demo
from shl.journal import resolve_run
from shl.params import ParamError, load_params

ROOT = Path(__file__).resolve().parent.parent


def test_empty_context_file_is_refused(tmp_path):
    empty = tmp_path / "contexts.txt"
    empty.write_text("\n# only a comment\n\n")
    with pytest.raises(ParamError, match="holds no contexts"):
        resolve_run("tiny", str(tmp_path / "run"), {"contexts_file": str(empty)}, "01_vector")
    assert not (tmp_path / "run").exists()


def test_too_few_contexts_for_n_contexts_is_refused(tmp_path):
    few = tmp_path / "contexts.txt"
    few.write_text("one\ntwo\n")
    with pytest.raises(ParamError, match="holds 2 contexts but n_contexts = 8"):
        load_contexts(load_params("tiny", contexts_file=str(few)))


def test_layer_band_outside_the_model_is_refused():
    with pytest.raises(ParamError, match="steer_band"):
        load_params("default", steer_band=[0.8, 1.3])


def test_unknown_demo_names_the_shipped_ones():
    with pytest.raises(ParamError, match=r"unknown demo 'loyal': use one of \['authority', 'love'\]"):
        load_demo(load_params("default", demo="loyal"))


def test_shipped_demos_and_contexts_load():
    for name in ("authority", "love"):
        demo = load_demo(load_params("default", demo=name))
        assert demo.pos and demo.neg and demo.demo_prompts and len(demo.prompt_pool) >= 64
    assert len(load_contexts(load_params("gemma-3-4b-it"))) == 256  # the GPU presets take 256


def test_params_override_the_demo_persona_and_trait():
    demo = load_demo(load_params("default", persona_pos="Be bold.", persona_neg="Be timid.",
                                 trait_foundation="care", trait_sign=1))
    assert (demo.pos, demo.neg, demo.trait_foundation, demo.trait_sign) == ("Be bold.", "Be timid.", "care", 1)
    assert demo.trait_move(-1.0, -1.5) == pytest.approx(0.5)


def test_cli_prints_one_line_and_exits_nonzero_without_loading_a_model(tmp_path):
    out = subprocess.run([sys.executable, "-m", "shl.run", "notebooks/01_vector.ipynb", "--params", "tiny",
                          "--run-dir", str(tmp_path / "r"), "-p", "demo", "loyal"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == ["error: unknown demo 'loyal': use one of ['authority', 'love']"]


def test_a_missing_local_model_folder_is_one_line_before_any_load(tmp_path):
    out = subprocess.run([sys.executable, "-m", "shl.run", "notebooks/01_vector.ipynb", "--params", "tiny",
                          "--run-dir", str(tmp_path / "r"), "-p", "model", "/nonexistent/dir"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == [
        "error: model folder /nonexistent/dir does not exist (a local model is a folder with config.json; "
        "a hub id looks like org/name)"]
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("model, ok", [("HuggingFaceTB/SmolLM2-135M-Instruct", True), ("tiny-random", True),
                                       ("./no/such/folder", False), ("/tmp", False)])
def test_model_paths_are_checked_and_hub_ids_left_to_the_loader(model, ok):
    p = load_params("tiny", model=model)
    if ok:
        check_inputs(p)
    else:
        with pytest.raises(ParamError, match=f"model folder {model}"):
            check_inputs(p)


def test_kept_from_must_be_a_finished_02_run(tmp_path):
    with pytest.raises(ParamError, match="not a finished 02_generate_filter run folder"):
        check_inputs(load_params("tiny", kept_from=str(tmp_path)))


@pytest.mark.parametrize("meta, method, ok", [
    ({"method": "pca"}, "pca", True), ({"method": "mean_diff"}, "pca", False), ({}, "mean_diff", True), ({}, "pca", False)])
def test_kept_from_whose_vector_was_extracted_another_way_is_refused_before_a_model_loads(tmp_path, meta, method, ok):
    (tmp_path / "kept.jsonl").write_text("")
    steer.Vector({0: torch.ones(4)}, meta).save(tmp_path / "vector_r0.pt")
    p = load_params("tiny", kept_from=str(tmp_path), steer_method=method)
    if ok:
        check_inputs(p)
    else:
        with pytest.raises(ParamError, match=f"extracted with mean_diff but steer_method is {method}"):
            check_inputs(p)


def test_the_authority_demo_names_care_as_its_companion_and_an_overridden_pair_has_none():
    assert load_demo(load_params("tiny")).companions == {"care": 1}
    assert load_demo(load_params("tiny", demo="love")).companions == {}
    assert load_demo(load_params("tiny", trait_foundation="fairness")).companions == {}


@pytest.mark.parametrize("key, value, message", [
    ("select_kl_budgets", [], "non-empty list of positive nats"),
    ("select_kl_budgets", [0.5, -1], "non-empty list of positive nats"),
    ("select_methods", ["pca", "svd"], "distinct methods of"),
    ("select_methods", ["pca", "pca"], "distinct methods of"),
    ("steer_method", "svd", "is not one of"),
])
def test_bad_method_comparison_params_are_refused(key, value, message):
    with pytest.raises(ParamError, match=message):
        load_params("tiny", **{key: value})


def test_the_runner_validates_without_importing_torch():
    """`python -m shl.run` imports shl.run, checks the parameters and starts the kernel; torch and
    transformers (9 s of start-up) are the kernel's to import. A module-level import of either on
    that path would fail here."""
    code = ("import sys, shl.run, shl\n"
            "from shl.journal import resolve_run\n"
            "resolve_run('default', '', {}, '04_loop')\n"
            "shl.load_params('default')\n"
            "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
