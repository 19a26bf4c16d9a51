"""bench.py at tiny shapes: each sub-command runs end to end and prints its comparison line (no timing is asserted:
the figures depend on the machine). `bench.py train` is checked with its two trainings faked: the commands it
launches and the table it makes of their metrics."""
import dataclasses
import json
import re
from pathlib import Path

import pytest

import bench
import grid_task
import train_rl


def run(capsys, *argv) -> str:
    bench.main(list(argv))
    return capsys.readouterr().out


def test_every_command_has_flags_from_its_config():
    for name in bench.COMMANDS:
        with pytest.raises(SystemExit) as e:
            bench.main([name, "--no_such_flag"])
        assert e.value.code == 2
    assert bench.TrainBench().steps == 8 and bench.RolloutBench().compile is True


def test_entropy(capsys, monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")  # the CPU bench sets it: restored after the test
    out = run(capsys, "entropy", "--n", "256", "--d", "32", "--v", "512", "--iters", "1", "--impl", "torch")
    assert "N=256 D=32 V=512" in out and re.search(r"^reference +\d+\.\d +\d+\.\d$", out, re.M)
    assert re.search(r"^fused/reference +\d+\.\d{3} +\d+\.\d{3}$", out, re.M), out


def test_rollout(capsys):
    out = run(capsys, "rollout", "--size", "tiny", "--batch", "2", "--new_tokens", "4", "--repeats", "1",
              "--no-compile")
    assert "tiny" in out and "batch 2, prompt 32, 4 new tokens, compile=False" in out
    for mode in ("greedy", "sampled"):
        assert re.search(rf"^{mode} +ours +\d+\.\d tokens/s +transformers +\d+\.\d tokens/s +ratio \d+\.\d\dx$",
                         out, re.M), out
    assert re.search(r"^LM head alone \(2x128 @ 128x64\): .* exceeds \d+\.\dx$", out, re.M), out


def test_reward(capsys):
    out = run(capsys, "reward", "--n", "64", "--repeat", "1", "--workers", "2")
    assert re.search(r"^reward bench: 64 responses \| serial \d+/s \| score_batch 2 workers \d+/s .*"
                     r"accuracy matches labels \d+/64 \| errors \d+ \|", out, re.M), out


def test_bench_data_labels_agree_with_the_reward():
    """The reward bench's responses are labelled right or wrong; the reward agrees with every label."""
    from reward import score
    responses, rows, expected = bench._bench_data(48, seed=1)
    assert len(responses) == len(rows) == len(expected) == 48 and 0 < sum(expected) < 48
    assert [score(r, row)["accuracy"] for r, row in zip(responses, rows)] == expected


def test_train_commands_and_table(tmp_path, monkeypatch, capsys):
    """One plain process, then torchrun with two; every flag names a TrainConfig field; medians skip step 1."""
    monkeypatch.setattr(grid_task, "prepare", lambda out, cfg: grid_task.GridTask(Path(out), cfg))
    launched = []

    def fake_run(command, **kw):
        launched.append(command)
        if command[-2] == "--out":  # a training: its metrics, step 1 much slower (the warm-up)
            Path(command[-1]).mkdir(parents=True)
            records = [dict(step=k, t_step=10.0 if k == 1 else k, t_rollout=1, t_logprob=2, t_update=3,
                            tokens_per_s=100 * k, packed=0.25, peak_mem_mb=7) for k in (1, 2, 3, 4)]
            Path(command[-1], "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    out = run(capsys, "train", "--out", str(tmp_path), "--steps", "4", "--no-compile")
    trainings = [c for c in launched if c[-2] == "--out"]
    assert [c[-1] for c in trainings] == [str(tmp_path / "nproc1"), str(tmp_path / "nproc2")]
    assert trainings[0][1].endswith("train_rl.py") and "--nproc_per_node=2" in trainings[1]
    fields = {f.name for f in dataclasses.fields(train_rl.TrainConfig)}
    for command in trainings:
        args = command[command.index(next(c for c in command if c.endswith("train_rl.py"))) + 1:]
        flags = [a.removeprefix("--").removeprefix("no-") for a in args if a.startswith("--")]
        assert set(flags) <= fields, set(flags) - fields
        assert args[args.index("--steps") + 1] == "4" and "--no-compile" in args
        assert args[args.index("--init_from") + 1] == str(tmp_path / "task" / "init")
    rows = [line.split() for line in out.splitlines() if re.match(r" +[12] ", line)]
    # no MFU on a CPU run: its column is nan
    assert rows == [[n, "3.000", "1.000", "2.000", "3.000", "300", "0.25", "7", "nan%"] for n in ("1", "2")]
