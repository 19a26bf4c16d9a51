"""Checkpoint I/O for model.py's VLM: config.json in three dialects, key maps, sharded safetensors, atomic saves.

Layouts: "remote" is OpenGVLab InternVL's remote-code `InternVLChatModel` (`modeling_internvl_chat.py`,
`configuration_internvl_chat.py`: `llm_config` / `vision_config`, what Skywork-R1V3-38B and InternVL3.5 ship in);
"native" is transformers' `InternVLForConditionalGeneration` (`text_config`, split q/k/v in the ViT); "qwen2" and
"qwen3" are a text-only transformers `Qwen2ForCausalLM` / `Qwen3ForCausalLM`. The LLM inside "remote" and "native"
is a Qwen2 or a Qwen3 (`LLM_ARCHS`); any other (InternLM2, Llama, a MoE) is refused by name. Any layout loads;
saving writes any of them, with the source's tokenizer beside it. The command line validates a checkpoint and, with
--save, converts it to another layout or dtype.

    python checkpoint.py /path/to/InternVL3-1B   # config summary and parameter counts per module
"""
import argparse
import json
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from model import VLM, LLMConfig, ViTConfig, VLMConfig

IMG_CONTEXT = "<IMG_CONTEXT>"  # the token whose embeddings the connector's outputs replace (config.image_token_id)
LAYOUTS = ("remote", "native", "qwen2", "qwen3")  # the last two: text only, named by the LLM they hold
# The LLMs model.py implements: `architectures` name -> model_type (also the text-only layout's name).
LLM_ARCHS = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
MODEL_TYPES = {"qwen2": "qwen2", "qwen2_5": "qwen2", "qwen3": "qwen3"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # for --dtype flags

# -----------------------------------------------------------------------------------------------------------------
# config.json in each layout's dialect. The dataclasses validate every field; these only translate names.


def _pick(d: dict, *names, default=None):
    for n in names:
        if d.get(n) is not None:
            return d[n]
    return default


def _llm_arch(d: dict) -> str:
    """"qwen2" or "qwen3": the LLM config `d` names by `architectures` (remote llm_config, text-only configs) and/or
    `model_type` (native text_config). Another architecture has other weights (InternLM2's fused wqkv, a MoE's
    experts): refused here by name rather than loaded as a Qwen2 whose keys then fail to match. A config naming
    neither is a Qwen2, as every such config read before Qwen3 support was."""
    archs = d.get("architectures") or []
    names = [*(archs if isinstance(archs, list) else [archs]), *([d["model_type"]] if d.get("model_type") else [])]
    kinds = set()
    for name in names:
        kind = LLM_ARCHS.get(name) or MODEL_TYPES.get(name)
        if kind is None:
            raise ValueError(f"LLM architecture {name!r} is not supported (only {', '.join(LLM_ARCHS)}: "
                             f"model_type {', '.join(sorted(set(MODEL_TYPES.values())))})")
        kinds.add(kind)
    if len(kinds) > 1:
        raise ValueError(f"the LLM config names both a Qwen2 and a Qwen3 ({names})")
    return kinds.pop() if kinds else "qwen2"


def _llm_config(d: dict, tie: bool | None) -> LLMConfig:
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    # "dynamic" NTK scaling (some InternVL llm_configs) only changes positions past max_position_embeddings, which
    # the sampler never reaches, so it is plain RoPE here; other scalings change every position.
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", "dynamic", None):
        raise ValueError(f"RoPE scaling {rope} is not supported (only plain RoPE, as in Qwen2/2.5)")
    if d.get("use_sliding_window"):
        raise ValueError("sliding-window attention (use_sliding_window=true) is not supported")
    tie = d.get("tie_word_embeddings") if tie is None else tie  # native configs keep it at the top level
    qwen3 = _llm_arch(d) == "qwen3"
    bias = d.get("attention_bias", False) if qwen3 else None  # Qwen3Config's default; Qwen2 hard-codes its biases
    return LLMConfig(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
        num_hidden_layers=d["num_hidden_layers"], num_attention_heads=d["num_attention_heads"],
        num_key_value_heads=_pick(d, "num_key_value_heads", default=d["num_attention_heads"]),
        # Qwen3Config's head_dim defaults to 128 whatever the width; Qwen2's to hidden_size / heads (None here)
        head_dim=_pick(d, "head_dim", default=128 if qwen3 else None),
        rope_theta=_pick(rope, "rope_theta", default=d.get("rope_theta", 1e4)),
        rms_norm_eps=d.get("rms_norm_eps", 1e-6), max_position_embeddings=d.get("max_position_embeddings", 32768),
        tie_word_embeddings=False if tie is None else tie,
        **(dict(qkv_bias=bias, o_bias=bias, qk_norm=True) if qwen3 else {}))


def _size(v) -> int:
    return v[0] if isinstance(v, (list, tuple)) else v


def config_from_dict(d: dict, image_token_id: int | None = None) -> VLMConfig:
    """Reads a config.json in the remote-code (`llm_config`), transformers-native (`text_config`) or text-only
    (Qwen2 / Qwen3) layout; `image_token_id` (<IMG_CONTEXT>'s id, from the tokenizer) applies where the config.json
    does not store it."""
    image_token_id = _pick(d, "image_token_id", default=image_token_id)
    for name in ("llm_config", "text_config", "vision_config"):
        if name in d and not isinstance(d[name], dict):
            raise ValueError(f"{name} must be a JSON object, got {d[name]!r}"[:200])
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
            select_layer=d.get("select_layer", -1), image_token_id=image_token_id,
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
            image_token_id=image_token_id, layout="native", source=d)
    if d.get("model_type") is None and not d.get("architectures"):
        raise ValueError("unrecognised config.json: no llm_config/text_config, architectures or model_type")
    return VLMConfig(llm=_llm_config(d, None), vision=None, image_token_id=image_token_id, layout=_llm_arch(d),
                     source=d)


