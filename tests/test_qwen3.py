"""InternVL3.5 (InternViT + mlp1 + Qwen3) against transformers: logits of tiny random `InternVLForConditionalGeneration`
models with a qwen3 text config (tied and untied, GQA, head_dim != hidden / heads) and of a plain `Qwen3ForCausalLM`;
the fused log-prob head against fp64; the remote-code layout (an independent converter's and our own round trip);
native saves read back by transformers; greedy sampling vs `generate`; LLM architectures we do not implement refused
by name; the published InternVL3.5 shapes in configs/ built on meta.

    python -m pytest -q tests/test_qwen3.py
"""
import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import InternVLConfig, InternVLForConditionalGeneration, Qwen3Config, Qwen3ForCausalLM

import checkpoint as C
import model as M
from conftest import VISION_VARIANTS, hf_greedy, image_prompt, randomize
from data import special_ids
from entropy import IGNORE_INDEX
from rollout import Sampler
from test_model import write_remote_checkpoint
from test_rollout import mixed_requests

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def qwen3_text_config(vocab: int, tie: bool, **kw) -> dict:
    """head_dim 24 with 4 heads of a width-64 model: q/o projections are 96 wide, not 64 (Qwen3 states head_dim)."""
    return dict(model_type="qwen3", vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=tie,
                rope_theta=1e6, max_position_embeddings=512) | kw


def make_hf_internvl3_5(tok, variant: str, tie: bool, path) -> InternVLForConditionalGeneration:
    """conftest.make_hf_internvl with a qwen3 text config: a tiny random InternVL3.5 saved with the tokenizer."""
    seed, variant_config = VISION_VARIANTS[variant]
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=56,
                  patch_size=14, **variant_config)
    cfg = InternVLConfig(vision_config=vision, text_config=qwen3_text_config(tok.get_vocab_size(), tie),
                         image_token_id=tok.token_to_id(C.IMG_CONTEXT), tie_word_embeddings=tie)
    hf = randomize(InternVLForConditionalGeneration(cfg), seed=seed + 100 + tie).eval()
    hf.config._attn_implementation = "eager"
    hf.save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    return hf


def max_diff(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_same_weights(a: M.VLM, b: M.VLM):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("variant,tie", [("300m", False), ("300m", True), ("6b", False)])
def test_internvl3_5_parity_and_layouts(tmp_path, tok, variant, tie):
    hf = make_hf_internvl3_5(tok, variant, tie, tmp_path / "hf")
    ours = C.load_model(tmp_path / "hf")
    m = ours.config.llm
    assert ours.config.layout == "native" and m.tie_word_embeddings == tie and m.rope_theta == 1e6
    assert (m.head_dim, m.qk_norm, m.qkv_bias, m.o_bias) == (24, True, False, False)
    q_norm = ours.language_model.layers[0].self_attn.q_norm.weight
    assert q_norm.shape == (24,) and (q_norm - 1).abs().min() > 0  # randomised: not the trivial all-ones
    ids, pixels = image_prompt(tok, ours.config)
    assert pixels.shape[0] == 3  # two tiles + thumbnail
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels).logits
        got = ours(ids, pixels)
    diff = max_diff(got, ref)
    print(f"native {variant} tie={tie}: max |logits - transformers| {diff:.2e}")
    assert diff <= 1e-5

    # The remote-code layout InternVL3.5 ships, written by test_model's independent converter with a Qwen3 llm_config.
    write_remote_checkpoint(tmp_path / "hf", tmp_path / "remote", tie)
    c = json.loads((tmp_path / "remote" / "config.json").read_text())
    c["llm_config"].update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=24, rope_theta=1e6,
                           max_position_embeddings=512, attention_bias=False)
    (tmp_path / "remote" / "config.json").write_text(json.dumps(c))
    remote = C.load_model(tmp_path / "remote")
    assert remote.config.layout == "remote" and remote.config.llm == m
    with torch.no_grad():
        assert max_diff(remote(ids, pixels), ref) <= 1e-5

    # Our remote save round-trips exactly and names the LLM; our native save loads back in transformers.
    C.save_model(ours, tmp_path / "ours-remote", layout="remote", max_shard_bytes=20_000)
    llm_config = json.loads((tmp_path / "ours-remote" / "config.json").read_text())["llm_config"]
    assert llm_config["architectures"] == ["Qwen3ForCausalLM"] and llm_config["model_type"] == "qwen3"
    back = C.load_model(tmp_path / "ours-remote")
    assert back.config.layout == "remote"
    assert_same_weights(ours, back)
    with torch.no_grad():
        assert torch.equal(back(ids, pixels), got)
    C.save_model(back, tmp_path / "ours-native", layout="native")
    hf2 = InternVLForConditionalGeneration.from_pretrained(tmp_path / "ours-native").eval()
    hf2.config._attn_implementation = "eager"
    with torch.no_grad():
        diff = max_diff(hf2(input_ids=ids, pixel_values=pixels).logits, ref)
    print(f"ours native -> transformers: max |logits - reference| {diff:.2e}")
    assert diff <= 1e-5


