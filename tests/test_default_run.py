"""default_run.py (`python train_rl.py` with no arguments), shortened to a few steps per stage: every artifact it
promises exists and loads, a rerun reuses what is done, and its rank correlation matches a hand computation."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import InternVLForConditionalGeneration

import default_run as R
import grid_task
from checkpoint import load_model
from train_rl import TrainConfig


def test_spearman_by_hand():
    assert R.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert R.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks (0, 1.5, 1.5, 3) vs (1, 0, 2, 3), both of mean 1.5: covariance 0.75 + 2.25 = 3, variances 4.5 and 5
    assert R.spearman([0.1, 0.5, 0.5, 0.9], [2.0, 1.0, 3.0, 4.0]) == pytest.approx(3 / math.sqrt(22.5))
    assert math.isnan(R.spearman([1, 1, 1], [1, 2, 3]))


def small_run(out) -> R.DefaultRun:
    """The pipeline at a few steps per stage, on a task of 64 train and 12 held-out grids (the connector stage: 32
    full-walk traces of another seed, validated on 8)."""
    small = dict(threads=1, eval_samples=2, micro_batch=16)
    return R.DefaultRun(out=out, task=grid_task.GridTaskConfig(n_train=64, n_heldout=12),
                        sft=TrainConfig(**{**R.COMMON, **R.SFT, **small, "steps": 12, "prompts_per_step": 16}),
                        grpo=TrainConfig(**{**R.COMMON, **R.GRPO, **small, "steps": 4, "prompts_per_step": 4,
                                            "group_size": 4, "eval_every": 2}),
                        connector=TrainConfig(**{**R.COMMON, **R.CONNECTOR, **small, "prompts_per_step": 16,
                                                 "eval_every": 1}),
                        connector_task=R.connector_task(0, n_train=32, n_heldout=8), connector_stage=2)


def test_command_line_configures_grpo_and_names_the_variant():
    run = R.from_command_line(["--train", "llm", "--seed", "1", "--lr", "1e-3", "--connector_stage", "3"])
    assert run.out == Path("runs/default_seed1") and run.variant == "_lr-0.001_train-llm"
    assert (run.grpo.train, run.grpo.lr, run.grpo.seed, run.grpo.steps) == ("llm", 1e-3, 1, R.GRPO["steps"])
    assert (run.sft.train, run.sft.lr, run.sft.seed) == (R.SFT["train"], R.SFT["lr"], 1)  # only --seed reaches SFT
    assert run.task.seed == 1 and run.connector_stage == 3 and run.connector_task.seed == 1 + R.CONNECTOR_SEED
    assert (run.connector.stage, run.connector.train, run.connector.seed) == ("sft", "connector", 1)
    default = R.from_command_line([])
    assert default.out == Path("runs/default") and default.variant == "" and default.grpo == TrainConfig(
        **R.COMMON, **R.GRPO)
    assert not default.paper_tables and default.distill == TrainConfig(**R.COMMON, **R.DISTILL)
    tables = R.from_command_line(["--paper_tables", "--seed", "2"])
    assert tables.paper_tables and tables.variant == "" and (tables.distill.seed, tables.distill.steps) == (2, 150)


def test_short_pipeline_end_to_end(tmp_path, in_process, capsys):
    R.run_default(small_run(tmp_path / "run"))
    out = tmp_path / "run"
    printed = capsys.readouterr().out
    assert "cold start (SFT)" in printed and "+ connector-only stage" in printed and "rank correlation" in printed

    summary = json.loads((out / "summary.json").read_text())
    for stage in ("sft", "grpo", "connector_only"):
        assert 0 <= summary[stage]["greedy_accuracy"] <= 1 and 0 <= summary[stage]["sampled_accuracy"] <= 1
    evaluated = [dict(summary["sft"], step=0)] + [json.loads(x) for x in (out / "grpo" / "eval.jsonl").read_text()
                                                  .splitlines()]
    assert [e["step"] for e in evaluated] == [0, 2, 4]
    finite = [e["step"] for e in evaluated if e["critical_entropy"] is not None]  # null: no critical token sampled
    assert summary["selection"] == {} if len(finite) < 2 else summary["selection"]["steps"] == finite
    for stage, steps in (("sft", 12), ("grpo", 4), ("grpo_connector", 2)):
        run = out / stage
        metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == list(range(1, steps + 1))
        final = run / f"step_{steps:06d}"
        assert (run / "latest").read_text() == final.name and (run / "best" / "config.json").is_file()
        model = load_model(final / "model")
        assert model.config.layout == "native"
        # the connector stage evaluates val_loss while it trains; its best/ is scored on the held-out grids after
        scored = run / ("eval_heldout.json" if stage == "grpo_connector" else f"eval_step_{steps:06d}.json")
        records = json.loads(scored.read_text())["records"]
        assert len(records) == 12 * (1 + 2)  # greedy + 2 samples per held-out question
        assert all({"prompt", "response", "verdict"} <= r.keys() for r in records)
    hf = InternVLForConditionalGeneration.from_pretrained(out / "grpo" / "step_000004" / "model")
    ours = load_model(out / "grpo" / "step_000004" / "model")
    assert torch.equal(hf.lm_head.weight, ours.language_model.lm_head.weight)
    if importlib.util.find_spec("matplotlib"):  # optional: without it the run prints how to get the plot
        assert (out / "grpo" / "plot.png").stat().st_size > 1000
    grpo_config = json.loads((out / "grpo" / "config.json").read_text())
    assert grpo_config["train"] == "connector,llm" and grpo_config["init_from"].startswith(str(out / "sft"))
    conn_config = json.loads((out / "grpo_connector" / "config.json").read_text())
    assert (conn_config["stage"], conn_config["train"]) == ("sft", "connector")
    assert conn_config["data"] == str(out / "connector_task" / "data" / "train.jsonl")  # not the RL task's rows
    conn_evals = [json.loads(x) for x in (out / "grpo_connector" / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in conn_evals] == [1, 2] and all(e["val_loss"] > 0 for e in conn_evals)
    before_conn, after_conn = (load_file(p / "model" / "model.safetensors")
                               for p in (out / "grpo" / "step_000004", out / "grpo_connector" / "step_000002"))
    connector = [k for k in before_conn if k.startswith("multi_modal_projector.")]
    assert connector and any(not torch.equal(after_conn[k], before_conn[k]) for k in connector)
    assert all(torch.equal(after_conn[k], before_conn[k]) for k in before_conn if k not in connector)

    # A rerun trains nothing: every stage is finished with the same settings.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("metrics.jsonl")}
    R.run_default(small_run(out))
    assert {p: p.stat().st_mtime_ns for p in out.rglob("metrics.jsonl")} == before
    assert json.loads((out / "summary.json").read_text())["grpo"] == summary["grpo"]


def test_paper_tables_short(tmp_path, in_process, capsys):
    """--paper_tables at tiny sizes: the OOD split beside the task, every evaluation kept, the distilled SFT set made
    of the GRPO model's correct responses, the cold start fine-tuned on it, the three tables' structure; a rerun
    reads everything back."""
    out = tmp_path / "run"
    small = dict(threads=1, eval_samples=2, micro_batch=16)
    run = R.DefaultRun(**{**small_run(out).__dict__, "connector_stage": 0, "paper_tables": True,
                          "distill": TrainConfig(**{**R.COMMON, **R.DISTILL, **small, "steps": 3,
                                                    "prompts_per_step": 8}),
                          "distill_prompts": 20, "budgets": (16, 64)})
    R.run_default(run)
    printed = capsys.readouterr().out
    assert "Table 4" in printed and "Fig. 9" in printed and "Table 3" in printed
    t = json.loads((out / "paper_tables.json").read_text())
    assert list(t["inference_modes"]) == ["slow thinking", "NoWait", "NoThink"]
    assert list(t["thinking_budget"]) == ["16", "64"]
    assert list(t["rl_vs_sft"]) == ["cold start (SFT)", "GRPO", "SFT on GRPO's traces"]
    for v in t["rl_vs_sft"].values():
        assert {"heldout", "ood"} == v.keys() and all(0 <= v[s]["greedy_accuracy"] <= 1 for s in v)
    # a 16-token budget cannot hold a walk that reaches \boxed{}: nothing is answered, everything truncated
    assert t["thinking_budget"]["16"]["greedy_accuracy"] == 0 and t["thinking_budget"]["16"]["truncation_rate"] == 1
    assert t["checkpoint"] == str(out / "grpo" / "step_000004" / "model") and t["ood"]["rows"] == 12
    where = out / "paper_tables"
    records = lambda name: json.loads((where / f"{name}.json").read_text())["records"]
    assert not any(" wait " in r["response"] for r in records("nowait") if r["response"])
    assert not any(r["response"].startswith("<think>") for r in records("nothink") if r["response"])
    assert len(records("distill_samples")) == 20 and all(r["mode"] == "sample" for r in records("distill_samples"))
    distilled = R.load_rows(where / "distill.jsonl")
    assert len(distilled) == t["distill"]["rows"] == sum(r["verdict"] == "correct" for r in records("distill_samples"))
    assert all(Path(r["image"][0]).is_file() for r in distilled)
    config = json.loads((out / "sft_distilled" / "config.json").read_text())
    assert (config["init_from"], config["steps"]) == (str(out / "sft" / "step_000012" / "model"), 3)
    ood = [json.loads(x) for x in (out / "task" / "data" / "heldout_ood.jsonl").read_text().splitlines()]
    assert len(ood) == 12 and all(r["strategy"] == "full" and r["id"].startswith("heldout_ood-") for r in ood)
    # the OOD split is written beside the task, whose own files stay valid: a rerun reuses everything
    kept = lambda: {p: p.stat().st_mtime_ns for p in [*out.rglob("metrics.jsonl"), *where.iterdir(),
                                                      *(out / "task" / "data").glob("*.json*")]}
    before = kept()
    R.run_default(run)
    assert kept() == before and json.loads((out / "paper_tables.json").read_text())["minutes"] == t["minutes"]
    assert json.loads((out / "paper_tables.json").read_text())["rl_vs_sft"] == t["rl_vs_sft"]
