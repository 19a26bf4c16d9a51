"""The InternVL / Skywork-R1V3 vision-language model in plain PyTorch: the network alone.

InternViT (patch 14, 448px tiles, LayerNorm or RMSNorm, optional qk-norm, layer scale) -> connector `mlp1`
(pixel shuffle 0.5 -> LayerNorm -> Linear -> GELU -> Linear) -> Qwen2 or Qwen3 LLM (GQA, RoPE, RMSNorm, SwiGLU;
Qwen2 with qkv bias, Qwen3 (InternVL3.5) with a per-head RMSNorm on q and k and an explicit head_dim). Follows
OpenGVLab/InternVL `modeling_intern_vit.py` + `modeling_internvl_chat.py` (the layout Skywork-R1V3-38B and
InternVL3.5 ship in) and transformers' `InternVLForConditionalGeneration` / `Qwen2ForCausalLM` / `Qwen3ForCausalLM`
(the parity oracles in tests).
checkpoint.py reads and writes checkpoints; prompts, images and data rows live in data.py.

    python -m pytest -q tests/test_model.py   # bit-exact with transformers
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from entropy import logprob_entropy

# -----------------------------------------------------------------------------------------------------------------
# Configs: one dataclass per tower, nothing shape-related hard-coded. Each checks its own fields: a config.json with a
# string where a number belongs, a zero head count or eps 0 (-> nan) fails here, naming the field.


def _is_num(v, kind) -> bool:
    return isinstance(v, kind) and not isinstance(v, bool)  # bool is an int to Python, never a count here


def _check(cfg, where: str, ints=(), floats=(), bools=()):
    rules = [(ints, "a positive integer", lambda v: _is_num(v, int) and v >= 1),
             (floats, "a positive number", lambda v: _is_num(v, (int, float)) and 0 < v < math.inf),
             (bools, "true or false", lambda v: isinstance(v, bool))]
    for names, want, ok in rules:
        for name in names:
            if not ok(v := getattr(cfg, name)):
                raise ValueError(f"{where}.{name} must be {want}, got {v!r}")


@dataclass
class ViTConfig:
    hidden_size: int = 32
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 64
    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3
    qkv_bias: bool = True
    qk_normalization: bool = False  # InternViT-6B: True (RMSNorm over all heads' q and k); 300M: False
    norm_type: str = "layer_norm"  # "layer_norm" (300M) or "rms_norm" (6B)
    layer_norm_eps: float = 1e-6
    initializer_factor: float = 0.1  # initial layer-scale value (ls1, ls2)
    head_dim: int = field(init=False)
    num_patches: int = field(init=False)

    def __post_init__(self):
        _check(self, "vision_config", ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                                       "image_size", "patch_size", "num_channels"), ("layer_norm_eps",),
               ("qkv_bias", "qk_normalization"))
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"vision hidden_size {self.hidden_size} not divisible by {self.num_attention_heads} heads")
        if self.image_size % self.patch_size:
            raise ValueError(f"vision image_size {self.image_size} not divisible by patch_size {self.patch_size}")
        if self.norm_type not in ("layer_norm", "rms_norm"):
            raise ValueError(f"vision norm_type must be 'layer_norm' or 'rms_norm', got {self.norm_type!r}")
        if not _is_num(self.initializer_factor, (int, float)):
            raise ValueError(f"vision_config.initializer_factor must be a number, got {self.initializer_factor!r}")
        self.head_dim = self.hidden_size // self.num_attention_heads
        self.num_patches = (self.image_size // self.patch_size) ** 2


@dataclass
class LLMConfig:
    vocab_size: int = 64
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    # The two attention switches between the supported LLMs: Qwen2 has q/k/v bias, no o bias, no qk-norm; Qwen3 has
    # an RMSNorm of width head_dim on every query and key head (before RoPE) and `attention_bias` on all four.
    qkv_bias: bool = True
    o_bias: bool = False
    qk_norm: bool = False

    def __post_init__(self):
        _check(self, "llm_config", ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                    "num_attention_heads", "num_key_value_heads", "max_position_embeddings"),
               ("rope_theta", "rms_norm_eps"), ("tie_word_embeddings", "qkv_bias", "o_bias", "qk_norm"))
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        _check(self, "llm_config", ("head_dim",))
        self.rope_theta = float(self.rope_theta)
        if self.head_dim % 2:
            raise ValueError(f"llm_config.head_dim must be even for RoPE, got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{self.num_attention_heads} attention heads not a multiple of "
                             f"{self.num_key_value_heads} key/value heads")


@dataclass
class VLMConfig:
    llm: LLMConfig = field(default_factory=LLMConfig)
    vision: ViTConfig | None = field(default_factory=ViTConfig)  # None: a text-only Qwen2/Qwen3 checkpoint
    downsample_ratio: float = 0.5
    select_layer: int = -1  # the ViT layer feeding the connector: -1 the last, -2 the one before, k >= 1 the k-th
    image_token_id: int | None = None  # id of <IMG_CONTEXT>; remote-code configs leave it to the tokenizer
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    use_thumbnail: bool = True
    layout: str = "remote"  # checkpoint key/config layout (checkpoint.LAYOUTS): "remote", "native", "qwen2", "qwen3"
    source: dict = field(default_factory=dict, repr=False)  # the config.json this came from, kept for saving
    # the directory it was read from: saving copies its tokenizer, generation config, ... (not part of the network)
    source_dir: str | None = field(default=None, repr=False, compare=False)
    tokens_per_tile: int = field(init=False)
    vision_layers: int = field(init=False)  # how many ViT blocks run (select_layer as a count)

    def __post_init__(self):
        _check(self, "config", ("min_dynamic_patch", "max_dynamic_patch"), ("downsample_ratio",), ("use_thumbnail",))
        if self.max_dynamic_patch < self.min_dynamic_patch:
            raise ValueError(f"max_dynamic_patch {self.max_dynamic_patch} < min_dynamic_patch {self.min_dynamic_patch}")
        tok, V = self.image_token_id, self.llm.vocab_size
        if tok is not None and not (_is_num(tok, int) and 0 <= tok < V):
            raise ValueError(f"image_token_id must be a token id in [0, {V}), got {tok!r}")
        self.tokens_per_tile = self.vision_layers = 0
        if self.vision is None:
            return
        if not _is_num(self.select_layer, int):
            raise ValueError(f"select_layer must be an integer, got {self.select_layer!r}")
        # InternVL reads hidden_states[select_layer], where hidden_states[0] is the patch embeddings and [k] the k-th
        # block's output: -1 -> all `depth` blocks, k >= 1 -> k blocks.
        depth = self.vision.num_hidden_layers
        self.vision_layers = self.select_layer if self.select_layer >= 0 else depth + 1 + self.select_layer
        if not 1 <= self.vision_layers <= depth:
            raise ValueError(f"select_layer {self.select_layer} is outside the vision tower's {depth} layers "
                             f"(use -{depth}..-1 or 1..{depth})")
        side = self.vision.image_size // self.vision.patch_size
        if side * self.downsample_ratio != int(side * self.downsample_ratio) or self.downsample_ratio > 1:
            raise ValueError(f"{side}x{side} patches cannot be pixel-shuffled by ratio {self.downsample_ratio}")
        self.tokens_per_tile = int(side * self.downsample_ratio) ** 2  # 448/14=32 -> 16x16 = 256


# -----------------------------------------------------------------------------------------------------------------
# Vision tower: InternViT


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    """The dtype numerically delicate steps run in: fp32 for bf16/fp16/fp32, fp64 for an fp64 model (the tests'
    oracle), so that a float64 copy of the model is a true fp64 reference."""
    return torch.promote_types(dtype, torch.float32)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # statistics in fp32 (fp64 stays fp64) whatever the weights' dtype, as Qwen2 and InternViT do; one fused op
        return self.weight * F.rms_norm(x.to(_at_least_fp32(x.dtype)), x.shape[-1:], eps=self.eps).to(x.dtype)


def _norm(cfg: ViTConfig, dim: int) -> nn.Module:
    return RMSNorm(dim, cfg.layer_norm_eps) if cfg.norm_type == "rms_norm" else nn.LayerNorm(dim, cfg.layer_norm_eps)


class ViTAttention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.qkv_bias)
        if cfg.qk_normalization:  # normalises q and k over all heads at once (one RMSNorm of width C)
            self.q_norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_eps)
            self.k_norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, h):
        B, N, C = h.shape
        q, k, v = self.qkv(h).split(C, dim=-1)  # (B, N, C) each
        if self.cfg.qk_normalization:
            q, k = self.q_norm(q), self.k_norm(k)
        H, D = self.cfg.num_attention_heads, self.cfg.head_dim
        q, k, v = (t.view(B, N, H, D).transpose(1, 2) for t in (q, k, v))  # (B, H, N, D)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, N, C))  # (B, N, C)


class ViTMLP(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, h):
        return self.fc2(F.gelu(self.fc1(h)))


class ViTBlock(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1, self.norm2 = _norm(cfg, cfg.hidden_size), _norm(cfg, cfg.hidden_size)
        self.attn, self.mlp = ViTAttention(cfg), ViTMLP(cfg)
        self.ls1 = nn.Parameter(torch.ones(cfg.hidden_size))
        self.ls2 = nn.Parameter(torch.ones(cfg.hidden_size))

    def forward(self, h):
        h = h + self.attn(self.norm1(h)) * self.ls1
        return h + self.mlp(self.norm2(h)) * self.ls2


class ViTEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.hidden_size))

    def forward(self, pixel_values):
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, C, h, w)
        B, C, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, C)
        pos = self.position_embedding
        side = math.isqrt(self.cfg.num_patches)
        patch_pos = pos[:, 1:]
        if (gh, gw) != (side, side):  # a tile size other than the trained one: bicubic resample of the grid
            grid = patch_pos.to(_at_least_fp32(pos.dtype)).reshape(1, side, side, C)
            grid = grid.permute(0, 3, 1, 2)  # (1, C, side, side)
            grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
            patch_pos = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, C).to(pos.dtype)  # (1, h*w, C)
        x = torch.cat([self.class_embedding.expand(B, 1, C), x], dim=1)
        return x + torch.cat([pos[:, :1], patch_pos], dim=1)


class ViT(nn.Module):
    """InternViT: patches + CLS + learned positions -> pre-norm blocks with layer scale. No final norm."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.embeddings = ViTEmbeddings(cfg)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(ViTBlock(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, pixel_values, num_layers: int | None = None):
        h = self.embeddings(pixel_values)
        for block in self.encoder.layers[:num_layers]:
            h = block(h)
        return h  # (B, 1 + patches, C)


