"""The default run: `python train_rl.py` with no arguments teaches a tiny VLM to look at the whole image.

The whole Skywork-R1V3 pipeline in miniature on a laptop CPU, no downloads: the red-cell counting task of
grid_task.py (cached) -> cold-start SFT from scratch on traces that mostly take a shortcut (stop after the third row)
-> held-out evaluation with eval.py's scoring -> GRPO -> evaluation again -> a before/after table, summary.json,
and a plot. RL has to find the strategy the cold start rarely used: reading the fourth row after a reflective
"wait". The paper's claims are each one flag away:

    python train_rl.py                          # the pipeline: OUT = runs/default (task/, sft/, grpo/, summary.json)
    python train_rl.py --train llm              # GRPO with the connector frozen (R1V3: it must stay trainable)
    python train_rl.py --connector_stage 20     # then R1V3's connector-only stage (GRPO, --train connector)
    python train_rl.py --select critical_entropy  # OUT/grpo/best by critical-token entropy instead of accuracy
    python train_rl.py --bench                  # GRPO step time split and tokens/s, 1 vs 2 processes

Flags given on the command line configure the GRPO stage (the cold start is fixed, so variants share it: their
GRPO output goes to OUT/grpo_<flags>/ and their table to OUT/summary_<flags>.json); --seed, --threads, --compile
and --out apply to every stage. Calibration of these settings: design.md section 5.
"""
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch.distributed as dist

from grid_task import GridTaskConfig, prepare
from parallel import init_distributed, latest_checkpoint
from train_rl import TrainConfig, train

