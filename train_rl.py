"""GRPO post-training of an InternVL / Skywork-R1V VLM under torchrun with FSDP2: cold-start SFT, GRPO, the
connector-only stage, exact resume, held-out evaluation and entropy-based checkpoint selection.

The Skywork-R1V3 recipe (Shen et al. 2025): (1) cold-start SFT on reasoning traces, (2) GRPO with an accuracy and a
format reward while the connector stays trainable, (3) a connector-only stage (`--train connector`); checkpoints are
picked by the entropy of the policy at reflective ("critical") tokens. GRPO after Shao et al. 2024 (DeepSeekMath),
with DAPO's changes (Yu et al. 2025): clip-higher, dynamic sampling, token-level loss, soft overlong penalty.
Sharding after torchtitan (parallel.py).

    python train_rl.py                                    # no --data / --init_from: the tiny CPU default run
    python train_rl.py --init_from CKPT --data train.jsonl --eval_data held.jsonl --out out/grpo
    torchrun --nproc_per_node=8 train_rl.py --init_from InternVL3-8B --data k12.jsonl --eval_data mmmu_dev.jsonl \\
        --out out/r1v --prompts_per_step 128 --group_size 8 --max_new_tokens 8192 --lr 1e-6 --compile

Departures from textbook GRPO, each a flag:
- Token-level mean over every response token of the whole step (all ranks, all micro-batches), not a per-sequence
  mean (which favours short responses), with no KL term by default (`--kl_beta 0`; k3 against a frozen reference
  when > 0) and the std normalisation of advantages switchable (`--no-adv_std` is Dr. GRPO).
- Clip-higher (eps_low 0.2, eps_high 0.28) and dual clip (`--dual_clip 3`: a negative-advantage token's loss is
  capped at 3|A|).
- Dynamic sampling: groups whose rewards are all equal carry no signal and are dropped; more prompts are rolled out
  until the global number of kept groups reaches `--prompts_per_step` or `--max_rounds` is hit.
- Truncated importance sampling (`--tis_cap 2`): the sampler (bf16 copy, KV cache) and the trainer (FSDP, fused
  head) compute slightly different probabilities; each token's loss is weighted by min(p_trainer / p_sampler, 2).
- Old log-probs: with one update per rollout (`--updates_per_rollout 1`) the trainer's own detached log-probs (the
  ratio is 1 and the clip never acts); with several, recomputed once before the first update.
- The sampler draws from the full vocabulary (top_p 1, top_k 0), so its log-probs are the behaviour probabilities.
- Overlong: DAPO's soft penalty over the last `--overlong_buffer` tokens; `--mask_truncated` drops truncated
  completions from the loss.
"""
import json
import math
import os
import resource
import runpy
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.tensor import DTensor

import cli
import reward
from checkpoint import save_model
from cli import arg
from data import (Example, MicroBatch, PromptStream, Sequence, decode_response, encode, load_rows, load_tokenizer,
                  micro_batch_plan, mix_seed, pack, pad_id, padding_fraction, special_ids)
from entropy import EntropySums, critical_entropy, critical_token_ids
from eval import EvalConfig, evaluate, results_json
from model import VLM
from parallel import (MODULES, Dist, all_gather, all_max, all_sum, build_rollout_copy, build_sharded,
                      init_distributed, refresh, set_threads, summed_over_ranks)
from rollout import Completion, Request, Sampler
from rundir import check_out, distributed_lock, load_checkpoint, newest_checkpoint, resume_from, save_checkpoint

# -----------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class LossConfig:
    """The settings of the clipped policy-gradient loss (TrainConfig's fields of the same names)."""
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float = 3.0
    tis_cap: float = 2.0
    kl_beta: float = 0.0
    entropy_coef: float = 0.0


