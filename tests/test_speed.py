"""What makes train_rl.py fast, checked to change nothing but the cost: each prompt's tokens and tiles once for its
samples (loss and gradients equal the per-sample computation, fp64), token-budget micro-batches (equal to one big
batch, 1 and 2 processes), the GPU's bf16 configuration run on CPU, and the prepared GPU check's CPU dry run."""
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

import data as D
import model as M
import train_rl as T
from conftest import finish, in_this_process, start
from entropy import logprob_entropy_reference
from test_train import bandit_task
import token_budget_driver

REPO = Path(__file__).resolve().parent.parent
DRIVER = REPO / "tests" / "token_budget_driver.py"


@pytest.fixture
def fp64_head(monkeypatch):
    """The fused head keeps its softmax statistics in fp32 whatever the inputs (entropy.py); the full-logits
    reference is fp64 through, so an fp64 comparison sees the batching alone."""
    monkeypatch.setattr(M, "logprob_entropy", lambda h, w, t, temperature: logprob_entropy_reference(h, w, t,
                                                                                                     temperature))


def count_tiles(model: M.VLM, seen: list):
    """Wraps the tower's forward: every call's tile count goes to `seen`."""
    forward = model.vision_model.forward
    model.vision_model.forward = lambda pixels, **kw: seen.append(pixels.shape[0]) or forward(pixels, **kw)


def group_sequences(config, tok) -> list[D.Sequence]:
    """Three image prompts of 1, 3 and 2 tiles with 4 samples each (the group shares its prompt's tile tensor),
    responses of 1 to 30 tokens."""
    g = torch.Generator().manual_seed(1)
    image = config.image_token_id
    seqs = []
    for k, tiles in enumerate([1, 3, 2]):
        pixels = torch.randn(tiles, 3, 56, 56, generator=g, dtype=torch.float64)
        prompt = [10 + k, 9] + [image] * (tiles * config.tokens_per_tile) + [11, 12 + k]
        for j in range(4):
            n = int(torch.randint(1, 31, (1,), generator=g))
            response = torch.randint(9, config.llm.vocab_size, (n,), generator=g).tolist()
            seqs.append(D.Sequence(k, prompt, response, pixels, advantage=float(torch.randn(1, generator=g)),
                                   sampler_logprobs=(-torch.rand(n, generator=g, dtype=torch.float64)).tolist(),
                                   order=len(seqs)))
    return seqs


def grpo_loss_and_grads(model, batches, tokens: float):
    """The GRPO loss of `batches` (each: the model's inputs and the per-token tensors the loss takes), divided by
    `tokens`, and every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    total = 0.0
    for inputs, advantages, mask, sampler in batches:
        logprobs, _ = model(**inputs)
        loss, _ = T.grpo_loss(logprobs, logprobs.detach(), advantages, mask, T.TrainConfig().loss, sampler)
        (loss / tokens).backward()
        total += loss.item() / tokens
    return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def packed(mb: D.MicroBatch):
    return (dict(input_ids=mb.input_ids, pixel_values=mb.pixel_values, targets=mb.targets, positions=mb.positions,
                 cache=mb.attention, image_index=mb.image_index), mb.advantages, mb.mask, mb.sampler_logprobs)


def one_row(s: D.Sequence, pad: int):
    """The reference: the sequence alone in a row of its own, its own tiles, the model's plain causal forward."""
    row = D.right_pad([s.prompt], [s.response], pad)
    place = lambda v: row.place([v], torch.float64)
    return (dict(input_ids=row.input_ids, pixel_values=s.pixel_values, targets=row.targets), place(s.advantage),
            place(1.0), place(s.sampler_logprobs))


@pytest.mark.parametrize("frozen_tower", [False, True])
def test_prompt_once_per_group_equals_per_sample(tok, fp64_head, frozen_tower):
    """The packed micro-batch (each prompt's tokens and tiles once for its 4 samples) against each sequence in a
    row of its own: loss and every gradient, fp64, with a trainable and a frozen tower."""
    config = M.tiny_config(tok.get_vocab_size(), tok.token_to_id(D.IMG_CONTEXT))
    model = M.VLM.from_config(config, dtype=torch.float64, seed=2).train()
    if frozen_tower:
        model.vision_model.requires_grad_(False)
    seqs = group_sequences(config, tok)
    tokens = float(sum(len(s.response) for s in seqs))
    seen = []
    count_tiles(model, seen)
    mb = D.pack(seqs, torch.device("cpu"), torch.float64, False, config.image_token_id, config.tokens_per_tile)
    assert mb.pixel_values.shape[0] == 6 and mb.image_index.numel() == 6 * config.tokens_per_tile
    prompts = sum(len(s.prompt) - 1 for s in seqs[::4])
    assert mb.input_ids.shape == (1, prompts + tokens)  # each prompt once, no padding
    loss, grads = grpo_loss_and_grads(model, [packed(mb)], tokens)
    assert seen == [6]  # each prompt's tiles once, for its 4 samples
    seen.clear()
    want_loss, want = grpo_loss_and_grads(model, [one_row(s, D.pad_id(config)) for s in seqs], tokens)
    assert sum(seen) == 4 * 6
    assert abs(loss - want_loss) <= 1e-10 and grads.keys() == want.keys()
    assert all((grads[k] - want[k]).abs().max() <= 1e-10 for k in want)
    tower = [k for k in want if k.startswith("vision_model.")]
    assert (not tower) if frozen_tower else all(want[k].abs().max() > 0 for k in tower)
    assert all(want[k].abs().max() > 0 for k in want if k.startswith("mlp1."))


