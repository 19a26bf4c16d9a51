"""Rule-based rewards for GRPO: answer extraction, answer equivalence, accuracy / format / overlong rewards.

What it follows:
- math-verify (HuggingFace) decides mathematical equivalence (numbers, LaTeX expressions, intervals, sets, tuples);
  each call runs under a hard time limit of our own (`_with_time_limit`), after caps that keep pathological
  answers away from sympy.
- MMMU's official eval_utils.py answer parsing: `parse_open` / `match_open` re-implement `parse_open_response` /
  `eval_open` exactly (eval.py judges open questions with them); `parse_multiple_choice` is a lenient variant of
  `parse_multi_choice_response` for rewards (eval.py has the exact one).
- DAPO (Yu et al. 2025, "soft overlong punishment") for the length penalty.

A data row is the dict of the JSONL data files: {"question", "answer", "answer_type", "options", "image", "subject"}
with answer_type one of multiple_choice / numeric / expression / text (see `validate_row`). Accuracy reads the final
answer only after `</think>` (the reasoning may box intermediate values); a response without a think block is read
whole; one whose `<think>` never closes (truncated) has no answer; only the region's last ANSWER_SCAN_CHARS characters
are read, after Unicode normalisation (NFKC, format characters removed), as are gold answers and options. Rewards
are pure functions of (response, row).

    python bench.py reward         # responses/s on GRPO-shaped responses, serial and with score_batch's pool
"""
from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
import re
import signal
import threading
import time
import unicodedata
from concurrent.futures import ProcessPoolExecutor, wait
from dataclasses import dataclass
from fractions import Fraction

from math_verify import parse as mv_parse, verify as mv_verify

# Hard limit on one equivalence check (math-verify: parse gold, parse answer, verify). A timeout is a false 0 reward,
# so the limit sits far above what real answers cost, even a new expression's first parse on a loaded core (a fresh
# process's first check is slower still, as sympy imports lazily: `warm_up` pays that up front). What still reaches
# the limit is degenerate (huge sums, sets of dozens of elements) and rare, so spending it on such a response is cheap.
DEFAULT_TIME_LIMIT_S = 2.0
# Answers longer or more deeply bracketed than this never reach sympy; they are compared as normalised strings.
# Real answers are < 100 characters and < 5 levels deep, while the cost of math-verify's LaTeX parser grows with every
# bracket level and blows up past about ten.
MAX_ANSWER_CHARS = 200
MAX_ANSWER_DEPTH = 8
# Only the last this-many characters of the answer region (the text after </think>) are scanned for the final answer.
# A real final answer, with the summary around it, is a few hundred tokens (R1V3-style responses put the reasoning in
# the think block); 16384 characters (~4K tokens) keeps all of it while bounding the regex and brace scans, which run
# outside any time limit and on a region of megabytes would cost more than the whole equivalence check.
ANSWER_SCAN_CHARS = 16384
# Below this many responses score_batch stays in-process: a pool round trip costs more than the scoring.
SERIAL_BELOW = 64
ANSWER_TYPES = ("multiple_choice", "numeric", "expression", "text")

# We switch math-verify's own timeouts off (whole-second signal.alarm that would cancel our timer); it warns about
# that once per process, which is noise here since the limit is enforced by _with_time_limit.
logging.getLogger("math_verify").setLevel(logging.ERROR)


class AnswerTimeout(TimeoutError):
    """An equivalence check ran past its time limit."""


# ----------------------------------------------------------------------------- data rows

def validate_row(row: dict) -> dict:
    """Check a data row and return a copy with `answer_type` set and, for multiple choice, `answer` as a letter.

    A missing answer_type is inferred: options present -> multiple_choice, else numeric when the answer is one number
    (units and % allowed), else expression. Free-text rows cannot be told from expressions: label them "text".
    Raises ValueError on a data bug (unknown type, multiple choice without options or with an answer that names none).
    """
    if not isinstance(row, dict) or "answer" not in row:
        raise ValueError(f"a data row must be a dict with an 'answer' key, got {type(row).__name__}")
    answer = row["answer"]
    # str(None) would make the gold the word "None", which a response could then match.
    if answer is None or isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise ValueError(f"a data row's answer must be a string or a number, got {answer!r}"[:200])
    answer, options = normalize_unicode(str(answer)), row.get("options")
    kind = row.get("answer_type")
    if kind is None:
        kind = "multiple_choice" if options else "numeric" if _split_number(_clean(answer), True) else "expression"
    if kind not in ANSWER_TYPES:
        raise ValueError(f"unknown answer_type {kind!r}, expected one of {ANSWER_TYPES}")
    if kind == "multiple_choice":
        if not options or not isinstance(options, (list, tuple)) or len(options) > 26:
            raise ValueError(f"multiple_choice row needs 1-26 options, got {options!r}")
        letter = _letter_of(answer, options)
        if letter is None:
            raise ValueError(f"multiple_choice answer {answer!r} is neither an option letter nor an option's text")
        answer = letter
    return {**row, "answer": answer, "answer_type": kind}