@dataclass
class TrainConfig:
    init_from: str | None = arg(None, "checkpoint directory in any layout checkpoint.py loads (remote, native, qwen2, "
                                "qwen3)")
    data: str | None = arg(None, "training JSONL of data.py rows (SFT rows need a `response`)")
    eval_data: str | None = arg(None, "held-out JSONL, evaluated every --eval_every steps and at the end")
    out: str = arg("out/run", "output directory: checkpoints, metrics.jsonl, eval.jsonl, best/")
    stage: str = arg("grpo", "sft (cold start) or grpo", ("sft", "grpo"))
    train: str = arg("connector,llm", "trainable modules, a comma list of vit, connector, llm (R1V3: the connector "
                     "stays trainable in RL; `connector` alone is its connector-only stage)")
    steps: int = arg(100, "optimizer steps (GRPO: rollouts)")
    prompts_per_step: int = arg(64, "global prompts (groups) per GRPO step; global sequences per SFT step")
    group_size: int = arg(8, "GRPO samples per prompt")
    micro_batch: int = arg(16, "sequences per forward/backward on each process (when --micro_batch_tokens is unset)")
    micro_batch_tokens: int | None = arg(None, "padded tokens (count x longest prompt + response) per forward/backward on each process: length-sorted micro-batches filling this budget, a prompt's samples together (unset: --micro_batch sequences)")
    max_new_tokens: int = arg(1024, "response length cap")
    max_len: int = arg(4096, "prompt + response tokens: the sampler's static KV-cache length")
    max_tiles: int | None = arg(None, "tile cap per image (default: the checkpoint's max_dynamic_patch)")
    temperature: float = arg(1.0, "rollout temperature; log-probs are taken at the same temperature")
    lr: float = arg(1e-6, "peak learning rate (AdamW, betas 0.9/0.95)")
    schedule: str = arg("constant", "constant or cosine (down to min_lr_ratio x lr), after linear warmup",
                        ("constant", "cosine"))
    warmup_steps: int = arg(0, "linear warmup steps")
    min_lr_ratio: float = arg(0.1, "cosine floor as a fraction of --lr")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    grad_clip: float = arg(1.0, "max global gradient norm (0: no clipping, the norm is still logged)")
    clip_low: float = arg(0.2, "PPO clip below: ratio >= 1 - clip_low")
    clip_high: float = arg(0.28, "PPO clip above: ratio <= 1 + clip_high (DAPO's clip-higher)")
    dual_clip: float = arg(3.0, "cap a negative-advantage token's loss at dual_clip x |A| (0: off)")
    kl_beta: float = arg(0.0, "weight of the k3 KL to a frozen reference (0: no reference is built)")
    entropy_coef: float = arg(0.0, "entropy bonus weight")
    tis_cap: float = arg(2.0, "truncated importance weight min(p_trainer / p_sampler, cap) (0: off)")
    adv_std: bool = arg(True, "divide advantages by the group's reward std (--no-adv_std: Dr. GRPO)")
    updates_per_rollout: int = arg(1, "optimizer steps per rollout (> 1 recomputes old log-probs first)")
    dynamic_sampling: bool = arg(True, "drop groups whose rewards are all equal and roll out more prompts")
    max_rounds: int = arg(4, "rollout rounds per step at most, when dynamic sampling keeps too few groups")
    mask_truncated: bool = arg(False, "leave responses cut at max_new_tokens out of the loss")
    format_weight: float = arg(0.1, "reward weight of the format check (<think>...</think> then an answer)")
    overlong_buffer: int = arg(-1, "DAPO soft overlong penalty over the last N tokens (-1: max_new_tokens // 5, "
                               "0: off)")
    curriculum: str = arg("uniform", "uniform, or pass_rate: each epoch easy -> hard, always-solved rows skipped",
                          ("uniform", "pass_rate"))
    save_every: int = arg(0, "checkpoint every N steps (0: only at the end)")
    eval_every: int = arg(0, "held-out evaluation every N steps (0: only at the end)")
    eval_samples: int = arg(8, "held-out samples per question at the rollout temperature, for avg@k (0: greedy "
                            "only)")
    eval_limit: int = arg(0, "evaluate only the first N held-out rows (0: all)")
    select: str = arg("accuracy", "best checkpoint (OUT/best) by held-out accuracy or by critical_entropy (R1V3)",
                      ("accuracy", "critical_entropy"))
    keep: int = arg(0, "keep the N newest step checkpoints (0: all)")
    resume: bool = arg(False, "continue from OUT/latest, the newest complete checkpoint")
    seed: int = arg(0, "data order and sampling seed")
    compile: bool | None = arg(None, "compile the sampler's decode step (default: on CUDA; on CPU it needs a C++ "
                               "compiler)")
    compile_blocks: bool = arg(False, "torch.compile each transformer block of the trainer")
    activation_checkpointing: bool = arg(False, "recompute each block's activations in backward")
    reward_workers: int = arg(0, "reward scoring processes (0: one per core, 1 on a machine of <= 4 cores)")
    threads: int = arg(0, "torch CPU threads per process (0: the node's cores split between its processes)")
    wandb: str | None = arg(None, "wandb project to log to, when the wandb package is installed")

    def __post_init__(self):
        if not set(self.train.split(",")) <= set(MODULES) or not self.train:
            raise ValueError(f"--train takes a comma list of {sorted(MODULES)}, got {self.train!r}")
        for name in ("steps", "prompts_per_step", "group_size", "micro_batch", "max_new_tokens", "max_len",
                     "updates_per_rollout", "max_rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("stage", "schedule", "curriculum", "select"):
            choices = next(f for f in fields(self) if f.name == name).metadata["choices"]
            if getattr(self, name) not in choices:
                raise ValueError(f"--{name} must be one of {choices}, got {getattr(self, name)!r}")
        if not (self.lr > 0 and self.temperature > 0 and 0 <= self.clip_low < 1 and self.clip_high >= 0):
            raise ValueError("need lr > 0, temperature > 0, 0 <= clip_low < 1, clip_high >= 0")
        if self.overlong_buffer < 0:
            self.overlong_buffer = self.max_new_tokens // 5

    @property
    def loss(self) -> LossConfig:
        return LossConfig(**{f.name: getattr(self, f.name) for f in fields(LossConfig)})

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

    def __add__(self, o: "UpdateStats") -> "UpdateStats":
        return UpdateStats(self.tokens + o.tokens, self.clipped_low + o.clipped_low, self.clipped_high + o.clipped_high,
                           self.kl + o.kl, self.gap + o.gap, max(self.gap_max, o.gap_max), self.entropy + o.entropy)


def grpo_loss(logprobs, old_logprobs, advantages, mask, cfg: LossConfig, sampler_logprobs=None, ref_logprobs=None,
              entropy=None) -> tuple[torch.Tensor, UpdateStats]:
    """PPO-clip with clip-higher and dual clip, per token; all (B, T) but advantages (B,). mask is 1 on the response
    tokens that count. sampler_logprobs give the truncated importance weight min(exp(old - sampler), tis_cap);
    ref_logprobs the k3 KL term; entropy the bonus."""
    adv = advantages[:, None]  # (B, 1)
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
# What a run holds: the policy being trained, the data, the sampler


def lr_lambda(cfg: TrainConfig):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


@dataclass
class Policy:
    """The weights being trained: the FSDP-sharded model (the parameters the optimizer updates), its units in the
    order every rank unshards them, the optimizer and its schedule, an optional frozen reference (KL term), and the
    plain copy the sampler and evaluation read, refreshed from the trained weights."""
    model: VLM
    units: list
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    reference: VLM | None
    rollout_model: VLM
    rollout_stale: bool = False  # SFT refreshes the copy only when something reads it
    bad_steps: int = 0  # non-finite steps in a row

    def forward(self, mb: MicroBatch, temperature: float = 1.0, model: VLM | None = None):
        """Per-token (log-probs, entropy) from inside the sharded model's forward (see VLM.forward)."""
        return (model or self.model)(mb.input_ids, mb.pixel_values, targets=mb.targets, temperature=temperature,
                                     image_index=mb.image_index)

    def step(self, loss: float, grad_clip: float, rank: int) -> dict:
        """Clip, then step unless the loss or the gradient norm is not finite (then the update is dropped, logged,
        and three such steps in a row stop the run after a save)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
        norm = float(norm.full_tensor() if isinstance(norm, DTensor) else norm)  # DTensor: sharded norms combined
        finite = math.isfinite(loss) and math.isfinite(norm)
        lr = self.scheduler.get_last_lr()[0]
        if finite:
            self.optimizer.step()
            self.bad_steps = 0
        else:
            self.bad_steps += 1
            print(f"[rank {rank}] non-finite loss {loss} or grad norm {norm}: update skipped "
                  f"({self.bad_steps} in a row)", file=sys.stderr, flush=True)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.rollout_stale = True
        return dict(loss=loss, grad_norm=norm, lr=lr, skipped=not finite)

    def sync_rollout_model(self):
        """The trained weights into the sampler's copy, in place, if they changed since the last copy."""
        if self.rollout_stale:
            refresh(self.rollout_model, self.units)
            self.rollout_stale = False


@dataclass
class TrainData:
    """The rows, how they become model inputs, and the order they are taken in."""
    rows: list[dict]
    eval_rows: list[dict]
    tokenizer: object
    stream: PromptStream
    stop_ids: list[int]
    critical_ids: dict
    skipped: set = field(default_factory=set)  # rows that could not be encoded, each reported once

    def example(self, i: int, cfg: TrainConfig, config, rank: int) -> Example | None:
        """data.encode, or None for a row that cannot run (an image that fails to decode past its header, a prompt
        with no room in max_len): such a row is skipped with a one-time warning and counted, never stops training."""
        try:
            ex = encode(self.rows[i], self.tokenizer, config, cfg.max_tiles)
            room = cfg.max_len - len(ex.prompt_ids) - (len(ex.response_ids) if cfg.stage == "sft" else 1)
            if room < 0:
                raise ValueError(f"prompt of {len(ex.prompt_ids)} tokens (+ response) does not fit --max_len "
                                 f"{cfg.max_len}")
            return ex
        except (OSError, ValueError) as e:
            if i not in self.skipped:
                print(f"[rank {rank}] skipping row {self.rows[i]['id']!r}: {e}", file=sys.stderr, flush=True)
            self.skipped.add(i)
            return None


@dataclass
class Run:
    """Everything a step needs, built once by `setup`."""
    cfg: TrainConfig
    proc: Dist
    policy: Policy
    sampler: Sampler  # on policy.rollout_model
    data: TrainData
    stopping: bool = False  # SIGTERM received: save and leave at the end of this step
    padding: list = field(default_factory=lambda: [0, 0])  # padded tokens run, of which in no sequence (metrics)

    @property
    def dummy(self) -> Sequence:
        """A zero-weight sequence for the micro-batches a rank runs only to keep FSDP's collectives in step."""
        pad = self.data.stop_ids[0] if self.data.stop_ids else 0
        return Sequence(row=-1, prompt=[pad], response=[pad], pixel_values=None, weight=0.0)

    def batches(self, seqs: list[Sequence]) -> list[MicroBatch]:
        """This rank's micro-batches of `seqs` (data.micro_batch_plan: --micro_batch sequences, or length-sorted
        runs within --micro_batch_tokens), as many as the rank with the most: zero-weight dummies fill the rest, since
        every rank must run the same forwards and backwards (FSDP's collectives would hang otherwise)."""
        cfg, config = self.cfg, self.policy.rollout_model.config
        plan = micro_batch_plan(seqs, cfg.micro_batch, cfg.micro_batch_tokens)
        dtype = self.policy.rollout_model.language_model.embed_tokens.weight.dtype
        count = int(all_max(len(plan), device=self.proc.device)[0])
        batches = [pack(b, self.proc.device, dtype, pad_id(config), cfg.mask_truncated,
                        config.tokens_per_tile) for b in plan + [[self.dummy]] * (count - len(plan))]
        self.padding = [a + b for a, b in zip(self.padding, padding_fraction(batches))]
        return batches


def setup(cfg: TrainConfig, proc: Dist) -> Run:
    """Everything is checked before step 0: the checkpoint, the data rows (every problem reported at once), the
    stage's needs; then the sharded model, the rollout copy and its sampler, the optimizer."""
    if not cfg.init_from or not Path(cfg.init_from).is_dir():
        raise FileNotFoundError(f"--init_from: checkpoint directory not found: {cfg.init_from!r}")
    if not cfg.data:
        raise ValueError("--data: a training JSONL file is required")
    if cfg.prompts_per_step % proc.world:
        raise ValueError(f"--prompts_per_step {cfg.prompts_per_step} must be a multiple of the {proc.world} processes")
    tokenizer = load_tokenizer(cfg.init_from)
    rows = load_rows(cfg.data)
    eval_rows = load_rows(cfg.eval_data) if cfg.eval_data else []
    if cfg.eval_limit:
        eval_rows = eval_rows[:cfg.eval_limit]
    if cfg.stage == "sft" and (missing := [r["id"] for r in rows if not r.get("response")]):
        raise ValueError(f"{cfg.data}: --stage sft needs a `response` in every row; {len(missing)} rows have none "
                         f"(first: id {missing[0]!r})")
    model, units, config = build_sharded(cfg.init_from, cfg.train, proc, cfg.activation_checkpointing,
                                         cfg.compile_blocks)
    reference = build_sharded(cfg.init_from, "", proc, cfg.activation_checkpointing)[0] if cfg.kl_beta > 0 else None
    rollout_model = build_rollout_copy(config, proc.device)
    refresh(rollout_model, units)
    stop_ids, banned_ids = special_ids(tokenizer)
    # Default: compiled on CUDA (CUDA graphs). On CPU, measured once (bench.py trl shapes, 1 thread, 2-core shared
    # machine): the compiled decode step was 1.03-1.45x the eager one after 6-40 s of compilation per run, so CPU
    # stays eager unless --compile asks (it needs a C++ compiler).
    compile = cfg.compile if cfg.compile is not None else proc.device.type == "cuda"
    slots = cfg.prompts_per_step // proc.world * (cfg.group_size if cfg.stage == "grpo" else 1)
    sampler = Sampler(rollout_model, max_slots=max(slots, cfg.eval_samples, 1), max_len=cfg.max_len,
                      stop_ids=stop_ids, banned_ids=banned_ids, compile=compile)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95),
                                  foreach=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    get_state_dict(model, optimizer)  # gives every trainable parameter its optimizer state now: saves are complete
    policy = Policy(model, units, optimizer, scheduler, reference, rollout_model)
    data = TrainData(rows, eval_rows, tokenizer, PromptStream(len(rows), cfg.seed, cfg.curriculum), stop_ids,
                     critical_token_ids(tokenizer))
    return Run(cfg, proc, policy, sampler, data)