def pixel_shuffle(x, ratio: float):
    """(B, w, h, C) -> (B, h*r, w*r, C/r^2), InternVL's "v2" pixel shuffle (the transposes keep row-major order)."""
    B, w, h, C = x.shape
    x = x.reshape(B, w, int(h * ratio), int(C / ratio))  # (B, w, h*r, C/r)
    x = x.permute(0, 2, 1, 3)  # (B, h*r, w, C/r)
    x = x.reshape(B, int(h * ratio), int(w * ratio), int(C / ratio ** 2))  # (B, h*r, w*r, C/r^2)
    return x.permute(0, 2, 1, 3)


class Connector(nn.Sequential):
    """`mlp1`: pixel shuffle -> LayerNorm -> Linear -> GELU -> Linear; indices 0/1/3 are the checkpoint's keys."""

    def __init__(self, vit_hidden: int, llm_hidden: int, ratio: float):
        width = int(vit_hidden / ratio ** 2)
        super().__init__(nn.LayerNorm(width), nn.Linear(width, llm_hidden), nn.GELU(),
                         nn.Linear(llm_hidden, llm_hidden))
        self.ratio = ratio

    def forward(self, patches):  # (B, P, C) ViT patch features, CLS dropped
        B, P, C = patches.shape
        side = math.isqrt(P)
        x = pixel_shuffle(patches.reshape(B, side, side, C), self.ratio)  # (B, side*r, side*r, C/r^2)
        return super().forward(x.reshape(B, -1, x.shape[-1]))  # (B, tokens_per_tile, llm_hidden)

