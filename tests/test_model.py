"""model.py and checkpoint.py against independent references: transformers for logits in every checkpoint layout,
resampled position embeddings and other ViT feature layers; an fp64 full-logits copy of the model for the fused
log-prob/entropy path and its gradients; checkpoint round trips, saves that fail midway, file modes, the
checkpoint.py command line, and the errors bad input raises."""
import copy
import json
import os
import re
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import InternVLForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM

import checkpoint as C
import model as M
from conftest import image_prompt, make_hf_internvl, randomize, text_config
from entropy import IGNORE_INDEX, logprob_entropy


@pytest.mark.parametrize("variant,tie", [("300m", False), ("6b", True), ("6b", False)])
def test_internvl_parity_and_layouts(tmp_path, tok, variant, tie):
    hf = make_hf_internvl(tok, variant, tie, tmp_path / "hf")
    ours = C.load_model(tmp_path / "hf")
    assert ours.config.layout == "native" and ours.config.llm.tie_word_embeddings == tie
    ids, pixels = image_prompt(tok, ours.config)
    assert pixels.shape[0] == 3 and int((ids == ours.config.image_token_id).sum()) == 12
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels).logits
        got = ours(ids, pixels)
    assert (got - ref).abs().max().item() <= 1e-4

    # The same weights, written in the remote-code layout by an independent converter, give the same logits.
    write_remote_checkpoint(tmp_path / "hf", tmp_path / "remote", tie)
    remote = C.load_model(tmp_path / "remote")
    assert remote.config.layout == "remote"
    assert remote.config.image_token_id == ours.config.image_token_id  # found through tokenizer.json
    with torch.no_grad():
        assert (remote(ids, pixels) - ref).abs().max().item() <= 1e-4

    # Our own save in either layout round-trips bit-exactly; sharded when the shard size asks for it.
    for src, layout in [(ours, None), (remote, "native"), (ours, "remote")]:
        out = tmp_path / f"save-{src.config.layout}-{layout}"
        C.save_model(src, out, layout=layout, max_shard_bytes=20_000)
        assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer.json").is_file()
        back = C.load_model(out)
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
    ours = C.load_model(tmp_path / "hf")
    assert ours.config.layout == "qwen2" and ours.vision_model is None
    ids = torch.randint(0, 97, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        assert (ours(ids) - ref).abs().max().item() <= 1e-4
    C.save_model(ours, tmp_path / "ours", max_shard_bytes=30_000)
    back = Qwen2ForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert (back(input_ids=ids).logits - ref).abs().max().item() <= 1e-6
    with pytest.raises(ValueError, match="text-only model can only be saved in the qwen2 layout"):
        C.save_model(ours, tmp_path / "x", layout="remote")


@pytest.mark.parametrize("prefill_positions", [True, False])
def test_kv_cache_matches_full_forward(tok, prefill_positions):
    """Prefill into cache slots then decode token by token == one causal forward, including slots != rows; the
    prefill either continues an empty cache (positions given: masked cache attention) or starts a new sequence
    (positions None: causal attention over its own keys, written to the cache on the way)."""
    model = M.VLM.from_config(M.tiny_config(tok.get_vocab_size(), tok.token_to_id(C.IMG_CONTEXT)), seed=3)
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


def test_bad_checkpoints(tmp_path, tok):
    model = M.VLM.from_config(M.tiny_config(tok.get_vocab_size(), tok.token_to_id(C.IMG_CONTEXT)))
    C.save_model(model, tmp_path / "ok")
    shard = tmp_path / "ok" / "model.safetensors"
    sd = load_file(shard)
    sd["language_model.model.embed_tokens.weight"] = torch.zeros(3, 7)
    dropped = "language_model.model.layers.0.mlp.up_proj.weight"
    del sd[dropped]
    sd["language_model.model.bogus.weight"] = torch.zeros(1)
    save_file(sd, shard)
    with pytest.raises(ValueError) as e:
        C.load_model(tmp_path / "ok")
    msg = str(e.value)
    assert "language_model.model.embed_tokens.weight: checkpoint (3, 7) vs model (24, 64)" in msg
    assert f"missing keys: ['{dropped}']" in msg
    assert "language_model.model.bogus.weight" in msg
    # a shard listed in the index but absent
    C.save_model(model, tmp_path / "s", max_shard_bytes=50_000)
    victim = sorted((tmp_path / "s").glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        C.load_model(tmp_path / "s")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        C.load_model(tmp_path / "nowhere")


def test_corrupt_index_and_truncated_safetensors_name_the_file(tmp_path, tok):
    model = M.VLM.from_config(M.tiny_config(tok.get_vocab_size(), tok.token_to_id(C.IMG_CONTEXT)))
    C.save_model(model, tmp_path, max_shard_bytes=50_000)
    index = tmp_path / "model.safetensors.index.json"
    good = index.read_text()
    for text, reason in [("", "JSONDecodeError"), ("[]", "TypeError"), ("{}", "KeyError: 'weight_map'"),
                         ('{"weight_map": []}', "AttributeError"), ('{"weight_map": {"a": 1}}', "TypeError"),
                         ('{"weight_map": {}}', "TypeError")]:
        index.write_text(text)
        with pytest.raises(ValueError, match=rf"^{re.escape(str(index))}: corrupt shard index.*{reason}"):
            C.load_model(tmp_path)
    index.write_text(good)
    C.load_model(tmp_path)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    for cut in (4, 100, len(data) - 10):  # in the header length, in the header, in the tensor data
        shard.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=rf"^{re.escape(str(shard))}: cannot read safetensors file"):
            C.load_model(tmp_path)


def test_resave_in_place_replaces_shards(tmp_path, tok):
    """Saving over a checkpoint with another shard count leaves exactly the new files, and no temporaries."""
    model = M.VLM.from_config(M.tiny_config(tok.get_vocab_size(), tok.token_to_id(C.IMG_CONTEXT)), seed=1)
    C.save_model(model, tmp_path, max_shard_bytes=50_000)
    sharded = sorted(p.name for p in tmp_path.glob("model*"))
    assert len(sharded) > 2 and "model.safetensors.index.json" in sharded
    back = C.load_model(tmp_path)
    C.save_model(back, tmp_path)  # into its own source directory, now as one file
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]
    again = C.load_model(tmp_path).state_dict()
    assert all(torch.equal(v, again[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("variant,size", [("300m", (84, 84)), ("6b", (112, 84))])
def test_vision_tower_resamples_positions_like_transformers(tmp_path, tok, variant, size):
    """Tiles of another size than the checkpoint's 56 px: our bicubic resample of the position grid == transformers'
    InternVL vision tower, which interpolates its position embeddings whenever the input size differs."""
    hf = make_hf_internvl(tok, variant, False, tmp_path)
    ours = C.load_model(tmp_path)
    width, height = size
    pixels = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = hf.model.vision_tower(pixel_values=pixels).last_hidden_state
        got = ours.vision_model(pixels)
    assert got.shape == want.shape == (2, 1 + (width // 14) * (height // 14), 32)
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("feature_layer,blocks", [(-2, 2), (1, 1)])
def test_select_layer_matches_transformers(tmp_path, tok, feature_layer, blocks):
    """A 3-block ViT read at vision_feature_layer -2 (the second block's output) or 1 (the first's): transformers takes
    hidden_states[k], hidden_states[0] being the embeddings; ours runs that many blocks. Kept through a remote save."""
    hf = make_hf_internvl(tok, "300m", False, tmp_path / "hf", vision=dict(num_hidden_layers=3),
                          vision_feature_layer=feature_layer)
    ours = C.load_model(tmp_path / "hf")
    assert ours.config.select_layer == feature_layer and ours.config.vision_layers == blocks
    ids, pixels = image_prompt(tok, ours.config)
    C.save_model(ours, tmp_path / "remote", layout="remote")
    remote = C.load_model(tmp_path / "remote")
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels).logits
        assert (ours(ids, pixels) - ref).abs().max().item() <= 1e-4
        assert (remote(ids, pixels) - ref).abs().max().item() <= 1e-4


def random_tiny(tok, tie: bool, seed: int) -> M.VLM:
    """tiny_config with every parameter perturbed (no zero biases, unit norms or 0.1 layer scales to hide behind)."""
    config = M.tiny_config(tok.get_vocab_size(), tok.token_to_id(C.IMG_CONTEXT))
    config.llm.tie_word_embeddings = tie
    return randomize(M.VLM.from_config(config, seed=seed), seed)


@pytest.mark.parametrize("tie", [False, True])
def test_forward_targets_is_the_fused_kernel_and_its_gradients_match_fp64(tok, tie):
    """VLM.forward(targets=) == entropy.logprob_entropy on model.hidden() and the head weight; the gradients of
    sum(a * logprobs + b * entropy) w.r.t. every parameter (ViT, connector, LLM, head, tied or not) == those of an
    fp64 copy of the model through full logits and log_softmax. Prompt positions are IGNORE_INDEX, T = 0.7."""
    model = random_tiny(tok, tie, seed=7 + tie)
    reference = copy.deepcopy(model).double()
    ids, pixels = image_prompt(tok, model.config)  # (1, 25) with 3 tiles
    ids, pixels = torch.cat([ids, ids.flip(1)]), torch.cat([pixels, pixels.flip(0)])  # (2, 25), 6 tiles
    targets = ids.roll(-1, dims=1)
    targets[:, :ids.shape[1] // 2] = IGNORE_INDEX
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(ids.shape, generator=g), torch.randn(ids.shape, generator=g)
    T = 0.7

    logprobs, entropy = model(ids, pixels, targets=targets, temperature=T)
    assert logprobs.shape == entropy.shape == ids.shape and logprobs.dtype == torch.float32
    assert not logprobs._is_view() and not entropy._is_view()  # FSDP2 warns about (and mishandles) view outputs
    with torch.no_grad():
        h = model.hidden(ids, pixels).flatten(0, 1)  # (B * T, C)
        want = logprob_entropy(h, model.language_model.head_weight, targets.flatten(), temperature=T)
    assert torch.equal(logprobs.detach().flatten(), want[0]) and torch.equal(entropy.detach().flatten(), want[1])
    ((a * logprobs).sum() + (b * entropy).sum()).backward()

    logits = reference(ids, pixels.double()) / T  # (B, T, V), full logits
    assert logits.dtype == torch.float64
    logp = torch.log_softmax(logits, dim=-1)
    valid = targets != IGNORE_INDEX
    ref_lp = torch.where(valid, logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0], 0.0)
    ref_ent = torch.where(valid, -(logp.exp() * logp).sum(-1), 0.0)
    assert (logprobs.detach().double() - ref_lp).abs().max().item() <= 1e-5
    assert (entropy.detach().double() - ref_ent).abs().max().item() <= 1e-5
    ((a.double() * ref_lp).sum() + (b.double() * ref_ent).sum()).backward()
    params = list(model.named_parameters())
    assert {n.split(".")[0] for n, _ in params} == {"vision_model", "mlp1", "language_model"}
    assert any(n == "language_model.lm_head.weight" for n, _ in params) != tie
    for (name, p), q in zip(params, reference.parameters(), strict=True):
        scale = q.grad.abs().max().item()
        assert scale > 0, name  # every parameter takes part: no comparison of zeros with zeros
        err = (p.grad.double() - q.grad).abs().max().item() / scale
        assert err <= 2e-5, f"{name}: gradient error {err:.1e} of max |gradient|"  # fp32 lands at <= 4e-6


def test_text_only_batch_runs_a_blank_tile_in_training_mode(tok):
    """Training on a batch without images still runs the vision tower (one blank tile, weighted 0), so every
    parameter gets a gradient (zero for the vision side) and data-parallel ranks gather and reduce the same
    parameters; the values are those of inference (eval mode), which skips the tower. A frozen tower runs too, and
    so does a no-grad pass in training mode (the trainer's old log-probs): other ranks may be running it."""
    model = random_tiny(tok, False, seed=9)
    runs = []
    model.vision_model.register_forward_hook(lambda *_: runs.append(1))
    ids = torch.randint(10, tok.get_vocab_size(), (2, 7), generator=torch.Generator().manual_seed(2))  # words only
    targets = ids.roll(-1, dims=1)
    model.eval()
    with torch.no_grad():
        want = model(ids, targets=targets)
    assert runs == []
    model.train()
    logprobs, entropy = model(ids, targets=targets)
    assert runs == [1]
    assert torch.equal(logprobs.detach(), want[0]) and torch.equal(entropy.detach(), want[1])
    (logprobs.sum() + entropy.sum()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        if name.startswith(("vision_model.", "mlp1.")):
            assert not p.grad.any(), name
        else:
            assert p.grad.abs().max() > 0, name
    for p in [*model.vision_model.parameters(), *model.mlp1.parameters()]:
        p.requires_grad_(False)
    with torch.no_grad():
        model(ids, targets=targets)
    assert runs == [1, 1]


def test_bad_model_inputs(tok):
    cfg = M.tiny_config(tok.get_vocab_size(), tok.token_to_id(C.IMG_CONTEXT))
    V = cfg.llm.vocab_size
    model = M.VLM.from_config(cfg)
    ids, pixels = image_prompt(tok, cfg)  # 3 tiles -> 12 image tokens
    nan, inf = pixels.clone(), pixels.clone()
    nan[1, 2, 3, 4], inf[0, 0, 0, 0] = float("nan"), float("inf")
    cases = [
        ((ids, pixels[:2]), "12 image-context tokens .* 2 image tiles give 8 connector features"),
        ((ids,), "12 image-context tokens .* 0 image tiles"),
        ((ids, pixels[0]), r"pixel_values of shape \(3, 56, 56\): the model takes \(tiles, 3, 56, 56\) tiles"),
        ((ids, torch.zeros(3, 3, 112, 112)), r"pixel_values of shape \(3, 3, 112, 112\): the model takes"),
        ((ids, nan), r"pixel_values must be finite floats \(torch.float32; NaN or inf found"),
        ((ids, inf), "pixel_values must be finite floats"),
        ((ids, pixels.long()), r"pixel_values must be finite floats \(torch.int64"),
        ((torch.tensor([[1, 2, V]]),), rf"token ids must lie in \[0, {V}\): got 1..{V}"),
        ((torch.tensor([[5, -1]]),), rf"token ids must lie in \[0, {V}\): got -1..5"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            model(*args)
    text_only = M.VLM.from_config(M.VLMConfig(llm=cfg.llm, vision=None, layout="qwen2"))
    with pytest.raises(ValueError, match="pixel_values given to a text-only model"):
        text_only(torch.tensor([[1, 2]]), pixels)


CONFIG_CASES = [  # (layout of the checkpoint, change to its config.json, what the error must say after the file name)
    ("remote", lambda c: c["llm_config"].update(hidden_size="64"),
     "llm_config.hidden_size must be a positive integer, got '64'"),
    ("native", lambda c: c["text_config"].update(hidden_size="64"),
     "llm_config.hidden_size must be a positive integer, got '64'"),
    ("remote", lambda c: c["llm_config"].update(rms_norm_eps=0), "llm_config.rms_norm_eps must be a positive number"),
    ("remote", lambda c: c["llm_config"].update(rms_norm_eps=-1e-6), "rms_norm_eps must be a positive number"),
    ("remote", lambda c: c["vision_config"].update(layer_norm_eps=float("nan")), "layer_norm_eps must be a positive"),
    ("remote", lambda c: c.update(select_layer=3), "select_layer 3 is outside the vision tower's 2 layers"),
    ("remote", lambda c: c.update(select_layer=-3), "select_layer -3 is outside"),
    ("remote", lambda c: c.update(select_layer=0), "select_layer 0 is outside"),
    ("native", lambda c: c.update(vision_feature_layer=5), "select_layer 5 is outside"),
    ("remote", lambda c: c.update(max_dynamic_patch=0), "config.max_dynamic_patch must be a positive integer, got 0"),
    ("remote", lambda c: c["llm_config"].update(num_attention_heads=0), "llm_config.num_attention_heads must be a"),
    ("remote", lambda c: c["llm_config"].update(num_key_value_heads=0), "llm_config.num_key_value_heads must be a"),
    ("remote", lambda c: c["vision_config"].update(num_attention_heads=0), "vision_config.num_attention_heads must"),
    ("remote", lambda c: c.update(force_image_size=None) or c["vision_config"].update(patch_size=0),
     "vision_config.patch_size must be a positive integer, got 0"),
    ("native", lambda c: c["vision_config"].update(patch_size=[0, 0]), "vision_config.patch_size must be a positive"),
    ("remote", lambda c: c["llm_config"].update(head_dim=0), "llm_config.head_dim must be a positive integer, got 0"),
    ("remote", lambda c: c["llm_config"].update(rope_theta="1e6"), "llm_config.rope_theta must be a positive number"),
    ("remote", lambda c: c["llm_config"].update(tie_word_embeddings="false"),
     "llm_config.tie_word_embeddings must be true or false, got 'false'"),
    ("remote", lambda c: c["llm_config"].pop("vocab_size"), "missing required key 'vocab_size'"),
    ("native", lambda c: c["text_config"].pop("vocab_size"), "missing required key 'vocab_size'"),
    ("remote", lambda c: c.update(vision_config=[32]), "vision_config must be a JSON object, got \\[32\\]"),
    ("remote", lambda c: "[1, 2]", "must hold a JSON object, got list"),
    ("remote", lambda c: "", "not valid JSON"),
    ("remote", lambda c: '{"llm_config": ', "not valid JSON"),
]


def test_bad_config_json_names_file_and_field(tmp_path, tok):
    """Each bad config.json raises a ValueError that starts with the file's path and names the field and value."""
    model = M.VLM.from_config(M.tiny_config(tok.get_vocab_size(), tok.token_to_id(C.IMG_CONTEXT)))
    good = {}
    for layout in ("remote", "native"):
        C.save_model(model, tmp_path / layout, layout=layout)
        assert C.load_model(tmp_path / layout).config.layout == layout  # unchanged, it loads
        good[layout] = (tmp_path / layout / "config.json").read_text()
    for layout, change, message in CONFIG_CASES:
        f = tmp_path / layout / "config.json"
        c = json.loads(good[layout])
        text = change(c)
        f.write_text(text if isinstance(text, str) else json.dumps(c))
        with pytest.raises(ValueError) as e:
            C.read_config(tmp_path / layout)
        assert str(e.value).startswith(f"{f}: ") and re.search(message, str(e.value)), (message, str(e.value))
        with pytest.raises(ValueError, match=re.escape(str(e.value))):
            C.load_model(tmp_path / layout)


@pytest.mark.parametrize("fails_at", ["second shard", "config.json"])
def test_failed_save_in_place_keeps_the_previous_checkpoint(tmp_path, tok, monkeypatch, fails_at):
    """A save over a remote-layout sharded checkpoint, in the native layout, that fails midway leaves the previous
    checkpoint loadable with its own weights and no temporaries; the same save, not failing, replaces it."""
    path = tmp_path / "ckpt"
    C.save_model(M.VLM.from_config(M.tiny_config(tok.get_vocab_size(), tok.token_to_id(C.IMG_CONTEXT)), seed=1),
                 path, max_shard_bytes=50_000)
    model = C.load_model(path)
    old = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    written = []

    def save_file(tensors, filename, metadata=None):
        if fails_at == "second shard" and written:
            raise OSError("disk full")
        written.append(filename)
        real_save_file(tensors, filename, metadata=metadata)

    def write_file(f, text):
        if fails_at == "config.json" and f.name == "config.json":
            raise OSError("disk full")
        real_write_file(f, text)

    real_save_file, real_write_file = C.save_file, C.write_file
    monkeypatch.setattr(C, "save_file", save_file)
    monkeypatch.setattr(C, "write_file", write_file)
    with pytest.raises(OSError, match="disk full"):
        C.save_model(model, path, layout="native", max_shard_bytes=50_000)
    assert len(written) == 1 if fails_at == "second shard" else len(written) > 1  # after some weights were written
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    monkeypatch.undo()
    back = C.load_model(path)
    assert back.config.layout == "remote"
    assert back.state_dict().keys() == old.keys() and all(torch.equal(v, old[k]) for k, v in back.state_dict().items())

    C.save_model(model, path, layout="native")
    back = C.load_model(path)
    assert back.config.layout == "native" and sorted(p.name for p in path.glob("model*")) == ["model.safetensors"]
    new = model.state_dict()
    assert back.state_dict().keys() == new.keys() and all(torch.equal(v, new[k]) for k, v in back.state_dict().items())
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_saved_files_follow_the_umask(tmp_path, tok, umask, mode):
    """Weights get the same permissions as config.json and any file this process creates (safetensors alone would
    write 0600, unreadable by the group a cluster's jobs share)."""
    model = M.VLM.from_config(M.tiny_config(tok.get_vocab_size(), tok.token_to_id(C.IMG_CONTEXT)))
    previous = os.umask(umask)
    try:
        C.save_model(model, tmp_path / "ckpt", max_shard_bytes=50_000)
    finally:
        os.umask(previous)
    modes = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "ckpt").iterdir()}
    assert len(modes) > 3 and {"config.json", "model.safetensors.index.json"} <= modes.keys()
    assert modes == dict.fromkeys(modes, mode)


def test_save_refuses_a_shared_directory_or_a_file(tmp_path, tok):
    model = M.VLM.from_config(M.tiny_config(tok.get_vocab_size(), tok.token_to_id(C.IMG_CONTEXT)))
    (tmp_path / "runs" / "step-1").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"runs holds directories \['step-1'\]"):
        C.save_model(model, tmp_path / "runs")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="file is a file, not a checkpoint directory"):
        C.save_model(model, tmp_path / "file")
    assert (tmp_path / "runs" / "step-1").is_dir() and (tmp_path / "file").read_text() == "x"


def test_unknown_dtype_flag(monkeypatch, capsys):
    """`python checkpoint.py X --dtype foo` stops in argparse, naming the value, before touching X."""
    monkeypatch.setattr(sys, "argv", ["checkpoint.py", "nowhere", "--dtype", "foo"])
    with pytest.raises(SystemExit) as e:
        C.main()
    assert e.value.code == 2 and "argument --dtype: invalid choice: 'foo'" in capsys.readouterr().err


def test_command_line_converts_layout_and_dtype(tmp_path, tok, monkeypatch, capsys):
    """`python checkpoint.py SRC --save OUT --layout native --dtype bfloat16` prints the config and the parameters
    per module and writes a native bf16 checkpoint with the same weights (rounded) and the source's tokenizer."""
    model = M.VLM.from_config(M.tiny_config(tok.get_vocab_size(), tok.token_to_id(C.IMG_CONTEXT)), seed=2)
    C.save_model(model, tmp_path / "src")
    tok.save(str(tmp_path / "src" / "tokenizer.json"))
    argv = ["checkpoint.py", str(tmp_path / "src"), "--save", str(tmp_path / "out"), "--layout", "native",
            "--dtype", "bfloat16"]
    monkeypatch.setattr(sys, "argv", argv)
    C.main()
    printed = capsys.readouterr().out
    for name in ("vision_model", "mlp1", "language_model"):
        count = sum(p.numel() for p in getattr(model, name).parameters())
        assert re.search(rf"{name}\s+{count:,} parameters  bfloat16", printed), printed
    assert "remote layout" in printed and f"hidden_size={model.config.llm.hidden_size}" in printed
    back = C.load_model(tmp_path / "out", dtype=None)
    assert back.config.layout == "native" and (tmp_path / "out" / "tokenizer.json").is_file()
    assert all(torch.equal(v.bfloat16(), back.state_dict()[k]) for k, v in model.state_dict().items())
    monkeypatch.setattr(sys, "argv", ["checkpoint.py", str(tmp_path / "src"), "--layout", "native"])
    with pytest.raises(SystemExit):
        C.main()
    assert "--layout needs --save" in capsys.readouterr().err


def test_unknown_layout(tmp_path, tok):
    model = M.VLM.from_config(M.tiny_config(tok.get_vocab_size(), tok.token_to_id(C.IMG_CONTEXT)))
    with pytest.raises(ValueError, match=r"layout must be one of \('remote', 'native', 'qwen2', 'qwen3'\), got 'hf'"):
        C.save_model(model, tmp_path / "x", layout="hf")
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.saving").exists()
