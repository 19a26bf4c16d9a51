"""verifier.py: a tiny checkpoint whose head makes "yes" (or "no") certain turns rule-wrong but equivalent answers
into accuracy 1 (or leaves them); rule-correct answers never reach it; a verifier that raises or times out leaves the
rule's verdict and counts the error."""
import time

import pytest
import torch

import checkpoint as C
import data as D
import model as M
import reward as R
import verifier as V

WORDS = "yes no Yes No the answer is four 4 5 half 0.5 1/2 question".split()


def certain(word: str, tmp_path) -> str:
    """A text-only Qwen2 checkpoint that answers `word` whatever the prompt: every embedding is the ones vector, the
    blocks add nothing (all their weights zero), so the last hidden state is RMSNorm(ones) = ones, and the head's only
    non-zero row is `word`'s."""
    tok = D.word_tokenizer(WORDS)
    config = M.VLMConfig(llm=M.LLMConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
                         vision=None, layout="qwen2")
    model = M.VLM.from_config(config)
    with torch.no_grad():
        lm = model.language_model
        lm.embed_tokens.weight.fill_(1.0)
        for p in lm.layers.parameters():
            p.zero_()
        lm.norm.weight.fill_(1.0)
        lm.lm_head.weight.zero_()
        lm.lm_head.weight[tok.token_to_id(word)] = 1.0  # logit 32 against 0
    path = tmp_path / f"verifier-{word}"
    C.save_model(model, path)
    tok.save(str(path / "tokenizer.json"))
    return str(path)


ROWS = [{"question": "what is the answer ?", "answer": "1/2", "answer_type": "text"},  # rules: "half" is wrong
        {"question": "what is the answer ?", "answer": "4", "answer_type": "numeric"},
        {"question": "what is the answer ?", "answer": "4", "answer_type": "numeric"}]
RESPONSES = ["<think>the answer</think>\\boxed{half}",  # rule-wrong, equivalent
             "<think>the answer</think>\\boxed{4}",  # rule-correct
             "<think>the answer is four"]  # cut off while thinking: nothing to judge


@pytest.fixture(scope="module")
def yes_ckpt(tmp_path_factory):
    return certain("yes", tmp_path_factory.mktemp("v"))


def test_yes_verifier_rescues_rule_wrong_answers(yes_ckpt):
    v = V.Verifier(yes_ckpt)
    assert v.yes_ids == [v.tokenizer.token_to_id("yes"), v.tokenizer.token_to_id("Yes")]
    cfg = R.RewardConfig()
    rule = R.score_batch(RESPONSES, ROWS, cfg)
    assert [r["accuracy"] for r in rule] == [0.0, 1.0, 0.0]
    calls = []
    judge = v.judge
    v.judge = lambda items: calls.append(items) or judge(items)
    out = R.score_batch(RESPONSES, ROWS, cfg, verifier=v)
    assert [r["accuracy"] for r in out] == [1.0, 1.0, 0.0]
    assert out[0]["reward"] == pytest.approx(0.8 + 0.2) and out[1] == rule[1] and out[2] == rule[2]
    # only the rule-wrong answer with something to judge was asked about, with the question, reference and answer
    assert calls == [[("what is the answer ?", "1/2", "half")]]
    assert v.stats["asked"] == 1 and v.stats["yes"] == 1 and v.stats["errors"] == 0
    # rule-correct answers never reach the verifier
    calls.clear()
    R.score_batch(RESPONSES[1:2], ROWS[1:2], cfg, verifier=v)
    assert calls == []


def test_no_verifier_keeps_rule_verdicts(tmp_path):
    v = V.Verifier(certain("no", tmp_path))
    out = R.score_batch(RESPONSES, ROWS, R.RewardConfig(), verifier=v)
    assert [r["accuracy"] for r in out] == [0.0, 1.0, 0.0] and v.stats["asked"] == 1 and v.stats["yes"] == 0


def test_multiple_choice_shown_with_option_text():
    row = R.validate_row({"question": "pick", "answer": "B", "options": ["one", "two", "three"]})
    assert V.reference_text(row) == "B. two"
    assert V.candidate_text("<think>x</think>\\boxed{C}", row) == "C. three"
    assert V.candidate_text("<think>x</think>I cannot decide", row) == "I cannot decide"  # unparsed: the tail
    assert V.candidate_text("<think>x", row) is None


@pytest.mark.parametrize("failure", ["raise", "timeout"])
def test_failing_verifier_leaves_rule_verdict(yes_ckpt, failure, monkeypatch):
    v = V.Verifier(yes_ckpt, time_limit_s=0.2)

    def broken(prompts):
        if failure == "raise":
            raise RuntimeError("CUDA out of memory")
        while True:  # a forward that never ends: the time limit stops it
            time.sleep(0.01)

    monkeypatch.setattr(v, "_yes", broken)
    out = R.score_batch(RESPONSES, ROWS, R.RewardConfig(), verifier=v)
    assert [r["accuracy"] for r in out] == [0.0, 1.0, 0.0] and all(r["error"] is None for r in out)
    assert v.stats["errors"] == 1 and v.stats["failed"] == 1 and v.stats["yes"] == 0
    assert ("out of memory" if failure == "raise" else "AnswerTimeout") in v.stats["last_error"]


def test_verifier_uses_its_chat_template(yes_ckpt, tmp_path):
    import shutil
    path = tmp_path / "templated"
    shutil.copytree(yes_ckpt, path)
    (path / "chat_template.jinja").write_text(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")
    v = V.Verifier(path)
    text = v.tokenizer.decode(v.prompt_ids("q", "4", "four"), skip_special_tokens=False)
    assert text.endswith("<|im_start|> assistant")  # the think block is never opened for a yes/no verdict
    assert v.judge([("q", "4", "four")]) == [True]


def test_trainer_score_asks_the_verifier_and_reads_opened_think(yes_ckpt):
    """train_rl.score with --verifier: a rule-wrong but equivalent answer earns the accuracy weight; a prompt that
    opened <think> gives its responses their <think> back (format 1)."""
    from types import SimpleNamespace

    import train_rl as T
    from rollout import Completion
    tok = D.word_tokenizer(WORDS + ["<think>", "</think>", "\\boxed{half}", "\\boxed{4}"])
    rows = [R.validate_row(r) for r in ROWS[:2]]
    cfg = T.TrainConfig(group_size=1, verifier=yes_ckpt, overlong_buffer=0, reward_workers=1)
    run = SimpleNamespace(cfg=cfg, proc=SimpleNamespace(device=torch.device("cpu")),
                          data=SimpleNamespace(tokenizer=tok, stop_ids=[], rows=rows))
    prompts = [SimpleNamespace(row=i, example=SimpleNamespace(opens_think=True)) for i in range(2)]
    groups = [[Completion(tok.encode(text, add_special_tokens=False).ids, [0.0], "stop")]
              for text in ("the answer </think> \\boxed{half}", "the answer </think> \\boxed{4}")]
    scores = T.score(run, prompts, groups)
    assert scores.accuracy.flatten().tolist() == [1.0, 1.0] and scores.format.flatten().tolist() == [1.0, 1.0]
    assert scores.reward.flatten().tolist() == pytest.approx([1.0, 1.0]) and scores.errors == 0
    assert V.cached(yes_ckpt, torch.device("cpu")).stats["asked"] == 1  # only the rule-wrong one
