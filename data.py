"""From JSONL rows and images to model inputs: tokenizer, Qwen ChatML, InternVL tiling, row validation, encoding.

train_rl.py (SFT and GRPO) and eval.py read their data through this file, so both see the same prompts. A data file
is JSONL, one row per line:

    {"id": "grid-17", "question": "how many red cells ?", "answer": "6", "answer_type": "numeric",
     "options": [], "image": "images/17.png", "subject": "counting", "response": "<think> ... </think> \\boxed{6}"}

`image` is a path or a list of paths relative to the JSONL file's folder; `response` (the SFT target) is only
needed for cold-start SFT; `answer_type` is one of reward.ANSWER_TYPES (inferred when absent). `load_rows` checks
every row before anything runs and reports every problem as `FILE:LINE: what is wrong`; `encode` turns one row into
prompt ids + image tiles (+ response ids for SFT).
Follows InternVL's `dynamic_preprocess` / `build_transform` (tiling, ImageNet normalisation) and its chat template
(`internvl2_5`: Qwen ChatML, `<img><IMG_CONTEXT>...</img>` per image); a checkpoint's own Jinja chat template
(`chat_template.jinja`, or tokenizer_config.json's) is rendered as transformers' apply_chat_template renders it.

    python data.py rows.jsonl --ckpt /path/to/InternVL3-1B     # validate a data file, print the first prompt
"""
import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
import numpy as np
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

import cli
from checkpoint import IMG_CONTEXT, read_config
from entropy import IGNORE_INDEX
from model import PromptSpan, SharedPrompts, VLMConfig
from reward import validate_row

# -----------------------------------------------------------------------------------------------------------------
# Text side: tokenizer, special ids, Qwen ChatML template, image placeholders

IMG_START, IMG_END = "<img>", "</img>"
IMAGE_PLACEHOLDER = "<image>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", IMG_START, IMG_END, IMG_CONTEXT]


def load_tokenizer(path) -> Tokenizer:
    f = Path(path) / "tokenizer.json" if Path(path).is_dir() else Path(path)
    if not f.is_file():
        raise FileNotFoundError(f"{f}: no tokenizer.json (nanoR1V reads the `tokenizers` JSON format only)")
    try:
        return Tokenizer.from_file(str(f))
    except Exception as e:  # tokenizers raises its own Exception type for a malformed file
        raise ValueError(f"{f}: cannot read tokenizer: {e}") from None


def check_tokenizer(tokenizer: Tokenizer, config: VLMConfig, where) -> None:
    """Refuse a tokenizer whose ids go past the checkpoint's embedding (an id >= vocab_size would index past it:
    an error on CPU, garbage or a device assert on a GPU), naming both sizes; `where` names the checkpoint. A
    vocab_size larger than the tokenizer is normal (Qwen pads its embedding)."""
    ids = tokenizer.get_vocab(with_added_tokens=True).values()
    top = max(ids, default=-1) + 1
    if top > config.llm.vocab_size:
        raise cli.InputError(f"{where}: the tokenizer has ids up to {top - 1} ({top} tokens) but the model's embedding "
                             f"has vocab_size {config.llm.vocab_size}: the tokenizer does not belong to this "
                             f"checkpoint")


