"""The default run: `python train_rl.py` with no arguments teaches a tiny VLM to look at the whole image.

The whole Skywork-R1V3 pipeline in miniature on a laptop CPU, no downloads: the red-cell counting task of
grid_task.py (cached) -> cold-start SFT from scratch on traces that mostly take a shortcut (stop after the third row)
-> held-out evaluation with eval.py's scoring -> GRPO -> evaluation again -> a before/after table, summary.json,
and a plot. RL has to find the strategy the cold start rarely used: reading the fourth row after a reflective
"wait". Optionally R1V3's connector-only stage follows (report section 3.4): supervised, only the connector (mlp1)
trains, on rows the RL task never saw (a grid task of another seed whose traces all take the full walk, its own
held-out split as the validation set), cosine with warmup ratio 0.03, val_loss every few steps with early stopping,
OUT/grpo_connector/best/ the lowest-val-loss checkpoint, which is then scored on the RL task's held-out grids for the
table. The paper's claims are each one flag away:

    python train_rl.py                          # the pipeline: OUT = runs/default (task/, sft/, grpo/, summary.json)
    python train_rl.py --train llm              # GRPO with the connector frozen (R1V3: it must stay trainable)
    python train_rl.py --connector_stage 20     # then R1V3's connector-only stage (SFT, --train connector)
    python train_rl.py --select critical_entropy  # OUT/grpo/best by critical-token entropy instead of accuracy
    python train_rl.py --paper_tables           # then R1V3's Tables 3, 4 and Fig. 9 in miniature (paper_tables.json)
    python default_run.py --help                # the same command: every flag

Flags given on the command line configure the GRPO stage (the cold start is fixed, so variants share it: their
GRPO output goes to OUT/grpo_<flags>/ and their table to OUT/summary_<flags>.json); --seed, --threads, --compile
and --out apply to every stage. The connector stage's lr and patience below are small, sensible guesses, not
calibrated like the other stages. The settings below were calibrated on a 2-core CPU: the smallest model and task
on which GRPO reliably flips the cold start's strategy within a few minutes.

--paper_tables reuses the finished stages and measures the rest of the report on the final GRPO checkpoint (OUT/grpo/
step_000040), writing OUT/paper_tables/ (every evaluation's records) and OUT/paper_tables.json:
- Table 4, inference modes, held-out greedy / avg@8 / mean length: slow thinking (as trained); NoWait (eval.py's
  --no_wait: `wait` is never sampled, so after c4 the model must close the thought or read on without it); NoThink:
  this ChatML model has no template `<think>` to leave out, so `<think>` is banned at sampling and the model must
  answer without opening its reasoning.
- Fig. 9, thinking budget: held-out greedy accuracy at max_new_tokens in BUDGETS (the full walk is 52 tokens +
  <|im_end|>, the shortcut 39 + 1): a response cut short has no \\boxed{} answer.
- Table 3, RL vs SFT on distilled traces: the final GRPO model samples one response (T = 1) to each of the first
  DISTILL_PROMPTS train prompts, its correct ones become the `response` of a new SFT set, and the cold start is
  fine-tuned on it (DISTILL below; OUT/sft_distilled/); cold start, GRPO and SFT-distilled are scored on the held-out
  split and on grid_task's OOD split (p_red 0.6: counts around 10, which 7% of the training grids reach).
"""
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch.distributed as dist

import cli
from checkpoint import load_model
from cli import arg, read_jsonl
from data import load_chat_template, load_rows, load_tokenizer, special_ids
from eval import EvalConfig, banned_ids, compiled, evaluate, results_json
from grid_task import MANIFEST, GridTaskConfig, prepare, prepare_ood
from parallel import init_distributed, process_group
from rollout import Sampler
from rundir import newest_checkpoint, step_of
from train_rl import TrainConfig, train

