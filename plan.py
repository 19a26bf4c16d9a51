"""The memory plan of a GRPO run, per GPU, by simulation: the real model code sharded as the trainer shards it over a
fake process group, one training step traced on fake tensors, the rollout side computed from the shapes.

What is simulated and what is computed:
- The model is built on meta from the config (`checkpoint.config_from_dict`), `parallel.set_trainable` and
  `parallel.shard` run on it under `dist.init_process_group("fake", world_size=--gpus)`: every figure of the trainer
  side (fp32 masters of trainable and frozen modules, gradients, AdamW moments) is summed from rank 0's real DTensor
  shard shapes, not from a formula.
- One training step of one micro-batch (forward through `VLM.forward` with the fused log-prob head, backward, the
  optimizer step) runs under FakeTensorMode with torch's FSDPMemTracker: its peak holds the activations (with
  activation checkpointing when asked), FSDP2's unsharded parameters and gradients, all-gather and reduce-scatter
  buffers and the optimizer's temporaries, as allocated by the code that will run; attention is counted as a GPU's
  fused kernel allocates it (output, log-sum-exp, gradients), never the (T x T) scores. Host reads the trace cannot
  answer (the id-range and image-count checks, `nonzero` of the target mask) are answered as for a valid batch in
  which every position is a target (the worst case of the fused head).
  DTensor ops are warmed before tracing (`_warm_dtensor_ops`): their first call's metadata propagation on
  global-shape fake tensors is no GPU allocation.
- Computed from the shapes: the rollout copy (bf16 on GPU, unsharded; with --rollout_tp N, the trainer's split copy:
  parallel.tp_split_dim says which parameters the N ranks of an engine split, parallel.check_tp which N can), the
  paged KV pool (pages of 16 tokens x 2 x layers x kv_heads/N x head_dim x bytes, budgeted as rollout.Sampler does:
  --kv_tokens, or by default CUDA_KV_FRACTION of the memory free once the master shards, their AdamW moments and the
  copy exist, never more than slots + 1 sequences of max_len, plus the scratch page), the sampler's per-slot buffers
  (outputs, block table, the decode kernel's split buffers per layer), and a fixed reserve (CUDA context, NCCL,
  fragmentation). The micro-batch is at least one max_len sequence (a longer one goes alone). Not counted: the
  rollout phase's own transients (a no-grad prefill batch), which come while no gradients or step transients exist.

    python plan.py --config configs/skywork-r1v3-38b.json --gpus 32 --gpu_memory_gb 80 --rollout_tp 4 \\
        --max_len 20480 --slots 32 --train vit,connector,llm --activation_checkpointing --micro_batch_tokens 16384
    python plan.py --config configs/internvl3-8b.json --gpus 8 --activation_checkpointing --search  # what fits
"""
import contextlib
import dataclasses
import inspect
import itertools
import json
import math
import types
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import cli
from checkpoint import config_from_dict, read_config
from cli import UsageError, arg
from model import VLM, VLMConfig
from decode_attention import DEFAULT_SPLIT_TOKENS, _buffer_specs
from parallel import MODULES, set_trainable, shard, tp_split_dim
from parallel import check_tp as parallel_check_tp
from rollout import CPU_KV_BYTES, CUDA_KV_FRACTION, Sampler

PAGE_SIZE = inspect.signature(Sampler).parameters["page_size"].default  # the trainer keeps the default

