"""GRPO post-training of an InternVL / Skywork-R1V VLM under torchrun with FSDP2: cold-start SFT, GRPO, the
connector-only stage, exact resume, held-out evaluation and entropy-based checkpoint selection.

The Skywork-R1V3 recipe (Shen et al. 2025): (1) cold-start SFT on reasoning traces, (2) GRPO with an accuracy and a
format reward while the connector stays trainable, (3) a supervised connector-only stage (`--stage sft --train
connector --epochs 2 --schedule cosine --warmup_ratio 0.03 --eval_data VAL --patience P --select val_loss`: early
stopping on the teacher-forced validation loss); RL checkpoints are picked by the entropy of the policy at
reflective ("critical") tokens. GRPO after Shao et al. 2024 (DeepSeekMath).
Sharding after torchtitan (parallel.py). This file is the recipe and the loop; what a run is made of (its settings,
the policy and its optimizer, the data, the checks before step 0, resuming, held-out evaluation, logging) is in
trainer.py.

    python train_rl.py                                    # no --data / --init_from: the tiny CPU default run
    python train_rl.py --init_from CKPT --data train.jsonl --eval_data held.jsonl --out out/grpo
    torchrun --nproc_per_node=8 train_rl.py --init_from InternVL3-8B --data k12.jsonl --eval_data mmmu_dev.jsonl \\
        --out out/r1v --max_new_tokens 8192 --max_len 12288 --system "You are a helpful assistant." --compile

Defaults: R1V3's where its report states them (Shen et al. 2025, section 3.3): reward 0.8 accuracy + 0.2 format,
accuracy = a rule check OR an LLM verifier (`--verifier CKPT`); symmetric clip 0.2 (it found DAPO's clip-higher gave
"severe instability and anomalous gradient norms"); no KL; one gradient step per rollout; 32 prompts x 32 samples;
lr 1e-5; no dynamic sampling (it stabilised training but did not improve validation). The ViT trains only when
asked (`--train vit,connector,llm`, as R1V3 does, memory permitting: plan.py). What the report leaves open follows
DAPO (Yu et al. 2025) or common practice, each a flag:
- Token-level mean over every response token of the whole step (all ranks, all micro-batches), not a per-sequence
  mean (which favours short responses); the std normalisation of advantages switchable (`--no-adv_std` is Dr. GRPO).
- DAPO's soft overlong penalty over the last `--overlong_buffer` tokens; `--mask_truncated` drops truncated
  completions from the loss.
- Dual clip (`--dual_clip 3`: a negative-advantage token's loss is capped at 3|A|), a guard against exploding ratios.
- Truncated importance sampling (`--tis_cap 2`): the sampler (bf16 copy, KV cache) and the trainer (FSDP, fused
  head) compute slightly different probabilities; each token's loss is weighted by min(p_trainer / p_sampler, 2).
- DAPO's clip-higher (`--clip_high 0.28`) and dynamic sampling (`--dynamic_sampling`: groups whose rewards are all
  equal carry no signal and are dropped; more prompts are rolled out until `--prompts_per_step` groups are kept or
  `--max_rounds` is hit) are options; the CPU default run uses both, as calibrated.
- Old log-probs: with one update per rollout the trainer's own detached log-probs (the ratio is 1 and the clip never
  acts); with several (`--updates_per_rollout`), recomputed once before the first update.
- The sampler draws from the full vocabulary (top_p 1, top_k 0), so its log-probs are the behaviour probabilities.
"""

import json
import math
import os
import runpy
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

import cli
import reward
import verifier
from cli import Stopped
from data import Example, MicroBatch, Sequence, decode_response, mix_seed
from entropy import EntropySums, critical_entropy
from parallel import (Dist, all_gather, all_max, all_sum, init_distributed, process_group, set_threads,
                      summed_over_ranks)
from rollout import Completion, Request
from rundir import check_out, distributed_lock, newest_checkpoint, resume_from, save_checkpoint
from trainer import (LossConfig, Run, TrainConfig, check_paths, data_file, epoch_steps, heldout, log_line, mfu,
                     peak_memory_mb, restore_patience, resume, resumed_settings, setup, training_state, wandb_run)

# -----------------------------------------------------------------------------------------------------------------
# Losses and advantages. Losses return the SUM of per-token losses over the micro-batch; the caller divides by the
# number of response tokens of the whole step across ranks and multiplies by the world size (FSDP averages
# gradients over ranks).


