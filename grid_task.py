"""The synthetic task behind the CPU default run: count the red cells of a noisy 4x4 colour grid.

A 56 px image of 4x4 solid cells (14 px each; red, green, blue, yellow with per-cell colour jitter and per-pixel
Gaussian noise), the question "how many red cells ?", a numeric answer. Cold-start SFT traces walk the cells row by
row (rows a..d top to bottom, columns 1..4 left to right), each cell as its name, its colour and the running count
of red cells:

    full:      <think> a1 red 1 a2 blue 1 ... c4 green 5 wait d1 red 6 ... d4 green 6 </think> \\boxed{6}
    shortcut:  <think> a1 red 1 a2 blue 1 ... c4 green 5 </think> \\boxed{5}

The shortcut (65% of train traces by default) stops after the third row and answers the count so far: right only
when row d holds no red (0.65^4 ~ 18% of grids). So the strategy is one token after c4, `wait` or `</think>`, and
`wait` is one of entropy.CRITICAL_WORDS: R1V3's critical-token entropy has a real reflective token to measure.
GRPO should find the full walk that the cold start rarely used. The task is sized for a laptop CPU: one image tile,
a one-token-per-word vocabulary and traces of a few dozen tokens let a tiny model go through cold start and GRPO from
scratch in a single sitting, and still leave it a real choice to learn. Rows follow data.py, rewards reward.py.

`prepare(out_dir, cfg)` writes, all determined by the seed (same seed -> byte-identical files):
    out_dir/data/train.jsonl, heldout.jsonl   rows as data.load_rows reads them (held-out: full traces as response)
    out_dir/data/images/{train,heldout}-N.png
    out_dir/init/                             random-init tiny VLM, native layout, with tokenizer.json
    out_dir/grid_task.json                    the settings, written last: marks the directory complete
A second call with the same settings does nothing; with other settings it refuses (the trainer's outputs beside the
data would no longer match it): use another directory or delete this one.

`prepare_ood(task)` adds an out-of-distribution held-out split beside them (the default run's --paper_tables): grids
of p_red 0.6 (counts around 10, rare in training, where they average 5.6), their own random stream, full traces;
data/heldout_ood.jsonl and images/heldout_ood-N.png, data/heldout_ood.json its settings. The other files and the
manifest stay as they are, byte for byte.

    python grid_task.py --out runs/grid --seed 0
"""
import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image
from tokenizers import Tokenizer

import cli
from cli import arg
from data import encode, load_rows, load_tokenizer, tokenizer_preview, word_tokenizer
from checkpoint import IMG_CONTEXT, read_config, save_model
from model import VLM, tiny_config
from reward import score

COLOURS = ("red", "green", "blue", "yellow")  # index = a grid cell's value; initials name cells in a row's "grid"
RED = 0
# At least 40 from 0 and 255 in every channel, so jitter up to 40 never clips; any two colours differ by 175 in some
# channel, far beyond jitter plus the noise left in a cell's mean.
BASE_RGB = np.array([(215, 40, 40), (40, 175, 40), (40, 40, 215), (215, 215, 40)])
ROWS, COLS = "abcd", 4
SHORTCUT_ROWS = 3  # the shortcut answers after row c
QUESTION = "how many red cells ?"
SPLITS = ("train", "heldout", "heldout_ood")  # the index is the split's random stream: no two share a grid's draws
OOD = dict(p_red=0.6)  # the OOD split's changes: more red cells, so the counts are ones training rarely reached
MANIFEST = "grid_task.json"
GENERATOR_VERSION = 1  # bump whenever the same settings would write other files: older directories are then refused


