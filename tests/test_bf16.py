"""The GPU run's dtypes exercised on a CPU: parallel.precision decides every dtype, and `--precision bf16` trains
with what a CUDA run uses (FSDP2 mixed precision with bf16 parameters and fp32 gradient reduction over fp32 masters,
a bf16 rollout copy, a bf16 KV pool) in two processes under gloo, on the learning test's bandit task.

gloo (torch 2.13) has every collective this needs: the bf16 all-gather of the parameters, the fp32 reduce-scatter of
the gradients (bf16 reduce-scatter and all-reduce work too), so nothing here falls back to a world of one.

    python -m pytest -q tests/test_bf16.py
"""
import json
import math

import numpy as np
import torch

import parallel as P
import trainer as TR
from test_train import bandit_task, launch

BF16, FP32 = torch.bfloat16, torch.float32


def test_precision_decides_every_dtype():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    gpu_run = P.Precision(param_dtype=BF16, reduce_dtype=FP32, rollout_dtype=BF16, kv_dtype=BF16, host_dtype=BF16)
    assert P.precision(cuda) == P.precision(cuda, "bf16") == P.precision(cpu, "bf16") == gpu_run
    assert P.precision(cpu) == P.precision(cpu, "fp32") == P.precision(cuda, "fp32") == P.Precision(*[FP32] * 5)
    mp = gpu_run.mp_policy()
    assert (mp.param_dtype, mp.reduce_dtype) == (BF16, FP32)
    mp = P.precision(cpu).mp_policy()  # fp32: no casts at all, so fp64 test models stay fp64
    assert (mp.param_dtype, mp.reduce_dtype) == (None, None)


def test_bf16_setup_on_cpu(tmp_path, in_process):
    """--precision bf16 reaches every place that picks a dtype: the FSDP units' policy, the fp32 masters, the
    rollout copy and the sampler's KV pool."""
    init, rows = bandit_task(tmp_path)
    cfg = TR.TrainConfig(init_from=str(init), data=str(rows), out=str(tmp_path / "out"), prompts_per_step=2,
                         group_size=2, max_new_tokens=4, max_len=32, threads=1, precision="bf16")
    run = TR.setup(cfg, P.init_distributed())
    policies = {(u._get_fsdp_state()._mp_policy.param_dtype, u._get_fsdp_state()._mp_policy.reduce_dtype)
                for u in run.policy.units}
    assert policies == {(BF16, FP32)}
    assert {p.dtype for p in run.policy.model.parameters()} == {FP32}
    assert {p.dtype for p in run.policy.rollout_model.parameters()} == {BF16}
    assert {t.dtype for t in [*run.sampler.pool.k, *run.sampler.pool.v]} == {BF16}  # one tensor a layer


def test_grpo_learns_in_bf16_two_processes(tmp_path):
    """The learning test's bandit, with 4-token responses so that decoding reads the bf16 KV pool: the reward rises
    as in fp32 (measured: 0.08 -> 1.0 in both) and the sampler/trainer log-prob gap is logged, finite and small.
    fp32 on a CPU gives gaps of ~1e-7 (the same kernels on both sides); bf16 gave means up to 2.4e-3 and at most 3e-2,
    from decoding out of the bf16 KV pool against the trainer's full forward (with 1-token responses bf16 also gives
    ~1e-7), so a largest gap above 1e-5 shows that bf16 really ran."""
    init, rows = bandit_task(tmp_path)
    steps = 10
    launch(["train_rl.py", "--init_from", str(init), "--data", str(rows), "--out", str(tmp_path / "out"),
            "--steps", str(steps), "--prompts_per_step", "8", "--group_size", "8", "--micro_batch", "64",
            "--max_new_tokens", "4", "--max_len", "32", "--lr", "2e-2", "--accuracy_weight", "1", "--format_weight",
            "0", "--overlong_buffer", "0", "--threads", "1", "--precision", "bf16"], nproc=2)
    metrics = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    rewards = [m["reward"] for m in metrics]
    assert len(rewards) == steps and np.mean(rewards[:2]) < 0.3 and np.mean(rewards[-3:]) > 0.7, rewards
    gaps = [(m["logprob_gap"], m["logprob_gap_max"]) for m in metrics]
    assert all(math.isfinite(g) and math.isfinite(g_max) and g <= g_max for g, g_max in gaps), gaps
    assert all(g < 0.1 and g_max < 1.0 for g, g_max in gaps), gaps
    assert max(g_max for _, g_max in gaps) > 1e-5, gaps
