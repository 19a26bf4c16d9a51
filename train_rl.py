"""GRPO post-training of an InternVL / Skywork-R1V VLM under torchrun with FSDP2: cold-start SFT, GRPO, the
connector-only stage, exact resume, held-out evaluation and entropy-based checkpoint selection.

The Skywork-R1V3 recipe (Shen et al. 2025): (1) cold-start SFT on reasoning traces, (2) GRPO with an accuracy and a
format reward while the connector stays trainable, (3) a connector-only stage (`--train connector`); checkpoints are
picked by the entropy of the policy at reflective ("critical") tokens. GRPO after Shao et al. 2024 (DeepSeekMath),
with DAPO's changes (Yu et al. 2025): clip-higher, dynamic sampling, token-level loss, soft overlong penalty.
Sharding after torchtitan (build on meta -> fully_shard blocks, then the root -> to_empty -> load).

    python train_rl.py                                    # the tiny CPU default: SFT -> eval -> GRPO -> eval
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
import argparse
import json
import math
import os
import resource
import signal
import sys
import time
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.tensor import DTensor

import reward
from checkpoint import save_model
from data import encode, load_rows, load_tokenizer, special_ids
from entropy import IGNORE_INDEX, critical_entropy, critical_token_ids
from model import VLM
from parallel import (MODULES, Dist, all_gather, all_max, all_sum, build_rollout_copy, build_sharded,
                      init_distributed, latest_checkpoint, load_checkpoint, refresh, save_checkpoint, set_threads,
                      write_atomic)
from rollout import Request, Sampler

# -----------------------------------------------------------------------------------------------------------------
# Config


def arg(default, help: str, choices: tuple | None = None):
    """A config field with its command-line help (and the values it may take)."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    init_from: str | None = arg(None, "checkpoint directory in any layout model.py loads (remote, native, qwen2)")
    data: str | None = arg(None, "training JSONL of data.py rows (SFT rows need a `response`)")
    eval_data: str | None = arg(None, "held-out JSONL, evaluated every --eval_every steps and at the end")
    out: str = arg("out/run", "output directory: checkpoints, metrics.jsonl, eval.jsonl, best/")
    stage: str = arg("grpo", "sft (cold start) or grpo", ("sft", "grpo"))
    train: str = arg("connector,llm", "trainable modules, a comma list of vit, connector, llm (R1V3: the connector "
                     "stays trainable in RL; `connector` alone is its connector-only stage)")
    steps: int = arg(100, "optimizer steps (GRPO: rollouts)")
    prompts_per_step: int = arg(64, "global prompts (groups) per GRPO step; global sequences per SFT step")
    group_size: int = arg(8, "GRPO samples per prompt")
    micro_batch: int = arg(16, "sequences per forward/backward on each process")
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
        if self.stage not in ("sft", "grpo"):
            raise ValueError(f"--stage must be sft or grpo, got {self.stage!r}")
        if not set(self.train.split(",")) <= set(MODULES) or not self.train:
            raise ValueError(f"--train takes a comma list of {sorted(MODULES)}, got {self.train!r}")
        for name in ("steps", "prompts_per_step", "group_size", "micro_batch", "max_new_tokens", "max_len",
                     "updates_per_rollout", "max_rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.schedule not in ("constant", "cosine") or self.curriculum not in ("uniform", "pass_rate") or \
                self.select not in ("accuracy", "critical_entropy"):
            raise ValueError("--schedule constant|cosine, --curriculum uniform|pass_rate, "
                             "--select accuracy|critical_entropy")
        if not (self.lr > 0 and self.temperature > 0 and 0 <= self.clip_low < 1 and self.clip_high >= 0):
            raise ValueError("need lr > 0, temperature > 0, 0 <= clip_low < 1, clip_high >= 0")
        if self.overlong_buffer < 0:
            self.overlong_buffer = self.max_new_tokens // 5


# -----------------------------------------------------------------------------------------------------------------
# Data: one global prompt order, the same on every rank, each rank taking its share


@dataclass
class PromptStream:
    """Epochs of a seeded permutation of the rows; `position` counts prompts taken in the current epoch (the same on
    every rank). With the pass-rate curriculum each epoch is ordered easy -> hard and always-solved rows are left out
    (R1V3 saw curriculum shift hurt generalisation, so it is an option to measure, not the default)."""
    n: int
    seed: int
    curriculum: str = "uniform"
    epoch: int = 0
    position: int = 0
    correct: dict = field(default_factory=dict)  # row index -> [right, total] over every sampled response
    order: list = field(default_factory=list)

    def _new_epoch(self):
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        if self.curriculum == "pass_rate":
            rate = {i: self.correct[i][0] / self.correct[i][1] for i in self.correct if self.correct[i][1]}
            order = [i for i in order if rate.get(i, 0.5) < 1.0] or order
            order.sort(key=lambda i: -rate.get(i, 0.5))  # stable: ties keep the permutation's order
        self.order = order

    def take(self, k: int) -> list[int]:
        """The next k prompts of the global order."""
        out = []
        while len(out) < k:
            if not self.order or self.position >= len(self.order):
                if self.order:
                    self.epoch, self.position = self.epoch + 1, 0
                self._new_epoch()
            out.append(self.order[self.position])
            self.position += 1
        return out

    def record(self, results: list[tuple[int, int, int]]):
        for i, right, total in results:
            c = self.correct.setdefault(i, [0, 0])
            c[0] += right
            c[1] += total

    def state(self) -> dict:
        """Everything `take` depends on; the epoch's order too, since the curriculum sorted it by the pass rates
        of its start, which are not the pass rates now."""
        return {"epoch": self.epoch, "position": self.position, "order": list(self.order),
                "correct": {str(k): v for k, v in sorted(self.correct.items())}}

    def load(self, state: dict):
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.order = [int(i) for i in state["order"]]
        self.correct = {int(k): list(v) for k, v in state["correct"].items()}

# -----------------------------------------------------------------------------------------------------------------
# Losses. Both return the SUM of per-token losses over the micro-batch; the caller divides by the number of response
# tokens of the whole step across ranks and multiplies by the world size (FSDP averages gradients over ranks).


@dataclass
class LossStats:
    tokens: float = 0.0  # response tokens counted in the loss
    clipped_low: float = 0.0  # tokens with A < 0 whose ratio fell below 1 - eps_low (no gradient)
    clipped_high: float = 0.0  # tokens with A > 0 whose ratio rose above 1 + eps_high (no gradient)
    kl: float = 0.0  # sum of the k3 estimate
    entropy: float = 0.0  # sum of the policy's entropy

    def add(self, other: "LossStats"):
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)


