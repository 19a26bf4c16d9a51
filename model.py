"""The InternVL / Skywork-R1V3 vision-language model in plain PyTorch, with real checkpoint I/O.

InternViT (patch 14, 448px tiles, LayerNorm or RMSNorm, optional qk-norm, layer scale) -> connector `mlp1`
(pixel shuffle 0.5 -> LayerNorm -> Linear -> GELU -> Linear) -> Qwen2 LLM (GQA, RoPE, RMSNorm, SwiGLU, qkv bias).
Follows OpenGVLab/InternVL `modeling_intern_vit.py` + `modeling_internvl_chat.py` (the layout Skywork-R1V3-38B
ships in) and transformers' `InternVLForConditionalGeneration` / `Qwen2ForCausalLM` (the parity oracle in tests).
Also here: the Qwen ChatML template, `<image>` placeholder expansion and InternVL's dynamic tiling.

    python model.py --ckpt /path/to/InternVL3-1B --image cat.jpg    # load, print shapes and one next-token guess
"""
import argparse
import json
import math
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

# -----------------------------------------------------------------------------------------------------------------
# Configs: one dataclass per tower, built from either config.json layout; nothing shape-related is hard-coded.


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
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"vision hidden_size {self.hidden_size} not divisible by {self.num_attention_heads} heads")
        if self.image_size % self.patch_size:
            raise ValueError(f"vision image_size {self.image_size} not divisible by patch_size {self.patch_size}")
        if self.norm_type not in ("layer_norm", "rms_norm"):
            raise ValueError(f"vision norm_type must be 'layer_norm' or 'rms_norm', got {self.norm_type!r}")
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

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{self.num_attention_heads} attention heads not a multiple of "
                             f"{self.num_key_value_heads} key/value heads")


@dataclass
class VLMConfig:
    llm: LLMConfig = field(default_factory=LLMConfig)
    vision: ViTConfig | None = field(default_factory=ViTConfig)  # None: a text-only Qwen2 checkpoint
    downsample_ratio: float = 0.5
    select_layer: int = -1  # which ViT layer feeds the connector (-1: the last)
    image_token_id: int | None = None  # id of <IMG_CONTEXT>; remote-code configs leave it to the tokenizer
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    use_thumbnail: bool = True
    layout: str = "remote"  # checkpoint key/config layout: "remote" (InternVL chat), "native" (transformers), "qwen2"
    source: dict = field(default_factory=dict, repr=False)  # the config.json this came from, kept for saving
    tokens_per_tile: int = field(init=False)

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.vision is None:
            self.tokens_per_tile = 0
            return
        side = self.vision.image_size // self.vision.patch_size
        if side * self.downsample_ratio != int(side * self.downsample_ratio):
            raise ValueError(f"{side}x{side} patches cannot be pixel-shuffled by ratio {self.downsample_ratio}")
        self.tokens_per_tile = int(side * self.downsample_ratio) ** 2  # 448/14=32 -> 16x16 = 256


LAYOUTS = ("remote", "native", "qwen2")


def _pick(d: dict, *names, default=None):
    for n in names:
        if d.get(n) is not None:
            return d[n]
    return default


def _llm_config(d: dict, tie: bool | None) -> LLMConfig:
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    # "dynamic" NTK scaling (some InternVL llm_configs) only changes positions past max_position_embeddings, which
    # the sampler never reaches, so it is plain RoPE here; other scalings change every position.
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", "dynamic", None):
        raise ValueError(f"RoPE scaling {rope} is not supported (only plain RoPE, as in Qwen2/2.5)")
    if d.get("use_sliding_window"):
        raise ValueError("sliding-window attention (use_sliding_window=true) is not supported")
    return LLMConfig(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
        num_hidden_layers=d["num_hidden_layers"], num_attention_heads=d["num_attention_heads"],
        num_key_value_heads=_pick(d, "num_key_value_heads", default=d["num_attention_heads"]),
        head_dim=d.get("head_dim"), rope_theta=float(_pick(rope, "rope_theta", default=d.get("rope_theta", 1e4))),
        rms_norm_eps=d.get("rms_norm_eps", 1e-6), max_position_embeddings=d.get("max_position_embeddings", 32768),
        tie_word_embeddings=bool(tie if tie is not None else d.get("tie_word_embeddings", False)))


