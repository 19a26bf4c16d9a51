"""The tensor-parallel rollout copy under torchrun (gloo), for tests/test_tp.py: `generate` loads a checkpoint into
FSDP shards and a --rollout_tp copy, checks the copy against its slices of the trained weights and the gathered
copy against all of them (--rollout_tp 2 on any even number of processes), and writes each rank's greedy and
sampled completions of its share of the requests; `compile` compiles the sampler's decode step (the all-reduce
hooks traced into its graph); `train` runs train_rl.py with every refresh of the copy checked the same way.

    torchrun --standalone --nproc_per_node=2 tests/tp_driver.py generate CKPT REQUESTS.pt OUT [compile]
    torchrun --standalone --nproc_per_node=2 tests/tp_driver.py train --init_from ... --rollout_tp 2 --out OUT
"""
import json
import os
import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cli  # noqa: E402 - after the repository is on the path
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
        for name, temperature in (("greedy", 0.0), ("sampled", 1.0)):
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
    cli.run(T.main, "train_rl.py", argv)
    (out / f"refresh_rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(checks))


if __name__ == "__main__":
    if sys.argv[1] == "generate":
        generate(sys.argv[2], sys.argv[3], Path(sys.argv[4]), sys.argv[5:] == ["compile"])
    else:
        train(sys.argv[2:])