# ----------------------------------------------------------------------------- answer extraction

_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_BLANKS, _TOKEN = re.compile(r"[ \t]*"), re.compile(r"[^\s$]+")
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.S)  # an escaped char (\{ is a literal brace) or a brace
_ANSWER_PHRASE = re.compile(r"\banswer\b\**\s*(?:is\b\s*:?|:)\**", re.I)  # "the answer is", "Answer:", "**Answer:**"
_WRAPPERS = re.compile(r"\\?\$|\\[()\[\]]|\\displaystyle|\*\*|__")


def normalize_unicode(s: str) -> str:
    """NFKC (full-width "１２" -> "12", "Ｂ" -> "B", ligatures, compatibility forms), then without format characters
    (Unicode category Cf: zero-width spaces and joiners, direction marks and overrides, BOM), which are invisible in
    a rendered answer but break every comparison."""
    return "".join(c for c in unicodedata.normalize("NFKC", s) if unicodedata.category(c) != "Cf")


def _clean(s: str) -> str:
    """Strip what surrounds an answer but is not part of it: $ and \\( \\[ delimiters, markdown bold, end
    punctuation."""
    return _WRAPPERS.sub("", s).strip().rstrip(".,;:").strip()


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, \\fbox{...} or `\\boxed x`; None if there is none or the last never closes.

    One left-to-right brace scan from the last command: linear time, whatever the nesting.
    """
    last = None
    for last in _BOX.finditer(text):
        pass
    if last is None:
        return None
    i = _BLANKS.match(text, last.end()).end()
    if text[i:i + 1] != "{":  # `\boxed 5`: a single token
        m = _TOKEN.match(text, i)
        return m.group(0) if m else None
    depth = 0
    for tok in _BRACE_TOKEN.finditer(text, i):
        if tok.group() == "{":
            depth += 1
        elif tok.group() == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:tok.start()].strip()
    return None


def answer_region(response: str) -> str | None:
    """The part of a response that holds its final answer: after the last `</think>`; the whole response if it has no
    think block; None if `<think>` opens but never closes (the response was cut off while thinking)."""
    end = response.rfind("</think>")
    if end >= 0:
        return response[end + len("</think>"):]
    return None if "<think>" in response else response


def extract_answer(text: str) -> str | None:
    """The explicit final answer of `text`, first form found: the last \\boxed{}, the last <answer>...</answer>, the
    line after the last "the answer is" / "Answer:". None when there is no such marker or it is empty."""
    found = last_boxed(text)
    if found is None:
        start = text.rfind("<answer>")
        end = text.find("</answer>", start) if start >= 0 else -1
        if end >= 0:
            found = text[start + len("<answer>"):end]
    if found is None:
        last = None
        for last in _ANSWER_PHRASE.finditer(text):
            pass
        if last is not None:
            tail = text[last.end():].lstrip()
            # "The answer is 12. Let me check..." -> "12"
            found = re.split(r"\.\s", tail.partition("\n")[0], maxsplit=1)[0]
    return (_clean(found) or None) if found is not None else None


# ----------------------------------------------------------------------------- multiple choice (MMMU rules)

_LETTER_FORM = re.compile(r"(?:(?:option|choice)\s*)?[(\[]?([A-Z])[)\]]?(?=$|[\s.:,)])", re.I)
# A choice letter standing alone: MMMU accepts " B "; we also accept it next to punctuation or markdown
# ("B.", "B)", "B:", "**B**", "[B]") but never inside a word ("B's", "AB", "\\Beta").
_BARE_LETTER = re.compile(r"(?<![A-Za-z0-9_\\'’])([A-Z])(?![A-Za-z0-9_'’])")
# The pronoun "I" ("I think it's C", "I'm sure", "I'd pick C") is no choice letter, which matters from 9 options on.
# "I" followed by a contraction, or by a word a sentence's subject is followed by (a verb, an adverb); "I is" / "I."
# / "I)" stay option I.
_PRONOUN_I = re.compile(
    r"I(?:['’](?:m|d|ll|ve)\b|\s+(?:am|was|think|thought|believe|believed|guess|suppose|reckon|assume|expect|hope|"
    r"choose|chose|pick|picked|select|selected|go|went|would|will|should|could|can|cannot|can't|must|might|may|need|"
    r"see|saw|know|knew|feel|felt|say|said|mean|conclude|concluded|agree|do|did|don't|didn't|have|had|get|got|want|"
    r"find|found|notice|noticed|recall|calculated|computed|counted|obtained|checked|verified|made|also|still|now|"
    r"just|really|first|then|initially|misread|missed)\b)")
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")


def _letter_of(answer: str, options: list[str]) -> str | None:
    """The option a short explicit answer names: "B", "(B)", "B.", "B) 42", "**B**", "option B", "\\text{B}", or the
    option's own text (normalised, or the same number). None if it names none or several."""
    a = _TEXT_CMD.sub(r"\1", _clean(normalize_unicode(answer))).strip()
    options = [normalize_unicode(str(o)) for o in options]
    m = _LETTER_FORM.match(a)
    # A lower-case letter counts only alone ("b", "(b)"): "a cat" is an article, not option A.
    if m and not _PRONOUN_I.match(a, m.start(1)) and (
            m.group(1).isupper() or re.fullmatch(r"[(\[]?[a-z][)\]]?", a)):
        index = ord(m.group(1).upper()) - 65
        return chr(65 + index) if index < len(options) else None
    norm = normalize_text(a)
    hits = [i for i, o in enumerate(options) if norm and normalize_text(o) == norm]
    if not hits and (value := _number_value(a)) is not None:
        hits = [i for i, o in enumerate(options) if _number_value(o) == value]
    return chr(65 + hits[0]) if len(hits) == 1 else None


