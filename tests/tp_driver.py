"""The tensor-parallel rollout copy under torchrun (gloo), for tests/test_tp.py: the jobs of JOBS.json in turn, each
as a launch of its own would run it, in one launch (one start-up of torch for them all).

    torchrun --standalone --nproc_per_node=2 tests/tp_driver.py JOBS.json

The command lines of jobs:
    ["generate", CKPT, REQUESTS.pt, OUT] loads CKPT into FSDP shards and a --rollout_tp 2 copy (on any even number
        of processes), checks the copy against its slices of the trained weights and the gathered copy against all
        of them, and writes each rank's greedy and sampled completions of its share of the requests to
        OUT/rank{r}.json; with a fifth word "compile", the sampler's decode step is compiled (the all-reduce hooks
        traced into its graph) and only the sampled completions are written;
    ["train", ARGS...] runs train_rl.py's main with every refresh of the copy checked the same way (the checks in
        OUT/refresh_rank{r}.json);
    ["train_rl.py", ARGS...] and ["eval.py", ARGS...] run the script as its entry point does.
JOBS.json maps each job's name to its command line; job NAME's stdout goes to JOBS.json's folder, NAME.rank{r}.txt.
"""
import contextlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cli  # noqa: E402 - after the repository is on the path
import eval as E  # noqa: E402
import parallel as P  # noqa: E402
import train_rl as T  # noqa: E402
import trainer as TR  # noqa: E402
from rollout import Request, Sampler  # noqa: E402

# How Megatron splits each LLM parameter, written out apart from parallel.tp_split_dim: the dimension of the
# rank's block, "rank0" for a row-parallel bias (whole on the group's rank 0, zeros elsewhere), None for whole.
SPLITS = {"q_proj.weight": 0, "q_proj.bias": 0, "k_proj.weight": 0, "k_proj.bias": 0, "v_proj.weight": 0,
          "v_proj.bias": 0, "o_proj.weight": 1, "o_proj.bias": "rank0", "gate_proj.weight": 0,
          "up_proj.weight": 0, "down_proj.weight": 1}


def expected_part(name: str, full: torch.Tensor, tp: P.TPLayout) -> torch.Tensor:
    """This rank's part of `full`, from SPLITS and torch.chunk."""
    key = ".".join(name.split(".")[-2:])
    how = SPLITS.get(key) if name.startswith("language_model.layers.") else None
    if how == "rank0":
        return full if tp.rank == 0 else torch.zeros_like(full)
    return full if how is None else torch.chunk(full, tp.size, how)[tp.rank]


def copy_matches(copy, units, tp: P.TPLayout) -> bool:
    """Every parameter of this rank's copy equals its part of the sharded model's full weights (bit for bit)."""
    full = get_model_state_dict(units[-1], options=StateDictOptions(full_state_dict=True))
    mine = copy.state_dict()
    return mine.keys() == full.keys() and all(torch.equal(expected_part(k, full[k], tp), v) for k, v in mine.items())


def generate(ckpt: str, requests_file: str, out: Path, compile: bool):
    d = P.init_distributed()
    with P.process_group():
        prec = P.precision(d.device)
        tp = P.tp_layout(2, d)
        model, units, config = P.build_sharded(ckpt, "llm", d, prec=prec)
        copy = P.build_rollout_copy(config, d.device, prec, tp)
        P.refresh(copy, units, tp)
        matches = copy_matches(copy, units, tp)
        whole = P.gathered(copy, tp, config)
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        gathered_ok = whole is None or all(torch.equal(full[k], v) for k, v in whole.state_dict().items())
        rows = torch.load(requests_file)
        mine = [Request(ids, pixels, seed=seed) for ids, pixels, seed in rows][d.rank::d.world]
        sampler = Sampler(copy, max_slots=8, max_len=64, stop_ids=[0], compile=compile)
        result = dict(copy_matches=matches, gathered_ok=gathered_ok, local_heads=copy.config.llm.num_attention_heads)
        # Compiled, each setting compiles a graph of its own, which differs from the other's only in the sampling:
        # one (the all-reduce hooks in it are what the compiled job checks) halves the launch's compile time.
        settings = (("sampled", 1.0),) if compile else (("greedy", 0.0), ("sampled", 1.0))
        for name, temperature in settings:
            groups = P.tp_generate(sampler, mine, tp, num_samples=2, max_new_tokens=12, temperature=temperature)
            result[name] = [[(c.ids, c.logprobs) for c in group] for group in groups]
        (out / f"rank{d.rank}.json").write_text(json.dumps(result))


def train(argv: list[str]):
    """train_rl.py's main with each refresh of the copy checked; OUT/refresh_rank{r}.json lists the checks."""
    out = Path(argv[argv.index("--out") + 1])
    checks, original = [], TR.refresh

    def checked_refresh(copy, units, tp=None):
        original(copy, units, tp)
        checks.append(copy_matches(copy, units, tp or P.TPLayout()))

    TR.refresh = checked_refresh
    try:
        cli.run(T.main, "train_rl.py", argv)
    finally:
        TR.refresh = original
    (out / f"refresh_rank{os.environ['RANK']}.json").write_text(json.dumps(checks))


def run_job(job: list[str]):
    kind, *args = job
    if kind == "generate":
        generate(args[0], args[1], Path(args[2]), args[3:] == ["compile"])
    elif kind == "train":
        train(args)
    else:
        cli.run({"train_rl.py": T.main, "eval.py": E.main}[kind], kind, args)


def run_jobs(jobs_file: Path):
    """Each job as a launch of its own runs it: in a fresh default process group, which the job's code finds made
    (init_distributed) and destroys at its end (process_group). A group made again from the launch's environment
    would reuse the last one's keys in torchrun's store and connect to its addresses, so each job's group is made
    here, on its own prefix of that store."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    for name, job in json.loads(jobs_file.read_text()).items():
        dist.init_process_group("gloo", store=dist.PrefixStore(f"{name}/", store), rank=rank, world_size=world)
        with (jobs_file.parent / f"{name}.rank{rank}.txt").open("w") as f, contextlib.redirect_stdout(f):
            run_job(job)


if __name__ == "__main__":
    run_jobs(Path(sys.argv[1]))
