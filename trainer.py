"""What a training run of train_rl.py is made of: its settings (TrainConfig, every flag), the policy being trained
(the FSDP-sharded model, its optimizer and schedule, the plain copy the sampler reads), the data and how rows become
model inputs, the checks made before step 0, the state a checkpoint keeps and the settings a resume may change,
held-out evaluation with checkpoint selection, and the step's log line. train_rl.py holds the recipe (the GRPO and
SFT steps) and the loop that calls them.

    python train_rl.py --help      # every TrainConfig field as a flag
"""
import hashlib
import json
import math
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.tensor import DTensor

import cli
import verifier
from checkpoint import read_config, save_model
from cli import InputError, UsageError, arg
from data import (ChatTemplate, Example, MicroBatch, PromptStream, Sequence, check_tokenizer, encode,
                  load_chat_template, load_rows, load_tokenizer, micro_batch_plan, pack, special_ids)
from entropy import critical_token_ids
from eval import EvalConfig, evaluate, results_json
from model import VLM
from parallel import (MODULES, Dist, TPLayout, all_gather, all_max, all_sum, build_rollout_copy, build_sharded,
                      check_tp, gathered, precision, refresh, tp_generate, tp_layout)
from rollout import Sampler
from rundir import load_checkpoint

# -----------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class LossConfig:
    """The settings of the clipped policy-gradient loss: TrainConfig's fields of the same names, where their defaults
    and help live; no KL term and no entropy bonus unless given."""
    clip_low: float
    clip_high: float
    dual_clip: float
    tis_cap: float
    kl_beta: float = 0.0
    entropy_coef: float = 0.0


