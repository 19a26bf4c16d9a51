"""rundir.py: the scan decides which checkpoints OUT holds (rollback, missing or wrong OUT/latest, .tmp), one run
per directory (OUT/.lock, stale locks taken over), resume falls back past a truncated checkpoint, a failed or
refused save leaves nothing behind, and the trainer resumes 1 -> 2 -> 1 processes (torchrun, gloo)."""
import errno
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.fsdp import fully_shard

import model as M
import rundir as R
import train_rl as T
from conftest import finish, in_this_process, start
from grid_task import GridTaskConfig, prepare
from parallel import init_distributed

REPO = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------------------------
# The scan, on directories shaped like checkpoints


def fake_step(out: Path, step: int, suffix: str = "") -> Path:
    path = out / f"step_{step:06d}{suffix}"
    (path / "state").mkdir(parents=True)
    (path / "model").mkdir()
    (path / "state" / ".metadata").write_bytes(b"x")
    (path / "model" / "config.json").write_text("{}")
    return path


def test_deleting_the_newest_step_directory_rolls_back(tmp_path):
    steps = [fake_step(tmp_path, s) for s in (1, 2, 3)]
    (tmp_path / "latest").write_text("step_000003")
    shutil.rmtree(steps[-1])  # the usual rollback: latest still names it
    assert R.checkpoints(tmp_path) == steps[:2] and R.newest_checkpoint(tmp_path) == steps[1]


@pytest.mark.parametrize("latest", [None, "", "step_000001", "step_0000\x00??", "../elsewhere"])
def test_a_missing_or_wrong_latest_does_not_hide_the_newest(tmp_path, latest):
    fake_step(tmp_path, 1)
    newest = fake_step(tmp_path, 12)
    if latest is not None:
        (tmp_path / "latest").write_text(latest)
    assert R.newest_checkpoint(tmp_path) == newest


def test_tmp_and_incomplete_directories_are_never_checkpoints(tmp_path):
    done = fake_step(tmp_path, 1)
    fake_step(tmp_path, 2, ".tmp")
    (fake_step(tmp_path, 3) / "model" / "config.json").unlink()  # the state without the model
    (fake_step(tmp_path, 4) / "state" / ".metadata").unlink()  # the model without the state
    assert R.checkpoints(tmp_path) == [done]
    assert R.checkpoints(tmp_path / "nowhere") == [] and R.newest_checkpoint(tmp_path / "nowhere") is None


def test_the_guard_sees_checkpoints_and_run_files_without_latest(tmp_path):
    R.check_out(tmp_path / "new", resume=False)
    fake_step(tmp_path / "a", 5)  # no OUT/latest at all
    with pytest.raises(FileExistsError, match=r"already holds a run \(step_000005\): pass --resume"):
        R.check_out(tmp_path / "a", resume=False)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "metrics.jsonl").write_text('{"step": 1}\n')  # killed before its first checkpoint
    with pytest.raises(FileExistsError, match=r"metrics\.jsonl"):
        R.check_out(tmp_path / "b", resume=False)
    R.check_out(tmp_path / "a", resume=True)

# ---------------------------------------------------------------------------------------------------------------
# The lock


def test_a_second_lock_names_the_owner_and_the_lock_is_released(tmp_path):
    with R.lock(tmp_path) as path:
        owner = json.loads(path.read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(R.RunDirLocked, match=f"in use by another run \\(pid {os.getpid()} on "):
            with R.lock(tmp_path):
                pass
        assert path.is_file()  # the refused run did not remove the owner's lock
    assert not path.exists()
    with pytest.raises(ValueError, match="inside"):
        with R.lock(tmp_path):
            raise ValueError("inside")
    assert not path.exists()  # released on an exception too


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, capsys):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    dead = int(finished.stdout)
    (tmp_path / ".lock").write_text(json.dumps(dict(pid=dead, host=socket.gethostname(), started="earlier")))
    with R.lock(tmp_path) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert f"warning: {tmp_path / '.lock'} was left by pid {dead} on {socket.gethostname()}" in capsys.readouterr().out