# -----------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class PlanConfig:
    config: str = arg("configs/internvl3-8b.json", "a config.json (configs/*.json) or a checkpoint directory")
    gpus: int = arg(8, "GPUs (FSDP world size; every GPU also runs a rollout engine or a TP share of one)")
    gpu_memory_gb: float = arg(80.0, "memory per GPU in GB (10^9 bytes, as cards are sold: 80 for an H100)")
    rollout_tp: int = arg(1, "tensor-parallel degree of the rollout copy (1: the whole model on every GPU)")
    max_len: int = arg(4096, "prompt + response tokens per sequence (the trainer's --max_len)")
    slots: int = arg(16, "sequences in flight per rollout engine")
    kv_tokens: int = arg(0, "KV pool budget in tokens per rollout engine, the trainer's --kv_tokens (0: its default, "
                         "half the GPU memory free once the masters and the rollout copy are built)")
    train: str = arg("connector,llm", "trainable modules, a comma list of vit, connector, llm")
    activation_checkpointing: bool = arg(False, "recompute each block's activations in backward")
    micro_batch_tokens: int = arg(8192, "tokens of one training micro-batch (padded sequences x length)")
    micro_batch: int = arg(1, "sequences in that micro-batch (micro_batch_tokens split evenly between them)")
    tiles: int = arg(0, "image tiles in the micro-batch (0: the one blank tile a text-only batch runs)")
    device: str = arg("cuda", "cuda: bf16 compute, copy and KV (a GPU run); cpu: fp32 everywhere, as on CPU",
                      ("cuda", "cpu"))
    reserve_gb: float = arg(3.0, "per GPU, on top: CUDA context, NCCL buffers, allocator fragmentation (GB)")
    search: bool = arg(False, "also try other --gpus / --rollout_tp / --slots / --max_len and list what fits")
    search_gpus: tuple[str, ...] = arg(("8", "16", "32", "64"), "GPU counts the search tries")
    search_tp: tuple[str, ...] = arg(("1", "2", "4", "8"), "rollout TP degrees the search tries")
    search_slots: tuple[str, ...] = arg(("8", "16", "32", "64"), "slot counts the search tries")
    search_max_len: tuple[str, ...] = arg(("4096", "8192", "16384", "32768"), "max_len values the search tries")
    search_kv_fill: float = arg(0.5, "the search marks the layouts whose KV pool holds this share of slots x "
                                "max_len (beyond it the sampler preempts; 1: no preemption even if every response "
                                "runs to max_len)")

    def __post_init__(self):
        for name in ("gpus", "rollout_tp", "max_len", "slots", "micro_batch_tokens", "micro_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.kv_tokens < 0 or self.tiles < 0:
            raise ValueError("--kv_tokens and --tiles must be >= 0")
        if not set(self.train.split(",")) <= set(MODULES) or not self.train:
            raise ValueError(f"--train takes a comma list of {sorted(MODULES)}, got {self.train!r}")
        if self.micro_batch_tokens % self.micro_batch:
            raise ValueError(f"--micro_batch_tokens {self.micro_batch_tokens} must split evenly into "
                             f"--micro_batch {self.micro_batch} sequences")
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"--device must be cuda or cpu, got {self.device!r}")

    @property
    def step_tokens(self) -> int:
        """Tokens of the traced micro-batch: a sequence longer than --micro_batch_tokens goes alone
        (data.token_batches), so at least one of max_len."""
        return max(self.micro_batch_tokens, self.max_len) if self.micro_batch == 1 else self.micro_batch_tokens


def load_config(path) -> VLMConfig:
    """A JSON file (the shapes of a published config.json) or a checkpoint directory."""
    path = Path(path)
    if path.is_dir():
        return read_config(path)
    return config_from_dict(json.loads(path.read_text()))

# -----------------------------------------------------------------------------------------------------------------
# The trainer side: build on meta, shard over a fake process group, trace one step on fake tensors


@contextlib.contextmanager
def fake_world(world: int):
    """A fake process group of `world` ranks, this process rank 0: collectives return at once, shapes are real."""
    from torch.testing._internal.distributed.fake_pg import FakeStore
    if dist.is_initialized():
        raise RuntimeError("plan.py needs its own (fake) process group; one is already initialised")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def sharded_model(config: VLMConfig, cfg: PlanConfig) -> VLM:
    """On meta, sharded exactly as parallel.build_sharded does (set_trainable, then shard)."""
    with torch.device("meta"):
        model = VLM(config)
    set_trainable(model, cfg.train)
    shard(model, torch.device(cfg.device), cfg.activation_checkpointing)
    return model


