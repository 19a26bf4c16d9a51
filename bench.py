"""Benchmarks of nanoR1V's parts, one sub-command each; every run prints the device and settings it measured with.

    python bench.py entropy    # fused log-prob + entropy vs the full-logits reference: fwd+bwd time, peak memory
    python bench.py rollout    # the sampler vs transformers' generate, the LM-head ceiling, batch-1 bandwidth (CUDA)
    python bench.py reward     # responses/s on GRPO-shaped responses, serial and with score_batch's process pool
    python bench.py train      # GRPO steps of the tiny grid task from its random init, 1 vs 2 processes (torchrun)
    python bench.py trl        # whole GRPO steps vs TRL's GRPOTrainer (pip install trl==1.16.0), same tiny Qwen2

`python bench.py COMMAND --help` lists a command's flags, generated from its config dataclass. Timings are the best
(or median) of several runs, interleaved where two engines are compared, since other processes on a shared machine
only ever slow a run down.
"""
import dataclasses
import json
import multiprocessing
import os
import random
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

import cli
from checkpoint import config_from_dict, save_model, to_internal
from cli import arg
from data import load_tokenizer
from entropy import Chunks, logprob_entropy, logprob_entropy_reference, triton
from grid_task import GridTaskConfig, prepare
from model import VLM, LLMConfig, ViTConfig, VLMConfig
from parallel import precision
from reward import SERIAL_BELOW, RewardConfig, score, score_batch, warm_up
from rollout import Request, Sampler

# -----------------------------------------------------------------------------------------------------------------
# Shared: the device, its name, a clock that waits for the device


def default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"


