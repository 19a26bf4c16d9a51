"""Nothing silently wrong: flags out of range refused at the door naming the flag and value, errors as one line (exit
2 for a bad flag, 1 otherwise; under torchrun too), non-finite weights never saved, runs that cannot learn refused
before step 0, resumes with changed settings applied or refused, eval's late checks made early, a tokenizer too big
for the embedding refused. Every refusal is checked to come before the model is built (a patched build_sharded /
load_model that fails the test) or before any step (no metrics.jsonl)."""
import dataclasses
import json
import math
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

import checkpoint as C
import cli
import data as D
import eval as E
import model as M
import train_rl as T
import trainer as TR
from conftest import finish, start
from test_train import bandit_task

REPO = Path(__file__).resolve().parent.parent


def no_model(monkeypatch):
    """build_sharded and load_model fail the test if anything gets that far."""
    def never(*args, **kw):
        raise AssertionError("the model was built before the error")
    monkeypatch.setattr(TR, "build_sharded", never)
    monkeypatch.setattr(E, "load_model", never)


def bandit_cfg(init, rows, out, **kw) -> T.TrainConfig:
    return T.TrainConfig(**dict(init_from=str(init), data=str(rows), out=str(out), steps=2, prompts_per_step=4,
                                group_size=4, micro_batch=16, max_new_tokens=1, max_len=32, format_weight=0.0,
                                overlong_buffer=0, threads=1, dynamic_sampling=False, lr=1e-3) | kw)

# ---------------------------------------------------------------------------------------------------------------
# 1. Flags out of range


@pytest.mark.parametrize("flags, message", [
    (dict(lr=math.inf), "--lr must be finite and > 0, got inf"),
    (dict(lr=math.nan), "--lr must be finite and > 0, got nan"),
    (dict(lr=0.0), "--lr must be finite and > 0, got 0.0"),
    (dict(temperature=math.nan), "--temperature must be finite and > 0"),
    (dict(temperature=0.0), "--temperature must be finite and > 0"),
    (dict(clip_low=1.5), r"--clip_low must be in \[0, 1\), got 1.5"),
    (dict(clip_high=-0.1), "--clip_high must be finite and >= 0, got -0.1"),
    (dict(dual_clip=-1.0), "--dual_clip must be finite and >= 0"),
    (dict(kl_beta=-1.0), "--kl_beta must be finite and >= 0"),
    (dict(entropy_coef=-1.0), "--entropy_coef must be finite and >= 0"),
    (dict(tis_cap=-1.0), "--tis_cap must be finite and >= 0"),
    (dict(weight_decay=-1.0), "--weight_decay must be finite and >= 0"),
    (dict(grad_clip=math.nan), "--grad_clip must be finite and >= 0, got nan"),
    (dict(min_lr_ratio=1.5), r"--min_lr_ratio must be in \[0, 1\], got 1.5"),
    (dict(warmup_steps=-1), "--warmup_steps must be >= 0, got -1"),
    (dict(group_size=1), "--group_size must be >= 2 for --stage grpo"),
    (dict(max_new_tokens=4096, max_len=4096), "--max_new_tokens 4096 must be < --max_len 4096"),
    (dict(eval_samples=-1), "--eval_samples must be >= 0, got -1"),
    (dict(eval_limit=-1), "--eval_limit must be >= 0, got -1"),
    (dict(save_every=-1), "--save_every must be >= 0, got -1"),
    (dict(eval_every=-2), "--eval_every must be >= 0, got -2"),
    (dict(keep=-1), "--keep must be >= 0, got -1"),
    (dict(threads=-1), "--threads must be >= 0, got -1"),
    (dict(reward_workers=-1), "--reward_workers must be >= 0, got -1"),
    (dict(max_tiles=0), "--max_tiles must be >= 1"),
    (dict(train="vit,nope"), "--train must be a comma list"),
    (dict(steps=0), "--steps must be >= 1, got 0"),
])
def test_train_flags_out_of_range_name_the_flag(flags, message):
    with pytest.raises(cli.UsageError, match=message):
        T.TrainConfig(**flags)


def test_sft_needs_no_room_for_samples_and_grpo_group_of_two_is_fine():
    T.TrainConfig(stage="sft", group_size=1, max_new_tokens=1024, max_len=96)  # SFT alone never samples
    T.TrainConfig(group_size=2)