@dataclass
class UpdateStats:
    """Sums over the response tokens of an update (add across micro-batches, then across ranks)."""
    tokens: float = 0.0  # response tokens counted in the loss
    clipped_low: float = 0.0  # tokens with A < 0 whose ratio fell below 1 - eps_low (no gradient)
    clipped_high: float = 0.0  # tokens with A > 0 whose ratio rose above 1 + eps_high (no gradient)
    kl: float = 0.0  # sum of the k3 estimate
    gap: float = 0.0  # sum of |trainer - sampler| log-prob before the update
    gap_max: float = 0.0  # largest such gap (reduced with max, not sum)
    entropy: EntropySums = field(default_factory=EntropySums)  # the policy's entropy, before the update
    positions: float = 0.0  # token positions the forwards ran (packed: each prompt once per micro-batch)
    unpacked: float = 0.0  # prompt + response tokens of the sequences: what one row per sequence would run

    def __add__(self, o: "UpdateStats") -> "UpdateStats":
        """Field by field: sums, except gap_max (the larger of the two)."""
        add = lambda name, a, b: max(a, b) if name == "gap_max" else a + b
        return UpdateStats(**{f.name: add(f.name, getattr(self, f.name), getattr(o, f.name)) for f in fields(self)})


def grpo_loss(logprobs, old_logprobs, advantages, mask, cfg: LossConfig, sampler_logprobs=None, ref_logprobs=None,
              entropy=None) -> tuple[torch.Tensor, UpdateStats]:
    """PPO-clip with clip-higher and dual clip, per token; all (B, T) (advantages may broadcast: (B, 1) per
    sequence). mask is 1 on the response tokens that count. sampler_logprobs give the truncated importance weight
    min(exp(old - sampler), tis_cap); ref_logprobs the k3 KL term; entropy the bonus."""
    adv = advantages
    ratio = torch.exp(logprobs - old_logprobs)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high) * adv)
    loss = -surrogate
    if cfg.dual_clip > 0:  # for A < 0 an exploding ratio would give an unbounded loss: cap it at dual_clip * |A|
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * cfg.dual_clip), loss)
    if sampler_logprobs is not None and cfg.tis_cap > 0:
        loss = loss * torch.exp(old_logprobs - sampler_logprobs).clamp(max=cfg.tis_cap).detach()
    kl = torch.zeros_like(loss)
    if ref_logprobs is not None:
        delta = ref_logprobs - logprobs
        kl = torch.exp(delta) - delta - 1  # k3: unbiased, always >= 0
        loss = loss + cfg.kl_beta * kl
    if entropy is not None and cfg.entropy_coef:
        loss = loss - cfg.entropy_coef * entropy
    mask = mask.to(loss.dtype)
    with torch.no_grad():
        stats = UpdateStats(tokens=mask.sum().item(),
                            clipped_low=((adv < 0) & (ratio < 1 - cfg.clip_low)).mul(mask).sum().item(),
                            clipped_high=((adv > 0) & (ratio > 1 + cfg.clip_high)).mul(mask).sum().item(),
                            kl=(kl * mask).sum().item())
    return (loss * mask).sum(), stats


def group_advantages(rewards: torch.Tensor, use_std: bool, eps: float = 1e-6) -> torch.Tensor:
    """(groups, G) rewards -> advantages: minus the group mean, over the group std when `use_std` (Dr. GRPO drops
    it). A group of one has no spread: advantage 0."""
    centred = rewards - rewards.mean(-1, keepdim=True)
    if not use_std or rewards.shape[-1] < 2:
        return centred
    return centred / (rewards.std(-1, keepdim=True) + eps)


# -----------------------------------------------------------------------------------------------------------------
# A GRPO step: roll out a group per prompt on the live weights, score, compute advantages, keep the informative
# groups, then the clipped loss and an optimizer step per mini-batch. The helpers it calls follow it.


