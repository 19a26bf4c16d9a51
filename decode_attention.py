"""Paged decode attention (flash-decoding): one query per slot attends over that slot's keys, which live in pages of
a shared KV pool reached through a block table.

Flash-decoding (Dao et al. 2023) splits a long key sequence so that a decode step, with a single query row per
sequence, still fills the GPU: stage 1 runs one program per (slot, kv head, split of `split_tokens` keys), walks its
keys through the block table (`page = block_table[slot, n // page_size]`) with an online softmax and writes a
normalised partial output and its log-sum-exp; stage 2 merges the splits of each (slot, head) by log-sum-exp. The
G = H / kv_heads query heads of a kv head (GQA) are processed together as the rows of one `tl.dot`, padded to 16.
References: SGLang `python/sglang/srt/layers/attention/triton_ops/decode_attention.py` and vLLM's
`triton_decode_attention.py` (both from lightllm's `gqa_flash_decoding`); the code here is written afresh.

    python -m pytest -q tests/test_decode_attention.py

KV pool, one tensor per layer for K and one for V: (num_pages, page_size, kv_heads, head_dim). Token-major pages
are what the writers produce: prefill's K of T tokens is (T, kv_heads, head_dim) and a decode step appends one such
row per slot, so `k_pages.view(-1, kv_heads, head_dim)[page * page_size + offset] = k` stores them unchanged (with
page_size 1 this is SGLang's token pool, and it is vLLM's flash-attention block layout). The kernel loses nothing by
it: each key row it loads is head_dim contiguous elements (128 B at head_dim 64 in bf16, a full cache line), so a
(tokens, head_dim) tile coalesces as well as from head-major pages. KV memory per token:
2 (K and V) x layers x kv_heads x head_dim x bytes per element.

Sizes: block_table (slots, max_pages) int32 with max_pages = ceil((max_len + 1) / page_size) (room for the token a
decode step appends at position max_len); lengths (slots,) int32 counts each slot's valid tokens (positions
0..len-1), 0 for an idle slot, whose output is zeros. Columns of a slot's row past ceil(len / page_size) are never
read, so they may hold stale or garbage page ids. Results are batch-invariant: the splits are fixed spans of
`split_tokens` keys and are merged in order, so a slot's output depends neither on the other slots nor on the
block table's width.

CUDA graphs: the Triton path never syncs with the host and allocates only from shapes. `decode_buffers` sizes the
output and the per-split partials from q and the block table alone (num_splits = ceil(max_pages * page_size /
split_tokens)); pass them as `buffers=` to reuse them across steps and graph replays. Lengths are not checked on
that path (a check would sync): the kernels clamp them to the table's capacity, max_pages * page_size.
"""
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton wheels on macOS / Windows: impl="torch" only
    triton = None

DEFAULT_SPLIT_TOKENS = 256  # keys per stage-1 program; SGLang's deterministic mode uses the same fixed split size
# Stage-1 tile and launch options: keys per loop iteration, warps, pipeline stages. These compile for sm_90 without
# spills for bf16 and fp32 pools at head_dim 64 and 128, aligned or not (aot_table.json, triton_aot_check.py);
# 64-key tiles spill with fp32 pools, and so do 2 stages at head_dim 64 without alignment hints.
BLOCK_N, SPLIT_WARPS, SPLIT_STAGES = 32, 8, 3


@dataclass
class DecodeBuffers:
    """Preallocated tensors of one decode-attention call, sized from shapes only (see `decode_buffers`)."""
    out: torch.Tensor          # (slots, H, D) in q's dtype
    partial_out: torch.Tensor  # (slots, H, num_splits, D) fp32, each split's softmax-normalised output
    partial_lse: torch.Tensor  # (slots, H, num_splits) fp32, each split's log-sum-exp of the scaled scores


def _buffer_specs(q: torch.Tensor, block_table: torch.Tensor, page_size: int, split_tokens: int) -> dict:
    """DecodeBuffers field -> (shape, dtype), from shapes only."""
    slots, heads, head_dim = q.shape
    num_splits = math.ceil(block_table.shape[1] * page_size / split_tokens)
    return dict(out=(tuple(q.shape), q.dtype), partial_out=((slots, heads, num_splits, head_dim), torch.float32),
                partial_lse=((slots, heads, num_splits), torch.float32))