@pytest.mark.parametrize("flags, message", [
    (dict(max_tiles=0), "--max_tiles must be >= 1"),
    (dict(samples=-1), "--samples must be >= 0, got -1"),
    (dict(samples=2, temperature=0.0), "--temperature must be finite and > 0"),
    (dict(temperature=math.nan), "--temperature must be finite"),
    (dict(top_p=0.0), r"--top_p must be in \(0, 1\]"),
    (dict(chunk=0), "--chunk must be an integer >= 1, got 0"),
    (dict(greedy=False), "--no-greedy needs --samples >= 1"),
])
def test_eval_flags_out_of_range_name_the_flag(flags, message):
    with pytest.raises(cli.UsageError, match=message):
        E.EvalConfig(**flags)
    with pytest.raises(cli.UsageError, match="--limit must be >= 1"):
        E.EvalCommand(limit=-1)

# ---------------------------------------------------------------------------------------------------------------
# 2. One line, the right exit code, under python and torchrun


def test_errors_at_the_door_are_one_line(tmp_path):
    init, rows = bandit_task(tmp_path)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": 1, "question": "q", "answer": "5"}\n{not json\n')

    def train(out: str, *args: str, nproc: int = 1) -> subprocess.Popen:
        return start([str(REPO / "train_rl.py"), "--init_from", str(init), "--out", str(tmp_path / out), "--threads",
                      "1", *args], nproc)

    # Independent runs, started at once. Each has an OUT of its own: the bad rows' run locks (makes) its OUT, the
    # missing file's is refused before it makes one.
    two, typo, bad, parse, rows_error = finish(
        train("two", "--data", "nowhere.jsonl", nproc=2), train("typo", "--data", "nowhere.jsonl"),
        train("bad", "--data", str(rows), "--lr", "inf"), train("parse", "--data", str(rows), "--lr", "fast"),
        train("rows", "--data", str(broken)), check=False)
    assert (typo.returncode, typo.stdout, typo.stderr) == (
        1, "", "train_rl.py: error: --data: data file not found: nowhere.jsonl\n")
    assert not (tmp_path / "typo").exists()  # refused before OUT is even locked
    assert (bad.returncode, bad.stderr) == (2, "train_rl.py: error: --lr must be finite and > 0, got inf\n")
    assert parse.returncode == 2 and parse.stderr.splitlines() == [
        "train_rl.py: error: argument --lr: invalid float value: 'fast' (see --help)"]
    assert rows_error.returncode == 1 and "Traceback" not in rows_error.stderr
    assert rows_error.stderr.startswith(f"train_rl.py: error: {broken}: 1 bad row(s) of 2:\n{broken}:2: malformed "
                                        f"JSON")
    out = tmp_path / "rows"
    assert not (out / "metrics.jsonl").exists() and not list(out.glob("step_*"))

    text = two.stdout + two.stderr
    ours = [x for x in text.splitlines() if x.startswith("train_rl.py: error:")]
    assert two.returncode != 0 and ours == ["train_rl.py: error: --data: data file not found: nowhere.jsonl"], text
    assert 'train_rl.py", line' not in text  # no worker traceback; torchrun's summary names the cause instead
    root = text[text.index("Root Cause"):]
    assert "traceback : train_rl.py: error: --data: data file not found: nowhere.jsonl" in root, text
    assert text.count("traceback : train_rl.py: error:") == 1 and "<NO_OTHER_FAILURES>" in text, text  # once
    assert "<N/A>" not in text and len(text.splitlines()) <= 40, text  # ours, then torchrun's report


