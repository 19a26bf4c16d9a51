"""eval.py: a table of responses judged by MMMU's official rules (each case names the rule that decides it), where
reward.py's lenient parsing differs, MMMU-format parquet files made here (images placed where the question puts them,
options lettered, missing and unreadable images), the whole pipeline on a tiny random checkpoint, evaluate's numbers
against a hand count with a scripted sampler and its entropies against full-logit recomputation, torchrun with 2
processes against one, and the one-question mode against the sampler in-process."""
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint as C
import data as D
import eval as E
import mmmu
import model as M
import reward
from conftest import finish, in_this_process, start
from rollout import Completion, Request, Sampler

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------------------------------
# The judge: MMMU's rules, one rule named per case

OPT4 = ["12 cm", "15 cm", "18 cm", "21 cm"]
OPT2 = ["True", "False"]
OPT5 = ["mitosis", "meiosis", "binary fission", "budding", "fragmentation"]
OPT9 = ["3", "6", "9", "12", "15", "18", "21", "24", "27"]  # A..I
ANIMALS = ["cat", "black cat", "dog", "bird"]


def mc(answer, options=OPT4):
    return {"question_type": "multiple-choice", "options": options, "answer": answer}


def op(answer):
    return {"question_type": "open", "options": [], "answer": answer}


def proj(answer, answer_type, options=()):
    return {"answer": answer, "answer_type": answer_type, "options": list(options)}


def think(final):
    return f"<think>\nLet me look at the figure. Wait, check the scale again.\n</think>\n\n{final}"


