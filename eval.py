"""MMMU-style evaluation of a checkpoint: MMMU's release parquet files or the project's JSONL rows, InternVL prompts
with each image where the question places it, greedy and sampled answers judged by MMMU's official rules, accuracy per
subject / discipline / overall, response length, truncation and critical-token entropy; one process or torchrun.

What it follows (MMMU's own definitions and answer rules live in mmmu.py):
- Skywork-R1V3's MMMU protocol: the checkpoint's own chat template with system "You are a helpful assistant."
  (`--system`), the final answer in \\boxed{} after the reasoning, judged by its released rule (`--scoring r1v3`: the
  last \\boxed{} matches after normalisation) or an LLM judge (`--judge CKPT`); Table 1 reports Avg@5 at temperature
  1.0 (`--samples 5 --temperature 1.0 --headline avg`), its released config greedy. Inference modes (Table 4):
  NoThink (`--no_think`), NoWait (`--no_wait`: the critical words' tokens never sampled).
- R1V3's checkpoint-selection metric: critical-token entropy over the sampled responses (entropy.py).

    python eval.py --ckpt Skywork-R1V3-38B --data MMMU/ --split validation --max_new_tokens 16384 --max_len 20480
    torchrun --nproc_per_node=8 eval.py --ckpt CKPT --data MMMU/ --samples 8 --temperature 0.6 --top_p 0.95
    torchrun --nproc_per_node=8 eval.py --ckpt Skywork-R1V3-38B --data MMMU/ --rollout_tp 2   # 4 copies of 2 cards
    torchrun --nproc_per_node=8 eval.py --ckpt Skywork-R1V3-38B --data MMMU/ --no-greedy --samples 5 \
        --temperature 1.0 --headline avg --scoring r1v3 --judge Qwen2.5-32B-Instruct \
        --system "You are a helpful assistant." --max_new_tokens 16384 --max_len 20480      # R1V3's Table 1

One question instead of a benchmark (its greedy answer, and --samples k sampled ones, with the speed):

    python eval.py --ckpt CKPT --question "Describe the image." --image cat.jpg --max_new_tokens 512
"""
import io
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image

import cli
import reward
import verifier
from checkpoint import DTYPES, load_model, read_config
from data import (IMAGE_PLACEHOLDER, ChatTemplate, build_prompt, check_tokenizer, decode_response, load_chat_template,
                  load_tokenizer, mix_seed, open_image, opens_think, pad_id, question_text, right_pad,
                  special_ids, to_rgb, token_batches, tokenizer_preview)
from entropy import CRITICAL_WORDS, CRITICAL_WORDS_BROAD, critical_entropy, critical_token_ids
from mmmu import DISCIPLINE_OF, DISCIPLINES, OTHER, SCORINGS, Verdict, load_eval_rows, verdict
from model import VLM
from parallel import (Dist, TPLayout, check_tp, init_distributed, load_rollout_copy, precision, process_group,
                      tp_layout)
from rollout import Request, Sampler

# -----------------------------------------------------------------------------------------------------------------
# Config


MC_INSTRUCTION = ("Answer with the option's letter from the given choices. Think step by step, then put the final "
                  "answer in \\boxed{}.")
OPEN_INSTRUCTION = ("Answer the question using a single word or phrase. Think step by step, then put the final answer "
                    "in \\boxed{}.")