@pytest.mark.filterwarnings("ignore:Unable to enable fault handler")  # @record's, under pytest's captured stderr
def test_cli_run_exit_codes_and_unexpected_errors_keep_their_traceback(capsys, monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    for error, code in ((cli.UsageError("--x must be > 0, got 0"), 2), (FileNotFoundError("data file not found: f"), 1),
                        (cli.InputError("f:3: bad"), 1), (T.Terminated("stopped by SIGTERM"), 143)):
        def main(argv, error=error):
            raise error
        with pytest.raises(SystemExit) as e:
            cli.run(main, "prog")
        assert e.value.code == code and capsys.readouterr().err == f"prog: error: {error}\n"

    def buggy(argv):
        raise KeyError("a bug")
    with pytest.raises(KeyError, match="a bug"):  # not expected: up with its traceback
        cli.run(buggy, "prog")


def test_eval_errors_are_one_line(tmp_path):
    init, rows = bandit_task(tmp_path)
    missing, bad = finish(start([str(REPO / "eval.py"), "--ckpt", str(init), "--data", str(tmp_path / "nowhere.jsonl"),
                                 "--out", str(tmp_path / "r.json")]),
                          start([str(REPO / "eval.py"), "--ckpt", str(init), "--data", str(rows), "--samples", "-1"]),
                          check=False)
    assert (missing.returncode, missing.stderr) == (1, f"eval.py: error: data file not found: "
                                                       f"{tmp_path / 'nowhere.jsonl'}\n")
    assert (bad.returncode, bad.stderr) == (2, "eval.py: error: --samples must be >= 0, got -1\n")

# ---------------------------------------------------------------------------------------------------------------
# 3. Nothing non-finite is ever saved


def test_non_finite_weights_stop_the_run_and_are_never_saved(tmp_path, in_process, monkeypatch):
    init, rows = bandit_task(tmp_path)
    calls, original = [0], torch.optim.AdamW.step

    def poisoning_step(self, *args, **kw):
        result = original(self, *args, **kw)
        calls[0] += 1
        if calls[0] == 4:  # step 3 (the first call is setup's, giving AdamW its state): one weight becomes NaN
            p = self.param_groups[0]["params"][0]
            with torch.no_grad():
                (p.to_local() if isinstance(p, DTensor) else p).view(-1)[0] = math.nan
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoning_step)
    out = tmp_path / "out"
    with pytest.raises(T.NonFinite, match=r"step 3: the optimizer step left non-finite weights .* nothing of it was "
                                          r"saved\. Resume from the last checkpoint \(.*step_000002\) with a lower "
                                          r"--lr"):
        T.train(bandit_cfg(init, rows, out, steps=6, save_every=1))
    saved = sorted(p.name for p in out.glob("step_*"))
    assert saved == ["step_000001", "step_000002"] and (out / "latest").read_text() == "step_000002"
    for step in saved:
        weights = load_file(out / step / "model" / "model.safetensors")
        assert all(torch.isfinite(w).all() for w in weights.values()), step

# ---------------------------------------------------------------------------------------------------------------
# 4. A run that cannot learn is refused before step 0


