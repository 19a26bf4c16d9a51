"""rollout.py against slow references: greedy decoding vs full recompute and vs transformers' `generate` (text and
image prompts, loaded from the same checkpoint), log-probs vs entropy.logprob_entropy recomputed on the finished
sequences, continuous batching + prefix sharing vs one request at a time, seeds, bans, stops and bad input."""
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import Qwen2Config, Qwen2ForCausalLM

import checkpoint as C
import model as M
from entropy import logprob_entropy
from conftest import hf_greedy, image_prompt, make_hf_internvl, randomize, text_config
from data import build_prompt, special_ids
import rollout as R
from rollout import Request, Sampler, sample, uniform
from torch._dynamo.eval_frame import _debug_get_cache_entry_list

SEED = int(os.environ.get("ROLLOUT_TEST_SEED", 0))  # the random models' seed (the assertions hold for any)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory, tok):
    """A tiny random Qwen2 written by transformers, and ours loaded from that checkpoint."""
    path = tmp_path_factory.mktemp("qwen")
    torch.manual_seed(SEED)  # transformers initialises from the global generator
    cfg = Qwen2Config(**{k: v for k, v in text_config(tok.get_vocab_size(), False).items() if k != "model_type"})
    hf = randomize(Qwen2ForCausalLM(cfg), seed=5).eval()
    hf.save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    return hf, C.load_model(path)


@pytest.fixture(scope="module")
def internvl(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("internvl")
    torch.manual_seed(SEED)
    hf = make_hf_internvl(tok, "300m", False, path)
    return hf, C.load_model(path)


def text_request(tok, config, question, **kw) -> Request:
    return Request(build_prompt(tok, config, question)[0], **kw)


def image_request(tok, config, size, **kw) -> Request:
    ids, pixels = image_prompt(tok, config, size)
    return Request(ids[0].tolist(), pixels, **kw)


def mixed_requests(tok, config, **kw) -> list[Request]:
    """Prompts of different lengths, two with images of different tile counts (3 and 1), when the model has eyes."""
    reqs = [text_request(tok, config, q, **kw) for q in ("how many", "red squares are there in the image answer",
                                                         "is there one")]
    if config.vision is not None:
        reqs[1:1] = [image_request(tok, config, (112, 56), **kw), image_request(tok, config, (56, 56), **kw)]
    return reqs


def greedy_reference(model, r: Request, n: int, banned, stop) -> list[int]:
    """Full recompute, no cache: argmax over the allowed ids, one token at a time."""
    ids = list(r.ids)
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids]), r.pixel_values)[0, -1]
        logits[banned] = float("-inf")
        ids.append(int(logits.argmax()))
        if ids[-1] in stop:
            break
    return ids[len(r.ids):]


@pytest.mark.parametrize("which", ["qwen", "internvl"])
def test_greedy_matches_full_recompute_and_transformers(request, tok, which):
    hf, ours = request.getfixturevalue(which)
    stop, banned = special_ids(tok)
    banned = sorted({*banned, ours.config.image_token_id})
    sampler = Sampler(ours, max_slots=3, max_len=64, stop_ids=stop, banned_ids=banned)
    reqs = mixed_requests(tok, ours.config)
    n = 12
    got = sampler.generate(reqs, num_samples=2, max_new_tokens=n, temperature=0.0)
    for r, (a, b) in zip(reqs, got, strict=True):
        assert a.ids == b.ids and a.logprobs == pytest.approx(b.logprobs, abs=1e-5)  # samples of a prompt agree
        assert a.ids == greedy_reference(ours, r, n, banned, stop)
        ref = hf_greedy(hf, r, n, stop, banned)
        assert a.ids == ref
        assert a.finish_reason == ("stop" if ref[-1] in stop else "length")


