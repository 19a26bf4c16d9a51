"""entropy.py: the chunked torch path and the Triton kernels (interpreted on CPU) against an fp64 oracle; the
critical-token metric against a real BPE tokenizer and a hand computation."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.utils._python_dispatch import TorchDispatchMode

from entropy import (CRITICAL_WORDS, CRITICAL_WORDS_BROAD, IGNORE_INDEX, Chunks, EntropySums, critical_entropy,
                     critical_token_ids, logprob_entropy, logprob_entropy_reference)

# Odd shapes: V = 1000 is no multiple of the vocab split (384) nor of BLOCK_V (128), D = 40 is no power of two,
# N = 37 leaves a remainder of 5 after two 16-token chunks, so every loop runs several times and ends ragged.
N, D, V = 37, 40, 1000
SMALL = Chunks(tokens=16, vocab=384, block_v=128)
# Tolerance on max |error| / max |oracle|. fp32 lands at <= 2e-6 here (one rounding per logit, fp32 sums over
# <= 1000 terms); 2e-5 leaves 10x room and still catches any slip in the formulas, which shows up at O(1).
# bf16 logits are rounded to 2^-9 relative, as in an eager bf16 lm_head: the eager bf16 reference itself lands at
# 1.5e-3 (logprob), 8e-3 (entropy), 1.7e-2 (gradients) on these inputs.
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-2, 6e-2)}  # (logprob and entropy, gradients)


def make_inputs(dtype, seed=0, logit_scale=0.5):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g).to(dtype)
    weight = (logit_scale * torch.randn(V, D, generator=g)).to(dtype)  # logits ~ N(0, 10): peaked, realistic
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.rand(N, generator=g) < 0.25] = IGNORE_INDEX
    return hidden, weight, targets


def run(fn, hidden, weight, targets, a, b, dtype=None, **kw):
    hidden = hidden.to(dtype or hidden.dtype, copy=True).requires_grad_()  # fresh leaves, inputs untouched
    weight = weight.to(dtype or weight.dtype, copy=True).requires_grad_()
    logprob, entropy = fn(hidden, weight, targets, **kw)
    ((a * logprob).sum() + (b * entropy).sum()).backward()
    return logprob.detach(), entropy.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no GPU: Triton is checked in the interpreter only"))])
def test_matches_fp64_reference(device, impl, temperature, dtype):
    hidden, weight, targets = (x.to(device) for x in make_inputs(dtype))
    a, b = torch.randn(N, device=device), torch.randn(N, device=device)  # loss = sum a * logprob + b * entropy
    got = run(logprob_entropy, hidden, weight, targets, a, b, temperature=temperature, impl=impl, chunks=SMALL)
    want = run(logprob_entropy_reference, hidden, weight, targets, a.double(), b.double(), dtype=torch.float64,
               temperature=temperature)
    values, grads = TOL[dtype]
    for name, x, y, tol in zip(["logprob", "entropy", "d hidden", "d weight"], got, want, [values] * 2 + [grads] * 2):
        assert x.dtype == (torch.float32 if name in ("logprob", "entropy") else dtype)
        err = ((x.double() - y).abs().max() / y.abs().max()).item()
        assert err <= tol, f"{name}: max error {err:.2e} of max |value| > {tol:.0e}"
    logprob, entropy, dhidden, _ = got
    masked = targets == IGNORE_INDEX
    assert (logprob <= 0).all() and (entropy >= 0).all()
    assert (logprob[masked] == 0).all() and (entropy[masked] == 0).all() and (dhidden[masked] == 0).all()


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_extreme_logits_stay_finite_and_nonpositive(impl):
    # logits in the hundreds: a naive exp overflows, a sum exp * z cancels; the target is often the argmax, where a
    # target logit computed apart from the max would make logprob slightly positive (the collapsed-run report)
    hidden, weight, targets = make_inputs(torch.float32, seed=1, logit_scale=30.0)
    targets = torch.where(targets == IGNORE_INDEX, targets, (hidden @ weight.T).argmax(1))
    logprob, entropy = logprob_entropy(hidden, weight, targets, impl=impl, chunks=SMALL)
    want_lp, want_ent = logprob_entropy_reference(hidden.double(), weight.double(), targets)
    assert (logprob <= 0).all() and (entropy >= 0).all()
    torch.testing.assert_close(logprob.double(), want_lp, rtol=0, atol=1e-4)
    torch.testing.assert_close(entropy.double(), want_ent, rtol=0, atol=1e-4)


def test_masked_rows_do_not_touch_the_result():
    hidden, weight, targets = make_inputs(torch.float32)
    a, b = torch.randn(N), torch.randn(N)
    base = run(logprob_entropy, hidden, weight, targets, a, b, impl="torch", chunks=SMALL)
    garbage = hidden.clone()
    garbage[targets == IGNORE_INDEX] = 1e30  # would be inf/nan everywhere if masked rows were computed
    other = run(logprob_entropy, garbage, weight, targets, a, b, impl="torch", chunks=SMALL)
    for x, y in zip(base, other):
        assert torch.equal(x, y)


def test_one_output_and_frozen_weight():
    hidden, weight, targets = make_inputs(torch.float32)
    hidden.requires_grad_()
    _, entropy = logprob_entropy(hidden, weight, targets, impl="torch", chunks=SMALL)  # weight needs no grad
    entropy.sum().backward()
    ref = hidden.detach().double().requires_grad_()
    logprob_entropy_reference(ref, weight.double(), targets)[1].sum().backward()
    torch.testing.assert_close(hidden.grad.double(), ref.grad, rtol=1e-5, atol=1e-5)


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_no_tensor_scales_with_tokens_times_vocab():
    n, d, v, chunks = 256, 8, 1000, Chunks(tokens=32, vocab=256)  # N x V = 256K, every other tensor <= 8K
    hidden = torch.randn(n, d, requires_grad=True)
    weight = torch.randn(v, d, requires_grad=True)
    with _LargestTensor() as mode:
        logprob, entropy = logprob_entropy(hidden, weight, torch.randint(0, v, (n,)), impl="torch", chunks=chunks)
        (logprob + entropy).sum().backward()
    assert mode.numel <= max(chunks.tokens * chunks.vocab, v * d, n * d), mode.numel


def test_input_validation():
    hidden, weight, targets = make_inputs(torch.float32)
    cases = [
        (dict(hidden=hidden[None]), "need hidden \\[N, D\\]"),
        (dict(weight=weight[:, :-1]), "need hidden \\[N, D\\]"),
        (dict(targets=targets[:-1]), "need targets \\[N\\]"),
        (dict(targets=targets.int()), "torch.long"),
        (dict(targets=torch.full_like(targets, V)), f"target id {V} outside the vocabulary"),
        (dict(targets=torch.full_like(targets, -1)), "target id -1 outside"),
        (dict(weight=weight.double()), "share a floating dtype"),
        (dict(temperature=0.0), "temperature must be > 0"),
        (dict(impl="cuda"), "impl must be"),
    ]
    for override, message in cases:
        kw = dict(hidden=hidden, weight=weight, targets=targets) | override
        with pytest.raises(ValueError, match=message):
            logprob_entropy(**kw)
    with pytest.raises(ValueError, match="power of two"):
        Chunks(block_v=100)


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    """A real byte-level BPE (Qwen's kind) trained on text where some reflective words are frequent enough to merge
    into one token, each in one spelling only; "alternatively" never appears, so it stays in pieces."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    text = "Wait, but let me check the sum again. Hmm, however the answer is 4.\nwait. Then I wait: 2 + 2 = 4."
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator([text] * 20, trainer)
    return tokenizer


def test_critical_token_ids(bpe):
    ids = critical_token_ids(bpe, CRITICAL_WORDS_BROAD)
    spellings = {"wait": "wait", "Ġwait": "wait", "Wait": "wait", "ĠHmm": "hmm", "Ġhowever": "however",
                 "Ġbut": "but", "Ġcheck": "check"}  # Ġ is the byte-level BPE's leading space
    assert ids == {bpe.token_to_id(token): word for token, word in spellings.items()}
    assert set(CRITICAL_WORDS_BROAD) - set(ids.values()) >= {"alternatively", "double-check"}
    # the default is the paper's three words (R1V3 §5.1, §6.2), as this vocabulary spells them
    assert CRITICAL_WORDS == ("wait", "alternatively", "hmm") and set(CRITICAL_WORDS) < set(CRITICAL_WORDS_BROAD)
    assert critical_token_ids(bpe) == {bpe.token_to_id(t): w for t, w in spellings.items() if w in CRITICAL_WORDS}
    assert bpe.encode("Wait, but").ids[0] in ids and bpe.encode("Wait, but").ids[-1] in ids
    assert critical_token_ids(bpe, words=("hmm",)) == {bpe.token_to_id("ĠHmm"): "hmm"}


def test_critical_entropy_by_hand(bpe):
    ids = critical_token_ids(bpe, CRITICAL_WORDS_BROAD)
    wait, but, check = bpe.token_to_id("Ġwait"), bpe.token_to_id("Ġbut"), bpe.token_to_id("Ġcheck")
    other = bpe.token_to_id("Ġthe")
    token_ids = torch.tensor([[other, wait, other, but, other],
                              [check, other, wait, other, other]])
    entropy = torch.tensor([[0.1, 2.0, 0.3, 1.0, 0.5],
                            [0.6, 0.2, 4.0, 0.4, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1],
                         [1, 1, 0, 1, 0]], dtype=torch.bool)  # the second row's "wait" is padding
    out = critical_entropy(token_ids, entropy, mask, ids)
    assert out.num_critical == 3 and out.num_tokens == 8
    assert out.critical == pytest.approx(2.0 + 1.0 + 0.6) and out.critical_mean == pytest.approx((2.0 + 1.0 + 0.6) / 3)
    total = 0.1 + 2.0 + 0.3 + 1.0 + 0.5 + 0.6 + 0.2 + 0.4
    assert out.total == pytest.approx(total) and out.mean == pytest.approx(total / 8)
    none = critical_entropy(token_ids.flatten(), entropy.flatten(), None, {bpe.token_to_id("ĠHmm")})
    assert math.isnan(none.critical_mean) and none.num_critical == 0 and none.num_tokens == 10
    assert none.critical == 0.0 and none.mean == pytest.approx(entropy.double().mean().item())
    # sums add up across batches (and ranks): the means of the whole are those of one call on everything
    both = out + none
    assert (both.num_critical, both.num_tokens) == (3, 18)
    assert both.critical_mean == pytest.approx(out.critical_mean)
    assert both.mean == pytest.approx((total + entropy.sum().item()) / 18)
    assert math.isnan(EntropySums().critical_mean) and math.isnan(EntropySums().mean)
    with pytest.raises(ValueError, match="shapes differ"):
        critical_entropy(token_ids, entropy.flatten(), None, ids)


def test_critical_token_ids_skip_unknown_words():
    """A word-level vocabulary maps a missing word to one <unk>: that is no spelling of the word."""
    from data import word_tokenizer
    tok = word_tokenizer(["wait", "cells"])
    assert critical_token_ids(tok) == {tok.token_to_id("wait"): "wait"}


NO_TRITON = """
import sys


class NoTriton:  # as on macOS or Windows, where triton has no wheels: `import triton` fails
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "triton":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


sys.meta_path.insert(0, NoTriton())
import torch
import checkpoint, entropy, model as M

assert entropy.triton is None and "triton" not in sys.modules
m = M.VLM.from_config(M.tiny_config(40, 39), seed=5)
ids = torch.randint(0, 39, (2, 11), generator=torch.Generator().manual_seed(0))
targets = ids.roll(-1, dims=1)
targets[:, :4] = entropy.IGNORE_INDEX
with torch.no_grad():
    logprobs, ent = m(ids, targets=targets)  # impl "auto": torch on CPU
    want = entropy.logprob_entropy_reference(m.hidden(ids).flatten(0, 1).double(),
                                             m.language_model.head_weight.double(), targets.flatten())
assert (logprobs.flatten().double() - want[0]).abs().max() <= 1e-5, "logprobs"
assert (ent.flatten().double() - want[1]).abs().max() <= 1e-5, "entropy"
try:
    entropy.logprob_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long), impl="triton")
except RuntimeError as e:
    assert "triton package" in str(e), e
else:
    raise AssertionError("impl='triton' ran without triton")
print("ok")
"""


def test_model_and_fused_forward_without_triton():
    """With triton unimportable, model.py (and checkpoint.py) import, and forward(targets=) runs the torch path and
    matches the full-logits reference; asking for the Triton kernels names the missing package."""
    out = subprocess.run([sys.executable, "-c", NO_TRITON], cwd=Path(__file__).parent.parent, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
