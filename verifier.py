"""An LLM verifier: a second opinion on answers the rule check marks wrong or cannot read (Skywork-R1V3's accuracy
reward, §3.1: correct if a rule check OR an LLM verifier, "likely" Qwen2.5-Instruct-32B, says so; its MMMU judge).

Only responses the rules reject are asked about (a rule-correct answer never reaches the model), one prompt per
response: the question, the reference answer and the response's extracted answer under a short fixed instruction that
asks for "yes" or "no". The verdict is read from the first answer token's logits in one teacher-forced forward (no
generation): yes when the log-sum-exp over the tokenizer's single-token spellings of "yes" ("yes", " yes", "Yes",
...) beats that over "no". Prompts are rendered with the verifier's own chat template (data.load_chat_template, never
opening a think block) or ChatML, right-padded, as many per forward as fit `batch_tokens`. Each batch runs under a
time limit; a batch that raises or times out keeps the rule's verdicts and is counted in `stats` ("errors"), never
stops training or evaluation. Under torchrun every rank asks about its own rollouts: there are no collectives here.

    python train_rl.py --init_from CKPT --data train.jsonl --verifier Qwen2.5-7B-Instruct     # reward: rule OR LLM
    python eval.py --ckpt CKPT --data MMMU/ --scoring r1v3 --judge Qwen2.5-7B-Instruct        # R1V3's MMMU protocol
"""
import time

import torch

import reward
from checkpoint import load_model
from data import (ChatTemplate, load_chat_template, load_tokenizer, pad_id, question_text, render_chat, right_pad,
                  token_batches)
from parallel import precision

INSTRUCTION = ("Decide whether a student's final answer to a question is equivalent to the reference answer "
               "(the same value, expression, option or meaning, written any way).\n\n"
               "Question: {question}\n\nReference answer: {reference}\n\nStudent's answer: {answer}\n\n"
               "Is the student's answer equivalent to the reference answer? Reply with only \"yes\" or \"no\".")
# Long questions and answers are cut to these many characters: the verdict needs the gist, and a bounded prompt keeps
# a batch's time bounded.
MAX_QUESTION_CHARS, MAX_ANSWER_CHARS = 4000, 1000
# A response without an explicit final answer is shown by the end of its answer region, where a conclusion sits.
UNPARSED_TAIL_CHARS = 400


def spelling_ids(tokenizer, word: str) -> list[int]:
    """Ids of the single-token spellings of `word` ("yes", " yes", "Yes", " Yes", "YES", " YES")."""
    ids = []
    for variant in (word, " " + word, word.capitalize(), " " + word.capitalize(), word.upper(), " " + word.upper()):
        pieces = tokenizer.encode(variant, add_special_tokens=False).ids
        if len(pieces) == 1 and tokenizer.decode(pieces).strip().lower() == word and pieces[0] not in ids:
            ids.append(pieces[0])
    return ids


def reference_text(row: dict) -> str:
    """A validated row's answer as the verifier reads it; multiple choice with its option's text ("B. 42")."""
    if row.get("answer_type") == "multiple_choice" and len(row["answer"]) == 1:
        i = ord(row["answer"]) - 65
        options = row.get("options") or []
        return f"{row['answer']}. {options[i]}" if 0 <= i < len(options) else row["answer"]
    return str(row["answer"])


def candidate_text(response: str, row: dict) -> str | None:
    """What the verifier is shown of a response: its final answer (reward.final_answer; multiple choice: the letter
    with its option), else the tail of its answer region; None if it has nothing to judge (cut off while thinking,
    or empty)."""
    region = reward.answer_region(response)
    if region is None or not region.strip():
        return None
    answer = reward.final_answer(response, row)
    if answer is None:
        return region.strip()[-UNPARSED_TAIL_CHARS:]
    if row.get("answer_type") == "multiple_choice":
        return reference_text({**row, "answer": answer})
    return answer