def parse_multiple_choice(response: str, options: list[str]) -> str | None:
    """The letter a response chooses, option i having letter chr(65 + i); None if it chooses none.

    An explicit answer (see `extract_answer`) that names an option wins. Otherwise MMMU's official rules
    (parse_multi_choice_response): candidates are letters written "(B)"; failing those, letters standing alone; failing
    those, and only in responses longer than 5 words, options whose text appears (case-insensitive). Several candidates
    -> the one mentioned last. Deviations: MMMU picks a random letter when nothing matches; a reward must not, so None.
    A capital "I" used as a pronoun ("I think") is no letter. Unicode is normalised first (`normalize_unicode`).
    """
    response, options = normalize_unicode(response), [normalize_unicode(str(o)) for o in options]
    explicit = extract_answer(response)
    if explicit is not None and (letter := _letter_of(explicit, options)) is not None:
        return letter
    letters = [chr(65 + i) for i in range(len(options))]
    text = " " + response.strip().strip(",.!?;:'") + " "
    found = {c: text.rfind(f"({c})") for c in letters if f"({c})" in text}
    if not found:
        found = {m.group(1): m.start() for m in _BARE_LETTER.finditer(text)
                 if m.group(1) in letters and not _PRONOUN_I.match(text, m.start(1))}
    if not found and len(text.split()) > 5:
        low = text.lower()
        found = {c: low.rfind(o) for c, o in zip(letters, (o.strip().lower() for o in options)) if o and o in low}
    return max(found, key=found.get) if found else None


# ----------------------------------------------------------------------------- open answers (MMMU rules, for eval.py)

_OPEN_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
# MMMU's three number patterns; (?<!\d) only stops matches from starting mid-number, which keeps the scan linear on
# long digit runs without changing what is found.
_OPEN_NUMBERS = [re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b"),
                 re.compile(r"-?(?<!\d)\d+(?:\.\d+)?[eE][+-]?\d+"),
                 re.compile(r"-?(?:(?<!\d)\d+\.\d+|\.\d+|(?<!\d)\d+\b)(?![eE][+-]?\d+)(?![,\d])")]