def word_tokenizer(words) -> Tokenizer:
    """A whitespace word-level tokenizer with the ChatML and image special tokens: tiny tasks and tests."""
    words = ["<unk>", *SPECIAL_TOKENS, "system", "user", "assistant", *words]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit()])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def special_ids(tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """(stop ids, banned ids) of a ChatML + InternVL tokenizer: `<|im_end|>`/`<|endoftext|>` end a response, the
    image special tokens must never be sampled. Tokens the tokenizer lacks are skipped."""
    find = lambda names: [i for i in map(tokenizer.token_to_id, names) if i is not None]
    return find(["<|im_end|>", "<|endoftext|>"]), find([IMG_START, IMG_END, IMG_CONTEXT])


def chat_template(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Qwen ChatML: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, then the assistant's opening. The
    fallback for checkpoints without a chat template of their own (see `ChatTemplate`)."""
    out = []
    for m in messages:
        if m["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"unknown chat role {m['role']!r}")
        out.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


THINK_OPEN = "<think>"
R1V3_SYSTEM = "You are a helpful assistant."  # R1V3's system prompt (its slow-thinking inference mode)
# The special tokens transformers passes to a template by name (its special_tokens_map), from tokenizer_config.json.
TEMPLATE_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class TemplateError(ValueError):
    """A chat template that cannot be used: malformed, or reaching for Python internals."""


@dataclass
class ChatTemplate:
    """A checkpoint's own Jinja chat template, rendered as transformers' `apply_chat_template` renders it: jinja2's
    ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks, the helpers transformers defines
    (raise_exception, strftime_now, a tojson that does not escape HTML, loop controls), `messages`,
    `add_generation_prompt` and the special tokens of tokenizer_config.json by name (bos_token, eos_token, ...).
    A template that touches underscore attributes (`''.__class__`) is refused when loaded, naming its file."""
    source: str
    path: str  # where it was read from, for errors
    special_tokens: dict = field(default_factory=dict)  # name -> token text, e.g. {"eos_token": "<|im_end|>"}

    def __post_init__(self):
        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        def strftime_now(fmt):
            return datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
        try:
            tree = env.parse(self.source)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"{self.path}: chat template does not parse: {e} (line {e.lineno})") from None
        # The sandbox would only turn `''.__class__` into an empty string (and fail on the next attribute): refuse
        # any underscore attribute up front, with the file's name.
        for node in tree.find_all((jinja2.nodes.Getattr, jinja2.nodes.Getitem)):
            name = node.attr if isinstance(node, jinja2.nodes.Getattr) else \
                getattr(node.arg, "value", None) if isinstance(node.arg, jinja2.nodes.Const) else None
            if isinstance(name, str) and name.startswith("_"):
                raise TemplateError(f"{self.path}: chat template refused: it reaches for the Python internal "
                                    f"{name!r} (line {node.lineno}); templates may only read messages and strings")
        self._compiled = env.from_string(self.source)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The template's text for `messages`; `kwargs` (e.g. enable_thinking=False) go to the template."""
        try:
            return self._compiled.render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt,
                                         **{**self.special_tokens, **kwargs})
        except jinja2.exceptions.SecurityError as e:
            raise TemplateError(f"{self.path}: chat template refused by the sandbox: {e}") from None
        except jinja2.exceptions.TemplateError as e:  # raise_exception(...) in the template, an undefined call
            raise TemplateError(f"{self.path}: chat template failed: {e}") from None


def _token_text(value) -> str | None:
    """A special token of tokenizer_config.json: a string, or an AddedToken dict {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


def load_chat_template(path) -> ChatTemplate | None:
    """A checkpoint directory's chat template, as transformers finds it: `chat_template.jinja`, else the
    `chat_template` of tokenizer_config.json (a string, or a list of named templates: "default"); None when it has
    none (prompts then use the plain ChatML of `chat_template`). Special tokens come from tokenizer_config.json."""
    path = Path(path)
    config_file, jinja_file = path / "tokenizer_config.json", path / "chat_template.jinja"
    config = {}
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TemplateError(f"{config_file}: not JSON: {e}") from None
    special = {k: t for k in TEMPLATE_TOKENS if (t := _token_text(config.get(k))) is not None}
    if jinja_file.is_file():
        return ChatTemplate(jinja_file.read_text(encoding="utf-8"), str(jinja_file), special)
    source = config.get("chat_template")
    if isinstance(source, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"), None)
    if source is None:
        return None
    if not isinstance(source, str):
        raise TemplateError(f"{config_file}: chat_template must be a string, got {type(source).__name__}")
    return ChatTemplate(source, f"{config_file} (chat_template)", special)


def render_chat(messages: list[dict], template: ChatTemplate | None = None, think: bool = True) -> str:
    """The prompt text of `messages` ready for the assistant's turn: the checkpoint's template, else ChatML.
    `think=False` (R1V3's NoThink mode) passes enable_thinking=False (Qwen3 templates then close an empty think
    block) and drops a `<think>` the generation prefix would still open."""
    if template is None:
        return chat_template(messages)
    text = template.render(messages, add_generation_prompt=True, **({} if think else {"enable_thinking": False}))
    if not think and text.rstrip().endswith(THINK_OPEN):
        text = text[:text.rstrip().rindex(THINK_OPEN)]
    return text


def opens_think(tokenizer: Tokenizer, prompt_ids: list[int]) -> bool:
    """Whether a prompt ends inside an opened think block (`...assistant\\n<think>\\n`): its response then starts
    inside the reasoning, and `decode_response(..., opens_think=True)` gives it its `<think>` back."""
    tail = tokenizer.decode(prompt_ids[-8:], skip_special_tokens=False)  # <think> is at most a few pieces
    return tail.rstrip().endswith(THINK_OPEN)


def expand_image_placeholders(text: str, tiles_per_image: list[int], tokens_per_tile: int) -> str:
    """Each `<image>` -> `<img>` + `<IMG_CONTEXT>` x (tokens per tile x tiles) + `</img>`, in order."""
    parts = text.split(IMAGE_PLACEHOLDER)
    if len(parts) - 1 != len(tiles_per_image):
        raise ValueError(f"text has {len(parts) - 1} {IMAGE_PLACEHOLDER} placeholders "
                         f"for {len(tiles_per_image)} images")
    out = [parts[0]]
    for n, rest in zip(tiles_per_image, parts[1:]):
        out += [IMG_START, IMG_CONTEXT * (tokens_per_tile * n), IMG_END, rest]
    return "".join(out)

# -----------------------------------------------------------------------------------------------------------------
# Image side: InternVL dynamic tiling

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def tile_grid(width: int, height: int, tile: int, min_num: int, max_num: int) -> tuple[int, int]:
    """(cols, rows) whose aspect ratio is closest to the image's among grids of min_num..max_num tiles. On a tie
    the later grid in order of tile count wins only if the image has more than half its pixel area (InternVL)."""
    grids = sorted({(c, r) for n in range(min_num, max_num + 1) for c in range(1, n + 1) for r in range(1, n + 1)
                    if min_num <= c * r <= max_num}, key=lambda g: g[0] * g[1])
    aspect, best, best_diff = width / height, (1, 1), float("inf")
    for c, r in grids:
        diff = abs(aspect - c / r)
        if diff < best_diff:
            best, best_diff = (c, r), diff
        elif diff == best_diff and width * height > 0.5 * tile * tile * c * r:
            best = (c, r)
    return best


def dynamic_tiles(image: Image.Image, tile: int, min_num: int = 1, max_num: int = 12, thumbnail: bool = True):
    """Resize to the chosen grid, cut row-major tiles, append a whole-image thumbnail when there are several."""
    cols, rows = tile_grid(image.width, image.height, tile, min_num, max_num)
    resized = image.resize((cols * tile, rows * tile), Image.Resampling.BICUBIC)
    tiles = [resized.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile))
             for r in range(rows) for c in range(cols)]
    if thumbnail and len(tiles) > 1:
        tiles.append(image.resize((tile, tile), Image.Resampling.BICUBIC))
    return tiles


def to_pixels(tiles) -> torch.Tensor:
    x = torch.from_numpy(np.stack([np.asarray(t, dtype=np.float32) for t in tiles])) / 255.0  # (N, S, S, 3)
    x = (x - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    return x.permute(0, 3, 1, 2).contiguous()  # (N, 3, S, S)


def to_rgb(image: Image.Image, name) -> Image.Image:
    """8-bit RGB. Pillow's own convert clips 16-bit and float images to white: scale those first."""
    if image.width < 1 or image.height < 1:
        raise ValueError(f"image {name} has no pixels ({image.width}x{image.height})")
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):  # 16-bit PNG/TIFF grey: 0..65535 -> 0..255
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8))
    elif image.mode == "F":  # float images: [0, 1] when they fit, else taken as 0..255
        a = np.asarray(image, dtype=np.float64)
        a = np.nan_to_num(a * (255 if a.max(initial=0) <= 1 else 1)).round().clip(0, 255)
        image = Image.fromarray(a.astype(np.uint8))
    return image.convert("RGB")


