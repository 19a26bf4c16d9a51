"""Per-token log-prob and entropy of an LM head without materialising the [N, V] logits, plus the R1V3
critical-token entropy metric.

GRPO needs, for every response token, log p(token) (ratio and loss) and the entropy of the policy's distribution
(monitoring, and the checkpoint-selection metric of Skywork-R1V3). Full logits for 8K tokens x 152K vocab are 5 GB
in fp32 before softmax and gradients, so `logprob_entropy` walks the logits in [chunk_tokens, chunk_vocab] blocks:
forward keeps an online softmax per row in fp32 (max m, sum-exp s, sum exp*(z-m) u), backward recomputes each block
and turns it into dz in place. Extra memory is O(chunk_tokens x chunk_vocab) plus O(N) row statistics and the fp32
gradient accumulators, independent of the logits' N x V. Matrix products are torch (cuBLAS); the two elementwise
passes over a block are Triton kernels, each next to its plain-torch twin. Triton is optional: without it (no
wheels for macOS or Windows) the kernels are not defined and the plain-torch twins run everywhere.

References: verl `verl/utils/kernel/` (fused linear cross-entropy returning log-prob and entropy, vocab splits,
recompute in backward), Liger-Kernel `ops/fused_linear_cross_entropy`, Cut Cross-Entropy (Wijmans et al. 2024).

    python -m pytest -q tests/test_entropy.py
"""
import math
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # only critical_token_ids takes a tokenizer: importing the model needs no tokenizers package
    from tokenizers import Tokenizer

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU path never needs it; impl="triton" says so
    triton = tl = None

IGNORE_INDEX = -100  # targets with this value (prompt, padding) give logprob = entropy = 0 and no gradient
# A finite "minus infinity" for the running max: merging with the empty state computes (m_old - m_new) * s_old,
# which must be 0 * finite = 0, not inf * 0 = nan.
_EMPTY_MAX = -1e30


@dataclass
class Chunks:
    """Block shape of the logits walk. The default block of 4096 x 8192 logits is small next to a GPU's memory yet
    large enough that each block's GEMM keeps cuBLAS busy; smaller blocks trade speed for peak memory (one block is
    the largest buffer), which is the better trade on CPU."""
    tokens: int = 4096   # rows of hidden per block
    vocab: int = 8192    # rows of the LM head per block (a "vocab split")
    block_v: int = 1024  # Triton kernels walk a block's row in pieces of this many logits (power of two)

    def __post_init__(self):
        if self.tokens < 1 or self.vocab < 1 or self.block_v < 1 or self.block_v & (self.block_v - 1):
            raise ValueError(f"Chunks needs tokens, vocab >= 1 and block_v a power of two, got {self}")