def grpo_step(run: Run, step: int) -> dict:
    cfg, t0 = run.cfg, time.perf_counter()
    kept: dict[tuple[int, int], list[Sequence]] = {}  # (round, position in the round's global order) -> group
    stats = RolloutStats()
    for rnd in range(cfg.max_rounds):
        prompts = take_prompts(run, step, rnd)  # this rank's share of the round's global order
        something_to_train(run, step, len(prompts))
        groups = run.generate([p.request for p in prompts], num_samples=cfg.group_size,
                              max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=1.0, top_k=0,
                              progress=progress_line(run, step))  # rollout
        scores = score(run, prompts, groups)  # reward
        advantages = group_advantages(scores.reward, cfg.adv_std)  # advantages
        kept |= informative_groups(prompts, groups, scores, advantages, rnd, cfg.dynamic_sampling)  # group filter
        stats.add(groups, scores, run.sampler.stats["seconds"])
        record_pass_rates(run, prompts, scores)
        if not cfg.dynamic_sampling or all_sum(len(kept), device=run.proc.device)[0] >= cfg.prompts_per_step:
            break
    stats.rounds, stats.kept = rnd + 1, len(kept)
    seqs = first_in_global_order(kept, cfg.prompts_per_step, cfg.group_size)
    t1 = time.perf_counter()
    before = old_logprobs(run, seqs) if cfg.updates_per_rollout > 1 else None  # the trainer's, pre-update
    t2 = time.perf_counter()
    results, update = [], UpdateStats()
    for part in [[s for s in seqs if s.order % cfg.updates_per_rollout == k] for k in range(cfg.updates_per_rollout)]:
        loss, part_stats = backward(run, part, grpo_loss_of(run, observe=before is None))  # loss
        results.append(run.policy.step(loss, cfg.grad_clip, run.proc.rank))  # optimizer step
        update += part_stats
    run.policy.sync_rollout_model()
    update = summed_over_ranks(update if before is None else update + before, run.proc.device, maxima=("gap_max",))
    return (stats.metrics(run) | update_metrics(update, results)
            | dict(t_rollout=t1 - t0, t_logprob=t2 - t1, t_update=time.perf_counter() - t2))


def something_to_train(run: Run, step: int, mine: int):
    """Stopped (on every rank) when no rank has a row to train on in this step: every row drawn was skipped."""
    if all_sum(mine, device=run.proc.device)[0] == 0:
        raise Stopped(f"step {step}: every row drawn for it was skipped ({len(run.data.skipped)} of "
                      f"{len(run.data.rows)} rows of {run.cfg.data} cannot train; see the warning at setup): nothing "
                      f"to train on; fix the rows or raise --max_len")


@dataclass
class Prompt:
    """A prompt this rank samples a group for: its row, its place in the round's global order, its model input."""
    row: int
    position: int
    example: Example
    seed: int

    @property
    def request(self) -> Request:
        return Request(self.example.prompt_ids, self.example.pixel_values, seed=self.seed)


def take_prompts(run: Run, step: int, rnd: int) -> list[Prompt]:
    """The next prompts_per_step prompts of the global order, every world-th one on this rank, encoded; seeds from
    (run seed, step, round, row), so that the same prompts give the same samples under any number of processes."""
    cfg, proc = run.cfg, run.proc
    mine = list(enumerate(run.data.stream.take(cfg.prompts_per_step)))[proc.rank::proc.world]
    return [Prompt(i, pos, ex, mix_seed(cfg.seed, step, rnd, i)) for pos, i in mine
            if (ex := run.data.example(i, cfg, run.policy.rollout_model.config, proc.rank)) is not None]


@dataclass
class Scores:
    """Per prompt and sample (groups, G): reward components from reward.score_batch, and the scoring errors."""
    reward: torch.Tensor  # float64
    accuracy: torch.Tensor
    format: torch.Tensor
    errors: int


def score(run: Run, prompts: list[Prompt], groups: list[list[Completion]]) -> Scores:
    """reward.score_batch over every completion; a failure scores 0 with an error (counted in the metrics) and never
    stops training."""
    cfg, G = run.cfg, run.cfg.group_size
    flat = [(p, c) for p, group in zip(prompts, groups) for c in group]
    reward_cfg = reward.RewardConfig(cfg.accuracy_weight, cfg.format_weight, max_len=cfg.max_new_tokens,
                                     cache_len=cfg.overlong_buffer, overlong_weight=1.0 if cfg.overlong_buffer else 0.0)
    workers = cfg.reward_workers or (1 if (os.cpu_count() or 1) <= 4 else None)
    texts = [decode_response(run.data.tokenizer, c.ids, run.data.stop_ids, p.example.opens_think) for p, c in flat]
    judge = verifier.cached(cfg.verifier, run.proc.device) if cfg.verifier else None  # this rank's rollouts only
    try:
        results = reward.score_batch(texts, [run.data.rows[p.row] for p, _ in flat], reward_cfg,
                                     [len(c.ids) for _, c in flat], workers=workers, verifier=judge)
    except Exception as e:  # noqa: BLE001 - e.g. a broken worker pool: this batch scores 0, training goes on
        results = [{"accuracy": 0.0, "format": 0.0, "overlong": 0.0, "reward": 0.0, "error": f"score_batch: {e}"}
                   for _ in flat]
    table = lambda key: torch.tensor([r[key] for r in results], dtype=torch.float64).view(len(prompts), G)
    return Scores(table("reward"), table("accuracy"), table("format"), sum(r["error"] is not None for r in results))