def test_packed_edge_cases_equal_one_row_each(tok, fp64_head):
    """Prompts that end on their image (the last prompt token, carried by every suffix, is an image token), a
    one-token prompt (no shared prefix), a sample with an empty response, and two prompts on one image tensor:
    each response's log-probs and entropies from the packed row equal its own row's (fp64)."""
    config = M.tiny_config(tok.get_vocab_size(), tok.token_to_id(D.IMG_CONTEXT))
    model = M.VLM.from_config(config, dtype=torch.float64, seed=4).train()
    g = torch.Generator().manual_seed(2)
    rand = lambda n: torch.randint(9, config.llm.vocab_size, (n,), generator=g).tolist()
    image, per_tile = config.image_token_id, config.tokens_per_tile
    pixels = torch.randn(2, 3, 56, 56, generator=g, dtype=torch.float64)
    prompts = [(rand(3) + [image] * 2 * per_tile, pixels),  # ends on the image
               (rand(1), None),  # one token
               (rand(2) + [image] * 2 * per_tile + rand(2), pixels)]  # another question on the same tensor
    seqs = [D.Sequence(k, p, rand(n), px) for k, (p, px) in enumerate(prompts) for n in (5, 0, 9)]
    mb = D.pack(seqs, torch.device("cpu"), torch.float64, False, image, per_tile)
    assert mb.pixel_values.shape[0] == 2  # the shared tensor once
    got = model(mb.input_ids, mb.pixel_values, targets=mb.targets, positions=mb.positions, cache=mb.attention,
                image_index=mb.image_index)
    assert [s.row for s in mb.seqs] == [s.row for s in seqs]
    for s, logprob, entropy in zip(mb.seqs, *map(mb.layout.split, got)):
        row = D.right_pad([s.prompt], [s.response], D.pad_id(config))
        want = [row.split(x)[0] for x in model(row.input_ids, s.pixel_values, targets=row.targets)]
        assert logprob.shape == (len(s.response),)
        assert torch.allclose(logprob, want[0], rtol=0, atol=1e-12) and torch.allclose(entropy, want[1], rtol=0,
                                                                                         atol=1e-12)


def test_micro_batch_plan_keeps_groups_and_fills_the_budget(tok):
    config = M.tiny_config(tok.get_vocab_size(), tok.token_to_id(D.IMG_CONTEXT))
    seqs = group_sequences(config, tok)
    plan = D.micro_batch_plan(seqs, 64, max_tokens=200)
    assert sorted(s.order for b in plan for s in b) == list(range(len(seqs)))
    n = lambda s: len(s.prompt) + len(s.response)
    assert all(len(b) == 1 or len(b) * max(map(n, b)) <= 200 for b in plan)
    assert D.micro_batch_plan(seqs, 5) == [seqs[:5], seqs[5:10], seqs[10:]]  # unset: --micro_batch, in order
    whole = D.micro_batch_plan(seqs, 64, max_tokens=10 ** 6)
    rows = [s.row for s in whole[0]]
    runs = [r for i, r in enumerate(rows) if i == 0 or rows[i - 1] != r]
    assert len(whole) == 1 and sorted(runs) == [0, 1, 2]  # each prompt's samples side by side, longest group first
    longest = [max(n(s) for s in seqs if s.row == r) for r in runs]
    assert longest == sorted(longest, reverse=True)