# -----------------------------------------------------------------------------------------------------------------
# A GRPO step: roll out a group per prompt on the live weights, score, compute advantages, keep the informative
# groups, then the clipped loss and an optimizer step per mini-batch. The helpers it calls follow it.


def grpo_step(run: Run, step: int) -> dict:
    cfg, t0 = run.cfg, time.perf_counter()
    kept: dict[tuple[int, int], list[Sequence]] = {}  # (round, position in the round's global order) -> group
    stats = RolloutStats()
    for rnd in range(cfg.max_rounds):
        prompts = take_prompts(run, step, rnd)  # this rank's share of the round's global order
        groups = run.sampler.generate([p.request for p in prompts], num_samples=cfg.group_size,
                                      max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=1.0,
                                      top_k=0, progress=progress_line(run, step))  # rollout
        scores = score(run, prompts, groups)  # reward
        advantages = group_advantages(scores.reward, cfg.adv_std)  # advantages
        kept |= informative_groups(prompts, groups, scores, advantages, rnd, cfg.dynamic_sampling)  # group filter
        stats.add(groups, scores)
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
    return (stats.metrics(run) | update_metrics(update, results, seqs, run)
            | dict(t_rollout=t1 - t0, t_logprob=t2 - t1, t_update=time.perf_counter() - t2))


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
    reward_cfg = reward.RewardConfig(format_weight=cfg.format_weight, max_len=cfg.max_new_tokens,
                                     cache_len=cfg.overlong_buffer, overlong_weight=1.0 if cfg.overlong_buffer else 0.0)
    workers = cfg.reward_workers or (1 if (os.cpu_count() or 1) <= 4 else None)
    texts = [decode_response(run.data.tokenizer, c.ids, run.data.stop_ids) for _, c in flat]
    try:
        results = reward.score_batch(texts, [run.data.rows[p.row] for p, _ in flat], reward_cfg,
                                     [len(c.ids) for _, c in flat], workers=workers)
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
    """For rank 0's sampler: a line every `every_s` seconds while a rollout runs (quiet for short ones)."""
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
            for s, lp in zip(mb.seqs, mb.padded.split(logprobs.cpu())):
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
        stats += mb_stats
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

    def add(self, groups: list[list[Completion]], scores: Scores):
        flat = [c for group in groups for c in group]
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
        t = summed_over_ranks(self, run.proc.device, maxima=("longest", "rounds"))
        n = max(t.samples, 1)
        mean = t.reward / n
        return dict(reward=mean, reward_std=math.sqrt(max(0.0, t.reward_sq / n - mean ** 2)), accuracy=t.accuracy / n,
                    format=t.format / n, response_len=t.length / n, response_len_max=t.longest,
                    truncated=t.truncated / n, kept_groups=t.kept / max(t.groups, 1), reward_errors=int(t.errors),
                    rounds=int(t.rounds), rollout_tokens=int(t.length), skipped_rows=len(run.data.skipped))