# -----------------------------------------------------------------------------------------------------------------
# Language model: Qwen2 / Qwen3, with a static KV cache written by index


class KVCache:
    """Preallocated keys/values, one (slots, kv_heads, max_len, head_dim) tensor per layer, written by index.
    Shapes never change while decoding, so a decode step can be compiled (CUDA graphs). One tensor per layer rather
    than a single block: a compiled step writes a separate input in place, but copies a whole layer every step
    when the layer is a view into a shared block. The sampler's views of its paged pool (rollout.py) speak the same
    `attend` protocol: a cache writes a call's keys and values and attends over what it holds."""

    def __init__(self, cfg: LLMConfig, slots: int, max_len: int, dtype=torch.float32, device=None):
        shape = (slots, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.max_len = max_len

    def attend(self, layer: int, q, k, v, positions, slots=None):
        """q (B, T, H, D), k and v (B, T, KV, D) of batch rows living in cache slots `slots` (default row b -> slot
        b), written at `positions` (B, T). positions None: a new sequence (written at 0..T-1, causal over its own
        keys, whatever the cache holds further on); given: each query reads the cache up to its position.
        Returns (B, T, H * D)."""
        B, T = q.shape[:2]
        ck, cv = self.k[layer], self.v[layer]  # (S, KV, L, D)
        at = torch.arange(T, device=q.device).expand(B, T) if positions is None else positions
        rows = (torch.arange(B, device=q.device) if slots is None else slots)[:, None]  # (B, 1)
        ck[rows, :, at] = k.to(ck.dtype)  # advanced index -> (B, T, KV, D)
        cv[rows, :, at] = v.to(cv.dtype)
        if positions is None:
            return causal_attention(q, k, v)
        if slots is not None:
            ck, cv = ck[slots], cv[slots]  # (B, KV, L, D)
        mask = (torch.arange(ck.shape[2], device=q.device) <= positions[..., None])[:, None]  # (B, 1, T, L)
        return cached_attention(q, ck.to(q.dtype), cv.to(q.dtype), mask)


def rope_cos_sin(positions, head_dim: int, theta: float, dtype):
    """cos/sin for RoPE at integer positions (B, T), computed in fp32 like the reference (fp64 for fp64), then cast."""
    ft = _at_least_fp32(dtype)
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).to(ft) / head_dim)
    freqs = positions[..., None].to(ft) * inv_freq  # (B, T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (B, T, D)
    return emb.cos().to(dtype)[:, :, None], emb.sin().to(dtype)[:, :, None]  # (B, T, 1, D)