def grpo_loss(logprobs, old_logprobs, advantages, mask, cfg: TrainConfig, sampler_logprobs=None, ref_logprobs=None,
              entropy=None) -> tuple[torch.Tensor, LossStats]:
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
        stats = LossStats(tokens=mask.sum().item(),
                          clipped_low=((adv < 0) & (ratio < 1 - cfg.clip_low)).mul(mask).sum().item(),
                          clipped_high=((adv > 0) & (ratio > 1 + cfg.clip_high)).mul(mask).sum().item(),
                          kl=(kl * mask).sum().item(),
                          entropy=0.0 if entropy is None else (entropy * mask).sum().item())
    return (loss * mask).sum(), stats


def advantages_of(rewards: torch.Tensor, use_std: bool, eps: float = 1e-6) -> torch.Tensor:
    """(groups, G) rewards -> advantages: minus the group mean, over the group std when `use_std` (Dr. GRPO drops
    it). A group of one has no spread: advantage 0."""
    centred = rewards - rewards.mean(-1, keepdim=True)
    if not use_std or rewards.shape[-1] < 2:
        return centred
    return centred / (rewards.std(-1, keepdim=True) + eps)

# -----------------------------------------------------------------------------------------------------------------
# Sequences and micro-batches


@dataclass
class Sequence:
    """One prompt + response the trainer learns from."""
    row: int  # index into the data rows
    prompt: list[int]
    response: list[int]
    pixel_values: torch.Tensor | None
    advantage: float = 0.0
    sampler_logprobs: list[float] | None = None  # per response token (GRPO)
    old_logprobs: torch.Tensor | None = None  # per response token, the trainer's before the update (GRPO, mu > 1)
    weight: float = 1.0  # 0 for a dummy sequence that only keeps collectives in step
    truncated: bool = False
    order: int = 0  # position in the step's global order: what splits a rollout into mini-batches on any world size


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # (B, T)
    pixel_values: torch.Tensor | None  # (tiles, 3, S, S), rows in order
    targets: torch.Tensor  # (B, T): the response token each position predicts, IGNORE_INDEX elsewhere
    mask: torch.Tensor  # (B, T) float: 1 on the response tokens that count in the loss
    advantages: torch.Tensor  # (B,)
    sampler_logprobs: torch.Tensor  # (B, T), aligned with targets
    old_logprobs: torch.Tensor | None  # (B, T)