@pytest.mark.parametrize("temperature,top_p,top_k", [(0.7, 0.9, 8), (1.0, 1.0, 0), (0.0, 1.0, 0)])
def test_logprobs_match_trainer_recompute(internvl, tok, temperature, top_p, top_k):
    """The sampler's log-probs == entropy.logprob_entropy on the finished sequences (the GRPO mismatch metric)."""
    _, model = internvl
    reqs = mixed_requests(tok, model.config, seed=3)
    out = Sampler(model, max_slots=4, max_len=64).generate(reqs, num_samples=2, max_new_tokens=10,
                                                           temperature=temperature, top_p=top_p, top_k=top_k)
    worst = 0.0
    for r, group in zip(reqs, out, strict=True):
        for c in group:
            with torch.no_grad():
                h = model.hidden(torch.tensor([r.ids + c.ids]), r.pixel_values)[0]  # (P + n, C)
                P = len(r.ids)
                lp, _ = logprob_entropy(h[P - 1:P - 1 + len(c.ids)], model.language_model.head_weight,
                                        torch.tensor(c.ids), temperature=temperature or 1.0)
            worst = max(worst, (lp - torch.tensor(c.logprobs)).abs().max().item())
            assert all(x <= 0 for x in c.logprobs)
    assert worst <= 1e-4


def test_continuous_batching_and_prefix_sharing_match_one_at_a_time(internvl, tok):
    """5 requests x 3 samples through 4 slots (slots recycle, groups wait for slots and reuse their prefill, small
    prefill batches, host checks every 3 steps) == each request generated alone with the same seed."""
    _, model = internvl
    stop = [tok.token_to_id("<|im_end|>"), tok.token_to_id("red")]  # "red": frequent enough to end some early
    reqs = mixed_requests(tok, model.config)
    for k, r in enumerate(reqs):
        r.seed, r.max_new_tokens = 100 + k, [9, 4, 14, 6, 11][k]
    sampler = Sampler(model, max_slots=4, max_len=64, stop_ids=stop, prefill_tokens=40, sync_every=3)
    together = sampler.generate(reqs, num_samples=3, max_new_tokens=99, temperature=1.0)
    assert sampler.stats["prefills"] == len(reqs) and sampler.stats["tokens"] == sum(
        len(c.ids) for g in together for c in g)
    for r, group in zip(reqs, together, strict=True):
        alone = Sampler(model, max_slots=3, max_len=64, stop_ids=stop).generate([r], num_samples=3,
                                                                                 max_new_tokens=99)[0]
        for a, b in zip(group, alone, strict=True):
            assert a.ids == b.ids and a.finish_reason == b.finish_reason
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) <= 1e-5
            assert len(a.ids) <= r.max_new_tokens and (a.finish_reason == "stop") == (a.ids[-1] in stop)
    reasons = {c.finish_reason for g in together for c in g}
    assert reasons == {"stop", "length"}
    assert len({tuple(c.ids) for c in together[2]}) > 1  # samples of one prompt differ


def test_seeds(qwen, tok):
    _, model = qwen
    sampler = Sampler(model, max_slots=4, max_len=64)
    reqs = mixed_requests(tok, model.config)
    run = lambda **kw: [[c.ids for c in g] for g in sampler.generate(reqs, num_samples=2, max_new_tokens=16, **kw)]
    a = run(seed=0)
    assert a == run(seed=0)
    assert a != run(seed=1)
    reqs[0].seed = 7  # an explicit per-request seed overrides generate's, whatever the request's index
    b = sampler.generate([reqs[0]], num_samples=2, max_new_tokens=16, seed=123)[0]
    c = sampler.generate([reqs[1], reqs[0]], num_samples=2, max_new_tokens=16)[1]
    assert [x.ids for x in b] == [x.ids for x in c]


def test_banned_ids_are_never_sampled(internvl, tok, monkeypatch):
    """Even when the head prefers the image special tokens by a wide margin; log-probs keep them in the
    normaliser (the trainer's full-vocabulary softmax)."""
    _, model = internvl
    _, banned = special_ids(tok)
    bias = torch.zeros(tok.get_vocab_size())
    bias[banned] = 30.0
    lm = model.language_model
    head = lm.logits
    monkeypatch.setattr(lm, "logits", lambda h: head(h) + bias)
    reqs = mixed_requests(tok, model.config)
    for kw in (dict(temperature=0.0), dict(temperature=1.0), dict(temperature=1.0, top_k=5, top_p=0.9)):
        out = Sampler(model, max_slots=4, max_len=64, banned_ids=banned).generate(reqs, max_new_tokens=8, **kw)
        for r, [c] in zip(reqs, out, strict=True):
            assert not set(c.ids) & set(banned)
            with torch.no_grad():
                logits = model(torch.tensor([r.ids + c.ids]), r.pixel_values)[0, len(r.ids) - 1:-1]
            ref = torch.log_softmax(logits / (kw["temperature"] or 1.0), -1).gather(1, torch.tensor(c.ids)[:, None])
            assert (ref[:, 0] - torch.tensor(c.logprobs)).abs().max() <= 1e-4
            assert max(c.logprobs) < -20  # the banned ids hold nearly all the mass


