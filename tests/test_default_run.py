"""default_run.py (`python train_rl.py` with no arguments), shortened to a few steps per stage: every artifact it
promises exists and loads, a rerun reuses what is done, and its rank correlation matches a hand computation."""
import importlib.util
import json
import math

import pytest
import torch
from transformers import InternVLForConditionalGeneration

import default_run as R
import grid_task
from checkpoint import load_model


def test_spearman_by_hand():
    assert R.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert R.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks (0, 1.5, 1.5, 3) vs (1, 0, 2, 3), both of mean 1.5: covariance 0.75 + 2.25 = 3, variances 4.5 and 5
    assert R.spearman([0.1, 0.5, 0.5, 0.9], [2.0, 1.0, 3.0, 4.0]) == pytest.approx(3 / math.sqrt(22.5))
    assert math.isnan(R.spearman([1, 1, 1], [1, 2, 3]))


def test_short_pipeline_end_to_end(tmp_path, in_process, monkeypatch, capsys):
    task_config = grid_task.GridTaskConfig
    monkeypatch.setattr(R, "GridTaskConfig", lambda seed: task_config(seed=seed, n_train=64, n_heldout=12))
    monkeypatch.setattr(R, "SFT", {**R.SFT, "steps": 12, "prompts_per_step": 16, "micro_batch": 16})
    monkeypatch.setattr(R, "GRPO", {**R.GRPO, "steps": 4, "prompts_per_step": 4, "group_size": 4, "eval_every": 2,
                                    "micro_batch": 16})
    monkeypatch.setattr(R, "COMMON", {**R.COMMON, "eval_samples": 2, "threads": 1})
    fields = {**R.TrainConfig().__dict__, "out": str(tmp_path / "run")}
    R.run_default(fields, {"out"}, connector_stage=2)
    out = tmp_path / "run"
    printed = capsys.readouterr().out
    assert "cold start (SFT)" in printed and "+ connector-only stage" in printed and "rank correlation" in printed

    summary = json.loads((out / "summary.json").read_text())
    for stage in ("sft", "grpo", "connector_only"):
        assert 0 <= summary[stage]["greedy_accuracy"] <= 1 and 0 <= summary[stage]["sampled_accuracy"] <= 1
    assert summary["selection"]["steps"] == [0, 2, 4] or math.isnan(summary["grpo"]["critical_entropy"])
    for stage, steps in (("sft", 12), ("grpo", 4), ("grpo_connector", 2)):
        run = out / stage
        metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == list(range(1, steps + 1))
        final = run / f"step_{steps:06d}"
        assert (run / "latest").read_text() == final.name and (run / "best" / "config.json").is_file()
        model = load_model(final / "model")
        assert model.config.layout == "native"
        records = json.loads((run / f"eval_step_{steps:06d}.json").read_text())["records"]
        assert len(records) == 12 * (1 + 2)  # greedy + 2 samples per held-out question
        assert all({"prompt", "response", "verdict"} <= r.keys() for r in records)
    hf = InternVLForConditionalGeneration.from_pretrained(out / "grpo" / "step_000004" / "model")
    ours = load_model(out / "grpo" / "step_000004" / "model")
    assert torch.equal(hf.lm_head.weight, ours.language_model.lm_head.weight)
    if importlib.util.find_spec("matplotlib"):  # optional: without it the run prints how to get the plot
        assert (out / "grpo" / "plot.png").stat().st_size > 1000
    grpo_config = json.loads((out / "grpo" / "config.json").read_text())
    assert grpo_config["train"] == "connector,llm" and grpo_config["init_from"].startswith(str(out / "sft"))
    assert json.loads((out / "grpo_connector" / "config.json").read_text())["train"] == "connector"

    # A rerun trains nothing: every stage is finished with the same settings.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("metrics.jsonl")}
    R.run_default(fields, {"out"}, connector_stage=2)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("metrics.jsonl")} == before
    assert json.loads((out / "summary.json").read_text())["grpo"] == summary["grpo"]