# (id, response, row, verdict, rule). Multiple-choice rules: "bracketed" = some "(X)" appears, the last one wins;
# "spaced" = no "(X)", some " X " appears, the last one wins; "option text" = neither, more than 5 words, the option
# text found last wins (substring, case-insensitive); "none" = nothing found, where MMMU guesses at random: no answer.
# Open rules (MMMU's eval_open on parse_open_response's candidates): "number" = a number candidate (rounded to 2
# places) equals a gold number; "substring" = a gold string (lower case) sits inside a candidate string;
# "no match". "no final answer": the think block never closes, or nothing follows it / the box is empty.
CASES = [
    # multiple choice, 4 options, gold B unless said
    ("mc-boxed-letter", think("The answer is \\boxed{B}."), mc("B"), "correct", "spaced"),
    ("mc-boxed-paren", think("\\boxed{(B)}"), mc("B"), "correct", "bracketed"),
    ("mc-boxed-paren-and-text", think("\\boxed{(B) 15 cm}"), mc("B"), "correct", "bracketed"),
    ("mc-boxed-wrong", think("\\boxed{C}"), mc("B"), "wrong", "spaced"),
    ("mc-answer-colon", think("Answer: B"), mc("B"), "correct", "spaced"),
    ("mc-letter-period", think("B."), mc("B"), "correct", "spaced"),  # end punctuation is stripped
    ("mc-letter-period-then-text", think("B. 15 cm"), mc("B"), "no answer", "none"),  # "B." is not " B "
    ("mc-bold-letter", think("**B**"), mc("B"), "no answer", "none"),
    ("mc-text-command", think("\\boxed{\\text{B}}"), mc("B"), "no answer", "none"),
    ("mc-boxed-mathbf", think("\\boxed{\\mathbf{B}}"), mc("B"), "no answer", "none"),
    ("mc-lowercase", think("\\boxed{b}"), mc("B"), "no answer", "none"),  # letters are upper case only
    ("mc-bracket-last-wins", think("(A) is tempting, but (B) is right."), mc("B"), "correct", "bracketed"),
    ("mc-bracket-last-wrong", think("(B) looks right, but the answer is (D)"), mc("B"), "wrong", "bracketed"),
    ("mc-bracket-beats-spaced", think("Not (C); so B"), mc("B"), "wrong", "bracketed"),
    ("mc-spaced-last-wins", think("A and B are close; B it is"), mc("B"), "correct", "spaced"),
    ("mc-spaced-last-wrong", think("B or maybe C"), mc("B"), "wrong", "spaced"),
    ("mc-option-text", think("After measuring the ruler carefully, the length is 15 cm"), mc("B"), "correct",
     "option text"),
    ("mc-option-text-short", think("15 cm"), mc("B"), "no answer", "none"),  # 5 words or fewer: text not read
    ("mc-option-text-last-wins", think("It is not 12 cm, it is in fact 18 cm"), mc("B"), "wrong", "option text"),
    ("mc-option-text-case", think("the final measured length comes out at 15 CM"), mc("B"), "correct",
     "option text"),
    ("mc-option-substring-quirk", think("the animal in the picture is clearly a black cat"), mc("B", ANIMALS),
     "wrong", "option text"),  # "cat" is found last, inside "black cat": A
    ("mc-letter-in-word-only", think("Because the length is fifteen centimetres in total here"), mc("B"),
     "no answer", "none"),
    ("mc-listing-all", think("(A) 12 cm (B) 15 cm (C) 18 cm (D) 21 cm"), mc("B"), "wrong", "bracketed"),
    ("mc-restated-then-chosen", think("Comparing (A) 12 cm, (B) 15 cm and (C) 18 cm, the length is (B) 15 cm."),
     mc("B"), "correct", "bracketed"),
    ("mc-quote-period-quirk", think("'The answer is B.'"), mc("B"), "no answer", "none"),  # "." outlives "'"
    ("mc-gold-list", think("\\boxed{B}"), mc("['B', 'C']"), "correct", "spaced"),
    ("mc-options-literal", think("\\boxed{B}"), mc("B", "['12 cm', '15 cm']"), "correct", "spaced"),
    # which part of the response is read
    ("mc-think-box-ignored", "<think>maybe \\boxed{A}</think> so \\boxed{B}", mc("B"), "correct", "spaced"),
    ("mc-last-box-wins", think("\\boxed{A} Wait, no: \\boxed{B}"), mc("B"), "correct", "spaced"),
    ("mc-box-only-in-think", "<think>so \\boxed{B}</think> Done.", mc("B"), "no answer", "none"),
    ("mc-no-think", "The answer is (B)", mc("B"), "correct", "bracketed"),
    ("mc-unclosed-think", "<think>The answer is (B)", mc("B"), "no answer", "no final answer"),
    ("mc-empty-after-think", "<think>Answer: B</think>", mc("B"), "no answer", "no final answer"),
    # 2, 5 and 9 options
    ("mc2-letter", think("\\boxed{A}"), mc("A", OPT2), "correct", "spaced"),
    ("mc2-text", think("After checking all the cases, the statement is False"), mc("A", OPT2), "wrong",
     "option text"),
    ("mc2-substring-quirk", think("It would be untrue to call the claim wrong"), mc("A", OPT2), "correct",
     "option text"),  # "true" inside "untrue"
    ("mc5-letter-e", think("\\boxed{E}"), mc("E", OPT5), "correct", "spaced"),
    ("mc5-text", think("The process shown in the micrograph is binary fission"), mc("C", OPT5), "correct",
     "option text"),
    ("mc9-letter-i", think("\\boxed{I}"), mc("I", OPT9), "correct", "spaced"),
    ("mc9-pronoun-first", think("I think it is C"), mc("C", OPT9), "correct", "spaced"),  # C comes last
    ("mc9-pronoun-last-quirk", think("C, I think"), mc("C", OPT9), "wrong", "spaced"),  # "C," is no " C "; " I " is
    # open questions
    ("open-int", think("\\boxed{6}"), op("6"), "correct", "number"),
    ("open-int-wrong", think("\\boxed{16}"), op("6"), "wrong", "no match"),
    ("open-decimal-rounded", think("\\boxed{3.14159}"), op("3.14"), "correct", "number"),
    ("open-decimal-wrong", think("\\boxed{3.15}"), op("3.14"), "wrong", "no match"),
    ("open-rounding-quirk", think("\\boxed{0.004}"), op("0"), "correct", "number"),  # both round to 0.0
    ("open-unit-in-answer", think("\\boxed{5 cm}"), op("5"), "correct", "number"),
    ("open-unit-in-gold-quirk", think("\\boxed{5}"), op("5 cm"), "wrong", "no match"),  # gold is a string
    ("open-unit-both", think("\\boxed{5 cm}"), op("5 cm"), "correct", "substring"),
    ("open-thousands", think("\\boxed{1,000}"), op("1000"), "correct", "number"),
    ("open-thousands-sentence", think("The total is \\boxed{7,243,000} dollars."), op("7243000"), "correct",
     "number"),
    ("open-dollar-thousands", think("\\boxed{\\$1,249}"), op("1249"), "correct", "number"),
    ("open-sci", think("\\boxed{1.5e3}"), op("1500"), "correct", "number"),
    ("open-sci-latex-quirk", think("\\boxed{1.5 \\times 10^{3}}"), op("1500"), "wrong", "no match"),
    ("open-negative", think("\\boxed{-120}"), op("-120"), "correct", "number"),
    ("open-list-gold-decimal", think("\\boxed{3.429}"), op("['24/7', '3.429']"), "correct", "number"),
    ("open-list-gold-fraction", think("\\boxed{24/7}"), op("['24/7', '3.429']"), "correct", "substring"),
    ("open-list-gold-wrong", think("\\boxed{3.5}"), op("['24/7', '3.429']"), "wrong", "no match"),
    ("open-word", think("\\boxed{Transformation}"), op("Transformation"), "correct", "substring"),
    ("open-word-substring-quirk", think("\\boxed{non-embryonic}"), op("embryonic"), "correct", "substring"),
    ("open-single-letter", think("\\boxed{C}"), op("C"), "correct", "substring"),
    ("open-single-letter-in-word", think("\\boxed{carbon}"), op("C"), "wrong", "no match"),
    ("open-percent-quirk", think("\\boxed{50}"), op("50%"), "wrong", "no match"),
    ("open-frac-quirk", think("\\boxed{\\frac{1}{2}}"), op("0.5"), "wrong", "no match"),
    ("open-indicator", think("The final answer is 42 meters."), op("42"), "correct", "number"),
    ("open-equation-last-line", think("x = 2 + 3 = 5"), op("5"), "correct", "number"),
    ("open-any-number-quirk", think("The result is 12 or 13"), op("13"), "correct", "number"),
    ("open-think-box-ignored", "<think>\\boxed{7}</think> so it is \\boxed{8}", op("7"), "wrong", "no match"),
    ("open-unclosed-think", "<think>so \\boxed{7}", op("7"), "no answer", "no final answer"),
    ("open-empty-box", think("\\boxed{}"), op("7"), "no answer", "no final answer"),
    ("open-no-think", "So the answer is 12.5", op("12.5"), "correct", "number"),
    # the project's rows: multiple_choice -> MMMU multiple choice, numeric / text -> MMMU open, expression -> math
    ("tiny-task-right", "<think> a1 red 1 a2 blue 1 b1 red 2 </think> \\boxed{6}", proj("6", "numeric"), "correct",
     "number"),
    ("tiny-task-wrong", "<think> a1 red 1 </think> \\boxed{5}", proj("6", "numeric"), "wrong", "no match"),
    ("tiny-task-truncated", "<think> a1 red 1 a2 blue", proj("6", "numeric"), "no answer", "no final answer"),
    ("project-mc", think("\\boxed{B}"), proj("B", "multiple_choice", OPT4), "correct", "spaced"),
    ("project-expression", think("\\boxed{(x+1)^2}"), proj("x^2+2x+1", "expression"), "correct", "math-verify"),
    ("project-expression-wrong", think("\\boxed{(x-1)^2}"), proj("x^2+2x+1", "expression"), "wrong", "math-verify"),
    ("project-text", think("\\boxed{Paris}"), proj("paris", "text"), "correct", "substring"),
]