def test_a_lock_from_another_host_is_not_taken_over(tmp_path):
    (tmp_path / ".lock").write_text(json.dumps(dict(pid=1, host="some-other-host", started="earlier")))
    with pytest.raises(R.RunDirLocked, match="pid 1 on some-other-host"):
        with R.lock(tmp_path):
            pass

# ---------------------------------------------------------------------------------------------------------------
# Real checkpoints of a tiny FSDP model, in a world of one


@pytest.fixture
def world(in_process):
    return init_distributed()


class Tiny:
    """A sharded two-layer model with Adam state, and a tiny VLM standing in for the rollout copy."""

    def __init__(self, d):
        torch.manual_seed(0)
        self.d = d
        self.model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
        fully_shard(self.model)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=0.1)
        self.copy = M.VLM.from_config(M.tiny_config(32, 5), seed=0)

    def step(self):
        self.model(torch.randn(3, 4)).square().mean().backward()
        self.optimizer.step()
        self.optimizer.zero_grad()

    def save(self, out: Path, step: int, keep: int = 0) -> Path:
        return R.save_checkpoint(out, step, self.d, self.model, self.optimizer, {"meta": {"step": step}}, self.copy,
                                 "{}\n", keep)

    def load(self, path: Path) -> dict:
        return R.load_checkpoint(path, self.d, self.model, self.optimizer, {"meta": {"step": 0}})

    def weights(self) -> dict:
        return {k: v.full_tensor().clone() for k, v in self.model.state_dict().items()}


def two_checkpoints(tiny: Tiny, out: Path):
    tiny.step()
    first = tiny.save(out, 1)
    saved = tiny.weights()
    tiny.step()
    second = tiny.save(out, 2)
    assert any(not torch.equal(saved[k], v) for k, v in tiny.weights().items())
    return first, second, saved


@pytest.mark.parametrize("broken", [".metadata", "__0_0.distcp"])
def test_resume_falls_back_past_a_truncated_checkpoint(world, tmp_path, capsys, broken):
    tiny = Tiny(world)
    first, second, saved = two_checkpoints(tiny, tmp_path)
    f = second / "state" / broken
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    tiny.step()  # the live weights move away from both checkpoints
    path, state = R.resume_from(tmp_path, tiny.load)
    assert path == first and state["meta"]["step"] == 1
    assert all(torch.equal(saved[k], v) for k, v in tiny.weights().items())
    out = capsys.readouterr().out
    assert f"warning: cannot read {second}: " in out and f"falling back to {first}" in out


def test_the_fallback_warning_names_both_and_none_loading_is_one_error(world, tmp_path, capsys):
    tiny = Tiny(world)
    first, second, _ = two_checkpoints(tiny, tmp_path)
    (second / "state" / ".metadata").write_bytes(b"")
    R.resume_from(tmp_path, tiny.load)
    out = capsys.readouterr().out
    assert f"warning: cannot read {second}: " in out and f"; falling back to {first}" in out
    (first / "state" / "__0_0.distcp").write_bytes(b"")
    with pytest.raises(R.CheckpointError, match=f"no checkpoint in {tmp_path} loads: cannot read {second}"):
        R.resume_from(tmp_path, tiny.load)
    assert R.resume_from(tmp_path / "empty", tiny.load) == (None, None)


def test_a_wrong_stage_is_not_a_broken_file(world, tmp_path):
    tiny = Tiny(world)
    two_checkpoints(tiny, tmp_path)

    def load(path):
        raise ValueError(f"{path} is an sft checkpoint")

    with pytest.raises(ValueError, match="step_000002 is an sft checkpoint"):
        R.resume_from(tmp_path, load)