def apply_rope(x, cos, sin):  # x (B, T, H, D)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def causal_attention(q, k, v):
    """A sequence from position 0 attending to itself: q (B, T, H, D), k and v (B, T, KV, D) -> (B, T, H * D)."""
    B, T, H, D = q.shape
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       enable_gqa=k.shape[2] != H)  # (B, H, T, D)
    return y.transpose(1, 2).reshape(B, T, H * D)


def cached_attention(q, k, v, mask):
    """Queries against a cache: q (B, T, H, D); k, v (B, KV, L, D); mask (B, 1, T, L) True where visible. Returns
    (B, T, H * D). The H/KV query heads that share a kv head attend as H/KV times as many queries of it (head h reads
    kv head h // (H/KV), as with enable_gqa), so K and V are never repeated per query head and SDPA's fused kernels
    that take a mask stay available (with the GQA flag, a masked call falls back to the math kernel)."""
    B, T, H, D = q.shape
    KV = k.shape[1]
    G = H // KV
    q = q.view(B, T, KV, G, D).permute(0, 2, 3, 1, 4).reshape(B, KV, G * T, D)  # query row g * T + t
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.repeat(1, 1, G, 1))  # (B, KV, G * T, D)
    return y.view(B, KV, G, T, D).permute(0, 3, 1, 2, 4).reshape(B, T, H * D)


@dataclass
class PromptSpan:
    """One prompt and its samples in a packed row (see SharedPrompts): `prefix` tokens of the prompt, then each
    sample's suffix, `length` tokens in all."""
    prefix: int
    length: int
    suffix: torch.Tensor  # (G, S): each sample's suffix positions within the span, right-padded with its last one
    real: torch.Tensor  # (suffix tokens,): the rows of the (G * S) suffix outputs that are real tokens, in order


