"""MMMU as its authors define it: its 30 subjects under 6 disciplines, its release parquet files, and its official
answer rules, plus the rule Skywork-R1V3 released for it; eval.py runs a model on these rows and judges with them.

What it follows:
- MMMU's official eval (github.com/MMMU-Benchmark/MMMU, mmmu/utils): `parse_multi_choice_response` +
  `eval_multi_choice` for multiple choice (re-implemented here as `mmmu_multiple_choice`), `parse_open_response` +
  `eval_open` for open questions (reward.parse_open / reward.match_open, which follow them exactly), quirks included
  (2-decimal rounding, substring matches, any number in the key phrase, option text only past 5 words, end
  punctuation stripped one character at a time in a fixed order). Where the official script picks a random letter, the
  verdict here is "no answer" (wrong, counted as such). The rules read the final answer only: the content of the last
  \\boxed{} after </think>, else the text after </think> (the whole response without a think block), stripped of
  surrounding whitespace; a think block that never closes has none. Subjects and disciplines: its DOMAIN_CAT2SUB_CAT;
  accuracy is per question (its calculate_ins_level_acc).
- Skywork-R1V3's released rule (`r1v3_verdict`): the last \\boxed{} matches the answer after normalisation.

How this differs from reward.py, deliberately: rewards are lenient so that training does not punish a right answer
for its spelling (an explicit answer naming an option by letter, "B.", "**B**", lower case or its text wins; numbers
and expressions are compared by math-verify; Unicode is normalised; only the answer's last 16K characters are read).
Evaluation applies MMMU's rules as written, so that numbers compare with published ones. Rows of the project's JSONL
files (no `question_type`) are judged by MMMU's rules too: multiple_choice rows as multiple choice, numeric and text
rows as open questions; expression rows by math-verify (reward.is_equivalent), since MMMU's substring rule would
accept "x^2+1" inside "x^2+10" and cannot see that (x+1)^2 is x^2+2x+1.

    python -m pytest -q tests/test_eval.py -k "rule or verdict"    # the rule table, case by case
"""
import ast
from dataclasses import dataclass
from pathlib import Path

import cli
import reward
from data import load_rows

# -----------------------------------------------------------------------------------------------------------------
# MMMU's 30 subjects under its 6 disciplines (DOMAIN_CAT2SUB_CAT of the official data_utils.py)

DISCIPLINES = {
    "Art & Design": ["Art", "Art_Theory", "Design", "Music"],
    "Business": ["Accounting", "Economics", "Finance", "Manage", "Marketing"],
    "Science": ["Biology", "Chemistry", "Geography", "Math", "Physics"],
    "Health & Medicine": ["Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine",
                          "Pharmacy", "Public_Health"],
    "Humanities & Social Science": ["History", "Literature", "Sociology", "Psychology"],
    "Tech & Engineering": ["Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics",
                           "Energy_and_Power", "Materials", "Mechanical_Engineering"],
}
DISCIPLINE_OF = {s: d for d, subjects in DISCIPLINES.items() for s in subjects}
OTHER = "Other"  # the discipline of subjects MMMU does not have (the project's own data)

# -----------------------------------------------------------------------------------------------------------------
# Judging: the final answer, MMMU's rules, the verdict


def final_answer_text(response: str) -> str | None:
    """What the rules read: the content of the last \\boxed{} after </think>, else the text after </think> (the whole
    response without a think block), stripped; None if <think> opens and never closes (cut off while thinking)."""
    region = reward.answer_region(response)
    if region is None:
        return None
    boxed = reward.last_boxed(region)
    return (boxed if boxed is not None else region).strip()


def as_list(value) -> list | None:
    """A list, or a string holding a Python list literal ("['24', '24.0']", how MMMU's files store lists); else
    None."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            parsed = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return None
        return list(parsed) if isinstance(parsed, (list, tuple)) else None
    return None


def gold_answers(answer) -> str | list[str]:
    """A row's answer as MMMU's eval takes it: one string, or a list of strings meaning "any of these"."""
    golds = as_list(answer)
    return [str(a) for a in golds] if golds is not None else str(answer)


# The official parser strips these one after another (str.strip(c) per character), not as one set: "B.'" keeps its
# period, because the quote is stripped after the periods.
_MMMU_STRIP = (",", ".", "!", "?", ";", ":", "'")


def mmmu_multiple_choice(response: str, options: list) -> tuple[str | None, str]:
    """(letter, rule) by MMMU's parse_multi_choice_response, option i having letter chr(65 + i). Candidates: letters
    written "(B)" (rule "bracketed"); failing those, letters between spaces, " B " ("spaced"); failing those, and only
    in responses of more than 5 words, options whose text appears, case-insensitively ("option text"). Several
    candidates: the one whose last mention comes last, a tie going to the earlier letter. None ("none") where the
    official script picks a random letter."""
    for c in _MMMU_STRIP:
        response = response.strip(c)
    response = f" {response} "
    letters = [chr(65 + i) for i in range(len(options))]
    candidates = {c: response.rfind(f"({c})") for c in letters if f"({c})" in response}
    rule = "bracketed"
    if not candidates:
        candidates, rule = {c: response.rfind(f" {c} ") for c in letters if f" {c} " in response}, "spaced"
    if not candidates and len(response.split()) > 5:
        low = response.lower()
        texts = [str(o).lower() for o in options]
        candidates, rule = {c: low.rfind(t) for c, t in zip(letters, texts) if t in low}, "option text"
    if not candidates:
        return None, "none"
    return max(candidates, key=candidates.get), rule  # max keeps the first of equal keys, as np.argmax does


def rules_of(row: dict) -> str:
    """Which rules judge a row: "multiple-choice" or "open" (MMMU's), or "math" (math-verify, the project's expression
    rows). MMMU rows say so in `question_type`; the project's rows by `answer_type`."""
    if "question_type" in row:
        return "multiple-choice" if row["question_type"] == "multiple-choice" else "open"
    kind = row.get("answer_type") or ("multiple_choice" if row.get("options") else "numeric")
    return {"multiple_choice": "multiple-choice", "expression": "math"}.get(kind, "open")