def pack(seqs: list[Sequence], device: torch.device, dtype: torch.dtype, mask_truncated: bool) -> MicroBatch:
    """Right-padded rows; position t predicts ids[t + 1], so a response's tokens are the targets from P - 1 on."""
    T = max(len(s.prompt) + len(s.response) for s in seqs)
    B = len(seqs)
    ids = torch.zeros(B, T, dtype=torch.long)
    targets = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    mask, slp, olp = torch.zeros(B, T), torch.zeros(B, T), torch.zeros(B, T)
    for b, s in enumerate(seqs):
        P, R = len(s.prompt), len(s.response)
        ids[b, :P + R] = torch.tensor(s.prompt + s.response)
        targets[b, P - 1:P + R - 1] = torch.tensor(s.response)
        mask[b, P - 1:P + R - 1] = s.weight * (0.0 if mask_truncated and s.truncated else 1.0)
        if s.sampler_logprobs is not None:
            slp[b, P - 1:P + R - 1] = torch.tensor(s.sampler_logprobs)
        if s.old_logprobs is not None:
            olp[b, P - 1:P + R - 1] = s.old_logprobs
    pixels = [s.pixel_values for s in seqs if s.pixel_values is not None]
    to = lambda t: t.to(device, non_blocking=True)
    return MicroBatch(to(ids), torch.cat(pixels).to(device, dtype) if pixels else None, to(targets), to(mask),
                      to(torch.tensor([s.advantage for s in seqs])), to(slp),
                      to(olp) if any(s.old_logprobs is not None for s in seqs) else None)


def micro_batches(seqs: list[Sequence], size: int, count: int, dummy: Sequence) -> list[list[Sequence]]:
    """`count` micro-batches of at most `size` sequences; a rank with fewer real ones runs zero-weight dummies, since
    every rank must run the same forwards and backwards (FSDP's collectives would hang otherwise)."""
    out = [seqs[i:i + size] for i in range(0, len(seqs), size)]
    return out + [[dummy]] * (count - len(out))

# -----------------------------------------------------------------------------------------------------------------
# One training run


@dataclass
class Run:
    """Everything a step needs, built once by `setup`."""
    cfg: TrainConfig
    d: Dist
    model: VLM  # FSDP-sharded, the parameters the optimizer updates
    units: list  # its FSDP units, in the order every rank unshards them
    copy: VLM  # plain copy the sampler (and evaluation) reads, refreshed after every optimizer step
    sampler: Sampler
    ref: VLM | None  # frozen sharded reference for the KL term (kl_beta > 0 only)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    stream: PromptStream
    rows: list[dict]
    eval_rows: list[dict]
    tokenizer: object
    stop_ids: list[int]
    critical_ids: dict
    dummy: Sequence
    bad_steps: int = 0  # non-finite steps in a row
    stopping: bool = False  # SIGTERM received: save and leave at the end of this step
    stale: bool = False  # the copy lags the trained weights (SFT refreshes it only when it is read)
    skipped_rows: set = field(default_factory=set)


def lr_lambda(cfg: TrainConfig):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def setup(cfg: TrainConfig, d: Dist) -> Run:
    """Everything is checked before step 0: the checkpoint, the data rows (every problem reported at once), the
    stage's needs; then the sharded model, the rollout copy and its sampler, the optimizer."""
    if not cfg.init_from or not Path(cfg.init_from).is_dir():
        raise FileNotFoundError(f"--init_from: checkpoint directory not found: {cfg.init_from!r}")
    if not cfg.data:
        raise ValueError("--data: a training JSONL file is required")
    if cfg.prompts_per_step % d.world:
        raise ValueError(f"--prompts_per_step {cfg.prompts_per_step} must be a multiple of the {d.world} processes")
    tokenizer = load_tokenizer(cfg.init_from)
    rows = load_rows(cfg.data)
    eval_rows = load_rows(cfg.eval_data) if cfg.eval_data else []
    if cfg.eval_limit:
        eval_rows = eval_rows[:cfg.eval_limit]
    if cfg.stage == "sft" and (missing := [r["id"] for r in rows if not r.get("response")]):
        raise ValueError(f"{cfg.data}: --stage sft needs a `response` in every row; {len(missing)} rows have none "
                         f"(first: id {missing[0]!r})")
    model, units, config = build_sharded(cfg.init_from, cfg.train, d, cfg.activation_checkpointing,
                                         cfg.compile_blocks)
    ref = build_sharded(cfg.init_from, "", d, cfg.activation_checkpointing)[0] if cfg.kl_beta > 0 else None
    copy = build_rollout_copy(config, cfg.init_from, d.device)
    refresh(copy, units)
    stop_ids, banned_ids = special_ids(tokenizer)
    compile = cfg.compile if cfg.compile is not None else d.device.type == "cuda"
    slots = cfg.prompts_per_step // d.world * (cfg.group_size if cfg.stage == "grpo" else 1)
    sampler = Sampler(copy, max_slots=max(slots, cfg.eval_samples, 1), max_len=cfg.max_len, stop_ids=stop_ids,
                      banned_ids=banned_ids, compile=compile)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95),
                                  foreach=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    get_state_dict(model, optimizer)  # gives every trainable parameter its optimizer state now: saves are complete
    pad = stop_ids[0] if stop_ids else 0
    dummy = Sequence(row=-1, prompt=[pad], response=[pad], pixel_values=None, weight=0.0)
    return Run(cfg, d, model, units, copy, sampler, ref, optimizer, scheduler,
               PromptStream(len(rows), cfg.seed, cfg.curriculum), rows, eval_rows, tokenizer, stop_ids,
               critical_token_ids(tokenizer), dummy)