def test_stop_tokens_and_length(qwen, tok):
    _, model = qwen
    r = text_request(tok, model.config, "how many red squares")
    run = lambda sampler: sampler.generate([r], max_new_tokens=12, temperature=1.0, seed=1)[0][0]
    free = run(Sampler(model, max_slots=2, max_len=64))
    assert free.finish_reason == "length" and len(free.ids) == 12
    firsts = [k for k in range(12) if free.ids[k] not in free.ids[:k]]  # a token's first use; 0 (from the prefill)
    for k in {firsts[0], firsts[-1]}:
        stopped = run(Sampler(model, max_slots=2, max_len=64, stop_ids=[free.ids[k]]))
        assert stopped.ids == free.ids[:k + 1] and stopped.finish_reason == "stop"  # the stop token is included
        assert stopped.logprobs == pytest.approx(free.logprobs[:k + 1], abs=1e-5)
    # The context cap: prompt + completion never exceed max_len.
    capped = run(Sampler(model, max_slots=1, max_len=len(r.ids) + 3))
    assert capped.ids == free.ids[:3] and capped.finish_reason == "length"


def test_bad_requests(internvl, tok):
    _, model = internvl
    sampler = Sampler(model, max_slots=2, max_len=32)
    ok = text_request(tok, model.config, "how many")
    long = Request(ok.ids * 10)
    with pytest.raises(ValueError, match=rf"request 1: prompt of {len(long.ids)} tokens .* max_len 32"):
        sampler.generate([ok, long])
    img = image_request(tok, model.config, (112, 56))  # 3 tiles: 12 image tokens
    with pytest.raises(ValueError, match="request 0: 12 image-context tokens .* 2 image tiles give 8"):
        Sampler(model, max_slots=2, max_len=64).generate([Request(img.ids, img.pixel_values[:2])])
    with pytest.raises(ValueError, match="max_len 600 exceeds the model's max_position_embeddings 512"):
        Sampler(model, max_len=600)