@dataclass
class Verdict:
    answer: str | None  # the final answer the rules read (see final_answer_text); None: the response gives none
    parsed: str | list | None  # multiple choice: the letter chosen; open: MMMU's normalised candidates
    rule: str  # what decided: bracketed / spaced / option text / none; number / substring / no match; math-verify /
    #            timeout; no final answer
    correct: bool

    @property
    def label(self) -> str:
        if self.correct:
            return "correct"
        return "no answer" if not self.answer or self.parsed is None else "wrong"


SCORINGS = ("mmmu", "r1v3")


def r1v3_verdict(response: str, row: dict, time_limit_s: float = reward.DEFAULT_TIME_LIMIT_S) -> Verdict:
    """Skywork-R1V3's released MMMU rule: the last \\boxed{} after </think> must match the answer after
    normalisation. Multiple choice: the letter it names ("B", "(B)", "B.", "\\text{B}", or an option's exact text;
    reward's lenient letter reading); open answers: the same number (exactly, after units and thousands separators)
    or the same normalised string (case, punctuation, articles, LaTeX text wrappers); the project's expression rows:
    math-verify. A response without a \\boxed{} has no answer (rule "no boxed answer"). Its other half, an LLM judge
    asked when this rule says wrong, is `evaluate`'s `judge`."""
    region = reward.answer_region(response)
    boxed = reward.last_boxed(reward.normalize_unicode(region[-reward.ANSWER_SCAN_CHARS:])) if region else None
    if not boxed:
        return Verdict(boxed, None, "no boxed answer", False)
    kind, gold = rules_of(row), gold_answers(row["answer"])
    golds = [gold] if isinstance(gold, str) else gold
    if kind == "multiple-choice":
        letter = reward._letter_of(boxed, as_list(row.get("options")) or [])
        return Verdict(boxed, letter, "letter", letter is not None and letter in golds)
    if kind == "math":
        try:
            return Verdict(boxed, boxed, "math-verify", reward.is_equivalent(boxed, golds[0], "expression",
                                                                             time_limit_s))
        except reward.AnswerTimeout:
            return Verdict(boxed, boxed, "timeout", False)
    value = reward._number_value(boxed)
    if value is not None and any(reward._number_value(g) == value for g in golds):
        return Verdict(boxed, boxed, "number", True)
    text = reward.normalize_text(boxed)
    right = bool(text) and any(reward.normalize_text(reward.normalize_unicode(g)) == text for g in golds)
    return Verdict(boxed, boxed, "string" if right else "no match", right)


def verdict(response: str, row: dict, time_limit_s: float = reward.DEFAULT_TIME_LIMIT_S,
            scoring: str = "mmmu") -> Verdict:
    """The verdict on one response to `row` (keys: answer, and question_type + options for MMMU rows, answer_type +
    options for the project's rows; see `rules_of`) by MMMU's official rules (`scoring` "mmmu") or R1V3's released
    rule ("r1v3", `r1v3_verdict`). Never raises for a response."""
    if scoring == "r1v3":
        return r1v3_verdict(response, row, time_limit_s)
    answer = final_answer_text(response)
    if not answer:
        return Verdict(answer, None, "no final answer", False)
    kind, gold = rules_of(row), gold_answers(row["answer"])
    if kind == "multiple-choice":
        options = as_list(row.get("options")) or []
        letter, rule = mmmu_multiple_choice(answer, options)
        golds = [gold] if isinstance(gold, str) else gold
        return Verdict(answer, letter, rule, letter is not None and letter in golds)
    if kind == "math":
        try:
            right = reward.is_equivalent(answer, gold if isinstance(gold, str) else gold[0], "expression", time_limit_s)
        except reward.AnswerTimeout:
            return Verdict(answer, answer, "timeout", False)
        return Verdict(answer, answer, "math-verify", right)
    candidates = reward.parse_open(answer)
    golds = [g for a in ([gold] if isinstance(gold, str) else gold) for g in reward.mmmu_normalize(a)]
    if any(not isinstance(c, str) and c in golds for c in candidates):
        return Verdict(answer, candidates, "number", True)
    right = reward.match_open(gold, candidates)
    return Verdict(answer, candidates, "substring" if right else "no match", right)


