"""One GRPO backward of train_rl.py on fixed fp64 sequences under FSDP2 (gloo), the step's loss and full gradients
saved by rank 0: tests/test_speed.py compares one big micro-batch with token-budget micro-batches on 1 and 2
processes. `python tests/token_budget_driver.py OUT.pt [--micro_batch_tokens N]` (or under torchrun)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

import model as M  # noqa: E402
import train_rl as T  # noqa: E402
import trainer as TR  # noqa: E402
from data import Sequence  # noqa: E402
from entropy import logprob_entropy_reference  # noqa: E402
from model import VLM, tiny_config  # noqa: E402
from parallel import init_distributed, shard  # noqa: E402

VOCAB, IMAGE_TOKEN = 40, 7


def sequences(config) -> list[Sequence]:
    """Three image prompts of 1-3 tiles (4 samples each) and two text-only ones, responses of 1 to 60 tokens."""
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(8, VOCAB, (n,), generator=g).tolist()
    seqs = []
    for k, tiles in enumerate([1, 3, 2, 0, 0]):
        pixels = torch.randn(tiles, 3, 56, 56, generator=g, dtype=torch.float64) if tiles else None
        prompt = rand(3) + [IMAGE_TOKEN] * (tiles * config.tokens_per_tile) + rand(2 + 5 * k)
        for j in range(4):
            n = int(torch.randint(1, 61, (1,), generator=g))
            seqs.append(Sequence(k, prompt, rand(n), pixels, advantage=float(torch.randn(1, generator=g)),
                                 sampler_logprobs=(-torch.rand(n, generator=g, dtype=torch.float64)).tolist(),
                                 order=len(seqs)))
    return seqs


def step(out: Path, budget: int | None):
    """The backward of the fixed sequences on this rank's share, micro-batched by `budget` (None: one big batch);
    rank 0 saves the loss, the full gradients and the micro-batch count to OUT."""
    proc = init_distributed()
    config = tiny_config(VOCAB, IMAGE_TOKEN)
    model = VLM.from_config(config, dtype=torch.float64, seed=5)
    units = shard(model, proc.device)  # CPU: no mixed precision, the parameters stay fp64
    copy = VLM.from_config(config, dtype=torch.float64, seed=5).eval()
    cfg = T.TrainConfig(micro_batch=64, micro_batch_tokens=budget, tis_cap=2.0)
    run = TR.Run(cfg, proc, TR.Policy(model, units, None, None, None, copy), None,
                TR.TrainData([], [], None, None, [1], {}), decode="eager")
    seqs = sequences(config)
    mine = seqs[proc.rank::proc.world]
    loss, _ = T.backward(run, mine, T.grpo_loss_of(run, observe=False))
    batches = T.all_max(len(run.batches(mine)), device=proc.device)[0]
    grads = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
             for n, p in model.named_parameters()}
    if proc.rank == 0:
        torch.save(dict(loss=loss, grads=grads, batches=batches), out)
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str]):
    """OUT.pt [--micro_batch_tokens N]; also called in pytest's process (conftest.in_this_process), where the
    head it swaps is put back."""
    budget = int(argv[argv.index("--micro_batch_tokens") + 1]) if "--micro_batch_tokens" in argv else None
    head = M.logprob_entropy
    # The fused head keeps its softmax statistics in fp32 whatever the inputs; the full-logits reference is fp64
    # through, so the comparison sees the batching alone.
    M.logprob_entropy = lambda h, w, t, temperature: logprob_entropy_reference(h, w, t, temperature)
    try:
        step(Path(argv[0]), budget)
    finally:
        M.logprob_entropy = head


if __name__ == "__main__":
    main(sys.argv[1:])
