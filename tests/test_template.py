"""data.py's chat templates against transformers' apply_chat_template on the same tokenizer and template: a
QwQ / Qwen3-style template with a default system prompt and a `<think>\\n` generation prefix, token for token; responses
that begin inside the think block scored right; NoThink; templates reaching for Python internals refused."""
import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import data as D
import mmmu
import model as M
import reward as R

# QwQ-32B / Qwen3 style (R1V3's LLM family): a default system prompt, the assistant's history without its reasoning,
# a generation prefix that opens the think block, `enable_thinking=false` closing an empty one (Qwen3).
QWEN_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
    {%- elif message.role != "system" %}
        {{- raise_exception('unknown role ' + message.role) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- else %}
        {{- '<think>\\n' }}
    {%- endif %}
{%- endif %}
"""
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<img>", "</img>", "<IMG_CONTEXT>"]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    """A byte-level BPE (Qwen's kind) with the ChatML, think and image special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = "You are a helpful assistant. How many red squares are there? Think step by step. The answer is 4."
    tok.train_from_iterator([text] * 20, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_special_tokens(SPECIAL)
    return tok


@pytest.fixture
def ckpt(tmp_path, bpe):
    bpe.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "chat_template.jinja").write_text(QWEN_TEMPLATE)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>",
                                                               "pad_token": {"content": "<|endoftext|>"}}))
    return tmp_path


def hf_ids(ckpt, bpe, messages, **kwargs) -> list[int]:
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.chat_template = (ckpt / "chat_template.jinja").read_text()
    out = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kwargs)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


@pytest.mark.parametrize("system", [None, D.R1V3_SYSTEM, "Reason, then box the answer."])
def test_template_matches_transformers(ckpt, bpe, system):
    template = D.load_chat_template(ckpt)
    assert template.path.endswith("chat_template.jinja") and template.special_tokens == {
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    config = M.tiny_config(bpe.get_vocab_size(), bpe.token_to_id("<IMG_CONTEXT>"))
    question = "How many red squares are there?\nThink step by step."
    ids, pixels = D.build_prompt(bpe, config, question, system=system, template=template)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    assert ids == hf_ids(ckpt, bpe, messages) and pixels is None
    assert bpe.decode(ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n<think>\n")
    assert D.opens_think(bpe, ids)
    # NoThink: Qwen3's enable_thinking=False, an empty think block closed in the prompt
    no_think, _ = D.build_prompt(bpe, config, question, system=system, template=template, think=False)
    assert no_think == hf_ids(ckpt, bpe, messages, enable_thinking=False) and not D.opens_think(bpe, no_think)


def test_template_in_tokenizer_config_and_fallback(tmp_path, bpe):
    assert D.load_chat_template(tmp_path) is None  # no template: ChatML
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": QWEN_TEMPLATE}],
         "bos_token": None}))
    template = D.load_chat_template(tmp_path)
    assert template.source == QWEN_TEMPLATE and template.special_tokens == {}
    config = M.tiny_config(bpe.get_vocab_size(), bpe.token_to_id("<IMG_CONTEXT>"))
    ids, _ = D.build_prompt(bpe, config, "How many?")
    assert bpe.decode(ids, skip_special_tokens=False) == D.chat_template([{"role": "user", "content": "How many?"}])
    assert not D.opens_think(bpe, ids)


def test_template_image_placeholders(ckpt, bpe):
    from PIL import Image
    config = M.tiny_config(bpe.get_vocab_size(), bpe.token_to_id("<IMG_CONTEXT>"))
    ids, pixels = D.build_prompt(bpe, config, "How many?", [Image.new("RGB", (56, 56))],
                                 template=D.load_chat_template(ckpt))
    text = bpe.decode(ids, skip_special_tokens=False)
    assert f"<|im_start|>user\n<img>{'<IMG_CONTEXT>' * config.tokens_per_tile}</img>\nHow many?" in text
    assert ids.count(config.image_token_id) == config.tokens_per_tile * pixels.shape[0]


def test_response_inside_think_block(ckpt, bpe):
    """The prompt opened <think>: the response has only </think>, yet gets format 1 and its answer after it."""
    config = M.tiny_config(bpe.get_vocab_size(), bpe.token_to_id("<IMG_CONTEXT>"))
    row = {"id": "q", "question": "How many red squares are there?", "answer": "4"}
    ex = D.encode(R.validate_row(row), bpe, config, template=D.load_chat_template(ckpt))
    assert ex.opens_think
    generated = bpe.encode("The squares: 2 + 2 \\boxed{5}. So</think>The answer is \\boxed{4}",
                           add_special_tokens=False).ids + [bpe.token_to_id("<|im_end|>")]
    stop = [bpe.token_to_id("<|im_end|>")]
    raw = D.decode_response(bpe, generated, stop)
    assert R.score(raw, row)["format"] == 0.0  # read without the prompt's <think>: malformed
    response = D.decode_response(bpe, generated, stop, opens_think=ex.opens_think)
    assert response.startswith("<think>\n")
    s = R.score(response, row, R.RewardConfig())
    assert (s["accuracy"], s["format"]) == (1.0, 1.0)  # 5 was inside the reasoning: the answer is read after </think>
    v = mmmu.verdict(response, {**row, "answer_type": "numeric"})
    assert v.correct and v.answer == "4"
    # cut off while thinking: no answer
    cut = D.decode_response(bpe, bpe.encode("The squares: \\boxed{4}", add_special_tokens=False).ids, stop, True)
    assert R.score(cut, row)["format"] == 0.0 and R.score(cut, row)["accuracy"] == 0.0


def test_sft_response_keeps_one_think(ckpt, bpe):
    config = M.tiny_config(bpe.get_vocab_size(), bpe.token_to_id("<IMG_CONTEXT>"))
    row = R.validate_row({"id": "q", "question": "How many?", "answer": "4",
                          "response": "<think>\n2 + 2</think>\\boxed{4}"})
    ex = D.encode(row, bpe, config, template=D.load_chat_template(ckpt))
    text = bpe.decode(ex.ids, skip_special_tokens=False)
    assert text.count("<think>") == 1 and text.endswith("<think>\n2 + 2</think>\\boxed{4}<|im_end|>")


@pytest.mark.parametrize("source", ["{{ ''.__class__.__mro__ }}", "{{ ''.__class__ }}",
                                    "{{ messages['__class__'] }}", "{% set x = cycler.__init__ %}{{ x }}"])
def test_template_reaching_python_internals_refused(tmp_path, source):
    (tmp_path / "chat_template.jinja").write_text(source)
    with pytest.raises(D.TemplateError, match=r"chat_template\.jinja: chat template refused.*__"):
        D.load_chat_template(tmp_path)


def test_template_errors_name_the_file(tmp_path):
    (tmp_path / "chat_template.jinja").write_text("{% if %}")
    with pytest.raises(D.TemplateError, match=r"chat_template\.jinja: chat template does not parse"):
        D.load_chat_template(tmp_path)
    template = D.ChatTemplate(QWEN_TEMPLATE, "qwen.jinja")
    with pytest.raises(D.TemplateError, match=r"qwen\.jinja: chat template failed: unknown role tool"):
        template.render([{"role": "tool", "content": "x"}])
