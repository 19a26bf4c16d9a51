"""The run directory is the truth: which checkpoints OUT holds is decided by scanning it, one run at a time holds it
(OUT/.lock), a checkpoint is written whole or not at all, and a resume falls back past a checkpoint that cannot be
read. Layout: OUT/step_NNNNNN/{model/, state/ (torch.distributed.checkpoint), config.json}, written as
step_NNNNNN.tmp and renamed when complete; OUT/latest names the newest one for people and scripts, a hint only.

The training state resumes on any number of processes: each rank's RNG is saved under its own key with the world
size, and a rank the checkpoint has no RNG for (more processes than saved) derives it from (seed, rank).

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_rundir.py   # rollback, lock, corrupt files, disk full, 1 <-> 2
"""
import contextlib
import errno
import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import cli
from checkpoint import save_model
from cli import write_atomic
from data import mix_seed

RUN_FILES = ("metrics.jsonl", "eval.jsonl", "best.json")  # what a run leaves besides its checkpoints


class CheckpointError(cli.Expected, RuntimeError):
    """A checkpoint that could not be written or read; the message names the directory and the cause."""


class RunDirLocked(cli.Expected, RuntimeError):
    """OUT is held by another run; the message names its pid and host."""

# -----------------------------------------------------------------------------------------------------------------
# Which checkpoints OUT holds


def step_of(path: Path) -> int:
    return int(path.name.removeprefix("step_"))


def is_complete(path: Path) -> bool:
    """A renamed step directory (never a .tmp) with both halves in it: the training state and the model."""
    return (path.is_dir() and path.name.startswith("step_") and path.name.removeprefix("step_").isdigit()
            and (path / "state" / ".metadata").is_file() and (path / "model" / "config.json").is_file())


def checkpoints(out) -> list[Path]:
    """Every complete step checkpoint in OUT, oldest first."""
    out = Path(out)
    return sorted((p for p in out.glob("step_*") if is_complete(p)), key=step_of) if out.is_dir() else []


def newest_checkpoint(out) -> Path | None:
    """The newest complete checkpoint by scanning OUT. OUT/latest is never read: a rollback deletes step
    directories without touching it, and a save killed between its rename and rewriting it leaves it one step
    behind; whatever it names that is complete, the scan finds too, at the same step or before the newest."""
    found = checkpoints(out)
    return found[-1] if found else None


def check_out(out, resume: bool):
    """The guard before a run writes anything: without `resume`, OUT must hold no checkpoint and no run files
    (two runs' metrics would mix, and the new one would overwrite the other's checkpoints)."""
    out = Path(out)
    if resume:
        return
    held = [p.name for p in checkpoints(out)[-1:]] + [f for f in RUN_FILES if (out / f).is_file()]
    if held:
        raise FileExistsError(f"{out} already holds a run ({', '.join(held)}): pass --resume to continue that run, "
                              f"or choose another --out")

# -----------------------------------------------------------------------------------------------------------------
# One run per directory: OUT/.lock


def _owner_alive(owner: dict) -> bool:
    """Only a process on this host can be checked; one elsewhere counts as alive."""
    if owner.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _create_lock(path: Path, me: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(me) + "\n")
    return True