def mmmu_normalize(s: str) -> list[str | float]:
    """MMMU's normalize_str: a number becomes a float rounded to 2 places; a string is lower-cased, and a single
    character is padded with a space on either side so that it cannot match inside a word."""
    s = s.strip()
    try:
        return [round(float(s.replace(",", "")), 2)]
    except ValueError:
        s = s.lower()
        return [" " + s, s + " "] if len(s) == 1 else [s]


def parse_open(response: str) -> list[str | float]:
    """MMMU's parse_open_response: candidate answers of an open question (strings and numbers), for `match_open`.

    Each line's shortest tail after an indicator ("so ", "is ", "therefore ", ..., and "=" on the last line) is a key
    response (the whole response if none); the candidates are those plus every number in them, normalised.
    MMMU also splits on r"\\.\\s(?=[A-Z])" but only after lower-casing, so that split never fires: we split on lines.
    """
    lines = response.strip().strip(".").lower().split("\n")
    keys = []
    for i, line in enumerate(lines):
        indicators = _OPEN_INDICATORS + (("=",) if i == len(lines) - 1 else ())
        shortest = ""  # MMMU keeps the shortest tail, but an empty one is replaced by whatever comes next
        for tail in (line.split(ind)[-1].strip() for ind in indicators if ind in line):
            if not shortest or len(tail) < len(shortest):
                shortest = tail
        if shortest and shortest not in (":", ",", ".", "!", "?", ";", "'"):
            keys.append(shortest)
    keys = keys or [response.strip().strip(".").lower()]
    candidates = keys + [n for k in keys for pattern in _OPEN_NUMBERS for n in pattern.findall(k)]
    return list(dict.fromkeys(x for c in candidates for x in mmmu_normalize(c)))


def match_open(answer: str | list[str], candidates: list[str | float]) -> bool:
    """MMMU's eval_open: a number candidate must equal a gold number; a string candidate must contain a gold string."""
    golds = [x for a in ([answer] if isinstance(answer, str) else answer) for x in mmmu_normalize(a)]
    return any(any(isinstance(g, str) and g in c for g in golds) if isinstance(c, str) else c in golds
               for c in candidates)


# ----------------------------------------------------------------------------- equivalence

_NUMBER = re.compile(r"(?P<mant>[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[+-]?\.\d+)"
                     r"(?:[eE](?P<e1>[+-]?\d{1,3})(?![\d])|\s*(?:\\times|\\cdot|×)\s*10\^\{?(?P<e2>[+-]?\d{1,3})\}?)?")
_UNIT_CMDS = re.compile(r"\\(?:text|textrm|mathrm|mbox|rm)\b|\\[,;:! ]|\^\{?-?\d+\}?")
_UNIT_CHARS = re.compile(r"[A-Za-zµμΩÅ°/·.\s{}]*")
_DEGREES = re.compile(r"\s*(?:\^\s*\{?\\circ\}?|°)\s*")


def _is_unit(rest: str) -> bool:
    """Whether what follows a number is a unit ("cm", " m/s^2", "\\,\\mathrm{kg}", "^\\circ") and not more maths
    ("x", "\\pi", "/2", "+1"). One bare letter glued to the number ("5x") is a variable, not a unit."""
    if not rest.strip() or _DEGREES.fullmatch(rest):
        return True
    bare = _UNIT_CMDS.sub(" ", rest)
    if "\\" in bare or not _UNIT_CHARS.fullmatch(bare):
        return False
    letters = sum(c.isalpha() for c in bare)
    return letters >= 2 or (letters == 1 and rest[0] in " \t\\")


def _split_number(s: str, allow_unit: bool) -> tuple[str, int, bool] | None:
    """(mantissa without thousands separators, power of ten, is_percent) if `s` is a single number, optionally in
    scientific notation ("1.5e3", "1.5\\times 10^{3}"), followed by % or, if allowed, a unit; None otherwise."""
    s = s.replace("{,}", ",").replace("\\!", "").strip()
    m = _NUMBER.match(s)
    if not m:
        return None
    rest = s[m.end():]
    percent = rest.lstrip().startswith(("%", "\\%"))
    if percent:
        rest = rest.lstrip()[1 if rest.lstrip()[0] == "%" else 2:]
    if rest.strip() and not (allow_unit and _is_unit(rest)):
        return None
    return m.group("mant").replace(",", ""), int(m.group("e1") or m.group("e2") or 0), percent


