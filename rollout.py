"""Batched sampler for GRPO rollouts on the trainer's own weights: a paged KV pool, each prompt prefilled once and
its full pages shared by its samples, continuous batching, preemption by recompute, per-request seeds, and the
per-token log-probs the trainer recomputes.

No second engine and no weight sync: `Sampler` runs `model.VLM` as it is. KV lives in a pool of fixed-size pages
(`PagePool`: one (pages, page_size, kv_heads, head_dim) tensor per layer for K and one for V), budgeted in tokens
(`kv_tokens`), not slots x max_len. Each slot has a block-table row and a length at fixed addresses, so every
decode step has the same shapes and can be `torch.compile`d (CUDA graphs on GPU). Pages are taken as sequences
grow and returned when they finish. Prompts are prefilled once each, several per right-padded batch (vision tower,
connector and LLM), straight into pages; the G samples of a prompt reference its full pages (reference counts) and
each gets a copy of its partial last page (the last sample admitted takes the original), so a group holds
P + G x R tokens of KV, not G x (P + R). A slot whose sequence finished takes the next waiting sample at the next
host check, so one long response never idles the batch.

Scheduling (host side, at each check): finished slots are harvested and their pages released; waiting work is
admitted while the pool can hold it together with the next `sync_every` steps of everything already running; then
every running sequence gets the pages its next steps write, oldest first. When a page is missing, prompts still
waiting for slots give their pages back (they are prefilled again when their turn comes), then the most recently
admitted other sequence is preempted (pages freed, tokens kept on the host), and last the sequence itself. A
preempted sequence is recomputed later: prompt + what it had generated is prefilled as a new sequence, whose last
logits draw its next token with the step counter it had reached (it is never taken for a decode). Because draws
are counter-based per (seed, sample, step), the result equals a run with an ample pool, token for token (up to
float-rounding near-ties, as with any batch composition). A request that could never fit the pool alone is refused
at `generate`'s door, naming it.

Decode attention reads only live tokens in every mode (decode_attention.py). CUDA: the Triton kernel walks each
slot's block table up to its length; under CUDA graphs the table, the lengths and the kernel's `decode_buffers`
are preallocated, fixed-shape inputs; all layers share one set of split partials (each layer's merge consumes
them before the next layer's kernel runs). CPU: over the block table's first columns, as many as the longest
running sequence holds by the end of the next host-check interval, masked to each slot's length: eager, the
plain-torch reference (gathered pages, SDPA); compiled, `attend_pages_compiled`, whose page gather inductor fuses
into the score and output loops (no gathered copies). Compiled, the step takes those columns as a view of the
table whose width is a dynamic dimension, so one graph serves every length (up to 4096 keys, where inductor's
fp32 sums switch to chunked accumulation: one more graph beyond) and the step compiles once per sampler and
sampling setting. Measured on the tiny model, that graph runs as fast as graphs specialised to each width,
whose compiles (one per bucket of widths) cost more than a whole CPU rollout; attending over the whole table, as
the static cache did, made a long max_len slow. Idle and finished slots have length 0 and write to page 0, a
scratch page no sequence owns.
References: vLLM's PagedAttention (Kwon et al. 2023) and nano-vllm `engine/block_manager.py`, `scheduler.py`,
`model_runner.py` (block pool with reference counts, preempt-the-newest by recompute, decode CUDA graphs over
fixed-shape block tables), gpt-fast `generate.py` (compiled one-token decode, sampling without host syncs),
nanochat `engine.py` (prefill once, share the prefix with the samples of a group).

Deliberate choices:
- Sampling is inverse-CDF with one uniform per (request seed, sample index, step) from a counter-based integer hash
  (splitmix64 in int64 torch ops, on the device): the draw depends neither on the slot nor on the rest of the
  batch, needs no torch.Generator and no host sync, and costs B hashes per step rather than the B x V of
  Gumbel-max noise (~12 int64 ops per logit: on a CPU, about as much as the LM head itself).
- Returned log-probs are log softmax(logits / T) of the chosen token over the full vocabulary, what the trainer
  recomputes with `entropy.logprob_entropy(..., temperature=T)`, not the top-k/top-p/ban-truncated distribution
  actually sampled from. Greedy (T = 0) reports temperature-1 log-probs.
- Banned ids (the image special tokens, plus any the caller adds) are masked before sampling, never in log-probs.
- A completion's ids include the stop token that ended it (the policy must learn to emit it), with its log-prob.
- Batch composition, pool size and preemptions change logits only at float-rounding level (padded prefill
  batches, other rows, a recomputed prefix): the same seed gives the same tokens except at near-ties, and
  log-probs agree to ~1e-6.
- Prompt + completion never exceed `max_len`; a prompt with no room for one new token is an error naming the
  request (never a truncation, which could cut an image span).
- No prefix caching across requests: a prompt's pages are shared by its own samples only, and go back to the pool
  when its last sample finishes.

    python bench.py rollout        # the sampler vs transformers' generate on a random Qwen2 model
"""
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from data import mix_seed, pad_id, token_batches
from decode_attention import (attend_pages, attend_pages_compiled, decode_buffers, live_pages, paged_decode_attention,
                              triton)