@dataclass
class TrainConfig:
    init_from: str | None = arg(None, "checkpoint directory in any layout checkpoint.py loads (remote, native, qwen2, "
                                "qwen3)")
    data: str | None = arg(None, "training JSONL of data.py rows (SFT rows need a `response`)")
    eval_data: str | None = arg(None, "held-out JSONL, evaluated every --eval_every steps and at the end (SFT: "
                                "val_loss on its responses; generation too unless --select val_loss)")
    out: str = arg("out/run", "output directory: checkpoints, metrics.jsonl, eval.jsonl, best/")
    stage: str = arg("grpo", "sft (cold start) or grpo", ("sft", "grpo"))
    train: str = arg("connector,llm", "trainable modules, a comma list of vit, connector, llm (R1V3: the connector "
                     "stays trainable in RL; `connector` alone is its connector-only stage)")
    steps: int = arg(100, "optimizer steps (GRPO: rollouts); --epochs > 0 replaces it")
    epochs: float = arg(0.0, "SFT: passes over --data; when > 0 the steps are ceil(epochs x rows / "
                        "prompts_per_step) and --steps is ignored (R1V3's connector stage: 2)")
    prompts_per_step: int = arg(32, "global prompts (groups) per GRPO step; global sequences per SFT step (R1V3: 32)")
    group_size: int = arg(32, "GRPO samples per prompt (R1V3: 32, so 1,024 rollouts per step)")
    micro_batch: int = arg(16, "sequences per forward/backward on each process (when --micro_batch_tokens is unset)")
    micro_batch_tokens: int | None = arg(None, "padded tokens (count x longest prompt + response) per forward/backward "
                                         "on each process, a bound: the packed row runs each prompt once; "
                                         "length-sorted micro-batches that fill this budget, a prompt's samples "
                                         "together (unset: --micro_batch sequences)")
    max_new_tokens: int = arg(1024, "response length cap")
    max_len: int = arg(4096, "prompt + response tokens of a sequence, at most")
    kv_tokens: int | None = arg(None, "KV pool budget in tokens per sampler (pages shared by the running "
                                "sequences; unset: half the GPU memory free after the model is built, 128 MiB on a "
                                "CPU)")
    max_tiles: int | None = arg(None, "tile cap per image (default: the checkpoint's max_dynamic_patch)")
    temperature: float = arg(1.0, "rollout temperature; log-probs are taken at the same temperature")
    lr: float = arg(1e-5, "peak learning rate (AdamW, betas 0.9/0.95; R1V3: 1e-5, with 1e-6 the safer low end)")
    schedule: str = arg("constant", "constant or cosine (down to min_lr_ratio x lr), after linear warmup",
                        ("constant", "cosine"))
    warmup_steps: int = arg(0, "linear warmup steps")
    warmup_ratio: float = arg(0.0, "warmup as a fraction of the steps: when > 0, round(ratio x steps) warmup steps "
                              "replace --warmup_steps (R1V3's connector stage: 0.03)")
    min_lr_ratio: float = arg(0.1, "cosine floor as a fraction of --lr")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    grad_clip: float = arg(1.0, "max global gradient norm (0: no clipping, the norm is still logged)")
    clip_low: float = arg(0.2, "PPO clip below: ratio >= 1 - clip_low")
    clip_high: float = arg(0.2, "PPO clip above: ratio <= 1 + clip_high (R1V3: 0.2, symmetric; DAPO's clip-higher: "
                           "0.28)")
    dual_clip: float = arg(3.0, "cap a negative-advantage token's loss at dual_clip x |A| (0: off)")
    kl_beta: float = arg(0.0, "weight of the k3 KL to a frozen reference (0: no reference is built)")
    entropy_coef: float = arg(0.0, "entropy bonus weight")
    tis_cap: float = arg(2.0, "truncated importance weight min(p_trainer / p_sampler, cap) (0: off)")
    adv_std: bool = arg(True, "divide advantages by the group's reward std (--no-adv_std: Dr. GRPO)")
    updates_per_rollout: int = arg(1, "optimizer steps per rollout (> 1 recomputes old log-probs first)")
    dynamic_sampling: bool = arg(False, "DAPO: drop groups whose rewards are all equal and roll out more prompts "
                                 "(R1V3 found it stabilised training but did not improve validation)")
    max_rounds: int = arg(4, "rollout rounds per step at most, when dynamic sampling keeps too few groups")
    mask_truncated: bool = arg(False, "leave responses cut at max_new_tokens out of the loss")
    accuracy_weight: float = arg(0.8, "reward weight of accuracy (R1V3: 0.8)")
    format_weight: float = arg(0.2, "reward weight of the format check (<think>...</think> then an answer; R1V3: 0.2)")
    verifier: str | None = arg(None, "text checkpoint (e.g. Qwen2.5-Instruct) asked about the answers the rule check "
                               "scores 0: accuracy is rule OR verifier (R1V3); unset: rules only")
    system: str | None = arg(None, "system message of every prompt (R1V3's inference: \"You are a helpful "
                             "assistant.\")")
    overlong_buffer: int = arg(-1, "DAPO soft overlong penalty over the last N tokens (-1: max_new_tokens // 5, "
                               "0: off)")
    curriculum: str = arg("uniform", "uniform, or pass_rate: each epoch easy -> hard, always-solved rows skipped",
                          ("uniform", "pass_rate"))
    save_every: int = arg(0, "checkpoint every N steps (0: only at the end)")
    eval_every: int = arg(0, "held-out evaluation every N steps (0: only at the end)")
    eval_samples: int = arg(8, "held-out samples per question at the rollout temperature, for avg@k (0: greedy "
                            "only)")
    eval_limit: int = arg(0, "evaluate only the first N held-out rows (0: all)")
    select: str = arg("accuracy", "best checkpoint (OUT/best) by held-out accuracy, by critical_entropy (R1V3), or "
                      "(SFT) by the lowest val_loss: then generation is not evaluated",
                      ("accuracy", "critical_entropy", "val_loss"))
    patience: int = arg(0, "SFT: stop (saving) when val_loss has not improved for P evaluations in a row (0: off)")
    keep: int = arg(0, "keep the N newest step checkpoints (0: all)")
    resume: bool = arg(False, "continue from OUT/latest, the newest complete checkpoint")
    seed: int = arg(0, "data order and sampling seed")
    compile: bool | None = arg(None, "compile the sampler's decode step (default: on CUDA; on a CPU, GRPO runs long "
                               "enough to pay the compile back, where a C++ compiler builds inductor's kernels)")
    compile_blocks: bool = arg(False, "torch.compile each transformer block of the trainer")
    rollout_tp: int = arg(1, "ranks that hold one rollout copy split between them (tensor parallelism of the "
                          "sampler's weights: heads and MLP channels; a 38B copy fits 80 GB cards at 2); must divide "
                          "the processes of a node and the checkpoint's heads, key/value heads and MLP channels")
    activation_checkpointing: bool = arg(False, "recompute each block's activations in backward")
    precision: str = arg("auto", "dtypes (parallel.precision): auto is bf16 parameters, rollout copy and KV with fp32 "
                         "masters and gradient reduction on CUDA, fp32 on a CPU; bf16 forces that on a CPU",
                         ("auto", "fp32", "bf16"))
    reward_workers: int = arg(0, "reward scoring processes (0: one per core, 1 on a machine of <= 4 cores)")
    threads: int = arg(0, "torch CPU threads per process (0: the node's cores split between its processes)")
    wandb: str | None = arg(None, "wandb project to log to, when the wandb package is installed")

    new_data: bool = arg(False, "with --resume: --data is a different file on purpose; the prompt stream restarts "
                         "on its rows at epoch 0 (without it a different --data is refused)")

    def __post_init__(self):
        """Every flag's range, one message per flag naming it and its value (cli.UsageError: exit 2)."""
        def need(ok: bool, name: str, rule: str):
            if not ok:
                raise UsageError(f"--{name} must be {rule}, got {getattr(self, name)!r}")

        need(bool(self.train) and set(self.train.split(",")) <= set(MODULES), "train",
             f"a comma list of {sorted(MODULES)}")
        for name in ("steps", "prompts_per_step", "group_size", "micro_batch", "max_new_tokens", "max_len",
                     "updates_per_rollout", "max_rounds", "rollout_tp"):
            need(getattr(self, name) >= 1, name, ">= 1")
        need(self.micro_batch_tokens is None or self.micro_batch_tokens >= 1, "micro_batch_tokens", ">= 1 (or unset)")
        for name in ("stage", "schedule", "curriculum", "select"):
            choices = next(f for f in fields(self) if f.name == name).metadata["choices"]
            need(getattr(self, name) in choices, name, f"one of {choices}")
        finite = lambda name: math.isfinite(getattr(self, name))
        need(finite("lr") and self.lr > 0, "lr", "finite and > 0")
        need(finite("temperature") and self.temperature > 0, "temperature",
             "finite and > 0 (log-probs are taken at it; GRPO samples at it)")
        need(finite("clip_low") and 0 <= self.clip_low < 1, "clip_low", "in [0, 1)")
        for name in ("clip_high", "dual_clip", "kl_beta", "entropy_coef", "tis_cap", "weight_decay", "grad_clip"):
            need(finite(name) and getattr(self, name) >= 0, name, "finite and >= 0")
        need(finite("format_weight"), "format_weight", "finite")
        need(finite("min_lr_ratio") and 0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "in [0, 1]")
        need(finite("epochs") and self.epochs >= 0, "epochs", "finite and >= 0")
        need(finite("warmup_ratio") and 0 <= self.warmup_ratio < 1, "warmup_ratio", "in [0, 1)")
        for name in ("warmup_steps", "patience", "eval_samples", "eval_limit", "save_every", "eval_every", "keep",
                     "threads", "reward_workers"):
            need(getattr(self, name) >= 0, name, ">= 0")
        need(self.overlong_buffer >= -1, "overlong_buffer", ">= 0, or -1 for max_new_tokens // 5")
        need(self.max_tiles is None or self.max_tiles >= 1, "max_tiles", ">= 1 (or unset)")
        if self.stage == "grpo" and self.group_size < 2:
            raise UsageError(f"--group_size must be >= 2 for --stage grpo (a group of one has advantage 0: nothing "
                             f"to learn), got {self.group_size}")
        if self.max_new_tokens >= self.max_len and (self.stage == "grpo" or self.eval_data):  # SFT alone never samples
            raise UsageError(f"--max_new_tokens {self.max_new_tokens} must be < --max_len {self.max_len} (the prompt "
                             f"needs room too)")
        if self.epochs > 0 and self.stage != "sft":
            raise UsageError(f"--epochs is for --stage sft (GRPO counts rollouts: --steps), got --stage {self.stage}")
        if (self.select == "val_loss" or self.patience) and self.stage != "sft":
            raise UsageError(f"--select val_loss and --patience are for --stage sft (the validation loss is "
                             f"teacher-forced on --eval_data's responses), got --stage {self.stage}")
        if self.overlong_buffer < 0:
            self.overlong_buffer = self.max_new_tokens // 5

    @property
    def warmup(self) -> int:
        """Warmup steps: --warmup_ratio of the steps when given, else --warmup_steps."""
        return round(self.warmup_ratio * self.steps) if self.warmup_ratio > 0 else self.warmup_steps

    @property
    def generates(self) -> bool:
        """Whether the held-out evaluation samples answers (expensive); SFT with --select val_loss does not."""
        return self.select != "val_loss"

    @property
    def loss(self) -> LossConfig:
        return LossConfig(**{f.name: getattr(self, f.name) for f in fields(LossConfig)})