def _number_value(s: str) -> Fraction | None:
    """Exact value of a plain number (units allowed, % divides by 100); None if `s` is anything else."""
    parts = _split_number(_clean(s), True) if len(s) <= MAX_ANSWER_CHARS else None
    if parts is None:
        return None
    value = Fraction(parts[0]) * Fraction(10) ** parts[1]
    return value / 100 if parts[2] else value


def normalize_text(s: str) -> str:
    """Free-text normal form: LaTeX text wrappers and markup removed, lower case, punctuation and articles dropped,
    whitespace collapsed."""
    s = re.sub(r"\\[A-Za-z]+|[{}$*_]", " ", _TEXT_CMD.sub(r"\1", s)).lower()
    s = re.sub(r"\b(?:a|an|the)\b", " ", re.sub(r"[^\w\s]", " ", s))
    return " ".join(s.split())


def _prepare_math(s: str, answer_type: str) -> str:
    """Rewrite what math-verify gets wrong: scientific "1.5e3" (it reads e as Euler's number), thousands separators
    and, for numeric answers, a trailing unit it cannot strip itself ("5 m/s" would become 5*m/s)."""
    s = _clean(s)
    parts = _split_number(s, allow_unit=answer_type == "numeric") if len(s) <= MAX_ANSWER_CHARS else None
    if parts is None:
        return s
    mantissa, exponent, percent = parts
    return mantissa + (f"\\times 10^{{{exponent}}}" if exponent else "") + ("\\%" if percent else "")


def _too_big(s: str) -> bool:
    """Beyond the caps that keep sympy fast (see MAX_ANSWER_CHARS); the depth scan only runs on short strings."""
    if len(s) > MAX_ANSWER_CHARS:
        return True
    depth = deepest = 0
    for c in s:
        depth += (c in "({[") - (c in ")}]")
        deepest = max(deepest, depth)
    return deepest > MAX_ANSWER_DEPTH


class _Alarm(BaseException):
    """Raised by our SIGALRM handler; a BaseException, so `except Exception` in math-verify or sympy cannot eat it."""


def _with_time_limit(fn, seconds: float, *args):
    """fn(*args), stopped with AnswerTimeout after `seconds` of wall time.

    A SIGALRM interval timer interrupts pure-Python work anywhere (sympy, the ANTLR parser); if some library catches
    the interrupt anyway, the handler fires again every 50 ms until fn gives up. Signals only exist in the main thread,
    which is where we run: the trainer's main thread and the batch scorer's worker processes (a ProcessPoolExecutor
    runs tasks in its workers' main threads). Called from another thread, fn runs unlimited and the answer caps above
    are the only guard. An outer interval timer is restored afterwards.
    """
    if threading.current_thread() is not threading.main_thread():
        return fn(*args)
    live = [True]

    def on_alarm(signum, frame):
        if live[0]:
            raise _Alarm

    start = time.monotonic()
    previous = signal.signal(signal.SIGALRM, on_alarm)
    outer_delay, outer_interval = signal.setitimer(signal.ITIMER_REAL, seconds, 0.05)
    try:
        try:
            return fn(*args)
        finally:
            live[0] = False  # first thing: from here on a late alarm is a no-op
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous if previous is not None else signal.SIG_DFL)
            if outer_delay > 0:
                signal.setitimer(signal.ITIMER_REAL, max(outer_delay - (time.monotonic() - start), 1e-3),
                                 outer_interval)
    except _Alarm:
        raise AnswerTimeout(f"equivalence check exceeded {seconds:g} s") from None