@pytest.mark.parametrize("tie,bias", [(False, False), (True, False), (False, True)])
def test_qwen3_text_parity_and_roundtrip(tmp_path, tie, bias):
    """A plain Qwen3ForCausalLM: the text-only "qwen3" layout, saved back as a Qwen3 (attention_bias: q/k/v/o)."""
    cfg = Qwen3Config(**{k: v for k, v in qwen3_text_config(97, tie, attention_bias=bias).items()
                         if k != "model_type"})
    hf = randomize(Qwen3ForCausalLM(cfg), seed=1 + tie + 2 * bias).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = C.load_model(tmp_path / "hf")
    assert ours.config.layout == "qwen3" and ours.vision_model is None
    assert (ours.config.llm.qkv_bias, ours.config.llm.o_bias) == (bias, bias)
    ids = torch.randint(0, 97, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        diff = max_diff(ours(ids), ref)
    print(f"Qwen3ForCausalLM tie={tie} bias={bias}: max |logits - transformers| {diff:.2e}")
    assert diff <= 1e-5
    C.save_model(ours, tmp_path / "ours", max_shard_bytes=30_000)
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["architectures"] == ["Qwen3ForCausalLM"] and saved["model_type"] == "qwen3"
    assert_same_weights(ours, C.load_model(tmp_path / "ours"))
    back = Qwen3ForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert max_diff(back(input_ids=ids).logits, ref) <= 1e-6
    with pytest.raises(ValueError, match="a Qwen3ForCausalLM cannot be saved in the qwen2 layout"):
        C.save_model(ours, tmp_path / "x", layout="qwen2")
    with pytest.raises(ValueError, match="text-only model can only be saved in the qwen3 layout, not 'remote'"):
        C.save_model(ours, tmp_path / "x", layout="remote")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("tie", [False, True])
def test_fused_head_matches_fp64_log_softmax(tmp_path, tok, tie):
    """forward(targets=) on the loaded Qwen3 model == log-softmax of an fp64 copy's full logits, values and entropy;
    the qk-norm weights get gradients."""
    make_hf_internvl3_5(tok, "300m", tie, tmp_path)
    model = C.load_model(tmp_path)
    reference = copy.deepcopy(model).double()
    ids, pixels = image_prompt(tok, model.config)
    ids, pixels = torch.cat([ids, ids.flip(1)]), torch.cat([pixels, pixels.flip(0)])  # (2, T), 6 tiles
    targets = ids.roll(-1, dims=1)
    targets[:, :ids.shape[1] // 2] = IGNORE_INDEX
    T = 0.7
    logprobs, entropy = model(ids, pixels, targets=targets, temperature=T)
    with torch.no_grad():
        logp = torch.log_softmax(reference(ids, pixels.double()) / T, dim=-1)  # (B, T, V) fp64
    valid = targets != IGNORE_INDEX
    ref_lp = torch.where(valid, logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0], 0.0)
    ref_ent = torch.where(valid, -(logp.exp() * logp).sum(-1), 0.0)
    d_lp, d_ent = max_diff(logprobs.detach(), ref_lp), max_diff(entropy.detach(), ref_ent)
    print(f"fused head tie={tie}: max |logprob - fp64| {d_lp:.2e}, |entropy - fp64| {d_ent:.2e}")
    assert d_lp <= 1e-5 and d_ent <= 1e-5
    (logprobs.sum() + entropy.sum()).backward()
    attn = model.language_model.layers[0].self_attn
    assert attn.q_norm.weight.grad.abs().max() > 0 and attn.k_norm.weight.grad.abs().max() > 0


@pytest.fixture(scope="module")
def internvl3_5(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("internvl3_5")
    hf = make_hf_internvl3_5(tok, "300m", False, path)
    return hf, C.load_model(path)


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor on CPU needs a C++ compiler"))])
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # from inside torch.compile
def test_greedy_matches_transformers_generate(internvl3_5, tok, compile):
    """The sampler (static KV cache, eager or compiled decode step) on text and image prompts == transformers'
    greedy `generate` on the same checkpoint."""
    hf, ours = internvl3_5
    stop, banned = special_ids(tok)
    banned = sorted({*banned, ours.config.image_token_id})
    n = 12
    reqs = mixed_requests(tok, ours.config)
    got = Sampler(ours, max_slots=3, max_len=64, stop_ids=stop, banned_ids=banned, compile=compile).generate(
        reqs, num_samples=1, max_new_tokens=n, temperature=0.0)
    for r, (a,) in zip(reqs, got, strict=True):
        assert a.ids == hf_greedy(hf, r, n, stop, banned)


UNSUPPORTED = [  # (layout, change to a good config.json, the architecture the error must name)
    ("remote", lambda c: c["llm_config"].update(architectures=["InternLM2ForCausalLM"]), "InternLM2ForCausalLM"),
    ("remote", lambda c: c["llm_config"].update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe"),
     "Qwen3MoeForCausalLM"),
    ("remote", lambda c: c["llm_config"].update(architectures=["LlamaForCausalLM"], model_type="llama"),
     "LlamaForCausalLM"),
    ("native", lambda c: c["text_config"].update(model_type="qwen3_moe"), "qwen3_moe"),
    ("native", lambda c: c["text_config"].update(model_type="llama"), "llama"),
    ("qwen3", lambda c: c.update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe"),
     "Qwen3MoeForCausalLM"),
    ("qwen3", lambda c: c.update(architectures=["LlamaForCausalLM"], model_type="llama"), "LlamaForCausalLM"),
]


def test_other_llm_architectures_are_refused_by_name(tmp_path, tok):
    vlm = M.VLM.from_config(M.VLMConfig(llm=M.LLMConfig(vocab_size=tok.get_vocab_size(), head_dim=24, qk_norm=True,
                                                        qkv_bias=False),
                                        vision=M.tiny_config(8).vision, image_token_id=tok.token_to_id(C.IMG_CONTEXT)))
    text = M.VLM.from_config(M.VLMConfig(llm=vlm.config.llm, vision=None, layout="qwen3"))
    good = {}
    for layout, model in (("remote", vlm), ("native", vlm), ("qwen3", text)):
        C.save_model(model, tmp_path / layout, layout=layout)
        assert C.load_model(tmp_path / layout).config.llm == model.config.llm  # unchanged, it loads as a Qwen3
        good[layout] = (tmp_path / layout / "config.json").read_text()
    for layout, change, name in UNSUPPORTED:
        f = tmp_path / layout / "config.json"
        c = json.loads(good[layout])
        change(c)
        f.write_text(json.dumps(c))
        with pytest.raises(ValueError) as e:
            C.load_model(tmp_path / layout)
        assert str(e.value).startswith(f"{f}: LLM architecture {name!r} is not supported"), str(e.value)


# (file, billions of parameters of the published checkpoint): InternViT-300M + mlp1 + Qwen3-0.6B / Qwen3-8B, untied
PUBLISHED = [("internvl3_5-1b.json", 1.06), ("internvl3_5-8b.json", 8.5)]


@pytest.mark.parametrize("name,billions", PUBLISHED)
def test_published_configs_build_on_meta(name, billions):
    d = json.loads((CONFIGS / name).read_text())
    config = C.config_from_dict(d)
    assert config.layout == "remote" and C.llm_arch(config.llm) == "qwen3" and config.tokens_per_tile == 256
    with torch.device("meta"):
        model = M.VLM(config)
    n = sum(p.numel() for p in model.parameters()) / 1e9
    print(f"{name}: {n:.3f}B parameters")
    assert abs(n - billions) <= 0.1 * billions
    # the config we would write for it reads back the same
    assert C.config_from_dict(C.config_to_dict(config, "remote")).llm == config.llm