@contextlib.contextmanager
def lock(out):
    """Hold OUT/.lock (pid, host, start time; created with O_EXCL, so of two runs exactly one gets it) while the
    block runs; released on exit, exceptions included. A lock left by a dead process on this host is taken over
    with a warning naming it. Call it on one process only (rank 0): `distributed_lock` does that for torchrun."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / ".lock"
    me = dict(pid=os.getpid(), host=socket.gethostname(), started=time.strftime("%Y-%m-%d %H:%M:%S"))
    if not _create_lock(path, me):
        try:
            owner = json.loads(path.read_text())
        except (OSError, ValueError):  # its owner died between creating and writing it, or someone edited it
            raise RunDirLocked(f"{out} is locked by {path}, which cannot be read: if no run uses {out}, delete it")
        if _owner_alive(owner):
            raise RunDirLocked(f"{out} is in use by another run (pid {owner['pid']} on {owner['host']}, started "
                               f"{owner.get('started')}): wait for it, or choose another --out (if that run is gone, "
                               f"delete {path})")
        print(f"warning: {path} was left by pid {owner['pid']} on {owner['host']} (started {owner.get('started')}), "
              f"which is no longer running: taking it over", flush=True)
        path.unlink(missing_ok=True)
        if not _create_lock(path, me):
            raise RunDirLocked(f"{out}: another run took over the stale lock {path} first")
    try:
        yield path
    finally:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()) == me:  # never remove a lock another run has since taken
                path.unlink()


@contextlib.contextmanager
def distributed_lock(out):
    """`lock` on rank 0 for every rank: rank 0 holds OUT/.lock, and when it cannot, every rank raises the same
    error (a torchrun job stops whole rather than hanging in its first collective). Without torch.distributed
    initialised: `lock`."""
    if not dist.is_initialized():
        with lock(out) as path:
            yield path
        return
    with contextlib.ExitStack() as stack:
        error = None
        if dist.get_rank() == 0:
            try:
                stack.enter_context(lock(out))
            except RunDirLocked as e:
                error = str(e)
        shared = [error]
        dist.broadcast_object_list(shared, src=0)
        if shared[0] is not None:
            raise RunDirLocked(shared[0])
        yield Path(out) / ".lock"

# -----------------------------------------------------------------------------------------------------------------
# Writing a checkpoint


def _rank_state(device: torch.device) -> dict:
    state = {"cpu_rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def _tensor_bytes(obj) -> int:
    """The bytes of every tensor in a nested state dict, at their full (unsharded) size."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _on_every_rank(error: str | None) -> str | None:
    """The first rank's error, on every rank (None when all succeeded), so that all of them stop together."""
    if not dist.is_initialized():
        return error
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e is not None), None)


FAILED = (Exception, CheckpointException)  # DCP's exception is a BaseException: it carries every rank's failure


def _cause(e: BaseException) -> BaseException:
    """The first failing rank's own exception inside DCP's wrapper."""
    return next(iter(e.failures.values()))[0] if isinstance(e, CheckpointException) and e.failures else e


def _failure(e: BaseException) -> str:
    """One line: what failed, without DCP's per-rank tracebacks."""
    e = _cause(e)
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return f"no space left on the device ({e.filename or e.strerror})"
    return (f"{type(e).__name__}: {e}".splitlines() or [type(e).__name__])[0]


def save_checkpoint(out: Path, step: int, d, model, optimizer, state: dict, copy, config_json: str,
                    keep: int = 0) -> Path:
    """OUT/step_NNNNNN, all or nothing. The model via checkpoint.save_model in the source's layout with its
    tokenizer (loadable by checkpoint.load_model, and for the native layout by transformers), from `copy`, which
    must equal the trained weights (refreshed); the training state through torch.distributed.checkpoint, each rank
    writing its own shards: model and optimizer, `state` (scheduler, step, data position, ... identical on every
    rank), the world size, and each rank's RNG under its own key (DCP keeps one copy of identical keys). Refused
    before writing when OUT's file system has less free space than the newest checkpoint takes (the first: the
    model, optimizer and copy's bytes). On any failure the .tmp directory is removed, so the previous checkpoint
    stays the newest, and every rank raises CheckpointError naming the directory. After a success, .tmp directories
    of saves that died go (the caller holds OUT's lock: no other save is in progress) and `keep` > 0 prunes all but
    the newest `keep`, never the one just written."""
    out = Path(out)
    name = f"step_{step:06d}"
    final, tmp = out / name, out / f"{name}.tmp"
    model_sd, optim_sd = get_state_dict(model, optimizer)
    previous = newest_checkpoint(out)
    error = None
    if d.rank == 0:
        try:
            out.mkdir(parents=True, exist_ok=True)
            needed = directory_bytes(previous) if previous else \
                _tensor_bytes(model_sd) + _tensor_bytes(optim_sd) + _tensor_bytes(copy.state_dict())
            free = shutil.disk_usage(out).free
            if free < needed:
                error = (f"not enough space to write {final}: it needs about {needed / 2**30:.2f} GiB and {out}'s "
                         f"file system has {free / 2**30:.2f} GiB free")
            else:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
        except OSError as e:
            error = f"could not write {final}: {_failure(e)}"
    if error := _on_every_rank(error):
        raise CheckpointError(error)
    cause = None
    try:
        dcp.save({"model": model_sd, "optim": optim_sd, **state, "world_size": d.world,
                  f"rank{d.rank}": _rank_state(d.device)}, checkpoint_id=str(tmp / "state"))
    except FAILED as e:  # DCP raises on every rank when any rank's write failed
        cause = _cause(e)
    if d.rank == 0 and cause is None:
        try:
            save_model(copy, tmp / "model")
            (tmp / "config.json").write_text(config_json)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            write_atomic(out / "latest", name)
        except Exception as e:
            cause = e
    if error := _on_every_rank(None if cause is None else _failure(cause)):
        if d.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        newest = f"{previous} is still the newest checkpoint" if previous else "no checkpoint was saved before"
        # An OSError's one line says it all; anything else may be a bug, whose traceback is kept.
        raise CheckpointError(f"could not write {final}: {error}; removed {tmp}, {newest}") \
            from (None if cause is None or isinstance(cause, OSError) else cause)
    if d.rank == 0:
        for stale in out.glob("step_*.tmp"):  # left by a save that died: this run holds OUT, so none is in progress
            shutil.rmtree(stale, ignore_errors=True)
        if keep > 0:
            others = [p for p in checkpoints(out) if p != final]
            for old in others[:max(0, len(others) - (keep - 1))]:
                shutil.rmtree(old)
    if dist.is_initialized():
        dist.barrier()
    return final