def _size(v) -> int:
    return v[0] if isinstance(v, (list, tuple)) else v


def config_from_dict(d: dict) -> VLMConfig:
    """Reads a config.json in the remote-code (`llm_config`), transformers-native (`text_config`) or Qwen2 layout."""
    if "llm_config" in d:
        v, llm = d["vision_config"], d["llm_config"]
        vision = ViTConfig(
            hidden_size=v["hidden_size"], num_hidden_layers=v["num_hidden_layers"],
            num_attention_heads=v["num_attention_heads"], intermediate_size=v["intermediate_size"],
            image_size=_size(_pick(d, "force_image_size", default=v.get("image_size", 448))),
            patch_size=_size(v.get("patch_size", 14)), num_channels=v.get("num_channels", 3),
            qkv_bias=v.get("qkv_bias", True), qk_normalization=v.get("qk_normalization", False),
            norm_type=v.get("norm_type", "layer_norm"), layer_norm_eps=v.get("layer_norm_eps", 1e-6),
            initializer_factor=v.get("initializer_factor", 0.1))
        return VLMConfig(
            llm=_llm_config(llm, None), vision=vision, downsample_ratio=d.get("downsample_ratio", 0.5),
            select_layer=d.get("select_layer", -1), image_token_id=d.get("image_token_id"),
            min_dynamic_patch=d.get("min_dynamic_patch", 1), max_dynamic_patch=d.get("max_dynamic_patch", 12),
            use_thumbnail=d.get("use_thumbnail", True), layout="remote", source=d)
    if "text_config" in d:
        v = d["vision_config"]
        if not v.get("use_mean_pooling", True):
            raise ValueError("vision_config.use_mean_pooling=false adds a final ViT LayerNorm InternVL never uses")
        if d.get("vision_feature_select_strategy", "default") != "default":
            raise ValueError("only vision_feature_select_strategy='default' (drop CLS) is supported")
        vision = ViTConfig(
            hidden_size=v["hidden_size"], num_hidden_layers=v["num_hidden_layers"],
            num_attention_heads=v["num_attention_heads"], intermediate_size=v["intermediate_size"],
            image_size=_size(v.get("image_size", 448)), patch_size=_size(v.get("patch_size", 14)),
            num_channels=v.get("num_channels", 3), qkv_bias=v.get("attention_bias", False),
            qk_normalization=v.get("use_qk_norm", False), norm_type=v.get("norm_type", "layer_norm"),
            layer_norm_eps=v.get("layer_norm_eps", 1e-6), initializer_factor=v.get("layer_scale_init_value", 0.1))
        return VLMConfig(
            llm=_llm_config(d["text_config"], d.get("tie_word_embeddings")), vision=vision,
            downsample_ratio=d.get("downsample_ratio", 0.5), select_layer=d.get("vision_feature_layer", -1),
            image_token_id=d.get("image_token_id"), layout="native", source=d)
    if d.get("model_type") in ("qwen2", "qwen2_5") or "Qwen2ForCausalLM" in d.get("architectures", []):
        return VLMConfig(llm=_llm_config(d, None), vision=None, layout="qwen2", source=d)
    raise ValueError(f"unrecognised config.json: no llm_config/text_config and model_type {d.get('model_type')!r}")