def logprob_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle: full logits, log_softmax. fp64 inputs stay fp64; anything narrower is upcast to fp32."""
    logits = (hidden @ weight.T).to(torch.promote_types(hidden.dtype, torch.float32)) / temperature  # (N, V)
    logp = torch.log_softmax(logits, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    valid = targets != IGNORE_INDEX
    logprob = logp.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    return torch.where(valid, logprob, 0.0), torch.where(valid, entropy, 0.0)


# ---- forward block: update the per-row online-softmax state with one [nc, vc] block of raw logits ----------------
# z = logits / T. State per row: m = running max of z, s = sum exp(z - m), u = sum exp(z - m) * (z - m), zt = the
# target's z. Then lse = m + log s, E_p[z] = m + u / s, entropy = log s - u / s. Keeping u relative to m (rather than
# sum exp*z) avoids cancellation when |z| is large; it also makes entropy >= 0 (u <= 0, s >= 1) and
# logprob = (zt - m) - log s <= 0 exact in floating point, since zt is read from the same block as the max.

if triton is not None:  # without Triton the kernels stay undefined and logprob_entropy runs their twins
    @triton.jit
    def _stats_kernel(logits_ptr, stride, targets_ptr, m_ptr, s_ptr, u_ptr, zt_ptr, v0, vc, inv_temp,
                      BLOCK_V: tl.constexpr):
        row = tl.program_id(0)
        row_ptr = logits_ptr + row.to(tl.int64) * stride
        m = tl.load(m_ptr + row)
        s = tl.load(s_ptr + row)
        u = tl.load(u_ptr + row)
        for start in range(0, vc, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            inside = cols < vc
            z = tl.load(row_ptr + cols, mask=inside, other=float("-inf")).to(tl.float32) * inv_temp
            m_blk = tl.max(z, axis=0)
            zc = tl.where(inside, z - m_blk, 0.0)  # 0, not -inf, outside the row: e * zc must not be 0 * -inf = nan
            e = tl.where(inside, tl.exp(zc), 0.0)
            s_blk = tl.sum(e, axis=0)
            u_blk = tl.sum(e * zc, axis=0)
            m_new = tl.maximum(m, m_blk)
            a = tl.exp(m - m_new)
            b = tl.exp(m_blk - m_new)
            u = a * (u + (m - m_new) * s) + b * (u_blk + (m_blk - m_new) * s_blk)
            s = a * s + b * s_blk
            m = m_new
        tl.store(m_ptr + row, m)
        tl.store(s_ptr + row, s)
        tl.store(u_ptr + row, u)
        local = tl.load(targets_ptr + row) - v0
        hit = (local >= 0) & (local < vc)
        zt = tl.load(row_ptr + local, mask=hit, other=0.0).to(tl.float32) * inv_temp
        tl.store(zt_ptr + row, zt, mask=hit)


def _stats_torch(logits: torch.Tensor, targets: torch.Tensor, state: torch.Tensor, v0: int, inv_temp: float):
    """Plain-torch twin of `_stats_kernel`: the whole block row at once instead of BLOCK_V pieces."""
    m, s, u, zt = state  # each (nc,), views into state (4, nc)
    z = logits.float()  # (nc, vc): fp32 logits are this block's own buffer, worked on in place
    if inv_temp != 1.0:
        z = z * inv_temp
    local = targets - v0
    hit = (local >= 0) & (local < z.shape[1])
    zt.copy_(torch.where(hit, z.gather(1, local.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1), zt))
    m_blk = z.amax(1)
    z -= m_blk[:, None]  # z - m_blk, in place to keep two block-sized buffers at most
    e = z.exp()
    s_blk, u_blk = e.sum(1), (e * z).sum(1)
    m_new = torch.maximum(m, m_blk)
    a, b = (m - m_new).exp(), (m_blk - m_new).exp()
    u.copy_(a * (u + (m - m_new) * s) + b * (u_blk + (m_blk - m_new) * s_blk))
    s.copy_(a * s + b * s_blk)
    m.copy_(m_new)


# ---- backward block: overwrite a recomputed [nc, vc] block of raw logits with d loss / d logits ------------------
# With p = softmax(z): d logp_t / dz = onehot_t - p and d H / dz = p * (E_p[z] - z), so
# dz = dlogp * (onehot - p) + dH * p * (E_p[z] - z), and d/d logits = dz / T because z = logits / T.

if triton is not None:
    @triton.jit
    def _dlogits_kernel(logits_ptr, stride, targets_ptr, lse_ptr, ez_ptr, dlogp_ptr, dent_ptr, v0, vc, inv_temp,
                        BLOCK_V: tl.constexpr):
        row = tl.program_id(0)
        row_ptr = logits_ptr + row.to(tl.int64) * stride
        lse = tl.load(lse_ptr + row)
        ez = tl.load(ez_ptr + row)
        dlogp = tl.load(dlogp_ptr + row)
        dent = tl.load(dent_ptr + row)
        local = tl.load(targets_ptr + row) - v0
        for start in range(0, vc, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            inside = cols < vc
            z = tl.load(row_ptr + cols, mask=inside, other=0.0).to(tl.float32) * inv_temp
            p = tl.exp(z - lse)
            dz = p * (dent * (ez - z) - dlogp) + tl.where(cols == local, dlogp, 0.0)
            tl.store(row_ptr + cols, (dz * inv_temp).to(logits_ptr.dtype.element_ty), mask=inside)


def _dlogits_torch(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, ez: torch.Tensor,
                   dlogp: torch.Tensor, dent: torch.Tensor, v0: int, inv_temp: float):
    """Plain-torch twin of `_dlogits_kernel`."""
    z = logits.float()  # (nc, vc): fp32 logits are the block's own buffer, overwritten below anyway
    if inv_temp != 1.0:
        z = z * inv_temp
    p = (z - lse[:, None]).exp_()
    dz = z.neg_().add_(ez[:, None]).mul_(dent[:, None]).sub_(dlogp[:, None]).mul_(p)  # in z's buffer
    local = targets - v0
    rows = ((local >= 0) & (local < z.shape[1])).nonzero().squeeze(1)
    dz[rows, local[rows]] += dlogp[rows]
    logits.copy_(dz.mul_(inv_temp) if inv_temp != 1.0 else dz)  # a no-op where dz is logits' buffer


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _update_stats(impl: str, logits, targets, state, v0: int, inv_temp: float, block_v: int):
    if impl == "torch":
        return _stats_torch(logits, targets, state, v0, inv_temp)
    _stats_kernel[(logits.shape[0],)](logits, logits.stride(0), targets, state[0], state[1], state[2], state[3],
                                      v0, logits.shape[1], inv_temp, BLOCK_V=block_v)


def _dlogits(impl: str, logits, targets, lse, ez, dlogp, dent, v0: int, inv_temp: float, block_v: int):
    if impl == "torch":
        return _dlogits_torch(logits, targets, lse, ez, dlogp, dent, v0, inv_temp)
    _dlogits_kernel[(logits.shape[0],)](logits, logits.stride(0), targets, lse, ez, dlogp, dent,
                                        v0, logits.shape[1], inv_temp, BLOCK_V=block_v)


class _LogprobEntropy(torch.autograd.Function):
    """Both loops walk vocab splits outermost so the backward's dW for a split is finished (in an fp32 [vc, D]
    accumulator) before the next split starts: the only gradient-sized fp32 buffer is dh's [N, D], and N (tokens
    per micro-batch) is far below V (152K). Logits blocks are GEMMs in the input dtype (fp32 accumulate inside
    cuBLAS), exactly like an eager lm_head, and go to fp32 when the kernels load them."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature: float, impl: str, chunks: Chunks):
        rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # masked rows are dropped, not computed
        h, t = hidden[rows], targets[rows]  # (n, D), (n,)
        n, inv_temp = rows.numel(), 1.0 / temperature
        state = torch.zeros(4, n, dtype=torch.float32, device=hidden.device)  # rows: m, s, u, zt
        state[0] = _EMPTY_MAX
        for v0 in range(0, weight.shape[0], chunks.vocab):
            w = weight[v0:v0 + chunks.vocab]  # (vc, D)
            for n0 in range(0, n, chunks.tokens):
                n1 = n0 + chunks.tokens
                logits = h[n0:n1] @ w.T  # (nc, vc)
                _update_stats(impl, logits, t[n0:n1], state[:, n0:n1], v0, inv_temp, chunks.block_v)
        m, s, u, zt = state
        logprob = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        entropy = torch.zeros_like(logprob)
        logprob[rows] = (zt - m) - s.log()
        entropy[rows] = s.log() - u / s
        ctx.save_for_backward(hidden, weight, targets, rows, m + s.log(), m + u / s)  # lse, E_p[z]; h re-gathered
        ctx.temperature, ctx.impl, ctx.chunks = temperature, impl, chunks
        return logprob, entropy

    @staticmethod
    def backward(ctx, dlogprob, dentropy):
        hidden, weight, targets, rows, lse, ez = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        chunks, inv_temp = ctx.chunks, 1.0 / ctx.temperature
        h, t = hidden[rows], targets[rows]  # (n, D), (n,)
        dlogp, dent = dlogprob[rows].float(), dentropy[rows].float()  # (n,)
        n = rows.numel()
        f32 = dict(dtype=torch.float32, device=hidden.device)  # gradient accumulators: sums over blocks stay fp32
        dh = torch.zeros(n, hidden.shape[1], **f32) if need_h else None
        dw = torch.empty_like(weight) if need_w else None
        for v0 in range(0, weight.shape[0], chunks.vocab):
            w = weight[v0:v0 + chunks.vocab]  # (vc, D)
            dw_split = torch.zeros(w.shape, **f32) if need_w else None  # sums over token chunks
            for n0 in range(0, n, chunks.tokens):
                n1 = n0 + chunks.tokens
                dz = h[n0:n1] @ w.T  # (nc, vc) recomputed logits, overwritten with d loss / d logits below
                _dlogits(ctx.impl, dz, t[n0:n1], lse[n0:n1], ez[n0:n1], dlogp[n0:n1], dent[n0:n1], v0, inv_temp,
                         chunks.block_v)
                if need_h:
                    dh[n0:n1] += dz @ w  # (nc, D)
                if need_w:
                    dw_split += dz.T @ h[n0:n1]  # (vc, D)
            if need_w:
                dw[v0:v0 + chunks.vocab] = dw_split
        if need_h:
            dh = torch.zeros_like(hidden).index_put_((rows,), dh.to(hidden.dtype))  # masked rows get exactly 0
        return dh, dw, None, None, None, None