def shard_bytes(model: VLM) -> dict:
    """Rank 0's fp32 master bytes, trainable and frozen, from the DTensor shard shapes."""
    out = {"trainable": 0, "frozen": 0}
    for p in model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        out["trainable" if p.requires_grad else "frozen"] += local.numel() * 4  # masters stay fp32
    return out


class _AnswerHostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Inside FakeTensorMode: answers what fake tensors cannot, as for a valid batch. A scalar read returns False
    for a bool (no bad target id) and 1 otherwise (the optimizer's step count); nonzero returns every index (every
    position is a target: the fused head's worst case)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            return False if args[0].dtype == torch.bool else 1
        if func is torch.ops.aten.nonzero.default:
            x = args[0]
            return torch.empty((x.numel(), x.dim()), dtype=torch.long, device=x.device)
        return func(*args, **(kwargs or {}))


class _FlashAttention(torch.autograd.Function):
    """What a GPU's fused attention (flash, cuDNN) allocates, for the trace: the output, and for backward q, k, v,
    the output and a (B, H, T) fp32 log-sum-exp; the gradients are q, k, v-shaped. CPU SDPA under FakeTensorMode
    takes the math path with GQA and would plan the (B, H, T, T) scores a GPU never holds. Values are not computed:
    the trace only counts bytes."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _flash_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return _FlashAttention.apply(q, k, v)


@contextlib.contextmanager
def _gpu_attention():
    """torch.nn.functional.scaled_dot_product_attention (what model.py calls) as _FlashAttention while tracing."""
    F = torch.nn.functional
    original, F.scaled_dot_product_attention = F.scaled_dot_product_attention, _flash_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _unchecked_embed(self: VLM, input_ids, pixel_values=None, image_index=None):
    """VLM.embed without its host-side checks (id range, image-token count), which read tensor values. The same
    tensors are allocated: token embeddings, the ViT and connector on the tiles (or on one blank tile), the scatter
    (the plan's micro-batch has one image per row, so `image_index`, which only selects rows, changes nothing)."""
    x = self.language_model.embed_tokens(input_ids)
    if pixel_values is not None:
        feats = self.image_features(pixel_values).to(x.dtype)
        return x.masked_scatter((input_ids == self.config.image_token_id)[..., None], feats)
    if self.vision_model is not None:
        v = self.config.vision
        blank = torch.zeros(1, v.num_channels, v.image_size, v.image_size, dtype=x.dtype, device=x.device)
        x = x + 0.0 * self.image_features(blank).sum()
    return x


def _warm_dtensor_ops(params: list):
    """Runs the gradient clip once on zero gradients before the tracker starts. A DTensor op's first call derives
    its output's metadata by running the op on fake tensors of the *global* shapes, in the ambient FakeTensorMode
    (torch.distributed.tensor._sharding_prop, `_propagate_tensor_meta_non_cached`), and caches the result. Inside
    the tracer those shadow tensors are counted: `clip_grad_norm_`'s `_foreach_norm` over every sharded gradient
    would add the unsharded gradients of the whole model (world x the shard) to the peak, which no GPU allocates
    (a real run propagates on a private fake mode). get_state_dict already warms the optimizer step the same way
    (it steps on zero gradients)."""
    saved = [p.grad for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    for p, g in zip(params, saved):
        p.grad = g


def trace_step(model: VLM, cfg: PlanConfig) -> dict:
    """Peak bytes of one training step of one micro-batch on rank 0, by FSDPMemTracker category, and the total.
    The order is the trainer's: optimizer states exist from setup (get_state_dict), then forward, backward, clip,
    step, zero_grad."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed.checkpoint.state_dict import get_state_dict
    config = model.config
    model.embed = types.MethodType(_unchecked_embed, model)
    B, T = cfg.micro_batch, cfg.step_tokens // cfg.micro_batch
    with FakeTensorMode(allow_non_fake_inputs=True), _AnswerHostReads(), \
            (_gpu_attention() if cfg.device == "cuda" else contextlib.nullcontext()):
        model.to_empty(device="cpu")
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-6, betas=(0.9, 0.95), foreach=True)
        get_state_dict(model, optimizer)  # as train_rl.setup: every trainable parameter gets its moments now
        _warm_dtensor_ops(params)
        ids = torch.zeros(B, T, dtype=torch.long)
        pixels = None
        if cfg.tiles and config.vision is not None:
            v = config.vision
            pixels = torch.zeros(cfg.tiles, v.num_channels, v.image_size, v.image_size)
            ids[0, :cfg.tiles * config.tokens_per_tile] = config.image_token_id or 0
        tracker = FSDPMemTracker(model, optimizer)
        tracker.track_inputs((ids,))
        with tracker:
            logprobs, entropy = model(ids, pixels, targets=ids)
            (logprobs.sum() + entropy.sum()).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        peak = tracker.get_tracker_snapshot("peak")
    snap = next(iter(peak.values())) if peak else {}
    return {getattr(k, "value", k): v for k, v in snap.items()}


def largest_unit(model: VLM) -> tuple[str, int]:
    """The FSDP unit with the most parameters (name, numel): what one all-gather brings in unsharded."""
    units = [*(model.vision_model.encoder.layers if model.vision_model is not None else []),
             *model.language_model.layers]
    sizes = [("ViT block" if i < (len(units) - len(model.language_model.layers)) else "LLM block",
              sum(p.numel() for p in u.parameters())) for i, u in enumerate(units)]
    in_blocks = {id(p) for u in units for p in u.parameters()}
    sizes.append(("root (embeddings, head, connector, norms)",
                  sum(p.numel() for p in model.parameters() if id(p) not in in_blocks)))
    return max(sizes, key=lambda s: s[1])

# -----------------------------------------------------------------------------------------------------------------
# The rollout side, from the shapes


def check_tp(config: VLMConfig, tp: int) -> str | None:
    """Why the trainer's TP copy cannot split this LLM over `tp` ranks (parallel.check_tp, whose process counts
    are given as `tp` itself: the search pairs each TP degree with GPU counts it divides), or None."""
    try:
        parallel_check_tp(tp, tp, tp, config)
    except UsageError as e:
        return str(e)
    return None


def rollout_bytes(config: VLMConfig, cfg: PlanConfig, resident: int) -> dict:
    """The rollout copy, KV pool and sampler buffers of one GPU: a TP share of one engine of --slots sequences.
    `resident`: the bytes allocated before the sampler is built besides the copy (the fp32 master shards and the
    AdamW moments), which
    the default KV budget (a share of the memory then free) depends on."""
    with torch.device("meta"):
        model = VLM(config)
    esize = 2 if cfg.device == "cuda" else 4  # bf16 copy and pool on GPU; fp32 on CPU (parallel.precision)
    tp, llm, S = cfg.rollout_tp, config.llm, cfg.slots
    split = sum(p.numel() for n, p in model.named_parameters() if tp_split_dim(n) is not None)
    whole = sum(p.numel() for p in model.parameters())
    copy = (whole - split) * esize + split // tp * esize
    kv_heads, heads = llm.num_key_value_heads // tp, llm.num_attention_heads // tp
    kv_per_token = 2 * llm.num_hidden_layers * kv_heads * llm.head_dim * esize
    # Sampler's pool: kv_tokens rounded up to pages, at most max_slots + 1 sequences of max_len, plus a scratch page.
    max_pages = math.ceil((cfg.max_len + 1) / PAGE_SIZE)
    kv_tokens = cfg.kv_tokens or default_kv_tokens(cfg, resident + copy, kv_per_token)
    pages = min(math.ceil(kv_tokens / PAGE_SIZE), (S + 1) * max_pages) + 1
    # Per-slot state: completions (int64) and their log-probs (fp32) of max_len, the block table (rollout.py: two
    # spare columns at most), six int64 counters; on CUDA the Triton decode kernel's output per layer and one set
    # of split buffers shared by the layers.
    columns = max(2, max_pages) + 1
    buffers = S * cfg.max_len * (8 + 4) + S * columns * 4 + 6 * S * 8
    if cfg.device == "cuda":
        with torch.device("meta"):
            q = torch.empty(S, heads, llm.head_dim, dtype=torch.bfloat16)
            specs = _buffer_specs(q, torch.empty(S, columns, dtype=torch.int32), PAGE_SIZE, DEFAULT_SPLIT_TOKENS)
        size = {name: math.prod(shape) * dtype.itemsize for name, (shape, dtype) in specs.items()}
        buffers += llm.num_hidden_layers * size["out"] + size["partial_out"] + size["partial_lse"]
    return {"copy": copy, "copy_split_params": split, "params": whole, "kv": pages * PAGE_SIZE * kv_per_token,
            "kv_tokens": (pages - 1) * PAGE_SIZE, "kv_per_token": kv_per_token, "kv_heads": kv_heads,
            "sampler_buffers": buffers}


def default_kv_tokens(cfg: PlanConfig, allocated: int, kv_per_token: int) -> int:
    """The Sampler's default budget (rollout.py): on CUDA, CUDA_KV_FRACTION of the memory free when it is built,
    after the master shards, their AdamW moments and the rollout copy (the gradients come later); CPU_KV_BYTES on a
    CPU. The caching allocator still holds the checkpoint load's freed blocks then, so a real pool is at most this."""
    if cfg.device != "cuda":
        return CPU_KV_BYTES // kv_per_token
    free = int(cfg.gpu_memory_gb * 1e9) - int(cfg.reserve_gb * 1e9) - allocated
    return max(0, int(CUDA_KV_FRACTION * free)) // kv_per_token

# -----------------------------------------------------------------------------------------------------------------
# The plan


@dataclass
class Plan:
    cfg: PlanConfig
    params: dict  # numel per module
    masters: dict  # trainable / frozen fp32 bytes on rank 0
    step: dict  # FSDPMemTracker peak by category
    rollout: dict
    unit: tuple[str, int]

    @property
    def adam(self) -> int:
        return 2 * self.masters["trainable"]

    @property
    def step_peak(self) -> int:
        return int(self.step.get("Total", 0))

    @property
    def step_rest(self) -> int:
        """What the traced step holds at its peak beyond the masters and moments, which live through the whole run:
        the gradients then present, activations, unsharded units, collective buffers."""
        return self.step_peak - self.masters["trainable"] - self.masters["frozen"] - self.adam

    @property
    def reserve(self) -> int:
        return int(self.cfg.reserve_gb * 1e9) if self.cfg.device == "cuda" else 0

    @property
    def total(self) -> int:
        return self.step_peak + self.rollout["copy"] + self.rollout["kv"] + self.rollout["sampler_buffers"] + \
            self.reserve

    @property
    def capacity(self) -> int:
        return int(self.cfg.gpu_memory_gb * 1e9)

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    @property
    def kv_room(self) -> int:
        """The largest --kv_tokens (whole pages) with which this layout fits, 0 if none; at most what the sampler
        would use (max_slots + 1 sequences of max_len)."""
        r, c = self.rollout, self.cfg
        left = self.capacity - (self.total - r["kv"]) - PAGE_SIZE * r["kv_per_token"]  # the scratch page
        most = (c.slots + 1) * math.ceil((c.max_len + 1) / PAGE_SIZE) * PAGE_SIZE
        return min(most, max(0, left // (PAGE_SIZE * r["kv_per_token"]) * PAGE_SIZE))


def make_plan(config: VLMConfig, cfg: PlanConfig, cache: dict | None = None) -> Plan:
    """The plan of one layout. The traced step depends only on the world size and the micro-batch: `cache` keeps it
    across the layouts of a search."""
    error = check_tp(config, cfg.rollout_tp)
    if error:
        raise ValueError(error)
    key = (cfg.gpus, cfg.step_tokens)
    if cache is None or key not in cache:
        with fake_world(cfg.gpus):
            model = sharded_model(config, cfg)
            masters, unit = shard_bytes(model), largest_unit(model)
            step = trace_step(model, cfg)
        if cache is not None:
            cache[key] = (masters, unit, step)
    else:
        masters, unit, step = cache[key]
    with torch.device("meta"):
        model = VLM(config)
    params = {k: sum(p.numel() for p in getattr(model, v).parameters()) if getattr(model, v) is not None else 0
              for k, v in MODULES.items()}
    rollout = rollout_bytes(config, cfg, 3 * masters["trainable"] + masters["frozen"])  # masters + moments
    return Plan(cfg, params, masters, step, rollout, unit)


def _gb(n: float) -> str:
    return f"{n / 1e9:7.2f}"


def describe(plan: Plan, name: str) -> str:
    """The per-GPU table."""
    c, r = plan.cfg, plan.rollout
    dtype = "bf16" if c.device == "cuda" else "fp32"
    copy_note = "the whole model, unsharded" if c.rollout_tp == 1 else \
        f"TP {c.rollout_tp} splits the LLM's q/k/v/gate/up by output rows and o_proj/down_proj by input columns " \
        f"({r['copy_split_params'] / 1e9:.2f}B params); embeddings, LM head, norms, ViT and connector replicated"
    kv_note = f"--kv_tokens {c.kv_tokens}" if c.kv_tokens else "the trainer's default"
    ag = 2 * plan.unit[1] * (2 if c.device == "cuda" else 4)
    p = plan.params
    row = lambda label, n: f"  {label:<62s}{_gb(n)}"
    lines = [
        f"{name}: {sum(p.values()) / 1e9:.2f}B params (ViT {p['vit'] / 1e9:.2f}B, "
        f"connector {p['connector'] / 1e9:.3f}B,"
        f" LLM {p['llm'] / 1e9:.2f}B); train {c.train}; {c.gpus} GPUs x {c.gpu_memory_gb:g} GB; {dtype} compute",
        f"micro-batch {c.micro_batch} x {c.step_tokens // c.micro_batch} tokens"
        f"{', ' + str(c.tiles) + ' tiles' if c.tiles else ''}, activation checkpointing "
        f"{'on' if c.activation_checkpointing else 'off'}; rollout TP {c.rollout_tp}, {c.slots} slots x "
        f"{c.max_len} tokens, KV pool {r['kv_tokens']} tokens ({kv_note})",
        "",
        f"  {'per GPU':<62s}     GB",
        row("trainable fp32 masters (FSDP shard)", plan.masters["trainable"]),
        row("frozen fp32 masters (FSDP shard)", plan.masters["frozen"]),
        row("AdamW moments (2 x fp32, sharded)", plan.adam),
        row("training step at its traced peak, beyond the above (1)", plan.step_rest),
        row(f"rollout copy ({dtype}) (2)", r["copy"]),
        row(f"KV pool: {r['kv_tokens']} tokens x {r['kv_per_token'] / 1024:.0f} KiB ({r['kv_heads']} kv heads/rank)",
            r["kv"]),
        row("sampler buffers (per-slot outputs, block table, decode splits)", r["sampler_buffers"]),
        row("reserve (CUDA context, NCCL, fragmentation)", plan.reserve),
        row("total", plan.total),
        row("headroom", plan.capacity - plan.total) + f"   -> {'FITS' if plan.fits else 'DOES NOT FIT'}",
        f"  largest --kv_tokens that fits: {plan.kv_room}" + (f" ({plan.kv_room / c.max_len:.1f} sequences of "
                                                             f"max_len)" if plan.kv_room else ""),
        "",
        "(1) gradients present, activations, unsharded params/grads, all-gather and reduce-scatter buffers, "
        "traced (FakeTensorMode + FSDPMemTracker, rank 0) at the step's peak, by category: "
        + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in plan.step.items() if v and k != "Total")
        + f"; step total {plan.step_peak / 1e9:.2f} GB. Cross-check: the largest FSDP unit is the {plan.unit[0]}, "
        f"{plan.unit[1] / 1e9:.2f}B params, {ag / 1e9:.2f} GB unsharded {dtype} x2 for prefetch.",
        f"(2) {copy_note}.",
    ]
    return "\n".join(lines)


def search(config: VLMConfig, cfg: PlanConfig, cache: dict | None = None) -> list[Plan]:
    """Every combination of the search lists (TP degrees that do not divide the GPUs or the heads skipped); one
    traced step per GPU count and micro-batch length, since the rest changes only computed terms. Without
    --kv_tokens a layout whose default pool does not fit gets the largest pool that does."""
    cache, plans = {} if cache is None else cache, []
    for gpus, tp, slots, max_len in itertools.product(*(map(int, v) for v in (
            cfg.search_gpus, cfg.search_tp, cfg.search_slots, cfg.search_max_len))):
        if tp > gpus or gpus % tp or check_tp(config, tp):
            continue
        c = dataclasses.replace(cfg, gpus=gpus, rollout_tp=tp, slots=slots, max_len=max_len)
        plan = make_plan(config, c, cache)
        if not plan.fits and not cfg.kv_tokens and plan.kv_room:
            plan = make_plan(config, dataclasses.replace(c, kv_tokens=plan.kv_room), cache)
        plans.append(plan)
    return plans


def _fill(p: Plan) -> float:
    """The KV pool's tokens as a share of slots x max_len."""
    return p.rollout["kv_tokens"] / (p.cfg.slots * p.cfg.max_len)


def describe_search(plans: list[Plan]) -> str:
    """The layouts that fit with a pool of at least one max_len sequence, fewest GPUs first, then the least TP, the
    longest max_len, the most slots; `*` marks those whose pool holds --search_kv_fill of slots x max_len."""
    fit = sorted((p for p in plans if p.fits and p.rollout["kv_tokens"] >= p.cfg.max_len),
                 key=lambda p: (p.cfg.gpus, p.cfg.rollout_tp, -p.cfg.max_len, -p.cfg.slots))
    fill = plans[0].cfg.search_kv_fill if plans else 0
    full = [p for p in fit if _fill(p) >= fill]
    lines = [f"search: {len(fit)} of {len(plans)} layouts fit; {len(full)} (*) with a KV pool of >= {fill:g} x slots "
             f"x max_len", "  gpus  rollout_tp  slots  max_len  kv_tokens (flag)           fill  total GB  headroom GB"]
    for p in fit:
        flag = f"--kv_tokens {p.cfg.kv_tokens}" if p.cfg.kv_tokens else "default"
        lines.append(f"  {p.cfg.gpus:4d}  {p.cfg.rollout_tp:10d}  {p.cfg.slots:5d}  {p.cfg.max_len:7d}  "
                     f"{p.rollout['kv_tokens']:9d} {flag:<22s}{_fill(p):5.2f}{'*' if _fill(p) >= fill else ' '}"
                     f"{p.total / 1e9:9.2f}  {(p.capacity - p.total) / 1e9:11.2f}")
    if not fit:
        best = min(plans, key=lambda p: p.total) if plans else None
        lines.append("  none" + (f"; the smallest total is {best.total / 1e9:.2f} GB (gpus {best.cfg.gpus}, "
                                 f"rollout_tp {best.cfg.rollout_tp}, slots {best.cfg.slots}, max_len "
                                 f"{best.cfg.max_len})" if best else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None):
    p = cli.parser(__doc__.split("\n\n")[0].replace("\n", " "))
    cli.add_flags(p, PlanConfig)
    cfg = cli.config_from(p.parse_args(argv), PlanConfig)
    config = load_config(cfg.config)
    name = config.source.get("_name") or Path(cfg.config).stem
    cache = {}
    print(describe(make_plan(config, cfg, cache), name))
    if cfg.search:
        print()
        print(describe_search(search(config, cfg, cache)))


if __name__ == "__main__":
    main()