def open_image(path) -> Image.Image:
    """Decode an image file to 8-bit RGB; a missing, corrupt or empty file raises naming it."""
    try:
        with Image.open(path) as f:
            f.load()
            return to_rgb(f, path)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except (OSError, SyntaxError, ValueError) as e:  # Pillow's ways of saying "not an image I can decode"
        raise ValueError(f"cannot read image {path}: {e}") from None


def load_image(image, config: VLMConfig, max_tiles: int | None = None) -> torch.Tensor:
    """A path or PIL image -> normalised tiles (N, 3, S, S): at most `max_tiles` grid tiles (default the config's
    max_dynamic_patch), plus the thumbnail when there are several, so a huge image cannot blow up memory."""
    if config.vision is None:
        raise ValueError("this model has no vision tower; it cannot take images")
    image = to_rgb(image, "(in memory)") if isinstance(image, Image.Image) else open_image(image)
    max_num = config.max_dynamic_patch if max_tiles is None else min(max_tiles, config.max_dynamic_patch)
    if max_num < config.min_dynamic_patch:
        raise ValueError(f"max_tiles {max_tiles} is below the config's min_dynamic_patch {config.min_dynamic_patch}")
    tiles = dynamic_tiles(image, config.vision.image_size, config.min_dynamic_patch, max_num, config.use_thumbnail)
    return to_pixels(tiles)