def llm_arch(m: LLMConfig) -> str:
    """The LLM an LLMConfig's attention switches describe, "qwen2" or "qwen3" (what saving names it)."""
    if m.qk_norm and m.qkv_bias == m.o_bias:
        return "qwen3"
    if not m.qk_norm and m.qkv_bias and not m.o_bias:
        return "qwen2"
    raise ValueError(f"no supported LLM has qkv_bias={m.qkv_bias}, o_bias={m.o_bias}, qk_norm={m.qk_norm} "
                     f"(Qwen2: True, False, False; Qwen3: attention_bias twice, True)")


def config_to_dict(cfg: VLMConfig, layout: str) -> dict:
    """The config.json for `layout`; fields we do not model are carried over from the source when layouts agree."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    keep = dict(cfg.source) if cfg.layout == layout else {}
    sub = lambda name: dict(keep.get(name, {}))
    m = cfg.llm
    arch = llm_arch(m)
    architectures = [next(name for name, kind in LLM_ARCHS.items() if kind == arch)]
    llm = dict(vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
               num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
               num_key_value_heads=m.num_key_value_heads, head_dim=m.head_dim, rope_theta=m.rope_theta,
               rms_norm_eps=m.rms_norm_eps, max_position_embeddings=m.max_position_embeddings,
               tie_word_embeddings=m.tie_word_embeddings, hidden_act="silu", model_type=arch,
               **(dict(attention_bias=m.qkv_bias) if arch == "qwen3" else {}))
    if layout in ("qwen2", "qwen3"):
        if cfg.vision is not None:
            raise ValueError(f"a model with a vision tower cannot be saved in the text-only {layout} layout")
        if layout != arch:
            raise ValueError(f"a {architectures[0]} cannot be saved in the {layout} layout (use {arch!r})")
        return {**keep, **llm, "architectures": architectures}
    if cfg.vision is None:
        raise ValueError(f"a text-only model can only be saved in the {arch} layout, not {layout!r}")
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
               "llm_config": {**sub("llm_config"), **llm, "architectures": architectures},
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


def read_config(path) -> VLMConfig:
    """The VLMConfig of a checkpoint directory: its config.json in any layout, plus <IMG_CONTEXT>'s id from
    tokenizer.json when the config does not store it (remote-code checkpoints). Every error names the file."""
    path = Path(path)
    f = path / "config.json"
    if not f.is_file():
        raise FileNotFoundError(f"{path}: no config.json (not a checkpoint directory)")
    try:
        d = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{f}: must hold a JSON object, got {type(d).__name__}")
    image_token_id = None
    if d.get("image_token_id") is None and (path / "tokenizer.json").is_file():
        try:
            image_token_id = Tokenizer.from_file(str(path / "tokenizer.json")).token_to_id(IMG_CONTEXT)
        except Exception as e:  # tokenizers raises its own Exception type for a malformed file
            raise ValueError(f"{path / 'tokenizer.json'}: cannot read tokenizer: {e}") from None
    try:
        config = config_from_dict(d, image_token_id)
    except KeyError as e:
        raise ValueError(f"{f}: missing required key {e.args[0]!r}") from None
    except (ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{f}: {e}") from None
    config.source_dir = str(path)
    return config

# -----------------------------------------------------------------------------------------------------------------
# Checkpoint keys. Our module names are the remote-code ("InternVLChatModel") keys minus the LLM's
# `model.` level; each layout is a list of (ours, theirs) prefix pairs, `{i}` standing for a layer index.

KEY_MAPS = {
    "remote": [("language_model.lm_head.", "language_model.lm_head."), ("language_model.", "language_model.model."),
               ("vision_model.", "vision_model."), ("mlp1.", "mlp1.")],
    "qwen2": [("language_model.lm_head.", "lm_head."), ("language_model.", "model.")],
    "qwen3": [("language_model.lm_head.", "lm_head."), ("language_model.", "model.")],
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

# -----------------------------------------------------------------------------------------------------------------
# safetensors files


def read_safetensors(path: Path, device="cpu") -> dict:
    """All tensors of a (possibly sharded) safetensors checkpoint, loaded straight to `device`."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            if not shards or not all(isinstance(s, str) and s for s in shards):
                raise TypeError(f"shard file names must be non-empty strings, got {shards}"[:200])
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index}: corrupt shard index, need {{\"weight_map\": {{key: file}}}} "
                             f"({type(e).__name__}: {e})") from None
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
        try:
            with safe_open(path / shard, framework="pt", device=str(device)) as f:
                for k in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    state[k] = f.get_tensor(k)
        except Exception as e:  # safetensors' own error type: truncated or corrupt file
            raise ValueError(f"{path / shard}: cannot read safetensors file (truncated or corrupt?): {e}") from None
    return state


def _is_weight_file(name: str) -> bool:
    return name.endswith((".safetensors", ".safetensors.index.json", ".bin", ".pt", ".pth")) or \
        name == "pytorch_model.bin.index.json"


def _readable(f: Path):
    """Permissions as for any file this process creates (safetensors writes 0600: unreadable by the group)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(f, 0o666 & ~umask)


def write_file(f: Path, text: str):
    f.write_text(text)
    _readable(f)


def write_safetensors(state: dict, path: Path, max_shard_bytes: int):
    """Shards of at most `max_shard_bytes` (+ index when several) into the directory `path`."""
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
    for name, keys in zip(names, shards):
        save_file({k: state[k] for k in keys}, path / name, metadata={"format": "pt"})
        _readable(path / name)
    if len(shards) > 1:
        total = sum(v.numel() * v.element_size() for v in state.values())
        weight_map = {k: name for name, keys in zip(names, shards) for k in keys}
        write_file(path / "model.safetensors.index.json",
                   json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")

# -----------------------------------------------------------------------------------------------------------------
# Whole checkpoints


def load_model(path, dtype: torch.dtype | None = torch.float32, device="cpu") -> VLM:
    """Loads a checkpoint directory in any of the layouts (see `LAYOUTS`); builds on meta, then assigns.
    dtype None keeps the dtypes the file stores."""
    path = Path(path)
    config = read_config(path)
    with torch.device("meta"):
        model = VLM(config)
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
    model.load_state_dict({k: v if dtype is None else v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return model.eval()


def save_model(model: VLM, path, layout: str | None = None, max_shard_bytes: int = 5 * 2**30):
    """Sharded safetensors + index + config.json in `layout` (default: the one loaded), plus the source
    directory's non-weight files (tokenizer, generation config, remote-code .py) so it loads where it did.
    Everything is written to a fresh sibling directory that then replaces `path` (two renames), so a crash
    never leaves weights and config.json that disagree, nor a checkpoint that was there before half-gone."""
    layout = layout or model.config.layout
    config = config_to_dict(model.config, layout)  # validates the layout before anything is written
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file, not a checkpoint directory")
    if path.is_dir() and (subdirs := [p.name for p in path.iterdir() if p.is_dir()]):
        raise ValueError(f"{path} holds directories {subdirs}: a checkpoint save replaces the whole directory, "
                         f"so save into a directory of its own")
    tmp, old = path.with_name(path.name + ".saving"), path.with_name(path.name + ".replaced")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for folder in (path, model.config.source_dir):  # keep what sat beside the weights; the source's files win
            if folder and Path(folder).is_dir():
                for f in Path(folder).iterdir():
                    if f.is_file() and not _is_weight_file(f.name) and f.name != "config.json":
                        shutil.copy2(f, tmp / f.name)
        state = from_internal({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, layout,
                              model.config.llm.tie_word_embeddings)
        write_safetensors(state, tmp, max_shard_bytes)
        write_file(tmp / "config.json", json.dumps(config, indent=2) + "\n")
    except BaseException:  # `path` is untouched so far: drop the half-written copy
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def main():
    p = argparse.ArgumentParser(description="Load and validate a checkpoint, print its config and parameter counts; "
                                            "with --save, convert it to another layout or dtype.")
    p.add_argument("ckpt", help="checkpoint directory (config.json, safetensors, optional tokenizer.json)")
    p.add_argument("--save", default=None, help="write the checkpoint to this directory (replaced as a whole)")
    p.add_argument("--layout", choices=LAYOUTS, default=None, help="layout for --save (default: the one read)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="parameter dtype (default: as stored)")
    args = p.parse_args()
    if args.layout and not args.save:
        p.error("--layout needs --save")
    model = load_model(args.ckpt, dtype=None if args.dtype is None else DTYPES[args.dtype])
    c = model.config
    print(f"{args.ckpt}: {c.layout} layout, image_token_id {c.image_token_id}, {c.tokens_per_tile} tokens per tile, "
          f"ViT blocks used {c.vision_layers}, tiles {c.min_dynamic_patch}..{c.max_dynamic_patch}")
    for name, sub in (("llm", c.llm), ("vision", c.vision)):
        print(f"  {name}: " + ("none" if sub is None else ", ".join(f"{k}={v}" for k, v in asdict(sub).items())))
    for name, module in [*model.named_children(), ("total", model)]:  # a text-only model has no vision_model, mlp1
        dtypes = sorted({str(q.dtype).removeprefix("torch.") for q in module.parameters()})
        print(f"  {name:<15}{sum(q.numel() for q in module.parameters()):>16,} parameters  {'/'.join(dtypes)}")
    if args.save:
        save_model(model, args.save, layout=args.layout)
        print(f"saved to {args.save} ({args.layout or c.layout} layout)")


if __name__ == "__main__":
    main()