def _log10_size(e) -> float:
    """log10 of an upper bound on the numbers in a parsed (unevaluated) answer; inf if building them could stall.

    The signal cannot stop C code: evaluating a power tower such as 10^{10^{10^{10}}} makes mpmath shift an integer to
    billions of bits (minutes, gigabytes). So a numeric power whose exponent may exceed 10^5, or a factorial of more
    than 10^5, never reaches math-verify's comparison. Symbols count as 10: x^{100000} is harmless symbolically.
    """
    if getattr(e, "is_Rational", False):
        return max(abs(e.p).bit_length(), e.q.bit_length()) * 0.302
    sizes = [_log10_size(a) for a in getattr(e, "args", ())]
    if not sizes or math.inf in sizes:
        return math.inf if sizes else 1.0
    if getattr(e, "is_Pow", False) or type(e).__name__ in ("exp", "factorial"):
        base, exponent = (sizes[0], sizes[1]) if e.is_Pow else (1.0, sizes[0])  # exp(x) = e^x, n! < n^n
        if exponent > 5 and base >= 0.6 and not e.free_symbols:  # |base| >= 2 (or a fraction), exponent > 10^5
            return math.inf
        return min(max(base, exponent) * 10.0 ** min(exponent, 299), 1e300)
    return min(sum(sizes) + 1.0, 1e300)


def _verify_math(gold: str, pred: str) -> bool:
    # Timeouts off (None): math-verify's are whole-second signal.alarm calls that would cancel our timer.
    g = mv_parse(f"${gold}$", parsing_timeout=None)
    p = mv_parse(f"${pred}$", parsing_timeout=None)
    if any(_log10_size(x) == math.inf for x in g + p if not isinstance(x, str)):
        return False
    return bool(g and p) and mv_verify(g, p, timeout_seconds=None)


def is_equivalent(pred: str, gold: str, answer_type: str = "expression",
                  time_limit_s: float = DEFAULT_TIME_LIMIT_S) -> bool:
    """Whether answer `pred` equals `gold`: normalised strings for "text", math-verify for "numeric"/"expression"
    (after `_prepare_math`; answers beyond the size caps are compared as strings), both after `normalize_unicode`.
    Raises AnswerTimeout."""
    pred, gold = normalize_unicode(pred), normalize_unicode(gold)
    if answer_type == "text":
        return normalize_text(pred) != "" and normalize_text(pred) == normalize_text(gold)
    pred, gold = _prepare_math(pred, answer_type), _prepare_math(gold, answer_type)
    if not pred or not gold or pred == gold:
        return bool(pred) and pred == gold
    if _too_big(pred) or _too_big(gold) or _set_vs_bracket(pred, gold):
        return False
    return _with_time_limit(_verify_math, time_limit_s, gold, pred)


def _set_vs_bracket(a: str, b: str) -> bool:
    """One side is a braced set, the other an interval or tuple: never equal. math-verify says they are, since it reads
    (1,3) as possibly a pair, and a pair as a set: gold (1,3) (an interval) would accept \\{1,3\\}."""
    a, b = (re.sub(r"\\(?:left|right)\b", "", s) for s in (a, b))
    is_set = [s.startswith("\\{") and s.endswith("\\}") for s in (a, b)]
    is_bracketed = [s[:1] in "([" and s[-1:] in ")]" for s in (a, b)]
    return is_set[0] != is_set[1] and (is_bracketed[0] or is_bracketed[1])


# ----------------------------------------------------------------------------- rewards

def final_answer(response: str, row: dict) -> str | None:
    """The answer a response gives for a (validated) row: a letter for multiple choice, else the explicit answer
    string of the answer region (see `answer_region`, `extract_answer`); None if it gives none. Only the region's last
    ANSWER_SCAN_CHARS characters are read, after `normalize_unicode`."""
    region = answer_region(response)
    if region is None:
        return None
    region = normalize_unicode(region[-ANSWER_SCAN_CHARS:])
    if row["answer_type"] == "multiple_choice":
        return parse_multiple_choice(region, row["options"])
    return extract_answer(region)


def _is_right(answer: str | None, row: dict, time_limit_s: float) -> float:
    if answer is None:
        return 0.0
    if row["answer_type"] == "multiple_choice":
        return float(answer == row["answer"])
    return float(is_equivalent(answer, row["answer"], row["answer_type"], time_limit_s))


def accuracy_reward(response: str, row: dict, time_limit_s: float = DEFAULT_TIME_LIMIT_S) -> float:
    """1.0 if the response's final answer is right, else 0.0. Raises AnswerTimeout (see `score` for the safe call)."""
    row = validate_row(row)
    return _is_right(final_answer(response, row), row, time_limit_s)


