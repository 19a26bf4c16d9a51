"""--rollout_tp: the rollout copy split across the ranks of a tensor-parallel group (parallel.py). Two CPU processes
(torchrun, gloo) with --rollout_tp 2 against one process without it: the same greedy and sampled tokens and
log-probs on an image prompt, the copy equal to its slices of the trained weights after every refresh, and one GRPO
step ending with the same parameters as without tensor parallelism; bad values refused at the door. Every torchrun
run of the module goes in one 2-process and one 4-process launch of tests/tp_driver.py (`launched`)."""
import json
import shutil
from pathlib import Path

import pytest
import torch

import checkpoint as C
import data as D
import eval as E
import model as M
import parallel as P
import trainer as TR
from conftest import finish, image_prompt, in_this_process, start
from grid_task import GridTaskConfig, prepare
from rollout import Request, Sampler
from test_eval import ckpt, mmmu_dir, tok  # noqa: F401 - eval's tiny checkpoint and MMMU folder (and their tokenizer)

REPO = Path(__file__).resolve().parent.parent
DRIVER = REPO / "tests" / "tp_driver.py"
VARIANTS = ("qwen2", "qwen3_o_bias")
COMPILER = shutil.which("g++") or shutil.which("c++")  # inductor on CPU needs one
GRID = GridTaskConfig(n_train=16, n_heldout=4)


def torchrun(*launches: tuple[Path, int], timeout: int = 600):
    """`torchrun --standalone --nproc_per_node=NPROC tests/tp_driver.py JOBS.json` for each (JOBS.json, NPROC), all
    at once: each launch leaves cores idle (torchrun's start, one rank's saves, the teardowns) that the other fills.
    Each must exit 0."""
    finish(*[start([DRIVER, jobs], nproc) for jobs, nproc in launches], timeout=timeout)


def test_split_dims():
    names = dict(M.VLM(M.tiny_config(32, 5)).named_parameters())
    split = {k: P.tp_split_dim(k) for k in names if P.tp_split_dim(k) is not None}
    block = "language_model.layers.1."
    assert {k.removeprefix(block): v for k, v in split.items() if k.startswith(block)} == {
        "self_attn.q_proj.weight": 0, "self_attn.q_proj.bias": 0, "self_attn.k_proj.weight": 0,
        "self_attn.k_proj.bias": 0, "self_attn.v_proj.weight": 0, "self_attn.v_proj.bias": 0,
        "self_attn.o_proj.weight": 1, "mlp.gate_proj.weight": 0, "mlp.up_proj.weight": 0, "mlp.down_proj.weight": 1}
    assert len(split) == 2 * 10  # nothing outside the LLM's blocks splits (ViT, connector, embeddings, head)
    local = P.tp_config(M.tiny_config(32, 5), 2).llm
    assert (local.num_attention_heads, local.num_key_value_heads, local.intermediate_size, local.head_dim) == \
        (2, 1, 64, 16)


@pytest.mark.parametrize("size, world, local, match", [
    (3, 6, 6, "--rollout_tp 3 must divide the 4 attention heads"),
    (2, 3, 3, "--rollout_tp 2 must divide the 3 processes"),
    (4, 8, 2, "--rollout_tp 4 must divide the 2 processes per node"),
    (4, 4, 4, "--rollout_tp 4 must divide the 2 key/value heads"),
    (0, 4, 4, "--rollout_tp must be >= 1, got 0")])
def test_bad_sizes_are_refused_in_one_line(size, world, local, match):
    with pytest.raises(P.UsageError, match=match) as e:
        P.check_tp(size, world, local, M.tiny_config(32, 5))
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def vlms(tmp_path_factory, tok) -> dict[str, Path]:
    """Tiny random VLM checkpoints with a ViT (native layout): Qwen2's attention, and Qwen3's with qk-norm and an
    o_proj bias (the row-parallel bias held by one rank)."""
    paths = {}
    for name in VARIANTS:
        path = paths[name] = tmp_path_factory.mktemp(name)
        config = M.tiny_config(tok.get_vocab_size(), tok.token_to_id(C.IMG_CONTEXT))
        if name == "qwen3_o_bias":
            config.llm = M.LLMConfig(**{**{k: getattr(config.llm, k) for k in ("vocab_size", "hidden_size",
                                        "intermediate_size", "num_hidden_layers", "rope_theta")},
                                        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                                        "qkv_bias": True, "o_bias": True, "qk_norm": True})
        model = M.VLM.from_config(config, seed=7)
        # init_weights leaves biases at 0 and norms at 1: perturb them, so that a lost one shows
        with torch.no_grad():
            g = torch.Generator().manual_seed(8)
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        C.save_model(model, path, layout="native")
        tok.save(str(path / "tokenizer.json"))
    return paths


