import json
import shutil

import pytest
import yaml

from shl import journal
from shl.params import ParamError, load_params


def test_run_dir_gets_params_yaml_that_recreates_the_params(tmp_path):
    p = load_params("tiny", lam=0.3)
    journal.prepare_run_dir(tmp_path / "run", p)
    saved = yaml.safe_load((tmp_path / "run" / "params.yaml").read_text())
    assert load_params(str(tmp_path / "run" / "params.yaml")) == p and saved["lam"] == 0.3


def test_existing_run_dir_with_other_params_is_refused_showing_the_keys(tmp_path):
    journal.prepare_run_dir(tmp_path, load_params("tiny"))
    journal.prepare_run_dir(tmp_path, load_params("tiny"))  # same params: fine (resume)
    with pytest.raises(ParamError, match=r"lam: 1.0 there, 0.3 now"):
        journal.prepare_run_dir(tmp_path, load_params("tiny", lam=0.3))


def test_default_run_dir_names_notebook_model_and_overrides():
    p = load_params("default", lam=0.3)
    path = journal.default_run_dir("04_loop", p, {"lam": 0.3})
    assert path.parent == journal.JOURNAL
    assert path.name.endswith("_04_loop_smollm2-135m-instruct_lam0.3")


def test_metrics_lines_append_and_a_crash_mid_write_keeps_earlier_lines(tmp_path, monkeypatch):
    journal.append_metrics(tmp_path, {"stage": "base", "round": -1, "coherence": 0.5})
    journal.append_metrics(tmp_path, {"stage": "steered", "round": 0})

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(journal.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        journal.append_metrics(tmp_path, {"stage": "healed", "round": 0})
    assert [r["stage"] for r in journal.read_metrics(tmp_path)] == ["base", "steered"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temp file left


def test_a_metrics_line_needs_a_stage(tmp_path):
    with pytest.raises(ValueError, match="stage"):
        journal.append_metrics(tmp_path, {"round": 0})


def test_log_eval_writes_the_contract_keys_and_the_rows(tmp_path, tiny):
    from shl import mfv
    res = mfv.evaluate(*tiny, n=7, progress=False)
    journal.log_eval(tmp_path, res, "base")
    (line,) = journal.read_metrics(tmp_path)
    for key in ("stage", "round", "coherence", "top1_acc", "ppx_json", "seconds", "care_nats", "fairness_nats",
                "loyalty_nats", "authority_nats", "sanctity_nats", "liberty_nats", "socialnorms_nats"):
        assert key in line, key
    rows = [json.loads(x) for x in (tmp_path / "evals" / "base_r-1.jsonl").read_text().splitlines()]
    assert len(rows) == 7 and "pmass" in rows[0]


def test_entry_keeps_the_researchers_findings_when_regenerated(tmp_path):
    journal.write_entry(tmp_path, "run", "table v1")
    text = (tmp_path / "entry.md").read_text()
    assert "table v1" in text and "## Findings" in text
    (tmp_path / "entry.md").write_text(text.split("## Findings")[0] + "## Findings\n\nThe trait moved.\n")
    journal.write_entry(tmp_path, "run", "table v2")
    text = (tmp_path / "entry.md").read_text()
    assert "table v2" in text and "table v1" not in text and text.endswith("## Findings\n\nThe trait moved.\n")


def test_md_table_rounds_numbers():
    out = journal.md_table([{"a": 1.23456, "b": "x"}], ["a", "b"], digits=2)
    assert out.splitlines() == ["| a | b |", "|---|---|", "| 1.23 | x |"]


def test_default_run_dir_names_a_path_override_by_its_last_component():
    p = load_params("default", kept_from="journal/2026-01-01_02_generate_filter_x")
    path = journal.default_run_dir("03_heal", p, {"kept_from": "journal/2026-01-01_02_generate_filter_x"})
    assert path.name.endswith("_03_heal_smollm2-135m-instruct_kept_from2026-01-01_02_generate_filter_x")


def test_default_run_dir_steps_past_a_folder_made_with_other_params(tmp_path, monkeypatch):
    monkeypatch.setattr(journal, "JOURNAL", tmp_path)
    p1, d1 = journal.resolve_run("tiny", "", {}, "01_vector")
    _, again = journal.resolve_run("tiny", "", {}, "01_vector")
    assert again == d1  # same params: the same folder (resume)
    (d1 / "params.yaml").write_text((d1 / "params.yaml").read_text().replace("lam: 1.0", "lam: 0.5"))
    _, d2 = journal.resolve_run("tiny", "", {}, "01_vector")
    assert d2 == d1.with_name(d1.name + "_2") and (d2 / "params.yaml").exists()
    with pytest.raises(ParamError, match="lam: 0.5 there, 1.0 now"):
        journal.resolve_run("tiny", str(d1), {}, "01_vector")  # an explicit folder is never swapped


def test_default_run_dir_steps_past_a_cloned_loop_folder_without_its_adapters(tmp_path, monkeypatch):
    monkeypatch.setattr(journal, "JOURNAL", tmp_path)
    _, d1 = journal.resolve_run("tiny", "", {}, "04_loop")
    journal.append_metrics(d1, {"stage": "round", "round": 0})
    (d1 / "adapters" / "r0").mkdir(parents=True)
    (d1 / "adapters" / "r0" / "adapter_config.json").write_text("{}")
    _, again = journal.resolve_run("tiny", "", {}, "04_loop")
    assert again == d1  # its adapters are there: resumable
    shutil.rmtree(d1 / "adapters")  # as after `git clone`: adapter weights are not committed
    _, d2 = journal.resolve_run("tiny", "", {}, "04_loop")
    assert d2 == d1.with_name(d1.name + "_2")