def logprob_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                    impl: str = "auto", chunks: Chunks = Chunks()) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(hidden @ weight.T / T)[targets] and the entropy of that softmax, both fp32 [N], without the
    [N, V] logits. hidden [N, D] and weight [V, D] share a dtype (bf16 or fp32); targets [N] long, IGNORE_INDEX
    rows give 0 and no gradient. Differentiable in hidden and weight. impl: "triton" (CUDA, or CPU under
    TRITON_INTERPRET=1), "torch" (same blocks, plain torch), "auto" (triton on CUDA when Triton is installed, torch
    elsewhere)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"need hidden [N, D] and weight [V, D], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1] or targets.dtype != torch.long:
        raise ValueError(f"need targets [N] = [{hidden.shape[0]}] of dtype torch.long, got {tuple(targets.shape)} "
                         f"{targets.dtype}")
    if hidden.dtype != weight.dtype or not hidden.is_floating_point():
        raise ValueError(f"hidden and weight must share a floating dtype, got {hidden.dtype} and {weight.dtype}")
    if not hidden.device == weight.device == targets.device:
        raise ValueError(f"inputs on different devices: {hidden.device}, {weight.device}, {targets.device}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    bad = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= weight.shape[0]))
    if bad.any():
        raise ValueError(f"target id {targets[bad][0].item()} outside the vocabulary [0, {weight.shape[0]}) "
                         f"(use {IGNORE_INDEX} to mask a position)")
    if impl == "auto":
        impl = "triton" if hidden.is_cuda and triton is not None else "torch"
    if impl not in ("torch", "triton"):
        raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    if impl == "triton" and triton is None:
        raise RuntimeError("impl='triton' needs the triton package, which is not installed (pip install triton, "
                           "Linux only); impl='torch' runs the same computation without it")
    if impl == "triton" and not hidden.is_cuda and not _interpreted():
        raise RuntimeError("impl='triton' on CPU needs TRITON_INTERPRET=1 in the environment before triton is imported")
    return _LogprobEntropy.apply(hidden, weight, targets, temperature, impl, chunks)


# ---- critical-token entropy (R1V3 checkpoint selection) --------------------------------------------------------
# Reflective words. The default is the paper's: the tokens where reasoning turns ("Wait...", "Alternatively...", §5.1)
# and the three NoWait bans (§6.2); the paper publishes no longer list. The broad list is our own, an option
# (--critical_words). Matching is on tokens: a word-initial piece of a longer word ("Ġcheck" in " checkpoint" if the
# tokenizer splits it so) counts too.
CRITICAL_WORDS: tuple[str, ...] = ("wait", "alternatively", "hmm")
CRITICAL_WORDS_BROAD: tuple[str, ...] = (*CRITICAL_WORDS, "however", "but", "actually", "perhaps", "maybe", "check",
                                         "verify", "recheck", "double-check", "reconsider", "mistake")


def critical_token_ids(tokenizer: "Tokenizer", words: Sequence[str] = CRITICAL_WORDS) -> dict[int, str]:
    """Token id -> word for each spelling "wait", " wait", "Wait", " Wait" that encodes to exactly one token (a BPE
    vocabulary keeps the leading space inside the token, "Ġwait", so mid-sentence and line-start forms differ).
    Spellings needing several tokens are skipped: their first piece ("double" of "double-check") is not reflective
    by itself. Words with no single-token spelling are `set(words) - set(ids.values())`; log them."""
    ids = {}
    for word in words:
        for variant in (word, " " + word, word.capitalize(), " " + word.capitalize()):
            pieces = tokenizer.encode(variant, add_special_tokens=False).ids
            # A word the vocabulary lacks may encode to one <unk>: only a piece that decodes back to it counts.
            if len(pieces) == 1 and tokenizer.decode(pieces).strip().lower() == word:
                ids[pieces[0]] = word
    return ids


@dataclass
class EntropySums:
    """Entropy summed over critical-token occurrences and over all counted tokens; add them up across batches and
    ranks, then read the means."""
    critical: float = 0.0
    num_critical: int = 0
    total: float = 0.0
    num_tokens: int = 0

    def __add__(self, other: "EntropySums") -> "EntropySums":
        return EntropySums(self.critical + other.critical, self.num_critical + other.num_critical,
                           self.total + other.total, self.num_tokens + other.num_tokens)

    @property
    def critical_mean(self) -> float:  # nan when no critical token: 0 would read as "collapsed"
        return self.critical / self.num_critical if self.num_critical else math.nan

    @property
    def mean(self) -> float:  # nan when no token
        return self.total / self.num_tokens if self.num_tokens else math.nan


def critical_entropy(token_ids: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor | None,
                     critical_ids: Collection[int]) -> EntropySums:
    """Entropy summed (in fp64) over every critical-token occurrence in a set of sampled responses, and over all
    tokens, with both counts.

    token_ids, entropy, mask: same shape ([B, T] or [N]). entropy[t] is the entropy of the distribution that
    produced token_ids[t] (both aligned on the response token, i.e. what `logprob_entropy` returns for targets =
    token_ids). mask (bool, None = all) selects response tokens."""
    if not token_ids.shape == entropy.shape == (token_ids.shape if mask is None else mask.shape):
        raise ValueError(f"token_ids, entropy, mask shapes differ: {tuple(token_ids.shape)}, "
                         f"{tuple(entropy.shape)}, {None if mask is None else tuple(mask.shape)}")
    mask = torch.ones_like(token_ids, dtype=torch.bool) if mask is None else mask.bool()
    ids = torch.tensor(sorted(critical_ids), dtype=token_ids.dtype, device=token_ids.device)
    critical = torch.isin(token_ids, ids) & mask
    entropy = entropy.detach().double()
    return EntropySums(critical=entropy[critical].sum().item(), num_critical=int(critical.sum()),
                       total=entropy[mask].sum().item(), num_tokens=int(mask.sum()))