# -----------------------------------------------------------------------------------------------------------------
# What a run holds: the policy being trained, the data, the sampler


def epoch_steps(cfg: TrainConfig) -> TrainConfig:
    """With --epochs: the config with steps = ceil(epochs x rows / prompts_per_step), the number that covers the
    rows of --data that many times (the last step may start another epoch); unchanged without. Rows are the file's
    non-blank lines, which is what data.load_rows reads once setup has accepted the file."""
    if cfg.epochs <= 0:
        return cfg
    with open(cfg.data, "rb") as f:
        rows = sum(1 for line in f if line.strip())
    return replace(cfg, steps=max(1, math.ceil(cfg.epochs * rows / cfg.prompts_per_step)))


def lr_lambda(cfg: TrainConfig):
    warmup = cfg.warmup

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, cfg.steps - warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


@dataclass
class Policy:
    """The weights being trained: the FSDP-sharded model (the parameters the optimizer updates), its units in the
    order every rank unshards them, the optimizer and its schedule, an optional frozen reference (KL term), and the
    plain copy the sampler and evaluation read, refreshed from the trained weights (split across the ranks of a
    tensor-parallel group with --rollout_tp)."""
    model: VLM
    units: list
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    reference: VLM | None
    rollout_model: VLM  # with --rollout_tp: this rank's part of its group's copy
    tp: TPLayout = field(default_factory=TPLayout)
    rollout_stale: bool = False  # SFT refreshes the copy only when something reads it
    bad_steps: int = 0  # non-finite steps in a row
    weights_finite: bool = True  # False once an optimizer step left a non-finite parameter: never saved

    def forward(self, mb: MicroBatch, temperature: float = 1.0, model: VLM | None = None):
        """Per-token (log-probs, entropy) from inside the sharded model's forward (see VLM.forward)."""
        return (model or self.model)(mb.input_ids, mb.pixel_values, targets=mb.targets, temperature=temperature,
                                     positions=mb.positions, cache=mb.attention, image_index=mb.image_index)

    def step(self, loss: float, grad_clip: float, rank: int) -> dict:
        """Clip, then step unless the loss or the gradient norm is not finite (then the update is dropped, logged,
        and three such steps in a row stop the run after a save). After a step the parameters are checked (one
        all-reduced count over every rank's shards): non-finite weights cannot be recovered by later steps, so
        `weights_finite` goes False, the step counts as bad, and the caller stops without saving."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
        norm = float(norm.full_tensor() if isinstance(norm, DTensor) else norm)  # DTensor: sharded norms combined
        finite = math.isfinite(loss) and math.isfinite(norm)
        lr = self.scheduler.get_last_lr()[0]
        if finite:
            self.optimizer.step()
            self.bad_steps = 0
            if not self.weights_are_finite():
                self.weights_finite = False
                self.bad_steps += 1
        else:
            self.bad_steps += 1
            print(f"[rank {rank}] non-finite loss {loss} or grad norm {norm}: update skipped "
                  f"({self.bad_steps} in a row)", file=sys.stderr, flush=True)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.rollout_stale = True
        return dict(loss=loss, grad_norm=norm, lr=lr, skipped=not finite)

    def weights_are_finite(self) -> bool:
        """Whether every trained parameter is finite on every rank (each rank checks its own shards)."""
        local = [p.to_local() if isinstance(p, DTensor) else p for p in self.model.parameters() if p.requires_grad]
        flags = [torch.isfinite(t).all() for t in local if t.numel()]  # one host sync below, not one per tensor
        bad = len(flags) - int(torch.stack(flags).sum()) if flags else 0
        return all_sum(bad, device=next(self.model.parameters()).device)[0] == 0

    def sync_rollout_model(self):
        """The trained weights into the sampler's copy, in place, if they changed since the last copy."""
        if self.rollout_stale:
            refresh(self.rollout_model, self.units, self.tp)
            self.rollout_stale = False

    def saved_copy(self) -> VLM | None:
        """The whole rollout copy, what a checkpoint saves, on rank 0 (parallel.gathered: under --rollout_tp
        gathered from rank 0's group); every rank calls it."""
        return gathered(self.rollout_model, self.tp, self.model.config)