# The tiny task's settings: a full trace is 52 tokens + <|im_end|>, a prompt 16. Half the cores: on a loaded small
# machine a second torch thread per core oversubscribes it and slows steps down many times over, while on an idle
# one a single thread costs little.
COMMON = dict(max_new_tokens=64, max_len=96, overlong_buffer=0, eval_samples=8, reward_workers=1, resume=True,
              threads=max(1, (os.cpu_count() or 1) // 2))
SFT = dict(stage="sft", train="vit,connector,llm", steps=1000, prompts_per_step=64, micro_batch=64, lr=3e-3,
           schedule="cosine", min_lr_ratio=0.1, grad_clip=1.0)
# GRPO keeps DAPO's clip-higher and dynamic sampling, the settings this miniature was calibrated with: with 8 prompts
# a step, dropping the groups that all agree is what keeps the updates informative.
GRPO = dict(stage="grpo", train="connector,llm", steps=40, prompts_per_step=8, group_size=8, micro_batch=64, lr=5e-4,
            updates_per_rollout=2, eval_every=10, temperature=1.0, clip_high=0.28, dynamic_sampling=True)
# R1V3's connector-only stage: supervised, 2 epochs of 10K samples at lr 1e-5 in the report; here N steps (the
# --connector_stage flag) at a small lr on full-walk traces of another seed, validated every few steps.
CONNECTOR = dict(stage="sft", train="connector", prompts_per_step=64, micro_batch=64, lr=1e-4, schedule="cosine",
                 warmup_ratio=0.03, eval_every=5, patience=2, select="val_loss")
CONNECTOR_SEED = 1000  # the connector task's seed is the run's + this: other grids than the RL task's splits
# --paper_tables' SFT on the GRPO model's correct responses: the cold start's settings at a third of its lr, for
# 150 x 64 = 9,600 traces, about as many responses as GRPO samples in its 40 steps (145 rounds x 64 for seed 0).
DISTILL = dict(SFT, steps=150, lr=1e-3)
DISTILL_PROMPTS = 2000  # train prompts the GRPO model answers once each; the correct answers are the SFT set
BUDGETS = (16, 32, 44, 48, 56, 64)  # Fig. 9's max_new_tokens: the shortcut fits in 40 with <|im_end|>, the walk 53
EVERY_STAGE = {"seed", "threads", "compile"}  # command-line flags that also apply to the cold start
COLUMNS = [("greedy_accuracy", "greedy"), ("sampled_accuracy", "avg@k"), ("format_rate", "format"),
           ("response_length", "length"), ("critical_entropy", "critical entropy")]


@dataclass
class DefaultRun:
    """The pipeline's settings: where it writes, the task, each stage's training settings (the paths are filled in
    from the task and the stage before), and the optional connector-only stage after GRPO with its own task."""
    out: Path
    task: GridTaskConfig = field(default_factory=GridTaskConfig)
    sft: TrainConfig = field(default_factory=lambda: TrainConfig(**COMMON, **SFT))
    grpo: TrainConfig = field(default_factory=lambda: TrainConfig(**COMMON, **GRPO))
    connector_stage: int = 0  # steps of the connector-only stage (0: none)
    connector: TrainConfig = field(default_factory=lambda: TrainConfig(**COMMON, **CONNECTOR))
    connector_task: GridTaskConfig = field(default_factory=lambda: connector_task(0))
    variant: str = ""  # "" for the default GRPO settings, else "_flag-value_..." naming what the flags changed
    paper_tables: bool = False  # after the pipeline, Tables 3, 4 and Fig. 9 in miniature (paper_tables.json)
    distill: TrainConfig = field(default_factory=lambda: TrainConfig(**COMMON, **DISTILL))
    distill_prompts: int = DISTILL_PROMPTS
    budgets: tuple[int, ...] = BUDGETS


def connector_task(seed: int, **kw) -> GridTaskConfig:
    """The connector stage's rows: a grid task of another seed where every trace is the full walk."""
    return GridTaskConfig(**{"seed": seed + CONNECTOR_SEED, "n_train": 1024, "n_heldout": 64, "p_full": 1.0, **kw})


def run_stage(cfg: TrainConfig, trained: list) -> dict:
    """train(), reusing a finished stage with the same settings (a rerun of the default command is cheap; `trained`
    gets the stage's OUT when it had steps left to run); returns the stage's last held-out evaluation (at its last
    step, or where --patience stopped it)."""
    out = Path(cfg.out)
    saved = out / "config.json"
    if newest_checkpoint(out) and saved.is_file():
        before = {k: v for k, v in json.loads(saved.read_text()).items() if k != "resume"}
        now = {k: v for k, v in json.loads(json.dumps(cfg.__dict__)).items() if k != "resume"}
        if before != now:
            diff = {k: (before.get(k), now.get(k)) for k in now if before.get(k) != now.get(k)}
            raise ValueError(f"{out} was trained with other settings {diff}: choose another --out or delete it")
    if (newest := newest_checkpoint(out)) is None or step_of(newest) < cfg.steps:
        trained.append(out)
    train(cfg)
    return read_jsonl(out / "eval.jsonl")[-1]


def evaluate_model(model_dir: Path, rows_file: Path, cfg: TrainConfig, out_file: Path, ban: tuple[str, ...] = (),
                   limit: int = 0, **changes) -> dict:
    """eval.py's scoring of `model_dir` on `rows_file` (its first `limit` rows, 0: all) with the trainer's held-out
    settings and the EvalConfig `changes`, `ban`'s tokens never sampled, every rank its chunks; rank 0 writes the
    records to `out_file` (kept: a rerun reads it back). Returns the numbers."""
    if out_file.is_file():
        return json.loads(out_file.read_text())["summary"]
    proc = init_distributed()
    model = load_model(model_dir, device=proc.device)
    eval_cfg = replace(EvalConfig(max_new_tokens=cfg.max_new_tokens, max_len=cfg.max_len, samples=cfg.eval_samples,
                                  temperature=cfg.temperature, max_tiles=cfg.max_tiles, seed=cfg.seed,
                                  system=cfg.system), **changes)
    tok, sampler = load_tokenizer(model_dir), None
    if ban:  # build_sampler's sampler with more banned tokens (each must be one token)
        extra = [tok.token_to_id(w) for w in ban]
        if None in extra:
            raise ValueError(f"ban: {ban} are not all single tokens of {model_dir}'s tokenizer")
        sampler = Sampler(model, eval_cfg.max_slots, min(eval_cfg.max_len, model.config.llm.max_position_embeddings),
                          special_ids(tok)[0], banned_ids(tok, eval_cfg) + extra, compile=compiled(eval_cfg, model),
                          kv_tokens=eval_cfg.kv_tokens)
    result = evaluate(model, tok, load_rows(rows_file)[:limit or None], eval_cfg, sampler,
                      template=load_chat_template(model_dir))
    summary = {k: v for k, v in result.items() if isinstance(v, (int, float))}
    if proc.rank == 0:
        cli.write_atomic(out_file, json.dumps(cli.json_safe(results_json(
            result, eval_cfg, checkpoint=str(model_dir), data=str(rows_file)) | {"summary": summary}), indent=1))
    dist.barrier()
    return summary


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
        import matplotlib  # optional: the run prints how to get it when it is missing
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


SHOWN = ("greedy_accuracy", "sampled_accuracy", "response_length", "format_rate", "truncation_rate")


def shown(m: dict) -> dict:
    return {k: m[k] for k in SHOWN}


def distilled_rows(train_jsonl: Path, samples_file: Path, out_file: Path) -> dict:
    """The SFT set of Table 3: each train row the GRPO model answered correctly, its response as `response` (the
    image path rewritten relative to out_file), written once; returns its counts."""
    raw = [json.loads(line) for line in train_jsonl.read_text().splitlines()]
    records = json.loads(samples_file.read_text())["records"]
    folder = os.path.relpath(train_jsonl.parent, out_file.parent)
    rows = [dict(raw[r["index"]], id=f"distilled-{r['index']}", response=r["response"], image=f"{folder}/"
                 f"{raw[r['index']]['image']}", strategy="full" if " wait " in r["response"] else "other")
            for r in records if r["verdict"] == "correct"]
    if not out_file.is_file():  # kept: the SFT stage beside it trained on these bytes
        cli.write_atomic(out_file, "".join(json.dumps(r) + "\n" for r in rows))
    return dict(prompts=len(records), rows=len(rows), full_walk=sum(r["strategy"] == "full" for r in rows) / len(rows))


def paper_tables(run: DefaultRun, task, grpo: TrainConfig, trained: list) -> dict:
    """R1V3's Table 4 (inference modes), Fig. 9 (thinking budget) and Table 3 (RL vs SFT on distilled traces, held-out
    and OOD) on the final GRPO checkpoint; every evaluation kept in OUT/paper_tables/, so a rerun only reads them."""
    proc, out, t0 = init_distributed(), run.out, time.perf_counter()
    where = out / f"paper_tables{run.variant}"
    final = newest_checkpoint(Path(grpo.out)) / "model"
    cold = newest_checkpoint(out / "sft") / "model"
    reused = (where / "distilled_ood.json").is_file()  # the last evaluation: every one is there to read back
    if proc.rank == 0:
        where.mkdir(exist_ok=True)
        prepare_ood(task)
        print(f"[5/5] paper tables on {final} -> {where}", flush=True)
    dist.barrier()
    ev = lambda name, model, rows=task.heldout_jsonl, **kw: evaluate_model(model, rows, grpo, where / f"{name}.json",
                                                                          **kw)
    modes = {"slow thinking": ev("slow_thinking", final), "NoWait": ev("nowait", final, no_wait=True),
             "NoThink": ev("nothink", final, ban=("<think>",), no_think=True)}
    budget = {b: ev(f"budget_{b}", final, max_new_tokens=b, samples=0, entropy=False) for b in run.budgets}
    ev("distill_samples", final, task.train_jsonl, limit=run.distill_prompts, greedy=False, samples=1,
       entropy=False)
    distill_file = where / "distill.jsonl"
    if proc.rank == 0:
        counts = distilled_rows(task.train_jsonl, where / "distill_samples.json", distill_file)
    dist.barrier()
    sft = replace(run.distill, init_from=str(cold), out=str(out / f"sft_distilled{run.variant}"),
                  data=str(distill_file), eval_data=str(task.heldout_jsonl))
    if proc.rank == 0:
        print(f"  SFT on {counts['rows']} of {counts['prompts']} GRPO responses ({counts['full_walk']:.1%} full walks)"
              f": {sft.steps} steps x {sft.prompts_per_step}, lr {sft.lr} {sft.schedule} -> {sft.out}", flush=True)
    run_stage(sft, trained)
    distilled = newest_checkpoint(Path(sft.out)) / "model"
    ood = task.heldout_ood_jsonl
    rl_vs_sft = {name: {"heldout": shown(ev(f"{key}_heldout", model)), "ood": shown(ev(f"{key}_ood", model, ood))}
                 for name, key, model in (("cold start (SFT)", "cold", cold), ("GRPO", "grpo", final),
                                          ("SFT on GRPO's traces", "distilled", distilled))}
    return dict(checkpoint=str(final), inference_modes={k: shown(v) for k, v in modes.items()},
                thinking_budget={str(b): shown(v) for b, v in budget.items()}, rl_vs_sft=rl_vs_sft,
                distill=dict(counts, steps=sft.steps, prompts_per_step=sft.prompts_per_step, lr=sft.lr,
                             schedule=sft.schedule, init_from=sft.init_from) if proc.rank == 0 else {},
                ood=dict(file=str(ood), rows=len(ood.read_text().splitlines()), p_red=0.6),
                minutes=(time.perf_counter() - t0) / 60, reused=reused)


def paper_table_text(t: dict) -> str:
    """The three tables as printed."""
    lines = [f"Table 4 (held-out){'':14s}{'greedy':>10s}{'avg@k':>10s}{'length':>10s}{'format':>10s}"]
    lines += [f"  {k:30s}" + "".join(f"{m[c]:>10.3f}" for c in ("greedy_accuracy", "sampled_accuracy",
                                                                 "response_length", "format_rate"))
              for k, m in t["inference_modes"].items()]
    lines.append("Fig. 9 max_new_tokens    " + "".join(f"{b:>8s}" for b in t["thinking_budget"]))
    lines.append("  greedy accuracy        " + "".join(f"{m['greedy_accuracy']:>8.3f}"
                                                        for m in t["thinking_budget"].values()))
    lines.append(f"Table 3{'':25s}{'held-out greedy / avg@k':>26s}{'OOD greedy / avg@k':>26s}")
    lines += [f"  {k:30s}" + "".join(f"{v[s]['greedy_accuracy']:>17.3f} / {v[s]['sampled_accuracy']:.3f}"
                                     for s in ("heldout", "ood")) for k, v in t["rl_vs_sft"].items()]
    return "\n".join(lines)


def run_default(run: DefaultRun):
    """task -> SFT -> eval -> GRPO -> eval (-> connector-only stage) -> table, summary.json, plot."""
    t0 = time.perf_counter()
    proc = init_distributed()
    out = run.out
    if proc.rank == 0:
        reused = (out / "task" / MANIFEST).is_file()
        print(f"[1/4] {'reusing the task prepared' if reused else 'preparing the task'} in {out / 'task'}", flush=True)
        prepare(out / "task", run.task)
    dist.barrier()
    task = prepare(out / "task", run.task)  # complete by now: only reads the manifest
    data = dict(data=str(task.train_jsonl), eval_data=str(task.heldout_jsonl))
    if proc.rank == 0:
        print(f"[2/4] cold-start SFT ({run.sft.steps} steps x {run.sft.prompts_per_step} traces) -> {out / 'sft'}",
              flush=True)
    trained = []  # the stages this invocation trained (the others were finished before, with the same settings)
    sft_eval = run_stage(replace(run.sft, init_from=str(task.init_checkpoint), out=str(out / "sft"), **data), trained)
    grpo_out = out / f"grpo{run.variant}"
    grpo = replace(run.grpo, init_from=str(newest_checkpoint(out / "sft") / "model"), out=str(grpo_out), **data)
    if proc.rank == 0:
        print(f"[3/4] GRPO ({grpo.steps} steps x {grpo.prompts_per_step} prompts x {grpo.group_size} samples, "
              f"trains {grpo.train}) -> {grpo_out}", flush=True)
    grpo_eval = run_stage(grpo, trained)
    rows = {"cold start (SFT)": sft_eval, f"GRPO (step {grpo_eval['step']})": grpo_eval}
    summary = {"sft": sft_eval, "grpo": grpo_eval}
    if run.connector_stage:
        if proc.rank == 0:
            prepare(out / "connector_task", run.connector_task)
        dist.barrier()
        ctask = prepare(out / "connector_task", run.connector_task)
        conn_out = out / f"grpo{run.variant}_connector"
        conn = replace(run.connector, steps=run.connector_stage, out=str(conn_out), data=str(ctask.train_jsonl),
                       eval_data=str(ctask.heldout_jsonl), init_from=str(newest_checkpoint(grpo_out) / "model"))
        if proc.rank == 0:
            print(f"[3b/4] connector-only SFT ({conn.steps} steps x {conn.prompts_per_step} full traces of seed "
                  f"{run.connector_task.seed}, lr {conn.lr}, patience {conn.patience}) -> {conn_out}", flush=True)
        summary["connector_val"] = run_stage(conn, trained)  # val_loss on the connector task's held-out split
        summary["connector_only"] = rows["+ connector-only stage"] = evaluate_model(
            conn_out / "best", task.heldout_jsonl, conn, conn_out / "eval_heldout.json")
    if proc.rank == 0:
        summary["selection"] = s = selection(sft_eval, grpo_out)
        summary_file = out / f"summary{run.variant}.json"
        minutes = (time.perf_counter() - t0) / 60
        if not trained and summary_file.is_file():  # nothing trained now: the first run's time is the one to keep
            summary["minutes"] = json.loads(summary_file.read_text()).get("minutes", minutes)
            took = f"every stage reused ({minutes:.1f} min; the run that trained them: {summary['minutes']:.1f} min)"
        else:
            summary["minutes"], took = minutes, f"{minutes:.1f} min"
        best = json.loads((grpo_out / "best.json").read_text()) if (grpo_out / "best.json").is_file() else {}
        cli.write_atomic(summary_file, json.dumps(cli.json_safe(summary), indent=2) + "\n")
        picture = plot(grpo_out, grpo_out / "plot.png", sft_eval)
        held = len(task.heldout_jsonl.read_text().splitlines())
        print(f"[4/4] held-out: {held} grids never trained on\n{table(rows)}\n"
              f"checkpoint selection over steps {s.get('steps')}: by accuracy -> step "
              f"{s.get('by_accuracy', {}).get('step')}, by critical-token entropy -> step "
              f"{s.get('by_critical_entropy', {}).get('step')}; rank correlation of the two "
              f"{s.get('spearman', math.nan):+.2f}\n"
              f"checkpoints {out / 'sft'}, {grpo_out} (best/: step {best.get('step')} by {best.get('select')}) | "
              f"metrics {grpo_out / 'metrics.jsonl'} | table {summary_file} | plot {picture} | {took}", flush=True)
    if run.paper_tables:
        tables = paper_tables(run, task, grpo, trained)
        if proc.rank == 0:
            tables_file = out / f"paper_tables{run.variant}.json"
            if tables.pop("reused") and tables_file.is_file():  # as summary.json: keep the run that measured them
                tables["minutes"] = json.loads(tables_file.read_text()).get("minutes", tables["minutes"])
            cli.write_atomic(tables_file, json.dumps(cli.json_safe(tables), indent=2) + "\n")
            print(f"{paper_table_text(tables)}\ntables {tables_file} | {tables['minutes']:.1f} min", flush=True)

# -----------------------------------------------------------------------------------------------------------------
# Command line: the trainer's flags configure GRPO (a few every stage), plus the pipeline's own


@dataclass
class PipelineFlags:
    connector_stage: int = arg(0, "after GRPO, N steps of R1V3's connector-only stage (supervised, --train connector, "
                               "on full-walk traces of another seed; early stopping on their val_loss)")
    paper_tables: bool = arg(False, "then R1V3's Table 4 (slow thinking / NoWait / NoThink), Fig. 9 (thinking budget) "
                             "and Table 3 (RL vs SFT on the GRPO model's correct traces, held-out and OOD) on the "
                             "final GRPO checkpoint: OUT/paper_tables.json")


def from_command_line(argv: list[str]) -> DefaultRun:
    """defaults < the tiny task's settings < the stage's < the flags given."""
    p = cli.parser(__doc__.split("\n\n")[0].replace("\n", " "))
    cli.add_flags(p, TrainConfig)
    cli.add_flags(p, PipelineFlags)
    args = p.parse_args(argv)
    flags = {k: getattr(args, k) for k in cli.given(p, argv) if k in TrainConfig.__dataclass_fields__}
    out = Path(flags.pop("out")) if "out" in flags else Path("runs/default" if not args.seed
                                                             else f"runs/default_seed{args.seed}")
    changed = sorted(k for k in flags if k not in EVERY_STAGE)
    variant = "".join(f"_{k}-{str(flags[k]).replace(',', '+')}" for k in changed)
    every = {k: v for k, v in flags.items() if k in EVERY_STAGE}
    return DefaultRun(out=out, task=GridTaskConfig(seed=args.seed),
                      sft=TrainConfig(**{**COMMON, **SFT, **every}), grpo=TrainConfig(**{**COMMON, **GRPO, **flags}),
                      connector=TrainConfig(**{**COMMON, **CONNECTOR, **every}),
                      connector_task=connector_task(args.seed), connector_stage=args.connector_stage, variant=variant,
                      paper_tables=args.paper_tables, distill=TrainConfig(**{**COMMON, **DISTILL, **every}))


def main(argv: list[str] | None = None):
    run = from_command_line(sys.argv[1:] if argv is None else argv)
    with process_group():
        run_default(run)


if __name__ == "__main__":
    cli.run(main, "train_rl.py")  # run as `python train_rl.py` (or directly): one-line errors, as train_rl.py's