def test_bad_requests_fail_at_the_door(internvl, tok, monkeypatch):
    """Each bad request raises naming its index and the problem before any request's prefill runs."""
    _, model = internvl
    V = model.config.llm.vocab_size
    sampler = Sampler(model, max_slots=2, max_len=64)
    prefills, prefill = [], sampler._prefill
    monkeypatch.setattr(sampler, "_prefill", lambda *a, **k: prefills.append(1) or prefill(*a, **k))
    ok = text_request(tok, model.config, "how many")
    img = image_request(tok, model.config, (112, 56))  # 3 tiles: 12 image tokens
    nan = img.pixel_values.clone()
    nan[2, 0, 5, 5] = float("nan")
    cases = [
        (Request(ok.ids + [V]), rf"request 2: token id {V} at position {len(ok.ids)} is not an int in the "
                                rf"vocabulary \[0, {V}\)"),
        (Request([-1] + ok.ids), r"request 2: token id -1 at position 0 is not an int in the vocabulary"),
        (Request(ok.ids[:2] + [3.0]), "request 2: token id 3.0 at position 2 is not an int"),
        (Request([]), "request 2: empty prompt"),
        (Request(ok.ids, max_new_tokens=0), "request 2: max_new_tokens must be an integer >= 1, got 0"),
        (Request(img.ids, nan), r"request 2: pixel_values must be finite floats \(torch.float32; NaN or inf found"),
        (Request(img.ids, img.pixel_values[0]), r"request 2: pixel_values of shape \(3, 56, 56\): the model takes "
                                                r"\(tiles, 3, 56, 56\) tiles"),
        (Request(img.ids, torch.zeros(3, 3, 112, 112)), r"request 2: pixel_values of shape \(3, 3, 112, 112\)"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            sampler.generate([ok, img, bad, ok])
    for kw, message in [(dict(max_new_tokens=0), "max_new_tokens must be >= 1, got 0"),
                        (dict(temperature=float("nan")), "temperature must be finite and >= 0, got nan"),
                        (dict(temperature=float("inf")), "temperature must be finite and >= 0, got inf"),
                        (dict(temperature=-0.5), "temperature must be finite and >= 0, got -0.5"),
                        (dict(top_p=float("nan")), r"top_p must be in \(0, 1\], got nan"),
                        (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
                        (dict(top_k=-1), "top_k must be >= 0, got -1"),
                        (dict(num_samples=0), "num_samples must be >= 1, got 0")]:
        with pytest.raises(ValueError, match=message):
            sampler.generate([ok], **kw)
    assert prefills == []
    sampler.generate([ok, img], max_new_tokens=1)  # the good requests alone do run (one prefill batch)
    assert prefills == [1]


def test_sample_distribution_and_filters():
    """Inverse-CDF draws from the counter-based uniforms follow softmax(z / T); top-k/top-p/bans cut the support."""
    z = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 3.0])
    n = 40000
    u = uniform(torch.full((n,), 11), torch.arange(n), torch.zeros(n, dtype=torch.long))
    banned = torch.tensor([5], dtype=torch.long)
    tok, lp = sample(z.repeat(n, 1), u, 0.8, 1.0, 0, banned)
    allowed = torch.softmax(torch.cat([z[:5], torch.tensor([-float("inf")])]) / 0.8, -1)
    freq = torch.bincount(tok, minlength=6) / n
    assert (freq - allowed).abs().max() < 0.01 and freq[5] == 0
    assert torch.allclose(lp, torch.log_softmax(z / 0.8, -1)[tok], atol=1e-6)  # full-vocabulary log-probs
    tok, _ = sample(z.repeat(n, 1), u, 1.0, 1.0, 2, banned)
    assert set(tok.tolist()) == {0, 1}
    tok, _ = sample(z.repeat(n, 1), u, 1.0, 0.6, 0, banned)  # p(0) = 0.56 < 0.6 <= p(0) + p(1)
    assert set(tok.tolist()) == {0, 1}
    tok, _ = sample(z.repeat(n, 1), u, 1.0, 0.5, 0, banned)
    assert set(tok.tolist()) == {0}


def test_bf16_cache_under_fp32_weights(internvl, tok):
    """cache_dtype=bf16 with fp32 parameters: every cache tensor is bf16, and greedy decoding still follows the fp32
    model: each token is the argmax of a full fp32 recompute up to bf16 rounding (exact ties aside), and the log-probs
    are within bf16 rounding of the recompute's, yet not equal to them (the decode steps did read bf16 keys)."""
    _, model = internvl
    assert model.language_model.embed_tokens.weight.dtype == torch.float32
    assert Sampler(model, max_slots=1, max_len=8).pool.k[0].dtype == torch.float32  # default: the parameters'
    sampler = Sampler(model, max_slots=4, max_len=64, cache_dtype=torch.bfloat16)
    assert {t.dtype for t in sampler.pool.k + sampler.pool.v} == {torch.bfloat16}
    reqs = mixed_requests(tok, model.config)
    banned = [model.config.image_token_id]  # the Sampler's default ban
    worst_lp, worst_gap = 0.0, 0.0
    for r, [c] in zip(reqs, sampler.generate(reqs, max_new_tokens=8, temperature=0.0), strict=True):
        assert len(c.ids) == 8
        with torch.no_grad():
            logits = model(torch.tensor([r.ids + c.ids]), r.pixel_values)[0, len(r.ids) - 1:-1]  # (8, V) fp32
        ids = torch.tensor(c.ids)[:, None]
        ref = torch.log_softmax(logits, -1).gather(1, ids)[:, 0]  # over the full vocabulary, banned ids included
        worst_lp = max(worst_lp, (ref - torch.tensor(c.logprobs)).abs().max().item())
        allowed = logits.index_fill(1, torch.tensor(banned), float("-inf"))
        worst_gap = max(worst_gap, (allowed.max(-1).values - logits.gather(1, ids)[:, 0]).max().item())
    assert worst_gap <= 2e-2
    assert 1e-4 < worst_lp <= 2e-2  # fp32 caches land at ~1e-6, bf16 ones at ~4e-3 here


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # from inside torch.compile
def test_compiled_decode_matches_eager(tok):
    """compile=True (CUDA graphs on a GPU, inductor C++ on a CPU): the same tokens and the same log-probs as the
    eager step, from one compiled graph although the sequences grow over several pages (on a CPU the width of the
    block table read is a dynamic dimension)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = M.VLM.from_config(M.tiny_config(tok.get_vocab_size(), tok.token_to_id(C.IMG_CONTEXT)), device=device)
    reqs = mixed_requests(tok, model.config)
    for r in reqs:
        r.pixel_values = None if r.pixel_values is None else r.pixel_values.to(device)
    kw = dict(num_samples=3, max_new_tokens=36, temperature=1.0, top_p=0.9)
    eager = Sampler(model, max_slots=4, max_len=64, sync_every=3).generate(reqs, **kw)
    graphs = len(_debug_get_cache_entry_list(Sampler._decode_step.__code__))
    compiled = Sampler(model, max_slots=4, max_len=64, sync_every=3, compile=True).generate(reqs, **kw)
    assert len(_debug_get_cache_entry_list(Sampler._decode_step.__code__)) == graphs + 1
    assert max(len(r.ids) for r in reqs) + 36 > 3 * 16 and min(len(r.ids) for r in reqs) < 32  # 2 to 4 pages read
    assert [[c.ids for c in g] for g in eager] == [[c.ids for c in g] for g in compiled]
    pairs = [(a, b) for g, h in zip(eager, compiled, strict=True) for a, b in zip(g, h, strict=True)]
    assert sum(len(a.logprobs) for a, _ in pairs) == 5 * 3 * 36
    assert max(abs(x - y) for a, b in pairs for x, y in zip(a.logprobs, b.logprobs, strict=True)) <= 1e-5


def test_progress_reports_every_finished_completion(qwen, tok):
    """progress(finished, total, tokens): non-decreasing, ending at every completion and every generated token."""
    _, model = qwen
    calls = []
    sampler = Sampler(model, max_slots=2, max_len=64, stop_ids=[tok.token_to_id("red")])
    out = sampler.generate(mixed_requests(tok, model.config), num_samples=2, max_new_tokens=12, temperature=1.0,
                           progress=lambda *a: calls.append(a))
    total = sum(len(g) for g in out)
    assert calls[-1] == (total, total, sum(len(c.ids) for g in out for c in g))
    assert all(a[0] <= b[0] and a[2] <= b[2] and a[1] == total for a, b in zip(calls, calls[1:]))
    assert len(calls) > 1


def sampled_reference(model, r: Request, seed: int, sample_idx: int, n: int, temperature, top_p, top_k, banned,
                      stop) -> tuple[list[int], list[float]]:
    """Full recompute, no cache: each token drawn by rollout.sample with the counter-based uniform of (seed, sample
    index, step), the sampler's contract whatever its cache does."""
    ids, lps = list(r.ids), []
    for step in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids]), r.pixel_values)[0, -1:].clone()
        u = uniform(torch.tensor([seed]), torch.tensor([sample_idx]), torch.tensor([step]))
        t, lp = sample(logits, u, temperature, top_p, top_k, torch.tensor(banned, dtype=torch.long))
        ids.append(int(t))
        lps.append(float(lp))
        if ids[-1] in stop:
            break
    return ids[len(r.ids):], lps


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # from inside torch.compile
@pytest.mark.parametrize("compile", [False, True])
def test_paged_sampling_matches_full_recompute(internvl, tok, compile):
    """Seeded sampling through the paged pool (pages of 4 tokens: prompts span several, shared by 3 samples, the
    partial last one copied), eager and compiled == a cache-free full recompute drawing with the same counters."""
    _, model = internvl
    stop = [tok.token_to_id("<|im_end|>"), tok.token_to_id("red")]
    banned = [model.config.image_token_id]
    reqs = mixed_requests(tok, model.config)
    sampler = Sampler(model, max_slots=5, max_len=64, stop_ids=stop, page_size=4, compile=compile, sync_every=2)
    kw = dict(temperature=0.8, top_p=0.9, top_k=0)
    out = sampler.generate(reqs, num_samples=3, max_new_tokens=10, seed=4, **kw)
    assert sampler.pool.used == 0
    for i, (r, group) in enumerate(zip(reqs, out, strict=True)):
        for j, c in enumerate(group):
            ids, lps = sampled_reference(model, r, R.mix_seed(4, i), j, 10, kw["temperature"], kw["top_p"],
                                         kw["top_k"], banned, stop)
            assert c.ids == ids and max(abs(a - b) for a, b in zip(c.logprobs, lps, strict=True)) <= 1e-5