@pytest.mark.parametrize("response,row,expected,rule", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_judge_table(response, row, expected, rule):
    v = mmmu.verdict(response, row)
    assert (v.label, v.rule) == (expected, rule)
    assert mmmu.judge(response, row) == (expected == "correct")


def test_table_is_large_and_covers_every_rule():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)
    assert {c[4] for c in CASES} == {"bracketed", "spaced", "option text", "none", "number", "substring", "no match",
                                     "no final answer", "math-verify"}
    assert {len(c[2]["options"]) for c in CASES if c[2].get("question_type") == "multiple-choice"} >= {2, 4, 5, 9}
    assert sum(c[3] == "correct" for c in CASES) >= 25 and sum(c[3] != "correct" for c in CASES) >= 25


def test_verdict_reports_what_it_read():
    v = mmmu.verdict(think("\\boxed{(C) 18 cm}"), mc("B"))
    assert (v.answer, v.parsed, v.correct) == ("(C) 18 cm", "C", False)
    v = mmmu.verdict(think("The final answer is 42 meters."), op("42"))
    assert v.answer == "The final answer is 42 meters." and set(v.parsed) == {"42 meters", 42.0}


@pytest.mark.parametrize("response,row,reward_accuracy", [
    (think("**B**"), mc("B"), 1.0),  # reward: markdown around a letter; MMMU: no " B "
    (think("\\boxed{b}"), mc("B"), 1.0),  # reward: a lone lower-case letter
    (think("\\boxed{\\text{B}}"), mc("B"), 1.0),
    (think("B. 15 cm"), mc("B"), 1.0),
    (think("Answer: 15 cm"), mc("B"), 1.0),  # reward: an explicit answer naming an option's text, however short
    (think("C, I think"), mc("C", OPT9), 1.0),  # reward: "I think" is a pronoun
    (think("\\boxed{\\frac{1}{2}}"), op("0.5"), 1.0),  # reward: math-verify
    (think("\\boxed{1.5 \\times 10^{3}}"), op("1500"), 1.0),
    (think("\\boxed{Ｂ}"), mc("B"), 1.0),  # reward: NFKC (MMMU's float() reads full-width digits itself)
], ids=["bold", "lower-case", "text-command", "letter-period-text", "option-text", "pronoun-i", "latex-fraction",
        "latex-scientific", "full-width"])
def test_reward_is_lenient_where_eval_is_exact(response, row, reward_accuracy):
    row_for_reward = {"answer": row["answer"], "options": row["options"],
                      "answer_type": "multiple_choice" if row["options"] else "numeric"}
    assert reward.accuracy_reward(response, row_for_reward) == reward_accuracy
    assert not mmmu.judge(response, row)


def test_gold_answers_and_rules_of():
    assert mmmu.gold_answers("['24', '24.0']") == ["24", "24.0"] and mmmu.gold_answers("B") == "B"
    assert mmmu.gold_answers("[not a literal") == "[not a literal" and mmmu.gold_answers(12) == "12"
    assert mmmu.rules_of({"question_type": "open", "answer_type": "multiple_choice"}) == "open"
    assert [mmmu.rules_of(proj("1", t, ["a"] if t == "multiple_choice" else ())) for t in reward.ANSWER_TYPES] == \
        ["multiple-choice", "open", "math", "open"]

# ----------------------------------------------------------------------------------------------------------------
# MMMU's parquet format, made here


WORDS = ("which painting matches ? compare with the area of is what answer a b c A. B. C. D. E. landscape portrait "
         "<think> </think> wait red blue \\boxed{6} \\boxed{3} \\boxed{4} \\boxed{A} \\boxed{B} a1 1 x how many cells "
         "think step by step then put final in \\boxed{}. option's letter from given choices. using single word or "
         "phrase. question").split()


@pytest.fixture(scope="module")
def tok():
    return D.word_tokenizer(WORDS)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok):
    """A tiny random checkpoint (native layout) with its tokenizer."""
    path = tmp_path_factory.mktemp("ckpt")
    cfg = M.tiny_config(tok.get_vocab_size(), tok.token_to_id(C.IMG_CONTEXT))
    C.save_model(M.VLM.from_config(cfg, seed=0), path, layout="native")
    tok.save(str(path / "tokenizer.json"))
    return path


def png(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# 56 px tiles (tiny_config): 56x56 -> 1 tile; 112x56 -> 2 tiles + thumbnail; 168x56 -> 3 + thumbnail; 4 tokens a tile
SQUARE, WIDE, WIDER = png(56, 56, 1), png(112, 56, 2), png(168, 56, 3)
TILES = {SQUARE: 1, WIDE: 3, WIDER: 4}


def mmmu_record(id_, question, options, answer, qtype="multiple-choice", **images):
    rec = {"id": id_, "question": question, "options": repr(options), "explanation": "", "answer": answer,
           "question_type": qtype, "subfield": "sub", "topic_difficulty": "Easy", "img_type": "['Photographs']"}
    for i in range(1, mmmu.MMMU_IMAGES + 1):
        b = images.get(f"image_{i}")
        rec[f"image_{i}"] = None if b is None else {"bytes": b, "path": f"{id_}_{i}.png"}
    return rec


MMMU = {
    "Art_Theory": [
        mmmu_record("validation_Art_Theory_1", "Which painting matches <image 2> ? Compare with <image 1> .",
                    ["<image 3>", "landscape", "portrait"], "A", image_1=SQUARE, image_2=WIDE, image_3=WIDER),
        mmmu_record("validation_Art_Theory_2", "Which painting matches <image 2> ?", ["landscape", "portrait"], "B",
                    image_1=SQUARE),  # <image 2> is missing
        mmmu_record("validation_Art_Theory_3", "Which painting ?", ["a", "b", "c", "landscape", "portrait"], "E",
                    image_1=WIDE),  # named by no placeholder: in front
    ],
    "Math": [
        mmmu_record("validation_Math_1", "What is the area of <image 1> ?", [], "['24', '24.0']", "open",
                    image_1=png(56, 112, 4), image_2=SQUARE),
        mmmu_record("validation_Math_2", "What is the area of <image 1> ?", [], "6", "open",
                    image_1=b"\x89PNG not really"),  # unreadable
    ],
}


@pytest.fixture(scope="module")
def mmmu_dir(tmp_path_factory):
    """The release's layout: one folder per subject, validation-*.parquet, plus a dev file that --split skips."""
    pa = pytest.importorskip("pyarrow")  # optional: only MMMU's parquet files need it
    import pyarrow.parquet as pq
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("id", pa.string()), ("question", pa.string()), ("options", pa.string()),
                        ("explanation", pa.string()), *[(f"image_{i}", image) for i in range(1, 8)],
                        ("img_type", pa.string()), ("answer", pa.string()), ("topic_difficulty", pa.string()),
                        ("question_type", pa.string()), ("subfield", pa.string())])
    root = tmp_path_factory.mktemp("mmmu")
    for subject, records in MMMU.items():
        (root / subject).mkdir()
        pq.write_table(pa.Table.from_pylist(records, schema), root / subject / "validation-00000-of-00001.parquet")
    dev = [mmmu_record("dev_Math_1", "What is <image 1> ?", [], "1", "open", image_1=SQUARE)]
    pq.write_table(pa.Table.from_pylist(dev, schema), root / "Math" / "dev-00000-of-00001.parquet")
    return root