def informative_groups(prompts: list[Prompt], groups: list[list[Completion]], scores: Scores,
                       advantages: torch.Tensor, rnd: int, dynamic_sampling: bool) -> dict:
    """{(round, position): the group's sequences} for the groups that carry signal: with dynamic sampling, those
    whose rewards are not all equal (equal rewards give zero advantage everywhere)."""
    out = {}
    for g, (p, group) in enumerate(zip(prompts, groups)):
        if dynamic_sampling and scores.reward[g].max() == scores.reward[g].min():
            continue
        out[rnd, p.position] = [Sequence(p.row, p.example.prompt_ids, c.ids, p.example.pixel_values,
                                         float(advantages[g, j]), c.logprobs, truncated=c.finish_reason == "length")
                                for j, c in enumerate(group)]
    return out


def record_pass_rates(run: Run, prompts: list[Prompt], scores: Scores):
    """Every rank records every prompt's pass rate, so the curriculum's order stays the same on all of them."""
    G = run.cfg.group_size
    for results in all_gather([(p.row, int(scores.accuracy[g].sum()), G) for g, p in enumerate(prompts)]):
        run.data.stream.record(results)


def first_in_global_order(kept: dict, k: int, group_size: int) -> list[Sequence]:
    """This rank's share of the first k kept groups in the global prompt order, whichever rank sampled them: the
    same groups are trained on under any number of processes. Each sequence learns its place in that order."""
    first = sorted(key for keys in all_gather(list(kept)) for key in keys)[:k]
    seqs = []
    for key in sorted(set(kept) & set(first)):
        for j, s in enumerate(kept[key]):
            s.order = first.index(key) * group_size + j
            seqs.append(s)
    return seqs


def progress_line(run: Run, step: int, every_s: float = 10.0):
    """For rank 0's sampler: a line every `every_s` seconds while a rollout runs (quiet for short ones); under
    --rollout_tp its counts are those of rank 0's group."""
    if run.proc.rank != 0:
        return None
    t0 = last = time.perf_counter()

    def show(done: int, total: int, tokens: int):
        nonlocal last
        now = time.perf_counter()
        if now - last >= every_s:
            last = now
            print(f"  step {step} rollout on rank 0: {done}/{total} samples done, {tokens} tokens, "
                  f"{tokens / (now - t0):.0f} tokens/s, {now - t0:.0f}s", flush=True)
    return show


def observed(mb: MicroBatch, logprobs: torch.Tensor, entropy: torch.Tensor, critical_ids) -> UpdateStats:
    """The pre-update policy against the sampler: log-prob gap and entropy (overall and at critical tokens)."""
    m = mb.mask > 0
    gap = (logprobs.detach() - mb.sampler_logprobs).abs()[m]
    return UpdateStats(gap=gap.sum().item(), gap_max=gap.max().item() if gap.numel() else 0.0,
                       entropy=critical_entropy(mb.targets, entropy.detach(), m, critical_ids))


def old_logprobs(run: Run, seqs: list[Sequence]) -> UpdateStats:
    """With several updates per rollout: each sequence's log-probs before any of them (the ratio's denominator)."""
    stats = UpdateStats()
    with torch.no_grad():
        for mb in run.batches(seqs):
            logprobs, entropy = run.policy.forward(mb, run.cfg.temperature)
            stats += observed(mb, logprobs, entropy, run.data.critical_ids)
            for s, lp in zip(mb.seqs, mb.layout.split(logprobs.cpu())):
                s.old_logprobs = lp
    return stats