def update_metrics(u: UpdateStats, results: list[dict], seqs: list[Sequence], run: Run) -> dict:
    """The update's metrics from its rank-summed stats and each optimizer step's result."""
    n = max(u.tokens, 1.0)
    forward_tokens, padded, empty = all_sum(sum(len(s.prompt) + len(s.response) for s in seqs), *run.padding,
                                            device=run.proc.device)
    run.padding = [0, 0]
    return dict(padding=empty / max(padded, 1), loss=sum(r["loss"] for r in results) / len(results), grad_norm=results[-1]["grad_norm"],
                lr=results[-1]["lr"], skipped=any(r["skipped"] for r in results), clip_low=u.clipped_low / n,
                clip_high=u.clipped_high / n, kl=u.kl / n, entropy=u.entropy.mean,
                critical_entropy=u.entropy.critical_mean, logprob_gap=u.gap / max(u.entropy.num_tokens, 1),
                logprob_gap_max=u.gap_max, update_tokens=int(u.tokens), forward_tokens=int(forward_tokens))

# -----------------------------------------------------------------------------------------------------------------
# An SFT step: teacher-forced log-likelihood of the rows' responses


def sft_step(run: Run, step: int) -> dict:
    cfg, proc, t0 = run.cfg, run.proc, time.perf_counter()
    config = run.policy.rollout_model.config
    mine = run.data.stream.take(cfg.prompts_per_step)[proc.rank::proc.world]
    seqs = [Sequence(i, ex.prompt_ids, ex.response_ids, ex.pixel_values) for i in mine
            if (ex := run.data.example(i, cfg, config, proc.rank)) is not None]

    def loss_of(mb: MicroBatch, logprobs, entropy):
        mask = mb.mask > 0
        return -(logprobs * mb.mask).sum(), UpdateStats(tokens=mask.sum().item(),
                                                        entropy=EntropySums(total=entropy.detach()[mask].sum().item(),
                                                                            num_tokens=int(mask.sum())))

    loss, stats = backward(run, seqs, loss_of)
    result = run.policy.step(loss, cfg.grad_clip, proc.rank)
    stats = summed_over_ranks(stats, proc.device, maxima=("gap_max",))
    forward_tokens, padded, empty = all_sum(sum(len(s.prompt) + len(s.response) for s in seqs), *run.padding,
                                            device=proc.device)
    run.padding = [0, 0]
    return result | dict(padding=empty / max(padded, 1), entropy=stats.entropy.mean, update_tokens=int(stats.tokens),
                         forward_tokens=int(forward_tokens), skipped_rows=len(run.data.skipped),
                         t_update=time.perf_counter() - t0)

