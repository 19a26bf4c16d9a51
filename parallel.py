"""The distributed plumbing of train_rl.py: processes, FSDP2 sharding and the plain copy the sampler reads, whole
or split across a tensor-parallel group (--rollout_tp). model.py never imports torch.distributed; this file does
(and rundir.py, for checkpoints).

One code path for `python train_rl.py` (a world of one on a free local port) and `torchrun`: NCCL on CUDA, gloo on
CPU. Sharding follows torchtitan's parallelize (build on meta -> per-block activation checkpointing and compile ->
fully_shard each block, then the root -> to_empty -> load through rank 0). Rollouts read a plain unsharded copy,
refreshed in place unit by unit after every optimizer step: bit-exact with the trained weights, and the copy's
parameter addresses never change, so a compiled decode step and its CUDA graphs stay valid.

Tensor parallelism of the rollout copy (gpt-fast's tp.py, Megatron's split): with --rollout_tp N each group of N
consecutive ranks holds one copy split across them, so a copy too large for one card (Skywork-R1V3-38B: 76 GB in
bf16) fits N. Each rank's copy is a VLM of the local config (N times fewer attention heads, key/value heads and MLP
channels); q/k/v and gate/up are column-parallel (the rank's contiguous block of output rows: its heads), o_proj and
down_proj row-parallel (its block of input columns) followed by an all-reduce over the group, added by a forward
hook so that model.py stays unaware of it; a row-parallel bias is held by the group's rank 0 (zeros elsewhere) so
the sum adds it once. Norms, embeddings, the LM head, the ViT and the connector are replicated: splitting the
vocabulary is not built, nor splitting the ViT. The ranks of a group generate the same requests in lockstep
(`tp_generate`): the all-reduced activations are identical on all of them, and draws are counter-based per request
seed, so every rank draws the same tokens.

    python -m pytest -q tests/test_train.py       # 1 vs 2 processes, resume after SIGKILL, the copy after each step
    python -m pytest -q tests/test_tp.py          # --rollout_tp 2 against no tensor parallelism
"""
import contextlib
import copy
import dataclasses
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from checkpoint import load_model, read_config
from cli import UsageError
from data import mix_seed
from model import VLM, VLMConfig

# -----------------------------------------------------------------------------------------------------------------
# Processes


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device


def init_distributed() -> Dist:
    """NCCL on CUDA, gloo on CPU. A plain `python` launch becomes a world of one on a free local port, so FSDP,
    all-reduces and the checkpoint code run exactly as under torchrun."""
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(port))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return Dist(dist.get_rank(), dist.get_world_size(), local, device)


@contextlib.contextmanager
def process_group():
    """The body of a script that uses the process group: on success every rank waits for the others before tearing
    down (gloo aborts a process whose peer leaves while it still uses the connection); either way the group is
    destroyed."""
    try:
        yield
        if dist.is_initialized():
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def set_threads(threads: int, world: int):
    """On a small CPU, more threads than cores per process oversubscribes it, and a loaded machine then runs many
    times slower than with one thread. Default: the cores split between the processes on this node."""
    if threads == 0:
        threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    torch.set_num_threads(threads)