@dataclass
class TrainData:
    """The rows, how they become model inputs, and the order they are taken in."""
    rows: list[dict]
    eval_rows: list[dict]
    tokenizer: object
    stream: PromptStream
    stop_ids: list[int]
    critical_ids: dict
    template: ChatTemplate | None = None  # the checkpoint's chat template (None: plain ChatML)
    skipped: set = field(default_factory=set)  # rows that could not be encoded, each reported once

    def example(self, i: int, cfg: TrainConfig, config, rank: int) -> Example | None:
        """data.encode, or None for a row that cannot run: those found at setup (`check_rows`: no room in max_len,
        an image that fails to decode past its header) are skipped silently, having been reported there; one that
        fails only now is skipped with a one-time warning and counted. Neither stops training."""
        if i in self.skipped:
            return None
        try:
            ex = encode(self.rows[i], self.tokenizer, config, cfg.max_tiles, cfg.system, self.template)
            room = cfg.max_len - len(ex.prompt_ids) - (len(ex.response_ids) if cfg.stage == "sft" else 1)
            if room < 0:
                raise ValueError(f"prompt of {len(ex.prompt_ids)} tokens (+ response) does not fit --max_len "
                                 f"{cfg.max_len}")
            return ex
        except (OSError, ValueError) as e:
            print(f"[rank {rank}] skipping row {self.rows[i]['id']!r}: {e}", file=sys.stderr, flush=True)
            self.skipped.add(i)
            return None


def check_rows(rows: list[dict], tokenizer, template, config, cfg: TrainConfig, proc: Dist) -> dict[int, str]:
    """Every training row encoded once before step 0 (each rank its share of the rows, images loaded, the results
    gathered): {row index: why it cannot train} for the rows that cannot encode or leave no room in --max_len
    (GRPO: prompt + 1 token; SFT: prompt + response). Raises InputError, naming counts and the first rows, when no
    row can train or when rows have images and the checkpoint has no vision tower; prints one warning line with the
    counts when only some rows cannot (they are skipped, step after step)."""
    n, where = len(rows), cfg.data
    if config.vision is None and (imaged := [r["id"] for r in rows if r.get("image")]):
        raise InputError(f"{where}: {len(imaged)} of {n} rows have an image but {cfg.init_from} has no vision tower "
                         f"(a text-only checkpoint); first: id {imaged[0]!r}")
    extra = "response" if cfg.stage == "sft" else "1 token"
    mine = {}
    for i in range(proc.rank, n, proc.world):
        try:
            ex = encode(rows[i], tokenizer, config, cfg.max_tiles, cfg.system, template)
            need = len(ex.prompt_ids) + (len(ex.response_ids) if cfg.stage == "sft" else 1)
            if need > cfg.max_len:
                mine[i] = f"needs {need} tokens (prompt + {extra}) > --max_len {cfg.max_len}"
        except (OSError, ValueError) as e:
            mine[i] = f"cannot be encoded: {e}"
    bad = dict(sorted((k, v) for part in all_gather(mine) for k, v in part.items()))
    if not bad:
        return bad
    long = sum(why.startswith("needs") for why in bad.values())
    first = "; ".join(f"id {rows[i]['id']!r} {why}" for i, why in list(bad.items())[:3])
    counts = f"{long} do not fit --max_len {cfg.max_len} (prompt + {extra}), {len(bad) - long} cannot be encoded"
    if len(bad) == n:
        raise InputError(f"{where}: none of its {n} rows can train: {counts}; first: {first}")
    if proc.rank == 0:
        print(f"warning: {where}: {len(bad)} of {n} rows cannot train and are skipped: {counts}; first: {first}",
              flush=True)
    return bad