def encode_row(run: Run, i: int):
    """data.encode, or None for a row that cannot run (an image that fails to decode past its header, a prompt with
    no room in max_len): such a row is skipped with a one-time warning and counted, never stops training."""
    try:
        ex = encode(run.rows[i], run.tokenizer, run.copy.config, run.cfg.max_tiles)
        room = run.cfg.max_len - len(ex.prompt_ids) - (len(ex.response_ids) if run.cfg.stage == "sft" else 1)
        if room < 0:
            raise ValueError(f"prompt of {len(ex.prompt_ids)} tokens (+ response) does not fit --max_len "
                             f"{run.cfg.max_len}")
        return ex
    except (OSError, ValueError) as e:
        if i not in run.skipped_rows:
            print(f"[rank {run.d.rank}] skipping row {run.rows[i]['id']!r}: {e}", file=sys.stderr, flush=True)
        run.skipped_rows.add(i)
        return None

# -----------------------------------------------------------------------------------------------------------------
# A GRPO step: roll out groups on the live weights, score, keep informative groups, update


def request_seed(seed: int, step: int, rnd: int, row: int) -> int:
    """One sampling seed per (run seed, step, round, row), whichever rank draws the prompt: the same prompts give
    the same samples under any number of processes."""
    return (((seed * 1000003 + step) * 1009 + rnd) * 1000003 + row) % 2**62


def score(run: Run, texts: list[str], rows: list[dict], num_tokens: list[int]) -> list[dict]:
    """reward.score_batch; a failure scores 0 with an error (counted in the metrics) and never stops training."""
    cfg = run.cfg
    reward_cfg = reward.RewardConfig(format_weight=cfg.format_weight, max_len=cfg.max_new_tokens,
                                     cache_len=cfg.overlong_buffer, overlong_weight=1.0 if cfg.overlong_buffer else 0.0)
    workers = cfg.reward_workers or (1 if (os.cpu_count() or 1) <= 4 else None)
    try:
        return reward.score_batch(texts, rows, reward_cfg, num_tokens, workers=workers)
    except Exception as e:  # noqa: BLE001 - e.g. a broken worker pool: this batch scores 0, training goes on
        failed = {"accuracy": 0.0, "format": 0.0, "overlong": 0.0, "reward": 0.0, "error": f"score_batch: {e}"}
        return [dict(failed) for _ in texts]


def decode(run: Run, ids: list[int]) -> str:
    """A response's text for the reward: the stop token dropped, other special tokens (<think> in Qwen's
    vocabulary) kept."""
    return run.tokenizer.decode(ids[:-1] if ids and ids[-1] in run.stop_ids else ids, skip_special_tokens=False)


def progress_line(run: Run, step: int, every_s: float = 10.0):
    """For rank 0's sampler: a line every `every_s` seconds while a rollout runs (quiet for short ones)."""
    if run.d.rank != 0:
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