@dataclass
class GridTaskConfig:
    seed: int = arg(0, "seed of the data (one stream per split) and of the initial weights")
    n_train: int = arg(4000, "train rows: SFT draws ~1,000 x 64 samples from these, GRPO its prompts")
    n_heldout: int = arg(256, "held-out rows (each evaluated greedily and with 8 samples: keep it small on a CPU)")
    p_red: float = arg(0.35, "probability that a cell is red; green, blue, yellow share the rest equally")
    p_full: float = arg(0.35, "share of train traces that read all 16 cells; the others take the shortcut")
    jitter: int = arg(25, "per-cell colour offset, uniform in [-jitter, jitter] per channel (0..40)")
    noise: float = arg(12.0, "per-pixel Gaussian noise sigma")
    image_size: int = arg(56, "pixels per side (a multiple of 28) = the model's tile: one tile, no thumbnail, "
                              "cells of image_size / 4")

    def __post_init__(self):
        if self.seed < 0 or self.n_train < 1 or self.n_heldout < 1:
            raise ValueError(f"need seed >= 0 and n_train, n_heldout >= 1, got {self.seed}, {self.n_train}, "
                             f"{self.n_heldout}")
        if not (0 <= self.p_red <= 1 and 0 <= self.p_full <= 1):
            raise ValueError(f"p_red and p_full are probabilities, got {self.p_red}, {self.p_full}")
        if not (0 <= self.jitter <= 40 and self.noise >= 0):
            raise ValueError(f"need 0 <= jitter <= 40 (the base colours' margin) and noise >= 0, "
                             f"got {self.jitter}, {self.noise}")
        if self.image_size < 28 or self.image_size % 28:
            raise ValueError(f"image_size must be a multiple of 28 (4 cells; 14 px patches in an even count for the "
                             f"0.5 pixel shuffle), got {self.image_size}")

# -----------------------------------------------------------------------------------------------------------------
# One example: grid -> image, grid -> trace, grid -> row


def make_grid(rng: np.random.Generator, p_red: float) -> np.ndarray:
    """(4, 4) colour indices into COLOURS, row a first."""
    other = (1 - p_red) / (len(COLOURS) - 1)
    return rng.choice(len(COLOURS), size=(len(ROWS), COLS), p=[p_red] + [other] * (len(COLOURS) - 1))


def render(grid: np.ndarray, rng: np.random.Generator, jitter: int, noise: float, image_size: int) -> Image.Image:
    """Solid cells of jittered base colours plus per-pixel Gaussian noise, 8-bit RGB."""
    cell = image_size // COLS
    rgb = BASE_RGB[grid] + rng.integers(-jitter, jitter + 1, size=(*grid.shape, 3))  # (4, 4, 3)
    pixels = rgb.repeat(cell, axis=0).repeat(cell, axis=1) + rng.normal(0.0, noise, (image_size, image_size, 3))
    return Image.fromarray(np.rint(pixels).clip(0, 255).astype(np.uint8))


def trace(grid: np.ndarray, full: bool) -> str:
    """The cold-start response: each cell's name, colour and running red count, then the boxed count. The full walk
    says `wait` before row d; the shortcut closes the thought there instead and answers the count so far."""
    words, count = ["<think>"], 0
    for r, row in enumerate(grid):
        if r == SHORTCUT_ROWS:
            if not full:
                break
            words.append("wait")
        for c, colour in enumerate(row):
            count += int(colour == RED)
            words += [f"{ROWS[r]}{c + 1}", COLOURS[colour], str(count)]
    return " ".join(words + ["</think>", f"\\boxed{{{count}}}"])


def grid_of(row: dict) -> np.ndarray:
    """A row's grid back from its "grid" field (one string of colour initials per row)."""
    initials = [c[0] for c in COLOURS]
    return np.array([[initials.index(ch) for ch in line] for line in row["grid"]])


def make_row(split: str, i: int, grid: np.ndarray, full: bool) -> dict:
    """A data.py row; `strategy` and `grid` are extras the reward ignores and the summaries read."""
    return {"id": f"{split}-{i}", "question": QUESTION, "answer": str(int((grid == RED).sum())),
            "answer_type": "numeric", "options": [], "image": f"images/{split}-{i}.png", "subject": "counting",
            "response": trace(grid, full), "strategy": "full" if full else "shortcut",
            "grid": ["".join(COLOURS[c][0] for c in row) for row in grid]}