def decode_buffers(q: torch.Tensor, block_table: torch.Tensor, page_size: int,
                   split_tokens: int = DEFAULT_SPLIT_TOKENS) -> DecodeBuffers:
    """Output and partial buffers for q (slots, H, D) and a block table (slots, max_pages): no lengths involved, so
    the same buffers serve every step of a CUDA graph. Nothing needs initialising: the kernels read only the splits
    they wrote in the same call."""
    specs = _buffer_specs(q, block_table, page_size, split_tokens)
    return DecodeBuffers(**{name: torch.empty(shape, dtype=dtype, device=q.device)
                            for name, (shape, dtype) in specs.items()})


def live_pages(block_table: torch.Tensor, lengths: torch.Tensor, page_size: int,
               num_pages: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """What the reference reads, shared by every layer of a decode step: the first num_pages block-table columns
    (slots, num_pages) int64, stale columns past a slot's length replaced by page 0, and which of their
    L = num_pages x page_size keys each slot sees (slots, 1, 1, L) bool: positions below its length, and key 0 for
    an idle slot (a row without a visible key would be nan), whose output the caller drops. num_pages None reads
    the longest length on the host (one sync), so it does not belong in a CUDA graph; a caller that knows a bound
    passes num_pages (>= every slot's ceil(length / page_size), not checked): no sync, no graph break."""
    lengths = lengths.long()
    if num_pages is None:
        longest = int(lengths.max()) if lengths.numel() else 0
        if longest > block_table.shape[1] * page_size:
            raise ValueError(f"a length of {longest} exceeds the block table's {block_table.shape[1]} pages of "
                             f"{page_size} tokens")
        num_pages = math.ceil(longest / page_size)
    num_pages = max(1, num_pages)  # one page even when all slots are idle: masked out
    cols = torch.arange(num_pages, device=lengths.device)
    own = cols < (lengths[:, None] + page_size - 1) // page_size  # (slots, num_pages): columns holding the slot's pages
    pages = torch.where(own, block_table[:, :num_pages], 0).long()  # stale columns -> page 0, never attended
    keys = torch.arange(num_pages * page_size, device=lengths.device)
    visible = (keys < lengths[:, None]) | (keys == 0)  # (slots, L)
    return pages, visible[:, None, None, :]


def attend_pages(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, pages: torch.Tensor,
                 visible: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """q (slots, H, D) against the keys of `pages` (from live_pages) where `visible`: gathers them into
    (slots, kv_heads, L, D) and runs SDPA in fp32 (fp64 inputs stay fp64), the G = H / kv_heads query heads of a
    kv head as G queries of it (K and V never repeated per head). Returns (slots, H, D) in q's dtype."""
    slots, heads, head_dim = q.shape
    kv_heads = k_pages.shape[2]
    dtype = torch.promote_types(q.dtype, torch.float32)
    # index_select copies whole pages (several times faster on CPU than advanced indexing with the 2-D `pages`)
    gather = lambda x: x.index_select(0, pages.flatten()).view(slots, -1, *x.shape[1:])  # (slots, pages, size, kv, D)
    k = gather(k_pages).flatten(1, 2).transpose(1, 2).to(dtype)  # (slots, kv_heads, L, D) view, L = pages x size
    v = gather(v_pages).flatten(1, 2).transpose(1, 2).to(dtype)
    out = F.scaled_dot_product_attention(q.to(dtype).reshape(slots, kv_heads, heads // kv_heads, head_dim), k, v,
                                         attn_mask=visible, scale=scale)  # (slots, kv, G, D)
    return out.reshape(slots, heads, head_dim).to(q.dtype)


def attend_pages_compiled(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, pages: torch.Tensor,
                          visible: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """attend_pages written for torch.compile on a CPU, the same arguments and result: scores and output as
    broadcast products summed over head_dim and over keys, which inductor turns into loops reading K and V straight
    from the pool through `pages` (the gather fused into the reductions), where SDPA needs the gathered
    (slots, kv_heads, L, D) copies first: at the tiny bench shapes the copies and SDPA's masked flash kernel cost
    more than the attention's arithmetic. Keys stay in their (page, offset) dimensions, so the loops find a key's
    address from its page alone, with no division of a flat key index by the page size (about a fifth faster at
    the bench shapes than flat keys). Eager, the products would be materialised ((slots, L, H, D) each): call it
    only inside a compiled graph."""
    slots, heads, head_dim = q.shape
    _, page_size, kv_heads, _ = k_pages.shape
    dtype = torch.promote_types(q.dtype, torch.float32)
    scale = head_dim ** -0.5 if scale is None else scale
    # Inductor would inline whatever computes q (the rotary embedding), pages and visible into the loops over keys,
    # recomputing them for every key: an identity as_strided view makes it store each of them once.
    q, pages, visible = (x.as_strided(x.shape, x.stride()) for x in (q, pages, visible))
    k = k_pages[pages].to(dtype)  # (slots, pages, page_size, kv, D): fused into the loops, never stored
    v = v_pages[pages].to(dtype)
    qg = (q.to(dtype) * scale).reshape(slots, 1, 1, kv_heads, heads // kv_heads, head_dim)  # (slots, 1, 1, kv, G, D)
    s = (qg * k[:, :, :, :, None, :]).sum(-1)  # (slots, pages, page_size, kv, G)
    s = s.masked_fill(~visible.reshape(slots, pages.shape[1], page_size, 1, 1), float("-inf"))
    e = (s - s.amax((1, 2), keepdim=True)).exp()  # key 0 is always visible: the max is finite
    out = (e[..., None] * v[:, :, :, :, None, :]).sum((1, 2)) / e.sum((1, 2))[..., None]  # (slots, kv, G, D)
    return out.reshape(slots, heads, head_dim).to(q.dtype)


def paged_decode_attention_reference(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                                     block_table: torch.Tensor, lengths: torch.Tensor,
                                     scale: float | None = None, num_pages: int | None = None) -> torch.Tensor:
    """Plain torch, also the eager CPU decode path (rollout.py calls its two halves, sharing live_pages across
    layers; its compiled step calls attend_pages_compiled in place of attend_pages):
    gather every slot's live pages up to the longest length (or num_pages: see live_pages), mask positions past
    each slot's length, softmax in fp32. An idle slot's output is zeros."""
    pages, visible = live_pages(block_table, lengths, k_pages.shape[1], num_pages)
    out = attend_pages(q, k_pages, v_pages, pages, visible, q.shape[2] ** -0.5 if scale is None else scale)
    return torch.where(lengths[:, None, None] > 0, out, 0.0)


if triton is not None:
    @triton.jit
    def _split_kernel(q_ptr, k_ptr, v_ptr, table_ptr, lengths_ptr, part_out_ptr, part_lse_ptr, scale,
                      stride_qs, stride_qh, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh,
                      stride_table, max_tokens, num_splits, HEAD_DIM: tl.constexpr, GROUP: tl.constexpr,
                      PAGE_SIZE: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
        """Stage 1, program (slot, kv head, split): the GROUP query heads of the kv head against keys
        [split * SPLIT, min((split + 1) * SPLIT, length)). Writes nothing for a split past the length."""
        slot = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        length = tl.minimum(tl.load(lengths_ptr + slot), max_tokens)
        start = split * SPLIT
        if start < length:
            end = tl.minimum(start + SPLIT, length)
            rows = tl.arange(0, BLOCK_G)
            dims = tl.arange(0, HEAD_DIM)
            heads = kv_head * GROUP + rows
            row_ok = rows < GROUP  # rows past the group pad it to BLOCK_G >= 16 for tl.dot
            q = tl.load(q_ptr + slot * stride_qs + heads[:, None] * stride_qh + dims[None, :], mask=row_ok[:, None],
                        other=0.0)  # (BLOCK_G, HEAD_DIM)
            q = q.to(k_ptr.dtype.element_ty)  # dot operands in the pool's dtype, accumulated in fp32
            m = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max of the scaled scores
            l = tl.zeros([BLOCK_G], tl.float32)  # running sum of exp(score - m)
            acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)  # running sum of exp(score - m) * v
            for n0 in range(start, end, BLOCK_N):
                n = n0 + tl.arange(0, BLOCK_N)
                live = n < end
                page = tl.load(table_ptr + slot * stride_table + n // PAGE_SIZE, mask=live, other=0).to(tl.int64)
                tok = n % PAGE_SIZE
                k = tl.load(k_ptr + page[:, None] * stride_kp + (tok * stride_kt + kv_head * stride_kh)[:, None]
                            + dims[None, :], mask=live[:, None], other=0.0)  # (BLOCK_N, HEAD_DIM)
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # (BLOCK_G, BLOCK_N)
                s = tl.where(live[None, :], s, float("-inf"))
                m_new = tl.maximum(m, tl.max(s, 1))  # finite: every block has a live key
                alpha = tl.exp(m - m_new)
                p = tl.exp(s - m_new[:, None])
                l = l * alpha + tl.sum(p, 1)
                v = tl.load(v_ptr + page[:, None] * stride_vp + (tok * stride_vt + kv_head * stride_vh)[:, None]
                            + dims[None, :], mask=live[:, None], other=0.0)  # (BLOCK_N, HEAD_DIM)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
                m = m_new
            part = (slot * (tl.num_programs(1) * GROUP) + heads) * num_splits + split  # (BLOCK_G,)
            tl.store(part_out_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc / l[:, None], mask=row_ok[:, None])
            tl.store(part_lse_ptr + part, m + tl.log(l), mask=row_ok)

    @triton.jit
    def _merge_kernel(part_out_ptr, part_lse_ptr, lengths_ptr, out_ptr, stride_os, stride_oh, max_tokens, num_splits,
                      HEAD_DIM: tl.constexpr, SPLIT: tl.constexpr):
        """Stage 2, program (slot, head): log-sum-exp merge of the splits stage 1 wrote, in split order."""
        slot = tl.program_id(0)
        head = tl.program_id(1)
        length = tl.minimum(tl.load(lengths_ptr + slot), max_tokens)
        dims = tl.arange(0, HEAD_DIM)
        base = (slot * tl.num_programs(1) + head) * num_splits
        m = float("-inf")
        l = 0.0
        acc = tl.zeros([HEAD_DIM], tl.float32)
        for split in range(0, tl.cdiv(length, SPLIT)):
            lse = tl.load(part_lse_ptr + base + split)
            o = tl.load(part_out_ptr + (base + split) * HEAD_DIM + dims)
            m_new = tl.maximum(m, lse)
            alpha = tl.exp(m - m_new)
            w = tl.exp(lse - m_new)
            acc = acc * alpha + o * w
            l = l * alpha + w
            m = m_new
        # l >= 1 once a split is merged (the largest lse gets weight 1); l = 0 only for an idle slot, whose acc is 0.
        tl.store(out_ptr + slot * stride_os + head * stride_oh + dims,
                 (acc / tl.maximum(l, 1.0)).to(out_ptr.dtype.element_ty))


def _paged_decode_attention_triton(q, k_pages, v_pages, block_table, lengths, scale: float, split_tokens: int,
                                   buffers: DecodeBuffers):
    slots, heads, head_dim = q.shape
    _, page_size, kv_heads, _ = k_pages.shape
    group = heads // kv_heads
    max_tokens = block_table.shape[1] * page_size
    num_splits = buffers.partial_lse.shape[2]
    _split_kernel[(slots, kv_heads, num_splits)](
        q, k_pages, v_pages, block_table, lengths, buffers.partial_out, buffers.partial_lse, scale,
        q.stride(0), q.stride(1), k_pages.stride(0), k_pages.stride(1), k_pages.stride(2),
        v_pages.stride(0), v_pages.stride(1), v_pages.stride(2), block_table.stride(0), max_tokens, num_splits,
        HEAD_DIM=head_dim, GROUP=group, PAGE_SIZE=page_size, SPLIT=split_tokens, BLOCK_N=min(BLOCK_N, split_tokens),
        BLOCK_G=max(16, triton.next_power_of_2(group)), num_warps=SPLIT_WARPS, num_stages=SPLIT_STAGES)
    out = buffers.out
    _merge_kernel[(slots, heads)](buffers.partial_out, buffers.partial_lse, lengths, out, out.stride(0), out.stride(1),
                                  max_tokens, num_splits, HEAD_DIM=head_dim, SPLIT=split_tokens)
    return out


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check(q, k_pages, v_pages, block_table, lengths, split_tokens: int, buffers: DecodeBuffers | None):
    """Shapes, dtypes and devices only: nothing here reads a tensor's values (no host sync)."""
    if q.dim() != 3 or k_pages.dim() != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(f"need q (slots, H, D) and k/v pages (num_pages, page_size, kv_heads, D) of one shape, got "
                         f"{tuple(q.shape)}, {tuple(k_pages.shape)}, {tuple(v_pages.shape)}")
    slots, heads, head_dim = q.shape
    kv_heads = k_pages.shape[2]
    if k_pages.shape[3] != head_dim or heads % kv_heads:
        raise ValueError(f"q has {heads} heads of {head_dim}, the pool {kv_heads} kv heads of {k_pages.shape[3]}: "
                         f"need equal head_dim and H a multiple of kv_heads")
    if block_table.shape[:1] != (slots,) or block_table.dim() != 2 or lengths.shape != (slots,):
        raise ValueError(f"need block_table (slots, max_pages) and lengths (slots,) for {slots} slots, got "
                         f"{tuple(block_table.shape)}, {tuple(lengths.shape)}")
    if block_table.dtype != torch.int32 or lengths.dtype != torch.int32:
        raise ValueError(f"block_table and lengths must be int32, got {block_table.dtype}, {lengths.dtype}")
    if k_pages.dtype != v_pages.dtype or not q.is_floating_point():
        raise ValueError(f"need floating q and one dtype for K and V, got {q.dtype}, {k_pages.dtype}, {v_pages.dtype}")
    if not q.device == k_pages.device == v_pages.device == block_table.device == lengths.device:
        raise ValueError("q, k_pages, v_pages, block_table and lengths must be on one device")
    if split_tokens < 16 or split_tokens & (split_tokens - 1):
        raise ValueError(f"split_tokens must be a power of two >= 16, got {split_tokens}")
    if any(t.stride(-1) != 1 for t in (q, k_pages, v_pages, block_table)):
        raise ValueError("q, k_pages, v_pages and block_table need a contiguous last dimension")
    if buffers is not None:
        for name, (shape, dtype) in _buffer_specs(q, block_table, k_pages.shape[1], split_tokens).items():
            given = getattr(buffers, name)
            if given.shape != shape or given.dtype != dtype or given.device != q.device or not given.is_contiguous():
                raise ValueError(f"buffers.{name}: need contiguous {shape} {dtype} on {q.device}, got "
                                 f"{tuple(given.shape)} {given.dtype} on {given.device}")


def paged_decode_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, block_table: torch.Tensor,
                           lengths: torch.Tensor, scale: float | None = None, impl: str = "auto",
                           split_tokens: int = DEFAULT_SPLIT_TOKENS, buffers: DecodeBuffers | None = None,
                           num_pages: int | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v for one query per slot over its `lengths[slot]` paged keys; returns (slots, H, D) in
    q's dtype (buffers.out when buffers are given), computed in fp32.

    q (slots, H, D); k_pages, v_pages (num_pages, page_size, kv_heads, D), query head h reads kv head
    h // (H / kv_heads); block_table (slots, max_pages) int32; lengths (slots,) int32. scale defaults to D ** -0.5.
    impl: "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "torch" (the reference), "auto" (triton on CUDA).
    On the Triton path the dot products take the pool's dtype (q is rounded to a bf16 pool's dtype, as flash
    attention does) with fp32 accumulation; softmax and merging are fp32. num_pages: see the reference (the Triton
    path reads each slot's own length and ignores it)."""
    _check(q, k_pages, v_pages, block_table, lengths, split_tokens, buffers)
    scale = q.shape[2] ** -0.5 if scale is None else scale
    if impl == "auto":
        impl = "triton" if q.is_cuda and triton is not None else "torch"
    if impl not in ("torch", "triton"):
        raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    if impl == "torch":
        out = paged_decode_attention_reference(q, k_pages, v_pages, block_table, lengths, scale, num_pages)
        return out if buffers is None else buffers.out.copy_(out)
    if triton is None:
        raise RuntimeError("impl='triton' needs the triton package (no wheels for macOS / Windows): use impl='torch'")
    if not q.is_cuda and not _interpreted():
        raise RuntimeError("impl='triton' on CPU needs TRITON_INTERPRET=1 in the environment before triton is imported")
    if q.shape[2] < 16 or q.shape[2] & (q.shape[2] - 1):
        raise ValueError(f"impl='triton' needs head_dim a power of two >= 16 (tl.dot tiles), got {q.shape[2]}")
    buffers = decode_buffers(q, block_table, k_pages.shape[1], split_tokens) if buffers is None else buffers
    return _paged_decode_attention_triton(q, k_pages, v_pages, block_table, lengths, scale, split_tokens, buffers)