# The tiny task's settings (design.md section 5): a full trace is 52 tokens + <|im_end|>, a prompt 16.
# Half the cores: a loaded 2-core machine ran SFT steps 10x slower with 2 threads than its 0.12 s median, while on an
# idle one 1 thread costs 20% (0.12 s vs 0.10 s).
COMMON = dict(max_new_tokens=64, max_len=96, overlong_buffer=0, eval_samples=8, reward_workers=1,
              threads=max(1, (os.cpu_count() or 1) // 2))
SFT = dict(stage="sft", train="vit,connector,llm", steps=1000, prompts_per_step=64, micro_batch=64, lr=3e-3,
           schedule="cosine", min_lr_ratio=0.1, grad_clip=1.0)
GRPO = dict(stage="grpo", train="connector,llm", steps=40, prompts_per_step=8, group_size=8, micro_batch=64, lr=5e-4,
            updates_per_rollout=2, eval_every=10, temperature=1.0)
EVERY_STAGE = {"seed", "threads", "compile", "out"}  # command-line flags that also apply to the cold start
COLUMNS = [("greedy_accuracy", "greedy"), ("sampled_accuracy", "avg@k"), ("format_rate", "format"),
           ("response_length", "length"), ("critical_entropy", "critical entropy")]


def read_jsonl(path: Path) -> list[dict]:
    """metrics.jsonl / eval.jsonl, with the nulls train_rl.py writes for nan back as nan."""
    return [{k: math.nan if v is None else v for k, v in json.loads(x).items()}
            for x in path.read_text().splitlines()]


def run_stage(cfg: TrainConfig) -> dict:
    """train(), reusing a finished stage with the same settings (a rerun of the default command is cheap); returns
    the stage's final held-out evaluation."""
    out = Path(cfg.out)
    saved = out / "config.json"
    if latest_checkpoint(out) and saved.is_file():
        before = {k: v for k, v in json.loads(saved.read_text()).items() if k != "resume"}
        now = {k: v for k, v in json.loads(json.dumps(cfg.__dict__)).items() if k != "resume"}
        if before != now:
            diff = {k: (before.get(k), now.get(k)) for k in now if before.get(k) != now.get(k)}
            raise ValueError(f"{out} was trained with other settings {diff}: choose another --out or delete it")
    train(cfg)
    return next(e for e in reversed(read_jsonl(out / "eval.jsonl")) if e["step"] == cfg.steps)


def variant_name(fields: dict, given: set) -> str:
    """"" for the default GRPO settings, else "_flag-value_..." naming what the command line changed."""
    changed = sorted(k for k in given - EVERY_STAGE if k in fields)
    return "".join(f"_{k}-{str(fields[k]).replace(',', '+')}" for k in changed)


def spearman(x: list[float], y: list[float]) -> float:
    """Rank correlation (ties get their mean rank); nan when either side is constant."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / var if var else math.nan


def selection(sft_eval: dict, grpo_out: Path) -> dict:
    """R1V3 picks RL checkpoints by critical-token entropy; here both criteria over the evaluated checkpoints (the
    cold start as step 0, then every GRPO evaluation), with their rank correlation, whichever way it comes out."""
    points = [dict(sft_eval, step=0)] + read_jsonl(grpo_out / "eval.jsonl")
    points = [p for p in points if math.isfinite(p.get("critical_entropy", math.nan))]
    if len(points) < 2:
        return {}
    by_acc = max(points, key=lambda p: p["greedy_accuracy"])
    by_ent = max(points, key=lambda p: p["critical_entropy"])
    return dict(steps=[p["step"] for p in points], greedy_accuracy=[p["greedy_accuracy"] for p in points],
                critical_entropy=[p["critical_entropy"] for p in points],
                spearman=spearman([p["greedy_accuracy"] for p in points], [p["critical_entropy"] for p in points]),
                by_accuracy=dict(step=by_acc["step"], greedy_accuracy=by_acc["greedy_accuracy"]),
                by_critical_entropy=dict(step=by_ent["step"], greedy_accuracy=by_ent["greedy_accuracy"]))


def plot(run: Path, png: Path, start: dict) -> str:
    """Reward, accuracy and critical-token entropy per step (training rollouts, and held-out evaluations from the
    cold start's, `start`, at step 0)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install matplotlib)"
    steps, evals = read_jsonl(run / "metrics.jsonl"), [dict(start, step=0)] + read_jsonl(run / "eval.jsonl")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    x = [m["step"] for m in steps]
    axes[0].plot(x, [m["reward"] for m in steps], label="train reward")
    axes[0].plot(x, [m["accuracy"] for m in steps], label="train accuracy (T=1)")
    axes[1].plot([e["step"] for e in evals], [e["greedy_accuracy"] for e in evals], "o-", label="held-out greedy")
    axes[1].plot([e["step"] for e in evals], [e.get("sampled_accuracy", math.nan) for e in evals], "o-",
                 label="held-out avg@8")
    axes[2].plot(x, [m["critical_entropy"] for m in steps], label="train rollouts")
    axes[2].plot([e["step"] for e in evals], [e["critical_entropy"] for e in evals], "o-", label="held-out")
    for ax, title in zip(axes, ["reward", "accuracy", "critical-token entropy (nats)"]):
        ax.set_title(title)
        ax.set_xlabel("GRPO step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return str(png)


def table(rows: dict[str, dict]) -> str:
    k = next(iter(rows.values())).get("k", 0)
    names = [f"avg@{k}" if key == "sampled_accuracy" else name for key, name in COLUMNS]
    lines = [f"{'':22s}" + "".join(f"{name:>18s}" for name in names)]
    for label, e in rows.items():
        lines.append(f"{label:22s}" + "".join(f"{e.get(key, math.nan):>18.3f}" for key, _ in COLUMNS))
    return "\n".join(lines)


def run_default(fields: dict, given: set, connector_stage: int):
    """task -> SFT -> eval -> GRPO -> eval (-> connector-only stage) -> table, summary.json, plot."""
    t0 = time.perf_counter()
    d = init_distributed()
    out = Path(fields["out"] if "out" in given else "runs/default" if not fields["seed"]
               else f"runs/default_seed{fields['seed']}")
    task_cfg = GridTaskConfig(seed=fields["seed"])
    if d.rank == 0:
        print(f"[1/4] preparing the task in {out / 'task'} (cached)", flush=True)
        task = prepare(out / "task", task_cfg)
    dist.barrier()
    task = prepare(out / "task", task_cfg)  # complete by now: only reads the manifest
    flags = {k: v for k, v in fields.items() if k in given and k in TrainConfig.__dataclass_fields__}
    data = dict(data=str(task.train_jsonl), eval_data=str(task.heldout_jsonl))

    def config(stage: dict, flags: dict, **paths) -> TrainConfig:  # defaults < tiny task < stage < flags < paths
        return TrainConfig(**{**TrainConfig().__dict__, **COMMON, **stage, **flags, **paths, "resume": True})

    if d.rank == 0:
        print(f"[2/4] cold-start SFT ({SFT['steps']} steps x {SFT['prompts_per_step']} traces) -> {out / 'sft'}",
              flush=True)
    sft_eval = run_stage(config(SFT, {k: v for k, v in flags.items() if k in EVERY_STAGE},
                                init_from=str(task.init_checkpoint), out=str(out / "sft"), **data))
    name = variant_name(fields, given)
    grpo_out = out / f"grpo{name}"
    grpo_cfg = config(GRPO, flags, init_from=str(latest_checkpoint(out / "sft") / "model"), out=str(grpo_out),
                      **data)
    if d.rank == 0:
        print(f"[3/4] GRPO ({grpo_cfg.steps} steps x {grpo_cfg.prompts_per_step} prompts x {grpo_cfg.group_size} "
              f"samples, trains {grpo_cfg.train}) -> {grpo_out}", flush=True)
    grpo_eval = run_stage(grpo_cfg)
    rows = {"cold start (SFT)": sft_eval, "GRPO": grpo_eval}
    summary = {"sft": sft_eval, "grpo": grpo_eval}
    if connector_stage:
        conn = config({**GRPO, "train": "connector", "steps": connector_stage},
                      {k: v for k, v in flags.items() if k not in ("train", "steps")},
                      init_from=str(latest_checkpoint(grpo_out) / "model"), out=str(out / f"grpo{name}_connector"),
                      **data)
        summary["connector_only"] = rows["+ connector-only stage"] = run_stage(conn)
    if d.rank == 0:
        summary["selection"] = s = selection(sft_eval, grpo_out)
        summary["minutes"] = (time.perf_counter() - t0) / 60
        summary_file = out / f"summary{name}.json"
        summary_file.write_text(json.dumps(summary, indent=2) + "\n")
        picture = plot(grpo_out, grpo_out / "plot.png", sft_eval)
        held = len(task.heldout_jsonl.read_text().splitlines())
        print(f"[4/4] held-out: {held} grids never trained on\n{table(rows)}\n"
              f"checkpoint selection over steps {s.get('steps')}: by accuracy -> step "
              f"{s.get('by_accuracy', {}).get('step')}, by critical-token entropy -> step "
              f"{s.get('by_critical_entropy', {}).get('step')}; rank correlation of the two "
              f"{s.get('spearman', math.nan):+.2f}\n"
              f"checkpoints {out / 'sft'}, {grpo_out} (best/: by --select) | metrics {grpo_out / 'metrics.jsonl'} | "
              f"table {summary_file} | plot {picture} | {summary['minutes']:.1f} min", flush=True)


def bench(fields: dict, given: set):
    """GRPO steps of the tiny task from its random init, one process then two (torchrun), every group kept (no
    dynamic sampling: a random model's rewards are all 0), median step of the last runs printed as a table."""
    out = Path(fields["out"] if "out" in given else "runs/bench")
    task = prepare(out / "task", GridTaskConfig(seed=fields["seed"]))
    steps = fields["steps"] if "steps" in given else 8
    args = ["--init_from", str(fields["init_from"] or task.init_checkpoint), "--data", str(task.train_jsonl),
            "--stage", "grpo", "--steps", str(steps), "--prompts_per_step", "8", "--group_size", "8",
            "--micro_batch", "64", "--max_new_tokens", "64", "--max_len", "96", "--no-dynamic_sampling",
            "--overlong_buffer", "0", "--reward_workers", "1", "--lr", "1e-4"]
    if "compile" in given:
        args.append("--compile" if fields["compile"] else "--no-compile")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    results = {}
    for n in (1, 2):
        run = out / f"nproc{n}"
        subprocess.run(["rm", "-rf", str(run)], check=True)
        head = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                f"--nproc_per_node={n}"]
        print(f"bench: {n} process(es), {steps} GRPO steps ...", flush=True)
        subprocess.run([*head, str(Path(__file__).with_name("train_rl.py")), *args, "--out", str(run)], check=True,
                       env=env, stdout=subprocess.DEVNULL)
        metrics = read_jsonl(run / "metrics.jsonl")[1:]  # the first step warms up
        med = lambda k: sorted(m[k] for m in metrics)[len(metrics) // 2]
        results[n] = {k: med(k) for k in ("t_step", "t_rollout", "t_logprob", "t_update", "tokens_per_s",
                                          "peak_mem_mb")}
    print(f"{'processes':>10s}{'step s':>10s}{'rollout':>10s}{'logprob':>10s}{'update':>10s}{'tokens/s':>10s}"
          f"{'peak MB':>10s}")
    for n, r in results.items():
        print(f"{n:>10d}{r['t_step']:>10.3f}{r['t_rollout']:>10.3f}{r['t_logprob']:>10.3f}{r['t_update']:>10.3f}"
              f"{r['tokens_per_s']:>10.0f}{r['peak_mem_mb']:>10.0f}")
    print(f"(medians over steps 2..{steps}; 64 samples of up to 64 tokens per step; tokens/s = generated tokens "
          f"per second of step time)")