def test_preemption_gives_the_ample_pool_tokens(internvl, tok):
    """A pool of 14 pages of 4 tokens for 4 slots of ~30 tokens: sequences are preempted (pages freed), recomputed
    from prompt + generated tokens, resumed, and every completion equals the one an ample pool gives."""
    _, model = internvl
    stop = [tok.token_to_id("<|im_end|>")]
    reqs = mixed_requests(tok, model.config)
    kw = dict(num_samples=2, max_new_tokens=16, temperature=1.0, seed=9)
    ample = Sampler(model, max_slots=4, max_len=64, stop_ids=stop, page_size=4)
    want = ample.generate(reqs, **kw)
    assert ample.stats["preemptions"] == 0
    small = Sampler(model, max_slots=4, max_len=64, stop_ids=stop, page_size=4, kv_tokens=56)
    got = small.generate(reqs, **kw)
    assert small.stats["preemptions"] > 0 and small.stats["recomputes"] > 0
    assert small.stats["peak_pages"] <= 14 == small.stats["pool_pages"] and small.pool.used == 0
    for g, h in zip(want, got, strict=True):
        for a, b in zip(g, h, strict=True):
            assert a.ids == b.ids and a.finish_reason == b.finish_reason
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) <= 1e-5


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # from inside torch.compile
def test_preemption_compiled(qwen, tok):
    """The compiled step under preemptions == the eager step with an ample pool."""
    _, model = qwen
    reqs = mixed_requests(tok, model.config)
    kw = dict(num_samples=3, max_new_tokens=20, temperature=1.0, top_k=8, seed=2)
    want = Sampler(model, max_slots=4, max_len=64, page_size=4).generate(reqs, **kw)
    small = Sampler(model, max_slots=4, max_len=64, page_size=4, kv_tokens=64, compile=True, sync_every=3)
    got = small.generate(reqs, **kw)
    assert small.stats["preemptions"] > 0 and small.pool.used == 0
    assert [[c.ids for c in g] for g in want] == [[c.ids for c in g] for g in got]
    assert max(abs(x - y) for g, h in zip(want, got) for a, b in zip(g, h) for x, y in zip(a.logprobs, b.logprobs)) \
        <= 1e-5


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_pages_return_and_never_collide(qwen, tok, data):
    """Random batches, pool sizes, page sizes and host-check intervals: before every decode step each running
    sequence writes a page it alone holds (reference count 1, in its own row, distinct across slots) and reads only
    pages it holds; after generate every page is back in the pool; and the completions equal an ample pool's."""
    _, model = qwen
    words = "how many red squares are there in the image answer is one two three".split()
    n_req = data.draw(st.integers(1, 4))
    reqs = [text_request(tok, model.config, " ".join(data.draw(st.lists(st.sampled_from(words), max_size=8))),
                         max_new_tokens=data.draw(st.integers(1, 12))) for _ in range(n_req)]
    page_size = data.draw(st.sampled_from([1, 2, 4, 8]))
    slots, num_samples = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 3))
    sync_every = data.draw(st.integers(1, 4))
    stop = [tok.token_to_id("red")]
    longest = max(len(r.ids) + r.max_new_tokens for r in reqs)
    least = (-(-longest // page_size) + 1) * page_size  # what _check demands for the longest request
    kv_tokens = data.draw(st.integers(least, least + 8 * page_size))
    sampler = Sampler(model, max_slots=slots, max_len=64, stop_ids=stop, page_size=page_size, kv_tokens=kv_tokens,
                      sync_every=sync_every)
    step, run_of = sampler._step, {}
    grow = sampler._grow
    sampler._grow = lambda run, until: (run_of.setdefault("run", run), grow(run, until))[1]

    def checked_step(*args):
        run, pool, P = run_of["run"], sampler.pool, page_size
        table, pos, done = sampler.table.tolist(), sampler.pos.tolist(), sampler.done.tolist()
        written = []
        for s, seq in enumerate(run.slots):
            if seq is None or done[s]:
                continue
            assert all(pool.refs[p] >= 1 for p in seq.pages) and table[s][:len(seq.pages)] == seq.pages
            assert pos[s] < len(seq.pages) * P  # reads positions 0..pos, all in its pages
            page = table[s][pos[s] // P]
            assert pool.refs[page] == 1 and page != 0
            written.append(page)
        assert len(written) == len(set(written))
        return step(*args)

    sampler._step = checked_step
    kw = dict(num_samples=num_samples, temperature=1.0, seed=data.draw(st.integers(0, 3)))
    got = sampler.generate(reqs, **kw)
    assert sampler.pool.used == 0 and sum(sampler.pool.refs) == 0
    assert sorted(sampler.pool.free) == list(range(1, sampler.pool.capacity + 1))
    want = Sampler(model, max_slots=4, max_len=64, stop_ids=stop).generate(reqs, **kw)
    assert [[c.ids for c in g] for g in got] == [[c.ids for c in g] for g in want]


def test_a_group_holds_its_prompt_once(qwen, tok):
    """G samples of one P-token prompt, R tokens each: the prompt's full pages are shared and only its partial last
    page is copied, so the pool's peak is the P + G x R tokens of KV rounded to pages, not G x (P + R)."""
    _, model = qwen
    r = text_request(tok, model.config, "how many red squares are there in the image answer is one two three "
                                        "how many red squares are there")
    P, G, R, ps = len(r.ids), 4, 6, 4
    assert P % ps and P > 2 * ps
    sampler = Sampler(model, max_slots=G, max_len=64, page_size=ps)
    out = sampler.generate([r], num_samples=G, max_new_tokens=R, temperature=1.0)
    assert all(len(c.ids) == R for c in out[0])
    # Each sample's row holds its prompt's P // ps shared pages and its own pages through position P + R - 2 (the
    # last token is never fed back).
    own = -(-(P + R - 1) // ps) - P // ps
    assert sampler.stats["peak_pages"] == P // ps + G * own
    assert sampler.stats["peak_pages"] * ps <= P + G * (R + ps) < G * (P + R)
    assert sampler.stats["prefills"] == 1 and sampler.pool.used == 0


def test_pool_is_a_budget_not_slots_times_max_len(tmp_path):
    """64 slots x max_len 32768 on the tiny model: building the sampler grows the RSS by less than 256 MiB (the
    static cache it replaces took 1 GiB)."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc")
    code = """
import torch, model as M
from rollout import Sampler
rss = lambda: int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) * 1024
m = M.VLM.from_config(M.tiny_config(64))
before = rss()
s = Sampler(m, max_slots=64, max_len=32768)
print(rss() - before, s.pool.capacity * s.page_size)
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    grown, tokens = map(int, res.stdout.split())
    assert grown < 256 * 2**20 and tokens >= 32768  # and the pool still holds one full-length sequence


def test_a_request_that_can_never_fit_the_pool_is_refused(qwen, tok):
    _, model = qwen
    sampler = Sampler(model, max_slots=2, max_len=64, page_size=4, kv_tokens=24)
    ok = text_request(tok, model.config, "how many", max_new_tokens=3)
    big = text_request(tok, model.config, "how many red squares are there in the image answer is one two three")
    with pytest.raises(ValueError, match=r"request 1: a prompt of \d+ tokens and up to 30 new ones need \d+ KV "
                                         r"pages of 4 tokens, the pool holds 6: raise the sampler's kv_tokens"):
        sampler.generate([ok, big], max_new_tokens=30)
    assert len(sampler.generate([ok], max_new_tokens=30)[0][0].ids) == 3