@dataclass
class SharedPrompts:
    """Attention for a packed training micro-batch (data.pack): a single row of tokens in which each prompt
    appears once, all but its last token (the prefix its G samples share), followed by each sample's suffix (the
    prompt's last token, then the response but its last: the positions that predict the response). The linear
    layers, the norms and the vision tower see each prompt once instead of G times, and no padding.

    Attention gathers each span into G rows of prefix + suffix, the rows of all spans in one right-padded batch, and
    runs SDPA's causal kernel on it once (flash, GQA, no mask: a row's padding comes after its tokens, which causal
    attention never lets see it); each token's output comes from its row, a prefix token's from its span's first.
    The prefix's queries run G times, a waste of (G - 1) x prefix^2 / 2 attention scores that keeps every backend's
    fused causal path, and attention (alone) runs the batch's padding. Autograd sums the G uses of the prefix's keys
    and values. Speaks KVCache's `attend` protocol (positions come from the caller: a suffix continues its
    prefix's positions)."""
    spans: list[PromptSpan]

    def __post_init__(self):
        # Computed once for every layer: the packed-row position of each batch row's tokens (padding repeats the
        # row's last one), and where each packed token's output sits in the flattened batch.
        L = max(span.prefix + span.suffix.shape[1] for span in self.spans)
        rows, out, at, first = [], [], 0, 0  # first: the span's first row in the batch
        for span in self.spans:
            P, (G, S) = span.prefix, span.suffix.shape
            dev = span.suffix.device
            row = torch.cat([torch.arange(at, at + P, device=dev).expand(G, P), at + span.suffix], dim=1)  # (G, P+S)
            rows.append(torch.cat([row, row[:, -1:].expand(G, L - P - S)], dim=1))  # (G, L)
            suffix = (first + span.real // S) * L + P + span.real % S if S else span.real
            out += [first * L + torch.arange(P, device=dev), suffix]
            at, first = at + span.length, first + G
        self.width, self.gather = L, torch.cat(rows).flatten()  # (R * L,)
        self.out_index = torch.cat(out)  # (T,)

    @torch.compiler.disable  # --compile_blocks: the spans change every micro-batch; the rest of a block compiles
    def attend(self, layer: int, q, k, v, positions, slots=None):
        """q (1, T, H, D), k and v (1, T, KV, D) over the packed row -> (1, T, H * D)."""
        rows = lambda x: x[0].index_select(0, self.gather).view(-1, self.width, *x.shape[2:])  # (R, L, heads, D)
        y = causal_attention(rows(q), rows(k), rows(v))  # (R, L, H * D)
        return y.flatten(0, 1).index_select(0, self.out_index)[None]  # (1, T, H * D)


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        H, KV, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, H * D, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, KV * D, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, KV * D, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(H * D, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:  # one RMSNorm per head (width D, shared by the heads), unlike InternViT's over all heads
            self.q_norm = RMSNorm(D, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(D, cfg.rms_norm_eps)

    def forward(self, h, cos, sin, positions=None, cache=None, layer: int = 0, slots=None):
        B, T, _ = h.shape
        H, KV, D = self.cfg.num_attention_heads, self.cfg.num_key_value_heads, self.cfg.head_dim
        q = self.q_proj(h).view(B, T, H, D)  # (B, T, H, D)
        k = self.k_proj(h).view(B, T, KV, D)  # (B, T, KV, D)
        v = self.v_proj(h).view(B, T, KV, D)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # With a cache, the cache writes this call's keys and values and attends over what it holds (KVCache.attend);
        # positions None is a new sequence: causal over its own keys.
        y = causal_attention(q, k, v) if cache is None else cache.attend(layer, q, k, v, positions, slots)
        return self.o_proj(y)  # y (B, T, H * D)


class MLP(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, h):
        return self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Block(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h, cos, sin, positions=None, cache=None, layer: int = 0, slots=None):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, positions, cache, layer, slots)
        return h + self.mlp(self.post_attention_layernorm(h))


class LLM(nn.Module):
    """Qwen2 / Qwen3 decoder. `forward` maps input embeddings to final (normed) hidden states; `logits` applies the
    head."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def head_weight(self):  # (V, C): what the fused log-prob kernel multiplies hidden states with
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, x, positions=None, cache=None, slots=None):
        """x (B, T, C) input embeddings; positions (B, T) absolute positions, None for a new sequence (0..T-1, which
        attends only to itself, causally). `cache` (a KVCache, or a view of rollout.py's page pool) stores each
        layer's keys and values and attends over them; with a KVCache, batch row b lives in cache slot `slots[b]`
        (default b) and its keys/values are written at `positions[b]`; given positions read the cache up to each
        query's position. A SharedPrompts `cache` is a packed training row's attention (no cache)."""
        B, T, _ = x.shape
        new = positions is None
        if new:
            positions = torch.arange(T, device=x.device).expand(B, T)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        h = x
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, None if new else positions, cache, i, slots)
        return self.norm(h)

    def logits(self, h):
        logits = F.linear(h, self.head_weight)
        return logits.to(_at_least_fp32(logits.dtype))  # fp32 (fp64 stays fp64) before any softmax

# -----------------------------------------------------------------------------------------------------------------
# The whole model


class VLM(nn.Module):
    def __init__(self, config: VLMConfig):
        super().__init__()
        self.config = config
        v = config.vision
        self.vision_model = ViT(v) if v is not None else None
        self.mlp1 = Connector(v.hidden_size, config.llm.hidden_size, config.downsample_ratio) if v else None
        self.language_model = LLM(config.llm)

    def image_features(self, pixel_values):
        """(tiles, 3, S, S) -> (tiles * tokens_per_tile, C_llm), in tile order."""
        patches = self.vision_model(pixel_values, num_layers=self.config.vision_layers)[:, 1:]  # (tiles, P, C), no CLS
        return self.mlp1(patches).flatten(0, 1)

    def image_input_error(self, n_tokens: int, pixel_values, image_index=None) -> str | None:
        """Why `n_tokens` <IMG_CONTEXT> tokens and these image tiles (placed by `image_index`, see `embed`) cannot
        go together, or None if they can."""
        tok, per_tile = self.config.image_token_id, self.config.tokens_per_tile
        if pixel_values is not None:
            if self.vision_model is None:
                return "pixel_values given to a text-only model"
            if tok is None:
                return "pixel_values given but the config has no image_token_id (<IMG_CONTEXT> id)"
            v = self.config.vision
            want = (v.num_channels, v.image_size, v.image_size)
            if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != want:
                return (f"pixel_values of shape {tuple(pixel_values.shape)}: the model takes (tiles, {want[0]}, "
                        f"{want[1]}, {want[2]}) tiles (data.load_image cuts images for this config)")
            if not pixel_values.is_floating_point() or not bool(torch.isfinite(pixel_values).all()):
                return f"pixel_values must be finite floats ({pixel_values.dtype}; NaN or inf found, or not float)"
        n_tiles = 0 if pixel_values is None else pixel_values.shape[0]
        if image_index is not None and pixel_values is not None:
            if image_index.shape != (n_tokens,) or (n_tokens and not 0 <= int(image_index.min()) <=
                                                    int(image_index.max()) < n_tiles * per_tile):
                return (f"image_index of shape {tuple(image_index.shape)} must give each of the {n_tokens} "
                        f"image-context tokens a feature row in [0, {n_tiles * per_tile})")
            return None
        if n_tokens != n_tiles * per_tile:
            return (f"{n_tokens} image-context tokens (id {tok}) in the prompt but {n_tiles} image tiles give "
                    f"{n_tiles * per_tile} connector features ({per_tile} per tile): prompt and images disagree")
        return None

    def embed(self, input_ids, pixel_values=None, image_index=None):
        """Token embeddings with the connector's outputs in place of the <IMG_CONTEXT> tokens: in order, or, with
        `image_index` (one entry per <IMG_CONTEXT> token, row-major), token i takes feature row image_index[i], so a
        prompt's tiles shared by its G samples go through the tower once (data.pack)."""
        V = self.config.llm.vocab_size
        if input_ids.numel() and not 0 <= int(input_ids.min()) <= int(input_ids.max()) < V:
            raise ValueError(f"token ids must lie in [0, {V}): got {int(input_ids.min())}..{int(input_ids.max())}")
        x = self.language_model.embed_tokens(input_ids)  # (B, T, C)
        tok = self.config.image_token_id
        n_tokens = 0 if tok is None else int((input_ids == tok).sum())
        error = self.image_input_error(n_tokens, pixel_values, image_index)
        if error:
            raise ValueError(error)
        if pixel_values is not None:
            feats = self.image_features(pixel_values).to(x.dtype)  # (tiles * tokens_per_tile, C)
            if image_index is not None:
                feats = feats.index_select(0, image_index)  # backward sums each row's uses
            return x.masked_scatter((input_ids == tok)[..., None], feats)
        if self.vision_model is not None and self.training:
            # In training mode a batch without images still runs the vision tower on one blank tile, weighted 0:
            # every parameter then takes part in every forward and backward, so data-parallel ranks always gather
            # and reduce the same parameters whatever their batches hold (a rank that skipped the tower would stall
            # the others), frozen tower or not, with or without grad. Inference (eval mode) skips it.
            v = self.config.vision
            blank = torch.zeros(1, v.num_channels, v.image_size, v.image_size, dtype=x.dtype, device=x.device)
            x = x + 0.0 * self.image_features(blank).sum()
        return x

    def hidden(self, input_ids, pixel_values=None, positions=None, cache=None, slots=None):
        """Final hidden states (B, T, C), before the LM head (what the fused log-prob/entropy kernel consumes)."""
        return self.language_model(self.embed(input_ids, pixel_values), positions, cache, slots)

    def forward(self, input_ids, pixel_values=None, targets=None, temperature: float = 1.0, positions=None,
                cache=None, slots=None, image_index=None):
        """Without `targets`: logits (B, T, V) in fp32 (fp64 for an fp64 model). With `targets` (B, T), the token
        each position predicts (entropy.IGNORE_INDEX where none): per-token (logprobs, entropy) of
        softmax(logits / temperature), each (B, T) fp32, from the fused kernel on the final hidden states and the
        head weight, never the full logits. They are computed here rather than by the caller because a
        data-parallel wrapper (FSDP2) gathers a module's weights only while its forward runs: outside it the head
        weight is a shard. `image_index`: see `embed`."""
        h = self.language_model(self.embed(input_ids, pixel_values, image_index), positions, cache, slots)
        if targets is None:
            return self.language_model.logits(h)
        B, T, C = h.shape
        logprobs, entropy = logprob_entropy(h.reshape(B * T, C), self.language_model.head_weight,
                                            targets.reshape(B * T), temperature)
        # Copies, not views: FSDP2 hooks a module's outputs for backward, and an in-place op on a view output would
        # drop that hook (torch warns); B x T floats cost nothing next to the forward.
        return logprobs.view(B, T).clone(), entropy.view(B, T).clone()

    @torch.no_grad()
    def init_weights(self, seed: int = 0):
        """Random init for training from scratch (after building on meta and `to_empty`)."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("bias") or "class_embedding" in name:
                init = torch.zeros(p.shape)
            elif p.ndim == 1:  # norm weights, layer scales
                scale = self.config.vision.initializer_factor if name.endswith(("ls1", "ls2")) else 1.0
                init = torch.full(p.shape, scale)
            else:
                init = torch.randn(p.shape, generator=g) * 0.02
            p.copy_(init)

    @classmethod
    def from_config(cls, config: VLMConfig, dtype=torch.float32, device="cpu", seed: int = 0) -> "VLM":
        """A randomly initialised model: built on meta, materialised on `device`, then initialised."""
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device=device)
        model.init_weights(seed)
        return model.to(dtype)


def tiny_config(vocab_size: int, image_token_id: int | None = None, image_size: int = 56) -> VLMConfig:
    """~0.13M parameters with a word-level vocabulary: what the tests and the CPU default train.
    56px tiles of 14px patches -> 4 tokens per tile."""
    return VLMConfig(llm=LLMConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, rope_theta=1e4),
                     vision=ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, image_size=image_size, patch_size=14),
                     image_token_id=image_token_id, max_dynamic_patch=6)
