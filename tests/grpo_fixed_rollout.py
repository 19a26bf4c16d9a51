"""One GRPO update on fixed rollouts, for tests/test_train.py to run under 1 and 2 processes (torchrun, gloo): the
task's SFT traces stand in for sampled responses, with advantage +1 on odd rows and -0.5 on even ones, so the update
half of a GRPO step (old log-probs, mini-batches, token-level loss across ranks and micro-batches, optimizer step)
is compared across world sizes without the sampler. Writes what train_rl.py writes for step 1: OUT/metrics.jsonl
and OUT/step_000001/model.

    python tests/grpo_fixed_rollout.py --init_from TASK/init --data TASK/data/train.jsonl --out OUT --stage grpo ...
"""
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cli  # noqa: E402 - after the repository is on the path
import train_rl as T  # noqa: E402
import trainer as TR  # noqa: E402
from checkpoint import save_model  # noqa: E402
from data import Sequence  # noqa: E402
from parallel import init_distributed, process_group, set_threads  # noqa: E402


def fixed_sequences(run: TR.Run) -> list[Sequence]:
    """This rank's share of the first prompts_per_step rows of the global order, their traces as responses."""
    mine = list(enumerate(run.data.stream.take(run.cfg.prompts_per_step)))[run.proc.rank::run.proc.world]
    seqs = []
    for pos, i in mine:
        ex = run.data.example(i, run.cfg, run.policy.rollout_model.config, run.proc.rank)
        response = run.data.tokenizer.encode(run.data.rows[i]["response"], add_special_tokens=False).ids
        seqs.append(Sequence(i, ex.prompt_ids, response, ex.pixel_values, 1.0 if i % 2 else -0.5, order=pos))
    return seqs


def main(argv: list[str] | None = None):
    p = cli.parser(__doc__.split("\n\n")[0])
    cli.add_flags(p, T.TrainConfig)
    cfg = cli.config_from(p.parse_args(argv), T.TrainConfig)
    proc = init_distributed()
    set_threads(cfg.threads, proc.world)
    with process_group():
        update_once(cfg, proc)


def update_once(cfg, proc):
    """The update half of a GRPO step on the fixed sequences, then what train_rl.py writes for step 1."""
    run = TR.setup(cfg, proc)
    seqs = fixed_sequences(run)
    T.old_logprobs(run, seqs)
    mu = cfg.updates_per_rollout
    for part in [[s for s in seqs if s.order % mu == k] for k in range(mu)]:
        loss, _ = T.backward(run, part, T.grpo_loss_of(run, observe=False))
        result = run.policy.step(loss, cfg.grad_clip, proc.rank)
    run.policy.sync_rollout_model()
    if proc.rank == 0:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        cli.append_jsonl(out / "metrics.jsonl", dict(step=1, **result))
        save_model(run.policy.rollout_model, out / "step_000001" / "model")


if __name__ == "__main__":
    main()