def config_to_dict(cfg: VLMConfig, layout: str) -> dict:
    """The config.json for `layout`; fields we do not model are carried over from the source when layouts agree."""
    keep = dict(cfg.source) if cfg.layout == layout else {}
    sub = lambda name: dict(keep.get(name, {}))
    m = cfg.llm
    llm = dict(vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
               num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
               num_key_value_heads=m.num_key_value_heads, head_dim=m.head_dim, rope_theta=m.rope_theta,
               rms_norm_eps=m.rms_norm_eps, max_position_embeddings=m.max_position_embeddings,
               tie_word_embeddings=m.tie_word_embeddings, hidden_act="silu", model_type="qwen2")
    if layout == "qwen2":
        if cfg.vision is not None:
            raise ValueError("a model with a vision tower cannot be saved in the text-only qwen2 layout")
        return {**keep, **llm, "architectures": ["Qwen2ForCausalLM"]}
    if cfg.vision is None:
        raise ValueError(f"a text-only model can only be saved in the qwen2 layout, not {layout!r}")
    v = cfg.vision
    if layout == "remote":
        vision = dict(hidden_size=v.hidden_size, num_hidden_layers=v.num_hidden_layers,
                      num_attention_heads=v.num_attention_heads, intermediate_size=v.intermediate_size,
                      image_size=v.image_size, patch_size=v.patch_size, num_channels=v.num_channels,
                      qkv_bias=v.qkv_bias, qk_normalization=v.qk_normalization, norm_type=v.norm_type,
                      layer_norm_eps=v.layer_norm_eps, initializer_factor=v.initializer_factor,
                      hidden_act="gelu", model_type="intern_vit_6b", architectures=["InternVisionModel"])
        out = {**keep, "architectures": keep.get("architectures", ["InternVLChatModel"]),
               "model_type": keep.get("model_type", "internvl_chat"),
               "vision_config": {**sub("vision_config"), **vision},
               "llm_config": {**sub("llm_config"), **llm, "architectures": ["Qwen2ForCausalLM"]},
               "downsample_ratio": cfg.downsample_ratio, "select_layer": cfg.select_layer,
               "force_image_size": v.image_size, "min_dynamic_patch": cfg.min_dynamic_patch,
               "max_dynamic_patch": cfg.max_dynamic_patch, "use_thumbnail": cfg.use_thumbnail,
               "dynamic_image_size": True, "ps_version": "v2", "template": keep.get("template", "internvl2_5")}
        if cfg.image_token_id is not None:
            out["image_token_id"] = cfg.image_token_id
        return out
    vision = dict(hidden_size=v.hidden_size, num_hidden_layers=v.num_hidden_layers,
                  num_attention_heads=v.num_attention_heads, intermediate_size=v.intermediate_size,
                  image_size=[v.image_size] * 2, patch_size=[v.patch_size] * 2, num_channels=v.num_channels,
                  attention_bias=v.qkv_bias, use_qk_norm=v.qk_normalization, norm_type=v.norm_type,
                  layer_norm_eps=v.layer_norm_eps, layer_scale_init_value=v.initializer_factor,
                  use_mean_pooling=True, hidden_act="gelu", model_type="internvl_vision")
    if cfg.image_token_id is None:
        raise ValueError("the native layout needs image_token_id (the id of <IMG_CONTEXT>)")
    return {**keep, "architectures": ["InternVLForConditionalGeneration"], "model_type": "internvl",
            "vision_config": {**sub("vision_config"), **vision}, "text_config": {**sub("text_config"), **llm},
            "downsample_ratio": cfg.downsample_ratio, "vision_feature_layer": cfg.select_layer,
            "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu",
            "image_token_id": cfg.image_token_id, "image_seq_length": cfg.tokens_per_tile,
            "tie_word_embeddings": m.tie_word_embeddings}


def tiny_config(vocab_size: int, image_token_id: int | None = None, image_size: int = 56) -> VLMConfig:
    """~0.13M parameters with a word-level vocabulary: what the tests and the CPU default train.
    56px tiles of 14px patches -> 4 tokens per tile."""
    return VLMConfig(llm=LLMConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, rope_theta=1e4),
                     vision=ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, image_size=image_size, patch_size=14),
                     image_token_id=image_token_id, max_dynamic_patch=6)

# -----------------------------------------------------------------------------------------------------------------
# Vision tower: InternViT


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # statistics in fp32 whatever the weights' dtype, as Qwen2 and InternViT do; one fused op, not five
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


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
            grid = patch_pos.float().reshape(1, side, side, C).permute(0, 3, 1, 2)  # (1, C, side, side)
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
# Language model: Qwen2, with a static KV cache written by index


