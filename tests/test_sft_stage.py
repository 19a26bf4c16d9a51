"""R1V3's supervised connector-only stage (report section 3.4) on the tiny grid task: --epochs derive the steps,
--warmup_ratio the warmup, val_loss is logged at every evaluation, --patience stops the run early, and
--select val_loss keeps the lowest-val-loss checkpoint in OUT/best/; only the connector's weights move."""
import json

import pytest
import torch
from safetensors.torch import load_file

import train_rl as T
import trainer as TR
from cli import UsageError, read_jsonl
from grid_task import GridTaskConfig, prepare


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """32 train rows, 8 held-out rows (full traces as their responses), a random tiny VLM."""
    return prepare(tmp_path_factory.mktemp("grid"), GridTaskConfig(n_train=32, n_heldout=8))


def test_connector_stage_stops_early_and_keeps_the_lowest_val_loss(task, tmp_path, in_process, capsys, monkeypatch):
    out = tmp_path / "run"
    # The real val_loss, plus 1 from the third evaluation on: overfitting, forced (a random tiny model's connector
    # alone barely moves the loss, even at lr 1). Patience 1 stops the run at the first evaluation that does not
    # improve on the best: step 3 of 8.
    real, seen = TR.val_loss, []

    def rising(run):
        result = real(run)
        seen.append(result["val_loss"])
        return result | dict(val_loss=result["val_loss"] + (len(seen) >= 3))

    monkeypatch.setattr(TR, "val_loss", rising)
    result = T.train(T.TrainConfig(
        init_from=str(task.init_checkpoint), data=str(task.train_jsonl), eval_data=str(task.heldout_jsonl),
        out=str(out), stage="sft", train="connector", epochs=2, prompts_per_step=8, micro_batch=8, lr=1e-2,
        schedule="cosine", warmup_ratio=0.25, eval_every=1, patience=1, select="val_loss", save_every=1,
        max_len=96, max_new_tokens=56, threads=1, seed=3))
    planned = 8  # ceil(2 epochs x 32 rows / 8 rows a step)
    assert json.loads((out / "config.json").read_text())["steps"] == planned
    evals, metrics = read_jsonl(out / "eval.jsonl"), read_jsonl(out / "metrics.jsonl")
    ran = result["early_stop"]
    assert ran == 3 and [m["step"] for m in metrics] == list(range(1, ran + 1))
    assert [e["step"] for e in evals] == list(range(1, ran + 1))
    losses = [e["val_loss"] for e in evals]
    assert all(e["val_rows"] == 8 and e["val_tokens"] > 8 * 50 for e in evals)  # every row, the full trace each
    assert losses[:2] == seen[:2] and losses[0] > losses[1] and losses[2] == seen[2] + 1  # step 2: the best
    assert not list(out.glob("eval_step_*.json"))  # --select val_loss: no generation
    printed = capsys.readouterr().out
    assert f"early stop at step {ran} of {planned}: val_loss has not improved for 1 evaluations" in printed
    assert f"eval  step 1: val_loss {losses[0]:.4f}" in printed
    assert (out / "latest").read_text() == f"step_{ran:06d}"
    # warmup round(0.25 x 8) = 2 steps: lr/2 then lr, then the cosine
    assert [m["lr"] for m in metrics[:2]] == [pytest.approx(5e-3), pytest.approx(1e-2)]

    best_step = evals[losses.index(min(losses))]["step"]
    best = json.loads((out / "best.json").read_text())
    assert best["select"] == "val_loss" and best["step"] == best_step and best["value"] == min(losses)
    kept = load_file(out / "best" / "model.safetensors")
    at_best = load_file(out / f"step_{best_step:06d}" / "model" / "model.safetensors")
    assert kept.keys() == at_best.keys() and all(torch.equal(kept[k], at_best[k]) for k in kept)

    init, last = load_file(task.init_checkpoint / "model.safetensors"), load_file(
        out / f"step_{ran:06d}" / "model" / "model.safetensors")
    connector = [k for k in init if k.startswith("multi_modal_projector.")]
    assert connector and all((last[k] - init[k]).abs().max() > 1e-4 for k in connector)
    assert all(torch.equal(last[k], init[k]) for k in init if k not in connector)


def test_stage_flags_are_checked(task):
    with pytest.raises(UsageError, match="--epochs is for --stage sft"):
        T.TrainConfig(stage="grpo", epochs=2)
    with pytest.raises(UsageError, match="--select val_loss and --patience are for --stage sft"):
        T.TrainConfig(stage="grpo", eval_data="held.jsonl", select="val_loss")
    with pytest.raises(UsageError, match="--select val_loss and --patience need --eval_data"):
        TR.check_paths(T.TrainConfig(init_from=str(task.init_checkpoint), data=str(task.train_jsonl), stage="sft",
                                     patience=2))
    assert T.TrainConfig(steps=200, warmup_ratio=0.03).warmup == 6 and T.TrainConfig(warmup_steps=4).warmup == 4
