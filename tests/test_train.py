"""train_rl.py: the GRPO loss against a hand computation and an fp64 autograd oracle, one process vs two (torchrun,
gloo) on the same global batch, bitwise resume after SIGKILL, connector-only training, a learning test with the
rollout copy checked after every step, and bad input stopped before step 0."""
import json
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

import checkpoint as C
import data as D
import model as M
import parallel as P
import train_rl as T
import trainer as TR
import conftest
import grpo_fixed_rollout
from grid_task import GridTaskConfig, prepare

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """The default run's task at a small size: 64 train rows with SFT traces, 16 held-out, a random tiny VLM."""
    return prepare(tmp_path_factory.mktemp("grid"), GridTaskConfig(n_train=64, n_heldout=16))


def common(task, out) -> list[str]:
    return ["--init_from", str(task.init_checkpoint), "--data", str(task.train_jsonl), "--out", str(out),
            "--max_len", "96", "--max_new_tokens", "56", "--threads", "1", "--seed", "3"]


def launch(args: list[str], nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python train_rl.py ...`, or `torchrun --standalone --nproc_per_node=N train_rl.py ...`; must exit 0."""
    return conftest.finish(conftest.start(args, nproc), timeout=timeout)[0]


def start(args: list[str], nproc: int = 1, script: Path = REPO / "train_rl.py") -> subprocess.Popen:
    """`python SCRIPT ARGS`, or torchrun's on NPROC processes, in the background; its output (stderr too) read line
    by line as it comes, or collected by `finish`."""
    return conftest.start([script, *args], nproc, merge_output=True)


def finish(*runs: subprocess.Popen, timeout: int = 300) -> list[str]:
    """The outputs of runs `start`ed together; each must exit 0."""
    return [done.stdout for done in conftest.finish(*runs, timeout=timeout)]


def weights(run_dir: Path, step: int) -> dict:
    return load_file(run_dir / f"step_{step:06d}" / "model" / "model.safetensors")


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


# ---------------------------------------------------------------------------------------------------------------
# The loss


def cfg(**kw) -> T.LossConfig:
    return T.LossConfig(**{"clip_low": 0.2, "clip_high": 0.28, "dual_clip": 3.0, "tis_cap": 0.0} | kw)


# Two micro-batches of different lengths. Ratios are chosen to hit every branch (eps_low 0.2, eps_high 0.28, dual
# clip 3); per-token loss = max(-A r, -A clip(r, 0.8, 1.28)), then min(., 3|A|) when A < 0:
#   row A=+1   r=1.0 -> -1      r=1.5 -> -1.28 (clipped high)   r=0.5 -> -0.5 (below the band, A > 0: unclipped)
#   row A=-2   r=0.5 -> 1.6 (clipped low)   r=1.2 -> 2.4   r=4.0 -> 8 -> 6 (dual clip)   masked token
#   row A=+0.5 r=2.0 -> -0.64 (clipped high)   masked token
# Token-level mean over the 7 unmasked tokens of both micro-batches: (-2.78 + 10.0 - 0.64) / 7 = 0.94.
MB1 = dict(ratios=[[1.0, 1.5, 0.5, 1.0], [0.5, 1.2, 4.0, 1.7]], adv=[1.0, -2.0], mask=[[1, 1, 1, 0], [1, 1, 1, 0]])
MB2 = dict(ratios=[[2.0, 0.9]], adv=[0.5], mask=[[1, 0]])


def tensors(mb, seed):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(torch.tensor(mb["ratios"]).shape, generator=g, dtype=torch.float64) * 3
    logprobs = (old + torch.tensor(mb["ratios"], dtype=torch.float64).log()).requires_grad_()
    return logprobs, old, torch.tensor(mb["adv"], dtype=torch.float64), torch.tensor(mb["mask"], dtype=torch.float64)


def naive(logprobs, old, adv, mask, c: T.LossConfig, sampler=None, ref=None, entropy=None):
    """The same objective token by token, written out plainly (fp64)."""
    total = 0.0
    for b in range(logprobs.shape[0]):
        for t in range(logprobs.shape[1]):
            if not mask[b, t]:
                continue
            r = torch.exp(logprobs[b, t] - old[b, t])
            a = adv[b]
            loss = torch.maximum(-a * r, -a * r.clamp(1 - c.clip_low, 1 + c.clip_high))
            if a < 0 and c.dual_clip:
                loss = torch.minimum(loss, -a * c.dual_clip)
            if sampler is not None and c.tis_cap:
                loss = loss * min(float(torch.exp(old[b, t] - sampler[b, t])), c.tis_cap)
            if ref is not None:
                d = ref[b, t] - logprobs[b, t]
                loss = loss + c.kl_beta * (torch.exp(d) - d - 1)
            if entropy is not None:
                loss = loss - c.entropy_coef * entropy[b, t]
            total = total + loss
    return total


def test_grpo_loss_hand_computed():
    c = cfg()
    (lp1, old1, a1, m1), (lp2, old2, a2, m2) = tensors(MB1, 0), tensors(MB2, 1)
    s1, st1 = T.grpo_loss(lp1, old1, a1[:, None], m1, c)
    s2, st2 = T.grpo_loss(lp2, old2, a2[:, None], m2, c)
    tokens = st1.tokens + st2.tokens
    assert tokens == 7
    assert ((s1 + s2) / tokens).item() == pytest.approx(0.94, abs=1e-12)
    assert (st1.clipped_low, st1.clipped_high + st2.clipped_high) == (1, 2)
    ((s1 + s2) / tokens).backward()
    for lp, old, a, m in ((lp1, old1, a1, m1), (lp2, old2, a2, m2)):
        ref = lp.detach().clone().requires_grad_()
        (naive(ref, old, a, m, c) / tokens).backward()
        assert torch.allclose(lp.grad, ref.grad, atol=1e-12, rtol=0)
    # clipped tokens carry no gradient; unclipped ones carry -A r / N
    assert lp1.grad[0, 1] == 0 and lp1.grad[1, 0] == 0 and lp1.grad[1, 2] == 0 and lp2.grad[0, 0] == 0
    assert lp1.grad[0, 2].item() == pytest.approx(-1.0 * 0.5 / 7) and lp1.grad[1, 3] == 0  # masked


def test_grpo_loss_terms_match_naive_fp64():
    """Importance weights, k3 KL and the entropy bonus against the written-out formula, values and gradients."""
    c = cfg(tis_cap=2.0, kl_beta=0.05, entropy_coef=0.01)
    lp, old, adv, mask = tensors(MB1, 2)
    g = torch.Generator().manual_seed(3)
    sampler = old + torch.randn(old.shape, generator=g, dtype=torch.float64) * 0.8  # some weights hit the cap
    ref = old + torch.randn(old.shape, generator=g, dtype=torch.float64) * 0.3
    entropy = torch.rand(old.shape, generator=g, dtype=torch.float64).requires_grad_()
    got, _ = T.grpo_loss(lp, old, adv[:, None], mask, c, sampler, ref, entropy)
    got.backward()
    lp2, ent2 = lp.detach().clone().requires_grad_(), entropy.detach().clone().requires_grad_()
    want = naive(lp2, old, adv, mask, c, sampler, ref, ent2)
    want.backward()
    assert got.item() == pytest.approx(want.item(), abs=1e-12)
    assert torch.allclose(lp.grad, lp2.grad, atol=1e-12) and torch.allclose(entropy.grad, ent2.grad, atol=1e-12)
    assert (torch.exp(old - sampler) > 2)[mask.bool()].any()  # the cap is exercised


def test_advantages():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [2.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    a = T.group_advantages(r, use_std=True)
    want = torch.tensor([0.5, -0.5, -0.5, 0.5], dtype=torch.float64) / (1 / 3) ** 0.5  # Bessel-corrected std
    assert torch.allclose(a[0], want, atol=1e-5)
    assert (a[1] == 0).all()
    assert torch.allclose(T.group_advantages(r, use_std=False)[2], torch.tensor([1.0, -1.0, 0.0, 0.0],
                                                                           dtype=torch.float64))
    assert (T.group_advantages(torch.tensor([[3.0]]), use_std=True) == 0).all()  # a group of one

# ---------------------------------------------------------------------------------------------------------------
# One process vs two


def one_and_two(task, tmp_path, args: list[str]):
    """train_rl.py ARGS to TMP/two on two processes (torchrun) and meanwhile to TMP/one in pytest's process, without a
    start-up of its own (the caller takes the `in_process` fixture)."""
    two = start([*common(task, tmp_path / "two"), *args], nproc=2)
    conftest.in_this_process(T.main, [*common(task, tmp_path / "one"), *args])
    finish(two)


def test_sft_step_two_processes_match_one(task, tmp_path, in_process):
    one_and_two(task, tmp_path, ["--stage", "sft", "--train", "vit,connector,llm", "--steps", "1",
                                 "--prompts_per_step", "8", "--micro_batch", "3", "--lr", "1e-3"])
    same_step(tmp_path / "one", tmp_path / "two", task)


def same_step(one: Path, two: Path, task):
    """Same loss and pre-clip gradient norm (Adam's update is blind to a global gradient scale, so a wrong
    normalisation across ranks would only show here), and the same parameters after the step. Adam's first step
    moves a weight by lr * g / (|g| + eps): where g ~ eps float noise is amplified, hence lr 1e-3 below."""
    m1, m2 = (json.loads((run / "metrics.jsonl").read_text().splitlines()[0]) for run in (one, two))
    assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-6) and m1["grad_norm"] == pytest.approx(m2["grad_norm"],
                                                                                                   rel=1e-6)
    assert max_diff(weights(one, 1), weights(two, 1)) <= 1e-5
    assert max_diff(weights(one, 1), load_file(task.init_checkpoint / "model.safetensors")) > 1e-4  # it moved


def test_grpo_step_two_processes_match_one(task, tmp_path, in_process):
    """Fixed rollouts (two micro-batches per process of uneven size: token means across ranks and micro-batches),
    then the real sampler with fixed seeds."""
    driver = Path(grpo_fixed_rollout.__file__)
    args = ["--stage", "grpo", "--steps", "1", "--prompts_per_step", "6", "--micro_batch", "2", "--lr", "1e-3",
            "--tis_cap", "0", "--updates_per_rollout", "2"]
    real = ["--stage", "grpo", "--steps", "1", "--prompts_per_step", "4", "--group_size", "4", "--micro_batch", "4",
            "--lr", "1e-3", "--no-dynamic_sampling", "--temperature", "1.5"]
    # Four independent runs, each in an OUT of its own, at once: the one-process ones in pytest's process, without a
    # start-up of their own, while the two-process ones run.
    two = [start([*common(task, tmp_path / "fixed2"), *args], nproc=2, script=driver),
           start([*common(task, tmp_path / "real2"), *real], nproc=2)]
    conftest.in_this_process(grpo_fixed_rollout.main, [*common(task, tmp_path / "fixed1"), *args])
    conftest.in_this_process(T.main, [*common(task, tmp_path / "real1"), *real])
    finish(*two)
    same_step(tmp_path / "fixed1", tmp_path / "fixed2", task)
    m1, m2 = (json.loads((tmp_path / r / "metrics.jsonl").read_text()) for r in ("real1", "real2"))
    assert m1["rollout_tokens"] == m2["rollout_tokens"] and m1["response_len_max"] == m2["response_len_max"]
    assert m1["reward"] == pytest.approx(m2["reward"], rel=1e-12)  # the same samples, whichever process drew them
    same_step(tmp_path / "real1", tmp_path / "real2", task)

# ---------------------------------------------------------------------------------------------------------------
# Resume, frozen modules


def wait_for(proc: subprocess.Popen, line: str) -> list[str]:
    """The run's output up to and including `line` (blocking reads, no polling); fails if the run ends first."""
    seen = []
    for out in proc.stdout:
        seen.append(out.rstrip("\n"))
        if seen[-1] == line:
            return seen
    raise AssertionError(f"the run ended (exit {proc.wait()}) before printing {line!r}:\n" + "\n".join(seen[-30:]))


def test_resume_after_sigkill_is_bitwise(task, tmp_path, in_process):
    args = ["--stage", "grpo", "--steps", "4", "--save_every", "1", "--prompts_per_step", "4", "--group_size", "4",
            "--micro_batch", "8", "--lr", "1e-2", "--updates_per_rollout", "2", "--curriculum", "pass_rate",
            "--keep", "2"]
    cut = tmp_path / "cut"
    # The uninterrupted reference is independent of the cut run: it runs alongside the kill and the resume.
    reference = start([*common(task, tmp_path / "whole"), *args])
    proc = start([*common(task, cut), *args])
    wait_for(proc, f"saved {cut / 'step_000002'}")
    proc.kill()  # SIGKILL: no handler runs, whatever step 3 was doing is lost
    proc.wait()
    proc.stdout.close()
    assert (cut / "latest").read_text() == "step_000002" and not (cut / "step_000004").exists()
    conftest.in_this_process(T.main, [*common(task, cut), *args, "--resume"])  # no start-up of its own
    finish(reference)
    whole, resumed = weights(tmp_path / "whole", 4), weights(cut, 4)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert max_diff(whole, weights(tmp_path / "whole", 3)) > 1e-4  # the resumed steps did update
    kept = [json.loads(x)["kept_groups"] for x in (cut / "metrics.jsonl").read_text().splitlines()]
    assert all(k > 0 for k in kept[2:]), kept
    steps = [json.loads(x)["step"] for x in (cut / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # the steps after the last checkpoint are logged once, by the resumed run
    assert sorted(p.name for p in cut.glob("step_*")) == ["step_000003", "step_000004"]  # --keep 2


def test_sigterm_saves_and_exits(task, tmp_path):
    out = tmp_path / "run"
    proc = start([*common(task, out), "--stage", "sft", "--steps", "10000", "--prompts_per_step", "4",
                  "--micro_batch", "4"])
    next(line for line in proc.stdout if line.startswith("sft ") and " 1/10000 |" in line)  # step 1 is done
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, rest[-3000:]  # 128 + SIGTERM: saved, but not finished
    step = len((out / "metrics.jsonl").read_text().splitlines())
    assert (out / "latest").read_text() == f"step_{step:06d}" and step < 10000
    assert f"SIGTERM: saved {out / f'step_{step:06d}'} at step {step}; continue with --resume" in rest


def test_connector_only_changes_only_the_connector(task, tmp_path, in_process):
    conftest.in_this_process(T.main, [*common(task, tmp_path), "--stage", "sft", "--train", "connector", "--steps", "2",
                                      "--prompts_per_step", "4", "--micro_batch", "4", "--lr", "1e-2"])
    init, after = load_file(task.init_checkpoint / "model.safetensors"), weights(tmp_path, 2)
    connector = [k for k in init if k.startswith("multi_modal_projector.")]
    assert connector and all((after[k] - init[k]).abs().max() > 1e-4 for k in connector)
    assert all(torch.equal(after[k], init[k]) for k in init if k not in connector)

# ---------------------------------------------------------------------------------------------------------------
# Learning, in process, with the rollout copy checked after every refresh


def bandit_task(tmp: Path):
    """"pick ?" with an image; the right one-token answer is \\boxed{5} among 8 boxed digits: a random tiny model
    starts near chance and GRPO must find it."""
    tok = D.word_tokenizer(["pick", "?", *[f"\\boxed{{{k}}}" for k in range(8)]])
    config = M.tiny_config(tok.get_vocab_size(), tok.token_to_id(C.IMG_CONTEXT))
    C.save_model(M.VLM.from_config(config, seed=4), tmp / "init", layout="native")
    tok.save(str(tmp / "init" / "tokenizer.json"))
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (56, 56, 3), dtype=np.uint8)).save(tmp / "im.png")
    rows = [dict(id=f"b{i}", question="pick ?", answer="5", answer_type="numeric", image="im.png") for i in range(16)]
    (tmp / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp / "init", tmp / "rows.jsonl"


def test_grpo_learns_and_the_rollout_copy_follows(tmp_path, in_process, monkeypatch):
    init, rows = bandit_task(tmp_path)
    checks, snapshots = [], []
    original = P.refresh

    def checked_refresh(copy, units, tp=None):
        original(copy, units, tp)
        full = get_model_state_dict(units[-1], options=StateDictOptions(full_state_dict=True))
        checks.append(all(torch.equal(full[k], v) for k, v in copy.state_dict().items()))
        snapshots.append(copy.language_model.layers[0].mlp.up_proj.weight.clone())

    monkeypatch.setattr(TR, "refresh", checked_refresh)
    steps = 8
    T.train(T.TrainConfig(init_from=str(init), data=str(rows), out=str(tmp_path / "out"), steps=steps,
                          prompts_per_step=8, group_size=8, micro_batch=64, max_new_tokens=1, max_len=32, lr=2e-2,
                          accuracy_weight=1.0, format_weight=0.0, overlong_buffer=0, threads=1))
    metrics = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    rewards = [m["reward"] for m in metrics]
    assert len(rewards) == steps and np.mean(rewards[:2]) < 0.3 and np.mean(rewards[-3:]) > 0.7, rewards
    assert len(checks) == steps + 1 and all(checks)  # after loading and after every step
    updated = [m["kept_groups"] > 0 for m in metrics]  # a step whose groups all agree has nothing to learn from
    assert sum(updated) >= 3
    assert [not torch.equal(a, b) for a, b in zip(snapshots, snapshots[1:])] == updated  # the copy follows

def test_reward_failures_score_zero_and_training_goes_on(tmp_path, in_process, monkeypatch):
    init, rows = bandit_task(tmp_path)
    calls = []
    original = T.reward.score_batch

    def failing(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("pool died")
        return original(*args, **kw)

    monkeypatch.setattr(T.reward, "score_batch", failing)
    T.train(T.TrainConfig(init_from=str(init), data=str(rows), out=str(tmp_path / "out"), steps=3,
                          prompts_per_step=4, group_size=4, micro_batch=16, max_new_tokens=1, max_len=32,
                          accuracy_weight=1.0, format_weight=0.0, overlong_buffer=0, threads=1, dynamic_sampling=False))
    metrics = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["reward_errors"] for m in metrics] == [0, 16, 0] and metrics[1]["reward"] == 0.0


def test_pass_rate_curriculum_orders_easy_to_hard():
    stream = D.PromptStream(n=6, seed=0, curriculum="pass_rate")
    first = stream.take(6)
    assert sorted(first) == list(range(6))  # nothing known yet: the seeded permutation
    stream.record([(0, 8, 8), (1, 6, 8), (2, 0, 8), (3, 3, 8), (3, 1, 8)])  # row 3: 4 / 16
    second = stream.take(2)
    unseen = [i for i in first if i in (4, 5)]
    state = stream.state()
    stream.record([(5, 8, 8), (4, 0, 8)])  # later results reorder the next epoch, not this one
    assert second + stream.take(3) == [1, *unseen, 3, 2]  # 0.75, unseen (0.5, permutation order), 0.25, 0; no row 0
    resumed = D.PromptStream(n=6, seed=0, curriculum="pass_rate")
    resumed.load(state)
    assert resumed.take(3) == [unseen[1], 3, 2] and resumed.epoch == 1


# ---------------------------------------------------------------------------------------------------------------
# Bad input and non-finite steps


def test_bad_input_fails_before_step_0(task, tmp_path, in_process):
    base = T.TrainConfig(init_from=str(task.init_checkpoint), data=str(task.train_jsonl), out=str(tmp_path / "o"),
                         threads=1)
    with pytest.raises(FileNotFoundError, match="--init_from: checkpoint directory not found: .*nowhere"):
        T.train(T.TrainConfig(**{**base.__dict__, "init_from": str(tmp_path / "nowhere")}))
    lines = task.train_jsonl.read_text().splitlines()
    bad = tmp_path / "bad" / "rows.jsonl"
    (bad.parent / "images").mkdir(parents=True)
    (bad.parent / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    row = json.loads(lines[0])
    broken = {**row, "id": "broken", "image": "images/broken.png"}
    bad.write_text("\n".join([json.dumps({**row, "image": str(task.train_jsonl.parent / row["image"])}),
                              "{not json", json.dumps({**row, "id": "x", "answer": None}), json.dumps(broken)]) + "\n")
    with pytest.raises(D.DataError) as e:
        T.train(T.TrainConfig(**{**base.__dict__, "data": str(bad)}))
    msg = str(e.value)
    assert f"{bad}:2: malformed JSON" in msg and f"{bad}:3: answer is null" in msg and f"{bad}:4: cannot read image" \
        in msg
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


def test_non_finite_loss_is_skipped(task, tmp_path, in_process, monkeypatch):
    """A NaN at step 2 leaves the weights as they were after step 1; three in a row save and stop."""
    step, poison = [0], {2}
    original_forward, original_sft = TR.Policy.forward, T.sft_step

    def poisoned(policy, mb, temperature=1.0, model=None):
        logprobs, entropy = original_forward(policy, mb, temperature, model)
        return (logprobs * float("nan"), entropy) if step[0] in poison else (logprobs, entropy)

    def counting_sft(run, n):
        step[0] = n
        return original_sft(run, n)

    monkeypatch.setattr(TR.Policy, "forward", poisoned)
    monkeypatch.setattr(T, "sft_step", counting_sft)
    base = dict(init_from=str(task.init_checkpoint), data=str(task.train_jsonl), stage="sft",
                train="vit,connector,llm", prompts_per_step=4, micro_batch=4, lr=1e-2, save_every=1, threads=1,
                max_len=96)
    T.train(T.TrainConfig(out=str(tmp_path / "a"), steps=3, **base))
    metrics = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped"] for m in metrics] == [False, True, False]
    w1, w2, w3 = (weights(tmp_path / "a", s) for s in (1, 2, 3))
    assert all(torch.equal(w1[k], w2[k]) for k in w1) and max_diff(w2, w3) > 0
    poison.update({3, 4, 5})
    with pytest.raises(RuntimeError, match="3 non-finite steps in a row at step 4"):
        T.train(T.TrainConfig(out=str(tmp_path / "b"), steps=8, **base))
    assert (tmp_path / "b" / "latest").read_text() == "step_000004"