from model import VLM, LLMConfig, causal_attention

# -----------------------------------------------------------------------------------------------------------------
# Requests and results


@dataclass
class Request:
    ids: list[int]  # prompt token ids, e.g. from data.build_prompt or data.encode
    pixel_values: torch.Tensor | None = None  # (tiles, 3, S, S) for the prompt's <IMG_CONTEXT> tokens
    seed: int | None = None  # None: derived from generate's seed and the request's index
    max_new_tokens: int | None = None  # None: generate's max_new_tokens; at least 1


@dataclass
class Completion:
    ids: list[int]  # generated tokens, the stop token included when finish_reason == "stop"
    logprobs: list[float]  # log softmax(logits / T)[token] over the full vocabulary (T = 1 when greedy)
    finish_reason: str  # "stop" or "length"


# -----------------------------------------------------------------------------------------------------------------
# Sampling: counter-based uniforms, inverse CDF over the filtered distribution


def _i64(x: int) -> int:  # an unsigned 64-bit constant as the int64 with the same bits
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN, _MUL1, _MUL2 = _i64(0x9E3779B97F4A7C15), _i64(0xBF58476D1CE4E5B9), _i64(0x94D049BB133111EB)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors. Products wrap like uint64 ones; torch's >> is arithmetic, so the
    masks turn it into the logical shift the algorithm needs."""
    x = (x ^ ((x >> 30) & ((1 << 34) - 1))) * _MUL1
    x = (x ^ ((x >> 27) & ((1 << 37) - 1))) * _MUL2
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def uniform(seed: torch.Tensor, sample: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """One uniform in [0, 1 - 2^-24] per row from int64 (seed, sample index, step), all (B,): fp32, same device."""
    h = _mix(_mix(_mix(seed + _GOLDEN) + sample) + step)
    return ((h >> 40) & ((1 << 24) - 1)).float() * 2.0 ** -24  # top 24 bits: exact in fp32


def sample(logits: torch.Tensor, u: torch.Tensor, temperature: float, top_p: float, top_k: int,
           banned: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, V) fp32, overwritten (in place: on a CPU each pass over B x V costs as much as a decoder layer);
    u (B,) uniforms; banned (nb,) ids. Returns tokens (B,) and their log-probs (B,) under softmax(logits / T) over
    the full vocabulary. Banned ids, then top-k, then top-p filter what may be drawn."""
    z = logits.div_(temperature) if temperature not in (0, 1) else logits
    lse_banned = torch.logsumexp(z[:, banned], dim=-1) if banned.numel() else None  # (B,) kept for the normaliser
    z.index_fill_(1, banned, float("-inf"))
    m, top = z.max(dim=-1)  # (B,)
    if temperature > 0 and (0 < top_k < z.shape[-1] or top_p < 1):
        vals, idx = torch.topk(z, top_k, dim=-1) if 0 < top_k < z.shape[-1] else torch.sort(z, -1, descending=True)
        e = (vals - m[:, None]).exp_()  # (B, k) unnormalised probabilities of the candidates, descending
        total = z.sub_(m[:, None]).exp_().sum(-1)  # over the whole (allowed) vocabulary
        if top_p < 1:
            p = e / e.sum(-1, keepdim=True)
            e.masked_fill_(p.cumsum(-1) - p >= top_p, 0.0)  # the mass before it already reaches top_p
        fallback = torch.zeros_like(top)  # candidate 0 is the most likely one
    else:
        e = z.sub_(m[:, None]).exp_()  # (B, V) unnormalised probabilities, vocabulary order
        total, idx, fallback = e.sum(-1), None, top
    if temperature == 0:
        j = fallback[:, None]
    else:  # inverse CDF: the first candidate whose cumulative mass exceeds u x total mass
        cdf = e.cumsum(-1)
        j = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True).clamp_(max=e.shape[-1] - 1)  # (B, 1)
        # A parallel (GPU) cumsum may step up by rounding across a zero-probability entry: never draw one.
        j = torch.where(e.gather(-1, j) == 0, fallback[:, None], j)
    tok = (j if idx is None else idx.gather(-1, j)).squeeze(-1)
    norm = total.log() if lse_banned is None else torch.logaddexp(total.log(), lse_banned - m)  # lse - m
    return tok, e.gather(-1, j).squeeze(-1).log() - norm

# -----------------------------------------------------------------------------------------------------------------
# The paged KV pool: pages, reference counts, and the two ways LLM.forward writes and reads them

CPU_KV_BYTES = 128 * 2**20  # default pool on a CPU: a modest fixed size, whatever slots x max_len would be
CUDA_KV_FRACTION = 0.5  # default pool on CUDA: this share of the memory free once the model is built (the trainer
#                         needs the rest: verl/EasyR1 give vLLM 0.5-0.7 of the whole device)


RECOMPILE_LIMIT = 64  # compiled decode steps per process: one per sampler and sampling setting, all in the cache
#                        of the one `_decode_step` code object (dynamo's default stops at 8)


