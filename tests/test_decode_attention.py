"""decode_attention.py: the Triton kernel (interpreted on CPU) and the torch reference against an fp64 oracle."""
import importlib.util
import math
import sys
from dataclasses import replace

import pytest
import torch

import decode_attention as DA

CUDA = torch.cuda.is_available()
GARBAGE = (-1, 2**30)  # written into block-table columns a slot does not own: reading one would fault or go wrong


def oracle(q, k_pages, v_pages, block_table, lengths, scale):
    """Per slot, plainly: its pages' tokens concatenated up to its length, softmax(q k * scale) v in float64."""
    slots, heads, _ = q.shape
    page_size, kv_heads = k_pages.shape[1:3]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b, n in enumerate(lengths.tolist()):
        if n == 0:
            continue
        pages = block_table[b, :math.ceil(n / page_size)].tolist()
        k = torch.cat([k_pages[p] for p in pages])[:n].double().repeat_interleave(heads // kv_heads, dim=1)  # (n, H, D)
        v = torch.cat([v_pages[p] for p in pages])[:n].double().repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].double(), k) * scale
        out[b] = torch.einsum("hn,nhd->hd", scores.softmax(-1), v)
    return out


def make_case(lengths, page_size, kv_heads, group, head_dim, seed, pool_dtype=torch.float32, q_dtype=torch.float32,
              device="cpu"):
    """A pool with spare pages, each slot's pages drawn at random, slot 3 sharing slot 0's first two pages (a
    prompt shared by two samples of a group), and garbage in every column past a slot's own pages."""
    g = torch.Generator().manual_seed(seed)
    max_len = max(lengths) + 5
    width = math.ceil((max_len + 1) / page_size)
    own = [math.ceil(n / page_size) for n in lengths]
    num_pages = sum(own) + 3
    order = torch.randperm(num_pages, generator=g).tolist()
    table = torch.empty(len(lengths), width, dtype=torch.int32)
    for b, n in enumerate(own):
        table[b] = torch.tensor([GARBAGE[c % 2] for c in range(width)], dtype=torch.int32)
        table[b, :n] = torch.tensor([order.pop() for _ in range(n)], dtype=torch.int32)
    if len(lengths) > 3:
        assert own[0] >= 2 and own[3] >= 2
        table[3, :2] = table[0, :2]
    shape = (num_pages, page_size, kv_heads, head_dim)
    k_pages = torch.randn(shape, generator=g).to(pool_dtype)
    v_pages = torch.randn(shape, generator=g).to(pool_dtype)
    q = torch.randn(len(lengths), kv_heads * group, head_dim, generator=g).to(q_dtype)
    lengths = torch.tensor(lengths, dtype=torch.int32)
    return [t.to(device) for t in (q, k_pages, v_pages, table, lengths)]