def test_step_runs_each_prompt_through_the_tower_once(tmp_path, in_process, monkeypatch):
    """A whole GRPO step (8 prompts x 8 samples with images): the trainer's tower sees 8 tiles, not 64."""
    init, rows = bandit_task(tmp_path)
    seen = []
    features = M.VLM.image_features

    def counted(self, pixels):
        if self.training:  # the trainer's forward; the sampler's copy runs in eval mode
            seen.append(pixels.shape[0])
        return features(self, pixels)

    monkeypatch.setattr(M.VLM, "image_features", counted)
    for name, kw in (("count", dict(micro_batch=64)), ("budget", dict(micro_batch_tokens=4096))):
        seen.clear()
        T.train(T.TrainConfig(init_from=str(init), data=str(rows), out=str(tmp_path / name), steps=2,
                              prompts_per_step=8, group_size=8, max_new_tokens=1, max_len=32, format_weight=0.0,
                              overlong_buffer=0, threads=1, dynamic_sampling=False, **kw))
        assert seen == [8, 8], (name, seen)  # one tile per prompt, one forward per step
        metrics = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert all(0 < m["packed"] < 1 for m in metrics)  # 8 prompts run once each, not 64 times


def test_token_budget_equals_one_big_batch_on_1_and_2_processes(tmp_path, in_process, one_thread):
    """Prompts with 0-3 tiles and responses of 1-60 tokens: one micro-batch of everything vs budgets of 150 and
    400 padded tokens, on one process and on two (uneven micro-batch counts: dummies), fp64 through."""
    flags = lambda budget: ("--micro_batch_tokens", str(budget)) if budget else ()
    two = [start([DRIVER, tmp_path / f"2_{budget}.pt", *flags(budget)], 2) for budget in (150, 400)]
    for name, budget in (("big", None), ("1_150", 150)):  # meanwhile, the one-process legs without a start-up
        in_this_process(token_budget_driver.main, [tmp_path / f"{name}.pt", *flags(budget)])
    finish(*two)
    big = torch.load(tmp_path / "big.pt")
    assert big["batches"] == 1
    for name in ("1_150", "2_150", "2_400"):
        got = torch.load(tmp_path / f"{name}.pt")
        assert got["batches"] >= 2
        assert abs(got["loss"] - big["loss"]) <= 1e-10, name
        assert all((got["grads"][k] - big["grads"][k]).abs().max() <= 1e-10 for k in big["grads"]), name
    assert all(g.abs().max() > 0 for g in big["grads"].values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is what a machine without CUDA does")
def test_gpu_check_dry_runs_on_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    out = subprocess.run(["bash", str(REPO / ".ci" / "gpu")], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    report = (tmp_path / "gpu_report.md").read_text()
    for part in ("CUDA tests", "bench.py entropy", "bench.py rollout", "bench.py train"):
        assert f"## {part}" in report and f"{part}" in out.stdout
    assert report.count("skipped (no CUDA device)") == out.stdout.count("skipped (no CUDA device)") == 4


def test_decode_compile_default_follows_the_device_the_run_and_the_toolchain(monkeypatch):
    """--compile unset: CUDA compiles; a CPU compiles a GRPO run long enough to pay the compile back, and only where
    inductor builds kernels; --compile / --no-compile decide whatever the run."""
    import torch._inductor.config as inductor_config
    import trainer as TR
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    long = dict(stage="grpo", steps=200, max_new_tokens=512)
    assert TR.CPU_COMPILE_DECODE_STEPS <= 200 * 512
    probes = []
    monkeypatch.setattr(TR, "inductor_builds", lambda: probes.append(1) or None)
    assert TR.decode_compile(T.TrainConfig(**long), cpu)[0] and len(probes) == 1
    assert TR.decode_compile(T.TrainConfig(**long), cuda)[0] and TR.decode_compile(T.TrainConfig(compile=True), cpu)[0]
    short = TR.decode_compile(T.TrainConfig(stage="grpo", steps=2, max_new_tokens=64), cpu)
    assert short == (False, f"eager (a CPU compile pays back past {TR.CPU_COMPILE_DECODE_STEPS:,} decode steps, this "
                            f"run plans 128: --compile to compile anyway)")
    assert not TR.decode_compile(T.TrainConfig(**long | dict(stage="sft", group_size=1)), cpu)[0]
    assert TR.decode_compile(T.TrainConfig(**long, compile=False), cuda) == (False, "eager")
    assert len(probes) == 1  # only the long CPU run asked the toolchain
    monkeypatch.setattr(TR, "inductor_builds", lambda: "InvalidCxxCompiler: none found")
    assert TR.decode_compile(T.TrainConfig(**long), cpu) == (
        False, "eager (inductor cannot build kernels here: InvalidCxxCompiler: none found)")
    monkeypatch.undo()
    torch._dynamo.reset()
    with inductor_config.patch({"cpp.cxx": (str(REPO / "no-such-compiler"),), "fx_graph_cache": False}):
        assert "InvalidCxxCompiler" in TR.inductor_builds()  # the real probe, failing
