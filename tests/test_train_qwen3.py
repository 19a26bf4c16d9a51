"""train_rl.py on an InternVL3.5-shaped model (Qwen3 LLM: q/k-norm, head_dim != hidden / heads, no qkv bias): one SFT
step and one GRPO step (the real sampler) on two processes (torchrun, gloo) equal one process, with test_train.py's
helpers on the grid task whose init checkpoint is replaced by a tiny native InternVL3.5.

    python -m pytest -q tests/test_train_qwen3.py
"""
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

import checkpoint as C
import model as M
from grid_task import GridTaskConfig, prepare
from test_train import one_and_two, same_step


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """The grid task's data and tokenizer with a random tiny InternVL3.5 (native layout) as the init checkpoint; its
    q_norm/k_norm weights are perturbed so that a step that mishandled them could not hide behind all-ones."""
    grid = prepare(tmp_path_factory.mktemp("grid"), GridTaskConfig(n_train=64, n_heldout=16))
    base = C.read_config(grid.init_checkpoint)
    llm = replace(base.llm, head_dim=24, qk_norm=True, qkv_bias=False, o_bias=False)
    config = replace(base, llm=llm, layout="native", source={}, source_dir=str(grid.init_checkpoint))
    model = M.VLM.from_config(config, seed=5)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    init = grid.out_dir / "init_qwen3"
    C.save_model(model, init, layout="native")  # the tokenizer comes along from source_dir
    assert C.load_model(init).config.llm == llm and (init / "tokenizer.json").is_file()
    return SimpleNamespace(init_checkpoint=init, train_jsonl=grid.train_jsonl)


# Half test_train's lr: behind the k-norm, more k_proj gradient entries sit near Adam's eps, where the two worlds'
# different summation order is amplified into the first update (same_step's docstring); the update still moves.
LR = "5e-4"


def test_sft_step_two_processes_match_one(task, tmp_path, in_process):
    args = ["--stage", "sft", "--train", "vit,connector,llm", "--steps", "1", "--prompts_per_step", "8",
            "--micro_batch", "3", "--lr", LR]
    one_and_two(task, tmp_path, args)
    same_step(tmp_path / "one", tmp_path / "two", task)


def test_grpo_step_two_processes_match_one(task, tmp_path, in_process):
    args = ["--stage", "grpo", "--steps", "1", "--prompts_per_step", "4", "--group_size", "4", "--micro_batch", "4",
            "--lr", LR, "--no-dynamic_sampling", "--temperature", "1.5"]
    one_and_two(task, tmp_path, args)
    same_step(tmp_path / "one", tmp_path / "two", task)