def build_prompt(tokenizer: Tokenizer, config: VLMConfig, question: str, images=(), system: str | None = None,
                 max_tiles: int | None = None, template: ChatTemplate | None = None, think: bool = True
                 ) -> tuple[list[int], torch.Tensor | None]:
    """Token ids of a one-turn chat prompt (ready for generation) and the images' tiles (or None): rendered with the
    checkpoint's `template` (see `load_chat_template`) or plain ChatML, `think=False` for NoThink (`render_chat`).
    Without `<image>` placeholders in the question, InternVL's convention puts one per image in front; each is
    expanded after rendering, so a template never sees the image tokens. The special tokens the template writes are
    encoded as special tokens, as transformers does (add_special_tokens=False: the template adds a bos itself)."""
    pixels = [load_image(im, config, max_tiles) for im in images]
    if images and IMAGE_PLACEHOLDER not in question:
        question = "".join(f"{IMAGE_PLACEHOLDER}\n" for _ in images) + question
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    text = expand_image_placeholders(render_chat(messages, template, think), [p.shape[0] for p in pixels],
                                     config.tokens_per_tile)
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    return ids, (torch.cat(pixels) if pixels else None)

# -----------------------------------------------------------------------------------------------------------------
# Rows: a JSONL data file, validated as a whole before anything runs


class DataError(cli.InputError):
    """Every problem of a data file, one `FILE:LINE: what is wrong` per line."""

    def __init__(self, path, problems: list[str], total: int):
        self.problems = problems
        super().__init__(f"{path}: {len(problems)} bad row(s) of {total}:\n" + "\n".join(problems))


def _check_image(path: Path) -> str | None:
    """Why the image file cannot be used, or None. Reads the header and checks the file's structure (Pillow's
    verify) without decoding pixels, so validating thousands of rows stays cheap. A header that declares a 0x0
    image is refused by Pillow's open itself ("cannot identify image file")."""
    if not path.is_file():
        return f"image file not found: {path}"
    try:
        with Image.open(path) as f:
            f.verify()
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for a bad file
        return f"cannot read image {path}: {type(e).__name__}: {e}"
    return None


