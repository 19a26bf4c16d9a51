"""What every script of the project shares at its edges: command-line flags generated from a config dataclass, and
the files it writes for people and tools (strict JSON, atomic replacement, appended JSONL), and how a script stops
on an error it expected (`run`: one line, exit 2 for a bad flag value, 1 otherwise; unexpected errors keep their
traceback).

One flag per dataclass field, spelt like the field (`--max_new_tokens`, nanoGPT's style), its help from the
field's metadata, its default shown; booleans take `--name` / `--no-name`, optional numbers take a value or keep
None, tuples take a comma list. A config's own `__post_init__` checks the values, so a script's flags and the
Python API accept exactly the same things.

    python train_rl.py --help      # every flag of the trainer, generated from TrainConfig
"""
import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import time
import typing
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record


def arg(default, help: str, choices: tuple | None = None):
    """A config field with its command-line help (and the values it may take)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


def _kind(annotation) -> type:
    """The scalar type a flag parses: int for `int | None`, str for `tuple[str, ...]`."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (tuple, list):
        return tuple
    return next(t for t in (bool, int, float, str) if t is annotation or t in args)


def add_flags(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One flag per init field of the dataclass `cls` (those named in `skip` left out)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind, help = _kind(hints[f.name]), f.metadata.get("help", "")
        if kind is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=default, help=help)
        elif kind is tuple:
            parser.add_argument(f"--{f.name}", type=lambda s: tuple(w for w in s.split(",") if w),
                                default=default, help=f"{help} (a comma list)")
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=default, help=help,
                                choices=f.metadata.get("choices"))


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """argparse's one-line error (without the usage block: --help shows it), exit 2; under torchrun from rank 0
        only (every rank exits)."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n" if int(os.environ.get("RANK", 0)) == 0 else None)


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser that shows each flag's default; `description` is usually the script's first docstring
    paragraph."""
    return _Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def config_from(args: argparse.Namespace, cls, **override):
    """`cls` built from the parsed flags that belong to it, then `override`."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    return cls(**{k: v for k, v in vars(args).items() if k in names} | override)


def given(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the flags that `argv` sets explicitly (`--seed 1`, `--seed=1`, `--no-compile`)."""
    out = set()
    for action in parser._actions:
        if any(a == s or a.startswith(s + "=") for s in action.option_strings for a in argv):
            out.add(action.dest)
    return out

# -----------------------------------------------------------------------------------------------------------------
# Files: strict JSON (nan and inf as null, which every JSON reader accepts), replaced atomically or appended


def json_safe(x):
    """nan and inf (no critical token in a step, no sampled answer) as None, recursively."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def write_atomic(path: Path, text: str):
    """Write `path` whole or not at all: a reader (or a crash) never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def append_jsonl(path: Path, record: dict):
    """One strict-JSON line at the end of `path`."""
    with open(path, "a") as f:
        f.write(json.dumps(json_safe(record), allow_nan=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file written by `append_jsonl`, with the nulls of non-finite numbers back as nan."""
    return [{k: math.nan if v is None else v for k, v in json.loads(line).items()}
            for line in Path(path).read_text().splitlines() if line.strip()]

# -----------------------------------------------------------------------------------------------------------------
# Errors a script expects: one line and an exit code, no traceback


class Expected(Exception):
    """An error whose message is the whole story (a bad flag, a missing file, a locked run directory): `run` prints
    it as one line, without a traceback. Modules that raise such errors subclass it."""


class UsageError(Expected, ValueError):
    """A flag's value refused at the door (`--lr must be finite and > 0, got inf`): exit 2, as argparse's own."""


class InputError(Expected, ValueError):
    """Inputs that cannot make a run (a data file, a checkpoint, a tokenizer, settings that disagree with them); the
    message names the file, row or setting: exit 1."""


class Stopped(Expected, RuntimeError):
    """A run that stopped itself on purpose (non-finite weights, nothing to train on, SIGTERM); the message says why
    and what to do: exit `exit_code`."""
    exit_code = 1


EXPECTED = (Expected, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


def exit_code(e: BaseException) -> int:
    return 2 if isinstance(e, UsageError) else getattr(e, "exit_code", 1)


def run(main, prog: str, argv: list[str] | None = None):
    """`main(argv)` as a script's entry point: an expected error (`EXPECTED`) is printed once as
    `PROG: error: MESSAGE` (by each node's local rank 0 under torchrun) and exits with `exit_code`; anything else
    keeps its traceback. Under torchrun each rank also writes the message to its error file (TORCHELASTIC_ERROR_FILE),
    and unexpected errors are recorded by torch's `@record`, so torchrun's summary names the root cause. The other
    ranks of a node wait for local rank 0 to fail first; torchrun then ends them with SIGTERM, which they answer with
    exit 0, so its summary lists the root cause once, not once per rank (a rank that fails alone exits with its code
    after the wait, and the summary names it)."""
    def guarded():
        try:
            main(argv)
        except EXPECTED as e:
            message = f"{prog}: error: {e}"
            if error_file := os.environ.get("TORCHELASTIC_ERROR_FILE"):  # torchrun's summary shows the one line
                with open(error_file, "w") as f:  # as ErrorHandler.record_exception writes it, the line as traceback
                    json.dump({"message": {"message": message, "extraInfo": {
                        "py_callstack": message, "timestamp": str(int(time.time()))}}}, f)
            if int(os.environ.get("LOCAL_RANK", 0)) == 0:
                print(message, file=sys.stderr, flush=True)
                sys.exit(exit_code(e))
            # torchrun ends a node's ranks as soon as one fails: local rank 0 should be that one. Its exit (Python's
            # teardown of torch) takes seconds, so wait for torchrun's SIGTERM, then leave without a teardown of
            # our own, in which a signal would count as this rank's failure.
            signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
            time.sleep(10.0)
            sys.stdout.flush()
            os._exit(exit_code(e))
    record(guarded)()
