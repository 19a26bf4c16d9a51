"""bench.py at tiny shapes: each sub-command runs end to end and prints its comparison line (no timing is asserted:
the figures depend on the machine). `bench.py train` launches two trainings and is left to be run by hand."""
import re

import pytest

import bench


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