def sample(rng: np.random.Generator, cfg: GridTaskConfig) -> tuple[np.ndarray, bool, Image.Image]:
    """One grid, whether its train trace is the full walk, and its image. The draws are the same whatever p_full,
    so changing the strategy mix keeps a seed's grids and images."""
    grid = make_grid(rng, cfg.p_red)
    full = bool(rng.random() < cfg.p_full)
    return grid, full, render(grid, rng, cfg.jitter, cfg.noise, cfg.image_size)

# -----------------------------------------------------------------------------------------------------------------
# Vocabulary and the initial checkpoint


def vocabulary() -> list[str]:
    """Every word of the prompts and traces; each count's boxed answer is one word, so a trace is one token per word."""
    counts = [str(k) for k in range(len(ROWS) * COLS + 1)]
    return [*QUESTION.split(), *(f"{r}{c}" for r in ROWS for c in range(1, COLS + 1)), *COLOURS, *counts,
            "<think>", "</think>", "wait", *(f"\\boxed{{{k}}}" for k in counts)]


def build_tokenizer() -> Tokenizer:
    return word_tokenizer(vocabulary())


def write_init(path: Path, cfg: GridTaskConfig):
    """A randomly initialised tiny VLM in transformers' native layout, with the task's tokenizer beside it."""
    tok = build_tokenizer()
    config = tiny_config(tok.get_vocab_size(), tok.token_to_id(IMG_CONTEXT), image_size=cfg.image_size)
    save_model(VLM.from_config(config, seed=cfg.seed), path, layout="native")
    tok.save(str(path / "tokenizer.json"))

# -----------------------------------------------------------------------------------------------------------------
# The task directory: prepared once per settings


@dataclass
class GridTask:
    out_dir: Path
    config: GridTaskConfig

    @property
    def train_jsonl(self) -> Path:
        return self.out_dir / "data" / "train.jsonl"

    @property
    def heldout_jsonl(self) -> Path:
        return self.out_dir / "data" / "heldout.jsonl"

    @property
    def heldout_ood_jsonl(self) -> Path:
        return self.out_dir / "data" / "heldout_ood.jsonl"

    @property
    def init_checkpoint(self) -> Path:
        return self.out_dir / "init"

    @property
    def tokenizer(self) -> Path:
        return self.out_dir / "init" / "tokenizer.json"