def write_rows(path: Path, questions: list[str], image: str | None = "im.png") -> Path:
    rows = [dict(id=f"r{i}", question=q, answer="5", answer_type="numeric", **({"image": image} if image else {}))
            for i, q in enumerate(questions)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_no_row_fits_is_refused_naming_counts_and_rows(tmp_path, in_process, monkeypatch):
    init, _ = bandit_task(tmp_path)
    no_model(monkeypatch)
    rows = write_rows(tmp_path / "long.jsonl", ["pick ? " * 20] * 3)
    with pytest.raises(cli.InputError, match=r"long.jsonl: none of its 3 rows can train: 3 do not fit --max_len 32 "
                                             r"\(prompt \+ 1 token\), 0 cannot be encoded; first: id 'r0' needs \d+ "
                                             r"tokens"):
        T.train(bandit_cfg(init, rows, tmp_path / "out"))
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_some_rows_too_long_warn_once_and_a_step_with_none_left_stops(tmp_path, in_process, capsys):
    init, _ = bandit_task(tmp_path)
    rows = write_rows(tmp_path / "mixed.jsonl", ["pick ?"] + ["pick ? " * 20] * 7)
    with pytest.raises(T.Stopped, match=r"step \d+: every row drawn for it was skipped \(7 of 8 rows of .*mixed.jsonl "
                                        r"cannot train"):
        T.train(bandit_cfg(init, rows, tmp_path / "out", prompts_per_step=1, steps=16))
    printed = capsys.readouterr().out
    assert printed.count("warning:") == 1
    assert f"warning: {rows}: 7 of 8 rows cannot train and are skipped: 7 do not fit --max_len 32" in printed


def text_only_checkpoint(tmp_path: Path) -> Path:
    tok = D.word_tokenizer(["pick", "?", "\\boxed{5}"])
    config = M.VLMConfig(llm=M.tiny_config(tok.get_vocab_size()).llm, vision=None, layout="qwen2")
    C.save_model(M.VLM.from_config(config, seed=0), tmp_path / "text")
    tok.save(str(tmp_path / "text" / "tokenizer.json"))
    return tmp_path / "text"


def test_a_text_only_checkpoint_refuses_vision_modules_and_images(tmp_path, in_process, monkeypatch):
    init, rows = bandit_task(tmp_path)  # rows with an image
    text = text_only_checkpoint(tmp_path)
    no_model(monkeypatch)
    with pytest.raises(cli.UsageError, match=r"--train vit,llm: the checkpoint has no vision tower \(vit\)"):
        T.train(bandit_cfg(text, rows, tmp_path / "a", train="vit,llm"))
    with pytest.raises(cli.UsageError, match=r"no connector \(connector\)"):
        T.train(bandit_cfg(text, rows, tmp_path / "b", train="connector,llm"))
    with pytest.raises(cli.InputError, match=r"16 of 16 rows have an image but .*text has no vision tower"):
        T.train(bandit_cfg(text, rows, tmp_path / "c", train="llm"))


def test_max_tiles_below_the_checkpoints_minimum(tmp_path):
    init, _ = bandit_task(tmp_path)
    config = dataclasses.replace(C.read_config(init), min_dynamic_patch=2)
    cfg = T.TrainConfig(init_from=str(init), max_tiles=1)
    with pytest.raises(cli.UsageError, match="--max_tiles 1 is below the checkpoint's min_dynamic_patch 2"):
        TR.check_checkpoint(cfg, config, D.load_tokenizer(init))

# ---------------------------------------------------------------------------------------------------------------
# 5. Resume with changed settings


def test_resume_applies_a_new_lr_and_refuses_what_changes_the_run(tmp_path, in_process, monkeypatch, capsys):
    init, rows = bandit_task(tmp_path)
    out = tmp_path / "out"
    T.train(bandit_cfg(init, rows, out, steps=2, save_every=1, lr=1e-3))
    capsys.readouterr()
    T.train(bandit_cfg(init, rows, out, steps=3, lr=1e-2, resume=True))
    printed = capsys.readouterr().out
    assert "--resume: --lr 0.001 -> 0.01" in printed and "--resume: --steps 2 -> 3" in printed
    metrics = cli.read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3] and metrics[2]["lr"] == pytest.approx(1e-2)
    assert json.loads((out / "config.json").read_text())["lr"] == 1e-2  # the truth: this run's settings
    assert json.loads((out / "step_000003" / "config.json").read_text())["data_file"]["bytes"] == rows.stat().st_size

    built = []
    original = TR.build_sharded
    monkeypatch.setattr(TR, "build_sharded", lambda *a, **kw: built.append(1) or original(*a, **kw))
    with pytest.raises(cli.UsageError, match=r"--resume: --train differs from .*step_000003's \('connector,llm', "
                                             r"this run 'llm'\): the optimizer holds state"):
        T.train(bandit_cfg(init, rows, out, steps=4, train="llm", resume=True))
    with pytest.raises(cli.UsageError, match=r"--group_size differs"):
        T.train(bandit_cfg(init, rows, out, steps=4, group_size=2, resume=True))
    other = tmp_path / "other.jsonl"
    other.write_text(rows.read_text() + json.dumps(dict(id="extra", question="pick ?", answer="5",
                                                        image=str(tmp_path / "im.png"))) + "\n")
    with pytest.raises(cli.UsageError, match=r"--data differs .*pass --new_data"):
        T.train(bandit_cfg(init, other, out, steps=4, resume=True))
    edited = rows.read_text().splitlines()
    rows.write_text("\n".join(edited[:-1]) + "\n")  # the same path, other contents
    with pytest.raises(cli.UsageError, match=r"--data .*rows.jsonl holds other contents than when .*step_000003 was "
                                             r"saved"):
        T.train(bandit_cfg(init, rows, out, steps=4, resume=True))
    assert not built and [m["step"] for m in cli.read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]
    capsys.readouterr()
    T.train(bandit_cfg(init, other, out, steps=4, resume=True, new_data=True))
    assert "the prompt stream restarts at epoch 0 on the new --data" in capsys.readouterr().out
    assert [m["step"] for m in cli.read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4]