def generate_job(vlm: Path, tok, out: Path, compile: bool = False) -> list[str]:
    """The driver's generate job for `vlm`: image and text prompts (OUT/requests.pt), completions to OUT."""
    config = C.read_config(vlm)
    ids, pixels = image_prompt(tok, config)
    text = D.build_prompt(tok, config, "how many squares")[0]
    rows = [(ids[0].tolist(), pixels, 11), (text, None, 12), (ids[0].tolist(), pixels, 13), (text, None, 14),
            (text[:-2], None, 15)]
    out.mkdir(parents=True)
    torch.save(rows, out / "requests.pt")
    return ["generate", str(vlm), str(out / "requests.pt"), str(out), *(["compile"] if compile else [])]


def grpo_args(task) -> list[str]:
    """One GRPO step (temperature 1.5 rollouts) and a held-out evaluation, with and without --rollout_tp alike."""
    return ["--init_from", str(task.init_checkpoint), "--data", str(task.train_jsonl), "--eval_data",
            str(task.heldout_jsonl), "--eval_samples", "2", "--max_len", "96", "--max_new_tokens", "40", "--threads",
            "1", "--seed", "3", "--stage", "grpo", "--steps", "1", "--prompts_per_step", "4", "--group_size", "4",
            "--micro_batch", "4", "--lr", "1e-3", "--no-dynamic_sampling", "--temperature", "1.5"]


def eval_args(ckpt: Path, mmmu_dir: Path) -> tuple[list[str], list[str]]:
    """eval.py's benchmark (without --out) and --question arguments, for torchrun and one process alike."""
    benchmark = ["--ckpt", str(ckpt), "--data", str(mmmu_dir), "--samples", "2", "--max_new_tokens", "6",
                 "--max_len", "256", "--chunk", "2", "--no-progress"]
    return benchmark, ["--ckpt", str(ckpt), "--question", "how many squares", "--samples", "2", "--max_new_tokens",
                       "6"]


@pytest.fixture(scope="module")
def launched(vlms, tok, ckpt, mmmu_dir, tmp_path_factory) -> Path:
    """Every torchrun run of the tests below, in two launches of the driver started together, each job as a launch
    of its own would run it (one start-up of torch per launch for all its jobs). On 2 ranks: both checkpoints'
    completions (OUT/VARIANT) and Qwen2's with the compiled decode step where a C++ compiler exists
    (OUT/qwen2_compiled); the GRPO step without and with --rollout_tp 2 (OUT/plain, OUT/tp, the task in OUT/grid);
    eval.py's benchmark (OUT/eval.json) and --question (its stdout OUT/question.rank0.txt) with --rollout_tp 2. On
    4 ranks: Qwen2's completions (OUT/qwen2_4ranks). Returns OUT."""
    root = tmp_path_factory.mktemp("launched")
    two = {f"generate_{name}": generate_job(vlms[name], tok, root / name) for name in VARIANTS}
    if COMPILER:
        two["generate_compiled"] = generate_job(vlms["qwen2"], tok, root / "qwen2_compiled", compile=True)
    args = grpo_args(prepare(root / "grid", GRID))
    two |= {"plain": ["train_rl.py", *args, "--out", str(root / "plain")],
            "tp": ["train", *args, "--out", str(root / "tp"), "--rollout_tp", "2"]}
    benchmark, question = eval_args(ckpt, mmmu_dir)
    two |= {"eval": ["eval.py", *benchmark, "--out", str(root / "eval.json"), "--rollout_tp", "2"],
            "question": ["eval.py", *question, "--rollout_tp", "2"]}
    four = {"generate_4ranks": generate_job(vlms["qwen2"], tok, root / "qwen2_4ranks")}
    for name, jobs in (("jobs2.json", two), ("jobs4.json", four)):
        (root / name).write_text(json.dumps(jobs))
    torchrun((root / "jobs2.json", 2), (root / "jobs4.json", 4))
    return root


def against_one_process(vlm: Path, out: Path, nproc: int, settings=(("greedy", 0.0), ("sampled", 1.0))
                        ) -> tuple[Sampler, list[Request]]:
    """The driver's completions in OUT from `nproc` ranks with --rollout_tp 2 against one process's, with the plain
    copy, of OUT/requests.pt, for each (name, temperature) of `settings` (the driver's)."""
    ref = C.load_model(vlm)
    got = [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]
    assert all(g["copy_matches"] and g["gathered_ok"] for g in got) and got[0]["local_heads"] == 2
    sampler = Sampler(ref, max_slots=8, max_len=64, stop_ids=[0])
    requests = [Request(i, px, seed=s) for i, px, s in torch.load(out / "requests.pt")]
    for name, temperature in settings:
        want = sampler.generate(requests, num_samples=2, max_new_tokens=12, temperature=temperature)
        for r in range(nproc):
            mine = want[r::nproc]
            assert len(got[r][name]) == len(mine)
            for group, ref_group in zip(got[r][name], mine):
                for (tokens, logprobs), c in zip(group, ref_group):
                    assert tokens == c.ids
                    assert max(abs(a - b) for a, b in zip(logprobs, c.logprobs)) <= 1e-5
    return sampler, requests