def think_ok(response: str) -> bool:
    """Exactly one <think>, then exactly one </think>, with something in between."""
    if response.count("<think>") != 1 or response.count("</think>") != 1:
        return False
    start, end = response.find("<think>"), response.find("</think>")
    return start < end and response[start + len("<think>"):end].strip() != ""


def format_reward(response: str, row: dict, require_think: bool = True) -> float:
    """1.0 if the response gives a final answer and, when required, one non-empty <think>...</think> block before it
    (the answer is only read after </think>). A template that pre-fills "<think>" must prepend it to the response."""
    has_answer = final_answer(response, validate_row(row)) is not None
    return float(has_answer and (not require_think or think_ok(response)))


def overlong_penalty(num_tokens: int, max_len: int, cache_len: int) -> float:
    """DAPO's soft overlong punishment: 0 up to max_len - cache_len tokens, then linear down to -1 at max_len, -1
    beyond."""
    if num_tokens <= max_len - cache_len:
        return 0.0
    if num_tokens > max_len:
        return -1.0
    return (max_len - cache_len - num_tokens) / cache_len


@dataclass
class RewardConfig:
    """reward = accuracy_weight x accuracy + format_weight x format + overlong_weight x overlong penalty. The default
    weights are Skywork-R1V3's (§3.1: R = 0.8 accuracy + 0.2 format); the overlong penalty is DAPO's, an option (the
    trainer turns it off with --overlong_buffer 0)."""
    accuracy_weight: float = 0.8
    format_weight: float = 0.2
    overlong_weight: float = 1.0
    max_len: int = 16384  # L_max, response tokens (R1V3 evaluates with 16K-64K)
    cache_len: int = 4096  # L_cache, the soft-penalty band below L_max (DAPO: 4096 of 20480)
    time_limit_s: float = DEFAULT_TIME_LIMIT_S  # per equivalence check
    require_think: bool = True  # format reward needs a <think>...</think> block

    def __post_init__(self):
        if not 0 <= self.cache_len <= self.max_len:
            raise ValueError(f"need 0 <= cache_len <= max_len, got {self.cache_len}, {self.max_len}")
        if self.time_limit_s <= 0:
            raise ValueError(f"time_limit_s must be > 0, got {self.time_limit_s}")


def _failed(error: str) -> dict:
    return {"accuracy": 0.0, "format": 0.0, "overlong": 0.0, "reward": 0.0, "error": error}


def score(response: str, row: dict, cfg: RewardConfig | None = None, num_tokens: int | None = None) -> dict:
    """Reward components of one response: {"accuracy", "format", "overlong", "reward", "error"}.

    reward = weighted sum of accuracy (1/0), format (1/0) and overlong penalty (0..-1, 0 when num_tokens is None).
    Never raises for a bad response: a timeout or error gives all components 0 and an "error" string (else None).
    Raises ValueError for a bad row, which is a data bug.
    """
    cfg = cfg or RewardConfig()
    row = validate_row(row)
    try:
        answer = final_answer(response, row)
        accuracy = _is_right(answer, row, cfg.time_limit_s)
        fmt = float(answer is not None and (not cfg.require_think or think_ok(response)))
        over = overlong_penalty(num_tokens, cfg.max_len, cfg.cache_len) if num_tokens is not None else 0.0
    except Exception as e:  # noqa: BLE001 - one bad response must not stop training
        return _failed(f"{type(e).__name__}: {str(e)[:200]}")
    total = cfg.accuracy_weight * accuracy + cfg.format_weight * fmt + cfg.overlong_weight * over
    return {"accuracy": accuracy, "format": fmt, "overlong": over, "reward": total, "error": None}


def reward(response: str, row: dict, cfg: RewardConfig | None = None, num_tokens: int | None = None) -> float:
    """The combined scalar reward (see `score`)."""
    return score(response, row, cfg, num_tokens)["reward"]


# ----------------------------------------------------------------------------- batch scoring

def _score_chunk(items: list[tuple], cfg: RewardConfig) -> list[dict]:
    return [score(response, row, cfg, n) for response, row, n in items]


