"""Multi-node as users launch it, on one machine: two torchrun agents (`--nnodes 2`, one process each, c10d
rendezvous on 127.0.0.1) against one agent with two processes. The same parameters after each step, checkpoints and
logs written once (by global rank 0, although each node has a local rank 0), and `--resume` from what they wrote."""
import json
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import finish, start
from grid_task import GridTaskConfig, prepare
from test_train import common, max_diff, weights

REPO = Path(__file__).resolve().parent.parent
ARGS = ["--stage", "grpo", "--save_every", "1", "--prompts_per_step", "4", "--group_size", "4", "--micro_batch", "4",
        "--lr", "1e-3", "--no-dynamic_sampling", "--temperature", "1.5"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp("grid"), GridTaskConfig(n_train=32, n_heldout=8))


def agent(args: list[str], *torchrun: str) -> subprocess.Popen:
    """`torchrun TORCHRUN... train_rl.py ARGS`, started; its output (stderr too) to a pipe for `outputs`."""
    return start([REPO / "train_rl.py", *args], torchrun=torchrun, merge_output=True)


def two_agents(args: list[str]) -> list[subprocess.Popen]:
    """`torchrun --nnodes 2 --node_rank R --nproc_per_node 1 ... train_rl.py ARGS` for R = 0, 1, started together."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [agent(args, "--nnodes", "2", "--node_rank", str(r), "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                  "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "nanor1v-test") for r in (0, 1)]


def outputs(*agents: subprocess.Popen, timeout: int = 300) -> list[str]:
    """Waits for agents started together; each must exit 0. Their outputs."""
    return [done.stdout for done in finish(*agents, timeout=timeout)]


def test_two_agents_match_one_agent_and_resume_from_what_they_wrote(task, tmp_path):
    one, multi = tmp_path / "one", tmp_path / "multi"
    # The one-agent reference and the first two-agent run are independent: started together, each fills the cores
    # the other leaves idle (torchrun's start, rank 0's saves, the teardowns).
    *first, _ = outputs(*two_agents([*common(task, multi), *ARGS, "--steps", "1"]),
                        agent([*common(task, one), *ARGS, "--steps", "2"], "--standalone", "--nproc_per_node=2"))
    second = outputs(*two_agents([*common(task, multi), *ARGS, "--steps", "2", "--resume"]))
    for step in (1, 2):
        assert max_diff(weights(one, step), weights(multi, step)) <= 1e-5
    assert max_diff(weights(multi, 1), weights(multi, 2)) > 1e-4  # the resumed step did update
    steps = [json.loads(x)["step"] for x in (multi / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # one line per step, by one process
    assert (multi / "latest").read_text() == "step_000002"
    assert sorted(p.name for p in multi.iterdir() if p.name.startswith("step_")) == ["step_000001", "step_000002"]
    assert not list(multi.rglob("*.tmp")) and not (multi / ".lock").exists()
    for run in (first, second):  # the step lines and the saves are printed by the one agent holding rank 0
        saves = [[x for x in out.splitlines() if x.startswith(f"saved {multi}")] for out in run]
        assert sorted(len(s) for s in saves) == [0, 1], run