def check_row(row, folder: Path) -> tuple[dict | None, list[str]]:
    """(normalised row, problems) for one parsed JSONL value. The row gets `image` as a list of absolute paths and
    the answer normalised by reward.validate_row (a letter for multiple choice)."""
    if not isinstance(row, dict):
        return None, [f"a row must be a JSON object, got {type(row).__name__}"]
    problems = [f"missing field {k!r}" for k in ("id", "question", "answer") if k not in row]
    if "id" in row and (isinstance(row["id"], bool) or not isinstance(row["id"], (str, int))):
        problems.append(f"id must be a string or an integer, got {row['id']!r}"[:200])
    if "question" in row and (not isinstance(row["question"], str) or not row["question"].strip()):
        problems.append(f"question must be a non-empty string, got {row['question']!r}"[:200])
    answer = row.get("answer")
    if "answer" in row and answer is None:
        problems.append("answer is null")
    elif "answer" in row and (isinstance(answer, bool) or not isinstance(answer, (str, int, float))):
        problems.append(f"answer must be a string or a number, got {type(answer).__name__}")
    if "options" in row and row["options"] is not None and not (
            isinstance(row["options"], list) and all(isinstance(o, (str, int, float)) for o in row["options"])):
        problems.append(f"options must be a list of strings, got {row['options']!r}"[:200])
    if "response" in row and not isinstance(row["response"], str):
        problems.append(f"response must be a string, got {type(row['response']).__name__}")
    images = row.get("image")
    images = [] if images is None else [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        problems.append(f"image must be a path or a list of paths, got {row.get('image')!r}"[:200])
        images = []
    paths = [(folder / p).resolve() for p in images]
    problems += [p for p in map(_check_image, paths) if p]
    if problems:
        return None, problems
    try:
        row = validate_row({**row, "options": row.get("options") or []})
    except ValueError as e:
        return None, [str(e)]
    return {**row, "id": str(row["id"]), "image": [str(p) for p in paths], "subject": str(row.get("subject", ""))}, []


def load_rows(path, skip_bad: bool = False) -> list[dict]:
    """Every row of a JSONL file, validated. Problems (malformed JSON, missing fields, a null answer, an unknown
    answer_type, options that are not a list, a missing or unreadable image, a duplicate id) are all collected and
    raised together as a DataError, or with `skip_bad` the bad rows are dropped and counted in a printed line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    rows, problems, seen, total = [], [], {}, 0
    with open(path, "rb") as f:  # decoded line by line, so a bad byte is reported with its line like any problem
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            total += 1
            try:
                value = json.loads(raw.decode("utf-8-sig"))  # -sig: a BOM some editors write
            except UnicodeDecodeError as e:
                problems.append(f"{path}:{line_no}: not UTF-8: {e}")
                continue
            except json.JSONDecodeError as e:
                problems.append(f"{path}:{line_no}: malformed JSON: {e}")
                continue
            row, errors = check_row(value, path.parent)
            if row is not None and row["id"] in seen:
                errors = [f"duplicate id {row['id']!r} (first on line {seen[row['id']]})"]
            problems += [f"{path}:{line_no}: {e}" for e in errors]
            if not errors:
                seen[row["id"]] = line_no
                rows.append(row)
    if total == 0:
        raise DataError(path, [f"{path}: no rows"], 0)
    if problems and not skip_bad:
        raise DataError(path, problems, total)
    if problems:
        print(f"{path}: skipped {total - len(rows)} bad row(s) of {total}; first: {problems[0]}")
    return rows

# -----------------------------------------------------------------------------------------------------------------
# One row -> one model input


@dataclass
class Example:
    prompt_ids: list[int]  # the chat prompt, ending with the assistant's opening
    pixel_values: torch.Tensor | None  # (tiles, 3, S, S) for the prompt's <IMG_CONTEXT> tokens
    response_ids: list[int]  # SFT target: the row's response then <|im_end|>; [] for rows without a response
    opens_think: bool = False  # the prompt ends inside <think>: responses start in the reasoning (see opens_think)

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    @property
    def loss_mask(self) -> list[bool]:  # over `ids`: True on the tokens SFT learns to produce
        return [False] * len(self.prompt_ids) + [True] * len(self.response_ids)


def question_text(row: dict) -> str:
    """The user message of a row: the question, then lettered options ("A. ...") for multiple choice."""
    options = row.get("options") or []
    return row["question"] + "".join(f"\n{chr(65 + i)}. {o}" for i, o in enumerate(options))


def encode(row: dict, tokenizer: Tokenizer, config: VLMConfig, max_tiles: int | None = None,
           system: str | None = None, template: ChatTemplate | None = None, think: bool = True) -> Example:
    """A validated row (see `load_rows`) -> prompt ids (`build_prompt`: the checkpoint's `template` or ChatML), image
    tiles (at most `max_tiles` grid tiles per image) and, when the row has a `response`, the response ids ending with
    <|im_end|>. When the prompt opens <think>, an SFT response's own leading `<think>` is dropped: the prompt has it."""
    ids, pixels = build_prompt(tokenizer, config, question_text(row), row.get("image") or [], system, max_tiles,
                               template, think)
    opened = opens_think(tokenizer, ids)
    response = []
    if row.get("response") is not None:
        end = tokenizer.token_to_id("<|im_end|>")
        if end is None:
            raise ValueError("the tokenizer has no <|im_end|> token: SFT responses cannot be terminated")
        text = row["response"]
        if opened and text.lstrip().startswith(THINK_OPEN):
            text = text.lstrip()[len(THINK_OPEN):].lstrip("\n")
        response = tokenizer.encode(text, add_special_tokens=False).ids + [end]
    return Example(ids, pixels, response, opened)


# -----------------------------------------------------------------------------------------------------------------
# Batches of sequences: right padding with shifted targets, token-capped runs, responses back to text


def pad_id(config: VLMConfig) -> int:
    """The id right padding uses: any token but <IMG_CONTEXT>, which VLM.embed counts against the image tiles.
    Padding after a sequence is invisible to it under causal attention."""
    return 1 if config.image_token_id == 0 else 0


@dataclass
class Layout:
    """Where each sequence's response sits in a batch of token rows. Position t predicts token t + 1, so sequence i's
    response tokens are the targets of row `rows[i]` from column `starts[i]` on, for `lengths[i]` positions."""
    input_ids: torch.Tensor  # (R, T)
    targets: torch.Tensor  # (R, T): the response token each position predicts, IGNORE_INDEX elsewhere
    rows: list[int]
    starts: list[int]
    lengths: list[int]

    def place(self, values, dtype=torch.float32) -> torch.Tensor:
        """(R, T) zeros with sequence i's values at its response positions: a number per sequence (broadcast), or a
        list or tensor of lengths[i] values."""
        out = torch.zeros(self.targets.shape, dtype=dtype)
        for row, start, n, v in zip(self.rows, self.starts, self.lengths, values):
            out[row, start:start + n] = v if isinstance(v, (int, float)) else torch.as_tensor(v)
        return out

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each sequence's response positions of an (R, T) tensor aligned with `targets`."""
        return [x[row, start:start + n] for row, start, n in zip(self.rows, self.starts, self.lengths)]


def right_pad(prompts: list[list[int]], responses: list[list[int]], pad: int) -> Layout:
    """One right-padded row per prompt + response, with the targets that teach (or score) the responses (what
    inference batches use; training packs, see `pack`)."""
    T = max(len(p) + len(r) for p, r in zip(prompts, responses))
    ids = torch.full((len(prompts), T), pad, dtype=torch.long)
    targets = torch.full((len(prompts), T), IGNORE_INDEX, dtype=torch.long)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        ids[b, :len(p) + len(r)] = torch.tensor(p + r)
        targets[b, len(p) - 1:len(p) - 1 + len(r)] = torch.tensor(r, dtype=torch.long)
    return Layout(ids, targets, list(range(len(prompts))), [len(p) - 1 for p in prompts], [len(r) for r in responses])


def token_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Consecutive runs of indices whose padded size (count x longest) stays within `max_tokens`; an item longer
    than that goes alone."""
    batches, longest = [], 0
    for i, n in enumerate(lengths):
        if batches and (len(batches[-1]) + 1) * max(longest, n) <= max_tokens:
            batches[-1].append(i)
            longest = max(longest, n)
        else:
            batches.append([i])
            longest = n
    return batches


def decode_response(tokenizer: Tokenizer, ids: list[int], stop_ids, opens_think: bool = False) -> str:
    """A completion's text for rewards and verdicts: the stop token that ended it dropped, other special tokens
    (Qwen's <think> is one) kept. `opens_think` (the prompt ended inside `<think>`, see `opens_think`): the
    `<think>` the prompt opened is put back in front, so that format checks and answer extraction read the response
    as the model wrote it, reasoning then `</think>` then the answer."""
    text = tokenizer.decode(ids[:-1] if ids and ids[-1] in stop_ids else ids, skip_special_tokens=False)
    return THINK_OPEN + "\n" + text if opens_think else text


def mix_seed(*parts: int) -> int:
    """One 62-bit seed from integers (run seed, step, round, row; run seed, question; ...): every caller derives its
    seeds here, from what identifies a draw and never from the process that makes it."""
    h = 0
    for x in parts:
        h = (h * 1_000_003 + int(x)) % 2**62
    return h


# -----------------------------------------------------------------------------------------------------------------
# The order rows are taken in: one global prompt order, the same on every rank, each rank taking its share


@dataclass
class PromptStream:
    """Epochs of a seeded permutation of the rows; `position` counts prompts taken in the current epoch (the same on
    every rank). With the pass-rate curriculum each epoch is ordered easy -> hard and always-solved rows are left out
    (R1V3 saw curriculum shift hurt generalisation, so it is an option to measure, not the default)."""
    n: int
    seed: int
    curriculum: str = "uniform"
    epoch: int = 0
    position: int = 0
    correct: dict = field(default_factory=dict)  # row index -> [right, total] over every sampled response
    order: list = field(default_factory=list)

    def _new_epoch(self):
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        order = torch.randperm(self.n, generator=g).tolist()
        if self.curriculum == "pass_rate":
            rate = {i: self.correct[i][0] / self.correct[i][1] for i in self.correct if self.correct[i][1]}
            order = [i for i in order if rate.get(i, 0.5) < 1.0] or order
            order.sort(key=lambda i: -rate.get(i, 0.5))  # stable: ties keep the permutation's order
        self.order = order

    def take(self, k: int) -> list[int]:
        """The next k prompts of the global order."""
        out = []
        while len(out) < k:
            if not self.order or self.position >= len(self.order):
                if self.order:
                    self.epoch, self.position = self.epoch + 1, 0
                self._new_epoch()
            out.append(self.order[self.position])
            self.position += 1
        return out

    def record(self, results: list[tuple[int, int, int]]):
        """(row, right, total) per sampled group."""
        for i, right, total in results:
            c = self.correct.setdefault(i, [0, 0])
            c[0] += right
            c[1] += total

    def state(self) -> dict:
        """Everything `take` depends on; the epoch's order too, since the curriculum sorted it by the pass rates
        of its start, which are not the pass rates now."""
        return {"epoch": self.epoch, "position": self.position, "order": list(self.order),
                "correct": {str(k): v for k, v in sorted(self.correct.items())}}

    def load(self, state: dict):
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.order = [int(i) for i in state["order"]]
        self.correct = {int(k): list(v) for k, v in state["correct"].items()}

# -----------------------------------------------------------------------------------------------------------------
# What the trainer learns from: sequences, packed into micro-batches


@dataclass
class Sequence:
    """One prompt + response the trainer learns from."""
    row: int  # index into the data rows
    prompt: list[int]
    response: list[int]
    pixel_values: torch.Tensor | None
    advantage: float = 0.0
    sampler_logprobs: list[float] | None = None  # per response token (GRPO)
    old_logprobs: torch.Tensor | None = None  # per response token, the trainer's before the update (GRPO, mu > 1)
    weight: float = 1.0  # 0 for a dummy sequence that only keeps collectives in step
    truncated: bool = False
    order: int = 0  # position in the step's global order: what splits a rollout into mini-batches on any world size


def prompt_key(s: Sequence) -> tuple:
    """What makes sequences share a prompt: the same tokens and the same image tensor (a group's samples share
    their prompt's)."""
    return tuple(s.prompt), None if s.pixel_values is None else id(s.pixel_values)


@dataclass
class MicroBatch:
    """One packed row (model.SharedPrompts): per-token tensors are (1, T), aligned with `targets`."""
    input_ids: torch.Tensor  # (1, T)
    positions: torch.Tensor  # (1, T): each token's position in its own sequence (RoPE)
    attention: SharedPrompts  # where the row's prompts and samples are, for attention
    pixel_values: torch.Tensor | None  # (tiles, 3, S, S): each distinct image of the batch once (a group shares one)
    image_index: torch.Tensor | None  # (<IMG_CONTEXT> tokens,): the feature row of pixel_values each one takes
    targets: torch.Tensor  # (1, T): the response token each position predicts, IGNORE_INDEX elsewhere
    mask: torch.Tensor  # (1, T) float: 1 on the response tokens that count in the loss
    advantages: torch.Tensor  # (1, T): each response token's sequence's advantage
    sampler_logprobs: torch.Tensor  # (1, T)
    old_logprobs: torch.Tensor | None  # (1, T)
    seqs: list[Sequence]  # grouped by prompt: the order of `layout`
    layout: Layout  # where each sequence's response sits


def pack(seqs: list[Sequence], device: torch.device, dtype: torch.dtype, mask_truncated: bool,
         image_token_id: int | None = None, tokens_per_tile: int = 0) -> MicroBatch:
    """The sequences grouped by prompt (`prompt_key`, in order of first appearance) into one row: per prompt, its
    tokens but the last once, then each sample's suffix (the prompt's last token and the response but its last,
    the positions that predict the response; positions continue the prompt's). The per-token values sit on the
    suffixes; each distinct image tensor goes in once, `image_index` placing its features at every image token
    of the row, so the vision tower, like the LLM, runs once per prompt and autograd sums the gradient of its G
    uses."""
    groups: dict[tuple, list[Sequence]] = {}
    for s in seqs:
        groups.setdefault(prompt_key(s), []).append(s)
    ids, targets, positions, spans, starts, ordered = [], [], [], [], [], []
    tiles, offsets, index = [], {}, []  # distinct images; feature row of each one's first token; per image token
    for members in groups.values():
        prompt, pixels = members[0].prompt, members[0].pixel_values
        P, lengths, at = len(prompt) - 1, [len(s.response) for s in members], len(ids)
        if P + sum(lengths) == 0:
            continue  # a one-token prompt without responses predicts nothing
        ids += prompt[:-1]
        positions += range(P)
        targets += [IGNORE_INDEX] * P
        for s, n in zip(members, lengths):
            starts.append(len(ids))
            ids += ([prompt[-1]] + s.response)[:n]
            positions += range(P, P + n)
            targets += s.response
        last = len(ids) - at - 1  # a sample without response tokens points its padding at the span's end
        suffix = torch.tensor([[f - at + min(i, n - 1) if n else last for i in range(max(lengths))]
                               for f, n in zip(starts[-len(members):], lengths)], dtype=torch.long)  # (G, S)
        real = torch.tensor([j * suffix.shape[1] + i for j, n in enumerate(lengths) for i in range(n)],
                            dtype=torch.long)
        spans.append(PromptSpan(P, len(ids) - at, suffix.to(device), real.to(device)))
        ordered += members
        if pixels is not None:
            if id(pixels) not in offsets:
                offsets[id(pixels)] = sum(t.shape[0] for t in tiles) * tokens_per_tile
                tiles.append(pixels)
            n_prefix = prompt[:-1].count(image_token_id)
            ends = [n_prefix] * sum(n > 0 for n in lengths) if prompt[-1] == image_token_id else []
            index.append(torch.tensor(list(range(n_prefix)) + ends, dtype=torch.long) + offsets[id(pixels)])
    row = lambda values: torch.tensor(values, dtype=torch.long).view(1, len(ids))  # (1, T)
    layout = Layout(row(ids), row(targets), [0] * len(ordered), starts, [len(s.response) for s in ordered])
    mask = layout.place([s.weight * (0.0 if mask_truncated and s.truncated else 1.0) for s in ordered])
    sampler = layout.place([s.sampler_logprobs if s.sampler_logprobs is not None else 0.0 for s in ordered])
    old = layout.place([s.old_logprobs if s.old_logprobs is not None else 0.0 for s in ordered]) \
        if any(s.old_logprobs is not None for s in ordered) else None
    to = lambda t: None if t is None else t.to(device, non_blocking=True)
    return MicroBatch(to(layout.input_ids), to(row(positions)), SharedPrompts(spans),
                      torch.cat(tiles).to(device, dtype) if tiles else None, to(torch.cat(index)) if tiles else None,
                      to(layout.targets), to(mask), to(layout.place([s.advantage for s in ordered])), to(sampler),
                      to(old), ordered, layout)


def micro_batch_plan(seqs: list[Sequence], size: int, max_tokens: int | None = None) -> list[list[Sequence]]:
    """This rank's micro-batches. `max_tokens` unset: runs of `size` sequences in the given order (a group's
    samples are consecutive). Set: sequences ordered by length and cut into runs whose padded size (count x
    longest prompt + response) stays within the budget (`token_batches`), a prompt's samples together (ordered by
    the group's longest, then their own length), so that the packed row holds its prompt once where the budget
    allows. The packed row is never longer than that bound, nor is what its attention gathers (model.SharedPrompts),
    so the bound is what memory plans count (plan.py). The loss is a token-level mean over the whole step, so the
    grouping changes the cost, never the result."""
    if max_tokens is None:
        return [seqs[i:i + size] for i in range(0, len(seqs), size)]
    n = lambda s: len(s.prompt) + len(s.response)
    first: dict[tuple, int] = {}  # a group's key -> where it first appears: a deterministic tie-break
    group = lambda s: first.setdefault(prompt_key(s), len(first))
    longest: dict[int, int] = {}
    for s in seqs:
        longest[group(s)] = max(longest.get(group(s), 0), n(s))
    ordered = sorted(seqs, key=lambda s: (-longest[group(s)], group(s), -n(s), s.order))
    return [[ordered[i] for i in run] for run in token_batches([n(s) for s in ordered], max_tokens)]


def tokenizer_preview(tok: Tokenizer, ids: list[int]) -> str:
    """The decoded prompt with each run of <IMG_CONTEXT> shown once with its count."""
    text = tok.decode(ids, skip_special_tokens=False)
    return text if IMG_CONTEXT not in text else \
        re.sub(f"(?:{IMG_CONTEXT}\\s*)+", lambda m: f"{IMG_CONTEXT}x{m.group().count(IMG_CONTEXT)}", text)


@dataclass
class CheckConfig:
    """`python data.py FILE`: the encoding it shows."""
    ckpt: str | None = cli.arg(None, "checkpoint directory (config.json, tokenizer.json) to encode the first row with")
    max_tiles: int | None = cli.arg(None, "tile cap per image; unset: the config's max_dynamic_patch")


def main(argv: list[str] | None = None):
    p = cli.parser("Validate a JSONL data file and show how its first row is encoded.")
    p.add_argument("data", help="JSONL file of rows")
    cli.add_flags(p, CheckConfig)
    args = p.parse_args(argv)
    cfg = cli.config_from(args, CheckConfig)
    rows = load_rows(args.data)
    print(f"{args.data}: {len(rows)} rows, all valid; answer types "
          f"{ {t: sum(r['answer_type'] == t for r in rows) for t in sorted({r['answer_type'] for r in rows})} }")
    if cfg.ckpt:
        config, tok = read_config(cfg.ckpt), load_tokenizer(cfg.ckpt)
        check_tokenizer(tok, config, cfg.ckpt)
        ex = encode(rows[0], tok, config, cfg.max_tiles)
        tiles = 0 if ex.pixel_values is None else ex.pixel_values.shape[0]
        print(f"row {rows[0]['id']}: {len(ex.prompt_ids)} prompt tokens, {tiles} tiles, "
              f"{len(ex.response_ids)} response tokens\n{tokenizer_preview(tok, ex.prompt_ids)}")


if __name__ == "__main__":
    cli.run(main, "data.py")