class PagePool:
    """The block manager and the pages it hands out: K and V tensors of (num_pages, page_size, kv_heads, head_dim)
    per layer, token-major (what decode_attention.py reads). Page 0 is the scratch page: padding and idle slots
    write there and nothing reads it, so it is never handed out. A page's reference count is how many holders
    (sequences, prompts waiting for slots) list it; it goes back to the free list when that count reaches 0."""

    def __init__(self, cfg: LLMConfig, num_pages: int, page_size: int, dtype: torch.dtype, device):
        shape = (num_pages, page_size, cfg.num_key_value_heads, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.page_size = page_size
        self.refs = [0] * num_pages
        self.free = deque(range(1, num_pages))
        self.peak = 0  # most pages in use at once since the last reset

    @property
    def capacity(self) -> int:  # pages that can be handed out
        return len(self.refs) - 1

    @property
    def used(self) -> int:
        return self.capacity - len(self.free)

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def take(self, n: int) -> list[int]:
        if n > len(self.free):
            raise RuntimeError(f"KV pool: {n} pages wanted, {len(self.free)} free")  # the scheduler checks first
        pages = [self.free.popleft() for _ in range(n)]
        for p in pages:
            self.refs[p] = 1
        self.peak = max(self.peak, self.used)
        return pages

    def share(self, pages: list[int]):
        for p in pages:
            self.refs[p] += 1

    def release(self, pages: list[int]):
        for p in pages:
            self.refs[p] -= 1
            if self.refs[p] == 0:
                self.free.append(p)

    def copy(self, dst: list[int], src: list[int]):
        """Page contents src[i] -> dst[i] in every layer (a prompt's partial last page into a sample's own)."""
        if dst:
            d, s = (torch.tensor(x, device=self.k[0].device) for x in (dst, src))
            for t in self.k + self.v:
                t[d] = t[s]

    def write(self, layer: int, page: torch.Tensor, offset: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """k, v (N, kv_heads, head_dim) to token `offset[n]` of page `page[n]`, (N,) each."""
        self.k[layer].index_put_((page, offset), k.to(self.k[layer].dtype))
        self.v[layer].index_put_((page, offset), v.to(self.v[layer].dtype))


@dataclass
class _PrefillKV:
    """LLM.forward's cache for a right-padded prefill batch of new sequences: each token's K/V goes to its pool
    address (padding to the scratch page), and attention is causal over the call's own keys."""
    pool: PagePool
    page: torch.Tensor  # (B * T,) page of each token, row-major
    offset: torch.Tensor  # (B * T,)

    def attend(self, layer: int, q, k, v, positions, slots=None):
        B, T, KV, D = k.shape
        self.pool.write(layer, self.page, self.offset, k.reshape(B * T, KV, D), v.reshape(B * T, KV, D))
        return causal_attention(q, k, v)  # (B, T, H * D)


@dataclass
class _DecodeKV:
    """LLM.forward's cache for one decode step of every slot: the step's K/V go to (page, offset); attention reads
    each slot's `lengths[s]` tokens through the block table: on CUDA the Triton kernel
    (decode_attention.paged_decode_attention, preallocated buffers), elsewhere the reference's two halves, the
    pages and mask computed once for all layers."""
    pool: PagePool
    page: torch.Tensor  # (S,)
    offset: torch.Tensor  # (S,)
    table: torch.Tensor  # (S, columns) int32: CPU, the columns to read; the Triton kernel, the whole table
    lengths: torch.Tensor  # (S,) int32, 0 for idle and finished slots
    buffers: list | None  # CUDA: one decode_buffers per layer (fixed addresses for CUDA graphs)

    def __post_init__(self):
        if self.buffers is None:
            self.live = live_pages(self.table, self.lengths, self.pool.page_size, self.table.shape[1])

    def attend(self, layer: int, q, k, v, positions, slots=None):
        S, _, H, D = q.shape
        self.pool.write(layer, self.page, self.offset, k[:, 0], v[:, 0])
        k_pages, v_pages = self.pool.k[layer], self.pool.v[layer]
        if self.buffers is None:  # idle slots' outputs are garbage nobody reads
            attend = attend_pages_compiled if torch.compiler.is_compiling() else attend_pages
            y = attend(q[:, 0], k_pages, v_pages, *self.live)
        else:
            y = paged_decode_attention(q[:, 0], k_pages, v_pages, self.table, self.lengths, impl="triton",
                                       buffers=self.buffers[layer])  # (S, H, D)
        return y.reshape(S, 1, H * D)

# -----------------------------------------------------------------------------------------------------------------
# The sampler: host-side bookkeeping


@dataclass
class _Work:
    """A sample waiting for a slot: new (nothing generated), or preempted with the tokens it had generated."""
    request: int
    sample: int
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


@dataclass
class _Group:
    """A prefilled prompt some of whose samples still wait for a slot: its pages (one reference held for the
    group) and the first token of each sample, drawn from the prompt's last logits."""
    pages: list[int]
    tok: torch.Tensor  # (num_samples,)
    logprob: torch.Tensor  # (num_samples,)


@dataclass
class _Seq:
    """The sequence a slot is generating. Decode step `t` (counted over the whole generate call) writes position
    `start + t - admitted_at` while `t - admitted_at < steps_left`."""
    request: int
    sample: int
    pages: list[int]  # its block-table row: shared prompt pages first
    start: int  # position of the token fed by its first decode step (tokens already in its pages)
    admitted_at: int  # decode steps run before it took the slot
    steps_left: int  # decode steps it may run (max tokens - tokens it had at admission)
    order: int  # admissions before its own: the newest is preempted first

    def tokens_after(self, steps: int) -> int:
        """Tokens its pages must hold once decode steps 0..steps-1 have run."""
        return self.start + max(0, min(steps - self.admitted_at, self.steps_left))

    def paged_through(self, page_size: int) -> float:
        """The largest `steps` whose tokens_after its pages already hold (inf: all it may ever write)."""
        room = len(self.pages) * page_size - self.start
        return math.inf if room >= self.steps_left else self.admitted_at + room


class Sampler:
    """Generates from `model` with `max_slots` sequences in flight and at most `max_len` tokens (prompt +
    completion) each. `compile=True` compiles the decode step (CUDA graphs on GPU): build the sampler once and
    reuse it, each instance compiles its own. `sync_every` is how many decode steps run between host checks for
    finished slots (default 1 on CPU, where a check costs nothing; 8 on GPU, where each check drains the queue and
    a finished slot idles at most 7 steps); `prefill_tokens` caps the padded prompt tokens of one prefill batch.
    `cache_dtype` is the KV pool's dtype (default: the parameters'); bf16 halves the bytes each decode step reads
    and is what a GPU run wants even when the parameters it reads are fp32. `kv_tokens` is the pool's size in
    tokens (rounded up to pages of `page_size`); default: CUDA_KV_FRACTION of the device memory free now (build
    the sampler after the model), CPU_KV_BYTES on a CPU, never more than max_slots x max_len could use."""

    def __init__(self, model: VLM, max_slots: int = 32, max_len: int = 4096, stop_ids=(), banned_ids=(),
                 compile: bool = False, sync_every: int | None = None, prefill_tokens: int = 16384,
                 cache_dtype: torch.dtype | None = None, kv_tokens: int | None = None, page_size: int = 16):
        cfg = model.config.llm
        if max_len > cfg.max_position_embeddings:
            raise ValueError(f"max_len {max_len} exceeds the model's max_position_embeddings "
                             f"{cfg.max_position_embeddings}")
        for name, value in (("max_slots", max_slots), ("max_len", max_len), ("page_size", page_size),
                            ("kv_tokens", 1 if kv_tokens is None else kv_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        param = model.language_model.embed_tokens.weight
        dev, S = param.device, max_slots
        self.model, self.max_slots, self.max_len, self.compiled = model, max_slots, max_len, compile
        self.prefill_tokens, self.page_size = prefill_tokens, page_size
        cache_dtype = cache_dtype or param.dtype
        if kv_tokens is None:
            per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * cache_dtype.itemsize
            budget = (CUDA_KV_FRACTION * torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else CPU_KV_BYTES)
            kv_tokens = int(budget) // per_token
        # max_slots sequences of max_len plus one prompt waiting for slots is the most the pool could ever hold.
        self.max_pages = math.ceil((max_len + 1) / page_size)  # the most a sequence holds: room for position max_len
        num_pages = min(math.ceil(kv_tokens / page_size), (S + 1) * self.max_pages)
        self.pool = PagePool(cfg, num_pages + 1, page_size, cache_dtype, dev)  # + the scratch page
        # The CPU step reads at least 2 columns (a dynamic dimension of size 1 would be specialised: a second graph)
        # and never the whole table (a full-width view has other strides: a second graph too), hence the spare ones.
        self.table = torch.zeros(S, max(2, self.max_pages) + 1, dtype=torch.int32, device=dev)
        self.stop_ids = set(stop_ids)
        self.stop = torch.tensor(sorted(self.stop_ids) or [-1], device=dev)  # -1 matches nothing, keeps a shape
        self.banned = torch.tensor(sorted({*banned_ids, model.config.image_token_id} - {None}), dtype=torch.long,
                                   device=dev)
        # Per-slot decode state, all on the device: the token to feed next and its position, tokens generated so
        # far (= index of the next one, the RNG counter), this slot's cap, its seed and sample index, finished.
        self.tok, self.pos, self.step, self.limit, self.seed, self.sample_idx = (
            torch.zeros(S, dtype=torch.long, device=dev) for _ in range(6))
        self.done = torch.ones(S, dtype=torch.bool, device=dev)
        self.out_tok = torch.zeros(S, max_len, dtype=torch.long, device=dev)  # completions, written at `step`
        self.out_lp = torch.zeros(S, max_len, dtype=torch.float32, device=dev)
        self.buffers = None
        if dev.type == "cuda" and triton is not None:  # the Triton kernel's outputs (one per layer) and partials,
            # at fixed addresses (without Triton, CUDA takes the CPU path: the reference over the live pages)
            q = torch.empty(S, cfg.num_attention_heads, cfg.head_dim, dtype=param.dtype, device=dev)
            shared = decode_buffers(q, self.table, page_size)  # the split partials: one set for all layers
            self.buffers = [replace(shared, out=torch.empty_like(shared.out)) for _ in range(cfg.num_hidden_layers)]
        self.sync_every = sync_every or (8 if dev.type == "cuda" else 1)
        self.stats: dict = {}
        self._step, self._graphs = self._decode_step, set()  # the sampling settings compiled so far
        if compile:
            buffers = [getattr(b, f) for b in self.buffers or () for f in ("out", "partial_out", "partial_lse")]
            for t in (*self.pool.k, *self.pool.v, self.table, *buffers, self.stop, self.banned, self.tok, self.pos,
                      self.step, self.limit, self.seed, self.sample_idx, self.done, self.out_tok, self.out_lp):
                torch._dynamo.mark_static_address(t)  # mutated in place: CUDA graphs must not copy them
            mode = "reduce-overhead" if dev.type == "cuda" else None
            # A CPU step launches ~60 small kernels: a C++ wrapper calls them without Python's per-kernel cost, and
            # the inputs are the same tensors every step, so their size checks are dropped.
            options = dict(cpp_wrapper=True, size_asserts=False) if dev.type == "cpu" else None
            self._step = torch.compile(self._decode_step, mode=mode, fullgraph=True, dynamic=False, options=options)

    def _decode_step(self, temperature: float, top_p: float, top_k: int, columns: torch.Tensor | None):
        """Every slot advances one token in one batched call; idle and finished slots attend over nothing, write
        to the scratch page and compute garbage that is never read (their position stays put), so shapes never
        change. columns: the first block-table columns, a view, that the CPU attention reads (None on CUDA)."""
        lm, P = self.model.language_model, self.page_size
        live = ~self.done
        page = torch.where(live, self.table.gather(1, (self.pos // P)[:, None])[:, 0].long(), 0)
        lengths = torch.where(live, self.pos + 1, 0).int()
        kv = _DecodeKV(self.pool, page, self.pos % P, self.table if columns is None else columns, lengths,
                       self.buffers)
        h = lm(lm.embed_tokens(self.tok[:, None]), self.pos[:, None], kv)  # (S, 1, C)
        u = uniform(self.seed, self.sample_idx, self.step)
        tok, lp = sample(lm.logits(h[:, 0]), u, temperature, top_p, top_k, self.banned)
        rows = torch.arange(tok.shape[0], device=tok.device)
        self.out_tok.index_put_((rows, self.step), tok)  # index_put_, not scatter_: compiled, inductor writes it in
        self.out_lp.index_put_((rows, self.step), lp)  # place, where it copies the whole (S, max_len) around a scatter
        live = live.long()
        self.pos += live
        self.step += live
        self.tok.copy_(tok)
        self.done |= (tok[:, None] == self.stop).any(-1) | (self.step >= self.limit)

    def _prefill(self, rows: list[tuple[list[int], torch.Tensor | None, list[int]]]) -> torch.Tensor:
        """New sequences (ids, pixel values, pages) in one right-padded batch (vision tower, connector, LLM once
        each), their K/V written into their pages. Returns each one's last hidden state (B, C). Padding comes after
        a sequence, so causal attention never lets the sequence see it."""
        dev, lm, P = self.tok.device, self.model.language_model, self.page_size
        lens = [len(ids) for ids, _, _ in rows]
        T, pad = max(lens), pad_id(self.model.config)
        ids = torch.tensor([ids + [pad] * (T - len(ids)) for ids, _, _ in rows], device=dev)
        pixels = [px for _, px, _ in rows if px is not None]
        pixels = torch.cat(pixels).to(dev, lm.embed_tokens.weight.dtype) if pixels else None
        page = [pages[t // P] if t < n else 0 for (_, _, pages), n in zip(rows, lens) for t in range(T)]
        offset = torch.arange(T, device=dev).repeat(len(rows)) % P
        h = lm(self.model.embed(ids, pixels), None, _PrefillKV(self.pool, torch.tensor(page, device=dev), offset))
        return h[torch.arange(len(rows), device=dev), torch.tensor(lens, device=dev) - 1]  # (B, C)

    def _draw(self, h: torch.Tensor, seeds: list[int], samples: list[int], steps: list[int], temperature: float,
              top_p: float, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens and log-probs from last hidden states h (N, C), one draw per row with its (seed, sample, step)."""
        dev, lm = h.device, self.model.language_model
        seed, sample_idx, step = (torch.tensor(x, device=dev) for x in (seeds, samples, steps))
        return sample(lm.logits(h), uniform(seed, sample_idx, step), temperature, top_p, top_k, self.banned)

    def _check(self, i: int, r: Request, limit: int):
        """A request that cannot run raises here, naming it, before any work is done."""
        P, cfg = len(r.ids), self.model.config
        if P == 0:
            raise ValueError(f"request {i}: empty prompt")
        if P >= self.max_len:
            raise ValueError(f"request {i}: prompt of {P} tokens leaves no room for a new token in max_len "
                             f"{self.max_len} (prompts are never truncated: that could cut an image span); "
                             f"shorten it or raise the sampler's max_len")
        V = cfg.llm.vocab_size
        bad = [(k, t) for k, t in enumerate(r.ids) if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < V]
        if bad:
            raise ValueError(f"request {i}: token id {bad[0][1]!r} at position {bad[0][0]} is not an int in the "
                             f"vocabulary [0, {V}) ({len(bad)} such ids)")
        n = r.max_new_tokens
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"request {i}: max_new_tokens must be an integer >= 1, got {n!r}")
        error = self.model.image_input_error(r.ids.count(cfg.image_token_id), r.pixel_values)
        if error:
            raise ValueError(f"request {i}: {error}")
        # Alone in the pool, a sample holds pages for P + limit - 1 tokens (the last token is never fed back), plus
        # its prompt's partial last page while the prompt waits to give it to its other samples.
        need = self.pool.pages_for(P + limit - 1) + 1
        if need > self.pool.capacity:
            raise ValueError(f"request {i}: a prompt of {P} tokens and up to {limit} new ones need {need} KV pages "
                             f"of {self.page_size} tokens, the pool holds {self.pool.capacity}: raise the "
                             f"sampler's kv_tokens or lower max_new_tokens")

    @torch.inference_mode()
    def generate(self, requests: list[Request], num_samples: int = 1, max_new_tokens: int = 256,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                 progress: Callable[[int, int, int], None] | None = None) -> list[list[Completion]]:
        """`num_samples` completions per request, aligned with `requests`. temperature 0 is greedy; top_k 0 and
        top_p 1 are off. `progress(finished, total, tokens)` is called whenever completions finish (for a live
        progress line). Throughput and pool occupancy land in `self.stats`."""
        for name, value, ok, want in [
                ("temperature", temperature, 0 <= temperature < float("inf"), "finite and >= 0"),
                ("top_p", top_p, 0 < top_p <= 1, "in (0, 1]"), ("top_k", top_k, top_k >= 0, ">= 0"),
                ("num_samples", num_samples, num_samples >= 1, ">= 1"),
                ("max_new_tokens", max_new_tokens, max_new_tokens >= 1, ">= 1")]:
            if not ok:  # comparisons with nan are False: a nan fails here too
                raise ValueError(f"{name} must be {want}, got {value!r}")
        limits = [min(max_new_tokens if r.max_new_tokens is None else r.max_new_tokens, self.max_len - len(r.ids))
                  for r in requests]
        for i, r in enumerate(requests):
            self._check(i, r, limits[i])
        t_start = time.perf_counter()
        run = _Run(requests, [r.seed if r.seed is not None else mix_seed(seed, i) for i, r in enumerate(requests)],
                   limits, num_samples, (temperature, top_p, top_k), [None] * self.max_slots,
                   deque(_Work(i, j) for i in range(len(requests)) for j in range(num_samples)),
                   {}, [num_samples] * len(requests))
        out: list[list[Completion | None]] = [[None] * num_samples for _ in requests]
        generated = completed = 0
        self.pool.peak = self.pool.used
        self.done.fill_(True)
        while True:
            # The host sync: which slots have finished; their pages go back to the pool.
            slots = run.slots
            done = self.done.tolist() if any(q is not None for q in slots) else []
            finished = [s for s, q in enumerate(slots) if q is not None and done[s]]
            if finished:
                n_tok = self.step[finished].tolist()
                width = max(n_tok)
                toks, lps = self.out_tok[finished, :width].tolist(), self.out_lp[finished, :width].tolist()
                for s, n, t, lp in zip(finished, n_tok, toks, lps):
                    seq = slots[s]
                    out[seq.request][seq.sample] = Completion(
                        t[:n], lp[:n], "stop" if t[n - 1] in self.stop_ids else "length")
                    generated += n
                    self.pool.release(seq.pages)
                    slots[s] = None
                completed += len(finished)
                if progress is not None:
                    progress(completed, len(requests) * num_samples, generated)
            self._admit(run)
            running = [q for q in slots if q is not None]
            if not running:
                if run.queue:  # _check admits nothing the empty pool cannot hold
                    raise RuntimeError(f"KV pool: {len(run.queue)} samples wait but none fits the empty pool")
                break
            # Run until the next check, but not past the last step any slot could still need.
            n = min(self.sync_every, max(q.steps_left - (run.steps - q.admitted_at) for q in running))
            self._grow(run, run.steps + n)
            running = [q for q in slots if q is not None]
            if not running:  # all preempted: admit again (the oldest alone always fits: _check)
                continue
            columns = None
            if self.buffers is None:  # CPU: read only the columns the longest running sequence reaches
                columns = self.table[:, :max(2, max(len(q.pages) for q in running))]
                if self.compiled:  # the width is symbolic in the graph: one compile serves every length (inductor
                    # specialises its fp32 sums over keys to at most 4096 keys: longer sequences compile a second)
                    torch._dynamo.maybe_mark_dynamic(columns, 1)
            for _ in range(n):
                graph = (temperature, top_p, top_k)
                if self.compiled and graph not in self._graphs:  # a new graph compiles: past dynamo's usual limit
                    self._graphs.add(graph)
                    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                        self._step(temperature, top_p, top_k, columns)
                else:
                    self._step(temperature, top_p, top_k, columns)
                run.steps += 1
        seconds = time.perf_counter() - t_start  # the last harvest synchronised the device
        self.stats = dict(tokens=generated, seconds=seconds, tokens_per_s=generated / seconds, decode_steps=run.steps,
                          prefills=run.prefills, recomputes=run.recomputes, preemptions=run.preemptions,
                          peak_pages=self.pool.peak, pool_pages=self.pool.capacity, page_size=self.page_size,
                          peak_occupancy=self.pool.peak / self.pool.capacity)
        return out

    def _cost(self, run: "_Run", w: _Work, groups: set[int]) -> int:
        """Pages admitting w takes now and over the next `sync_every` steps (its prompt's pages if not prefilled)."""
        P, L, pool = len(run.requests[w.request].ids), run.limits[w.request], self.pool
        if w.ids:  # a recompute: all its pages are its own
            n = len(w.ids)
            return pool.pages_for(P + n + min(self.sync_every, L - n - 1))
        last = run.pending[w.request] == 1  # the last sample takes the prompt's partial page, the others copy it
        own = pool.pages_for(P + min(self.sync_every, L - 1)) - pool.pages_for(P) + (P % self.page_size > 0
                                                                                      and not last)
        return own + (0 if w.request in groups else pool.pages_for(P))

    def _admit(self, run: "_Run"):
        """Waiting work into free slots, in queue order, while the pool can hold it beside the next `sync_every`
        steps of the running sequences: prompts not prefilled yet (and recomputes) in token-capped batches, then
        each slot's state. No host sync but the prefill's."""
        slots, queue, pool, k = run.slots, run.queue, self.pool, self.sync_every
        free = [s for s, q in enumerate(slots) if q is None]
        if not free or not queue:
            return
        running = [q for q in slots if q is not None]
        budget = len(pool.free) - sum(max(0, pool.pages_for(q.tokens_after(run.steps + k)) - len(q.pages))
                                      for q in running)
        plan, rows, prefilled = [], [], set(run.groups)  # rows: (ids, pixels, pages, work or None, request)
        while free and queue:
            w = queue[0]
            cost = self._cost(run, w, prefilled)
            if cost > budget and not plan and not running:  # nothing runs: prompts waiting for slots give way
                for i in [i for i in run.groups if w.ids or i != w.request]:
                    pool.release(run.groups.pop(i).pages)
                prefilled = set(run.groups)
                budget, cost = len(pool.free), self._cost(run, w, prefilled)
            if cost > budget:
                break
            budget -= cost
            queue.popleft()
            r = run.requests[w.request]
            if w.ids:
                rows.append((r.ids + w.ids, r.pixel_values, pool.take(pool.pages_for(len(r.ids) + len(w.ids))), w,
                             w.request))
            elif w.request not in prefilled:
                prefilled.add(w.request)
                rows.append((r.ids, r.pixel_values, pool.take(pool.pages_for(len(r.ids))), None, w.request))
            last = not w.ids and run.pending[w.request] == 1
            if not w.ids:
                run.pending[w.request] -= 1
            plan.append((free.pop(0), w, last))
        if not plan:
            return
        # Prefill: a prompt draws the first token of each of its samples, a recompute the next token of its own.
        temperature, top_p, top_k = run.sampling
        drawn = {}  # request -> (tok, lp) of its samples; id(work) -> (tok, lp)
        for batch in token_batches([len(row[0]) for row in rows], self.prefill_tokens):
            h = self._prefill([rows[b][:3] for b in batch])
            draws = [(b_i, i, j, step) for b_i, b in enumerate(batch) for _, _, _, w, i in [rows[b]]
                     for j, step in ([(w.sample, len(w.ids))] if w else [(j, 0) for j in range(run.num_samples)])]
            index, seeds, samples, steps = zip(*draws)
            tok, lp = self._draw(h[torch.tensor(index, device=h.device)], [run.seeds[i] for i in seeds], samples,
                                 steps, temperature, top_p, top_k)
            at = 0
            for b in batch:
                _, _, pages, w, i = rows[b]
                if w:
                    drawn[id(w)] = (tok[at], lp[at], pages)
                    at += 1
                else:
                    G = run.num_samples
                    run.groups[i] = _Group(pages, tok[at:at + G], lp[at:at + G])
                    at += G
            run.prefills += sum(rows[b][3] is None for b in batch)
            run.recomputes += sum(rows[b][3] is not None for b in batch)
        # Each admitted slot: its pages, its block-table row and its decode state, in batched writes.
        copies, cells, state = [], [], []
        for s, w, last in plan:
            i, P, L = w.request, len(run.requests[w.request].ids), run.limits[w.request]
            if w.ids:
                tok, lp, pages = drawn[id(w)]
                n = len(w.ids)
                self.out_tok[s, :n] = torch.tensor(w.ids)
                self.out_lp[s, :n] = torch.tensor(w.logprobs)
                start, step = P + n, n + 1
            else:
                g = run.groups[i]
                tok, lp = g.tok[w.sample], g.logprob[w.sample]
                full = P // self.page_size
                if last:  # takes over the prompt's references
                    pages = run.groups.pop(i).pages
                else:
                    pool.share(g.pages[:full])
                    pages = g.pages[:full]
                    if len(g.pages) > full:  # the partial last page: a copy of its own
                        pages = pages + pool.take(1)
                        copies.append((pages[-1], g.pages[-1]))
                start, step = P, 1
            cells += [(s, c, p) for c, p in enumerate(pages)]
            state.append((s, tok, lp, start, step, L, run.seeds[i], w.sample))
            slots[s] = _Seq(i, w.sample, pages, start, run.steps, L - step, run.admissions)
            run.admissions += 1
        run.paged_until = 0  # the new sequences hold only their prompts' pages: _grow gives them the rest
        if copies:
            pool.copy(*zip(*copies))
        self._set_cells(cells)
        dev = self.tok.device
        s, tok, lp, pos, step, limit, seed, sample_idx = zip(*state)
        s = torch.tensor(s, device=dev)
        tok, lp = torch.stack(tok), torch.stack(lp)
        step, limit = torch.tensor(step, device=dev), torch.tensor(limit, device=dev)
        self.tok[s] = tok
        self.out_tok[s, step - 1] = tok
        self.out_lp[s, step - 1] = lp
        self.pos[s], self.step[s], self.limit[s] = torch.tensor(pos, device=dev), step, limit
        self.seed[s], self.sample_idx[s] = torch.tensor(seed, device=dev), torch.tensor(sample_idx, device=dev)
        self.done[s] = (tok[:, None] == self.stop).any(-1) | (step >= limit)

    def _set_cells(self, cells: list[tuple[int, int, int]]):
        """Block-table entries (slot, column, page) in one write."""
        if cells:
            s, c, p = (torch.tensor(x, device=self.table.device) for x in zip(*cells))
            self.table[s, c] = p.int()

    def _grow(self, run: "_Run", until: int):
        """Pages for what every running sequence writes through decode step `until`, oldest first. Out of pages:
        prompts waiting for slots give theirs back, then the newest other sequence is preempted, then, alone and
        still short (never: _check), the sequence itself."""
        if until <= run.paged_until:  # most steps: no sequence reaches a new page
            return
        slots, pool = run.slots, self.pool
        order = sorted((s for s, q in enumerate(slots) if q is not None), key=lambda s: slots[s].order)
        cells, at, done = [], 0, None
        while at < len(order):
            s = order[at]
            seq = slots[s]
            need = pool.pages_for(seq.tokens_after(until)) - len(seq.pages)
            if need > len(pool.free):
                done = self.done.tolist() if done is None else done  # one sync, and only when pages run short
                if done[s]:  # ended on its first token: it writes nothing, the next check harvests it
                    at += 1
                    continue
                while need > len(pool.free) and run.groups:
                    pool.release(run.groups.pop(next(iter(run.groups))).pages)
                while need > len(pool.free) and (victims := [v for v in order[at + 1:] if not done[v]]):
                    order.remove(victims[-1])
                    self._preempt(run, victims[-1])
                if need > len(pool.free):
                    self._preempt(run, order.pop(at))
                    continue
            if need > 0:
                pages = pool.take(need)
                cells += [(s, len(seq.pages) + c, p) for c, p in enumerate(pages)]
                seq.pages += pages
            at += 1
        self._set_cells(cells)
        run.paged_until = min((slots[s].paged_through(self.page_size) for s in order), default=math.inf)

    def _preempt(self, run: "_Run", s: int):
        """Slot s gives its pages back; its sample waits at the queue's head with what it has generated."""
        seq = run.slots[s]
        n = int(self.step[s])
        run.queue.appendleft(_Work(seq.request, seq.sample, self.out_tok[s, :n].tolist(),
                                   self.out_lp[s, :n].tolist()))
        self.pool.release(seq.pages)
        run.slots[s] = None
        self.done[s] = True
        run.preemptions += 1


@dataclass
class _Run:
    """One generate call's host state."""
    requests: list[Request]
    seeds: list[int]
    limits: list[int]  # max tokens per completion
    num_samples: int
    sampling: tuple[float, float, int]  # temperature, top_p, top_k
    slots: list[_Seq | None]
    queue: deque  # of _Work
    groups: dict[int, _Group]  # prefilled prompts with samples still waiting, by request
    pending: list[int]  # samples of each request never admitted yet
    steps: int = 0  # decode steps run
    paged_until: float = 0  # _grow(until) has nothing to do while until <= this: every running sequence's pages
    #                         hold what it writes through that step (a preemption only frees pages: still true)
    admissions: int = 0
    prefills: int = 0  # prompts prefilled
    recomputes: int = 0  # preempted sequences prefilled again
    preemptions: int = 0
