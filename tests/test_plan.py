"""plan.py: the published configs' parameter counts, the computed terms against hand arithmetic, and the whole plan
against the trainer's own measured peak on 2 CPU processes (the slow test, ~35 s)."""
import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import plan as P
from checkpoint import IMG_CONTEXT, config_from_dict, save_model
from conftest import DIST_ENV
from data import load_tokenizer
from grid_task import GridTaskConfig, prepare
from model import VLM, LLMConfig, ViTConfig, VLMConfig

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"

# Published totals (model cards, OpenGVLab/InternVL3-*; Skywork-R1V3 is InternVL3-38B post-trained).
PUBLISHED = {"internvl3-1b": 0.94e9, "internvl3-2b": 2.09e9, "internvl3-8b": 7.94e9, "internvl3-38b": 38.4e9,
             "skywork-r1v3-38b": 38.4e9}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_configs_parameter_count(name):
    d = json.loads((CONFIGS / f"{name}.json").read_text())
    assert d["_source"]
    with torch.device("meta"):
        model = VLM(config_from_dict(d))
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - PUBLISHED[name]) / PUBLISHED[name] < 0.05, n


def test_computed_terms_by_hand():
    """Masters from the fake world's shard shapes halve from 1 to 2 ranks; the KV pool and the TP copy follow the
    formulas of the file docstring."""
    config = P.load_config(CONFIGS / "plan-check-66m.json")
    llm = config.llm
    one = P.PlanConfig(config="", device="cpu", gpus=1, micro_batch_tokens=64, train="llm")
    with P.fake_world(1):
        m1 = P.shard_bytes(P.sharded_model(config, one))
    with P.fake_world(2):
        m2 = P.shard_bytes(P.sharded_model(config, P.PlanConfig(config="", device="cpu", gpus=2, train="llm")))
    with torch.device("meta"):
        model = VLM(config)
    llm_params = sum(p.numel() for p in model.language_model.parameters())
    assert m1["trainable"] == 4 * llm_params
    assert m1["frozen"] == 4 * (sum(p.numel() for p in model.parameters()) - llm_params)
    assert abs(m2["trainable"] - m1["trainable"] / 2) <= 4 * 64 * 16  # FSDP pads each dim-0 shard by < 1 row
    per_token = 2 * llm.num_hidden_layers * (llm.num_key_value_heads // 2) * llm.head_dim * 2  # TP 2, bf16
    tp2 = P.PlanConfig(config="", rollout_tp=2, slots=3, max_len=100, kv_tokens=300)
    r = P.rollout_bytes(config, tp2, resident=0)
    assert r["kv"] == (19 + 1) * 16 * per_token  # 300 tokens in pages of 16, plus the scratch page
    whole = P.rollout_bytes(config, P.PlanConfig(config=""), resident=0)["copy"]
    assert whole == 2 * sum(p.numel() for p in model.parameters())
    blocks = model.language_model.layers
    split = sum(p.numel() for b in blocks for m in (b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj,
                                                    b.mlp.gate_proj, b.mlp.up_proj) for p in m.parameters()) + \
        sum(b.self_attn.o_proj.weight.numel() + b.mlp.down_proj.weight.numel() for b in blocks)
    assert r["copy_split_params"] == split
    assert r["copy"] == whole - split * 2 + split  # bf16, the split half on each of 2 ranks
    # The trainer's default: half of what is free once masters (here 1 GB) and the copy exist, in whole pages, at
    # most slots + 1 sequences of max_len (251 pages of 16 hold position 4000).
    for slots, gb in ((3, 10), (30, 4.2)):
        cfg = P.PlanConfig(config="", rollout_tp=2, slots=slots, max_len=4000, gpu_memory_gb=gb, reserve_gb=3)
        r = P.rollout_bytes(config, cfg, resident=10**9)
        tokens = (int(gb * 1e9) - 3 * 10**9 - 10**9 - r["copy"]) // 2 // per_token
        assert r["kv_tokens"] == min(-(-tokens // 16), (slots + 1) * 251) * 16
    assert r["kv_tokens"] < 30 * 4000  # the small card: the memory share, not the slots, sets the pool
    assert P.check_tp(config, 4) and not P.check_tp(config, 2)  # 2 kv heads: whole heads per rank


def _small_vlm(layers: int, hidden: int, intermediate: int) -> VLMConfig:
    """A small vocabulary, so that the blocks, not the head, decide the step's peak."""
    return VLMConfig(llm=LLMConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=intermediate,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2),
                     vision=ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, image_size=56, patch_size=14))


def test_checkpointed_step_grows_by_one_saved_input_per_layer():
    """With activation checkpointing a block keeps only its (T, hidden) input until backward, so the traced step
    peak of 4 layers minus that of 2 is 2 x T x hidden x 2 bytes (bf16 compute) plus the 2 blocks' resident fp32
    shard state (masters, 2 AdamW moments) from the fake world's shard shapes, nothing else. Anything the tracer
    counts per layer beyond that (full logits, unsharded gradients of the whole model, saved block internals)
    breaks the equality: the 8B plan once carried 30.6 GB of global-shape gradient shadows from the clip. The
    equality is per added layer, so two added layers test it as well as more would (the tolerance is a share of
    what they add); each layer costs tracing time."""
    T, hidden = 2048, 256
    plans = {}
    for layers in (2, 4):
        config = _small_vlm(layers, hidden, intermediate=512)
        cfg = P.PlanConfig(config="", gpus=2, micro_batch_tokens=T, max_len=T, train="llm",
                           activation_checkpointing=True)
        plans[layers] = P.make_plan(config, cfg)
    small, large = plans[2], plans[4]
    resident = 3 * (large.masters["trainable"] - small.masters["trainable"])
    saved = 2 * T * hidden * 2
    growth = large.step_peak - small.step_peak - resident
    assert abs(growth - saved) < 0.02 * saved, (growth, saved)


def test_step_holds_no_unsharded_copy_of_the_whole_model():
    """FSDP2 holds a unit or two unsharded at a time, so on 8 ranks the traced step's transients (its peak minus
    the resident fp32 shards: masters, gradients, AdamW moments) stay far below the whole model's fp32 gradients.
    A tracer that counts DTensor's global-shape metadata propagation (the clip's `_foreach_norm` over every
    sharded gradient) would put all of them, 8 x the shard, on top. A short micro-batch keeps activations small."""
    config = _small_vlm(layers=10, hidden=256, intermediate=1024)
    plan = P.make_plan(config, P.PlanConfig(config="", gpus=8, micro_batch_tokens=256, max_len=256, train="llm",
                                            activation_checkpointing=True))
    with torch.device("meta"):
        full_grads = 4 * sum(p.numel() for p in VLM(config).language_model.parameters())
    resident = 4 * plan.masters["trainable"] + plan.masters["frozen"]
    assert plan.step_peak - resident < full_grads / 2, (plan.step_peak - resident, full_grads)


def test_cli_flags_and_search_output(capsys, tmp_path):
    """plan-check-66m.json with 2 LLM blocks and 1 ViT block: the flags and the output, not the model's size, are
    under test, and each block costs each traced step time. --max_len is the search's, so that the search's 2-GPU
    layouts take the first plan's traced step from make_plan's cache: two traces, one per GPU count."""
    d = json.loads((CONFIGS / "plan-check-66m.json").read_text())
    d["llm_config"]["num_hidden_layers"], d["vision_config"]["num_hidden_layers"] = 2, 1
    (tmp_path / "config.json").write_text(json.dumps(d))
    P.main(["--config", str(tmp_path / "config.json"), "--gpus", "2", "--micro_batch_tokens", "128", "--max_len", "256",
            "--search", "--search_gpus", "1,2", "--search_tp", "1,2", "--search_slots", "8",
            "--search_max_len", "256", "--gpu_memory_gb", "12"])
    out = capsys.readouterr().out
    for text in ("trainable fp32 masters", "AdamW moments", "rollout copy", "KV pool", "headroom", "FITS",
                 "search: 3 of 3 layouts fit;"):
        assert text in out, out


# ---------------------------------------------------------------------------------------------------------------
# The plan against reality (slow: one 2-process GRPO step of a 67M-parameter model, ~35 s on a 2-core box)


def _env(**extra) -> dict:
    return {k: v for k, v in os.environ.items() if k not in DIST_ENV} | {"OMP_NUM_THREADS": "1"} | extra


# glibc's malloc otherwise raises its mmap threshold as large blocks are freed and then keeps freed heap memory
# in the process: RSS would count the checkpoint load and the first refresh's freed buffers, not live tensors.
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536"}
# VmHWM, not ru_maxrss: Linux carries the parent's RSS at fork into a child's ru_maxrss across exec, and the parent
# here is pytest after tracing plans (~700 MiB); VmHWM is this process's own high-water mark.
BASELINE = """
import sys
sys.path.insert(0, sys.argv[1])
import train_rl  # noqa: F401 - torch, the model code and everything the trainer imports
from parallel import init_distributed
init_distributed()  # a gloo process group, as under torchrun
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024)  # kB -> MiB
"""


@contextlib.contextmanager
def started(*args, **kw):
    """subprocess.Popen(*args, **kw) for the body of a `with`, ended on the way out if it still runs (the body
    failed or timed out; torchrun ends its ranks on SIGTERM)."""
    proc = subprocess.Popen(*args, **kw)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()


def test_plan_matches_the_trainers_measured_peak(tmp_path):
    """One GRPO step of configs/plan-check-66m.json (67M parameters, 32K vocabulary) on 2 CPU processes, its
    `peak_mem_mb` (ru_maxrss, MiB, the larger of the two ranks) against the plan of the same layout.

    Like with like: ru_maxrss is the whole process, so the plan gets the peak RSS of an idle process that imported
    train_rl and joined a gloo group (the Python, torch and library baseline, ~350 MiB) added to it. (The trainer's
    ranks are children of torchrun's small agent, so its ru_maxrss is their own.) Both runs use
    MALLOC_MMAP_THRESHOLD_=65536, so that freed tensor memory leaves the process as it does from a GPU's caching
    allocator's point of view rather than lingering in glibc's heap (without it RSS stays ~500 MiB above the live
    tensors after the checkpoint load and the first refresh). The plan runs in --device cpu mode (fp32 everywhere,
    as the trainer runs on CPU), with the sampler the trainer builds (max(slots, eval_samples) = 8 slots x max_len
    96) and a micro-batch of 4 sequences x 96 tokens (the padded bound; the step's sequences are ~72 tokens)."""
    # The baseline process, the trainer and the plan's trace are independent (each process's own peak is measured),
    # so they run at once: the baseline and the trace fill the cores while this process writes the checkpoint,
    # torchrun's agent starts and one rank saves.
    with started([sys.executable, "-c", BASELINE, str(REPO)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                 text=True, cwd=REPO, env=_env(**MALLOC)) as base:
        task = prepare(tmp_path / "grid", GridTaskConfig(n_train=16, n_heldout=4))
        tok = load_tokenizer(task.init_checkpoint)
        config = config_from_dict(json.loads((CONFIGS / "plan-check-66m.json").read_text()),
                                  tok.token_to_id(IMG_CONTEXT))
        ckpt = tmp_path / "ckpt"
        save_model(VLM.from_config(config), ckpt, layout="remote")
        shutil.copy(task.tokenizer, ckpt / "tokenizer.json")
        out, log = tmp_path / "out", tmp_path / "train.log"
        args = ["--init_from", str(ckpt), "--data", str(task.train_jsonl), "--out", str(out), "--stage", "grpo",
                "--steps", "1", "--prompts_per_step", "4", "--group_size", "2", "--micro_batch", "4", "--max_len",
                "96", "--max_new_tokens", "56", "--threads", "1", "--no-dynamic_sampling", "--train", "connector,llm"]
        with log.open("w") as f, started([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                          "--nproc_per_node=2", "train_rl.py", *args], stdout=f,
                                         stderr=subprocess.STDOUT, cwd=REPO, env=_env(**MALLOC)) as run:
            cfg = P.PlanConfig(config=str(ckpt), device="cpu", gpus=2, slots=8, max_len=96, micro_batch=4,
                               micro_batch_tokens=4 * 96, train="connector,llm")
            plan = P.make_plan(P.load_config(ckpt), cfg)
            base_out, base_err = base.communicate(timeout=120)
            trained = run.wait(timeout=300)
    assert base.returncode == 0, base_err[-3000:]
    baseline = float(base_out.split()[-1])
    assert trained == 0, log.read_text()[-6000:]
    measured = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["peak_mem_mb"]
    planned = baseline + plan.total / 2**20
    error = (planned - measured) / measured
    print(f"plan {planned:.0f} MiB (baseline {baseline:.0f} + plan {plan.total / 2**20:.0f}) vs measured "
          f"{measured:.0f} MiB: {error:+.1%}")
    assert abs(error) < 0.15