def all_sum(*values: float, device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_max(*values: float, device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_gather(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out

def summed_over_ranks(stats, device, maxima: tuple[str, ...] = ()):
    """A copy of the dataclass `stats` with each numeric field summed over the ranks (the fields named in `maxima`:
    their largest value), nested dataclasses field by field; two all-reduces whatever the number of fields."""
    leaves = []  # (owner, field name, reduce with max)

    def walk(obj):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value)
            else:
                leaves.append((obj, f.name, f.name in maxima))

    stats = copy.deepcopy(stats)
    walk(stats)
    for use_max in (False, True):
        mine = [(obj, name) for obj, name, m in leaves if m == use_max]
        if mine:
            values = (all_max if use_max else all_sum)(*(float(getattr(o, n)) for o, n in mine), device=device)
            for (obj, name), v in zip(mine, values):
                setattr(obj, name, type(getattr(obj, name))(v))
    return stats


# -----------------------------------------------------------------------------------------------------------------
# Sharding: the trainer's model, a frozen reference, and the plain copy the sampler reads

MODULES = {"vit": "vision_model", "connector": "mlp1", "llm": "language_model"}  # --train names -> VLM children


@dataclass(frozen=True)
class Precision:
    """Every dtype of a run but the masters' (fp32, whatever the checkpoint's) and the loss's (logits go to fp32
    first): decided once, by `precision`."""
    param_dtype: torch.dtype    # FSDP2 casts the gathered parameters to this for forward and backward
    reduce_dtype: torch.dtype   # the gradients' reduce-scatter (and the fp32 masters' gradients)
    rollout_dtype: torch.dtype  # the sampler's plain copy
    kv_dtype: torch.dtype       # the sampler's KV pool
    host_dtype: torch.dtype     # the checkpoint as rank 0 reads it, before the cast into the fp32 shards

    def mp_policy(self) -> MixedPrecisionPolicy:
        # fp32 compute: no policy at all, so parameters keep whatever dtype they have (fp64 in some tests)
        if self.param_dtype == self.reduce_dtype == torch.float32:
            return MixedPrecisionPolicy()
        return MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype)


def precision(device: torch.device, flag: str = "auto") -> Precision:
    """--precision: "auto" is bf16 on CUDA (bf16 parameters in forward/backward, fp32 gradient reduction, a bf16
    rollout copy and KV pool, the checkpoint read in bf16: a 38B takes 76 GB of host memory rather than 152) and
    fp32 on a CPU, the parity reference. "bf16" asks for the GPU configuration on any device (a CPU test runs it
    under gloo); "fp32" for fp32 everywhere."""
    assert flag in ("auto", "fp32", "bf16"), flag
    bf16 = flag == "bf16" or (flag == "auto" and device.type == "cuda")
    half = torch.bfloat16 if bf16 else torch.float32
    return Precision(param_dtype=half, reduce_dtype=torch.float32, rollout_dtype=half, kv_dtype=half,
                     host_dtype=half)


def set_trainable(model: VLM, train: str):
    """requires_grad per stage (a comma list of MODULES keys, "" for none), before any forward: turning a parameter
    on after FSDP2 has run it in mixed precision breaks its gradient casts (torch 2.13)."""
    names = {MODULES[m] for m in train.split(",") if m}
    for name, module in model.named_children():
        module.requires_grad_(name in names)


def shard(model: VLM, device: torch.device, activation_checkpointing: bool = False, compile_blocks: bool = False,
          prec: Precision | None = None) -> list:
    """torchtitan's order: activation checkpointing and compile per block (both keep parameter names), fully_shard
    each ViT block and each LLM block, then the root, which holds the embeddings, final norm, head (tied or not:
    a tied head must share the embeddings' unit) and the connector. Returns the FSDP units in a fixed order."""
    mp = (prec or precision(device)).mp_policy()
    blocks = [*(model.vision_model.encoder.layers if model.vision_model is not None else []),
              *model.language_model.layers]
    for block in blocks:
        if activation_checkpointing:  # recompute the block in backward; replaces forward, not the module
            block.forward = _checkpointed(block.forward)
        if compile_blocks:
            block.compile()
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return [*blocks, model]


def _checkpointed(forward):
    return lambda *args: torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False)


def build_sharded(init_from: str, train: str, d: Dist, activation_checkpointing: bool = False,
                  compile_blocks: bool = False, prec: Precision | None = None):
    """(model, units, config): the FSDP-sharded model with `train` trainable, loaded from `init_from` through rank 0
    (which reads the file; the others receive their shards). Master parameters stay fp32 whatever the checkpoint's
    dtype; `prec` (default: the device's) gives the compute, reduce and host dtypes."""
    prec = prec or precision(d.device)
    config = read_config(init_from)
    with torch.device("meta"):
        model = VLM(config)
    set_trainable(model, train)
    units = shard(model, d.device, activation_checkpointing, compile_blocks, prec)
    model.to_empty(device=d.device)
    full = load_model(init_from, dtype=prec.host_dtype, device="cpu").state_dict() if d.rank == 0 else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    bad = [n for n, p in model.named_parameters() if p.dtype != torch.float32]
    assert not bad, f"sharded master parameters must be fp32: {bad[:3]}"
    return model, units, config