def rollout(run: Run, step: int) -> tuple[list[Sequence], dict]:
    """Rounds of prompts_per_step prompts (global) until enough groups carry signal (dynamic sampling), then the
    first prompts_per_step informative groups in the global prompt order are kept."""
    cfg, d, G = run.cfg, run.d, run.cfg.group_size
    kept: dict[tuple[int, int], list[Sequence]] = {}  # (round, position in the round's global order) -> group
    sums = dict(reward=0.0, reward_sq=0.0, accuracy=0.0, format=0.0, length=0.0, truncated=0.0, errors=0.0,
                samples=0.0, groups=0.0, informative=0.0)
    longest, rounds = 0, 0
    t0 = time.perf_counter()
    for rnd in range(cfg.max_rounds):
        rounds += 1
        mine = list(enumerate(run.stream.take(cfg.prompts_per_step)))[d.rank::d.world]
        encoded = [(pos, i, ex) for pos, i in mine if (ex := encode_row(run, i)) is not None]
        requests = [Request(ex.prompt_ids, ex.pixel_values, seed=request_seed(cfg.seed, step, rnd, i))
                    for _, i, ex in encoded]
        groups = run.sampler.generate(requests, num_samples=G, max_new_tokens=cfg.max_new_tokens,
                                      temperature=cfg.temperature, top_p=1.0, top_k=0,
                                      progress=progress_line(run, step)) if requests else []
        flat = [(i, ex, c) for (_, i, ex), group in zip(encoded, groups) for c in group]
        scores = score(run, [decode(run, c.ids) for _, _, c in flat], [run.rows[i] for i, _, _ in flat],
                       [len(c.ids) for _, _, c in flat])
        rewards = torch.tensor([s["reward"] for s in scores], dtype=torch.float64).view(len(encoded), G)
        right = torch.tensor([s["accuracy"] for s in scores]).view(len(encoded), G)
        advantages = advantages_of(rewards, cfg.adv_std)
        for g, (pos, i, ex) in enumerate(encoded):
            if cfg.dynamic_sampling and rewards[g].max() == rewards[g].min():
                continue  # all equal: zero advantage everywhere, no signal
            kept[rnd, pos] = [Sequence(i, ex.prompt_ids, c.ids, ex.pixel_values, float(advantages[g, j]),
                                       c.logprobs, truncated=c.finish_reason == "length")
                              for j, c in enumerate(groups[g])]
        sums["reward"] += rewards.sum().item()
        sums["reward_sq"] += (rewards ** 2).sum().item()
        sums["accuracy"] += right.sum().item()
        sums["format"] += sum(s["format"] for s in scores)
        sums["length"] += sum(len(c.ids) for _, _, c in flat)
        sums["truncated"] += sum(c.finish_reason == "length" for _, _, c in flat)
        sums["errors"] += sum(s["error"] is not None for s in scores)
        sums["samples"] += len(flat)
        sums["groups"] += len(encoded)
        longest = max([longest] + [len(c.ids) for _, _, c in flat])
        for results in all_gather([(i, int(right[g].sum()), G) for g, (_, i, _) in enumerate(encoded)]):
            run.stream.record(results)  # every rank records every prompt: the curriculum order stays identical
        total_kept, = all_sum(len(kept), device=d.device)
        if not cfg.dynamic_sampling or total_kept >= cfg.prompts_per_step:
            break
    sums["informative"] = len(kept)
    # The first prompts_per_step informative groups in the global prompt order, whichever rank holds them: the same
    # groups are trained on under any number of processes.
    first = sorted(key for keys in all_gather(list(kept)) for key in keys)[:cfg.prompts_per_step]
    kept = {key: group for key, group in kept.items() if key in first}
    for key, group in kept.items():
        for j, s in enumerate(group):
            s.order = first.index(key) * G + j
    totals = dict(zip(sums, all_sum(*sums.values(), device=d.device)))
    n = max(totals["samples"], 1)
    mean = totals["reward"] / n
    metrics = dict(reward=mean, reward_std=math.sqrt(max(0.0, totals["reward_sq"] / n - mean ** 2)),
                   accuracy=totals["accuracy"] / n, format=totals["format"] / n, response_len=totals["length"] / n,
                   response_len_max=all_max(longest, device=d.device)[0], truncated=totals["truncated"] / n,
                   kept_groups=totals["informative"] / max(totals["groups"], 1), reward_errors=int(totals["errors"]),
                   rounds=rounds, rollout_tokens=int(totals["length"]), skipped_rows=len(run.skipped_rows),
                   t_rollout=time.perf_counter() - t0)
    return [s for key in sorted(kept) for s in kept[key]], metrics


def forward(model: VLM, mb: MicroBatch, temperature: float = 1.0):
    """Per-token (log-probs, entropy) from inside the sharded model's forward (see VLM.forward)."""
    return model(mb.input_ids, mb.pixel_values, targets=mb.targets, temperature=temperature)