# lengths: not multiples of the page size, one token, idle, a full page multiple, several splits
LENGTHS = [37, 1, 0, 70, 16]
# page_size, kv_heads, group, head_dim, split_tokens: splits of one 32-key block (70 keys: 3 splits) and of two
CONFIGS = {"gqa5-d64-p16-split32": (16, 2, 5, 64, 32), "mha-d16-p8-split64": (8, 3, 1, 16, 64)}


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("config", CONFIGS)
def test_matches_fp64_oracle(impl, config):
    page_size, kv_heads, group, head_dim, split_tokens = CONFIGS[config]
    q, k_pages, v_pages, table, lengths = make_case(LENGTHS, page_size, kv_heads, group, head_dim, seed=0)
    scale = 0.3  # not head_dim ** -0.5: an ignored scale would show
    out = DA.paged_decode_attention(q, k_pages, v_pages, table, lengths, scale=scale, impl=impl,
                                    split_tokens=split_tokens)
    assert out.shape == q.shape and out.dtype == q.dtype
    want = oracle(q, k_pages, v_pages, table, lengths, scale)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.all(out[2] == 0)  # the idle slot


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # from inside torch.compile
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("config", CONFIGS)
def test_compiled_form_matches_fp64_oracle(compiled, config):
    """attend_pages_compiled, the sampler's compiled CPU attention, over every block-table column (more than the
    longest slot needs with pages of 8) with garbage past each slot's pages; eager at these tiny shapes, and through
    inductor."""
    page_size, kv_heads, group, head_dim, _ = CONFIGS[config]
    q, k_pages, v_pages, table, lengths = make_case(LENGTHS, page_size, kv_heads, group, head_dim, seed=4)
    pages, visible = DA.live_pages(table, lengths, page_size, table.shape[1])
    attend = torch.compile(DA.attend_pages_compiled, fullgraph=True, dynamic=False) if compiled else \
        DA.attend_pages_compiled
    out = attend(q, k_pages, v_pages, pages, visible, 0.3)
    want = oracle(q, k_pages, v_pages, table, lengths, 0.3)
    live = lengths > 0  # an idle slot's output is garbage the sampler never reads
    torch.testing.assert_close(out[live].double(), want[live], rtol=1e-5, atol=1e-5)
    ref = DA.attend_pages(q, k_pages, v_pages, pages, visible, 0.3)
    torch.testing.assert_close(out[live], ref[live], rtol=1e-5, atol=1e-6)


def test_reference_bf16_pool_fp32_query():
    """bf16 K/V widened exactly to fp32: the oracle reads the same bf16 values, so fp32 tolerances hold."""
    q, k_pages, v_pages, table, lengths = make_case(LENGTHS, 16, 2, 5, 64, seed=1, pool_dtype=torch.bfloat16)
    out = DA.paged_decode_attention(q, k_pages, v_pages, table, lengths, impl="torch")
    torch.testing.assert_close(out.double(), oracle(q, k_pages, v_pages, table, lengths, 64 ** -0.5),
                               rtol=1e-5, atol=1e-5)
    q16 = q.bfloat16()
    out16 = DA.paged_decode_attention(q16, k_pages, v_pages, table, lengths, impl="torch")
    assert out16.dtype == torch.bfloat16  # computed in fp32, returned in q's dtype: one bf16 rounding
    torch.testing.assert_close(out16.double(), oracle(q16, k_pages, v_pages, table, lengths, 64 ** -0.5),
                               rtol=1e-2, atol=1e-2)


def test_triton_buffers_reused_batch_invariant():
    """Preallocated buffers full of NaN (the kernels must read only what they wrote) are filled in place; a slot's
    output is bit-identical alone and in the batch, with a wider block table (more splits) too."""
    q, k_pages, v_pages, table, lengths = make_case(LENGTHS, 16, 2, 5, 64, seed=2)
    buffers = DA.decode_buffers(q, table, page_size=16, split_tokens=32)
    for t in (buffers.out, buffers.partial_out, buffers.partial_lse):
        t.fill_(float("nan"))
    out = DA.paged_decode_attention(q, k_pages, v_pages, table, lengths, impl="triton", split_tokens=32,
                                    buffers=buffers)
    assert out.data_ptr() == buffers.out.data_ptr() and not out.isnan().any()
    wide = torch.cat([table[3:4], torch.full((1, 4), GARBAGE[1], dtype=torch.int32)], dim=1)
    alone = DA.paged_decode_attention(q[3:4], k_pages, v_pages, wide, lengths[3:4], impl="triton", split_tokens=32)
    assert torch.equal(alone[0], out[3])