# -----------------------------------------------------------------------------------------------------------------
# Logging


PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 from the spec sheets


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def log_line(m: dict, steps: int) -> str:
    head = f"{m['stage']:4s} {m['step']:>5d}/{steps}"
    tail = (f"gnorm {m['grad_norm']:.3f} lr {m['lr']:.2e}{' SKIPPED' if m['skipped'] else ''} | "
            f"{m['tokens_per_s']:.0f} tok/s | mem {m['peak_mem_mb']:.0f}M")
    if m["stage"] == "sft":
        return f"{head} | loss {m['loss']:.4f} ent {m['entropy']:.3f} | {tail} | {m['t_step']:.2f}s"
    return (f"{head} | reward {m['reward']:.3f}±{m['reward_std']:.3f} acc {m['accuracy']:.3f} fmt {m['format']:.2f} "
            f"| len {m['response_len']:.1f}/{m['response_len_max']:.0f} trunc {m['truncated']:.2f} "
            f"kept {m['kept_groups']:.2f} | clip {m['clip_low']:.3f}/{m['clip_high']:.3f} kl {m['kl']:.4f} "
            f"ent {m['entropy']:.3f} crit {m['critical_entropy']:.3f} gap {m['logprob_gap']:.1e}/"
            f"{m['logprob_gap_max']:.1e} | {tail} | t {m['t_rollout']:.2f}/{m['t_logprob']:.2f}/"
            f"{m['t_update']:.2f}s")