class KVCache:
    """Preallocated keys/values, one (slots, kv_heads, max_len, head_dim) tensor per layer, written by index.
    Shapes never change while decoding, so a decode step can be compiled (CUDA graphs). One tensor per layer rather
    than a single block: a compiled step writes a separate input in place, but copies a whole layer every step
    when the layer is a view into a shared block."""

    def __init__(self, cfg: LLMConfig, slots: int, max_len: int, dtype=torch.float32, device=None):
        shape = (slots, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.max_len = max_len


def rope_cos_sin(positions, head_dim: int, theta: float, dtype):
    """cos/sin for RoPE at integer positions (B, T), computed in fp32 like the reference, then cast."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    freqs = positions[..., None].float() * inv_freq  # (B, T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (B, T, D)
    return emb.cos().to(dtype)[:, :, None], emb.sin().to(dtype)[:, :, None]  # (B, T, 1, D)


def apply_rope(x, cos, sin):  # x (B, T, H, D)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


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


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        H, KV, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, H * D, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, KV * D, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, KV * D, bias=True)
        self.o_proj = nn.Linear(H * D, cfg.hidden_size, bias=False)

    def forward(self, h, cos, sin, positions, cache_kv=None, slots=None, mask=None):
        B, T, _ = h.shape
        H, KV, D = self.cfg.num_attention_heads, self.cfg.num_key_value_heads, self.cfg.head_dim
        q = apply_rope(self.q_proj(h).view(B, T, H, D), cos, sin)  # (B, T, H, D)
        k = apply_rope(self.k_proj(h).view(B, T, KV, D), cos, sin)  # (B, T, KV, D)
        v = self.v_proj(h).view(B, T, KV, D)
        if cache_kv is not None:  # write this call's keys and values at their positions
            ck, cv = cache_kv  # (S, KV, L, D)
            rows = (torch.arange(B, device=h.device) if slots is None else slots)[:, None]  # (B, 1)
            ck[rows, :, positions] = k.to(ck.dtype)  # advanced index -> (B, T, KV, D)
            cv[rows, :, positions] = v.to(cv.dtype)
        if mask is None:  # a sequence from position 0 (training, full recompute, prefill): causal over this call
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, enable_gqa=KV != H).transpose(1, 2)  # (B, T, H, D)
        else:  # continuing a cached sequence: everything in the cache up to each query's position
            if slots is not None:
                ck, cv = ck[slots], cv[slots]  # (B, KV, L, D)
            y = cached_attention(q, ck.to(q.dtype), cv.to(q.dtype), mask)  # (B, T, H * D)
        return self.o_proj(y.reshape(B, T, H * D))


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

    def forward(self, h, cos, sin, positions, cache_kv=None, slots=None, mask=None):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, positions, cache_kv, slots, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class LLM(nn.Module):
    """Qwen2 decoder. `forward` maps input embeddings to final (normed) hidden states; `logits` applies the head."""

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

    def forward(self, x, positions=None, cache: KVCache | None = None, slots=None):
        """x (B, T, C) input embeddings; positions (B, T) absolute positions, None for a new sequence (0..T-1, which
        attends only to itself, causally). With `cache`, batch row b lives in cache slot `slots[b]` (default b) and
        its keys/values are written at `positions[b]`; given positions read the cache up to each query's position."""
        B, T, _ = x.shape
        continuing = cache is not None and positions is not None
        if positions is None:
            positions = torch.arange(T, device=x.device).expand(B, T)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        # Continuing, each query sees the cache positions up to its own: one mask (B, 1, T, L) for all layers. A new
        # sequence needs none: causal SDPA (flash on a GPU) over its own keys, whatever the cache holds further on.
        mask = (torch.arange(cache.k[0].shape[2], device=x.device) <= positions[..., None])[:, None] \
            if continuing else None
        h = x
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, positions, None if cache is None else (cache.k[i], cache.v[i]), slots, mask)
        return self.norm(h)

    def logits(self, h):
        return F.linear(h, self.head_weight).float()  # fp32 before any softmax

# -----------------------------------------------------------------------------------------------------------------
# The whole model