def check_checkpoint(cfg: TrainConfig, config, tokenizer):
    """What the flags ask of the checkpoint: the modules to train exist, the tile cap is possible, the tokenizer's
    ids fit the embedding."""
    if config.vision is None:
        names = {"vit": "vision tower (vit)", "connector": "connector (connector)"}
        if missing := [names[m] for m in names if m in cfg.train.split(",")]:
            raise UsageError(f"--train {cfg.train}: the checkpoint has no {' and no '.join(missing)}: "
                             f"{cfg.init_from} is text-only; train llm only")
    if cfg.max_tiles is not None and cfg.max_tiles < config.min_dynamic_patch:
        raise UsageError(f"--max_tiles {cfg.max_tiles} is below the checkpoint's min_dynamic_patch "
                         f"{config.min_dynamic_patch}")
    check_tokenizer(tokenizer, config, cfg.init_from)


@dataclass
class Run:
    """Everything a step needs, built once by `setup`."""
    cfg: TrainConfig
    proc: Dist
    policy: Policy
    sampler: Sampler  # on policy.rollout_model
    data: TrainData
    decode: str  # how the sampler's decode step runs and why (decode_compile), for the run's first line
    stopping: bool = False  # SIGTERM received: save and leave at the end of this step
    val_best: float = math.inf  # the lowest val_loss so far (the same on every rank: it is reduced over them)
    val_stale: int = 0  # evaluations since it last improved (--patience)

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
        count = int(all_max(len(plan), device=self.proc.device)[0])
        dtype = self.policy.rollout_model.language_model.embed_tokens.weight.dtype
        return [pack(b, self.proc.device, dtype, cfg.mask_truncated, config.image_token_id, config.tokens_per_tile)
                for b in plan + [[self.dummy]] * (count - len(plan))]

    def generate(self, requests: list, **kw) -> list:
        """The sampler's completions of this rank's `requests`; under --rollout_tp the ranks of a group generate
        all of theirs together (parallel.tp_generate)."""
        return tp_generate(self.sampler, requests, self.policy.tp, **kw)


# A compiled CPU decode step saves a few milliseconds a step and costs tens of seconds to compile, once per sampling
# setting (README: compiling the decode step): a GRPO run planning fewer decode steps than this stays eager.
CPU_COMPILE_DECODE_STEPS = 10_000


def inductor_builds() -> str | None:
    """None if inductor builds and runs a CPU kernel here (a C++ compiler, with OpenMP), else the error's first line.
    Cheap where the kernel is cached; a laptop without a toolchain fails here instead of in the first rollout."""
    try:
        torch.compile(lambda x: x * 2 + 1, fullgraph=True, options=dict(cpp_wrapper=True))(torch.ones(4))
    except Exception as e:  # inductor raises many kinds (no compiler, no OpenMP, a failed link): all mean eager
        return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
    return None


def decode_compile(cfg: TrainConfig, device: torch.device) -> tuple[bool, str]:
    """Whether the sampler compiles its decode step, and the run log's words for it. --compile / --no-compile
    decide; unset, CUDA compiles (CUDA graphs), and a CPU compiles a GRPO run of at least CPU_COMPILE_DECODE_STEPS
    planned decode steps (steps x max_new_tokens) where inductor builds kernels, eager otherwise."""
    graphs = "compiled (once per sampling setting: the first rollout waits for it)"
    if cfg.compile is not None:
        return cfg.compile, graphs if cfg.compile else "eager"
    if device.type == "cuda":
        return True, graphs
    planned = cfg.steps * cfg.max_new_tokens if cfg.stage == "grpo" else 0
    if planned < CPU_COMPILE_DECODE_STEPS:
        return False, (f"eager (a CPU compile pays back past {CPU_COMPILE_DECODE_STEPS:,} decode steps, this run "
                       f"plans {planned:,}: --compile to compile anyway)")
    if error := inductor_builds():
        return False, f"eager (inductor cannot build kernels here: {error})"
    return True, f"{graphs}; a CPU run of {planned:,} planned decode steps (--no-compile: eager)"


def check_paths(cfg: TrainConfig):
    """The files a run reads exist: before OUT is locked (created) and before anything is loaded."""
    if not cfg.init_from or not Path(cfg.init_from).is_dir():
        raise FileNotFoundError(f"--init_from: checkpoint directory not found: {cfg.init_from!r}")
    if not cfg.data:
        raise UsageError("--data: a training JSONL file is required")
    if (cfg.select == "val_loss" or cfg.patience) and not cfg.eval_data:
        raise UsageError("--select val_loss and --patience need --eval_data: held-out rows with a `response`")
    for flag, path in (("data", cfg.data), ("eval_data", cfg.eval_data)):
        if path and not Path(path).is_file():
            raise FileNotFoundError(f"--{flag}: data file not found: {path}")