def mfu(run: Run, m: dict) -> float | None:
    """Model FLOPs utilisation of the update: 6 x parameters x tokens through the model, over the device peak."""
    if run.proc.device.type != "cuda":
        return None
    peak = next((v for k, v in PEAK_FLOPS.items() if k in torch.cuda.get_device_name()), None)
    params = sum(p.numel() for p in run.policy.rollout_model.parameters())
    return 6 * params * m["forward_tokens"] / (m["t_update"] * run.proc.world * peak) if peak else None

# -----------------------------------------------------------------------------------------------------------------
# Held-out evaluation (eval.py's scoring) and checkpoint selection


def heldout(run: Run, step: int) -> dict:
    """Greedy and avg@k accuracy, format rate, response length and critical-token entropy on --eval_data with
    eval.py's scoring, the rows split across ranks; OUT/best/ keeps the best checkpoint by --select."""
    cfg, out = run.cfg, Path(run.cfg.out)
    run.policy.sync_rollout_model()
    t0 = time.perf_counter()
    eval_cfg = EvalConfig(max_new_tokens=cfg.max_new_tokens, max_len=cfg.max_len, samples=cfg.eval_samples,
                          temperature=cfg.temperature, max_tiles=cfg.max_tiles, seed=cfg.seed)
    result = evaluate(run.policy.rollout_model, run.data.tokenizer, run.data.eval_rows, eval_cfg, sampler=run.sampler)
    summary = {k: v for k, v in result.items() if isinstance(v, (int, float))}
    summary |= dict(step=step, t_eval=time.perf_counter() - t0)
    value = summary["greedy_accuracy"] if cfg.select == "accuracy" else summary["critical_entropy"]
    if run.proc.rank == 0:  # every prompt, response, extracted answer and verdict, as eval.py writes them
        cli.write_atomic(out / f"eval_step_{step:06d}.json", json.dumps(results_json(
            result, eval_cfg, checkpoint=f"{out} step {step}", init_from=cfg.init_from, data=cfg.eval_data,
            stage=cfg.stage, step=step), indent=1))
        cli.append_jsonl(out / "eval.jsonl", summary)
        best_file = out / "best.json"
        best = json.loads(best_file.read_text()) if best_file.is_file() else None
        if math.isfinite(value) and (best is None or value > best["value"]):
            save_model(run.policy.rollout_model, out / "best")
            cli.write_atomic(best_file, json.dumps(cli.json_safe(dict(select=cfg.select, value=value, **summary)),
                                                   indent=2) + "\n")
        print(f"eval  step {step}: greedy {summary['greedy_accuracy']:.3f} avg@{cfg.eval_samples} "
              f"{summary.get('sampled_accuracy', math.nan):.3f} format {summary.get('format_rate', math.nan):.3f} "
              f"len {summary.get('response_length', math.nan):.1f} critical entropy "
              f"{summary.get('critical_entropy', math.nan):.3f} ({summary['t_eval']:.1f}s)", flush=True)
    dist.barrier()
    return summary