class VLM(nn.Module):
    def __init__(self, config: VLMConfig):
        super().__init__()
        self.config = config
        self.source_dir: str | None = None  # where from_pretrained read it: save_pretrained copies its other files
        v = config.vision
        self.vision_model = ViT(v) if v is not None else None
        self.mlp1 = Connector(v.hidden_size, config.llm.hidden_size, config.downsample_ratio) if v else None
        self.language_model = LLM(config.llm)

    def image_features(self, pixel_values):
        """(tiles, 3, S, S) -> (tiles * tokens_per_tile, C_llm), in tile order."""
        layers = len(self.vision_model.encoder.layers) + self.config.select_layer + 1
        patches = self.vision_model(pixel_values, num_layers=layers)[:, 1:]  # (tiles, P, C), CLS dropped
        return self.mlp1(patches).flatten(0, 1)

    def image_input_error(self, n_tokens: int, n_tiles: int) -> str | None:
        """Why `n_tokens` <IMG_CONTEXT> tokens and `n_tiles` image tiles cannot go together, or None if they can."""
        tok, per_tile = self.config.image_token_id, self.config.tokens_per_tile
        if n_tiles and self.vision_model is None:
            return "pixel_values given to a text-only model"
        if n_tiles and tok is None:
            return "pixel_values given but the config has no image_token_id (<IMG_CONTEXT> id)"
        if n_tokens != n_tiles * per_tile:
            return (f"{n_tokens} image-context tokens (id {tok}) in the prompt but {n_tiles} image tiles give "
                    f"{n_tiles * per_tile} connector features ({per_tile} per tile): prompt and images disagree")
        return None

    def embed(self, input_ids, pixel_values=None):
        """Token embeddings with the connector's outputs in place of the <IMG_CONTEXT> tokens, in order."""
        x = self.language_model.embed_tokens(input_ids)  # (B, T, C)
        tok = self.config.image_token_id
        n_tokens = 0 if tok is None else int((input_ids == tok).sum())
        n_tiles = 0 if pixel_values is None else pixel_values.shape[0]
        error = self.image_input_error(n_tokens, n_tiles)
        if error:
            raise ValueError(error)
        if n_tiles == 0:
            return x
        feats = self.image_features(pixel_values).to(x.dtype)
        return x.masked_scatter((input_ids == tok)[..., None], feats)

    def hidden(self, input_ids, pixel_values=None, positions=None, cache=None, slots=None):
        """Final hidden states (B, T, C), before the LM head (what the fused log-prob/entropy kernel consumes)."""
        return self.language_model(self.embed(input_ids, pixel_values), positions, cache, slots)

    def forward(self, input_ids, pixel_values=None, positions=None, cache=None, slots=None):
        """Logits (B, T, V) in fp32."""
        return self.language_model.logits(self.hidden(input_ids, pixel_values, positions, cache, slots))

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

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu") -> "VLM":
        """Loads a checkpoint directory in any of the three layouts (see `LAYOUTS`); builds on meta, then assigns."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no config.json (not a checkpoint directory)")
        config = config_from_dict(json.loads((path / "config.json").read_text()))
        if config.image_token_id is None and (path / "tokenizer.json").is_file():
            config.image_token_id = load_tokenizer(path).token_to_id(IMG_CONTEXT)
        with torch.device("meta"):
            model = cls(config)
        state = to_internal(read_safetensors(path, device), config.layout, config.llm.tie_word_embeddings)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        theirs = lambda k: _rename(k, KEY_MAPS[config.layout], 0, 1) or k  # report in the file's names
        missing = sorted(theirs(k) for k in set(expected) - set(state))
        unexpected = sorted(theirs(k) for k in set(state) - set(expected))
        bad = sorted(f"{theirs(k)}: checkpoint {tuple(state[k].shape)} vs model {tuple(s)}"
                     for k, s in expected.items() if k in state and state[k].shape != s)
        if missing or unexpected or bad:
            raise ValueError(f"{path}: checkpoint does not match its config.json ({config.layout} layout)\n"
                             f"  missing keys: {missing}\n  unexpected keys: {unexpected}\n  shape mismatches: {bad}")
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
        model.source_dir = str(path)
        return model.eval()

    def save_pretrained(self, path, layout: str | None = None, max_shard_bytes: int = 5 * 2**30):
        """Sharded safetensors + index + config.json in `layout` (default: the one loaded), plus the source
        directory's non-weight files (tokenizer, generation config, remote-code .py) so it loads where it did."""
        layout = layout or self.config.layout
        config = config_to_dict(self.config, layout)  # validates the layout before anything is written
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.source_dir and Path(self.source_dir).resolve() != path.resolve():
            for f in Path(self.source_dir).iterdir():
                if f.is_file() and not _is_weight_file(f.name) and f.name != "config.json":
                    shutil.copy2(f, path / f.name)
        state = from_internal({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, layout,
                              self.config.llm.tie_word_embeddings)
        write_safetensors(state, path, max_shard_bytes)
        (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")

# -----------------------------------------------------------------------------------------------------------------
# Checkpoint keys and files. Our module names are the remote-code ("InternVLChatModel") keys minus the LLM's
# `model.` level; each layout is a list of (ours, theirs) prefix pairs, `{i}` standing for a layer index.

KEY_MAPS = {
    "remote": [("language_model.lm_head.", "language_model.lm_head."), ("language_model.", "language_model.model."),
               ("vision_model.", "vision_model."), ("mlp1.", "mlp1.")],
    "qwen2": [("language_model.lm_head.", "lm_head."), ("language_model.", "model.")],
    "native": [
        ("language_model.lm_head.", "language_model.lm_head."), ("language_model.", "language_model.model."),
        ("vision_model.embeddings.class_embedding", "vision_tower.embeddings.cls_token"),
        ("vision_model.embeddings.patch_embedding.", "vision_tower.embeddings.patch_embeddings.projection."),
        ("vision_model.embeddings.position_embedding", "vision_tower.embeddings.position_embeddings"),
        ("vision_model.encoder.layers.{i}.attn.proj.", "vision_tower.encoder.layer.{i}.attention.projection_layer."),
        ("vision_model.encoder.layers.{i}.attn.", "vision_tower.encoder.layer.{i}.attention."),
        ("vision_model.encoder.layers.{i}.norm1.", "vision_tower.encoder.layer.{i}.layernorm_before."),
        ("vision_model.encoder.layers.{i}.norm2.", "vision_tower.encoder.layer.{i}.layernorm_after."),
        ("vision_model.encoder.layers.{i}.ls1", "vision_tower.encoder.layer.{i}.lambda_1"),
        ("vision_model.encoder.layers.{i}.ls2", "vision_tower.encoder.layer.{i}.lambda_2"),
        ("vision_model.encoder.layers.{i}.mlp.", "vision_tower.encoder.layer.{i}.mlp."),
        ("mlp1.0.", "multi_modal_projector.layer_norm."), ("mlp1.1.", "multi_modal_projector.linear_1."),
        ("mlp1.3.", "multi_modal_projector.linear_2.")],
}
# transformers < 5 wrote native checkpoints with the base model under `model.`; both spellings load.
OLD_NATIVE_PREFIXES = [("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                       ("model.vision_tower.", "vision_tower."),
                       ("model.multi_modal_projector.", "multi_modal_projector.")]


def _rename(key: str, pairs, src: int, dst: int) -> str | None:
    for pair in pairs:
        pattern = "^" + re.escape(pair[src]).replace(r"\{i\}", r"(\d+)")
        m = re.match(pattern, key)
        if m:
            return pair[dst].replace("{i}", m.group(1) if m.groups() else "") + key[m.end():]
    return None


def to_internal(state: dict, layout: str, tied: bool) -> dict:
    """Checkpoint keys of `layout` -> our parameter names. Unknown keys are kept as they are, so the caller's
    unexpected-key report shows them."""
    if layout == "native":
        for old, new in OLD_NATIVE_PREFIXES:
            state = {new + k[len(old):] if k.startswith(old) else k: v for k, v in state.items()}
    out = {}
    for k, v in state.items():
        out[_rename(k, KEY_MAPS[layout], 1, 0) or k] = v
    if tied:  # some writers store the tied head anyway; it is the embedding
        out.pop("language_model.lm_head.weight", None)
    for k in [k for k in out if re.search(r"\.attn\.q_proj\.(weight|bias)$", k)]:  # native q/k/v -> fused qkv
        base, kind = k.rsplit(".q_proj.", 1)
        parts = [out.pop(f"{base}.{p}_proj.{kind}", None) for p in "qkv"]
        if any(p is None for p in parts):
            raise ValueError(f"{base}: q_proj/k_proj/v_proj.{kind} must all be present")
        out[f"{base}.qkv.{kind}"] = torch.cat(parts, dim=0)
    return out


def from_internal(state: dict, layout: str, tied: bool) -> dict:
    if tied:
        state = {k: v for k, v in state.items() if k != "language_model.lm_head.weight"}
    out = {}
    for k, v in state.items():
        if layout == "native" and re.search(r"\.attn\.qkv\.(weight|bias)$", k):  # fused qkv -> q/k/v
            base, kind = k.rsplit(".qkv.", 1)
            for p, t in zip("qkv", v.chunk(3, dim=0)):
                out[_rename(f"{base}.{p}_proj.{kind}", KEY_MAPS[layout], 0, 1)] = t.contiguous()
            continue
        new = _rename(k, KEY_MAPS[layout], 0, 1)
        if new is None:
            raise ValueError(f"parameter {k} has no name in the {layout} layout")
        out[new] = v
    return out


def _is_weight_file(name: str) -> bool:
    return name.endswith((".safetensors", ".safetensors.index.json", ".bin", ".pt", ".pth")) or \
        name == "pytorch_model.bin.index.json"


def read_safetensors(path: Path, device="cpu") -> dict:
    """All tensors of a (possibly sharded) safetensors checkpoint, loaded straight to `device`."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json "
                                f"(only safetensors checkpoints are read)")
    missing = [s for s in shards if not (path / s).is_file()]
    if missing:
        raise FileNotFoundError(f"{path}: shard(s) listed in the index are missing: {missing}")
    state = {}
    for shard in shards:
        with safe_open(path / shard, framework="pt", device=str(device)) as f:
            for k in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                state[k] = f.get_tensor(k)
    return state


def write_safetensors(state: dict, path: Path, max_shard_bytes: int):
    """Shards of at most `max_shard_bytes` (+ index when several). Everything is written under temporary names
    first and renamed at the end, so a crash mid-save never leaves a checkpoint that was there before half-gone."""
    shards, size = [[]], 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += nbytes
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    files = {}
    for name, keys in zip(names, shards):
        save_file({k: state[k] for k in keys}, path / f"{name}.tmp", metadata={"format": "pt"})
        files[name] = keys
    if len(shards) > 1:
        total = sum(v.numel() * v.element_size() for v in state.values())
        weight_map = {k: name for name, keys in files.items() for k in keys}
        (path / "model.safetensors.index.json.tmp").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        names.append("model.safetensors.index.json")
    for old in path.glob("model*.safetensors*"):  # a previous save with another shard count must not linger
        if old.name not in names and not old.name.endswith(".tmp"):
            old.unlink()
    for name in names:
        os.replace(path / f"{name}.tmp", path / name)

# -----------------------------------------------------------------------------------------------------------------
# Text side: tokenizer, Qwen ChatML template, image placeholders

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
IMAGE_PLACEHOLDER = "<image>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", IMG_START, IMG_END, IMG_CONTEXT]


def load_tokenizer(path) -> Tokenizer:
    f = Path(path) / "tokenizer.json" if Path(path).is_dir() else Path(path)
    if not f.is_file():
        raise FileNotFoundError(f"{f}: no tokenizer.json (nanoR1V reads the `tokenizers` JSON format only)")
    return Tokenizer.from_file(str(f))


def word_tokenizer(words) -> Tokenizer:
    """A whitespace word-level tokenizer with the ChatML and image special tokens: tiny tasks and tests."""
    from tokenizers import decoders, models, pre_tokenizers
    words = ["<unk>", *SPECIAL_TOKENS, "system", "user", "assistant", *words]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit()])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def chat_template(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Qwen ChatML: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, then the assistant's opening."""
    out = []
    for m in messages:
        if m["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"unknown chat role {m['role']!r}")
        out.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


def expand_image_placeholders(text: str, tiles_per_image: list[int], tokens_per_tile: int) -> str:
    """Each `<image>` -> `<img>` + `<IMG_CONTEXT>` x (tokens per tile x tiles) + `</img>`, in order."""
    parts = text.split(IMAGE_PLACEHOLDER)
    if len(parts) - 1 != len(tiles_per_image):
        raise ValueError(f"text has {len(parts) - 1} {IMAGE_PLACEHOLDER} placeholders "
                         f"for {len(tiles_per_image)} images")
    out = [parts[0]]
    for n, rest in zip(tiles_per_image, parts[1:]):
        out += [IMG_START, IMG_CONTEXT * (tokens_per_tile * n), IMG_END, rest]
    return "".join(out)


def build_prompt(tokenizer: Tokenizer, config: VLMConfig, question: str, images=(), system: str | None = None,
                 ) -> tuple[list[int], torch.Tensor | None]:
    """Token ids of a one-turn chat prompt (ready for generation) and the images' tiles (or None).
    Without `<image>` placeholders in the question, InternVL's convention puts one per image in front."""
    pixels = [load_image(im, config) for im in images]
    if images and IMAGE_PLACEHOLDER not in question:
        question = "".join(f"{IMAGE_PLACEHOLDER}\n" for _ in images) + question
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    text = expand_image_placeholders(chat_template(messages), [p.shape[0] for p in pixels], config.tokens_per_tile)
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    return ids, (torch.cat(pixels) if pixels else None)

# -----------------------------------------------------------------------------------------------------------------
# Image side: InternVL dynamic tiling

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def tile_grid(width: int, height: int, tile: int, min_num: int, max_num: int) -> tuple[int, int]:
    """(cols, rows) whose aspect ratio is closest to the image's among grids of min_num..max_num tiles. On a tie
    the later grid in order of tile count wins only if the image has more than half its pixel area (InternVL)."""
    grids = sorted({(c, r) for n in range(min_num, max_num + 1) for c in range(1, n + 1) for r in range(1, n + 1)
                    if min_num <= c * r <= max_num}, key=lambda g: g[0] * g[1])
    aspect, best, best_diff = width / height, (1, 1), float("inf")
    for c, r in grids:
        diff = abs(aspect - c / r)
        if diff < best_diff:
            best, best_diff = (c, r), diff
        elif diff == best_diff and width * height > 0.5 * tile * tile * c * r:
            best = (c, r)
    return best


def dynamic_tiles(image: Image.Image, tile: int, min_num: int = 1, max_num: int = 12, thumbnail: bool = True):
    """Resize to the chosen grid, cut row-major tiles, append a whole-image thumbnail when there are several."""
    cols, rows = tile_grid(image.width, image.height, tile, min_num, max_num)
    resized = image.resize((cols * tile, rows * tile), Image.Resampling.BICUBIC)
    tiles = [resized.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile))
             for r in range(rows) for c in range(cols)]
    if thumbnail and len(tiles) > 1:
        tiles.append(image.resize((tile, tile), Image.Resampling.BICUBIC))
    return tiles


def to_pixels(tiles) -> torch.Tensor:
    x = torch.from_numpy(np.stack([np.asarray(t, dtype=np.float32) for t in tiles])) / 255.0  # (N, S, S, 3)
    x = (x - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    return x.permute(0, 3, 1, 2).contiguous()  # (N, 3, S, S)


def load_image(image, config: VLMConfig) -> torch.Tensor:
    """A path or PIL image -> normalised tiles (N, 3, S, S). Missing or corrupt files raise naming the file."""
    if config.vision is None:
        raise ValueError("this model has no vision tower; it cannot take images")
    if not isinstance(image, Image.Image):
        try:
            with Image.open(image) as f:
                f.load()
                image = f.convert("RGB")
        except FileNotFoundError:
            raise FileNotFoundError(f"image file not found: {image}") from None
        except (OSError, SyntaxError, ValueError) as e:  # Pillow's ways of saying "not an image I can decode"
            raise ValueError(f"cannot read image {image}: {e}") from None
    tiles = dynamic_tiles(image.convert("RGB"), config.vision.image_size, config.min_dynamic_patch,
                          config.max_dynamic_patch, config.use_thumbnail)
    return to_pixels(tiles)


def main():
    p = argparse.ArgumentParser(description="Load a checkpoint, print its config and one greedy next token.")
    p.add_argument("--ckpt", required=True, help="checkpoint directory (config.json, safetensors, tokenizer.json)")
    p.add_argument("--image", default=None, help="optional image path")
    p.add_argument("--prompt", default="Describe the image.", help="user message")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32", help="parameter dtype")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = VLM.from_pretrained(args.ckpt, dtype=getattr(torch, args.dtype), device=device)
    tok = load_tokenizer(args.ckpt)
    print(json.dumps(asdict(model.config) | {"source": "..."}, indent=1, default=str))
    ids, pixels = build_prompt(tok, model.config, args.prompt, [args.image] if args.image else [])
    with torch.no_grad():
        logits = model(torch.tensor([ids], device=device),
                       None if pixels is None else pixels.to(device, getattr(torch, args.dtype)))
    print(f"{len(ids)} prompt tokens; greedy next token: {tok.decode([int(logits[0, -1].argmax())])!r}")


if __name__ == "__main__":
    main()