# -----------------------------------------------------------------------------------------------------------------
# Reading one back


def load_checkpoint(path: Path, d, model, optimizer, state: dict, seed: int | None = None) -> dict:
    """Restores what save_checkpoint wrote into the model, the optimizer and this rank's RNG; `state` gives the
    structure of the rest (templates, as returned by the objects' state_dict()), which is returned filled. Saved on
    fewer processes, a rank with no RNG of its own seeds it with mix_seed(seed, rank) (`seed` by default the one
    torch.manual_seed last set: train() sets --seed first), the same on every resume. Files that cannot be read
    (truncated, corrupt) raise CheckpointError naming `path`, on every rank."""
    path = Path(path)
    error, saved = None, {}
    try:
        saved = dcp.FileSystemReader(str(path / "state")).read_metadata().state_dict_metadata
    except FAILED as e:
        error = _failure(e)
    if error := _on_every_rank(error):
        raise CheckpointError(f"cannot read {path}: {error}")
    own = {k: v for k, v in _rank_state(d.device).items() if f"rank{d.rank}.{k}" in saved}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    full = {"model": model_sd, "optim": optim_sd, **state} | ({f"rank{d.rank}": own} if own else {})
    try:
        dcp.load(full, checkpoint_id=str(path / "state"))
    except FAILED as e:  # DCP raises on every rank when any rank's read failed
        raise CheckpointError(f"cannot read {path}: {_failure(e)}") from None
    set_state_dict(model, optimizer, model_state_dict=full["model"], optim_state_dict=full["optim"])
    derived = mix_seed(torch.initial_seed() if seed is None else seed, d.rank)
    if "cpu_rng" in own:
        torch.set_rng_state(full[f"rank{d.rank}"]["cpu_rng"])
    else:
        torch.manual_seed(derived)
    if d.device.type == "cuda":
        if "cuda_rng" in own:
            torch.cuda.set_rng_state(full[f"rank{d.rank}"]["cuda_rng"], d.device)
        else:
            torch.cuda.manual_seed(derived)
    return {k: full[k] for k in state}


def resume_from(out, load: Callable[[Path], object]) -> tuple[Path | None, object]:
    """(checkpoint, what `load` returned) for the newest complete checkpoint in OUT that loads, newest first:
    `load(path)` is called until it does not raise CheckpointError, with a warning naming each broken checkpoint
    and the one tried next. (None, None) when OUT holds none; CheckpointError when none of them loads. Any other
    error from `load` (a checkpoint of another stage, ...) is not a broken file and goes straight up."""
    found = checkpoints(out)[::-1]
    errors = []
    for i, path in enumerate(found):
        try:
            return path, load(path)
        except CheckpointError as e:
            errors.append(str(e))
            if i + 1 < len(found) and (not dist.is_initialized() or dist.get_rank() == 0):
                print(f"warning: {e}; falling back to {found[i + 1]}", flush=True)
    if found:
        raise CheckpointError(f"no checkpoint in {out} loads: " + "; ".join(errors))
    return None, None