class Verifier:
    """A text checkpoint (e.g. Qwen2.5-Instruct) asked whether answers are equivalent to reference answers."""

    def __init__(self, checkpoint_dir, device="cpu", dtype: torch.dtype = torch.float32, batch_tokens: int = 16384,
                 time_limit_s: float = 120.0, model=None, tokenizer=None, template: ChatTemplate | None = None):
        """Loads `checkpoint_dir` with checkpoint.load_model and its tokenizer and chat template (or takes `model`,
        `tokenizer`, `template` as given). `time_limit_s` bounds each batch (one forward of `batch_tokens`)."""
        self.path = str(checkpoint_dir)
        self.model = model if model is not None else load_model(checkpoint_dir, dtype=dtype, device=device)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(checkpoint_dir)
        if template is None and checkpoint_dir is not None:
            template = load_chat_template(checkpoint_dir)
        self.template = template
        self.yes_ids, self.no_ids = spelling_ids(self.tokenizer, "yes"), spelling_ids(self.tokenizer, "no")
        if not self.yes_ids or not self.no_ids:
            raise ValueError(f"{self.path}: the verifier's tokenizer has no single-token 'yes' / 'no' "
                             f"(found {len(self.yes_ids)} / {len(self.no_ids)} spellings)")
        self.batch_tokens, self.time_limit_s = batch_tokens, time_limit_s
        self.stats = dict(asked=0, yes=0, errors=0, failed=0, seconds=0.0, last_error=None)

    def prompt_ids(self, question: str, reference: str, answer: str) -> list[int]:
        content = INSTRUCTION.format(question=question[:MAX_QUESTION_CHARS], reference=reference[:MAX_ANSWER_CHARS],
                                     answer=answer[:MAX_ANSWER_CHARS])
        text = render_chat([{"role": "user", "content": content}], self.template, think=False)
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    @torch.no_grad()
    def _yes(self, prompts: list[list[int]]) -> list[bool]:
        """One teacher-forced forward: the first answer token's "yes" mass against its "no" mass, per prompt."""
        param = self.model.language_model.embed_tokens.weight
        padded = right_pad(prompts, [[] for _ in prompts], pad_id(self.model.config))
        h = self.model.hidden(padded.input_ids.to(param.device))  # (B, T, C)
        last = torch.tensor([len(p) - 1 for p in prompts], device=param.device)
        logits = self.model.language_model.logits(h[torch.arange(len(prompts), device=param.device), last])  # (B, V)
        yes = torch.logsumexp(logits[:, self.yes_ids], -1)
        no = torch.logsumexp(logits[:, self.no_ids], -1)
        return (yes > no).tolist()

    def judge(self, items: list[tuple[str, str, str]]) -> list[bool | None]:
        """For each (question, reference answer, candidate answer): True (equivalent), False, or None where its batch
        failed (an exception, or past time_limit_s), which is counted in stats["errors"] (batches) and
        stats["failed"] (items)."""
        prompts = [self.prompt_ids(*item) for item in items]
        out: list[bool | None] = [None] * len(items)
        for batch in token_batches([len(p) for p in prompts], self.batch_tokens):
            t0 = time.perf_counter()
            try:
                verdicts = reward._with_time_limit(self._yes, self.time_limit_s, [prompts[i] for i in batch])
            except Exception as e:  # noqa: BLE001 - a failed verifier leaves the rule's verdict, never stops a run
                self.stats["errors"] += 1
                self.stats["failed"] += len(batch)
                self.stats["last_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                continue
            finally:
                self.stats["seconds"] += time.perf_counter() - t0
            for i, v in zip(batch, verdicts):
                out[i] = bool(v)
        self.stats["asked"] += len(items)
        self.stats["yes"] += sum(v is True for v in out)
        return out

    def rescore(self, responses: list[str], rows: list[dict], results: list[dict],
                cfg: reward.RewardConfig) -> list[dict]:
        """reward.score_batch's results with accuracy 1 (and the reward raised by cfg.accuracy_weight) where the rule
        check gave 0 without an error and the verifier says the answer is equivalent. Rule-correct answers, failed
        scorings and responses with nothing to judge are not asked about."""
        todo, items = [], []
        for i, (response, row, r) in enumerate(zip(responses, rows, results)):
            if r["error"] is None and r["accuracy"] == 0.0:
                row = reward.validate_row(row)
                if (candidate := candidate_text(response, row)) is not None:
                    todo.append(i)
                    items.append((question_text(row), reference_text(row), candidate))
        results = list(results)
        for i, yes in zip(todo, self.judge(items) if items else []):
            if yes:
                results[i] = {**results[i], "accuracy": 1.0,
                              "reward": results[i]["reward"] + cfg.accuracy_weight}
        return results


_loaded: dict[tuple, Verifier] = {}


def cached(checkpoint_dir, device="cpu", **kwargs) -> Verifier:
    """One Verifier per (checkpoint, device) per process, loaded on first use: what the trainer's reward calls."""
    key = (str(checkpoint_dir), str(device))
    if key not in _loaded:
        dtype = precision(torch.device(device)).rollout_dtype  # the judge generates as the sampler does
        _loaded[key] = Verifier(checkpoint_dir, device=device, dtype=dtype, **kwargs)
    return _loaded[key]
