"""OUT as a whole, end to end through train_rl.py: two runs started on one --out (one runs, the other stops naming the
lock, the lock of a killed run is taken over), and a resume after step directories were deleted (a roll back).

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_rundir_runs.py
"""
import hashlib
import json
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import torch

import conftest
import train_rl as T
from grid_task import GridTaskConfig, prepare
from test_train import common, start, wait_for, weights


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """As test_train's: the default run's task at a small size."""
    return prepare(tmp_path_factory.mktemp("grid"), GridTaskConfig(n_train=64, n_heldout=16))


def contents(out: Path) -> dict:
    """Every file under OUT with a digest of its bytes."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


def steps_of(out: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def finish(*runs: subprocess.Popen, timeout: int = 300) -> list[str]:
    """Waits for runs `start`ed together (stderr in stdout); their outputs, each exit code in its `returncode`."""
    return [done.stdout for done in conftest.finish(*runs, timeout=timeout, check=False)]


def test_one_run_per_out_and_a_dead_runs_lock_is_taken_over(task, tmp_path, capsys, in_process):
    out = tmp_path / "run"
    args = [*common(task, out), "--stage", "sft", "--prompts_per_step", "4", "--micro_batch", "4", "--save_every", "1"]
    a = start([*args, "--steps", "10000"])
    try:
        seen = []
        for line in a.stdout:  # blocking reads: step 1 logged, then its checkpoint written
            seen.append(line.rstrip("\n"))
            if seen[-1].startswith("sft ") and " 1/10000 |" in seen[-1]:
                break
        else:
            raise AssertionError(f"A ended (exit {a.wait()}) before step 1:\n" + "\n".join(seen[-30:]))
        wait_for(a, f"saved {out / 'step_000001'}")
        a.send_signal(signal.SIGSTOP)  # alive but frozen: OUT cannot change under B but by B itself
        lock = json.loads((out / ".lock").read_text())
        assert (lock["pid"], lock["host"]) == (a.pid, socket.gethostname())
        before = contents(out)
        # A fresh run and a resume alike: the lock is checked first. Both at once: each is refused before it writes.
        refused = [start([*args, "--steps", "10000", *extra]) for extra in ([], ["--resume"])]
        for b, text in zip(refused, finish(*refused)):
            lines = text.strip().splitlines()
            assert b.returncode == 1, text[-6000:]
            assert lines == [f"train_rl.py: error: {out} is in use by another run (pid {a.pid} on "
                             f"{socket.gethostname()}, started {lock['started']}): wait for it, or choose another "
                             f"--out (if that run is gone, delete {out / '.lock'})"], lines
        assert contents(out) == before  # A's lock, checkpoints, metrics and config.json as they were
        logged = steps_of(out)
        assert logged == list(range(1, len(logged) + 1)), logged  # only A's steps, once each
        a.kill()  # SIGKILL (a stopped process too): OUT/.lock stays, naming a dead pid
        a.wait()
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
        a.stdout.close()
    assert json.loads((out / ".lock").read_text()) == lock
    k = len(steps_of(out))
    capsys.readouterr()
    conftest.in_this_process(T.main, [*args, "--steps", str(k + 1), "--resume"])  # no start-up of its own
    printed = capsys.readouterr()
    text = printed.out + printed.err
    assert (f"warning: {out / '.lock'} was left by pid {a.pid} on {socket.gethostname()} (started "
            f"{lock['started']}), which is no longer running: taking it over") in text, text[-3000:]
    assert f"resumed from {out / 'step_'}" in text, text[-3000:]
    assert not (out / ".lock").exists()  # released at the end
    assert steps_of(out) == list(range(1, k + 2))
    assert (out / "latest").read_text() == f"step_{k + 1:06d}" and not list(out.glob("step_*.tmp"))


def test_resume_after_deleting_the_newest_steps_continues_from_the_one_before(task, tmp_path, capsys, in_process):
    args = ["--stage", "grpo", "--steps", "4", "--save_every", "1", "--prompts_per_step", "4", "--group_size", "4",
            "--micro_batch", "8", "--lr", "1e-2", "--updates_per_rollout", "2"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    # The uninterrupted reference is launched; the cut run goes in pytest's process meanwhile, and so does its
    # resume later: no start-ups of their own.
    reference = start([*common(task, whole), *args])
    conftest.in_this_process(T.main, [*common(task, cut), *args])
    (text,) = finish(reference)
    assert reference.returncode == 0, text[-6000:]
    shutil.rmtree(cut / "step_000004")
    shutil.rmtree(cut / "step_000003")  # rolled back to step 2; OUT/latest still names step_000004, now gone
    assert (cut / "latest").read_text() == "step_000004"
    capsys.readouterr()
    conftest.in_this_process(T.main, [*common(task, cut), *args, "--resume"])
    printed = capsys.readouterr().out
    assert f"resumed from {cut / 'step_000002'} (step 2)" in printed, printed[-3000:]
    w, r = weights(whole, 4), weights(cut, 4)
    assert w.keys() == r.keys() and all(torch.equal(w[k], r[k]) for k in w)
    assert not all(torch.equal(w[k], weights(whole, 2)[k]) for k in w)  # steps 3 and 4 did move the weights
    assert steps_of(cut) == [1, 2, 3, 4]
    assert (cut / "latest").read_text() == "step_000004"
