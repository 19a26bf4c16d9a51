"""Batched sampler for GRPO rollouts on the trainer's own weights: a static KV cache, each prompt prefilled once and
shared by its samples, continuous batching, per-request seeds, and the per-token log-probs the trainer recomputes.

No second engine and no weight sync: `Sampler` runs `model.VLM` as it is. The KV cache is preallocated
(layers, slots, kv_heads, max_len, head_dim) and written by index, so every decode step has the same shapes and can
be `torch.compile`d (CUDA graphs on GPU). Prompts are prefilled once each, several per right-padded batch (vision
tower, connector and LLM), and a prompt's KV is copied into the slot of each of its samples; samples that find no
free slot wait with their prompt's KV in a one-slot staging cache. A slot whose sequence finished takes the next
waiting sample at the next host check, so one long response never idles the batch.
References: gpt-fast `generate.py` (static cache written by index, compiled one-token decode, sampling without
host syncs), nanochat `engine.py` (prefill once, copy the prefix into the samples of a group).

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
- Batch composition changes logits only at float-rounding level (padded prefill batches, other rows): the same
  seed gives the same tokens except at near-ties, and log-probs agree to ~1e-6.
- Prompt + completion never exceed `max_len`; a prompt with no room for one new token is an error naming the
  request (never a truncation, which could cut an image span).

    python rollout.py --bench                                               # ours vs transformers' generate
    python rollout.py --ckpt /path/to/InternVL3-1B --image cat.jpg --prompt "Describe the image."
"""
import argparse
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from checkpoint import DTYPES, config_from_dict, load_model, to_internal
from data import build_prompt, load_tokenizer, special_ids
from model import VLM, KVCache

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


def mix_seed(*parts: int) -> int:
    """One 62-bit seed from integers (run seed, step, round, row; run seed, question; ...): every caller derives its
    seeds here, from what identifies a draw and never from the process that makes it."""
    h = 0
    for x in parts:
        h = (h * 1_000_003 + int(x)) % 2**62
    return h


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
# The sampler


@dataclass
class _KV:
    """A view of part of a KVCache; LLM.forward only reads `.k[layer]` and `.v[layer]`, and writes through views."""
    k: list[torch.Tensor]
    v: list[torch.Tensor]


@dataclass
class _Group:
    """One request's prefilled prompt: its KV (a view into its prefill batch's cache, or into the staging cache
    while some of its samples still wait for a slot) and the first token of each of its samples."""
    index: int
    seed: int
    limit: int  # max tokens per completion
    k: list[torch.Tensor]  # per layer (kv_heads, P, head_dim)
    v: list[torch.Tensor]
    tok: torch.Tensor  # (num_samples,) first tokens, drawn from the prompt's last logits
    logprob: torch.Tensor  # (num_samples,)
    stop: torch.Tensor  # (num_samples,) bool: the first token is a stop id