def build_rollout_copy(config, device: torch.device, prec: Precision | None = None, tp: "TPLayout | None" = None
                       ) -> VLM:
    """The sampler's weights: a plain unsharded model in `prec.rollout_dtype` (default: the device's: bf16 on GPU,
    fp32 on CPU), allocated once; `refresh` copies the trained weights into it in place, so the compiled decode
    step and its CUDA graphs stay valid. Its config is the checkpoint's (`source_dir` included), so saving it writes
    the source's layout and tokenizer. With a tensor-parallel `tp` of size > 1: this rank's part of the group's
    copy, a VLM of `tp_config` whose row-parallel outputs are all-reduced over the group (to save it, `gathered`)."""
    tp = tp or TPLayout()
    with torch.device("meta"):
        copy = VLM(tp_config(config, tp.size))
    copy.to_empty(device=device)
    copy.to((prec or precision(device)).rollout_dtype)
    copy.requires_grad_(False)
    if tp.size > 1:
        for block in copy.language_model.layers:
            for module in (block.self_attn.o_proj, block.mlp.down_proj):
                module.register_forward_hook(_all_reduce_output(tp.group))
    return copy.eval()


@torch.no_grad()
def refresh(copy: VLM, units: list, tp: "TPLayout | None" = None):
    """Unshard each FSDP unit in the same order on every rank, copy the parameters it owns (with a tensor-parallel
    `tp`: this rank's part of each, `tp_part`), reshard: peak memory is one unit's full weights on top of the copy.
    The root's unshard leaves the blocks' parameters sharded (DTensor), which are skipped there and copied with their
    own unit."""
    tp = tp or TPLayout()
    targets = dict(copy.named_parameters())
    prefix = {id(u): "" for u in units}
    for name, module in units[-1].named_modules():
        if id(module) in prefix:
            prefix[id(module)] = f"{name}." if name else ""
    for unit in units:
        unit.unshard()
        for name, p in unit.named_parameters():
            if not isinstance(p, DTensor):
                name = prefix[id(unit)] + name
                targets[name].copy_(tp_part(name, p, tp))
        unit.reshard()

# -----------------------------------------------------------------------------------------------------------------
# Tensor parallelism of the rollout copy (--rollout_tp)


@dataclass(frozen=True)
class TPLayout:
    """Where this rank sits in the tensor parallelism of the rollout copy: `size` consecutive ranks hold one copy,
    this rank is the group's `rank`-th, and `group` is their process group (None without tensor parallelism)."""
    size: int = 1
    rank: int = 0
    group: dist.ProcessGroup | None = None


def check_tp(size: int, world: int, local_world: int, config: VLMConfig, flag: str = "--rollout_tp"):
    """UsageError, one line naming the numbers, when `size` ranks cannot split one copy: a group must lie within a
    node (the all-reduce runs every layer) and the heads, key/value heads and MLP channels must divide evenly."""
    llm = config.llm
    counts = [(world, "processes"), (local_world, "processes per node"),
              (llm.num_attention_heads, "attention heads"), (llm.num_key_value_heads, "key/value heads"),
              (llm.intermediate_size, "MLP channels (intermediate_size)")]
    if size < 1:
        raise UsageError(f"{flag} must be >= 1, got {size}")
    for n, what in counts:
        if n % size:
            raise UsageError(f"{flag} {size} must divide the {n} {what}")


