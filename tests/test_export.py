import copy
import json
import shutil

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from conftest import randomize_lora
from shl import heal as H
from shl import history as HI
from shl.export import MANIFEST, export_merged, main
from shl.journal import append_metrics
from shl.params import load_params

SEQS = [[1, 5, 9, 200, 17, 4], [300, 2, 2, 51, 80, 7], [11, 12, 13, 14, 15, 16]]




def _logits(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor(SEQS)).logits


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    """A fake finished two-round loop run of the tiny preset, and the adapter stack that made it."""
    run_dir = tmp_path_factory.mktemp("run")
    p = load_params("tiny")
    (run_dir / "params.yaml").write_text(yaml.safe_dump(p.to_dict()))
    model = HI.add_round_adapter(copy.deepcopy(tiny[0]), p, 0)
    randomize_lora(model, "r0", 1)
    model = HI.add_round_adapter(model, p, 1)  # r0 frozen, both active
    randomize_lora(model, "r1", 2)
    for k in (0, 1):
        HI.save_adapter(model, f"r{k}", run_dir / "adapters" / f"r{k}")
        append_metrics(run_dir, {"stage": "round", "round": k})
    model.eval()
    stack = {}
    for key, names in (("base", []), ("r0", ["r0"]), ("r0+r1", ["r0", "r1"])):
        with HI.adapters(model, names):
            stack[key] = _logits(model)
    return run_dir, stack


def test_merged_folder_loads_in_plain_transformers_and_matches_the_stack(run, tmp_path):
    run_dir, stack = run
    out = export_merged(run_dir, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    logits = _logits(merged)
    torch.testing.assert_close(logits, stack["r0+r1"], atol=1e-4, rtol=1e-4)
    assert (logits - stack["base"]).abs().max() > 1e-2  # the merge did something
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["adapters_merged"] == ["r0", "r1"] and manifest["model"] == "tiny-random"
    assert manifest["source_run"] == str(run_dir.resolve())


def test_a_bfloat16_run_is_merged_and_saved_in_float32_so_the_update_survives(run, tmp_path, capsys):
    run_dir = tmp_path / "bf16"
    shutil.copytree(run[0], run_dir)
    p = yaml.safe_load((run_dir / "params.yaml").read_text())
    (run_dir / "params.yaml").write_text(yaml.safe_dump(dict(p, dtype="bfloat16")))
    out = export_merged(run_dir, tmp_path / "merged")
    assert json.loads((out / MANIFEST).read_text())["dtype"] == "torch.float32"
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(out).eval()), run[1]["r0+r1"],
                               atol=1e-4, rtol=1e-4)
    low = export_merged(run_dir, tmp_path / "low", dtype="bfloat16")
    assert "warning: saving in bfloat16" in capsys.readouterr().out
    assert json.loads((low / MANIFEST).read_text())["dtype"] == "torch.bfloat16"
    with pytest.raises(ValueError, match="dtype must be one of"):
        export_merged(run_dir, tmp_path / "bad", dtype="int8")


def test_exported_folder_is_a_plain_model_folder(run, tmp_path):
    out = export_merged(run[0], tmp_path / "merged")
    names = {f.name for f in out.iterdir()}
    assert not [n for n in names if "adapter" in n], names
    assert {"config.json", "model.safetensors", "tokenizer.json", MANIFEST} <= names
    assert "peft" not in (out / "config.json").read_text()
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # no temp folder left behind


def test_rounds_merges_only_the_first_rounds(run, tmp_path):
    run_dir, stack = run
    out = export_merged(run_dir, tmp_path / "r0_only", rounds=1)
    logits = _logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval())
    torch.testing.assert_close(logits, stack["r0"], atol=1e-4, rtol=1e-4)
    assert (logits - stack["r0+r1"]).abs().max() > 1e-2
    assert json.loads((out / MANIFEST).read_text())["adapters_merged"] == ["r0"]
    with pytest.raises(ValueError, match="between 1 and 2"):
        export_merged(run_dir, tmp_path / "r3", rounds=3)


def test_missing_adapter_says_to_recreate_the_run(run, tmp_path):
    clone = tmp_path / "clone"
    shutil.copytree(run[0], clone)
    shutil.rmtree(clone / "adapters" / "r1")
    with pytest.raises(RuntimeError, match=r"adapters \['r1'\] are not in.*re-create the run"):
        export_merged(clone, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_run_without_finished_round_is_refused(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(load_params("tiny").to_dict()))
    append_metrics(tmp_path, {"stage": "base", "round": -1})
    with pytest.raises(ValueError, match="no finished loop round"):
        export_merged(tmp_path, tmp_path / "out")


def test_non_empty_out_dir_is_refused(run, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export_merged(run[0], tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_cli_prints_the_folder_and_errors_in_one_line(run, tmp_path, capsys):
    # in-process: a subprocess would spend ~5 s importing torch for each call
    out = tmp_path / "cli"
    assert main([str(run[0]), str(out), "--rounds", "1"]) == out
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    with pytest.raises(SystemExit, match=r"^error: .*not empty"):
        main([str(run[0]), str(out)])


@pytest.mark.slow
def test_the_embedded_model_exports_too(embedded, tmp_path):
    """The embedded model comes from a GGUF: a folder that still named the GGUF quantisation in its
    config made every model built on it refuse save_pretrained."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # float32 here so the unmerged stack it is checked against is float32 too (export merges in
    # float32 whatever the run's dtype)
    p = load_params("default", dtype="float32")
    (run_dir / "params.yaml").write_text(yaml.safe_dump(p.to_dict()))
    model = HI.add_round_adapter(copy.deepcopy(embedded[0]), p, 0)
    randomize_lora(model, "r0", 1, scale=0.05)
    HI.save_adapter(model, "r0", run_dir / "adapters" / "r0")
    append_metrics(run_dir, {"stage": "round", "round": 0})
    out = export_merged(run_dir, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert json.loads((out / MANIFEST).read_text())["dtype"] == "torch.float32"
    want = _logits(model.eval())
    torch.testing.assert_close(_logits(merged), want, atol=1e-3, rtol=1e-4)
    with model.disable_adapter():
        assert (_logits(model) - want).abs().max() > 1e-2


def test_a_round_that_stopped_the_loop_is_merged_with_a_warning(run, tmp_path, capsys):
    run_dir = tmp_path / "stopped"
    shutil.copytree(run[0], run_dir)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    lines[-1] = json.dumps({"stage": "round", "round": 1, "stopped": True, "stop_reason": "coherence 0.1 < 0.5 x base"})
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    export_merged(run_dir, tmp_path / "merged")
    assert "warning: round 1 stopped the loop (coherence 0.1 < 0.5 x base); --rounds 1" in capsys.readouterr().out
    export_merged(run_dir, tmp_path / "before", rounds=1)
    assert "warning" not in capsys.readouterr().out