class Sampler:
    """Generates from `model` with `max_slots` sequences in flight and at most `max_len` tokens (prompt +
    completion) each. `compile=True` compiles the decode step (CUDA graphs on GPU): build the sampler once and
    reuse it, each instance compiles its own. `sync_every` is how many decode steps run between host checks for
    finished slots (default 1 on CPU, where a check costs nothing; 8 on GPU, where each check drains the queue and
    a finished slot idles at most 7 steps); `prefill_tokens` caps the padded prompt tokens of one prefill batch.
    `cache_dtype` is the KV cache's dtype (default: the parameters'); bf16 halves the bytes each decode step reads
    and is what a GPU run wants even when the parameters it reads are fp32."""

    def __init__(self, model: VLM, max_slots: int = 32, max_len: int = 4096, stop_ids=(), banned_ids=(),
                 compile: bool = False, sync_every: int | None = None, prefill_tokens: int = 16384,
                 cache_dtype: torch.dtype | None = None):
        cfg = model.config.llm
        if max_len > cfg.max_position_embeddings:
            raise ValueError(f"max_len {max_len} exceeds the model's max_position_embeddings "
                             f"{cfg.max_position_embeddings}")
        param = model.language_model.embed_tokens.weight
        dev, S = param.device, max_slots
        self.model, self.max_slots, self.max_len, self.compiled = model, max_slots, max_len, compile
        self.prefill_tokens = prefill_tokens
        cache_dtype = cache_dtype or param.dtype
        self.cache = KVCache(cfg, S, max_len, cache_dtype, dev)
        self.stage = KVCache(cfg, 1, max_len, cache_dtype, dev)  # one prompt's prefix while its samples wait
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
        self.sync_every = sync_every or (8 if dev.type == "cuda" else 1)
        self.stats: dict = {}
        self._step = self._decode_step
        if compile:
            for t in (*self.cache.k, *self.cache.v, self.stop, self.banned, self.tok, self.pos, self.step, self.limit,
                      self.seed, self.sample_idx, self.done, self.out_tok, self.out_lp):
                torch._dynamo.mark_static_address(t)  # mutated in place: CUDA graphs must not copy them
            mode = "reduce-overhead" if dev.type == "cuda" else None
            self._step = torch.compile(self._decode_step, mode=mode, fullgraph=True)

    def _decode_step(self, cache, temperature: float, top_p: float, top_k: int):
        """Every slot advances one token in one batched call; empty and finished slots compute garbage that is
        never read (their position stays put), so shapes never change."""
        lm = self.model.language_model
        h = lm(lm.embed_tokens(self.tok[:, None]), self.pos[:, None], cache)  # (S, 1, C)
        u = uniform(self.seed, self.sample_idx, self.step)
        tok, lp = sample(lm.logits(h[:, 0]), u, temperature, top_p, top_k, self.banned)
        self.out_tok.scatter_(1, self.step[:, None], tok[:, None])
        self.out_lp.scatter_(1, self.step[:, None], lp[:, None])
        live = (~self.done).long()
        self.pos += live
        self.step += live
        self.tok.copy_(tok)
        self.done |= (tok[:, None] == self.stop).any(-1) | (self.step >= self.limit)

    def _prefill(self, batch: list[int], requests: list[Request], seeds: list[int], limits: list[int], n: int,
                 temperature: float, top_p: float, top_k: int) -> dict[int, _Group]:
        """Several prompts in one right-padded batch (vision tower, connector, LLM once each) into a temporary
        cache; each one's first token is drawn for all its n samples from its last prompt position. Padding comes
        after a prompt, so causal attention never lets the prompt see it."""
        dev, dtype, lm = self.tok.device, self.cache.k[0].dtype, self.model.language_model
        lens = [len(requests[i].ids) for i in batch]
        G, T = len(batch), max(lens)
        pad = 1 if self.model.config.image_token_id == 0 else 0  # anything but <IMG_CONTEXT> (embed counts those)
        ids = torch.tensor([requests[i].ids + [pad] * (T - P) for i, P in zip(batch, lens)], device=dev)
        pixels = [requests[i].pixel_values for i in batch if requests[i].pixel_values is not None]
        param_dtype = self.model.language_model.embed_tokens.weight.dtype
        pixels = torch.cat(pixels).to(dev, param_dtype) if pixels else None  # embed scatters features row by row
        kv = KVCache(self.model.config.llm, G, T, dtype, dev)
        h = lm(self.model.embed(ids, pixels), None, kv)  # (G, T, C)
        last = h[torch.arange(G, device=dev), torch.tensor(lens, device=dev) - 1]  # (G, C)
        samples = torch.arange(n, device=dev).repeat(G)  # (G * n,) rows grouped by request
        seed = torch.tensor([seeds[i] for i in batch], device=dev).repeat_interleave(n)
        tok, lp = sample(lm.logits(last).repeat_interleave(n, dim=0), uniform(seed, samples, torch.zeros_like(seed)),
                         temperature, top_p, top_k, self.banned)
        tok, lp = tok.view(G, n), lp.view(G, n)
        stop = (tok[..., None] == self.stop).any(-1)  # (G, n)
        return {i: _Group(i, seeds[i], limits[i], [k[g, :, :P] for k in kv.k], [v[g, :, :P] for v in kv.v], tok[g],
                          lp[g], stop[g]) for g, (i, P) in enumerate(zip(batch, lens))}

    def _batches(self, todo: list[int], lens: list[int]):
        """Consecutive runs of `todo` whose padded size (count x longest) stays within prefill_tokens."""
        batch, longest = [], 0
        for i, P in zip(todo, lens):
            if batch and (len(batch) + 1) * max(longest, P) > self.prefill_tokens:
                yield batch
                batch, longest = [], 0
            batch.append(i)
            longest = max(longest, P)
        if batch:
            yield batch

    def _admit(self, s: int, g: _Group, j: int):
        """Sample j of group g into slot s: copy the prompt's KV, set the slot's state. No host sync."""
        P = g.k[0].shape[1]
        for dst, src in zip(self.cache.k + self.cache.v, g.k + g.v):
            dst[s, :, :P] = src
        self.tok[s] = self.out_tok[s, 0] = g.tok[j]
        self.out_lp[s, 0] = g.logprob[j]
        self.pos[s], self.step[s], self.limit[s], self.seed[s], self.sample_idx[s] = P, 1, g.limit, g.seed, j
        self.done[s] = g.stop[j] | (g.limit <= 1)

    def _check(self, i: int, r: Request):
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

    @torch.inference_mode()
    def generate(self, requests: list[Request], num_samples: int = 1, max_new_tokens: int = 256,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                 progress: Callable[[int, int, int], None] | None = None) -> list[list[Completion]]:
        """`num_samples` completions per request, aligned with `requests`. temperature 0 is greedy; top_k 0 and
        top_p 1 are off. `progress(finished, total, tokens)` is called whenever completions finish (for a live
        progress line). Throughput figures land in `self.stats`."""
        for name, value, ok, want in [
                ("temperature", temperature, 0 <= temperature < float("inf"), "finite and >= 0"),
                ("top_p", top_p, 0 < top_p <= 1, "in (0, 1]"), ("top_k", top_k, top_k >= 0, ">= 0"),
                ("num_samples", num_samples, num_samples >= 1, ">= 1"),
                ("max_new_tokens", max_new_tokens, max_new_tokens >= 1, ">= 1")]:
            if not ok:  # comparisons with nan are False: a nan fails here too
                raise ValueError(f"{name} must be {want}, got {value!r}")
        for i, r in enumerate(requests):
            self._check(i, r)
        seeds = [r.seed if r.seed is not None else hash((seed, i)) for i, r in enumerate(requests)]  # ints: stable
        limits = [min(max_new_tokens if r.max_new_tokens is None else r.max_new_tokens, self.max_len - len(r.ids))
                  for r in requests]
        t_start = time.perf_counter()
        queue = deque((i, j) for i in range(len(requests)) for j in range(num_samples))
        out: list[list[Completion | None]] = [[None] * num_samples for _ in requests]
        slots: list[tuple | None] = [None] * self.max_slots  # occupant: (request, sample, start step, P, limit)
        staged, steps, prefills, generated, completed = None, 0, 0, 0, 0  # staged: the group still queued
        self.done.fill_(True)
        self.pos.zero_()
        while True:
            done = self.done.tolist() if any(slots) else []  # the host sync: which slots have finished
            finished = [s for s, occ in enumerate(slots) if occ is not None and done[s]]
            if finished:
                n_tok = self.step[finished].tolist()
                width = max(n_tok)
                toks, lps = self.out_tok[finished, :width].tolist(), self.out_lp[finished, :width].tolist()
                for s, n, t, lp in zip(finished, n_tok, toks, lps):
                    i, j = slots[s][:2]
                    out[i][j] = Completion(t[:n], lp[:n], "stop" if t[n - 1] in self.stop_ids else "length")
                    generated += n
                    slots[s] = None
                    self.pos[s] = 0  # an empty slot writes its garbage at position 0, inside any cache view
                completed += len(finished)
                if progress is not None:
                    progress(completed, len(requests) * num_samples, generated)
            # Admit queued samples into free slots, prefilling the prompts not seen yet in token-capped batches.
            take = [(s, *queue.popleft()) for s in [s for s, o in enumerate(slots) if o is None][:len(queue)]]
            groups = {} if staged is None else {staged.index: staged}
            todo = [i for i in dict.fromkeys(i for _, i, _ in take) if i not in groups]
            for batch in self._batches(todo, [len(requests[i].ids) for i in todo]):
                groups |= self._prefill(batch, requests, seeds, limits, num_samples, temperature, top_p, top_k)
            prefills += len(todo)
            for s, i, j in take:
                self._admit(s, groups[i], j)
                slots[s] = (i, j, steps, len(requests[i].ids), limits[i])
            if queue and queue[0][0] in groups and groups[queue[0][0]] is not staged:  # keep its prompt's KV
                g = groups[queue[0][0]]
                P = g.k[0].shape[1]
                for dst, src in zip(self.stage.k + self.stage.v, g.k + g.v):
                    dst[0, :, :P] = src
                g.k, g.v = [k[0, :, :P] for k in self.stage.k], [v[0, :, :P] for v in self.stage.v]
                staged = g
            if not any(slots):
                break
            # Run until the next check, but not past the last step any slot could still need.
            ahead = max(limit - 1 - (steps - start) for _, _, start, _, limit in (o for o in slots if o))
            for _ in range(min(self.sync_every, ahead)):
                self._step(self._cache_view(slots, steps), temperature, top_p, top_k)
                steps += 1
        seconds = time.perf_counter() - t_start  # the last harvest synchronised the device
        self.stats = dict(tokens=generated, seconds=seconds, tokens_per_s=generated / seconds, decode_steps=steps,
                          prefills=prefills)
        return out

    def _cache_view(self, slots, steps: int):
        """Compiled: the whole cache (static shapes). Eager: only the positions any slot can reach this step, so
        attention does not walk max_len of masked keys. A slot's position is at most P + min(steps since its
        admission, limit - 1); empty slots sit at 0."""
        if self.compiled:
            return self.cache
        hi = max(P + min(steps - start, limit - 1) for _, _, start, P, limit in (o for o in slots if o))
        return _KV([k[:, :, :hi + 1] for k in self.cache.k], [v[:, :, :hi + 1] for v in self.cache.v])