def judge(response: str, row: dict) -> bool:
    """Whether `response` answers `row` correctly by MMMU's official rules (see `verdict`)."""
    return verdict(response, row).correct

# -----------------------------------------------------------------------------------------------------------------
# Data: MMMU's parquet files, the project's JSONL rows

MMMU_IMAGES = 7  # image_1 ... image_7


def subject_of(mmmu_id: str, folder: str) -> str:
    """An MMMU id is split_Subject_Name_number ("validation_Art_Theory_12"); the official eval groups by the middle.
    Files whose ids say nothing known fall back to their folder's name (the release has one folder per subject)."""
    middle = "_".join(mmmu_id.split("_")[1:-1])
    return middle if middle in DISCIPLINE_OF else folder


def _image_bytes(cell) -> bytes | None:
    """An image column's cell: a struct {bytes, path} in the release, or plain bytes; None when absent."""
    if isinstance(cell, dict):
        cell = cell.get("bytes")
    return bytes(cell) if cell else None


def load_mmmu(path, split: str = "validation") -> list[dict]:
    """MMMU rows from a parquet file or a folder of them (only files whose name starts with `split`, as in the
    release's Subject/validation-00000-of-00001.parquet), in the row shape `evaluate` takes: id, question, options (a
    list), answer, question_type, image (a list of 7 entries: the image's encoded bytes, or None), subject, and
    subfield / topic_difficulty / img_type as given. Needs pyarrow."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading MMMU's parquet files needs pyarrow: pip install pyarrow "
                          "(or convert the data to the JSONL rows of data.py)") from None
    import pyarrow
    path = Path(path)
    files = sorted(f for f in path.rglob("*.parquet") if f.name.startswith(split)) if path.is_dir() else [path]
    if path.is_dir() and not files:
        found = sorted({f.name.split("-")[0] for f in path.rglob("*.parquet")})
        raise FileNotFoundError(f"no parquet files for split {split!r} in {path} (" +
                                (f"it has splits {found})" if found else "it has no .parquet files at all)"))
    if not files[0].is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    tables = []
    for f in files:  # every file's columns are checked before any row is read
        try:
            columns = set(pq.read_schema(f).names)
        except (pyarrow.ArrowException, OSError) as e:
            raise cli.InputError(f"{f}: not a parquet file ({type(e).__name__}: {e})") from None
        if missing := sorted({"id", "question", "answer"} - columns):
            raise cli.InputError(f"{f}: missing column(s) {missing}")
        tables.append(f)
    rows = []
    for f in tables:
        for rec in pq.read_table(f).to_pylist():
            options = as_list(rec.get("options") or "[]")
            if options is None:
                raise cli.InputError(f"{f}: row {rec.get('id')!r}: options {rec.get('options')!r} is not a list "
                                     f"literal")
            rows.append({
                "id": str(rec["id"]), "question": rec["question"], "options": [str(o) for o in options],
                "answer": rec["answer"], "question_type": rec.get("question_type") or "multiple-choice",
                "answer_type": "multiple_choice" if rec.get("question_type", "multiple-choice") == "multiple-choice"
                else "text",  # judged by question_type; this only keeps the project's row shape
                "image": [_image_bytes(rec.get(f"image_{i}")) for i in range(1, MMMU_IMAGES + 1)],
                "subject": subject_of(str(rec["id"]), f.parent.name if path.is_dir() else ""),
                **{k: rec.get(k) for k in ("subfield", "topic_difficulty", "img_type")}})
    return rows


def load_eval_rows(path, split: str = "validation", subjects=None, limit: int | None = None) -> list[dict]:
    """Rows from MMMU parquet (a .parquet file or a folder) or a project JSONL file (data.load_rows), then only
    `subjects` (case-insensitive; None: all) and at most `limit` questions per subject, in file order."""
    path = Path(path)
    rows = load_mmmu(path, split) if path.is_dir() or path.suffix == ".parquet" else load_rows(path)
    if subjects:
        wanted = {s.lower() for s in subjects}
        rows = [r for r in rows if r.get("subject", "").lower() in wanted]
    if limit:
        kept, seen = [], {}
        for r in rows:
            seen[r.get("subject", "")] = seen.get(r.get("subject", ""), 0) + 1
            if seen[r.get("subject", "")] <= limit:
                kept.append(r)
        rows = kept
    if not rows:
        raise cli.InputError(f"{path}: no rows left for split {split!r}, subjects {subjects}, limit {limit}")
    return rows
