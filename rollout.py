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

    python bench.py rollout        # the sampler vs transformers' generate on a random Qwen2 model
"""
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from data import mix_seed, pad_id, token_batches
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


@dataclass
class _Occupant:
    """The sample a cache slot is generating."""
    request: int  # index into generate's requests
    sample: int  # which of the request's num_samples
    admitted_at: int  # decode steps run before it took the slot
    prompt_len: int
    limit: int  # max tokens of its completion


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
        pad = pad_id(self.model.config)
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
        seeds = [r.seed if r.seed is not None else mix_seed(seed, i) for i, r in enumerate(requests)]
        limits = [min(max_new_tokens if r.max_new_tokens is None else r.max_new_tokens, self.max_len - len(r.ids))
                  for r in requests]
        t_start = time.perf_counter()
        queue = deque((i, j) for i in range(len(requests)) for j in range(num_samples))
        out: list[list[Completion | None]] = [[None] * num_samples for _ in requests]
        slots: list[_Occupant | None] = [None] * self.max_slots
        staged, steps, prefills, generated, completed = None, 0, 0, 0, 0  # staged: the group still queued
        self.done.fill_(True)
        self.pos.zero_()
        while True:
            # The host sync: which slots have finished.
            done = self.done.tolist() if any(o is not None for o in slots) else []
            finished = [s for s, o in enumerate(slots) if o is not None and done[s]]
            if finished:
                n_tok = self.step[finished].tolist()
                width = max(n_tok)
                toks, lps = self.out_tok[finished, :width].tolist(), self.out_lp[finished, :width].tolist()
                for s, n, t, lp in zip(finished, n_tok, toks, lps):
                    occupant = slots[s]
                    out[occupant.request][occupant.sample] = Completion(
                        t[:n], lp[:n], "stop" if t[n - 1] in self.stop_ids else "length")
                    generated += n
                    slots[s] = None
                    self.pos[s] = 0  # an empty slot writes its garbage at position 0, inside any cache view
                completed += len(finished)
                if progress is not None:
                    progress(completed, len(requests) * num_samples, generated)
            # Admit queued samples into free slots, prefilling the prompts not seen yet in token-capped batches.
            free = [s for s, o in enumerate(slots) if o is None]
            admits = [(s, *queue.popleft()) for s in free[:len(queue)]]  # (slot, request, sample)
            groups = {} if staged is None else {staged.index: staged}
            unseen = [i for i in dict.fromkeys(i for _, i, _ in admits) if i not in groups]
            for batch in token_batches([len(requests[i].ids) for i in unseen], self.prefill_tokens):
                groups |= self._prefill([unseen[b] for b in batch], requests, seeds, limits, num_samples,
                                        temperature, top_p, top_k)
            prefills += len(unseen)
            for s, i, j in admits:
                self._admit(s, groups[i], j)
                slots[s] = _Occupant(i, j, steps, len(requests[i].ids), limits[i])
            if queue and queue[0][0] in groups and groups[queue[0][0]] is not staged:  # keep its prompt's KV
                group = groups[queue[0][0]]
                P = group.k[0].shape[1]
                for dst, src in zip(self.stage.k + self.stage.v, group.k + group.v):
                    dst[0, :, :P] = src
                group.k, group.v = [k[0, :, :P] for k in self.stage.k], [v[0, :, :P] for v in self.stage.v]
                staged = group
            if all(o is None for o in slots):
                break
            # Run until the next check, but not past the last step any slot could still need.
            ahead = max(o.limit - 1 - (steps - o.admitted_at) for o in slots if o is not None)
            for _ in range(min(self.sync_every, ahead)):
                self._step(self._cache_view(slots, steps), temperature, top_p, top_k)
                steps += 1
        seconds = time.perf_counter() - t_start  # the last harvest synchronised the device
        self.stats = dict(tokens=generated, seconds=seconds, tokens_per_s=generated / seconds, decode_steps=steps,
                          prefills=prefills)
        return out

    def _cache_view(self, slots: list[_Occupant | None], steps: int):
        """Compiled: the whole cache (static shapes). Eager: only the positions any slot can reach this step, so
        attention does not walk max_len of masked keys. A slot's position is at most P + min(steps since its
        admission, limit - 1); empty slots sit at 0."""
        if self.compiled:
            return self.cache
        hi = max(o.prompt_len + min(steps - o.admitted_at, o.limit - 1) for o in slots if o is not None)
        return _KV([k[:, :, :hi + 1] for k in self.cache.k], [v[:, :, :hi + 1] for v in self.cache.v])