def setup(cfg: TrainConfig, proc: Dist) -> Run:
    """Everything is checked before step 0: the checkpoint, the data rows (every problem reported at once), the
    stage's needs; then the sharded model, the rollout copy and its sampler, the optimizer."""
    check_paths(cfg)
    if cfg.prompts_per_step % proc.world:
        raise UsageError(f"--prompts_per_step {cfg.prompts_per_step} must be a multiple of the {proc.world} "
                         f"processes")
    try:
        config = read_config(cfg.init_from)
    except ValueError as e:  # its message names the file and the field
        raise InputError(str(e)) from None
    tokenizer = load_tokenizer(cfg.init_from)
    check_checkpoint(cfg, config, tokenizer)
    check_tp(cfg.rollout_tp, proc.world, int(os.environ.get("LOCAL_WORLD_SIZE", proc.world)), config)
    rows = load_rows(cfg.data)
    eval_rows = load_rows(cfg.eval_data) if cfg.eval_data else []
    if cfg.eval_limit:
        eval_rows = eval_rows[:cfg.eval_limit]
    if cfg.stage == "sft" and (missing := [r["id"] for r in rows if not r.get("response")]):
        raise InputError(f"{cfg.data}: --stage sft needs a `response` in every row; {len(missing)} rows have none "
                         f"(first: id {missing[0]!r})")
    if cfg.stage == "sft" and eval_rows and (missing := [r["id"] for r in eval_rows if not r.get("response")]):
        if cfg.select == "val_loss" or cfg.patience:
            raise InputError(f"{cfg.eval_data}: --select val_loss and --patience need a `response` in every "
                             f"held-out row; {len(missing)} rows have none (first: id {missing[0]!r})")
        if proc.rank == 0:
            print(f"note: {cfg.eval_data}: {len(missing)} held-out rows have no `response`: no val_loss, generation "
                  f"only", flush=True)
    template = load_chat_template(cfg.init_from)
    skipped = check_rows(rows, tokenizer, template, config, cfg, proc)
    if cfg.verifier:  # loaded now, so that a bad checkpoint stops the run before step 0
        verifier.cached(cfg.verifier, proc.device)
    prec = precision(proc.device, cfg.precision)  # every dtype of the run
    model, units, config = build_sharded(cfg.init_from, cfg.train, proc, cfg.activation_checkpointing,
                                         cfg.compile_blocks, prec)
    reference = build_sharded(cfg.init_from, "", proc, cfg.activation_checkpointing, prec=prec)[0] \
        if cfg.kl_beta > 0 else None
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95),
                                  foreach=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    get_state_dict(model, optimizer)  # gives every trainable parameter its optimizer state now: saves are complete,
    # and the sampler's default KV pool (a share of the memory free when it is built) leaves the moments their room
    tp = tp_layout(cfg.rollout_tp, proc)
    rollout_model = build_rollout_copy(config, proc.device, prec, tp)
    refresh(rollout_model, units, tp)
    stop_ids, banned_ids = special_ids(tokenizer)
    compile, decode = decode_compile(cfg, proc.device)
    # a tensor-parallel group's ranks generate all of its ranks' prompts
    slots = cfg.prompts_per_step // proc.world * tp.size * (cfg.group_size if cfg.stage == "grpo" else 1)
    sampler = Sampler(rollout_model, max_slots=max(slots, cfg.eval_samples, 1), max_len=cfg.max_len,
                      stop_ids=stop_ids, banned_ids=banned_ids, compile=compile, kv_tokens=cfg.kv_tokens,
                      cache_dtype=prec.kv_dtype)
    policy = Policy(model, units, optimizer, scheduler, reference, rollout_model, tp)
    data = TrainData(rows, eval_rows, tokenizer, PromptStream(len(rows), cfg.seed, cfg.curriculum), stop_ids,
                     critical_token_ids(tokenizer), template, set(skipped))
    return Run(cfg, proc, policy, sampler, data, decode)


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
    params = sum(p.numel() for p in run.policy.model.parameters())  # a DTensor's numel is the whole tensor's
    return 6 * params * m["forward_tokens"] / (m["t_update"] * run.proc.world * peak) if peak else None


# -----------------------------------------------------------------------------------------------------------------
# Held-out evaluation (eval.py's scoring) and checkpoint selection


def val_loss(run: Run) -> dict:
    """The teacher-forced mean token NLL (at --temperature, like the SFT loss) of the held-out rows' responses: each
    rank its share of the rows, through the micro-batches sft_step uses, no gradient; sums reduced over the ranks.
    Rows that do not encode or fit --max_len are left out and counted."""
    cfg, proc, data = run.cfg, run.proc, run.data
    config = run.policy.rollout_model.config
    seqs, left_out = [], 0
    for i in range(proc.rank, len(data.eval_rows), proc.world):
        try:
            ex = encode(data.eval_rows[i], data.tokenizer, config, cfg.max_tiles, cfg.system, data.template)
        except (OSError, ValueError):
            ex = None
        if ex is None or len(ex.prompt_ids) + len(ex.response_ids) > cfg.max_len:
            left_out += 1
            continue
        seqs.append(Sequence(i, ex.prompt_ids, ex.response_ids, ex.pixel_values))
    nll, tokens = 0.0, 0.0
    with torch.no_grad():
        for mb in run.batches(seqs):
            logprobs, _ = run.policy.forward(mb, cfg.temperature)
            nll -= (logprobs * mb.mask).sum().item()
            tokens += mb.mask.sum().item()
    nll, tokens, rows, left_out = all_sum(nll, tokens, len(seqs), left_out, device=proc.device)
    return dict(val_loss=nll / tokens if tokens else math.nan, val_tokens=int(tokens), val_rows=int(rows),
                val_left_out=int(left_out))