def optimizer_step(run: Run, loss_total: float) -> dict:
    """Clip, then step unless the loss or the gradient norm is not finite (then the update is dropped, logged,
    and three such steps in a row stop the run after a save)."""
    cfg = run.cfg
    params = [p for p in run.model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    norm = float(norm.full_tensor() if isinstance(norm, DTensor) else norm)  # DTensor: sharded norms combined
    finite = math.isfinite(loss_total) and math.isfinite(norm)
    lr = run.scheduler.get_last_lr()[0]
    if finite:
        run.optimizer.step()
        run.bad_steps = 0
    else:
        run.bad_steps += 1
        print(f"[rank {run.d.rank}] non-finite loss {loss_total} or grad norm {norm}: update skipped "
              f"({run.bad_steps} in a row)", file=sys.stderr, flush=True)
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    return dict(grad_norm=norm, lr=lr, skipped=not finite)


def grpo_update(run: Run, seqs: list[Sequence]) -> dict:
    """`updates_per_rollout` optimizer steps over the kept sequences, each a token-level mean over its sequences'
    response tokens on all ranks."""
    cfg, d = run.cfg, run.d
    dtype = run.copy.language_model.embed_tokens.weight.dtype
    t0 = time.perf_counter()
    stats, gap_sum, gap_max, crit = LossStats(), 0.0, 0.0, [0.0, 0.0, 0.0, 0.0]  # crit: sum, n, all sum, all n
    t_logprob = 0.0

    def observe(mb: MicroBatch, logprobs, entropy):  # pre-update trainer vs sampler, entropy metrics
        nonlocal gap_sum, gap_max
        m = mb.mask > 0
        gap = (logprobs.detach() - mb.sampler_logprobs).abs()[m]
        gap_sum, gap_max = gap_sum + gap.sum().item(), max(gap_max, gap.max().item() if gap.numel() else 0.0)
        c = critical_entropy(mb.targets, entropy.detach(), m, run.critical_ids)
        for k, v in enumerate((c.critical, c.num_critical, c.total, c.num_tokens)):
            crit[k] += v

    def batches(part: list[Sequence]) -> list[tuple[list[Sequence], MicroBatch]]:
        count = int(all_max(math.ceil(len(part) / cfg.micro_batch), device=d.device)[0])
        return [(b, pack(b, d.device, dtype, cfg.mask_truncated))
                for b in micro_batches(part, cfg.micro_batch, count, run.dummy)]

    if cfg.updates_per_rollout > 1:  # old log-probs: the trainer's, before any of this rollout's updates
        t_logprob = -time.perf_counter()
        with torch.no_grad():
            for chunk, mb in batches(seqs):
                logprobs, entropy = forward(run.model, mb, cfg.temperature)
                observe(mb, logprobs, entropy)
                for b, s in enumerate(chunk):
                    P, R = len(s.prompt), len(s.response)
                    s.old_logprobs = logprobs[b, P - 1:P + R - 1].cpu()
        t_logprob += time.perf_counter()
    parts = [[s for s in seqs if s.order % cfg.updates_per_rollout == k] for k in range(cfg.updates_per_rollout)]
    results = []
    for part in parts:
        weight = lambda s: 0.0 if cfg.mask_truncated and s.truncated else len(s.response)
        tokens, = all_sum(sum(weight(s) for s in part), device=d.device)
        loss_total = 0.0
        for _, mb in batches(part):
            logprobs, entropy = forward(run.model, mb, cfg.temperature)
            ref = None
            if run.ref is not None:
                with torch.no_grad():
                    ref = forward(run.ref, mb, cfg.temperature)[0]
            if cfg.updates_per_rollout == 1:
                observe(mb, logprobs, entropy)
            old = mb.old_logprobs if mb.old_logprobs is not None else logprobs.detach()
            loss, st = grpo_loss(logprobs, old, mb.advantages, mb.mask, cfg, mb.sampler_logprobs, ref, entropy)
            (loss * d.world / max(tokens, 1.0)).backward()
            loss_total += loss.item() / max(tokens, 1.0)
            stats.add(st)
        loss_total, = all_sum(loss_total, device=d.device)
        results.append(optimizer_step(run, loss_total) | {"loss": loss_total})
    refresh(run.copy, run.units)
    s = dict(zip(asdict(stats), all_sum(*asdict(stats).values(), device=d.device)))
    gsum = all_sum(gap_sum, *crit, device=d.device)
    n = max(s["tokens"], 1.0)
    return dict(loss=sum(r["loss"] for r in results) / len(results), grad_norm=results[-1]["grad_norm"],
                lr=results[-1]["lr"], skipped=any(r["skipped"] for r in results),
                clip_low=s["clipped_low"] / n, clip_high=s["clipped_high"] / n, kl=s["kl"] / n,
                entropy=gsum[3] / max(gsum[4], 1.0), critical_entropy=gsum[1] / gsum[2] if gsum[2] else math.nan,
                logprob_gap=gsum[0] / max(gsum[4], 1.0), logprob_gap_max=all_max(gap_max, device=d.device)[0],
                t_logprob=t_logprob, t_update=time.perf_counter() - t0 - t_logprob, update_tokens=int(s["tokens"]),
                forward_tokens=int(all_sum(sum(len(x.prompt) + len(x.response) for x in seqs), device=d.device)[0]))

# -----------------------------------------------------------------------------------------------------------------
# An SFT step: teacher-forced log-likelihood of the rows' responses


def sft_step(run: Run, step: int) -> dict:
    cfg, d = run.cfg, run.d
    dtype = run.copy.language_model.embed_tokens.weight.dtype
    t0 = time.perf_counter()
    mine = run.stream.take(cfg.prompts_per_step)[d.rank::d.world]
    seqs = [Sequence(i, ex.prompt_ids, ex.response_ids, ex.pixel_values) for i in mine
            if (ex := encode_row(run, i)) is not None]
    tokens, = all_sum(sum(len(s.response) for s in seqs), device=d.device)
    count = int(all_max(math.ceil(len(seqs) / cfg.micro_batch), device=d.device)[0])
    loss_total, entropy_sum = 0.0, 0.0
    for chunk in micro_batches(seqs, cfg.micro_batch, count, run.dummy):
        mb = pack(chunk, d.device, dtype, mask_truncated=False)
        logprobs, entropy = forward(run.model, mb)
        loss = -(logprobs * mb.mask).sum()
        (loss * d.world / max(tokens, 1.0)).backward()
        loss_total += loss.item() / max(tokens, 1.0)
        entropy_sum += (entropy.detach() * mb.mask).sum().item()
    loss_total, entropy_sum = all_sum(loss_total, entropy_sum, device=d.device)
    metrics = optimizer_step(run, loss_total)
    run.stale = True
    forward_tokens, = all_sum(sum(len(x.prompt) + len(x.response) for x in seqs), device=d.device)
    return dict(loss=loss_total, entropy=entropy_sum / max(tokens, 1.0), update_tokens=int(tokens),
                forward_tokens=int(forward_tokens),
                skipped_rows=len(run.skipped_rows), t_update=time.perf_counter() - t0) | metrics

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
    if run.d.device.type != "cuda":
        return None
    peak = next((v for k, v in PEAK_FLOPS.items() if k in torch.cuda.get_device_name()), None)
    params = sum(p.numel() for p in run.copy.parameters())
    return 6 * params * m["forward_tokens"] / (m["t_update"] * run.d.world * peak) if peak else None


def jsonable(m: dict) -> dict:
    """nan and inf (no critical token this step, no samples) as null: strict JSON that any tool reads."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in m.items()}

# -----------------------------------------------------------------------------------------------------------------
# Held-out evaluation (eval.py's scoring) and checkpoint selection


def sync_copy(run: Run):
    if run.stale:
        refresh(run.copy, run.units)
        run.stale = False


def heldout(run: Run, step: int) -> dict:
    """Greedy and avg@k accuracy, format rate, response length and critical-token entropy on --eval_data with
    eval.py's scoring, the rows split across ranks; OUT/best/ keeps the best checkpoint by --select."""
    from eval import EvalConfig, evaluate, results_json  # eval.py builds on rollout.py and data.py, not on this file
    cfg, out = run.cfg, Path(run.cfg.out)
    sync_copy(run)
    t0 = time.perf_counter()
    eval_cfg = EvalConfig(max_new_tokens=cfg.max_new_tokens, max_len=cfg.max_len, samples=cfg.eval_samples,
                          temperature=cfg.temperature, max_tiles=cfg.max_tiles, seed=cfg.seed)
    result = evaluate(run.copy, run.tokenizer, run.eval_rows, eval_cfg, sampler=run.sampler)
    summary = {k: v for k, v in result.items() if isinstance(v, (int, float))}
    summary |= dict(step=step, t_eval=time.perf_counter() - t0)
    value = summary["greedy_accuracy"] if cfg.select == "accuracy" else summary["critical_entropy"]
    if run.d.rank == 0:  # every prompt, response, extracted answer and verdict, as eval.py writes them
        write_atomic(out / f"eval_step_{step:06d}.json", json.dumps(results_json(
            result, eval_cfg, checkpoint=f"{out} step {step}", init_from=cfg.init_from, data=cfg.eval_data,
            stage=cfg.stage, step=step), indent=1))
        with open(out / "eval.jsonl", "a") as f:
            f.write(json.dumps(jsonable(summary)) + "\n")
        best_file = out / "best.json"
        best = json.loads(best_file.read_text()) if best_file.is_file() else None
        if math.isfinite(value) and (best is None or value > best["value"]):
            save_model(run.copy, out / "best")
            write_atomic(best_file, json.dumps(jsonable(dict(select=cfg.select, value=value, **summary)),
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
    return {"scheduler": run.scheduler.state_dict(), "stream": run.stream.state(),
            "meta": {"step": step, "stage": run.cfg.stage, "bad_steps": run.bad_steps}}


def train(cfg: TrainConfig) -> dict:
    """One stage from `init_from` to OUT/step_NNNNNN (the last is also OUT/latest); returns the last held-out
    evaluation (empty without --eval_data) and where the final checkpoint is."""
    d = init_distributed()
    set_threads(cfg.threads, d.world)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    previous = latest_checkpoint(out)
    if previous and not cfg.resume:
        raise FileExistsError(f"{out} already holds checkpoints (latest {previous.name}): pass --resume to continue "
                              f"that run, or choose another --out")
    run = setup(cfg, d)
    if d.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        print(f"{cfg.stage} on {d.world} process(es), {d.device}, {torch.get_num_threads()} threads each; "
              f"{len(run.rows)} rows, {len(run.eval_rows)} held-out; config:\n{json.dumps(asdict(cfg), indent=1)}",
              flush=True)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    start = 0
    if cfg.resume and previous:
        state = load_checkpoint(previous, d, run.model, run.optimizer, training_state(run, 0))
        if state["meta"]["stage"] != cfg.stage:
            raise ValueError(f"{previous} is a {state['meta']['stage']} checkpoint; this run is --stage {cfg.stage}")
        run.scheduler.load_state_dict(state["scheduler"])
        run.stream.load(state["stream"])
        run.bad_steps, start = int(state["meta"]["bad_steps"]), int(state["meta"]["step"])
        refresh(run.copy, run.units)
        if d.rank == 0:
            print(f"resumed from {previous} (step {start})", flush=True)
    metrics_file = out / "metrics.jsonl"
    if d.rank == 0:  # a killed run may have logged steps after its last checkpoint: those are about to rerun
        lines = metrics_file.read_text().splitlines() if metrics_file.is_file() else []
        kept = [x for x in lines if json.loads(x)["step"] <= start]
        if kept != lines or not metrics_file.is_file():
            write_atomic(metrics_file, "".join(f"{x}\n" for x in kept))
    wandb = _wandb(cfg) if d.rank == 0 else None
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: setattr(run, "stopping", True))
    last_eval, saved = {}, None
    try:
        for step in range(start + 1, cfg.steps + 1):
            t0 = time.perf_counter()
            if d.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(d.device)
            if cfg.stage == "grpo":
                seqs, m = rollout(run, step)
                m |= grpo_update(run, seqs)
            else:
                m = sft_step(run, step)
            m |= dict(stage=cfg.stage, step=step, t_step=time.perf_counter() - t0,
                      peak_mem_mb=all_max(peak_memory_mb(d.device), device=d.device)[0])
            m["tokens_per_s"] = m.get("rollout_tokens", m["update_tokens"]) / m["t_step"]
            if (u := mfu(run, m)) is not None:
                m["mfu"] = u
            if d.rank == 0:
                print(log_line(m, cfg.steps), flush=True)
                with open(metrics_file, "a") as f:
                    f.write(json.dumps(jsonable(m)) + "\n")
                if wandb:
                    wandb.log(m, step=step)
            stopping = bool(all_max(float(run.stopping), device=d.device)[0])
            last = step == cfg.steps or stopping or run.bad_steps >= 3
            if run.eval_rows and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
                last_eval = heldout(run, step)
            if last or (cfg.save_every and step % cfg.save_every == 0):
                sync_copy(run)
                saved = save_checkpoint(out, step, d, run.model, run.optimizer, training_state(run, step), run.copy,
                                        json.dumps(asdict(cfg), indent=2) + "\n", cfg.keep)
            if run.bad_steps >= 3:
                raise RuntimeError(f"{run.bad_steps} non-finite steps in a row at step {step}: saved {saved} and "
                                   f"stopped (lower --lr, check the data, or resume from an earlier checkpoint)")
            if last:
                if stopping and d.rank == 0:
                    print(f"SIGTERM: saved {saved} at step {step}; continue with --resume", flush=True)
                break
        else:  # resumed at or past the last step: nothing to run
            saved = latest_checkpoint(out)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if wandb:
            wandb.finish()
    return dict(eval=last_eval, checkpoint=str(saved), model=str(saved / "model") if saved else None)


def _wandb(cfg: TrainConfig):
    if not cfg.wandb:
        return None
    try:
        import wandb
    except ImportError:
        print("--wandb: the wandb package is not installed (pip install wandb); logging to metrics.jsonl only")
        return None
    wandb.init(project=cfg.wandb, config=asdict(cfg))
    return wandb

# -----------------------------------------------------------------------------------------------------------------
# Command line


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in TrainConfig.__dataclass_fields__.values():
        kind = next(t for t in (bool, int, float, str) if t is f.type or t in typing.get_args(f.type))
        if kind is bool:
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default,
                           help=f.metadata["help"])
        else:
            p.add_argument(f"--{f.name}", type=kind, default=f.default, help=f.metadata["help"],
                           choices=f.metadata["choices"])
    p.add_argument("--bench", action="store_true", help="time GRPO steps of the tiny task, 1 vs 2 processes "
                   "(see default_run.py)")
    p.add_argument("--connector_stage", type=int, default=0, help="default run only: after GRPO, N steps of R1V3's "
                   "connector-only stage (GRPO with --train connector)")
    return p


def main():
    p = parser()
    args = p.parse_args()
    given = {a.dest for a in p._actions if any(s in sys.argv[1:] or any(x.startswith(s + "=") for x in sys.argv[1:])
                                               for s in a.option_strings)}
    fields = {k: getattr(args, k) for k in TrainConfig.__dataclass_fields__}
    try:
        if args.bench:
            from default_run import bench
            bench(fields, given)
        elif args.data is None and args.init_from is None:
            from default_run import run_default
            run_default(fields, given, args.connector_stage)
        else:
            train(TrainConfig(**fields))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