# -----------------------------------------------------------------------------------------------------------------
# The loop


def training_state(run: Run, step: int) -> dict:
    """What a checkpoint keeps beside the model and optimizer, the same on every rank (the sampler's seeds derive
    from the step, so no sampler state is needed)."""
    return {"scheduler": run.policy.scheduler.state_dict(), "stream": run.data.stream.state(),
            "meta": {"step": step, "stage": run.cfg.stage, "bad_steps": run.policy.bad_steps}}


def resume(run: Run, previous: Path) -> int:
    """Model, optimizer, schedule, prompt stream and RNG from `previous`; returns the step it was saved at."""
    state = load_checkpoint(previous, run.proc, run.policy.model, run.policy.optimizer, training_state(run, 0),
                            seed=run.cfg.seed)
    if state["meta"]["stage"] != run.cfg.stage:
        raise ValueError(f"{previous} is a {state['meta']['stage']} checkpoint; this run is --stage {run.cfg.stage}")
    run.policy.scheduler.load_state_dict(state["scheduler"])
    run.data.stream.load(state["stream"])
    run.policy.bad_steps = int(state["meta"]["bad_steps"])
    refresh(run.policy.rollout_model, run.policy.units)
    if run.proc.rank == 0:
        print(f"resumed from {previous} (step {state['meta']['step']})", flush=True)
    return int(state["meta"]["step"])