def heldout(run: Run, step: int) -> dict:
    """The held-out evaluation of --eval_data, the rows split across ranks: greedy and avg@k accuracy, format rate,
    response length and critical-token entropy with eval.py's scoring (unless --select val_loss: SFT's selection needs
    no generation), and for SFT the teacher-forced val_loss when the rows have responses. OUT/best/ keeps the best
    checkpoint by --select (val_loss: the lowest); `run.val_best` and `run.val_stale` follow val_loss (--patience)."""
    cfg, out = run.cfg, Path(run.cfg.out)
    run.policy.sync_rollout_model()
    t0 = time.perf_counter()
    summary, result = {}, None
    eval_cfg = EvalConfig(max_new_tokens=cfg.max_new_tokens, max_len=cfg.max_len, samples=cfg.eval_samples,
                          temperature=cfg.temperature, max_tiles=cfg.max_tiles, seed=cfg.seed, system=cfg.system)
    if cfg.generates:
        result = evaluate(run.policy.rollout_model, run.data.tokenizer, run.data.eval_rows, eval_cfg,
                          sampler=run.sampler, template=run.data.template, tp=run.policy.tp)
        summary = {k: v for k, v in result.items() if isinstance(v, (int, float))}
    if cfg.stage == "sft" and all(r.get("response") for r in run.data.eval_rows):
        summary |= val_loss(run)
        run.val_stale = 0 if summary["val_loss"] < run.val_best else run.val_stale + 1
        run.val_best = min(run.val_best, summary["val_loss"])
    summary |= dict(step=step, t_eval=time.perf_counter() - t0)
    value = summary.get({"accuracy": "greedy_accuracy"}.get(cfg.select, cfg.select))
    better = (lambda new, old: new < old) if cfg.select == "val_loss" else (lambda new, old: new > old)
    best_file = out / "best.json"  # read on rank 0; every rank learns whether this evaluation is the best so far
    best = all_gather(json.loads(best_file.read_text()) if run.proc.rank == 0 and best_file.is_file() else None)[0]
    improved = value is not None and math.isfinite(value) and (best is None or better(value, best["value"]))
    whole = run.policy.saved_copy() if improved else None  # every rank: under --rollout_tp a gather
    if run.proc.rank == 0:
        if result is not None:  # every prompt, response, extracted answer and verdict, as eval.py writes them
            cli.write_atomic(out / f"eval_step_{step:06d}.json", json.dumps(results_json(
                result, eval_cfg, checkpoint=f"{out} step {step}", init_from=cfg.init_from, data=cfg.eval_data,
                stage=cfg.stage, step=step), indent=1))
        cli.append_jsonl(out / "eval.jsonl", summary)
        if improved:
            save_model(whole, out / "best")
            cli.write_atomic(best_file, json.dumps(cli.json_safe(dict(select=cfg.select, value=value, **summary)),
                                                   indent=2) + "\n")
        parts = []
        if result is not None:
            get = lambda key: summary.get(key, math.nan)
            parts.append(f"greedy {summary['greedy_accuracy']:.3f} avg@{cfg.eval_samples} "
                         f"{get('sampled_accuracy'):.3f} format {get('format_rate'):.3f} len "
                         f"{get('response_length'):.1f} critical entropy {get('critical_entropy'):.3f}")
        if "val_loss" in summary:
            parts.append(f"val_loss {summary['val_loss']:.4f} (best {run.val_best:.4f}, {run.val_stale} since)")
        print(f"eval  step {step}: {' | '.join(parts)} ({summary['t_eval']:.1f}s)", flush=True)
    dist.barrier()
    return summary


# -----------------------------------------------------------------------------------------------------------------
# Resuming: the state a checkpoint keeps, the settings a resume may change



def training_state(run: Run, step: int) -> dict:
    """What a checkpoint keeps beside the model and optimizer, the same on every rank (the sampler's seeds derive
    from the step, so no sampler state is needed)."""
    return {"scheduler": run.policy.scheduler.state_dict(), "stream": run.data.stream.state(),
            "meta": {"step": step, "stage": run.cfg.stage, "bad_steps": run.policy.bad_steps}}


FIXED = {  # settings a resume may not change: the run would no longer be the run its checkpoints belong to
    "stage": "the loss and the checkpoint's meaning differ between stages",
    "train": "the optimizer holds state for exactly the modules trained so far",
    "group_size": "advantages and pass rates are per group of this size",
    "init_from": "the tokenizer and the architecture are read from it",
    "data": "the prompt stream's position and pass rates index its rows (pass --new_data to start epoch 0 on it)",
}