# -----------------------------------------------------------------------------------------------------------------
# Command line: chat with a checkpoint, or benchmark against transformers


def chat(args):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(args.ckpt, dtype=DTYPES[args.dtype], device=device)
    tok = load_tokenizer(args.ckpt)
    ids, pixels = build_prompt(tok, model.config, args.prompt, [args.image] if args.image else [])
    stop, banned = special_ids(tok)
    sampler = Sampler(model, max_slots=1, max_len=min(len(ids) + args.max_new_tokens,
                                                      model.config.llm.max_position_embeddings),
                      stop_ids=stop, banned_ids=banned, compile=args.compile)
    [[c]] = sampler.generate([Request(ids, pixels)], max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    print(tok.decode(c.ids))
    st = sampler.stats
    print(f"[{len(ids)} prompt tokens, {st['tokens']} generated ({c.finish_reason}) in {st['seconds']:.2f}s: "
          f"{st['tokens_per_s']:.1f} tokens/s]")


BENCH_SIZES = {  # Qwen2-shaped random models; "tiny" is the scale the CPU default trains (design.md section 5)
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=64, tie_word_embeddings=False),
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=32000, tie_word_embeddings=False),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}
PEAK_BANDWIDTH = {"H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}
# bytes/s from the spec sheets (H100 SXM 3.35 TB/s); the first key found in the device's name wins


def _timed(fn, device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    t = time.perf_counter()
    fn()
    sync()  # the GPU runs ahead of the host: stop the clock when it is done
    return time.perf_counter() - t


def bench(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = [args.size] if args.size else ["qwen2.5-7b"] if device.type == "cuda" else ["tiny", "small"]
    for size in sizes:
        bench_size(args, size, device)


def bench_size(args, size: str, device: torch.device):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    compile = args.compile
    cfg = Qwen2Config(**BENCH_SIZES[size], max_position_embeddings=4096, rope_theta=1e6)
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the bench dtype: no fp32 copy of a 7B model on the way
    with torch.device(device):
        hf = Qwen2ForCausalLM(cfg).eval()
    torch.set_default_dtype(default_dtype)
    config = config_from_dict(cfg.to_dict())
    with torch.device("meta"):
        ours = VLM(config)
    # Ours reads the very same weight tensors (qwen2 checkpoint names -> ours): same bytes, no second copy.
    ours.load_state_dict(to_internal(dict(hf.state_dict()), "qwen2", config.llm.tie_word_embeddings), assign=True)
    B, P, N = args.batch, args.prompt_len, args.new_tokens
    prompts = torch.randint(0, cfg.vocab_size, (B, P), generator=torch.Generator().manual_seed(0)).to(device)
    requests = [Request(p.tolist()) for p in prompts]
    sampler = Sampler(ours, max_slots=B, max_len=P + N, compile=compile, sync_every=args.sync_every)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    params = sum(p.numel() for p in ours.language_model.parameters())
    print(f"device {name}, {size} ({params / 1e6:.1f}M params, {dtype}), batch {B}, prompt {P}, {N} new tokens, "
          f"compile={compile}, sync_every={sampler.sync_every}; best of {args.repeats}")
    for mode, T in (("greedy", 0.0), ("sampled", 1.0)):
        hf_kw = dict(do_sample=T > 0, max_new_tokens=N, min_new_tokens=N, use_cache=True, pad_token_id=0,
                     eos_token_id=None, **(dict(temperature=T, top_k=0, top_p=1.0) if T > 0 else {}))
        run_hf = lambda: hf.generate(prompts, attention_mask=torch.ones_like(prompts), **hf_kw)
        run_ours = lambda: sampler.generate(requests, max_new_tokens=N, temperature=T)
        with torch.no_grad():  # warm-up: allocator, compilation, CUDA graph capture
            hf.generate(prompts[:, :8], attention_mask=torch.ones_like(prompts[:, :8]), **{**hf_kw,
                        "max_new_tokens": 4, "min_new_tokens": 4})
            run_ours()
            t_hf, t_ours = float("inf"), float("inf")
            for _ in range(args.repeats):  # interleaved, so that load from other processes hits both alike
                t_hf = min(t_hf, _timed(run_hf, device))
                t_ours = min(t_ours, _timed(run_ours, device))
        assert sampler.stats["tokens"] == B * N, sampler.stats
        print(f"{mode:8s} ours {B * N / t_ours:9.1f} tokens/s   transformers {B * N / t_hf:9.1f} tokens/s   "
              f"ratio {t_hf / t_ours:.2f}x")
        if T == 0:
            hf_step = t_hf / N  # transformers' time per greedy step, prefill included
    # Amdahl: both engines run the same LM-head GEMM every step; its share of transformers' step caps the ratio.
    h = torch.randn(B, cfg.hidden_size, dtype=dtype, device=device)
    with torch.no_grad():
        head = min(_timed(lambda: ours.language_model.logits(h), device) for _ in range(5))
    print(f"LM head alone ({B}x{cfg.hidden_size} @ {cfg.hidden_size}x{cfg.vocab_size}): {head * 1e3:.2f} ms, "
          f"{head / hf_step:.0%} of transformers' {hf_step * 1e3:.2f} ms greedy step: no engine running the same GEMM "
          f"exceeds {hf_step / head:.1f}x")
    if device.type == "cuda":
        bandwidth_at_batch_1(ours, P, compile, args.sync_every, name)


def bandwidth_at_batch_1(model: VLM, P: int, compile: bool, sync_every, name: str):
    """Decode step time at batch 1 from two generation lengths (prefill cancels out) vs the bytes a step must read:
    every LLM parameter but the embedding table (one row of it is read), plus the KV it attends over (compiled: all
    of max_len, masked positions included; eager: the positions reached, on average)."""
    device = model.language_model.embed_tokens.weight.device
    n1, n2 = 32, 544
    sampler = Sampler(model, max_slots=1, max_len=P + n2, compile=compile, sync_every=sync_every)
    req = [Request(list(range(1, P + 1)))]
    gen = lambda n: sampler.generate(req, max_new_tokens=n, temperature=0.0)
    gen(n1)
    step = (min(_timed(lambda: gen(n2), device) for _ in range(3)) -
            min(_timed(lambda: gen(n1), device) for _ in range(3))) / (n2 - n1)
    lm = model.language_model
    nbytes = lambda t: t.numel() * t.element_size()
    weights = sum(nbytes(p) for p in lm.parameters()) - (nbytes(lm.embed_tokens.weight) if lm.lm_head is not None
                                                         else 0)
    kv = sum(map(nbytes, sampler.cache.k + sampler.cache.v)) * (1 if compile else (P + (n1 + n2) / 2) / (P + n2))
    x = torch.empty(2**30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    copy_bw = 2 * x.numel() / min(_timed(lambda: y.copy_(x), device) for _ in range(5))  # read + write
    peak = next((bw for key, bw in PEAK_BANDWIDTH.items() if key in name), None)
    achieved = (weights + kv) / step
    spec = f"{achieved / peak:.0%} of the {peak / 1e12:.2f} TB/s spec peak" if peak else "no spec peak on file"
    print(f"batch 1  {1 / step:9.1f} tokens/s   {(weights + kv) / 1e9:.2f} GB read per step -> "
          f"{achieved / 1e12:.2f} TB/s = {spec}, {achieved / copy_bw:.0%} of a measured {copy_bw / 1e12:.2f} TB/s "
          f"device copy ({name})")


def main():
    p = argparse.ArgumentParser(description="Chat with a checkpoint, or --bench the sampler against transformers.")
    p.add_argument("--bench", action="store_true", help="ours vs transformers' generate on a random Qwen2 model")
    p.add_argument("--ckpt", help="checkpoint directory to chat with (config.json, safetensors, tokenizer.json)")
    p.add_argument("--image", default=None, help="optional image for the chat prompt")
    p.add_argument("--prompt", default="Describe the image.", help="user message")
    p.add_argument("--max-new-tokens", type=int, default=512, help="chat: response length cap")
    p.add_argument("--temperature", type=float, default=0.0, help="chat: sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="chat: nucleus mass (1: off)")
    p.add_argument("--top-k", type=int, default=0, help="chat: keep the k most likely tokens (0: off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16" if torch.cuda.is_available() else "float32",
                   help="chat: parameter dtype")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the decode step: CUDA graphs on a GPU, inductor C++ on a CPU, which needs a C++ "
                        "compiler (default: on for the bench, off for chat)")
    p.add_argument("--size", choices=sorted(BENCH_SIZES), default=None,
                   help="bench model shape (default: tiny and small on CPU, qwen2.5-7b on CUDA)")
    p.add_argument("--batch", type=int, default=32, help="bench: sequences generated together")
    p.add_argument("--prompt-len", type=int, default=32, help="bench: prompt tokens per sequence")
    p.add_argument("--new-tokens", type=int, default=128, help="bench: tokens generated per sequence")
    p.add_argument("--repeats", type=int, default=10, help="bench: timed runs per engine, interleaved (best is "
                   "reported: other processes on a shared machine only ever slow a run down)")
    p.add_argument("--sync-every", type=int, default=None, help="decode steps between host checks (default: "
                   "1 on CPU, 8 on CUDA)")
    args = p.parse_args()
    if args.bench:
        args.compile = args.compile is not False
        bench(args)
    elif args.ckpt:
        args.compile = bool(args.compile)
        chat(args)
    else:
        p.error("give --ckpt DIR (chat) or --bench")


if __name__ == "__main__":
    main()