def test_rebase_schedule_sets_the_new_lr_at_the_restored_step():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=1e-3)
    old = T.TrainConfig(lr=1e-3, schedule="cosine", steps=10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, TR.lr_lambda(old))
    for _ in range(4):
        opt.step()
        sched.step()
    state = sched.state_dict()
    new = T.TrainConfig(lr=1e-2, schedule="cosine", steps=10, weight_decay=0.1)
    policy = TR.Policy(None, [], opt, torch.optim.lr_scheduler.LambdaLR(opt, TR.lr_lambda(new)), None, None)
    policy.scheduler.load_state_dict(state)
    TR.rebase_schedule(policy, new)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * TR.lr_lambda(new)(4))
    assert opt.param_groups[0]["weight_decay"] == 0.1
    opt.step()
    policy.scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * TR.lr_lambda(new)(5))

# ---------------------------------------------------------------------------------------------------------------
# 6. eval.py's late checks, made before the weights load


def test_eval_checks_out_and_columns_before_loading(tmp_path, monkeypatch):
    init, rows = bandit_task(tmp_path)
    no_model(monkeypatch)
    (tmp_path / "file").write_text("x")
    with pytest.raises(cli.UsageError, match=r"--out .*file/r.json: .*file is a file, not a folder"):
        E.main(["--ckpt", str(init), "--data", str(rows), "--out", str(tmp_path / "file" / "r.json")])
    with pytest.raises(cli.UsageError, match="is a directory"):
        E.main(["--ckpt", str(init), "--data", str(rows), "--out", str(tmp_path)])
    pq.write_table(pa.Table.from_pylist([dict(id="validation_Math_1", question="q", options="[]")]),
                   tmp_path / "noanswer.parquet")
    with pytest.raises(cli.InputError, match=r"noanswer.parquet: missing column\(s\) \['answer'\]"):
        E.main(["--ckpt", str(init), "--data", str(tmp_path / "noanswer.parquet"), "--out", str(tmp_path / "r.json")])
    (tmp_path / "fake.parquet").write_text('{"id": 1}\n')
    with pytest.raises(cli.InputError, match=r"fake.parquet: not a parquet file"):
        E.load_eval_rows(tmp_path / "fake.parquet")
    folder = tmp_path / "mmmu" / "Math"
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([dict(id="validation_Math_1", question="q", answer="A")]),
                   folder / "validation-00000-of-00001.parquet")
    with pytest.raises(FileNotFoundError, match=r"no parquet files for split 'test' in .*mmmu \(it has splits "
                                                r"\['validation'\]\)"):
        E.load_eval_rows(tmp_path / "mmmu", "test")
    with pytest.raises(cli.UsageError, match="--eval_samples must be >= 0, got -1"):
        T.TrainConfig(eval_samples=-1)

# ---------------------------------------------------------------------------------------------------------------
# 7. A tokenizer with ids past the embedding


def test_a_tokenizer_bigger_than_the_embedding_is_refused(tmp_path, in_process, monkeypatch):
    init, rows = bandit_task(tmp_path)
    vocab = C.read_config(init).llm.vocab_size
    big = D.word_tokenizer(["pick", "?", *[f"\\boxed{{{k}}}" for k in range(8)], *[f"w{i}" for i in range(40)]])
    big.save(str(init / "tokenizer.json"))
    n = big.get_vocab_size()
    message = rf"the tokenizer has ids up to {n - 1} \({n} tokens\) but the model's embedding has vocab_size {vocab}"
    no_model(monkeypatch)
    with pytest.raises(cli.InputError, match=message):
        D.check_tokenizer(big, C.read_config(init), init)
    with pytest.raises(cli.InputError, match=message):
        T.train(bandit_cfg(init, rows, tmp_path / "out"))
    with pytest.raises(cli.InputError, match=message):
        E.main(["--ckpt", str(init), "--data", str(rows), "--out", str(tmp_path / "r.json")])
    with pytest.raises(cli.InputError, match=message):
        D.main([str(rows), "--ckpt", str(init)])
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