def grpo_loss_of(run: Run, observe: bool):
    """The GRPO loss of one micro-batch (summed over its tokens) and its stats; `observe` adds the pre-update
    observations when no separate old-log-prob pass made them."""
    def loss_of(mb: MicroBatch, logprobs, entropy):
        ref = None
        if run.policy.reference is not None:
            with torch.no_grad():
                ref = run.policy.forward(mb, run.cfg.temperature, model=run.policy.reference)[0]
        old = mb.old_logprobs if mb.old_logprobs is not None else logprobs.detach()
        loss, stats = grpo_loss(logprobs, old, mb.advantages, mb.mask, run.cfg.loss, mb.sampler_logprobs, ref,
                                entropy)
        return loss, stats + observed(mb, logprobs, entropy, run.data.critical_ids) if observe else stats
    return loss_of


def backward(run: Run, seqs: list[Sequence], loss_of) -> tuple[float, UpdateStats]:
    """Forward and backward over this rank's micro-batches of `seqs`. The step's loss is a token-level mean over
    the response tokens of every rank: each micro-batch's summed loss is divided by the global token count and
    multiplied by the world size (FSDP averages gradients over ranks). Returns that loss, summed over ranks."""
    cfg, proc = run.cfg, run.proc
    weight = lambda s: 0.0 if cfg.mask_truncated and s.truncated else len(s.response)
    tokens = max(all_sum(sum(weight(s) for s in seqs), device=proc.device)[0], 1.0)
    total, stats = 0.0, UpdateStats()
    for mb in run.batches(seqs):
        logprobs, entropy = run.policy.forward(mb, cfg.temperature)
        loss, mb_stats = loss_of(mb, logprobs, entropy)
        (loss * proc.world / tokens).backward()
        total += loss.item() / tokens
        unpacked = sum(len(s.prompt) + len(s.response) for s in mb.seqs if s.weight)
        stats += mb_stats + UpdateStats(positions=mb.input_ids.numel(), unpacked=unpacked)
    return all_sum(total, device=proc.device)[0], stats


@dataclass
class RolloutStats:
    """Sums over this rank's sampled groups of a step, for the metrics."""
    reward: float = 0.0
    reward_sq: float = 0.0
    accuracy: float = 0.0
    format: float = 0.0
    length: float = 0.0
    truncated: float = 0.0
    errors: float = 0.0
    samples: float = 0.0
    groups: float = 0.0
    longest: float = 0.0  # reduced with max
    rounds: int = 0
    kept: float = 0.0
    generate_s: float = 0.0  # reduced with max: seconds inside the sampler's generate, without the reward

    def add(self, groups: list[list[Completion]], scores: Scores, generate_s: float):
        flat = [c for group in groups for c in group]
        self.generate_s += generate_s
        self.reward += scores.reward.sum().item()
        self.reward_sq += (scores.reward ** 2).sum().item()
        self.accuracy += scores.accuracy.sum().item()
        self.format += scores.format.sum().item()
        self.length += sum(len(c.ids) for c in flat)
        self.truncated += sum(c.finish_reason == "length" for c in flat)
        self.errors += scores.errors
        self.samples += len(flat)
        self.groups += len(groups)
        self.longest = max([self.longest] + [len(c.ids) for c in flat])

    def metrics(self, run: Run) -> dict:
        t = summed_over_ranks(self, run.proc.device, maxima=("longest", "rounds", "generate_s"))
        n = max(t.samples, 1)
        mean = t.reward / n
        return dict(reward=mean, reward_std=math.sqrt(max(0.0, t.reward_sq / n - mean ** 2)), accuracy=t.accuracy / n,
                    format=t.format / n, response_len=t.length / n, response_len_max=t.longest,
                    truncated=t.truncated / n, kept_groups=t.kept / max(t.groups, 1), reward_errors=int(t.errors),
                    rounds=int(t.rounds), rollout_tokens=int(t.length), skipped_rows=len(run.data.skipped),
                    t_generate=t.generate_s)


def update_metrics(u: UpdateStats, results: list[dict]) -> dict:
    """The update's metrics from its rank-summed stats and each optimizer step's result."""
    n = max(u.tokens, 1.0)
    return dict(loss=sum(r["loss"] for r in results) / len(results), grad_norm=results[-1]["grad_norm"],
                lr=results[-1]["lr"], skipped=any(r["skipped"] for r in results), clip_low=u.clipped_low / n,
                clip_high=u.clipped_high / n, kl=u.kl / n, entropy=u.entropy.mean,
                critical_entropy=u.entropy.critical_mean, logprob_gap=u.gap / max(u.entropy.num_tokens, 1),
                logprob_gap_max=u.gap_max, update_tokens=int(u.tokens), forward_tokens=int(u.positions),
                packed=u.positions / max(u.unpacked, 1.0))