def warm_up() -> None:
    """Pay sympy's lazy imports before the first timed check instead of inside it. Call once per process
    before scoring under a tight limit; the batch scorer's workers run it when they start."""
    for gold, pred in (("\\frac{1}{2}", "0.5"), ("(x+1)^2", "x^2+2x+1"), ("[1,2)", "\\{1,2\\}")):
        _verify_math(gold, pred)


# One pool per process, reused across calls: a fresh one is slow to start (each worker imports sympy and warms up).
# spawn, never fork: forking a training process that holds CUDA state or threads is unsafe.
_pools: dict[int, ProcessPoolExecutor] = {}


def _pool(workers: int) -> ProcessPoolExecutor:
    if workers not in _pools:
        _pools[workers] = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=warm_up)
    return _pools[workers]


def score_batch(responses: list[str], rows: list[dict], cfg: RewardConfig | None = None,
                num_tokens: list[int] | None = None, workers: int | None = None, verifier=None) -> list[dict]:
    """`score` for each (response, row[, num_tokens]) pair, in order; a process pool on all cores (or `workers`) when
    there are at least SERIAL_BELOW responses. A failing item gets zero rewards and an "error" string, the rest are
    scored. Items of a worker that dies are rescored in this process; those of a worker stuck past a generous deadline
    (only possible outside Python code) get errors. Rows are validated first (ValueError); `responses` and `rows` must
    be lists of strings and dicts (TypeError). `verifier` (a verifier.Verifier, R1V3's "rule OR LLM" accuracy):
    the items the rules score 0 are asked about, in this process, and those it accepts get accuracy 1."""
    results = _score_batch(responses, rows, cfg, num_tokens, workers)
    return results if verifier is None else verifier.rescore(responses, rows, results, cfg or RewardConfig())


def _score_batch(responses, rows, cfg, num_tokens, workers) -> list[dict]:
    # A string is a sequence too: scoring "abc" against three rows would score its characters.
    for name, items, kind in (("responses", responses, str), ("rows", rows, dict)):
        if not isinstance(items, (list, tuple)):
            raise TypeError(f"score_batch: {name} must be a list of {kind.__name__}, got {type(items).__name__}")
        bad = next((i for i, x in enumerate(items) if not isinstance(x, kind)), None)
        if bad is not None:
            raise TypeError(f"score_batch: {name}[{bad}] must be a {kind.__name__}, got {type(items[bad]).__name__}")
    cfg = cfg or RewardConfig()
    n = len(responses)
    if len(rows) != n or (num_tokens is not None and len(num_tokens) != n):
        raise ValueError(f"{n} responses but {len(rows)} rows / {len(num_tokens or [])} token counts")
    items = list(zip(responses, [validate_row(r) for r in rows], num_tokens or [None] * n))
    workers = workers or os.cpu_count() or 1
    if workers <= 1 or n < SERIAL_BELOW:
        return _score_chunk(items, cfg)
    size = -(-n // (4 * workers))  # ~4 chunks per worker: a slow item delays a quarter of a worker's share
    chunks = [items[i:i + size] for i in range(0, n, size)]
    try:
        futures = [_pool(workers).submit(_score_chunk, chunk, cfg) for chunk in chunks]
    except RuntimeError:  # BrokenProcessPool: the cached pool lost a worker while idle; start a fresh one
        _pools.pop(workers).shutdown(wait=False, cancel_futures=True)
        futures = [_pool(workers).submit(_score_chunk, chunk, cfg) for chunk in chunks]
    # Each item is bounded by cfg.time_limit_s inside its worker; this deadline only catches a worker stuck outside
    # Python (it covers pool start-up and every item timing out, with 2x slack).
    done, _ = wait(futures, timeout=60 + 2 * (n / workers + size) * (cfg.time_limit_s + 0.1))
    results = []
    for chunk, future in zip(chunks, futures):
        if future not in done:
            results.extend(_failed("worker deadline exceeded") for _ in chunk)
        elif future.exception() is not None:
            # The worker died (killed, or spawn could not re-import __main__): score here, under the same limits.
            logging.getLogger(__name__).warning("reward worker failed (%r); scoring in-process", future.exception())
            results.extend(_score_chunk(chunk, cfg))
        else:
            results.extend(future.result())
    if len(done) < len(futures) or any(f.exception() for f in done):
        _pools.pop(workers).shutdown(wait=False, cancel_futures=True)  # broken or hung: the next call starts afresh
    return results