def test_layers_share_split_buffers():
    """The sampler's layout: each layer its own output, one set of split partials for all of them. The second
    call, with fewer splits per slot than the first left behind, leaves the first's output as it was, and each
    equals a call with buffers of its own."""
    layers = [make_case(LENGTHS, 16, 2, 5, 64, seed=3), make_case([17, 1, 0, 40, 16], 16, 2, 5, 64, seed=4)]
    short = layers[1][3]  # padded with garbage columns to the first table's width: the same buffer shapes
    layers[1][3] = torch.cat([short, torch.full((5, layers[0][3].shape[1] - short.shape[1]), GARBAGE[1],
                                                dtype=torch.int32)], dim=1)
    shared = DA.decode_buffers(layers[0][0], layers[0][3], page_size=16, split_tokens=32)
    outs = [DA.paged_decode_attention(*case, impl="triton", split_tokens=32,
                                      buffers=replace(shared, out=torch.empty_like(shared.out))) for case in layers]
    for case, out in zip(layers, outs):
        assert torch.equal(out, DA.paged_decode_attention(*case, impl="triton", split_tokens=32))
        torch.testing.assert_close(out.double(), oracle(*case, 64 ** -0.5), rtol=1e-5, atol=1e-5)


def test_checks_shapes_without_reading_values():
    q, k_pages, v_pages, table, lengths = make_case([5, 9], 8, 2, 2, 16, seed=3)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        DA.paged_decode_attention(q[:, :3], k_pages, v_pages, table, lengths)
    with pytest.raises(ValueError, match="int32"):
        DA.paged_decode_attention(q, k_pages, v_pages, table.long(), lengths)
    with pytest.raises(ValueError, match="buffers.out"):
        DA.paged_decode_attention(q, k_pages, v_pages, table, lengths, impl="triton",
                                  buffers=DA.decode_buffers(q[:1], table[:1], page_size=8))
    with pytest.raises(ValueError, match="exceeds"):
        DA.paged_decode_attention(q, k_pages, v_pages, table, torch.tensor([5, 99], dtype=torch.int32), impl="torch")


def test_imports_without_triton(monkeypatch):
    """macOS / Windows have no Triton wheels: the module still imports and "auto" runs the reference."""
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("decode_attention_without_triton", DA.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.triton is None
    q, k_pages, v_pages, table, lengths = make_case([5, 9], 8, 2, 2, 16, seed=5)
    out = module.paged_decode_attention(q, k_pages, v_pages, table, lengths)
    torch.testing.assert_close(out.double(), oracle(q, k_pages, v_pages, table, lengths, 16 ** -0.5),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="needs the triton package"):
        module.paged_decode_attention(q, k_pages, v_pages, table, lengths, impl="triton")


@pytest.mark.skipif(not CUDA, reason="bf16 kernel arithmetic and CUDA graphs need a GPU")
def test_cuda_bf16_pool_and_graph_replay():
    """bf16 pool on the GPU (dot operands rounded to bf16, fp32 accumulation), then the call captured once in a
    CUDA graph with preallocated buffers and replayed after the lengths and block table change in place."""
    q, k_pages, v_pages, table, lengths = make_case(LENGTHS, 16, 2, 5, 64, seed=4, pool_dtype=torch.bfloat16,
                                                    q_dtype=torch.bfloat16, device="cuda")
    scale = 64 ** -0.5
    out = DA.paged_decode_attention(q, k_pages, v_pages, table, lengths, impl="triton")
    torch.testing.assert_close(out.double().cpu(), oracle(*(t.cpu() for t in (q, k_pages, v_pages, table, lengths)),
                                                          scale), rtol=2e-2, atol=2e-2)
    buffers = DA.decode_buffers(q, table, page_size=16)
    DA.paged_decode_attention(q, k_pages, v_pages, table, lengths, impl="triton", buffers=buffers)  # compile
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        DA.paged_decode_attention(q, k_pages, v_pages, table, lengths, impl="triton", buffers=buffers)
    lengths.copy_(torch.tensor([38, 2, 0, 69, 15], dtype=torch.int32))  # in place, as the sampler between steps
    graph.replay()
    eager = DA.paged_decode_attention(q, k_pages, v_pages, table, lengths, impl="triton")
    assert torch.equal(buffers.out, eager)