def image_runs(ids: list[int], image_id: int) -> list[int]:
    """Lengths of the runs of <IMG_CONTEXT> tokens, in order."""
    runs, n = [], 0
    for t in ids + [-1]:
        if t == image_id:
            n += 1
        elif n:
            runs, n = runs + [n], 0
    return runs


def test_load_mmmu_reads_the_release_format(mmmu_dir):
    rows = mmmu.load_mmmu(mmmu_dir, "validation")
    assert [r["id"] for r in rows] == [r["id"] for s in ("Art_Theory", "Math") for r in MMMU[s]]  # no dev row
    first = rows[0]
    assert first["options"] == ["<image 3>", "landscape", "portrait"] and first["subject"] == "Art_Theory"
    assert first["image"][:4] == [SQUARE, WIDE, WIDER, None] and len(first["image"]) == 7
    assert rows[3]["answer"] == "['24', '24.0']" and rows[3]["question_type"] == "open"
    assert mmmu.load_mmmu(mmmu_dir / "Math" / "dev-00000-of-00001.parquet")[0]["subject"] == "Math"
    assert [r["id"] for r in E.load_eval_rows(mmmu_dir, subjects=["math"], limit=1)] == ["validation_Math_1"]
    with pytest.raises(FileNotFoundError, match="no parquet files for split 'test'"):
        mmmu.load_mmmu(mmmu_dir, "test")