@pytest.mark.parametrize("name", VARIANTS)
def test_tp2_generates_what_one_process_does(name, vlms, launched, one_thread):
    """Greedy and temperature-1 completions (tokens exactly, log-probs within 1e-5) of image and text prompts, each
    rank keeping its own share; the copy equals its slices of the trained weights and gathers back to all of them."""
    sampler, requests = against_one_process(vlms[name], launched / name, nproc=2)
    sampled = [c.ids for group in sampler.generate(requests, num_samples=2, max_new_tokens=12, temperature=1.0)
               for c in group]
    assert len({tuple(s) for s in sampled}) > 1  # the sampled check is not a greedy one in disguise


@pytest.mark.skipif(COMPILER is None, reason="inductor on CPU needs a C++ compiler")
def test_tp2_compiled_decode_step_generates_what_one_process_does(vlms, launched, one_thread):
    """The decode step compiled with the all-reduce hooks in its graph (functional collectives trace), sampled."""
    against_one_process(vlms["qwen2"], launched / "qwen2_compiled", nproc=2, settings=(("sampled", 1.0),))


def test_two_groups_of_two_generate_what_one_process_does(vlms, launched, one_thread):
    """4 processes, 2 tensor-parallel groups: each group generates its own ranks' requests."""
    against_one_process(vlms["qwen2"], launched / "qwen2_4ranks", nproc=4)


def test_grpo_step_with_tp2_matches_without(launched):
    """One GRPO step (temperature 1.5 rollouts) and a held-out evaluation, on 2 processes with and without
    --rollout_tp 2: the same rollouts, rewards and evaluation, the same parameters after the step (the checkpoint is
    saved from the gathered copy), and the split copy equal to its slices of the trained weights after every
    refresh."""
    checks = [json.loads((launched / "tp" / f"refresh_rank{r}.json").read_text()) for r in range(2)]
    assert all(len(c) == 2 and all(c) for c in checks), checks  # after loading and after the step
    read = lambda run, name: json.loads((launched / run / name).read_text().splitlines()[0])
    plain, split = read("plain", "metrics.jsonl"), read("tp", "metrics.jsonl")
    for key in ("rollout_tokens", "response_len_max", "reward", "accuracy"):
        assert plain[key] == split[key], key
    assert plain["loss"] == pytest.approx(split["loss"], rel=1e-5, abs=1e-7)
    evals = [read(run, "eval.jsonl") for run in ("plain", "tp")]
    for key in ("greedy_accuracy", "sampled_accuracy", "response_length"):
        assert evals[0][key] == evals[1][key], key
    for saved in ("step_000001/model", "best"):
        a, b = (C.load_model(launched / run / saved).state_dict() for run in ("plain", "tp"))
        assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    init = C.load_model(prepare(launched / "grid", GRID).init_checkpoint).state_dict()
    assert max((a[k] - init[k]).abs().max().item() for k in a) > 1e-4  # the step moved the weights


def test_eval_with_tp2_matches_one_process(mmmu_dir, ckpt, launched, tmp_path, capsys, in_process, one_thread):
    """eval.py on 2 processes holding one copy split between them: the same records as one process without tensor
    parallelism (entropies within float rounding), and the same answers to --question. The one process is this
    one."""
    benchmark, question = eval_args(ckpt, mmmu_dir)
    in_this_process(E.main, [*benchmark, "--out", tmp_path / "one.json"])
    one, split = (json.loads(f.read_text()) for f in (tmp_path / "one.json", launched / "eval.json"))
    assert len(one["records"]) == len(split["records"]) == 15 and any(r["entropy"] for r in one["records"])
    for a, b in zip(one["records"], split["records"]):
        ea, eb = a.pop("entropy"), b.pop("entropy")
        assert a == b
        assert (ea is None) == (eb is None)  # the sampled responses carry entropies, the greedy ones none
        assert ea is None or ea.keys() == eb.keys() and all(ea[k] == pytest.approx(eb[k], rel=1e-5, abs=1e-6)
                                                            for k in ea)
    capsys.readouterr()  # the benchmark's table
    in_this_process(E.main, question)
    answers = lambda out: [line for line in out.splitlines() if not line.startswith("[")]
    assert answers(capsys.readouterr().out) == answers((launched / "question.rank0.txt").read_text()) != []


def test_sizes_that_cannot_split_are_refused_at_the_door(ckpt, tmp_path):
    """One line, exit 2, before anything is loaded or OUT is made: train_rl.py and eval.py alike."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps(dict(id="a", question="how many", answer="1")) + "\n")
    # Both scripts at once: each is one process (one core) starting torch before it refuses.
    train, ev = finish(start(["train_rl.py", "--init_from", ckpt, "--data", rows, "--out", tmp_path / "out",
                              "--rollout_tp", "2"]),
                       start(["eval.py", "--ckpt", ckpt, "--data", rows, "--out", tmp_path / "e.json",
                              "--rollout_tp", "3"]), check=False)
    assert (train.returncode, train.stderr) == (2, "train_rl.py: error: --rollout_tp 2 must divide the 1 processes\n")
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
    assert (ev.returncode, ev.stderr) == (2, "eval.py: error: --rollout_tp 3 must divide the 1 processes\n")
    with pytest.raises(P.UsageError, match="--rollout_tp must be >= 1, got 0"):
        TR.TrainConfig(rollout_tp=0)