@dataclass
class EvalConfig:
    max_new_tokens: int = cli.arg(4096, "response tokens per answer")
    max_len: int = cli.arg(8192, "prompt + response tokens (the KV cache length) when evaluate builds its sampler; "
                           "a given sampler's own max_len bounds the prompts instead")
    max_tiles: int | None = cli.arg(None, "tile cap per image (unset: the checkpoint's max_dynamic_patch), lowered "
                                    "per question until prompt + max_new_tokens fits max_len")
    greedy: bool = cli.arg(True, "one greedy (temperature 0) answer per question: MMMU's headline protocol")
    samples: int = cli.arg(0, "k sampled answers per question at --temperature: avg@k and pass@k")
    temperature: float = cli.arg(1.0, "temperature of the --samples answers (R1V3 recommends 0.6 with top_p 0.95; "
                                 "1.0 / 1.0 is the policy's own distribution)")
    top_p: float = cli.arg(1.0, "nucleus mass of the --samples answers (1: off)")
    seed: int = cli.arg(0, "sampling seed (each question's mixes it with the question's index in the rows)")
    entropy: bool = cli.arg(True, "critical-token entropy: one teacher-forced pass over the sampled (else greedy) "
                            "responses")
    critical_words: tuple[str, ...] = cli.arg(CRITICAL_WORDS, "words whose tokens' entropy is the critical-token "
                                              "entropy (default R1V3's; a broader list: "
                                              f"{','.join(CRITICAL_WORDS_BROAD)})")
    system: str | None = cli.arg(None, "system message of every prompt (R1V3: \"You are a helpful assistant.\")")
    scoring: str = cli.arg("mmmu", "mmmu: MMMU's official parser; r1v3: R1V3's released rule (the last \\boxed{} "
                           "matches the answer after normalisation)", SCORINGS)
    judge: str | None = cli.arg(None, "text checkpoint (e.g. Qwen2.5-Instruct) asked about every answer the rules "
                                "call wrong: correct if the rule or the judge says so (R1V3's MMMU judge)")
    headline: str = cli.arg("greedy", "the `accuracy` reported first: greedy, or avg (avg@k over --samples; R1V3's "
                            "Table 1: --samples 5 --temperature 1.0 --headline avg)", ("greedy", "avg"))
    no_wait: bool = cli.arg(False, "NoWait (R1V3 §6.2): never sample the critical words' tokens (--critical_words, "
                            "single-token spellings)")
    no_think: bool = cli.arg(False, "NoThink: no <think> opened in the prompt where the chat template would open it")
    mc_instruction: str = cli.arg(MC_INSTRUCTION, "appended to MMMU multiple-choice questions")
    open_instruction: str = cli.arg(OPEN_INSTRUCTION, "appended to MMMU open questions (the project's rows keep "
                                    "their own prompt)")
    chunk: int = cli.arg(32, "questions per generate call, and the unit that ranks share out (results depend on it, "
                         "not on the number of ranks)")
    max_slots: int = cli.arg(64, "sequences decoded at once when evaluate builds its sampler")
    kv_tokens: int | None = cli.arg(None, "KV pool budget in tokens per sampler (pages shared by the running "
                                    "sequences; unset: half the GPU memory free after the model is built, 128 MiB "
                                    "on a CPU)")
    compile: bool | None = cli.arg(None, "compile the sampler's decode step when evaluate builds it (default: on "
                                         "CUDA, with CUDA graphs)")
    entropy_batch_tokens: int = cli.arg(16384, "padded tokens per teacher-forced forward of the entropy pass")
    time_limit_s: float = cli.arg(reward.DEFAULT_TIME_LIMIT_S, "seconds per math-verify check (the project's "
                                  "expression rows)")
    progress: bool = cli.arg(False, "a progress line on stderr (rank 0)")

    def __post_init__(self):
        """Each flag's range, one message per flag naming it and its value (cli.UsageError)."""
        for name in ("max_new_tokens", "max_len", "chunk", "max_slots", "entropy_batch_tokens"):
            if isinstance(getattr(self, name), bool) or not getattr(self, name) >= 1:
                raise cli.UsageError(f"--{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.max_tiles is not None and self.max_tiles < 1:
            raise cli.UsageError(f"--max_tiles must be >= 1 (or unset), got {self.max_tiles}")
        if self.samples < 0:
            raise cli.UsageError(f"--samples must be >= 0, got {self.samples}")
        if not (self.greedy or self.samples):
            raise cli.UsageError("--no-greedy needs --samples >= 1: otherwise no question gets an answer")
        if not math.isfinite(self.temperature) or self.temperature < 0 or (self.samples and self.temperature == 0):
            raise cli.UsageError(f"--temperature must be finite and > 0 for --samples, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise cli.UsageError(f"--top_p must be in (0, 1], got {self.top_p}")
        if not self.time_limit_s > 0:
            raise cli.UsageError(f"--time_limit_s must be > 0, got {self.time_limit_s}")
        if self.headline == "avg" and not self.samples:
            raise cli.UsageError("--headline avg needs --samples k >= 1 (R1V3: --samples 5 --temperature 1.0)")
        if self.scoring not in SCORINGS:
            raise cli.UsageError(f"--scoring must be one of {SCORINGS}, got {self.scoring!r}")
        self.critical_words = tuple(self.critical_words)

# -----------------------------------------------------------------------------------------------------------------
# Prompts: MMMU's <image i> placeholders, lettered options, an instruction; tile caps that fit max_len


class Unanswerable(ValueError):
    """A question that cannot be asked: an image missing or unreadable, or a prompt with no room in max_len."""


_NUMBERED_IMAGE = re.compile(r"<image (\d+)>")


def prompt_text(row: dict, cfg: EvalConfig) -> tuple[str, list[tuple[str, object]]]:
    """The user message (with one data.IMAGE_PLACEHOLDER per image shown) and the images in placeholder order, as
    (name, image) pairs: "image i" and its bytes for MMMU rows, the path twice for the project's.

    MMMU rows: the question and its options lettered "A. ..." (data.question_text), then the instruction; each
    `<image i>` (in the question or an option) becomes image i's placeholder, in place; images no placeholder names go
    in front (InternVL's convention). The project's rows: their training prompt (data.encode's), unchanged."""
    if "question_type" not in row:
        return question_text(row), [(str(path), path) for path in row.get("image") or []]
    instruction = cfg.mc_instruction if row["question_type"] == "multiple-choice" else cfg.open_instruction
    images = list(row.get("image") or [])
    shown, named = [], set()

    def place(m: re.Match) -> str:
        i = int(m.group(1))
        if not 1 <= i <= len(images) or images[i - 1] is None:
            raise Unanswerable(f"the question shows <image {i}> but the row has no image {i}")
        shown.append((f"image {i}", images[i - 1]))
        named.add(i)
        return IMAGE_PLACEHOLDER

    text = _NUMBERED_IMAGE.sub(place, question_text(row) + "\n" + instruction)
    front = [(f"image {i}", im) for i, im in enumerate(images, 1) if im is not None and i not in named]
    return "".join(f"{IMAGE_PLACEHOLDER}\n" for _ in front) + text, front + shown


def open_eval_image(name: str, image) -> Image.Image:
    """A path, encoded bytes (MMMU's parquet) or a PIL image -> 8-bit RGB; Unanswerable naming the image."""
    try:
        if isinstance(image, Image.Image):
            return to_rgb(image, name)
        if isinstance(image, (bytes, bytearray)):
            with Image.open(io.BytesIO(image)) as f:
                f.load()
                return to_rgb(f, name)
        return open_image(image)
    except (OSError, ValueError, SyntaxError) as e:  # Pillow's ways of saying it cannot decode the bytes
        # For bytes Pillow's message names the BytesIO object by its address: left out, so that reports of the same
        # data are the same.
        detail = f"{len(image)} bytes" if isinstance(image, (bytes, bytearray)) else str(e)
        raise Unanswerable(f"{name} unreadable: {type(e).__name__}: {detail}") from None


@dataclass
class Prompt:
    ids: list[int]
    pixels: torch.Tensor | None  # (tiles, 3, S, S), images in placeholder order
    max_tiles: int | None  # the tile cap per image that made it fit (None: no images)
    opens_think: bool = False  # the prompt ends inside <think> (data.opens_think): responses start in the reasoning


def build_eval_prompt(row: dict, tokenizer, config, cfg: EvalConfig, max_len: int,
                      template: ChatTemplate | None = None) -> Prompt:
    """The prompt of one question with the largest tile cap per image (from cfg.max_tiles down to the config's
    min_dynamic_patch) that leaves max_new_tokens of room in max_len; failing that, the smallest cap if the prompt
    leaves any room (the response gets what is left). Unanswerable otherwise, or when an image cannot be read."""
    text, images = prompt_text(row, cfg)
    images = [open_eval_image(name, im) for name, im in images]
    top = min(cfg.max_tiles or config.max_dynamic_patch, config.max_dynamic_patch)
    caps = list(range(top, config.min_dynamic_patch - 1, -1)) if images else [None]
    for cap in caps:
        try:
            ids, pixels = build_prompt(tokenizer, config, text, images, cfg.system, cap, template, not cfg.no_think)
        except ValueError as e:  # placeholders and images disagree, a text-only model shown images
            raise Unanswerable(str(e)) from None
        if len(ids) + cfg.max_new_tokens <= max_len:
            break
    if len(ids) >= max_len:
        raise Unanswerable(f"prompt of {len(ids)} tokens (at {cap} tile(s) per image) leaves no room in max_len "
                           f"{max_len}")
    return Prompt(ids, pixels, cap, opens_think(tokenizer, ids))

# -----------------------------------------------------------------------------------------------------------------
# Teacher-forced entropy of generated responses


@torch.no_grad()
def response_entropies(model: VLM, seqs: list[tuple[list[int], torch.Tensor | None, list[int]]], temperature: float,
                       batch_tokens: int) -> list[torch.Tensor]:
    """For each (prompt ids, pixels, response ids): the entropy of softmax(logits / temperature) at each response
    token, from the position that predicted it, fp32 (len(response),). Sequences go through `model(..., targets=)`
    (the fused log-prob/entropy path, no full logits) right-padded, in order, as many per forward as fit
    `batch_tokens` padded tokens."""
    param = model.language_model.embed_tokens.weight
    out = []
    for batch in token_batches([len(prompt) + len(response) for prompt, _, response in seqs], batch_tokens):
        padded = right_pad([seqs[i][0] for i in batch], [seqs[i][2] for i in batch], pad_id(model.config))
        pixels = [seqs[i][1] for i in batch if seqs[i][1] is not None]
        pixels = torch.cat(pixels).to(param.device, param.dtype) if pixels else None
        _, entropy = model(padded.input_ids.to(param.device), pixels, targets=padded.targets.to(param.device),
                           temperature=temperature)
        out += padded.split(entropy.float().cpu())
    return out


def entropy_sums(response_ids: list[int], entropy: torch.Tensor, critical_ids) -> dict:
    """A response's entropy as sums and counts (entropy.EntropySums), so that subjects, disciplines and ranks combine
    by adding."""
    return asdict(critical_entropy(torch.tensor(response_ids), entropy, None, critical_ids))

# -----------------------------------------------------------------------------------------------------------------
# Evaluation: chunks of questions shared out across ranks, generated, judged; records merged on every rank


MODES = ("greedy", "sample")  # record order within a question


def answer_modes(cfg: EvalConfig) -> list[tuple[str, int, float]]:
    """(mode, answers per question, temperature) of each generate call a question gets."""
    return ([("greedy", 1, 0.0)] if cfg.greedy else []) + ([("sample", cfg.samples, cfg.temperature)]
                                                            if cfg.samples else [])


def banned_ids(tokenizer, cfg: EvalConfig) -> list[int]:
    """Ids never sampled: the image tokens, and with --no_wait the critical words' tokens (NoWait)."""
    ids = special_ids(tokenizer)[1]
    return ids + sorted(critical_token_ids(tokenizer, cfg.critical_words)) if cfg.no_wait else ids


def compiled(cfg: EvalConfig, model: VLM) -> bool:
    """--compile, or unset: on CUDA (a CPU compile pays back only on long runs: trainer.decode_compile)."""
    return cfg.compile if cfg.compile is not None else model.language_model.embed_tokens.weight.device.type == "cuda"


def build_sampler(model: VLM, tokenizer, cfg: EvalConfig, max_slots: int, max_len: int) -> Sampler:
    """A sampler that stops at the tokenizer's end-of-turn tokens and never draws image tokens (nor, with
    --no_wait, the critical words)."""
    return Sampler(model, max_slots, min(max_len, model.config.llm.max_position_embeddings),
                   special_ids(tokenizer)[0], banned_ids(tokenizer, cfg), compile=compiled(cfg, model),
                   kv_tokens=cfg.kv_tokens)


def generate(sampler: Sampler, prompts: list[tuple[int, Prompt]], n: int, temperature: float, cfg: EvalConfig):
    """n completions of each (question index, prompt). Each question's sampling seed comes from its place in the
    full row list, never from the rank that runs it."""
    requests = [Request(prompt.ids, prompt.pixels, seed=mix_seed(cfg.seed, index)) for index, prompt in prompts]
    return sampler.generate(requests, num_samples=n, max_new_tokens=cfg.max_new_tokens, temperature=temperature,
                            top_p=cfg.top_p if temperature > 0 else 1.0, seed=cfg.seed)


def _record(index: int, row: dict, mode: str, sample: int, prompt: str | None, **fields) -> dict:
    return dict(index=index, id=row.get("id", str(index)), subject=row.get("subject", ""), mode=mode, sample=sample,
                prompt=prompt, gold=row["answer"], **fields)


def judged(judge, verdicts: list["Verdict"], rows: list[dict]) -> list["Verdict"]:
    """The verdicts with those the rules call wrong but that give an answer put to `judge` (a verifier.Verifier):
    correct (rule "judge") where it says yes; a judge that fails leaves the rules' verdict (counted in its stats)."""
    ask = [i for i, v in enumerate(verdicts) if not v.correct and v.answer]
    items = [(question_text(rows[i]), verifier.reference_text(rows[i]), verdicts[i].answer) for i in ask]
    out = list(verdicts)
    for i, yes in zip(ask, judge.judge(items) if items else []):
        if yes:
            out[i] = Verdict(out[i].answer, out[i].parsed, "judge", True)
    return out


def _run_chunk(model: VLM, tokenizer, sampler: Sampler, chunk: list[tuple[int, dict]], cfg: EvalConfig,
               critical_ids: dict, stats: dict, template: ChatTemplate | None = None, judge=None) -> list[dict]:
    """Records of one chunk of (index, row): every greedy and sampled answer, judged (by cfg.scoring's rules, then
    `judge` where they say wrong); questions that cannot be asked get one "unanswered" record per answer they would
    have had."""
    modes = answer_modes(cfg)
    records, asked = [], []  # asked: (index, row, prompt) of the questions that fit
    for index, row in chunk:
        try:
            asked.append((index, row, build_eval_prompt(row, tokenizer, model.config, cfg, sampler.max_len,
                                                        template)))
        except Unanswerable as e:
            records += [_record(index, row, mode, j, None, response=None, answer=None, parsed=None,
                                verdict="unanswered", rule=None, error=str(e), num_tokens=0, finish_reason=None,
                                format=False, max_tiles=None, entropy=None)
                        for mode, n, _ in modes for j in range(n)]
    for mode, n, temperature in modes:
        if not asked:
            break
        groups = generate(sampler, [(index, prompt) for index, _, prompt in asked], n, temperature, cfg)
        stats["tokens"] += sampler.stats["tokens"]
        stats["seconds"] += sampler.stats["seconds"]
        entropies = None
        if cfg.entropy and (mode == "sample" or not cfg.samples):  # the sampled responses when there are any
            seqs = [(prompt.ids, prompt.pixels, c.ids) for (_, _, prompt), group in zip(asked, groups) for c in group]
            flat = response_entropies(model, seqs, temperature or 1.0, cfg.entropy_batch_tokens)
            entropies = [flat[q * n:(q + 1) * n] for q in range(len(asked))]
        responses = [[decode_response(tokenizer, c.ids, sampler.stop_ids, prompt.opens_think) for c in group]
                     for (_, _, prompt), group in zip(asked, groups)]
        verdicts = [verdict(text, row, cfg.time_limit_s, cfg.scoring)
                    for (_, row, _), texts in zip(asked, responses) for text in texts]
        if judge is not None:
            verdicts = judged(judge, verdicts, [row for (_, row, _), texts in zip(asked, responses) for _ in texts])
        verdicts = iter(verdicts)
        for q, ((index, row, prompt), group) in enumerate(zip(asked, groups)):
            preview = tokenizer_preview(tokenizer, prompt.ids)
            for j, c in enumerate(group):
                response, v = responses[q][j], next(verdicts)
                records.append(_record(index, row, mode, j, preview, response=response, answer=v.answer,
                                       parsed=v.parsed, verdict=v.label, rule=v.rule, error=None,
                                       num_tokens=len(c.ids), finish_reason=c.finish_reason,
                                       format=reward.think_ok(response) and v.label != "no answer",
                                       max_tiles=prompt.max_tiles,
                                       entropy=None if entropies is None else
                                       entropy_sums(c.ids, entropies[q][j], critical_ids)))
    return records


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else math.nan


def metrics(records: list[dict], headline: str = "greedy") -> dict:
    """Numbers of a set of records (one subject, one discipline, or all). Accuracies count every question, an
    unanswered one as wrong; lengths, truncation, format and entropy are over the responses generated. `accuracy` is
    the headline: greedy_accuracy, or with `headline` "avg" sampled_accuracy (avg@k)."""
    greedy = [r for r in records if r["mode"] == "greedy"]
    sampled = [r for r in records if r["mode"] == "sample"]
    answered = [r for r in records if r["verdict"] != "unanswered"]
    by_question: dict[int, list[bool]] = {}
    for r in sampled:
        by_question.setdefault(r["index"], []).append(r["verdict"] == "correct")
    ent = [r["entropy"] for r in answered if r["entropy"] is not None]
    n_crit, n_tok = sum(e["num_critical"] for e in ent), sum(e["num_tokens"] for e in ent)
    greedy_accuracy = _mean(r["verdict"] == "correct" for r in greedy)
    sampled_accuracy = _mean(r["verdict"] == "correct" for r in sampled)
    return dict(
        accuracy=sampled_accuracy if headline == "avg" else greedy_accuracy,
        questions=len({r["index"] for r in records}),
        unanswered=len({r["index"] for r in records if r["verdict"] == "unanswered"}),
        greedy_accuracy=greedy_accuracy,
        sampled_accuracy=sampled_accuracy,
        pass_at_k=_mean(any(v) for v in by_question.values()),
        format_rate=_mean(r["format"] for r in answered),
        response_length=_mean(r["num_tokens"] for r in answered),
        truncation_rate=_mean(r["finish_reason"] == "length" for r in answered),
        critical_entropy=sum(e["critical"] for e in ent) / n_crit if n_crit else math.nan,
        mean_entropy=sum(e["total"] for e in ent) / n_tok if n_tok else math.nan,
        num_critical_tokens=n_crit)


def evaluate(model: VLM, tokenizer, rows: list[dict], cfg: EvalConfig, sampler: Sampler | None = None,
             template: ChatTemplate | None = None, judge=None, tp: TPLayout | None = None) -> dict:
    """Evaluate `model` on `rows` (data.load_rows rows or load_mmmu rows): the numbers of `metrics` over all rows,
    `k` (samples per question), generated_tokens / generation_s / tokens_per_s, "subjects" and "disciplines" (the
    same numbers per group) and "records" (one per answer: prompt, response, final answer, parsed answer, verdict,
    rule, length, finish reason, entropy sums), in row order.

    Without torch.distributed initialised, one process does everything. Under it (every rank calling with the same
    rows), chunk c of cfg.chunk questions runs on rank c % world_size, and the records are all-gathered, so every
    rank returns the same result; with the same chunk size it equals a one-process run's. `sampler` (e.g. the
    trainer's) is used as it is, its max_len bounding the prompts; without one, a Sampler of cfg.max_slots x
    cfg.max_len is built (with --no_wait's bans; a given sampler must already ban them). `template`: the checkpoint's
    chat template (data.load_chat_template; None: ChatML). `judge`: a verifier.Verifier asked about the answers the
    rules call wrong; without one, cfg.judge names a checkpoint to load one from. `accuracy` is cfg.headline's, and
    "judge" holds the judge's counts when there is one. With a tensor-parallel `tp` (the ranks of a group each hold
    part of one copy: parallel.build_rollout_copy) the chunks are shared out among the groups, each group's ranks
    run theirs in lockstep (the same calls, hence the same collectives and the same results), and the records are
    taken from each group's rank 0."""
    if not rows:
        raise ValueError("no rows to evaluate")
    if sampler is None:
        sampler = build_sampler(model, tokenizer, cfg, cfg.max_slots, cfg.max_len)
    elif cfg.no_wait and not set(banned_ids(tokenizer, cfg)) <= set(getattr(sampler, "banned", torch.tensor([])
                                                                              ).tolist()):
        raise ValueError("no_wait: the given sampler does not ban the critical words' tokens (build it with "
                         "eval.build_sampler, or pass eval.banned_ids as its banned_ids)")
    if judge is None and cfg.judge:
        judge = verifier.cached(cfg.judge, model.language_model.embed_tokens.weight.device)
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    tp = tp or TPLayout()
    chunks = [list(enumerate(rows))[c:c + cfg.chunk] for c in range(0, len(rows), cfg.chunk)]
    my_chunks = chunks[rank // tp.size::world // tp.size]  # groups are consecutive ranks
    critical_ids = critical_token_ids(tokenizer, cfg.critical_words)
    stats, records, t0 = dict(tokens=0, seconds=0.0), [], time.perf_counter()
    JUDGE_COUNTS = ("asked", "yes", "errors", "failed")
    judged_before = {k: judge.stats[k] for k in JUDGE_COUNTS} if judge is not None else None
    for done, chunk in enumerate(my_chunks, 1):
        records += _run_chunk(model, tokenizer, sampler, chunk, cfg, critical_ids, stats, template, judge)
        if cfg.progress and rank == 0:
            greedy = [r["verdict"] == "correct" for r in records if r["mode"] == "greedy"]
            print(f"\reval{f' rank 0 of {world}' if world > 1 else ''}: {sum(map(len, my_chunks[:done]))}/"
                  f"{sum(map(len, my_chunks))} questions | {stats['tokens']} tokens | "
                  f"{stats['tokens'] / max(stats['seconds'], 1e-9):.0f} tok/s | greedy accuracy so far "
                  f"{_mean(greedy):.3f} | {time.perf_counter() - t0:.0f}s", end="", file=sys.stderr, flush=True)
    if cfg.progress and rank == 0:
        print(file=sys.stderr)
    judge_counts = None if judge is None else {k: judge.stats[k] - judged_before[k] for k in JUDGE_COUNTS}
    if distributed:
        parts = [None] * world
        dist.all_gather_object(parts, (records, stats, judge_counts))
        parts = parts[::tp.size]  # the other ranks of a group hold the same records
        records = [r for part, _, _ in parts for r in part]
        stats = dict(tokens=sum(s["tokens"] for _, s, _ in parts), seconds=max(s["seconds"] for _, s, _ in parts))
        if judge_counts is not None:
            judge_counts = {k: sum(c[k] for _, _, c in parts) for k in JUDGE_COUNTS}
    records.sort(key=lambda r: (r["index"], MODES.index(r["mode"]), r["sample"]))
    subjects: dict[str, list[dict]] = {}
    for r in records:
        subjects.setdefault(r["subject"], []).append(r)
    disciplines: dict[str, list[dict]] = {}
    for subject, recs in subjects.items():
        disciplines.setdefault(DISCIPLINE_OF.get(subject, OTHER), []).extend(recs)
    order = list(DISCIPLINES) + [OTHER]
    headline = "greedy" if cfg.headline == "greedy" else f"avg@{cfg.samples}"
    return dict(metrics(records, cfg.headline), headline=headline, k=cfg.samples, generated_tokens=stats["tokens"],
                generation_s=stats["seconds"],
                tokens_per_s=stats["tokens"] / stats["seconds"] if stats["seconds"] else math.nan,
                judge=judge_counts,
                subjects={s: metrics(subjects[s], cfg.headline) for s in sorted(subjects)},
                disciplines={d: metrics(disciplines[d], cfg.headline) for d in order if d in disciplines},
                records=records)

# -----------------------------------------------------------------------------------------------------------------
# Report: a table on the terminal, everything as JSON

TIMING = ("generation_s", "tokens_per_s")  # the only numbers that differ between runs of the same evaluation


def format_table(result: dict) -> str:
    """Disciplines with their subjects beneath, then the overall line (MMMU's layout)."""
    k = result["k"]
    cols = [("greedy", "greedy_accuracy", "{:.3f}")] if not math.isnan(result["greedy_accuracy"]) else []
    if k:
        cols += [(f"avg@{k}", "sampled_accuracy", "{:.3f}"), (f"pass@{k}", "pass_at_k", "{:.3f}")]
    cols += [("length", "response_length", "{:.0f}"), ("trunc", "truncation_rate", "{:.3f}"),
             ("format", "format_rate", "{:.3f}"), ("crit H", "critical_entropy", "{:.3f}")]
    head = f"{'':38s}{'n':>5s}{'unans':>6s}" + "".join(f"{name:>9s}" for name, _, _ in cols)
    line = lambda name, m: (f"{name:38s}{m['questions']:5d}{m['unanswered']:6d}"
                            + "".join(f"{(fmt.format(m[key]) if not math.isnan(m[key]) else '-'):>9s}"
                                      for _, key, fmt in cols))
    out = [head]
    for d, m in result["disciplines"].items():
        out.append(line(d, m))
        members = DISCIPLINES.get(d) or sorted(s for s in result["subjects"] if s not in DISCIPLINE_OF)
        out += [line(f"  {s or '-'}", result["subjects"][s]) for s in members if s in result["subjects"]]
    out.append(line("Overall", result))
    if "headline" in result:
        out.append(f"accuracy ({result['headline']}): {result['accuracy']:.3f}")
    if result.get("judge"):
        j = result["judge"]
        out.append(f"judge: asked about {j['asked']} answers the rules call wrong, {j['yes']} accepted, "
                   f"{j['errors']} failed batches ({j['failed']} answers left to the rules)")
    out.append(f"{result['generated_tokens']} tokens generated at {result['tokens_per_s']:.1f} tokens/s")
    return "\n".join(out)


def results_json(result: dict, cfg: EvalConfig, **info) -> dict:
    """The results file: run info, config, overall numbers, timing apart, per-discipline and per-subject numbers, and
    every record."""
    summary = {k: v for k, v in result.items() if k not in ("subjects", "disciplines", "records") + TIMING}
    return cli.json_safe(dict(info, config=asdict(cfg), summary=summary, timing={k: result[k] for k in TIMING},
                              disciplines=result["disciplines"], subjects=result["subjects"],
                              records=result["records"]))

# -----------------------------------------------------------------------------------------------------------------
# Command line: a benchmark (--data), or one question (--question)


@dataclass
class EvalCommand:
    """The script's own settings (what to load, where to write); EvalConfig holds the evaluation's."""
    ckpt: str | None = cli.arg(None, "checkpoint directory (config.json, safetensors, tokenizer.json); required")
    data: str | None = cli.arg(None, "MMMU parquet file or folder of them, or a project JSONL file")
    split: str = cli.arg("validation", "MMMU split: the files in a --data folder whose name starts with it (a file "
                         "is read whole)")
    subjects: tuple[str, ...] = cli.arg((), "only these subjects (e.g. Math,Art_Theory; any case; none: all)")
    limit: int | None = cli.arg(None, "at most this many questions per subject")
    out: str = cli.arg("runs/eval.json", "results JSON (every prompt, response and verdict)")
    dtype: str | None = cli.arg(None, "weights dtype (unset: parallel.precision's rollout dtype, bf16 on CUDA and "
                                "fp32 on a CPU)", tuple(DTYPES))
    rollout_tp: int = cli.arg(1, "ranks that hold one copy of the model split between them (tensor parallelism, as "
                              "train_rl.py's --rollout_tp): must divide the processes of a node and the checkpoint's "
                              "heads, key/value heads and MLP channels")
    progress: bool = cli.arg(True, "a progress line on stderr")
    question: str | None = cli.arg(None, "ask this one question instead of evaluating --data, and print the answers")
    image: str | None = cli.arg(None, "the image shown with --question")

    def __post_init__(self):
        if self.limit is not None and self.limit < 1:
            raise cli.UsageError(f"--limit must be >= 1 (or unset: all), got {self.limit}")
        if not self.out:
            raise cli.UsageError("--out must name a file")


def check_out_file(out) -> Path:
    """--out before anything is loaded: a file path (not a directory) whose nearest existing folder is writable and
    not under a regular file."""
    out = Path(out)
    if out.is_dir():
        raise cli.UsageError(f"--out {out} is a directory; name the results file (e.g. {out / 'eval.json'})")
    folder = out.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise cli.UsageError(f"--out {out}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise PermissionError(f"--out {out}: {out if out.exists() else folder} is not writable")
    return out


def ask(model: VLM, tokenizer, question: str, image: str | None, cfg: EvalConfig, template: ChatTemplate | None = None,
        echo=print):
    """Print (through `echo`) the answers to one question as `evaluate` asks it (greedy, then cfg.samples sampled),
    each generate call's followed by its prompt length, tokens generated, finish reasons and speed."""
    max_len = min(cfg.max_len, model.config.llm.max_position_embeddings)
    row = {"question": question, "image": [image] if image else []}
    prompt = build_eval_prompt(row, tokenizer, model.config, cfg, max_len, template)
    # A cache just long enough for this prompt and its answers: one question needs no room for longer ones.
    sampler = build_sampler(model, tokenizer, cfg, min(cfg.max_slots, max(1, cfg.samples)),
                            min(len(prompt.ids) + cfg.max_new_tokens, max_len))
    for _, n, temperature in answer_modes(cfg):
        [group] = generate(sampler, [(0, prompt)], n, temperature, cfg)
        for c in group:
            echo(decode_response(tokenizer, c.ids, sampler.stop_ids, prompt.opens_think))
        st = sampler.stats
        reasons = ", ".join(c.finish_reason for c in group)
        echo(f"[{len(prompt.ids)} prompt tokens, {st['tokens']} generated ({reasons}) in {st['seconds']:.2f}s: "
             f"{st['tokens_per_s']:.1f} tokens/s]", flush=True)


def run_benchmark(model: VLM, tokenizer, rows: list[dict], cfg: EvalConfig, cmd: EvalCommand, d: Dist,
                  template: ChatTemplate | None = None, tp: TPLayout | None = None):
    """Evaluate on every rank; rank 0 prints the table and writes the results file."""
    if d.rank == 0:
        print(f"eval: {len(rows)} questions from {cmd.data} on {d.device} x {d.world} | {json.dumps(asdict(cfg))}",
              flush=True)
    result = evaluate(model, tokenizer, rows, cfg, template=template, tp=tp)
    if d.rank != 0:
        return
    print(format_table(result))
    out = Path(cmd.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = results_json(result, cfg, checkpoint=cmd.ckpt, data=cmd.data, split=cmd.split)
    cli.write_atomic(out, json.dumps(results, indent=1, allow_nan=False) + "\n")
    first = "greedy" if cfg.greedy else "sample"  # one line per unanswered question, not per answer it lacks
    for r in result["records"]:
        if r["verdict"] == "unanswered" and r["sample"] == 0 and r["mode"] == first:
            print(f"unanswered {r['id']}: {r['error']}")
    print(f"wrote {out}")


def main(argv=None):
    """Every check before the weights load: flags, --out, the data's rows and columns, the tokenizer against the
    checkpoint's config."""
    p = cli.parser(__doc__.split("\n\n")[0])
    cli.add_flags(p, EvalCommand)
    cli.add_flags(p, EvalConfig, skip=("progress",))  # EvalCommand's --progress: on at the command line
    args = p.parse_args(argv)
    cmd, cfg = cli.config_from(args, EvalCommand), cli.config_from(args, EvalConfig)
    if cmd.ckpt is None or (cmd.data is None) == (cmd.question is None):
        p.error("give --ckpt, and --data (a benchmark) or --question (one question)")
    if cmd.data:
        check_out_file(cmd.out)
    rows = load_eval_rows(cmd.data, cmd.split, cmd.subjects, cmd.limit) if cmd.data else None  # before the weights
    try:
        config = read_config(cmd.ckpt)
    except ValueError as e:  # its message names the file and the field
        raise cli.InputError(str(e)) from None
    tokenizer = load_tokenizer(cmd.ckpt)
    check_tokenizer(tokenizer, config, cmd.ckpt)
    world = int(os.environ.get("WORLD_SIZE", 1))
    check_tp(cmd.rollout_tp, world, int(os.environ.get("LOCAL_WORLD_SIZE", world)), config)
    d = init_distributed()
    with process_group():
        prec = precision(d.device)
        if cmd.dtype:
            prec = replace(prec, rollout_dtype=DTYPES[cmd.dtype])
        tp = tp_layout(cmd.rollout_tp, d)
        model = (load_model(cmd.ckpt, dtype=prec.rollout_dtype, device=d.device) if tp.size == 1 else
                 load_rollout_copy(cmd.ckpt, d, prec, tp))
        template = load_chat_template(cmd.ckpt)
        if rows is None:  # one question: the ranks of rank 0's group (its copy), rank 0 printing
            if d.rank < tp.size:
                ask(model, tokenizer, cmd.question, cmd.image, cfg, template, print if d.rank == 0 else
                    lambda *args, **kw: None)
        else:
            run_benchmark(model, tokenizer, rows, cfg, cmd, d, template, tp)


if __name__ == "__main__":
    cli.run(main, "eval.py")