def data_file(path) -> dict:
    """What identifies a data file across a resume: where it is, its size and its contents' sha256."""
    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return {"path": str(path.resolve()), "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def resumed_settings(cfg: TrainConfig, checkpoint: Path, rank: int) -> bool:
    """The new flags against the settings `checkpoint` was saved with (its config.json, with the data file's
    identity), before anything is built: every difference is printed on rank 0, one line each. Refused (UsageError,
    one line for all of them) when a setting of FIXED changes: --stage, --train, --group_size, --init_from (compared
    as resolved paths) and --data (a different file, or the same path with other contents; a moved file with the
    same contents is fine) unless --new_data. Everything else is applied by `resume`: --lr and the schedule
    (--schedule, --warmup_steps, --min_lr_ratio, a larger --steps) re-base the restored scheduler, --weight_decay
    the optimizer's groups; the loss, sampling, evaluation and saving settings are read each step. Returns whether
    the prompt stream restarts at epoch 0 (--new_data with a data file that differs)."""
    f = checkpoint / "config.json"
    try:
        before = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"--resume: cannot read {f}: {e}") from None
    now = asdict(cfg)
    old_data, new_data = before.pop("data_file", None), data_file(cfg.data) if cfg.data else None
    same = lambda a, b: a is not None and b is not None and Path(a).resolve() == Path(b).resolve()
    data_changed = old_data["sha256"] != new_data["sha256"] if old_data else not same(before.get("data"), cfg.data)
    changed = [k for k in now if k not in ("resume", "new_data") and k in before and before[k] != now[k]]
    if rank == 0:
        for k in changed:
            print(f"--resume: --{k} {before[k]!r} -> {now[k]!r} (the checkpoint's -> this run's)", flush=True)
        if old_data and data_changed and "data" not in changed:
            print(f"--resume: {cfg.data} changed since {checkpoint} was saved ({old_data['bytes']} -> "
                  f"{new_data['bytes']} bytes, other contents)", flush=True)
    breaks = {k: k in changed for k in FIXED} | {
        "init_from": "init_from" in changed and not same(before["init_from"], cfg.init_from),
        "data": data_changed and not cfg.new_data}
    refused = [k for k, bad in breaks.items() if bad]
    def why(k: str) -> str:
        if k == "data" and "data" not in changed:
            return f"--data {cfg.data} holds other contents than when {checkpoint} was saved: {FIXED[k]}"
        return f"--{k} differs from {checkpoint}'s ({before.get(k)!r}, this run {now[k]!r}): {FIXED[k]}"
    if refused:
        raise UsageError("--resume: " + "; ".join(map(why, refused))
                         + "; resume with the checkpoint's settings or start a new run in another --out")
    if cfg.new_data and not data_changed and rank == 0:
        print(f"--new_data: {cfg.data} is the data {checkpoint} was trained on; the prompt stream continues",
              flush=True)
    return cfg.new_data and data_changed


def rebase_schedule(policy: Policy, cfg: TrainConfig):
    """After a restore the optimizer's groups and the scheduler hold the saved lr and weight decay: this run's
    --lr (LambdaLR's base_lrs and the groups' initial_lr), schedule and --weight_decay instead, the current lr
    recomputed at the restored step exactly as LambdaLR computes it (unchanged settings give the same float)."""
    s = policy.scheduler
    s.base_lrs = [cfg.lr for _ in s.optimizer.param_groups]
    s.lr_lambdas = [lr_lambda(cfg) for _ in s.optimizer.param_groups]
    for group, base, factor in zip(s.optimizer.param_groups, s.base_lrs, s.lr_lambdas):
        group["initial_lr"], group["weight_decay"] = base, cfg.weight_decay
        group["lr"] = base * factor(s.last_epoch)
    s._last_lr = [group["lr"] for group in s.optimizer.param_groups]


def resume(run: Run, previous: Path, restart_stream: bool = False) -> int:
    """Model, optimizer, schedule (re-based on this run's settings), prompt stream (unless `restart_stream`: new
    data, epoch 0) and RNG from `previous`; returns the step it was saved at."""
    state = load_checkpoint(previous, run.proc, run.policy.model, run.policy.optimizer, training_state(run, 0),
                            seed=run.cfg.seed)
    if state["meta"]["stage"] != run.cfg.stage:
        raise UsageError(f"{previous} is a {state['meta']['stage']} checkpoint; this run is --stage {run.cfg.stage}")
    run.policy.scheduler.load_state_dict(state["scheduler"])
    rebase_schedule(run.policy, run.cfg)
    if not restart_stream:
        run.data.stream.load(state["stream"])
    run.policy.bad_steps = int(state["meta"]["bad_steps"])
    refresh(run.policy.rollout_model, run.policy.units, run.policy.tp)
    if run.proc.rank == 0:
        print(f"resumed from {previous} (step {state['meta']['step']})"
              f"{'; the prompt stream restarts at epoch 0 on the new --data' if restart_stream else ''}", flush=True)
    return int(state["meta"]["step"])


def restore_patience(run: Run, out: Path, step: int):
    """After a resume at `step`: the lowest val_loss and the evaluations since it, from OUT/eval.jsonl's evaluations
    up to that step (read on rank 0, shared with every rank)."""
    losses = []
    if run.proc.rank == 0 and (out / "eval.jsonl").is_file():
        losses = [e["val_loss"] for e in cli.read_jsonl(out / "eval.jsonl") if e["step"] <= step and "val_loss" in e]
    for loss in all_gather(losses)[0]:
        run.val_stale = 0 if loss < run.val_best else run.val_stale + 1
        run.val_best = min(run.val_best, loss)


def wandb_run(cfg: TrainConfig):
    """The wandb module, initialised for this run, when --wandb asks for it and the package is installed."""
    if not cfg.wandb:
        return None
    try:
        import wandb  # optional: only a run that asks for it needs the package
    except ImportError:
        print("--wandb: the wandb package is not installed (pip install wandb); logging to metrics.jsonl only")
        return None
    wandb.init(project=cfg.wandb, config=asdict(cfg))
    return wandb
