import pytest
import yaml

from shl.params import FIELDS, ParamError, collect_overrides, load_params, params_from_notebook, preset_names


def test_every_preset_loads_and_validates():
    assert {"default", "tiny", "gemma-3-4b-it", "qwen3-4b"} <= set(preset_names())
    for name in preset_names():
        load_params(name)


def test_default_preset_is_the_embedded_model_and_tiny_is_tiny_random():
    assert load_params("default").model == "smollm2-135m-instruct"
    assert load_params("tiny").model == "tiny-random"


def test_every_knob_has_a_one_line_help():
    for name, f in FIELDS.items():
        assert f.metadata["help"] and "\n" not in f.metadata["help"], name


@pytest.mark.parametrize("override, fragment", [
    ({"lamb": 0.3}, "unknown parameter 'lamb' (did you mean lam?)"),
    ({"lam": "strong"}, "parameter 'lam' must be float"),
    ({"rounds": 2.5}, "parameter 'rounds' must be int"),
    ({"eval_json_valid": 1}, "parameter 'eval_json_valid' must be bool"),
    ({"lam": -1.0}, "parameter 'lam' = -1.0 must be >= 0"),
    ({"gen_top_p": 0.0}, "parameter 'gen_top_p' = 0.0 must be > 0"),
    ({"eval_n": 500}, "must be <= 132"),
    ({"reg": "kl"}, "not one of ['nll', 'kl_rev', 'kl_fwd']"),
    ({"steer_band": [0.7, 0.5]}, "fractions of depth"),
    ({"min_train": 60, "n_keep": 48}, "min_train (60) > n_keep (48)"),
    ({"persona_pos": "be bold"}, "must be given together"),
])
def test_bad_values_fail_with_a_message_naming_the_key(override, fragment):
    with pytest.raises(ParamError) as e:
        load_params("default", **override)
    assert fragment in str(e.value)


def test_unknown_key_lists_valid_choices():
    with pytest.raises(ParamError) as e:
        load_params("default", tua=0.1)
    assert "valid parameters:" in str(e.value) and "tau" in str(e.value)


def test_int_is_accepted_for_a_float_knob():
    assert load_params("default", lam=1).lam == 1.0 and isinstance(load_params("default", lam=1).lam, float)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ParamError, match=r"unknown preset 'defualt': use one of \['default'"):
        load_params("defualt")


def test_preset_file_with_unknown_key_fails(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"model": "tiny-random", "epoch": 3}))
    with pytest.raises(ParamError, match="unknown parameter 'epoch'"):
        load_params(str(path))
    path.write_text(yaml.safe_dump({"model": "tiny-random", "epochs": 3}))
    assert load_params(str(path)).epochs == 3


def test_overrides_beat_the_preset():
    assert load_params("tiny", rounds=5).rounds == 5


def test_collect_overrides_takes_injected_names_and_skips_notebook_machinery():
    import math
    ns = {"params": "tiny", "run_dir": "", "lam": 0.3, "In": [], "Out": {}, "_i1": "x", "math": math,
          "print_fn": print, "get_ipython": lambda: None}
    assert collect_overrides(ns) == {"lam": 0.3}
    assert params_from_notebook(ns).lam == 0.3


def test_a_mistyped_injected_name_is_an_error_not_ignored():
    with pytest.raises(ParamError, match="unknown parameter 'lr_rate'"):
        collect_overrides({"params": "tiny", "lr_rate": 1e-3})
