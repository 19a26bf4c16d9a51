"""model.py against transformers (the independent oracle): logits parity in both checkpoint layouts, checkpoint round
trips, InternVL's tiling algorithm, and the errors bad input must raise."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import InternVLConfig, InternVLForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM

import data as D
import model as M
from conftest import image_prompt, make_hf_internvl, randomize, text_config


@pytest.mark.parametrize("variant,tie", [("300m", False), ("6b", True), ("6b", False)])
def test_internvl_parity_and_layouts(tmp_path, tok, variant, tie):
    hf = make_hf_internvl(tok, variant, tie, tmp_path / "hf")
    ours = M.VLM.from_pretrained(tmp_path / "hf")
    assert ours.config.layout == "native" and ours.config.llm.tie_word_embeddings == tie
    ids, pixels = image_prompt(tok, ours.config)
    assert pixels.shape[0] == 3 and int((ids == ours.config.image_token_id).sum()) == 12
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels).logits
        got = ours(ids, pixels)
    assert (got - ref).abs().max().item() <= 1e-4

    # The same weights, written in the remote-code layout by an independent converter, give the same logits.
    write_remote_checkpoint(tmp_path / "hf", tmp_path / "remote", tie)
    remote = M.VLM.from_pretrained(tmp_path / "remote")
    assert remote.config.layout == "remote"
    assert remote.config.image_token_id == ours.config.image_token_id  # found through tokenizer.json
    with torch.no_grad():
        assert (remote(ids, pixels) - ref).abs().max().item() <= 1e-4

    # Our own save in either layout round-trips bit-exactly; sharded when the shard size asks for it.
    for src, layout in [(ours, None), (remote, "native"), (ours, "remote")]:
        out = tmp_path / f"save-{src.config.layout}-{layout}"
        src.save_pretrained(out, layout=layout, max_shard_bytes=20_000)
        assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer.json").is_file()
        back = M.VLM.from_pretrained(out)
        assert back.config.layout == (layout or src.config.layout)
        a, b = src.state_dict(), back.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # A checkpoint we saved in the native layout still loads in transformers and matches.
    hf2 = InternVLForConditionalGeneration.from_pretrained(tmp_path / "save-remote-native").eval()
    with torch.no_grad():
        assert (hf2(input_ids=ids, pixel_values=pixels).logits - ref).abs().max().item() <= 1e-5


def write_remote_checkpoint(hf_dir, out, tie):
    """transformers-native -> InternVL remote-code layout, written out key by key (independent of model.py)."""
    out.mkdir()
    sd = load_file(hf_dir / "model.safetensors")
    sd = {k.replace("model.language_model.", "language_model.model.").replace("model.vision_tower.", "vision_tower.")
          .replace("model.multi_modal_projector.", "multi_modal_projector."): v for k, v in sd.items()}
    if "lm_head.weight" in sd:
        sd["language_model.lm_head.weight"] = sd.pop("lm_head.weight")
    new = {}
    for k, v in sd.items():
        if k.startswith("language_model."):
            new[k] = v
        elif k.startswith("multi_modal_projector."):
            idx = {"layer_norm": "0", "linear_1": "1", "linear_2": "3"}[k.split(".")[1]]
            new[f"mlp1.{idx}.{k.split('.')[-1]}"] = v
        elif k.startswith("vision_tower.embeddings."):
            name = {"cls_token": "class_embedding", "position_embeddings": "position_embedding"}.get(k.split(".")[2])
            new[f"vision_model.embeddings.{name}" if name else
                f"vision_model.embeddings.patch_embedding.{k.split('.')[-1]}"] = v
        else:  # vision_tower.encoder.layer.{i}.<module...>
            parts = k.split(".")
            i, rest = parts[3], ".".join(parts[4:])
            for a, b in [("attention.projection_layer", "attn.proj"), ("attention.q_norm", "attn.q_norm"),
                         ("attention.k_norm", "attn.k_norm"), ("layernorm_before", "norm1"),
                         ("layernorm_after", "norm2"), ("lambda_1", "ls1"), ("lambda_2", "ls2")]:
                rest = rest.replace(a, b)
            if rest.startswith("attention.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                kind = rest.split(".")[-1]
                base = f"vision_tower.encoder.layer.{i}.attention"
                new[f"vision_model.encoder.layers.{i}.attn.qkv.{kind}"] = torch.cat(
                    [sd[f"{base}.{p}_proj.{kind}"] for p in "qkv"])
                continue
            new[f"vision_model.encoder.layers.{i}.{rest}"] = v
    save_file(new, out / "model.safetensors")
    c = json.loads((hf_dir / "config.json").read_text())
    v, t = c["vision_config"], c["text_config"]
    remote = {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "template": "internvl2_5",
              "downsample_ratio": 0.5, "select_layer": -1, "force_image_size": 56, "ps_version": "v2",
              "dynamic_image_size": True, "use_thumbnail": True, "min_dynamic_patch": 1, "max_dynamic_patch": 6,
              "vision_config": {"architectures": ["InternVisionModel"], "hidden_size": v["hidden_size"],
                                "num_hidden_layers": v["num_hidden_layers"], "image_size": 56, "patch_size": 14,
                                "num_attention_heads": v["num_attention_heads"], "qkv_bias": v["attention_bias"],
                                "intermediate_size": v["intermediate_size"], "qk_normalization": v["use_qk_norm"],
                                "norm_type": v["norm_type"], "layer_norm_eps": v["layer_norm_eps"]},
              "llm_config": {"architectures": ["Qwen2ForCausalLM"], "vocab_size": t["vocab_size"],
                             "hidden_size": t["hidden_size"], "intermediate_size": t["intermediate_size"],
                             "num_hidden_layers": t["num_hidden_layers"], "rms_norm_eps": t["rms_norm_eps"],
                             "num_attention_heads": t["num_attention_heads"], "rope_theta": 10000.0,
                             "num_key_value_heads": t["num_key_value_heads"], "tie_word_embeddings": tie}}
    (out / "config.json").write_text(json.dumps(remote))
    (out / "tokenizer.json").write_text((hf_dir / "tokenizer.json").read_text())


@pytest.mark.parametrize("tie", [False, True])
def test_qwen2_parity_and_roundtrip(tmp_path, tie):
    cfg = Qwen2Config(**{k: v for k, v in text_config(97, tie).items() if k != "model_type"})
    hf = randomize(Qwen2ForCausalLM(cfg), seed=1 + tie).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = M.VLM.from_pretrained(tmp_path / "hf")
    assert ours.config.layout == "qwen2" and ours.vision_model is None
    ids = torch.randint(0, 97, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        assert (ours(ids) - ref).abs().max().item() <= 1e-4
    ours.save_pretrained(tmp_path / "ours", max_shard_bytes=30_000)
    back = Qwen2ForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert (back(input_ids=ids).logits - ref).abs().max().item() <= 1e-6
    with pytest.raises(ValueError, match="text-only model can only be saved in the qwen2 layout"):
        ours.save_pretrained(tmp_path / "x", layout="remote")


@pytest.mark.parametrize("prefill_positions", [True, False])
def test_kv_cache_matches_full_forward(tok, prefill_positions):
    """Prefill into cache slots then decode token by token == one causal forward, including slots != rows; the
    prefill either continues an empty cache (positions given: masked cache attention) or starts a new sequence
    (positions None: causal attention over its own keys, written to the cache on the way)."""
    model = M.VLM.from_config(M.tiny_config(tok.get_vocab_size(), tok.token_to_id(M.IMG_CONTEXT)), seed=3)
    ids = torch.randint(10, tok.get_vocab_size(), (2, 9), generator=torch.Generator().manual_seed(1))  # words only
    lm = model.language_model
    with torch.no_grad():
        full = model(ids)
        cache = M.KVCache(model.config.llm, slots=4, max_len=16)
        slots = torch.tensor([3, 1])
        pre = lm.logits(lm(lm.embed_tokens(ids[:, :5]), torch.arange(5).expand(2, 5) if prefill_positions else None,
                           cache, slots))
        steps = [lm.logits(lm(lm.embed_tokens(ids[:, t:t + 1]), torch.full((2, 1), t), cache, slots))
                 for t in range(5, 9)]
    got = torch.cat([pre, *steps], dim=1)
    assert (got - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.parametrize("H,KV,T", [(4, 2, 1), (4, 2, 3), (6, 1, 2), (3, 3, 1)])
def test_cached_attention_matches_fp64_sdpa(H, KV, T, device):
    """cached_attention (query heads grouped per kv head) == SDPA with enable_gqa in fp64 under a ragged mask."""
    g = torch.Generator().manual_seed(H * 100 + KV * 10 + T)
    B, L, D = 5, 11, 8
    q, k, v = (torch.randn(*shape, generator=g) for shape in ((B, T, H, D), (B, KV, L, D), (B, KV, L, D)))
    last = torch.tensor([0, 3, 10, 7, 5])[:, None] + torch.arange(T) - T + 1  # (B, T) each query's position
    mask = (torch.arange(L) <= last.clamp(min=0)[..., None])[:, None]  # (B, 1, T, L)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.double().transpose(1, 2), k.double(), v.double(), attn_mask=mask, enable_gqa=KV != H)  # (B, H, T, D)
    got = M.cached_attention(*(t.to(device) for t in (q, k, v, mask))).cpu()  # (B, T, H * D)
    assert (got.double() - want.transpose(1, 2).reshape(B, T, H * D)).abs().max().item() <= 1e-6


def reference_tiling(image, tile, min_num, max_num):
    """InternVL's `dynamic_preprocess` + `build_transform`, restated independently for the test."""
    w, h = image.size
    ratios = set()
    for n in range(min_num, max_num + 1):
        for i in range(1, n + 1):
            for j in range(1, n + 1):
                if min_num <= i * j <= max_num:
                    ratios.add((i, j))
    ratios = sorted(ratios, key=lambda x: x[0] * x[1])
    best_diff, best = float("inf"), (1, 1)
    for r in ratios:
        d = abs(w / h - r[0] / r[1])
        if d < best_diff:
            best_diff, best = d, r
        elif d == best_diff and w * h > 0.5 * tile * tile * r[0] * r[1]:
            best = r
    tw, th = tile * best[0], tile * best[1]
    resized = image.resize((tw, th))
    tiles = []
    for i in range(best[0] * best[1]):
        x0, y0 = (i % (tw // tile)) * tile, (i // (tw // tile)) * tile
        tiles.append(resized.crop((x0, y0, x0 + tile, y0 + tile)))
    if len(tiles) != 1:
        tiles.append(image.resize((tile, tile)))
    arr = np.stack([np.asarray(t, dtype=np.float64) / 255.0 for t in tiles])
    arr = (arr - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    return best, arr.transpose(0, 3, 1, 2)


@pytest.mark.parametrize("size,tile,max_num,grid", [
    ((1000, 200), 448, 12, (5, 1)), ((200, 1000), 448, 12, (1, 5)), ((448, 448), 448, 12, (1, 1)),
    ((1000, 1000), 448, 12, (3, 3)),  # the area tie-break: (1,1), (2,2), (3,3) tie on aspect
    ((500, 333), 56, 6, (3, 2)), ((97, 301), 56, 12, (2, 6)), ((640, 480), 56, 12, (4, 3)), ((30, 40), 56, 6, (2, 3)),
])
def test_dynamic_tiling_matches_internvl(size, tile, max_num, grid):
    rng = np.random.default_rng(sum(size))
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    ref_grid, ref = reference_tiling(img, tile, 1, max_num)
    assert D.tile_grid(*size, tile, 1, max_num) == ref_grid == grid
    cfg = M.VLMConfig(vision=M.ViTConfig(image_size=tile, patch_size=14), max_dynamic_patch=max_num)
    got = D.load_image(img, cfg)
    assert got.shape == ref.shape
    assert np.abs(got.double().numpy() - ref).max() < 1e-5


def test_bad_checkpoints(tmp_path, tok):
    model = M.VLM.from_config(M.tiny_config(tok.get_vocab_size(), tok.token_to_id(M.IMG_CONTEXT)))
    model.save_pretrained(tmp_path / "ok")
    shard = tmp_path / "ok" / "model.safetensors"
    sd = load_file(shard)
    sd["language_model.model.embed_tokens.weight"] = torch.zeros(3, 7)
    dropped = "language_model.model.layers.0.mlp.up_proj.weight"
    del sd[dropped]
    sd["language_model.model.bogus.weight"] = torch.zeros(1)
    save_file(sd, shard)
    with pytest.raises(ValueError) as e:
        M.VLM.from_pretrained(tmp_path / "ok")
    msg = str(e.value)
    assert "language_model.model.embed_tokens.weight: checkpoint (3, 7) vs model (24, 64)" in msg
    assert f"missing keys: ['{dropped}']" in msg
    assert "language_model.model.bogus.weight" in msg
    # a shard listed in the index but absent
    model.save_pretrained(tmp_path / "s", max_shard_bytes=50_000)
    victim = sorted((tmp_path / "s").glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        M.VLM.from_pretrained(tmp_path / "s")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        M.VLM.from_pretrained(tmp_path / "nowhere")


def test_bad_images_and_prompts(tmp_path, tok):
    cfg = M.tiny_config(tok.get_vocab_size(), tok.token_to_id(M.IMG_CONTEXT))
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError, match="cannot read image .*corrupt.png"):
        D.build_prompt(tok, cfg, "how many", [bad])
    with pytest.raises(FileNotFoundError, match="image file not found: .*missing.jpg"):
        D.load_image(tmp_path / "missing.jpg", cfg)
    model = M.VLM.from_config(cfg)
    ids, pixels = image_prompt(tok, cfg)  # 3 tiles -> 12 image tokens
    with pytest.raises(ValueError, match="12 image-context tokens .* 2 image tiles give 8 connector features"):
        model(ids, pixels[:2])
    with pytest.raises(ValueError, match="12 image-context tokens .* 0 image tiles"):
        model(ids)
    with pytest.raises(ValueError, match="2 <image> placeholders for 1 images"):
        D.build_prompt(tok, cfg, "<image> and <image>", [Image.new("RGB", (56, 56))])


def test_chat_template():
    text = D.chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}])
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    assert D.expand_image_placeholders("a<image>b", [2], 3) == "a<img>" + "<IMG_CONTEXT>" * 6 + "</img>b"


def test_resave_in_place_replaces_shards(tmp_path, tok):
    """Saving over a checkpoint with another shard count leaves exactly the new files, and no temporaries."""
    model = M.VLM.from_config(M.tiny_config(tok.get_vocab_size(), tok.token_to_id(M.IMG_CONTEXT)), seed=1)
    model.save_pretrained(tmp_path, max_shard_bytes=50_000)
    sharded = sorted(p.name for p in tmp_path.glob("model*"))
    assert len(sharded) > 2 and "model.safetensors.index.json" in sharded
    back = M.VLM.from_pretrained(tmp_path)
    back.save_pretrained(tmp_path)  # into its own source directory, now as one file
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]
    again = M.VLM.from_pretrained(tmp_path).state_dict()
    assert all(torch.equal(v, again[k]) for k, v in model.state_dict().items())