def tp_layout(size: int, d: Dist) -> TPLayout:
    """This rank's TPLayout for groups of `size` consecutive ranks. Every rank creates every group, in the same
    order (torch.distributed requires it), and keeps its own."""
    if size == 1:
        return TPLayout()
    groups = [dist.new_group(list(range(first, first + size))) for first in range(0, d.world, size)]
    return TPLayout(size, d.rank % size, groups[d.rank // size])


def tp_config(config: VLMConfig, size: int) -> VLMConfig:
    """The config of one rank's part of a copy split `size` ways: its heads, key/value heads and MLP channels
    (head_dim is explicit, so it stays). The Sampler sizes its KV pool from it: each rank holds its heads' KV."""
    if size == 1:
        return config
    llm = config.llm
    return dataclasses.replace(config, llm=dataclasses.replace(
        llm, num_attention_heads=llm.num_attention_heads // size, num_key_value_heads=llm.num_key_value_heads // size,
        intermediate_size=llm.intermediate_size // size))


_COLUMN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
_ROW = ("self_attn.o_proj", "mlp.down_proj")


def tp_split_dim(name: str) -> int | None:
    """How the parameter `name` (a VLM state-dict key) splits across a tensor-parallel group: 0 for the
    column-parallel q/k/v and gate/up (weights and biases: a block of output rows, i.e. of heads or channels), 1 for
    the row-parallel o_proj and down_proj weights (a block of input columns), None for what every rank holds whole
    (norms, embeddings, LM head, ViT, connector, and the row-parallel biases, held by the group's rank 0)."""
    if not name.startswith("language_model.layers."):
        return None
    module, _, kind = name.rpartition(".")
    if module.endswith(_COLUMN):
        return 0
    if module.endswith(_ROW) and kind == "weight":
        return 1
    return None


def tp_part(name: str, full: torch.Tensor, tp: TPLayout) -> torch.Tensor:
    """This rank's part of the full parameter `name`: its block along `tp_split_dim`, a row-parallel bias on the
    group's rank 0 only (zeros elsewhere: the all-reduce then adds it once), else the whole tensor."""
    if tp.size == 1:
        return full
    dim = tp_split_dim(name)
    if dim is not None:
        chunk = full.shape[dim] // tp.size
        return full.narrow(dim, tp.rank * chunk, chunk)
    if tp.rank and name.rpartition(".")[0].endswith(_ROW):
        return torch.zeros_like(full)
    return full


def _all_reduce_output(group):
    """A forward hook summing a row-parallel layer's partial output over the group; PyTorch's functional
    all-reduce, which torch.compile traces into the decode step's graph."""
    return lambda module, args, out: funcol.all_reduce(out, "sum", group)


@torch.no_grad()
def gathered(copy: VLM, tp: TPLayout, config: VLMConfig) -> VLM | None:
    """The whole rollout copy (of the full `config`), what a checkpoint saves, on rank 0 (what the other ranks get
    is not for use): `copy` itself without tensor parallelism; with it, rank 0's group gathers its parts, one
    parameter at a time, into a plain VLM on rank 0's host (None on every other rank: one host copy per run, not
    one per group). Every rank calls it."""
    if tp.size == 1:
        return copy
    if dist.get_rank() >= tp.size:  # not rank 0's group: nothing of it is saved
        return None
    state = {}
    for name, p in copy.state_dict().items():
        if (dim := tp_split_dim(name)) is not None:
            parts = [torch.empty_like(p) for _ in range(tp.size)] if tp.rank == 0 else None
            dist.gather(p.contiguous(), parts, dst=0, group=tp.group)
            p = torch.cat(parts, dim) if tp.rank == 0 else p
        if tp.rank == 0:
            state[name] = p.cpu()
    if tp.rank:
        return None
    with torch.device("meta"):
        whole = VLM(config)
    whole.load_state_dict(state, strict=True, assign=True)
    return whole.eval()


def tp_generate(sampler, requests: list, tp: TPLayout, seed: int = 0, **kw) -> list:
    """`sampler.generate(requests, seed=seed, **kw)` under tensor parallelism: the group's ranks gather their
    requests, generate all of them in lockstep (the same calls, hence the same collectives), and each keeps the
    completions of its own. A request's draws depend only on its seed (given, or its index on this rank mixed with
    `seed`, as generate derives it), so the completions equal a run without tensor parallelism."""
    if tp.size == 1:
        return sampler.generate(requests, seed=seed, **kw)
    requests = [r if r.seed is not None else dataclasses.replace(r, seed=mix_seed(seed, i))
                for i, r in enumerate(requests)]
    shares = [None] * tp.size
    dist.all_gather_object(shares, requests, group=tp.group)
    start = sum(len(s) for s in shares[:tp.rank])
    return sampler.generate([r for share in shares for r in share], seed=seed, **kw)[start:start + len(requests)]


def load_rollout_copy(path: str, d: Dist, prec: Precision, tp: TPLayout) -> VLM:
    """A rollout copy of the checkpoint at `path` for inference alone (eval.py): loaded through rank 0 into FSDP
    shards (one host copy of the checkpoint per run, not per rank), copied into this rank's copy by `refresh`,
    the shards then freed. The same copy a training run's sampler reads."""
    model, units, config = build_sharded(path, "", d, prec=prec)
    copy = build_rollout_copy(config, d.device, prec, tp)
    refresh(copy, units, tp)
    del model, units
    return copy