@pytest.mark.parametrize("writer", ["state", "model"])
def test_a_save_that_runs_out_of_space_leaves_nothing_behind(world, tmp_path, monkeypatch, writer):
    tiny = Tiny(world)
    first, second, _ = two_checkpoints(tiny, tmp_path)
    after_second = tiny.weights()

    def full_disk(*args, **kw):
        target = tmp_path / "step_000003.tmp" / writer
        target.mkdir(parents=True, exist_ok=True)
        (target / "part").write_bytes(b"half")  # it had started writing
        raise OSError(errno.ENOSPC, "No space left on device", str(target / "part"))

    if writer == "state":
        monkeypatch.setattr(R.dcp, "save", full_disk)
    else:
        monkeypatch.setattr(R, "save_model", full_disk)
    tiny.step()
    with pytest.raises(R.CheckpointError) as e:
        tiny.save(tmp_path, 3, keep=1)
    msg = str(e.value)
    assert "\n" not in msg and f"could not write {tmp_path / 'step_000003'}: no space left on the device" in msg
    assert f"{second} is still the newest checkpoint" in msg and e.value.__cause__ is None
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000001", "step_000002"]  # no .tmp, no pruning
    assert (tmp_path / "latest").read_text() == "step_000002"
    path, state = R.resume_from(tmp_path, tiny.load)
    assert path == second and state["meta"]["step"] == 2
    assert all(torch.equal(after_second[k], v) for k, v in tiny.weights().items())


def test_too_little_free_space_is_refused_before_writing(world, tmp_path, monkeypatch):
    tiny = Tiny(world)
    first = tiny.save(tmp_path, 1)
    needed = R.directory_bytes(first)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=needed - 1))
    with pytest.raises(R.CheckpointError, match=f"not enough space to write {tmp_path / 'step_000002'}: it needs "
                                                f"about {needed / 2**30:.2f} GiB"):
        tiny.save(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000001"]
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=needed))
    assert tiny.save(tmp_path, 2) == tmp_path / "step_000002"


def test_keep_prunes_after_success_and_never_the_new_one(world, tmp_path):
    tiny = Tiny(world)
    for step in (5, 6):
        tiny.save(tmp_path, step)
    fake_step(tmp_path, 3, ".tmp")  # left by a save that died
    tiny.save(tmp_path, 4, keep=2)  # after a rollback: an older step than the ones on disk
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000004", "step_000006"]
    assert R.newest_checkpoint(tmp_path) == tmp_path / "step_000006"


def test_a_rank_without_a_saved_rng_derives_it_from_seed_and_rank(world, tmp_path, monkeypatch):
    tiny = Tiny(world)
    path = tiny.save(tmp_path, 1)
    keys = R.dcp.FileSystemReader(str(path / "state")).read_metadata().state_dict_metadata
    assert "world_size" in keys and "rank0.cpu_rng" in keys
    draws = []
    for _ in range(2):
        monkeypatch.setattr(tiny.d, "rank", 1)  # rank 1 of a run resumed on more processes than saved it
        R.load_checkpoint(path, tiny.d, tiny.model, tiny.optimizer, {"meta": {"step": 0}}, seed=7)
        draws.append(torch.rand(4))
    torch.manual_seed(R.mix_seed(7, 1))
    assert torch.equal(draws[0], draws[1]) and torch.equal(draws[0], torch.rand(4))

# ---------------------------------------------------------------------------------------------------------------
# The trainer resumed on another number of processes


def torchrun(args: list[str], nproc: int) -> str:
    """`torchrun --standalone --nproc_per_node=NPROC train_rl.py ARGS` (gloo); its output."""
    return finish(start([REPO / "train_rl.py", *args], nproc), timeout=600)[0].stdout


def test_trainer_resumes_from_one_process_on_two_and_back(tmp_path, in_process, capsys):
    task = prepare(tmp_path / "grid", GridTaskConfig(n_train=16, n_heldout=4))
    out = tmp_path / "run"
    args = ["--init_from", str(task.init_checkpoint), "--data", str(task.train_jsonl), "--out", str(out),
            "--max_len", "96", "--threads", "1", "--seed", "3", "--stage", "sft", "--train", "vit,connector,llm",
            "--prompts_per_step", "4", "--micro_batch", "4", "--lr", "1e-2", "--save_every", "1"]
    # The one process is this one (`in_process`), each time: two start-ups of torch fewer.
    in_this_process(T.main, [*args, "--steps", "1"])
    two = torchrun([*args, "--steps", "2", "--resume"], nproc=2)
    assert f"resumed from {out / 'step_000001'} (step 1)" in two
    capsys.readouterr()
    in_this_process(T.main, [*args, "--steps", "3", "--resume"])
    assert f"resumed from {out / 'step_000002'} (step 2)" in capsys.readouterr().out
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3] and R.newest_checkpoint(out) == out / "step_000003"