# -----------------------------------------------------------------------------------------------------------------
# An SFT step: teacher-forced log-likelihood of the rows' responses


def sft_step(run: Run, step: int) -> dict:
    cfg, proc, t0 = run.cfg, run.proc, time.perf_counter()
    config = run.policy.rollout_model.config
    mine = run.data.stream.take(cfg.prompts_per_step)[proc.rank::proc.world]
    seqs = [Sequence(i, ex.prompt_ids, ex.response_ids, ex.pixel_values) for i in mine
            if (ex := run.data.example(i, cfg, config, proc.rank)) is not None]
    something_to_train(run, step, len(seqs))

    def loss_of(mb: MicroBatch, logprobs, entropy):
        mask = mb.mask > 0
        return -(logprobs * mb.mask).sum(), UpdateStats(tokens=mask.sum().item(),
                                                        entropy=EntropySums(total=entropy.detach()[mask].sum().item(),
                                                                            num_tokens=int(mask.sum())))

    loss, stats = backward(run, seqs, loss_of)
    result = run.policy.step(loss, cfg.grad_clip, proc.rank)
    stats = summed_over_ranks(stats, proc.device, maxima=("gap_max",))
    return result | dict(entropy=stats.entropy.mean, update_tokens=int(stats.tokens),
                         packed=stats.positions / max(stats.unpacked, 1.0),
                         forward_tokens=int(stats.positions), skipped_rows=len(run.data.skipped),
                         t_update=time.perf_counter() - t0)


# -----------------------------------------------------------------------------------------------------------------
# The loop


def train(cfg: TrainConfig) -> dict:
    """One stage from `init_from` to OUT/step_NNNNNN (the last is also OUT/latest); returns the last held-out
    evaluation (empty without --eval_data), where the final checkpoint is, and the step an early stop (--patience)
    ended at (None: none). With --epochs the steps are derived first (trainer.epoch_steps). OUT is locked while it runs.
    Stops with cli.Stopped when the weights become non-finite (nothing of that step is saved), after three
    non-finite steps in a row (saved first: their updates were dropped), and after a SIGTERM save (exit_code 143,
    128 + SIGTERM, so that a scheduler does not read the run as finished)."""
    proc = init_distributed()
    set_threads(cfg.threads, proc.world)
    torch.manual_seed(cfg.seed)
    check_paths(cfg)
    cfg = epoch_steps(cfg)
    out = Path(cfg.out)
    with distributed_lock(out):
        return train_locked(cfg, proc, out)


class Terminated(Stopped):
    """SIGTERM: the run saved and left; exit 143 (128 + SIGTERM), what a shell reports for a process it ended."""
    exit_code = 128 + signal.SIGTERM


class NonFinite(Stopped):
    """Non-finite weights, or three non-finite steps in a row."""