def test_missing_pyarrow_is_explained(mmmu_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import now fails as if it were not installed
    with pytest.raises(ImportError, match="pip install pyarrow"):
        mmmu.load_mmmu(mmmu_dir)


def test_mmmu_prompt_puts_each_image_where_its_placeholder_is(mmmu_dir, tok):
    config = M.tiny_config(tok.get_vocab_size(), tok.token_to_id(C.IMG_CONTEXT))
    cfg = E.EvalConfig(max_new_tokens=8)
    rows = {r["id"]: r for r in mmmu.load_mmmu(mmmu_dir)}
    row = rows["validation_Art_Theory_1"]
    text, images = E.prompt_text(row, cfg)
    assert text == ("Which painting matches <image> ? Compare with <image> .\nA. <image>\nB. landscape\nC. portrait\n"
                    + E.MC_INSTRUCTION)
    assert images == [("image 2", WIDE), ("image 1", SQUARE), ("image 3", WIDER)]
    p = E.build_eval_prompt(row, tok, config, cfg, max_len=512)
    assert image_runs(p.ids, config.image_token_id) == [4 * TILES[WIDE], 4 * TILES[SQUARE], 4 * TILES[WIDER]]
    expected = torch.cat([D.load_image(Image.open(io.BytesIO(b)), config) for b in (WIDE, SQUARE, WIDER)])
    assert torch.equal(p.pixels, expected) and p.max_tiles == config.max_dynamic_patch
    text, images = E.prompt_text(rows["validation_Art_Theory_3"], cfg)  # no placeholder: the image goes in front
    assert text.startswith("<image>\nWhich painting ?\nA. a\n") and "\nE. portrait\n" in text
    assert images == [("image 1", WIDE)]
    text, images = E.prompt_text(rows["validation_Math_1"], cfg)  # open: no options, image_2 unnamed goes in front
    assert text == f"<image>\nWhat is the area of <image> ?\n{E.OPEN_INSTRUCTION}"
    assert images == [("image 2", SQUARE), ("image 1", rows["validation_Math_1"]["image"][0])]
    with pytest.raises(E.Unanswerable, match="no image 2"):
        E.build_eval_prompt(rows["validation_Art_Theory_2"], tok, config, cfg, 512)
    with pytest.raises(E.Unanswerable, match="image 1 unreadable: UnidentifiedImageError: 15 bytes"):
        E.build_eval_prompt(rows["validation_Math_2"], tok, config, cfg, 512)


def test_tile_cap_shrinks_until_the_prompt_fits(mmmu_dir, tok):
    config = M.tiny_config(tok.get_vocab_size(), tok.token_to_id(C.IMG_CONTEXT))
    row = mmmu.load_mmmu(mmmu_dir)[0]  # images of 1, 3 and 4 tiles at the full cap; 1 tile each at cap 1
    cfg = E.EvalConfig(max_new_tokens=8)
    full = E.build_eval_prompt(row, tok, config, cfg, max_len=1000)
    one = E.build_eval_prompt(row, tok, config, E.EvalConfig(max_new_tokens=8, max_tiles=1), max_len=1000)
    assert len(full.ids) - len(one.ids) == 4 * ((1 + 3 + 4) - (1 + 1 + 1))  # tiles of 4 tokens
    fitted = E.build_eval_prompt(row, tok, config, cfg, max_len=len(one.ids) + 8)
    assert fitted.max_tiles == 1 and fitted.ids == one.ids
    tight = E.build_eval_prompt(row, tok, config, cfg, max_len=len(one.ids) + 1)  # no room for 8: the least tiles
    assert tight.ids == one.ids
    with pytest.raises(E.Unanswerable, match="leaves no room"):
        E.build_eval_prompt(row, tok, config, cfg, max_len=len(one.ids))


def test_pipeline_on_mmmu_parquet_writes_complete_results(mmmu_dir, ckpt, tmp_path, capsys, in_process):
    out = tmp_path / "eval.json"
    E.main(["--ckpt", str(ckpt), "--data", str(mmmu_dir), "--out", str(out), "--samples", "2", "--max_new_tokens",
            "6", "--max_len", "256", "--chunk", "2", "--no-progress", "--temperature", "1.0"])
    res = json.loads(out.read_text())
    rows = {r["id"]: r for r in mmmu.load_mmmu(mmmu_dir)}
    recs = res["records"]
    assert [(r["id"], r["mode"], r["sample"]) for r in recs] == [
        (i, m, j) for i in rows for m, n in (("greedy", 1), ("sample", 2)) for j in range(n)]
    unanswered = {r["id"]: r["error"] for r in recs if r["verdict"] == "unanswered"}
    assert set(unanswered) == {"validation_Art_Theory_2", "validation_Math_2"}
    assert "no image 2" in unanswered["validation_Art_Theory_2"] and "unreadable" in unanswered["validation_Math_2"]
    for r in recs:
        if r["verdict"] == "unanswered":
            continue
        assert r["prompt"].count("<img>") == r["prompt"].count(C.IMG_CONTEXT + "x") >= 1
        assert 1 <= r["num_tokens"] <= 6 and r["finish_reason"] in ("stop", "length")
        v = mmmu.verdict(r["response"], rows[r["id"]])  # the recorded verdict is the judge's
        assert (r["verdict"], r["rule"], r["answer"]) == (v.label, v.rule, v.answer)
        assert r["entropy"] is None if r["mode"] == "greedy" else r["entropy"]["num_tokens"] == r["num_tokens"]
    first = next(r["prompt"] for r in recs if r["id"] == "validation_Art_Theory_1")
    runs = [int(n) for n in re.findall(re.escape(C.IMG_CONTEXT) + r"x(\d+)", first)]
    assert runs == [4 * TILES[WIDE], 4 * TILES[SQUARE], 4 * TILES[WIDER]]  # image 2, image 1, then option A's
    # every number, recomputed here from the records
    greedy = [r["verdict"] == "correct" for r in recs if r["mode"] == "greedy"]
    sampled = [r["verdict"] == "correct" for r in recs if r["mode"] == "sample"]
    answered = [r for r in recs if r["verdict"] != "unanswered"]
    s = res["summary"]
    assert (s["questions"], s["unanswered"], s["k"]) == (5, 2, 2)
    assert s["greedy_accuracy"] == pytest.approx(sum(greedy) / 5)
    assert s["sampled_accuracy"] == pytest.approx(sum(sampled) / 10)
    assert s["pass_at_k"] == pytest.approx(sum(any(sampled[2 * q:2 * q + 2]) for q in range(5)) / 5)
    assert s["response_length"] == pytest.approx(sum(r["num_tokens"] for r in answered) / len(answered))
    assert s["truncation_rate"] == pytest.approx(sum(r["finish_reason"] == "length" for r in answered) / 9)
    assert s["generated_tokens"] == sum(r["num_tokens"] for r in answered)
    assert set(res["subjects"]) == {"Art_Theory", "Math"} and list(res["disciplines"]) == ["Art & Design", "Science"]
    assert res["subjects"]["Math"]["questions"] == 2 and res["disciplines"]["Science"]["unanswered"] == 1
    art = [r["verdict"] == "correct" for r in recs if r["mode"] == "greedy" and r["subject"] == "Art_Theory"]
    assert res["disciplines"]["Art & Design"]["greedy_accuracy"] == pytest.approx(sum(art) / 3)
    assert set(res["timing"]) == {"generation_s", "tokens_per_s"} and res["config"]["samples"] == 2
    table = capsys.readouterr().out  # disciplines, their subjects beneath, then the overall line
    lines = [line.split()[0] for line in table.splitlines() if line.startswith(("Art", "  Art", "Science", "  Math",
                                                                                   "Overall"))]
    assert lines == ["Art", "Art_Theory", "Science", "Math", "Overall"]


def test_pipeline_on_project_jsonl_rows(ckpt, tmp_path, in_process):
    Image.open(io.BytesIO(WIDE)).save(tmp_path / "grid.png")
    rows = [{"id": "g1", "question": "how many red cells ?", "answer": "6", "image": "grid.png",
             "subject": "counting"},
            {"id": "g2", "question": "which ?", "answer": "B", "options": ["red", "blue"]}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    E.main(["--ckpt", str(ckpt), "--data", str(tmp_path / "rows.jsonl"), "--out", str(tmp_path / "eval.json"),
            "--max_new_tokens", "4", "--max_len", "128", "--no-progress"])
    res = json.loads((tmp_path / "eval.json").read_text())
    assert [(r["id"], r["mode"]) for r in res["records"]] == [("g1", "greedy"), ("g2", "greedy")]
    assert res["records"][0]["prompt"].count(C.IMG_CONTEXT + "x") == 1  # the training prompt: image in front
    assert res["records"][0]["rule"] in ("number", "no match", "no final answer")  # numeric: MMMU's open rules
    assert res["records"][1]["rule"] in ("bracketed", "spaced", "option text", "none", "no final answer")
    assert list(res["disciplines"]) == ["Other"] and set(res["subjects"]) == {"counting", ""}
    assert res["summary"]["sampled_accuracy"] is None and res["records"][0]["entropy"]["num_tokens"] >= 1


# ----------------------------------------------------------------------------------------------------------------
# evaluate's bookkeeping and entropies, with scripted responses


class ScriptedSampler:
    """Stands in for rollout.Sampler with fixed responses: script[(question index, "greedy" | "sample")] is a list
    of (text, finish_reason). Requests carry seed = question index (EvalConfig.seed 0)."""

    def __init__(self, tok, script: dict, max_len: int = 256):
        self.tok, self.script, self.max_len, self.stats = tok, script, max_len, {}
        self.stop_ids, self.calls = {tok.token_to_id("<|im_end|>")}, []

    def generate(self, requests, num_samples, max_new_tokens, temperature, top_p, seed):
        self.calls.append((len(requests), num_samples, temperature))
        mode = "greedy" if temperature == 0 else "sample"
        out = []
        for r in requests:
            texts = self.script[(r.seed, mode)]
            assert len(texts) == num_samples
            out.append([Completion(self.tok.encode(t).ids + ([self.tok.token_to_id("<|im_end|>")] if f == "stop"
                                                             else []), [0.0], f) for t, f in texts])
        self.stats = dict(tokens=sum(len(c.ids) for g in out for c in g), seconds=1.0)
        return out


ROWS = [
    {"id": "q0", "question": "how many red cells ?", "answer": "6", "answer_type": "numeric", "options": [],
     "image": [], "subject": "counting"},
    {"id": "q1", "question": "how many red cells ?", "answer": "3", "answer_type": "numeric", "options": [],
     "image": [], "subject": "counting"},
    {"id": "q2", "question": "which ?", "answer": "B", "answer_type": "multiple_choice", "options": ["red", "blue"],
     "image": [], "subject": "colours"},
]
SCRIPT = {
    (0, "greedy"): [("<think> a1 red 1 </think> \\boxed{6}", "stop")],
    (0, "sample"): [("<think> wait red </think> \\boxed{6}", "stop"), ("<think> a1 red", "length")],
    (1, "greedy"): [("\\boxed{3}", "stop")],  # right, but no think block: format 0
    (1, "sample"): [("<think> x </think> \\boxed{4}", "stop"), ("<think> x </think> \\boxed{4}", "stop")],
    (2, "greedy"): [("<think> red </think> \\boxed{B}", "stop")],
    (2, "sample"): [("<think> red </think> \\boxed{A}", "stop"), ("<think> blue </think> \\boxed{B}", "stop")],
}


def full_logit_entropy(model, prompt_ids, pixels, response_ids, temperature):
    """The reference: full logits of one unpadded sequence, entropy of softmax(logits / T) per response token."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids, pixels).double()[0] / temperature, -1)
    h = -(logp.exp() * logp).sum(-1)
    return h[len(prompt_ids) - 1:len(prompt_ids) - 1 + len(response_ids)]


def test_evaluate_counts_by_hand_with_scripted_responses(tok):
    config = M.tiny_config(tok.get_vocab_size(), tok.token_to_id(C.IMG_CONTEXT))
    model = M.VLM.from_config(config, seed=1).eval()
    cfg = E.EvalConfig(max_new_tokens=16, samples=2, temperature=0.7, chunk=2, critical_words=("wait", "red"))
    sampler = ScriptedSampler(tok, SCRIPT)
    res = E.evaluate(model, tok, ROWS, cfg, sampler=sampler)
    assert sampler.calls == [(2, 1, 0.0), (2, 2, 0.7), (1, 1, 0.0), (1, 2, 0.7)]  # chunks of 2 questions
    assert res["greedy_accuracy"] == 1.0 and res["sampled_accuracy"] == pytest.approx(2 / 6)
    assert res["pass_at_k"] == pytest.approx(2 / 3) and res["truncation_rate"] == pytest.approx(1 / 9)
    assert res["format_rate"] == pytest.approx(7 / 9)  # q1's greedy answer has no think block; the cut one no answer
    lengths = [len(t.split()) + (f == "stop") for key in sorted(SCRIPT) for t, f in SCRIPT[key]]
    assert res["response_length"] == pytest.approx(sum(lengths) / 9)
    assert (res["subjects"]["counting"]["sampled_accuracy"], res["subjects"]["counting"]["pass_at_k"]) == (0.25, 0.5)
    assert (res["subjects"]["colours"]["sampled_accuracy"], res["subjects"]["colours"]["pass_at_k"]) == (0.5, 1.0)
    assert list(res["disciplines"]) == ["Other"]
    assert [r["verdict"] for r in res["records"]] == ["correct", "correct", "no answer", "correct", "wrong", "wrong",
                                                     "correct", "wrong", "correct"]
    # critical-token entropy: the sampled responses only, at "wait" / "red", against full logits at T = 0.7
    critical = {tok.token_to_id("wait"), tok.token_to_id("red")}
    values, all_tokens = [], []
    for q, row in enumerate(ROWS):
        prompt = D.encode(row, tok, config).prompt_ids
        for t, f in SCRIPT[(q, "sample")]:
            resp = tok.encode(t).ids + ([tok.token_to_id("<|im_end|>")] if f == "stop" else [])
            h = full_logit_entropy(model, prompt, None, resp, 0.7)
            values += [h[i].item() for i, t in enumerate(resp) if t in critical]
            all_tokens += h.tolist()
    assert res["num_critical_tokens"] == len(values) == 4  # wait, red | red | - | red | -
    assert res["critical_entropy"] == pytest.approx(sum(values) / 4, abs=1e-5)
    assert res["mean_entropy"] == pytest.approx(sum(all_tokens) / len(all_tokens), abs=1e-5)


def test_response_entropies_batched_equal_one_at_a_time(tok):
    config = M.tiny_config(tok.get_vocab_size(), tok.token_to_id(C.IMG_CONTEXT))
    model = M.VLM.from_config(config, seed=2).eval()
    g = torch.Generator().manual_seed(0)
    seqs = []
    for n, image in ((3, None), (7, WIDE), (1, SQUARE), (5, None)):
        ids, pixels = D.build_prompt(tok, config, "how many red cells ?", [Image.open(io.BytesIO(image))] if image
                                     else [])
        seqs.append((ids, pixels, torch.randint(20, tok.get_vocab_size(), (n,), generator=g).tolist()))
    for budget in (10**6, 60):  # one padded batch; several
        got = E.response_entropies(model, seqs, 0.8, budget)
        for (prompt, pixels, response), h in zip(seqs, got):
            assert h.shape == (len(response),)
            torch.testing.assert_close(h.double(), full_logit_entropy(model, prompt, pixels, response, 0.8),
                                       atol=1e-5, rtol=1e-5)


def test_eval_config_refuses_nonsense():
    for bad in (dict(samples=0, greedy=False), dict(samples=2, temperature=0.0), dict(chunk=0), dict(max_tiles=0),
                dict(samples=-1), dict(samples=2, top_p=0.0)):
        with pytest.raises(ValueError):
            E.EvalConfig(**bad)

# ----------------------------------------------------------------------------------------------------------------
# torchrun: two processes give what one gives


def run(args: list[str], nproc: int = 1, **env) -> subprocess.CompletedProcess:
    return finish(start(args, nproc, **env))[0]


def test_torchrun_two_processes_match_one(mmmu_dir, ckpt, tmp_path, in_process, one_thread):
    common = ["--ckpt", str(ckpt), "--data", str(mmmu_dir), "--samples", "2", "--max_new_tokens", "6",
              "--max_len", "256", "--chunk", "2", "--no-progress"]
    # Independent runs, at once: the one-process one in pytest's process, without a start-up of its own.
    two = start(["eval.py", *common, "--out", str(tmp_path / "two.json")], nproc=2)
    in_this_process(E.main, [*common, "--out", str(tmp_path / "one.json")])
    finish(two)
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert one.pop("timing").keys() == two.pop("timing").keys()
    assert one == two
    assert len(one["records"]) == 15 and one["summary"]["questions"] == 5



HELPER = """
import json, sys
import torch.distributed as dist
import cli
import eval as E
from checkpoint import load_model
from data import load_tokenizer
dist.init_process_group("gloo")
rows = E.load_eval_rows(sys.argv[2])
cfg = E.EvalConfig(max_new_tokens=6, max_len=256, samples=2, chunk=1)
result = E.evaluate(load_model(sys.argv[1]), load_tokenizer(sys.argv[1]), rows, cfg)
result = {k: v for k, v in result.items() if k not in E.TIMING}
with open(f"{sys.argv[3]}/rank{dist.get_rank()}.json", "w") as f:
    json.dump(cli.json_safe(result), f)
dist.barrier()
dist.destroy_process_group()
"""


def test_in_process_evaluate_under_torchrun_returns_the_same_on_every_rank(mmmu_dir, ckpt, tmp_path):
    # what train_rl.py does: every rank calls evaluate with the same rows and gets the merged result
    script = tmp_path / "helper.py"
    script.write_text(HELPER)
    run([str(script), str(ckpt), str(mmmu_dir), str(tmp_path)], nproc=2,
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0 == r1 and len(r0["records"]) == 15 and r0["questions"] == 5


# ----------------------------------------------------------------------------------------------------------------
# The one-question mode


def test_unknown_dtype_flag(capsys):
    """`python eval.py --ckpt X --dtype foo` stops in argparse, naming the value, before touching X."""
    with pytest.raises(SystemExit) as e:
        E.main(["--ckpt", "nowhere", "--dtype", "foo"])
    assert e.value.code == 2 and "argument --dtype: invalid choice: 'foo'" in capsys.readouterr().err


def test_one_question_prints_the_greedy_response_the_sampler_gives(ckpt, tok, tmp_path, capsys, in_process,
                                                                   one_thread):
    """`eval.py --ckpt --question --image` (its main, in this process) prints the greedy response the Sampler
    gives."""
    Image.open(io.BytesIO(WIDE)).save(tmp_path / "grid.png")
    model = C.load_model(ckpt)
    ids, pixels = D.build_prompt(tok, model.config, "how many red cells ?", [tmp_path / "grid.png"])
    stop, banned = D.special_ids(tok)
    [[want]] = Sampler(model, max_slots=1, max_len=len(ids) + 6, stop_ids=stop, banned_ids=banned).generate(
        [Request(ids, pixels)], max_new_tokens=6, temperature=0.0)
    capsys.readouterr()
    in_this_process(E.main, ["--ckpt", ckpt, "--question", "how many red cells ?", "--image", tmp_path / "grid.png",
                             "--max_new_tokens", "6", "--dtype", "float32"])
    out = capsys.readouterr().out
    response, stats = out.removesuffix("\n").rsplit("\n", 1)
    assert response == D.decode_response(tok, want.ids, stop) and want.ids, (response, want)
    assert stats.startswith(f"[{len(ids)} prompt tokens, {len(want.ids)} generated ({want.finish_reason}) in ")
    assert stats.endswith(" tokens/s]")

# ----------------------------------------------------------------------------------------------------------------
# R1V3's protocol: its released rule (--scoring r1v3), the judge, Avg@k as the headline, NoWait, NoThink

# (response, row, verdict, rule, MMMU's verdict): where the two rules differ, the last column says how MMMU's parser
# judges the same response.
R1V3_CASES = [
    (think("\\boxed{B}"), mc("B"), "correct", "letter", "correct"),
    (think("\\boxed{(B)}"), mc("B"), "correct", "letter", "correct"),
    (think("\\boxed{B. 15 cm}"), mc("B"), "correct", "letter", "no answer"),  # MMMU: "B." is no spaced letter
    (think("\\boxed{15 cm}"), mc("B"), "correct", "letter", "no answer"),  # the option's text
    (think("\\boxed{C}"), mc("B"), "wrong", "letter", "wrong"),
    (think("The answer is B."), mc("B"), "no answer", "no boxed answer", "correct"),  # R1V3 reads \boxed{} only
    (think("\\boxed{24.0}"), op("24"), "correct", "number", "correct"),
    (think("\\boxed{24 cm}"), op("['24', '24.0']"), "correct", "number", "correct"),
    (think("\\boxed{1,000}"), op("1000"), "correct", "number", "correct"),
    (think("\\boxed{\\text{Paris}.}"), op("paris"), "correct", "string", "correct"),
    (think("\\boxed{the mitochondria}"), op("Mitochondria"), "correct", "string", "correct"),
    (think("\\boxed{16}"), op("6"), "wrong", "no match", "wrong"),
    (think("\\boxed{black cat}"), op("cat"), "wrong", "no match", "correct"),  # MMMU: "cat" is a substring
    (think("\\boxed{(x+1)^2}"), proj("x^2+2x+1", "expression"), "correct", "math-verify", "correct"),
    ("<think>\nso \\boxed{B}", mc("B"), "no answer", "no boxed answer", "no answer"),  # cut off while thinking
    (think("\\boxed{}"), mc("B"), "no answer", "no boxed answer", "no answer"),
]


@pytest.mark.parametrize("response,row,expected,rule,mmmu_label", R1V3_CASES)
def test_r1v3_scoring_by_hand(response, row, expected, rule, mmmu_label):
    v = mmmu.verdict(response, row, scoring="r1v3")
    assert (v.label, v.rule) == (expected, rule), v
    assert mmmu.verdict(response, row).label == mmmu_label  # the default stays MMMU's parser


def test_headline_avg_and_r1v3_scoring_in_evaluate(tok):
    config = M.tiny_config(tok.get_vocab_size(), tok.token_to_id(C.IMG_CONTEXT))
    model = M.VLM.from_config(config, seed=1).eval()
    cfg = E.EvalConfig(max_new_tokens=16, samples=2, temperature=1.0, chunk=2, entropy=False, headline="avg",
                       scoring="r1v3")
    res = E.evaluate(model, tok, ROWS, cfg, sampler=ScriptedSampler(tok, SCRIPT))
    assert res["headline"] == "avg@2" and res["accuracy"] == res["sampled_accuracy"] == pytest.approx(2 / 6)
    assert res["subjects"]["colours"]["accuracy"] == 0.5 and res["judge"] is None
    assert {r["rule"] for r in res["records"] if r["verdict"] != "no answer"} == {"number", "letter", "no match"}
    assert "accuracy (avg@2): 0.333" in E.format_table(res)
    greedy = E.evaluate(model, tok, ROWS, E.EvalConfig(max_new_tokens=16, samples=2, chunk=2, entropy=False),
                        sampler=ScriptedSampler(tok, SCRIPT))
    assert greedy["headline"] == "greedy" and greedy["accuracy"] == greedy["greedy_accuracy"] == 1.0
    with pytest.raises(ValueError, match="headline avg needs --samples"):
        E.EvalConfig(headline="avg")
    with pytest.raises(ValueError, match="scoring must be one of"):
        E.EvalConfig(scoring="gpt4o")


def test_judge_accepts_what_the_rules_reject(tok, tmp_path):
    import verifier
    from test_verifier import certain
    config = M.tiny_config(tok.get_vocab_size(), tok.token_to_id(C.IMG_CONTEXT))
    model = M.VLM.from_config(config, seed=1).eval()
    judge = verifier.Verifier(certain("yes", tmp_path))
    cfg = E.EvalConfig(max_new_tokens=16, samples=2, chunk=2, entropy=False)
    res = E.evaluate(model, tok, ROWS, cfg, sampler=ScriptedSampler(tok, SCRIPT), judge=judge)
    # every answer the rules called wrong was asked about and accepted; the one cut off while thinking has none
    assert [r["verdict"] for r in res["records"]] == ["correct"] * 2 + ["no answer"] + ["correct"] * 6
    assert [r["rule"] for r in res["records"]].count("judge") == 3
    assert res["judge"] == {"asked": 3, "yes": 3, "errors": 0, "failed": 0}
    assert "judge: asked about 3 answers" in E.format_table(res)


def test_no_wait_never_samples_the_critical_words():
    tok = D.word_tokenizer("how many red cells ? wait Wait hmm alternatively one two three".split())
    config = M.tiny_config(tok.get_vocab_size(), tok.token_to_id(C.IMG_CONTEXT))
    model = M.VLM.from_config(config, seed=3).eval()
    rows = [{"id": f"q{i}", "question": "how many red cells ?", "answer": "3", "answer_type": "numeric",
             "options": [], "image": [], "subject": "s"} for i in range(2)]
    critical = set(E.critical_token_ids(tok, E.CRITICAL_WORDS))
    assert len(critical) == 4  # wait, Wait, hmm, alternatively (Hmm / Alternatively are not in this vocabulary)

    def sampled_ids(no_wait):
        cfg = E.EvalConfig(max_new_tokens=48, max_len=96, greedy=False, samples=8, temperature=1.5, entropy=False,
                           no_wait=no_wait, max_slots=16)
        res = E.evaluate(model, tok, rows, cfg)
        return [i for r in res["records"] for i in tok.encode(r["response"], add_special_tokens=False).ids]

    assert critical & set(sampled_ids(False))  # a random model says them...
    assert not critical & set(sampled_ids(True))  # ...and NoWait never does
    sampler = E.build_sampler(model, tok, E.EvalConfig(), 2, 96)  # a sampler without the bans is refused
    with pytest.raises(ValueError, match="no_wait: the given sampler"):
        E.evaluate(model, tok, rows, E.EvalConfig(samples=1, no_wait=True), sampler=sampler)


def test_template_that_opens_think_and_no_think(tok):
    """A template opening <think>: responses (which only close it) read with their <think> back, format 1; NoThink
    leaves the prompt without it."""
    words = D.word_tokenizer(["how", "many", "red", "cells", "?", "<think>", "</think>", "a1", "\\boxed{6}"])
    template = D.ChatTemplate("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
                              "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}",
                              "think.jinja")
    config = M.tiny_config(words.get_vocab_size(), words.token_to_id(C.IMG_CONTEXT))
    model = M.VLM.from_config(config, seed=1).eval()
    row = {"id": "q0", "question": "how many red cells ?", "answer": "6", "answer_type": "numeric", "options": [],
           "image": [], "subject": "s"}
    script = {(0, "greedy"): [("a1 red </think> \\boxed{6}", "stop")]}
    for no_think, opened, fmt in [(False, True, 1.0), (True, False, 0.0)]:
        cfg = E.EvalConfig(max_new_tokens=16, chunk=1, entropy=False, no_think=no_think,
                           system="You are a helpful assistant.")
        prompt = E.build_eval_prompt(row, words, config, cfg, 256, template)
        assert prompt.opens_think == opened
        res = E.evaluate(model, words, [row], cfg, sampler=ScriptedSampler(words, script), template=template)
        assert res["greedy_accuracy"] == 1.0 and res["format_rate"] == fmt
        assert res["records"][0]["prompt"].startswith("<|im_start|> system")  # the system message goes first
        assert res["records"][0]["response"].startswith("<think>") == opened