def timed(fn, device) -> float:
    """Seconds `fn()` takes, the device's queued work included (a GPU runs ahead of the host)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t

# -----------------------------------------------------------------------------------------------------------------
# entropy: entropy.logprob_entropy (fused) vs entropy.logprob_entropy_reference (full logits)


@dataclass
class EntropyBench:
    n: int | None = arg(None, "tokens; unset: 16384 on CUDA, 4096 on CPU")
    d: int | None = arg(None, "hidden size; unset: 5120 on CUDA, 512 on CPU")
    v: int | None = arg(None, "vocabulary size; unset: 151936 on CUDA, 32768 on CPU")
    dtype: str | None = arg(None, "inputs' dtype; unset: parallel.precision's compute dtype (bfloat16 on CUDA, "
                                  "float32 on CPU)",
                            choices=("bfloat16", "float32"))
    impl: str | None = arg(None, "fused impl; unset: triton on CUDA, torch on CPU", choices=("torch", "triton"))
    iters: int | None = arg(None, "timed iterations after the first; unset: 5 on CUDA, 3 on CPU")
    chunk_tokens: int | None = arg(None, "Chunks.tokens of the fused path; unset: Chunks' default")
    chunk_vocab: int | None = arg(None, "Chunks.vocab of the fused path; unset: Chunks' default")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _bench_variant(variant: str, n: int, d: int, v: int, dtype: str, iters: int, chunks) -> dict:
    """One variant in a fresh process: peak memory of the first fwd+bwd above the inputs, then median time."""
    device = default_device()
    cuda = device.type == "cuda"
    torch.manual_seed(0)

    def make(n):
        hidden = torch.randn(n, d, device=device).to(getattr(torch, dtype)).requires_grad_()
        weight = (torch.randn(v, d, device=device) / d**0.5).to(getattr(torch, dtype)).requires_grad_()
        return hidden, weight, torch.randint(0, v, (n,), device=device)

    def step(hidden, weight, targets):
        if variant == "reference":
            logprob, entropy = logprob_entropy_reference(hidden, weight, targets)
        else:
            logprob, entropy = logprob_entropy(hidden, weight, targets, impl=variant, chunks=chunks)
        (logprob.sum() + entropy.sum()).backward()
        hidden.grad = weight.grad = None

    step(*make(8))  # library init (cuBLAS/oneDNN handles, Triton compile) stays out of the measurement
    inputs = make(n)
    try:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step(*inputs)
            peak = torch.cuda.max_memory_allocated() - base
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM (peak resident set) to the current VmRSS
            base = _rss_kib("VmRSS")
            step(*inputs)
            peak = (_rss_kib("VmHWM") - base) * 1024
        times = [timed(lambda: step(*inputs), device) for _ in range(iters)]
    except torch.OutOfMemoryError:
        return dict(oom=True)
    return dict(oom=False, ms=1e3 * statistics.median(times), mib=peak / 2**20)


def bench_entropy(cfg: EntropyBench) -> None:
    cuda = torch.cuda.is_available()
    n, d, v = (cfg.n or (16384 if cuda else 4096), cfg.d or (5120 if cuda else 512),
               cfg.v or (151936 if cuda else 32768))
    dtype = cfg.dtype or str(precision(default_device()).param_dtype).removeprefix("torch.")
    impl = cfg.impl or ("triton" if cuda else "torch")
    iters = cfg.iters or (5 if cuda else 3)
    chunks = Chunks(**{k: v for k, v in dict(tokens=cfg.chunk_tokens, vocab=cfg.chunk_vocab).items() if v is not None})
    triton_version = triton.__version__ if triton else "not installed"
    print(f"device: {device_name(default_device())} | torch {torch.__version__} triton {triton_version} | "
          f"N={n} D={d} V={v} {dtype} | fused impl={impl} {chunks}")
    if not cuda and impl == "torch":
        print("(Triton on CPU runs in the numpy interpreter, far too slow to time: skipped; --impl triton forces it)")
    if cuda:
        print("memory: torch.cuda.max_memory_allocated during the first fwd+bwd minus what was allocated before it")
    else:
        print("memory: peak resident-set growth (VmHWM after clear_refs) during the first fwd+bwd, one fresh process "
              "per variant, glibc mmap threshold 64 KiB so freed blocks go back to the OS")
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # inherited by the spawned processes below
    rows = {}
    for variant in ("reference", impl):
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows[variant] = pool.submit(_bench_variant, variant, n, d, v, dtype, iters, chunks).result()
    print(f"{'variant':<18}{f'fwd+bwd ms (median of {iters})':>28}{'peak MiB':>12}")
    for variant, r in rows.items():
        name = "reference" if variant == "reference" else f"fused ({variant})"
        print(f"{name:<18}{'OOM':>28}{'OOM':>12}" if r["oom"] else f"{name:<18}{r['ms']:>28.1f}{r['mib']:>12.1f}")
    ref, fused = rows["reference"], rows[impl]
    if not (ref["oom"] or fused["oom"]):
        print(f"{'fused/reference':<18}{fused['ms'] / ref['ms']:>28.3f}{fused['mib'] / ref['mib']:>12.3f}")

# -----------------------------------------------------------------------------------------------------------------
# rollout: rollout.Sampler vs transformers' generate on the very same weights


BENCH_SIZES = {  # Qwen2-shaped random models; "tiny" is the LLM scale the CPU default run trains
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=64, tie_word_embeddings=False),
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=32000, tie_word_embeddings=False),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}
# Memory bandwidth in bytes/s from the spec sheets (H100 SXM 3.35 TB/s); the first key found in the device's name wins
PEAK_BANDWIDTH = {"H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}


@dataclass
class RolloutBench:
    size: str | None = arg(None, "model shape; unset: tiny and small on CPU, qwen2.5-7b on CUDA",
                           choices=tuple(sorted(BENCH_SIZES)))
    batch: int = arg(32, "sequences generated together")
    prompt_len: int = arg(32, "prompt tokens per sequence")
    new_tokens: int = arg(128, "tokens generated per sequence")
    repeats: int = arg(10, "timed runs per engine, interleaved (the best is reported)")
    long_max_len: int = arg(8192, "a second sampler's max_len (same requests): decode must not slow down with it; "
                                  "0 skips the row")
    sync_every: int | None = arg(None, "decode steps between host checks; unset: 1 on CPU, 8 on CUDA")
    compile: bool = arg(True, "torch.compile the decode step: CUDA graphs on a GPU, inductor C++ on a CPU, which "
                              "needs a C++ compiler")


def bench_rollout(cfg: RolloutBench) -> None:
    device = default_device()
    sizes = [cfg.size] if cfg.size else ["qwen2.5-7b"] if device.type == "cuda" else ["tiny", "small"]
    for size in sizes:
        bench_size(cfg, size, device)


def bench_size(cfg: RolloutBench, size: str, device):
    from transformers import Qwen2Config, Qwen2ForCausalLM  # the reference engine: a test-only dependency
    prec = precision(device)  # the training run's choice: bf16 weights and KV on CUDA, fp32 on a CPU
    dtype = prec.rollout_dtype
    hf_config = Qwen2Config(**BENCH_SIZES[size], max_position_embeddings=max(4096, cfg.long_max_len),
                            rope_theta=1e6)
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the bench dtype: no fp32 copy of a 7B model on the way
    with torch.device(device):
        hf = Qwen2ForCausalLM(hf_config).eval()
    torch.set_default_dtype(default_dtype)
    config = config_from_dict(hf_config.to_dict())
    with torch.device("meta"):
        ours = VLM(config)
    # Ours reads the very same weight tensors (qwen2 checkpoint names -> ours): same bytes, no second copy.
    ours.load_state_dict(to_internal(dict(hf.state_dict()), "qwen2", config.llm.tie_word_embeddings), assign=True)
    B, P, N = cfg.batch, cfg.prompt_len, cfg.new_tokens
    prompts = torch.randint(0, hf_config.vocab_size, (B, P), generator=torch.Generator().manual_seed(0)).to(device)
    requests = [Request(p.tolist()) for p in prompts]
    sampler = Sampler(ours, max_slots=B, max_len=P + N, compile=cfg.compile, sync_every=cfg.sync_every,
                      cache_dtype=prec.kv_dtype)
    long = cfg.long_max_len and Sampler(ours, max_slots=B, max_len=cfg.long_max_len, compile=cfg.compile,
                                        sync_every=cfg.sync_every, cache_dtype=prec.kv_dtype)
    name = device_name(device)
    params = sum(p.numel() for p in ours.language_model.parameters())
    print(f"device {name}, {size} ({params / 1e6:.1f}M params, {dtype}), batch {B}, prompt {P}, {N} new tokens, "
          f"compile={cfg.compile}, sync_every={sampler.sync_every}; best of {cfg.repeats}")
    for mode, T in (("greedy", 0.0), ("sampled", 1.0)):
        hf_kw = dict(do_sample=T > 0, max_new_tokens=N, min_new_tokens=N, use_cache=True, pad_token_id=0,
                     eos_token_id=None, **(dict(temperature=T, top_k=0, top_p=1.0) if T > 0 else {}))
        run_hf = lambda: hf.generate(prompts, attention_mask=torch.ones_like(prompts), **hf_kw)
        run_ours = lambda: sampler.generate(requests, max_new_tokens=N, temperature=T)
        run_long = lambda: long.generate(requests, max_new_tokens=N, temperature=T)
        with torch.no_grad():  # warm-up: allocator, compilation, CUDA graph capture
            hf.generate(prompts[:, :8], attention_mask=torch.ones_like(prompts[:, :8]), **{**hf_kw,
                        "max_new_tokens": 4, "min_new_tokens": 4})
            run_ours()
            if long:
                run_long()
            t_hf, t_ours, t_long = float("inf"), float("inf"), float("inf")
            for _ in range(cfg.repeats):  # interleaved, so that load from other processes hits all alike
                t_hf = min(t_hf, timed(run_hf, device))
                t_ours = min(t_ours, timed(run_ours, device))
                if long:
                    t_long = min(t_long, timed(run_long, device))
        assert sampler.stats["tokens"] == B * N, sampler.stats
        print(f"{mode:8s} ours {B * N / t_ours:9.1f} tokens/s   transformers {B * N / t_hf:9.1f} tokens/s   "
              f"ratio {t_hf / t_ours:.2f}x")
        print(f"{'':8s} {pool_line(sampler)}")
        if long:
            print(f"{'':8s} ours at max_len {long.max_len} {B * N / t_long:9.1f} tokens/s = {t_ours / t_long:.2f}x "
                  f"its max_len {P + N} figure, ratio {t_hf / t_long:.2f}x")
            print(f"{'':8s} {pool_line(long)}")
        if T == 0:
            hf_step = t_hf / N  # transformers' time per greedy step, prefill included
    # Amdahl: both engines run the same LM-head GEMM every step; its share of transformers' step caps the ratio.
    h = torch.randn(B, hf_config.hidden_size, dtype=dtype, device=device)
    with torch.no_grad():
        head = min(timed(lambda: ours.language_model.logits(h), device) for _ in range(5))
    print(f"LM head alone ({B}x{hf_config.hidden_size} @ {hf_config.hidden_size}x{hf_config.vocab_size}): "
          f"{head * 1e3:.2f} ms, {head / hf_step:.0%} of transformers' {hf_step * 1e3:.2f} ms greedy step: "
          f"no engine running the same GEMM exceeds {hf_step / head:.1f}x")
    if device.type == "cuda":
        bandwidth_at_batch_1(ours, P, cfg.compile, cfg.sync_every, name)


def pool_line(sampler: Sampler) -> str:
    stats = sampler.stats
    return (f"KV pool at max_len {sampler.max_len}: peak {stats['peak_pages']} of {stats['pool_pages']} pages of "
            f"{stats['page_size']} tokens ({stats['peak_occupancy']:.0%}), {stats['preemptions']} preemptions")


def bandwidth_at_batch_1(model, P: int, compile: bool, sync_every: int | None, name: str):
    """Decode step time at batch 1 from two generation lengths (prefill cancels out) vs the bytes a step must read:
    every LLM parameter but the embedding table (one row of it is read), plus the KV it attends over (the positions
    reached, on average: decode reads live pages only)."""
    device = model.language_model.embed_tokens.weight.device
    n1, n2 = 32, 544
    sampler = Sampler(model, max_slots=1, max_len=P + n2, compile=compile, sync_every=sync_every,
                      cache_dtype=precision(device).kv_dtype)
    req = [Request(list(range(1, P + 1)))]
    gen = lambda n: sampler.generate(req, max_new_tokens=n, temperature=0.0)
    gen(n1)
    step = (min(timed(lambda: gen(n2), device) for _ in range(3)) -
            min(timed(lambda: gen(n1), device) for _ in range(3))) / (n2 - n1)
    lm = model.language_model
    nbytes = lambda t: t.numel() * t.element_size()
    weights = sum(nbytes(p) for p in lm.parameters()) - (nbytes(lm.embed_tokens.weight) if lm.lm_head is not None
                                                         else 0)
    kv = sum(map(nbytes, sampler.pool.k + sampler.pool.v)) / sampler.pool.k[0].shape[0] / sampler.page_size * (
        P + (n1 + n2) / 2)  # bytes per token x tokens attended over, on average
    x = torch.empty(2**30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    copy_bw = 2 * x.numel() / min(timed(lambda: y.copy_(x), device) for _ in range(5))  # read + write
    peak = next((bw for key, bw in PEAK_BANDWIDTH.items() if key in name), None)
    achieved = (weights + kv) / step
    spec = f"{achieved / peak:.0%} of the {peak / 1e12:.2f} TB/s spec peak" if peak else "no spec peak on file"
    print(f"batch 1  {1 / step:9.1f} tokens/s   {(weights + kv) / 1e9:.2f} GB read per step -> "
          f"{achieved / 1e12:.2f} TB/s = {spec}, {achieved / copy_bw:.0%} of a measured {copy_bw / 1e12:.2f} TB/s "
          f"device copy ({name})")

# -----------------------------------------------------------------------------------------------------------------
# reward: reward.score one by one vs reward.score_batch's process pool, on GRPO-shaped responses


@dataclass
class RewardBench:
    n: int = arg(1000, "responses to score")
    workers: int | None = arg(None, "batch scorer processes; unset: all cores")
    repeat: int = arg(2, "alternate serial and batch runs; report the best of each")


def _bench_problem(rng) -> tuple[dict, list[str], list[str]]:
    """A random problem: (row, right answers in forms models write, wrong answers)."""
    a, b, c = rng.randint(2, 99), rng.randint(2, 9), rng.randrange(4)
    letter, other, options = chr(65 + c), chr(65 + (c + 1) % 4), [f"{a + 10 * i}°" for i in range(4)]
    word, wrong_word = rng.sample(["photosynthesis", "mitochondria", "Newton", "Paris", "isosceles", "osmosis"], 2)
    kind, answer, right, wrong = rng.choice([
        ("numeric", str(a), [str(a), f"{a}.0", f"{a} cm"], [str(a + 1), str(-a)]),
        ("numeric", f"{a}/{a * b + 1}", [f"\\frac{{{a}}}{{{a * b + 1}}}", f"{a}/{a * b + 1}"],
         [f"\\frac{{{a + 1}}}{{{a * b + 1}}}", f"{a / (a * b + 1) + 0.01:.2f}"]),
        ("numeric", str(a * 1000), [f"{a},000", f"{a}\\times 10^{{3}}", f"{a}e3"], [f"{a}00", f"{a}e4"]),
        ("expression", f"x^2+{2 * a}x+{a * a}", [f"(x+{a})^2", f"x^{{2}}+{2 * a}x+{a * a}"],
         [f"(x-{a})^2", f"x^2+{a * a}"]),
        ("expression", f"[{a}, {a + b})", [f"[{a},{a + b})", f"\\left[{a}, {a + b}\\right)"],
         [f"({a},{a + b})", f"[{a},{a + b}]"]),
        ("expression", f"\\frac{{\\sqrt{{{b}}}}}{{{a}}}", [f"\\frac{{\\sqrt{b}}}{{{a}}}", f"\\sqrt{{{b}}}/{a}"],
         [f"\\frac{{\\sqrt{{{b + 1}}}}}{{{a}}}", f"{b}/{a}"]),
        ("multiple_choice", letter, [letter, f"({letter})", f"{letter}. {options[c]}", options[c], f"**{letter}**"],
         [other, f"({other})"]),
        ("text", word, [word, word.lower() + "."], [wrong_word]),
    ])
    row = {"answer": answer, "answer_type": kind, **({"options": options} if kind == "multiple_choice" else {})}
    return row, right, wrong


def _bench_data(n: int, seed: int = 0, group: int = 8) -> tuple[list[str], list[dict], list[float]]:
    """n realistic (response, row, expected accuracy) triples, laid out like a GRPO batch: groups of `group`
    responses to one random problem, each a think block of reasoning (with an intermediate boxed value) then a final
    answer in one of the forms models write, right with a per-problem probability."""
    rng = random.Random(seed)
    steps = ["The figure shows a right triangle with legs 3 and 4.", "Wait, let me check the units first.",
             "So the area is $\\frac{1}{2} \\cdot 3 \\cdot 4 = 6$.", "Hmm, but the question asks something else.",
             "Alternatively, solve $2x + 3 = 7$.", "So the intermediate result is $\\boxed{6}$."]
    finals = ["The answer is $\\boxed{{{}}}$.", "Therefore, the final answer is \\boxed{{{}}}.", "Answer: {}",
              "<answer>{}</answer>", "So the answer is **{}**."]
    responses, rows, expected = [], [], []
    while len(responses) < n:
        row, right, wrong = _bench_problem(rng)
        p_right = rng.random()
        for _ in range(min(group, n - len(responses))):
            ok = rng.random() < p_right
            thought = " ".join(rng.choice(steps) for _ in range(rng.randint(20, 60)))
            final = rng.choice(finals).format(rng.choice(right if ok else wrong))
            responses.append(f"<think>\n{thought}\n</think>\n\nPutting it together. {final}")
            rows.append(dict(row))
            expected.append(float(ok))
    return responses, rows, expected


def bench_reward(cfg: RewardBench) -> None:
    load = os.getloadavg()[0]  # other processes on the machine skew both figures; say how busy it was
    responses, rows, expected = _bench_data(cfg.n)
    workers = cfg.workers or os.cpu_count() or 1
    reward_cfg = RewardConfig()
    warm_up()
    t0 = time.perf_counter()
    score_batch(responses[:SERIAL_BELOW], rows[:SERIAL_BELOW], reward_cfg, workers=workers)  # start, warm the pool
    pool_start = time.perf_counter() - t0
    serial_s, batch_s = [], []
    for _ in range(cfg.repeat):  # interleaved, so that a burst of outside load hits both about equally
        t0 = time.perf_counter()
        serial = [score(r, row, reward_cfg) for r, row in zip(responses, rows)]
        t1 = time.perf_counter()
        batch = score_batch(responses, rows, reward_cfg, workers=workers)
        serial_s.append(t1 - t0)
        batch_s.append(time.perf_counter() - t1)
    agree = sum(s["accuracy"] == b["accuracy"] == e for s, b, e in zip(serial, batch, expected))
    errors = sum(s["error"] is not None for s in serial + batch)
    print(f"reward bench: {cfg.n} responses | serial {cfg.n / min(serial_s):.0f}/s | score_batch {workers} workers "
          f"{cfg.n / min(batch_s):.0f}/s (best of {cfg.repeat}; pool start {pool_start:.1f} s, not counted) | "
          f"accuracy matches labels {agree}/{cfg.n} | errors {errors} | load average {load:.1f} on "
          f"{os.cpu_count()} cores")

# -----------------------------------------------------------------------------------------------------------------
# train: GRPO steps of train_rl.py on the tiny grid task, one process then two


@dataclass
class TrainBench:
    steps: int = arg(8, "GRPO steps per run (the first one warms up and is left out of the medians)")
    seed: int = arg(0, "seed of the grid task's data and initial weights")
    out: str = arg("runs/bench", "directory of the task (task/) and of each run (nproc1/, nproc2/)")
    init_from: str | None = arg(None, "checkpoint to start from; unset: the task's random init (see --size)")
    size: str = arg("tiny", "tiny: the grid task's random init; internvl3-1b: a random model of InternVL3-1B's "
                    "shape (InternViT-300M + Qwen2.5-0.5B, one 448px tile), saved with checkpoint.save_model",
                    ("tiny", "internvl3-1b"))
    nproc: str = arg("1,2", "process counts to run, a comma list (torchrun for > 1)")
    compile: bool | None = arg(None, "passed to the trainer as --compile / --no-compile; unset: the trainer's default")
    micro_batch_tokens: int | None = arg(None, "passed to the trainer; unset: --micro_batch 64")
    max_new_tokens: int = arg(64, "response cap (random models rarely stop early)")


def internvl3_1b(out: Path, tokenizer_dir: Path) -> Path:
    """A random VLM of InternVL3-1B's shape on the grid task's tokenizer (the vocabulary padded to Qwen2.5's),
    one 448px tile per image (256 image tokens), bf16 on disk. Cached in `out`."""
    if (out / "config.json").is_file():
        return out
    tok = load_tokenizer(tokenizer_dir)
    config = VLMConfig(llm=LLMConfig(vocab_size=151674, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                     num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
                       vision=ViTConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                        intermediate_size=4096, image_size=448, patch_size=14),
                       image_token_id=tok.token_to_id("<IMG_CONTEXT>"), max_dynamic_patch=1, use_thumbnail=False,
                       layout="native")
    on_disk = precision(default_device(), "bf16").host_dtype  # as the published checkpoint ships
    save_model(VLM.from_config(config, dtype=on_disk, device=default_device()).cpu(), out)
    tok.save(str(out / "tokenizer.json"))
    return out


def bench_train(cfg: TrainBench) -> None:
    """GRPO steps of the grid task (a VLM task with an image per prompt) from a random init, on each process count
    (torchrun), every group kept (no dynamic sampling: a random model's rewards are all 0); the median step and its
    split (rollout / old log-probs / update), tokens/s, the packed fraction, peak memory and MFU (CUDA)."""
    out = Path(cfg.out)
    task = prepare(out / "task", GridTaskConfig(seed=cfg.seed))
    init = cfg.init_from or (internvl3_1b(out / "internvl3-1b", task.init_checkpoint) if cfg.size != "tiny"
                             else task.init_checkpoint)
    max_len = 96 if cfg.size == "tiny" else 512
    args = ["--init_from", str(init), "--data", str(task.train_jsonl), "--stage", "grpo", "--steps", str(cfg.steps),
            "--prompts_per_step", "8", "--group_size", "8", "--max_new_tokens", str(cfg.max_new_tokens),
            "--max_len", str(max(max_len, cfg.max_new_tokens + 64)), "--no-dynamic_sampling",
            "--overlong_buffer", "0", "--reward_workers", "1", "--lr", "1e-4"]
    args += ["--micro_batch_tokens", str(cfg.micro_batch_tokens)] if cfg.micro_batch_tokens else ["--micro_batch", "64"]
    if cfg.compile is not None:
        args.append("--compile" if cfg.compile else "--no-compile")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    results = {}
    keys = ("t_step", "t_rollout", "t_logprob", "t_update", "tokens_per_s", "packed", "peak_mem_mb", "mfu")
    for n in map(int, cfg.nproc.split(",")):
        run = out / f"nproc{n}"
        subprocess.run(["rm", "-rf", str(run)], check=True)
        head = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                f"--nproc_per_node={n}"]
        print(f"bench: {n} process(es), {cfg.steps} GRPO steps, {cfg.size} model ...", flush=True)
        subprocess.run([*head, str(Path(__file__).with_name("train_rl.py")), *args, "--out", str(run)], check=True,
                       env=env, stdout=subprocess.DEVNULL)
        metrics = cli.read_jsonl(run / "metrics.jsonl")[1:]  # the first step warms up
        med = lambda k: sorted(m.get(k, float("nan")) for m in metrics)[len(metrics) // 2]
        results[n] = {k: med(k) for k in keys}
    print(f"{'processes':>10s}{'step s':>10s}{'rollout':>10s}{'logprob':>10s}{'update':>10s}{'tokens/s':>10s}"
          f"{'packed':>10s}{'peak MB':>10s}{'MFU':>8s}")
    for n, r in results.items():
        print(f"{n:>10d}{r['t_step']:>10.3f}{r['t_rollout']:>10.3f}{r['t_logprob']:>10.3f}{r['t_update']:>10.3f}"
              f"{r['tokens_per_s']:>10.0f}{r['packed']:>10.2f}{r['peak_mem_mb']:>10.0f}{r['mfu']:>8.1%}")
    print(f"(medians over steps 2..{cfg.steps}; 8 prompts x 8 samples of up to {cfg.max_new_tokens} tokens per step; "
          f"tokens/s = generated tokens per second of step time; packed = token positions the update ran / "
          f"prompt + response tokens of its sequences (each prompt once for its samples, no padding); MFU of the "
          f"update, CUDA only)")


# -----------------------------------------------------------------------------------------------------------------
# trl: whole GRPO steps of train_rl.py vs TRL's GRPOTrainer (HF generate, no vLLM) on the same tiny Qwen2 and prompts


@dataclass
class TrlBench:
    steps: int = arg(6, "GRPO steps per run; the first is warm-up, the medians are over steps 2..steps")
    repeats: int = arg(2, "runs of each engine, alternated (TRL, ours, TRL, ours, ...); the best median is reported")
    out: str = arg("runs/bench_trl", "directory of the checkpoint, tokenizer, prompts and each run")
    compile: bool | None = arg(None, "passed to train_rl.py as --compile / --no-compile; unset: its default")
    engine: str = arg("both", "both (the comparison), or one run of trl / ours (what `both` launches)",
                      ("both", "trl", "ours"))


TRL_MODEL = dict(vocab_size=1000, hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=512, rope_theta=1e4)
TRL_SHAPES = dict(prompts=8, group=8, new_tokens=64, rows=48, words=16)


def trl_task(out: Path) -> Path:
    """The user's setup: a byte-level BPE of 1000 tokens (tokenizers' trainer) with the ChatML specials, a random
    1.1M-parameter Qwen2 (tied) saved by transformers, 48 prompts of 16 random words as TRL conversations and as
    train_rl.py rows. Cached in `out`."""
    ckpt = out / "qwen2-tiny"
    if (ckpt / "model.safetensors").is_file() and (out / "rows.jsonl").is_file():
        return ckpt
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 7))) for _ in range(300)]
    corpus = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(2000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=TRL_MODEL["vocab_size"], special_tokens=special,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    ckpt.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(Qwen2Config(**TRL_MODEL, bos_token_id=None, eos_token_id=tok.token_to_id("<|im_end|>"),
                                      pad_token_id=tok.token_to_id("<|endoftext|>")))
    hf.save_pretrained(ckpt)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fast.save_pretrained(ckpt)  # tokenizer.json (what train_rl.py reads) + the HF files TRL reads
    questions = [" ".join(rng.choice(words) for _ in range(TRL_SHAPES["words"])) for _ in range(TRL_SHAPES["rows"])]
    rows = [dict(id=f"q{i}", question=q, answer="0", answer_type="numeric") for i, q in enumerate(questions)]
    (out / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ckpt


def _trl_run(cfg: TrlBench, ckpt: Path, run: Path) -> dict:
    """One TRL run in this process (1 thread): per-step wall time and the time inside model.generate."""
    torch.set_num_threads(1)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    rows = cli.read_jsonl(Path(cfg.out) / "rows.jsonl")
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["question"]}]} for r in rows])
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=precision(torch.device("cpu")).param_dtype)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    S = TRL_SHAPES
    n = S["prompts"] * S["group"]
    args = GRPOConfig(output_dir=str(run), use_cpu=True, use_vllm=False, beta=0.0, num_generations=S["group"],
                      per_device_train_batch_size=n, generation_batch_size=n, gradient_accumulation_steps=1,
                      num_iterations=1, max_completion_length=S["new_tokens"],
                      generation_kwargs={"min_new_tokens": S["new_tokens"]}, gradient_checkpointing=False,
                      max_steps=cfg.steps, logging_steps=1, save_strategy="no", report_to="none",
                      dataloader_num_workers=0, seed=0,
                      bf16=False)  # fp32 like ours: TRL's default bf16 autocast is emulated, and many times
#                                    slower, on a CPU without bf16 instructions (README: the figures)
    reward = lambda completions, **kw: [float(len(c[0]["content"]) % 5) for c in completions]
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tokenizer)
    times = dict(step=[], generate=[], tokens=[])
    generate = model.generate
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def timed_generate(*a, **kw):
        t = time.perf_counter()
        out = generate(*a, **kw)
        times["generate"].append(time.perf_counter() - t)
        completion = out[:, kw["input_ids"].shape[1]:]
        ends = (completion == eos).int()
        lengths = torch.where(ends.any(1), ends.argmax(1) + 1, completion.shape[1])
        times["tokens"].append(int(lengths.sum()))
        return out

    model.generate = timed_generate

    class Clock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.t = time.perf_counter()

        def on_step_end(self, *_, **__):
            times["step"].append(time.perf_counter() - self.t)

    trainer.add_callback(Clock())
    trainer.train()
    return times


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def bench_trl(cfg: TrlBench) -> None:
    """TRL and train_rl.py alternately on the same checkpoint, prompts and shapes (8 prompts x 8 samples x 64 new
    tokens, one update per rollout, fp32, 1 thread each); medians over steps 2..steps, the best run of each."""
    out = Path(cfg.out)
    if cfg.engine == "trl":
        print("TRL_TIMES " + json.dumps(_trl_run(cfg, out / "qwen2-tiny", out / "trl")), flush=True)
        return
    try:
        import trl  # noqa: F401 - the reference engine: a test-only dependency
    except ImportError:
        print("bench trl: skipped, TRL is not installed (pip install trl==1.16.0)")
        return
    ckpt = trl_task(out)
    S = TRL_SHAPES
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env |= dict(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    ours_args = ["--init_from", str(ckpt), "--data", str(out / "rows.jsonl"), "--stage", "grpo",
                 "--steps", str(cfg.steps), "--prompts_per_step", str(S["prompts"]), "--group_size", str(S["group"]),
                 "--max_new_tokens", str(S["new_tokens"]), "--max_len", "128", "--no-dynamic_sampling",
                 "--micro_batch", str(S["prompts"] * S["group"]), "--threads", "1", "--overlong_buffer", "0",
                 "--reward_workers", "1", "--lr", "1e-5", "--train", "llm"]  # text-only: all of it, as TRL does
    if cfg.compile is not None:
        ours_args.append("--compile" if cfg.compile else "--no-compile")
    trl_runs, our_runs = [], []
    for r in range(cfg.repeats):  # alternated: a burst of outside load hits both engines alike
        print(f"bench trl: run {r + 1}/{cfg.repeats}: TRL ...", flush=True)
        p = subprocess.run([sys.executable, __file__, "trl", "--engine", "trl", "--out", str(out),
                            "--steps", str(cfg.steps)], env=env, capture_output=True, text=True)
        line = next((x for x in p.stdout.splitlines() if x.startswith("TRL_TIMES ")), None)
        if p.returncode or line is None:
            raise RuntimeError(f"the TRL run failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
        t = json.loads(line.split(" ", 1)[1])
        skip = lambda xs: xs[1:]  # the first step warms up
        trl_runs.append(dict(step=_median(skip(t["step"])), rollout=_median(skip(t["generate"])),
                             tokens=_median(skip(t["tokens"]))))
        print(f"bench trl: run {r + 1}/{cfg.repeats}: ours ...", flush=True)
        run = out / "ours"
        subprocess.run(["rm", "-rf", str(run)], check=True)
        trainer = str(Path(__file__).with_name("train_rl.py"))
        p = subprocess.run([sys.executable, trainer, *ours_args, "--out", str(run)],
                           env=env, capture_output=True, text=True)
        if p.returncode:
            raise RuntimeError(f"train_rl.py failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
        m = cli.read_jsonl(run / "metrics.jsonl")[1:]
        med = lambda k: _median([x[k] for x in m])
        our_runs.append(dict(step=med("t_step"), rollout=med("t_generate"), phase=med("t_rollout"),
                             update=med("t_update"), tokens=med("rollout_tokens"), packed=med("packed")))
    best = lambda runs: min(runs, key=lambda x: x["step"] / x["tokens"])
    a, b = best(trl_runs), best(our_runs)
    print(f"device: CPU, 1 thread and 1 process per engine, torch {torch.__version__}, trl {trl.__version__}; "
          f"Qwen2 {TRL_MODEL['hidden_size']}d x {TRL_MODEL['num_hidden_layers']} layers, vocab "
          f"{TRL_MODEL['vocab_size']}; {S['prompts']} prompts x {S['group']} samples x {S['new_tokens']} new tokens; "
          f"medians over steps 2..{cfg.steps}, best of {cfg.repeats} runs")
    print(f"{'engine':>8s}{'step s':>9s}{'generate':>9s}{'update':>9s}{'tokens':>8s}{'step tok/s':>12s}"
          f"{'gen tok/s':>11s}")
    print(f"{'TRL':>8s}{a['step']:>9.3f}{a['rollout']:>9.3f}{a['step'] - a['rollout']:>9.3f}{a['tokens']:>8.0f}"
          f"{a['tokens'] / a['step']:>12.0f}{a['tokens'] / a['rollout']:>11.0f}")
    print(f"{'ours':>8s}{b['step']:>9.3f}{b['rollout']:>9.3f}{b['update']:>9.3f}{b['tokens']:>8.0f}"
          f"{b['tokens'] / b['step']:>12.0f}{b['tokens'] / b['rollout']:>11.0f}")
    step_ratio = b["tokens"] / b["step"] / (a["tokens"] / a["step"])
    print(f"ratios (ours / TRL, tokens per second): whole step {step_ratio:.2f}x"
          f", generate {b['tokens'] / b['rollout'] / (a['tokens'] / a['rollout']):.2f}x (our whole rollout phase, "
          f"reward included: {b['tokens'] / b['phase'] / (a['tokens'] / a['rollout']):.2f}x), update "
          f"{(a['step'] - a['rollout']) / b['update']:.2f}x; our packed fraction {b['packed']:.2f}")
    for name, runs in (("TRL", trl_runs), ("ours", our_runs)):
        print(f"  every {name} run (step s): " + ", ".join(f"{x['step']:.3f}" for x in runs))


# -----------------------------------------------------------------------------------------------------------------
# Command line


COMMANDS = {  # name: (config, function, help)
    "entropy": (EntropyBench, bench_entropy, "fused log-prob + entropy vs the full-logits reference"),
    "rollout": (RolloutBench, bench_rollout, "the sampler vs transformers' generate on a random Qwen2 model"),
    "reward": (RewardBench, bench_reward, "responses/s, serial and with score_batch's process pool"),
    "train": (TrainBench, bench_train, "GRPO steps of the tiny grid task, 1 vs 2 processes"),
    "trl": (TrlBench, bench_trl, "whole GRPO steps and rollout vs TRL's GRPOTrainer on a tiny Qwen2"),
}


def main(argv: list[str] | None = None) -> None:
    p = cli.parser(__doc__.split("\n\n")[0])
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (config, _, help) in COMMANDS.items():
        cli.add_flags(commands.add_parser(name, help=help, description=help, formatter_class=p.formatter_class),
                      config)
    args = p.parse_args(argv)
    config, run, _ = COMMANDS[args.command]
    cfg = cli.config_from(args, config)
    print(f"bench.py {args.command} {dataclasses.asdict(cfg)}")
    run(cfg)


if __name__ == "__main__":
    main()