def train_locked(cfg: TrainConfig, proc: Dist, out: Path) -> dict:
    check_out(out, cfg.resume)  # a fresh run never writes into another run's directory
    newest = newest_checkpoint(out) if cfg.resume else None
    restart_stream = resumed_settings(cfg, newest, proc.rank) if newest and cfg.data else False
    run = setup(cfg, proc)
    config_json = json.dumps(asdict(cfg), indent=2) + "\n"
    saved_json = json.dumps(asdict(cfg) | {"data_file": data_file(cfg.data)}, indent=2) + "\n"  # step_N/config.json
    if proc.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        print(f"{cfg.stage} on {proc.world} process(es), {proc.device}, {torch.get_num_threads()} threads each; "
              f"decode step {run.decode}; {len(run.data.rows)} rows, {len(run.data.eval_rows)} held-out; config:\n"
              f"{config_json}", flush=True)
        cli.write_atomic(out / "config.json", config_json)  # this run's settings, resumed ones included
    start = 0
    if cfg.resume:  # the newest checkpoint that loads, falling back past broken ones (with a warning)
        previous, start = resume_from(out, lambda path: resume(run, path, restart_stream))
        if previous is None and proc.rank == 0:
            print(f"--resume: {out} holds no checkpoint yet; starting at step 0", flush=True)
        start = start or 0
        restore_patience(run, out, start)
    metrics_file = out / "metrics.jsonl"
    if proc.rank == 0:  # a killed run may have logged steps after its last checkpoint: those are about to rerun
        lines = metrics_file.read_text().splitlines() if metrics_file.is_file() else []
        kept = [x for x in lines if json.loads(x)["step"] <= start]
        if kept != lines or not metrics_file.is_file():
            cli.write_atomic(metrics_file, "".join(f"{x}\n" for x in kept))
    wandb = wandb_run(cfg) if proc.rank == 0 else None
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: setattr(run, "stopping", True))
    last_eval, saved, early_stop = {}, newest, None
    try:
        for step in range(start + 1, cfg.steps + 1):
            t0 = time.perf_counter()
            if proc.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(proc.device)
            m = grpo_step(run, step) if cfg.stage == "grpo" else sft_step(run, step)
            m |= dict(stage=cfg.stage, step=step, t_step=time.perf_counter() - t0,
                      peak_mem_mb=all_max(peak_memory_mb(proc.device), device=proc.device)[0])
            m["tokens_per_s"] = m.get("rollout_tokens", m["update_tokens"]) / m["t_step"]
            if (u := mfu(run, m)) is not None:
                m["mfu"] = u
            if proc.rank == 0:
                print(log_line(m, cfg.steps), flush=True)
                cli.append_jsonl(metrics_file, m)
                if wandb:
                    wandb.log(m, step=step)
            if not run.policy.weights_finite:  # later steps cannot bring them back: stop, saving nothing
                raise NonFinite(f"step {step}: the optimizer step left non-finite weights (loss {m['loss']}, grad "
                                f"norm {m['grad_norm']}); nothing of it was saved. Resume from the last checkpoint "
                                f"({saved or 'none yet: start again'}) with a lower --lr (--resume --lr ...)")
            stopping = bool(all_max(float(run.stopping), device=proc.device)[0])
            last = step == cfg.steps or stopping or run.policy.bad_steps >= 3
            if run.data.eval_rows and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
                last_eval = heldout(run, step)
                if cfg.patience and run.val_stale >= cfg.patience:  # the same on every rank: val_loss is reduced
                    early_stop, last = step, True
            if last or (cfg.save_every and step % cfg.save_every == 0):
                run.policy.sync_rollout_model()
                saved = save_checkpoint(out, step, proc, run.policy.model, run.policy.optimizer,
                                        training_state(run, step), run.policy.saved_copy(), saved_json, cfg.keep)
                if proc.rank == 0:
                    print(f"saved {saved}", flush=True)
            if run.policy.bad_steps >= 3:
                raise NonFinite(f"{run.policy.bad_steps} non-finite steps in a row at step {step}: saved {saved} "
                                f"and stopped (lower --lr, check the data, or resume from an earlier checkpoint)")
            if last:
                if stopping:
                    if proc.rank == 0:
                        print(f"SIGTERM: saved {saved} at step {step}; continue with --resume", flush=True)
                    raise Terminated(f"stopped by SIGTERM after saving {saved} (step {step} of {cfg.steps}); "
                                     f"continue with --resume")
                if early_stop and proc.rank == 0:
                    print(f"early stop at step {step} of {cfg.steps}: val_loss has not improved for {cfg.patience} "
                          f"evaluations (best {run.val_best:.4f}); saved {saved}", flush=True)
                break
        else:  # resumed at or past the last step: nothing to run
            saved = newest_checkpoint(out)
            if proc.rank == 0:
                print(f"--resume: {saved} is already step {cfg.steps} of --steps {cfg.steps}; nothing to do",
                      flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if wandb:
            wandb.finish()
    return dict(eval=last_eval, checkpoint=str(saved), model=str(saved / "model") if saved else None,
                early_stop=early_stop)


# -----------------------------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None):
    p = cli.parser(__doc__.split("\n\n")[0].replace("\n", " "))
    cli.add_flags(p, TrainConfig)
    cfg = cli.config_from(p.parse_args(argv), TrainConfig)
    with process_group():
        train(cfg)


if __name__ == "__main__":
    if not {"--data", "--init_from", "-h", "--help"} & {a.split("=")[0] for a in sys.argv[1:]}:
        # No data and no checkpoint: the tiny CPU default run, which has flags of its own (default_run.py).
        runpy.run_path(str(Path(__file__).with_name("default_run.py")), run_name="__main__")
    else:
        cli.run(main, "train_rl.py")