def train(cfg: TrainConfig) -> dict:
    """One stage from `init_from` to OUT/step_NNNNNN (the last is also OUT/latest); returns the last held-out
    evaluation (empty without --eval_data) and where the final checkpoint is. OUT is locked while it runs."""
    proc = init_distributed()
    set_threads(cfg.threads, proc.world)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    with distributed_lock(out):
        return train_locked(cfg, proc, out)


def train_locked(cfg: TrainConfig, proc: Dist, out: Path) -> dict:
    check_out(out, cfg.resume)  # a fresh run never writes into another run's directory
    run = setup(cfg, proc)
    config_json = json.dumps(asdict(cfg), indent=2) + "\n"
    if proc.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        print(f"{cfg.stage} on {proc.world} process(es), {proc.device}, {torch.get_num_threads()} threads each; "
              f"{len(run.data.rows)} rows, {len(run.data.eval_rows)} held-out; config:\n{config_json}", flush=True)
        (out / "config.json").write_text(config_json)
    start = 0
    if cfg.resume:  # the newest checkpoint that loads, falling back past broken ones (with a warning)
        previous, start = resume_from(out, lambda path: resume(run, path))
        if previous is None and proc.rank == 0:
            print(f"--resume: {out} holds no checkpoint yet; starting at step 0", flush=True)
        start = start or 0
    metrics_file = out / "metrics.jsonl"
    if proc.rank == 0:  # a killed run may have logged steps after its last checkpoint: those are about to rerun
        lines = metrics_file.read_text().splitlines() if metrics_file.is_file() else []
        kept = [x for x in lines if json.loads(x)["step"] <= start]
        if kept != lines or not metrics_file.is_file():
            cli.write_atomic(metrics_file, "".join(f"{x}\n" for x in kept))
    wandb = _wandb(cfg) if proc.rank == 0 else None
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: setattr(run, "stopping", True))
    last_eval, saved = {}, None
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
            stopping = bool(all_max(float(run.stopping), device=proc.device)[0])
            last = step == cfg.steps or stopping or run.policy.bad_steps >= 3
            if run.data.eval_rows and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
                last_eval = heldout(run, step)
            if last or (cfg.save_every and step % cfg.save_every == 0):
                run.policy.sync_rollout_model()
                saved = save_checkpoint(out, step, proc, run.policy.model, run.policy.optimizer,
                                        training_state(run, step), run.policy.rollout_model, config_json, cfg.keep)
                if proc.rank == 0:
                    print(f"saved {saved}", flush=True)
            if run.policy.bad_steps >= 3:
                raise RuntimeError(f"{run.policy.bad_steps} non-finite steps in a row at step {step}: saved {saved} "
                                   f"and stopped (lower --lr, check the data, or resume from an earlier checkpoint)")
            if last:
                if stopping and proc.rank == 0:
                    print(f"SIGTERM: saved {saved} at step {step}; continue with --resume", flush=True)
                break
        else:  # resumed at or past the last step: nothing to run
            saved = newest_checkpoint(out)
            if proc.rank == 0:
                print(f"--resume: {saved} is already step {cfg.steps} of --steps {cfg.steps}; nothing to do", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if wandb:
            wandb.finish()
    return dict(eval=last_eval, checkpoint=str(saved), model=str(saved / "model") if saved else None)


def _wandb(cfg: TrainConfig):
    if not cfg.wandb:
        return None
    try:
        import wandb  # optional: only a run that asks for it needs the package
    except ImportError:
        print("--wandb: the wandb package is not installed (pip install wandb); logging to metrics.jsonl only")
        return None
    wandb.init(project=cfg.wandb, config=asdict(cfg))
    return wandb

# -----------------------------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None):
    p = cli.parser(__doc__.split("\n\n")[0].replace("\n", " "))
    cli.add_flags(p, TrainConfig)
    cfg = cli.config_from(p.parse_args(argv), TrainConfig)
    try:
        train(cfg)
        dist.barrier()  # no rank tears down its connections while another still uses them: gloo aborts then
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    if not {"--data", "--init_from", "-h", "--help"} & {a.split("=")[0] for a in sys.argv[1:]}:
        # No data and no checkpoint: the tiny CPU default run, which has flags of its own (default_run.py).
        runpy.run_path(str(Path(__file__).with_name("default_run.py")), run_name="__main__")
    else:
        main()