def write_split(folder: Path, split: str, n: int, cfg: GridTaskConfig):
    """n rows and their images; held-out rows carry the full (right) trace, a reference for teacher forcing."""
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split)])
    lines = []
    for i in range(n):
        grid, full, image = sample(rng, cfg)
        row = make_row(split, i, grid, full or split != "train")
        image.save(folder / row["image"], format="PNG")
        lines.append(json.dumps(row))
    (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


def _settings(cfg: GridTaskConfig) -> dict:
    return {"generator_version": GENERATOR_VERSION, **asdict(cfg)}


def _manifest(out_dir: Path) -> dict | None:
    """The settings a complete directory was prepared with; None if there is none (or a crash cut it short)."""
    try:
        return json.loads((out_dir / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def prepare(out_dir, cfg: GridTaskConfig | None = None) -> GridTask:
    """Write the task into out_dir unless it is already there with the same settings (then nothing is written).

    Refuses a directory prepared with other settings (what the trainer wrote beside the data would no longer match
    it) and one without the manifest that holds anything but this function's own paths (never delete foreign
    files). A directory without the manifest is an interrupted prepare: its data/ and init/ are rewritten."""
    cfg = cfg or GridTaskConfig()
    task = GridTask(Path(out_dir), cfg)
    found = _manifest(task.out_dir)
    if found == _settings(cfg):
        return task
    if found is not None:
        diff = {k: (found.get(k), v) for k, v in _settings(cfg).items() if found.get(k) != v}
        raise ValueError(f"{out_dir} was prepared with other settings {{name: (there, asked)}}: {diff}; "
                         f"use another directory or delete it")
    if task.out_dir.is_dir():
        foreign = sorted(p.name for p in task.out_dir.iterdir()
                         if p.name not in ("data", "init", MANIFEST) and not p.name.startswith("init."))
        if foreign:
            raise ValueError(f"{out_dir} has no {MANIFEST} and holds {foreign}: not a grid task directory, "
                             f"refusing to write into it")
    for name in ("data", "init"):
        shutil.rmtree(task.out_dir / name, ignore_errors=True)
    (task.out_dir / "data" / "images").mkdir(parents=True)
    write_split(task.out_dir / "data", "train", cfg.n_train, cfg)
    write_split(task.out_dir / "data", "heldout", cfg.n_heldout, cfg)
    write_init(task.init_checkpoint, cfg)
    (task.out_dir / MANIFEST).write_text(json.dumps(_settings(cfg), indent=2) + "\n")
    return task

def prepare_ood(task: GridTask, n: int | None = None) -> Path:
    """The OOD held-out split of a prepared task (n rows, default the held-out count): written once, refused when
    asked again with other settings. Returns its jsonl."""
    cfg = replace(task.config, **OOD)
    settings = {"generator_version": GENERATOR_VERSION, **asdict(cfg), "n": n or cfg.n_heldout}
    marker = task.out_dir / "data" / "heldout_ood.json"
    if marker.is_file():
        found = json.loads(marker.read_text())
        if found != settings:
            raise ValueError(f"{marker} holds other settings {found}, asked {settings}: delete it to rewrite")
        return task.heldout_ood_jsonl
    write_split(task.out_dir / "data", "heldout_ood", settings["n"], cfg)
    marker.write_text(json.dumps(settings, indent=2) + "\n")
    return task.heldout_ood_jsonl

# -----------------------------------------------------------------------------------------------------------------
# Command line: prepare and summarise


def summarize(task: GridTask):
    """Counts, the shortcut's ceiling, one example through the tokenizer, and what reward.py gives each strategy."""
    train, heldout = load_rows(task.train_jsonl), load_rows(task.heldout_jsonl)
    tok, config = load_tokenizer(task.init_checkpoint), read_config(task.init_checkpoint)
    no_red_d = lambda rows: np.mean([COLOURS[RED][0] not in r["grid"][SHORTCUT_ROWS] for r in rows])
    print(f"train {len(train)} rows ({np.mean([r['strategy'] == 'full' for r in train]):.1%} full traces), "
          f"held-out {len(heldout)} rows (full traces); vocabulary {tok.get_vocab_size()}")
    print(f"row d without red (the shortcut's accuracy ceiling): train {no_red_d(train):.1%}, "
          f"held-out {no_red_d(heldout):.1%}")
    row = train[0]
    ex = encode(row, tok, config)
    decoded = tok.decode(ex.response_ids)
    print(f"example {row['id']} (grid {' '.join(row['grid'])}, answer {row['answer']}, {row['strategy']}):\n"
          f"  prompt   {tokenizer_preview(tok, ex.prompt_ids)!r}\n  response {row['response']}\n"
          f"  decoded  {decoded}  ({len(ex.response_ids)} tokens with <|im_end|>, round trip "
          f"{'ok' if decoded == row['response'] else 'BROKEN'})")
    for full in (True, False):
        scores = [score(trace(grid_of(r), full), r) for r in train]
        print(f"reward.py on every train grid, {'full' if full else 'shortcut'} traces: accuracy "
              f"{np.mean([s['accuracy'] for s in scores]):.3f}, format {np.mean([s['format'] for s in scores]):.3f}")


def main(argv: list[str] | None = None):
    p = cli.parser("Prepare the red-cell counting task (data, tokenizer, initial checkpoint) and print a summary.")
    p.add_argument("--out", default="runs/grid", help="task directory (data/, init/, grid_task.json)")
    cli.add_flags(p, GridTaskConfig)
    args = p.parse_args(argv)
    cfg = cli.config_from(args, GridTaskConfig)
    print(f"config {asdict(cfg)}")
    t0 = time.perf_counter()
    task = prepare(args.out, cfg)
    print(f"prepared {task.out_dir} in {time.perf_counter() - t0:.2f} s (nothing to do if it was complete)")
    summarize(task)


if __name__ == "__main__":
    main()
