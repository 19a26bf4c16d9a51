"""grid_task.py: the trace grammar and rewards against hand-written cases, the images against the grids they draw,
the tokenizer round trip, the checkpoint in ours and in transformers (the oracle), determinism and caching."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import InternVLForConditionalGeneration

import checkpoint as C
import data as D
import grid_task as G
from entropy import critical_token_ids
from reward import score

SMALL = dict(n_train=200, n_heldout=16)
# A hand-made grid with red in row d (the shortcut answers 4, the truth is 6) and one without (both answer 5).
HAND = ["red blue red green", "yellow yellow red blue", "green red blue yellow", "red green green red"]
HAND_NO_RED_D = ["red red red red", "blue green yellow blue", "green red blue yellow", "green blue yellow yellow"]


def grid(rows: list[str]) -> np.ndarray:
    return np.array([[G.COLOURS.index(w) for w in r.split()] for r in rows])


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return G.prepare(tmp_path_factory.mktemp("grid"), G.GridTaskConfig(seed=3, **SMALL))


@pytest.fixture(scope="module")
def rows(task):
    return D.load_rows(task.train_jsonl), D.load_rows(task.heldout_jsonl)


def snapshot(folder) -> dict:
    """Relative path -> (bytes, mtime in ns) of every file under folder."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_trace_grammar_by_hand():
    g = grid(HAND)
    assert G.trace(g, full=True) == (
        "<think> a1 red 1 a2 blue 1 a3 red 2 a4 green 2 b1 yellow 2 b2 yellow 2 b3 red 3 b4 blue 3 "
        "c1 green 3 c2 red 4 c3 blue 4 c4 yellow 4 wait d1 red 5 d2 green 5 d3 green 5 d4 red 6 </think> \\boxed{6}")
    assert G.trace(g, full=False) == (
        "<think> a1 red 1 a2 blue 1 a3 red 2 a4 green 2 b1 yellow 2 b2 yellow 2 b3 red 3 b4 blue 3 "
        "c1 green 3 c2 red 4 c3 blue 4 c4 yellow 4 </think> \\boxed{4}")
    row = G.make_row("train", 5, g, full=False)
    assert (row["id"], row["answer"], row["image"], row["strategy"]) == ("train-5", "6", "images/train-5.png",
                                                                          "shortcut")
    assert row["grid"] == ["rbrg", "yyrb", "grby", "rggr"] and np.array_equal(G.grid_of(row), g)


@pytest.mark.parametrize("rows_text,answer,shortcut_right", [(HAND, "6", 0.0), (HAND_NO_RED_D, "5", 1.0)])
def test_reward_full_vs_shortcut(rows_text, answer, shortcut_right):
    row = G.make_row("train", 0, grid(rows_text), full=True)
    assert row["answer"] == answer
    full, shortcut = score(G.trace(grid(rows_text), True), row), score(G.trace(grid(rows_text), False), row)
    assert (full["accuracy"], full["format"]) == (1.0, 1.0)
    assert (shortcut["accuracy"], shortcut["format"]) == (shortcut_right, 1.0)


def test_sampling_rates():
    rng, cfg = np.random.default_rng(7), G.GridTaskConfig()
    draws = [G.sample(rng, cfg) for _ in range(2000)]
    grids = np.stack([g for g, _, _ in draws])
    assert abs(np.mean([not full for _, full, _ in draws]) - 0.65) < 0.04  # sd of the mean ~0.011
    assert abs((grids == G.RED).mean() - 0.35) < 0.02
    assert abs((grids[:, 3] != G.RED).all(axis=1).mean() - 0.65 ** 4) < 0.03  # the shortcut's ceiling, ~0.18


def test_rows_validate_and_match_their_grids(task, rows):
    train, heldout = rows
    assert (len(train), len(heldout)) == (SMALL["n_train"], SMALL["n_heldout"])
    for r in train + heldout:
        g = G.grid_of(r)
        assert r["answer_type"] == "numeric" and r["answer"] == str(int((g == G.RED).sum()))
        assert r["response"] == G.trace(g, r["strategy"] == "full")
    assert all(r["strategy"] == "full" for r in heldout)
    assert {r["strategy"] for r in train} == {"full", "shortcut"}
    train_images = {(task.train_jsonl.parent / f"images/{r['id']}.png").read_bytes() for r in train}
    assert not train_images & {(task.heldout_jsonl.parent / f"images/{r['id']}.png").read_bytes() for r in heldout}


def test_tokenizer_round_trip_and_critical_token(task, rows):
    tok, config = D.load_tokenizer(task.tokenizer), C.read_config(task.init_checkpoint)
    unk = tok.token_to_id("<unk>")
    for r in rows[0] + rows[1]:
        ex = D.encode(r, tok, config)
        assert unk not in ex.ids
        assert len(ex.response_ids) == len(r["response"].split()) + 1  # one token per word, then <|im_end|>
        assert tok.decode(ex.response_ids) == r["response"]
    for word in [f"\\boxed{{{k}}}" for k in range(17)] + ["wait", "<think>", "</think>", "d4"]:
        assert tok.token_to_id(word) not in (None, unk)
        assert tok.encode(word, add_special_tokens=False).ids == [tok.token_to_id(word)]
    wait, end = tok.token_to_id("wait"), tok.token_to_id("</think>")
    assert critical_token_ids(tok).get(wait) == "wait"
    # The strategy is the token after c4's count: `wait` for the full walk, `</think>` for the shortcut.
    for full, decision in [(True, wait), (False, end)]:
        ids = tok.encode(G.trace(grid(HAND), full), add_special_tokens=False).ids
        assert ids[1 + 12 * 3] == decision and ids[12 * 3 - 2] == tok.token_to_id("c4")


def test_checkpoint_loads_in_ours_and_transformers(task, rows):
    tok = D.load_tokenizer(task.tokenizer)
    ours = C.load_model(task.init_checkpoint)
    assert ours.config.layout == "native" and ours.config.image_token_id == tok.token_to_id(C.IMG_CONTEXT)
    assert ours.config.llm.vocab_size == tok.get_vocab_size()
    hf = InternVLForConditionalGeneration.from_pretrained(task.init_checkpoint).eval()
    last = []
    for r in rows[1][:2]:
        ex = D.encode(r, tok, ours.config)
        ids = torch.tensor([ex.prompt_ids])
        assert ex.pixel_values.shape == (1, 3, 56, 56) and int((ids == ours.config.image_token_id).sum()) == 4
        with torch.no_grad():
            got, ref = ours(ids, ex.pixel_values), hf(input_ids=ids, pixel_values=ex.pixel_values).logits
        assert (got - ref).abs().max().item() <= 1e-4
        last.append(got[0, -1])
    assert (last[0] - last[1]).abs().max().item() > 1e-3  # the image reaches the logits: parity is not vacuous


def classify(image: np.ndarray, size: int) -> np.ndarray:
    """Each cell's mean colour -> index of the nearest base colour."""
    cell = size // 4
    means = image.reshape(4, cell, 4, cell, 3).astype(np.float64).mean(axis=(1, 3))  # (4, 4, 3)
    return np.linalg.norm(means[:, :, None] - G.BASE_RGB[None, None], axis=-1).argmin(-1)


def test_images_carry_the_grid(task, rows):
    config = C.read_config(task.init_checkpoint)
    for r in rows[0][:40] + rows[1]:
        (path,) = r["image"]
        image = np.asarray(Image.open(path).convert("RGB"))
        assert image.shape == (56, 56, 3) and D.load_image(path, config).shape[0] == 1  # one tile, no thumbnail
        assert np.array_equal(classify(image, 56), G.grid_of(r))
    rng = np.random.default_rng(11)
    for _ in range(5):  # a larger image keeps 4x4 cells
        g = G.make_grid(rng, 0.35)
        assert np.array_equal(classify(np.asarray(G.render(g, rng, 25, 12.0, 112)), 112), g)


def test_deterministic_by_seed(tmp_path):
    a = G.prepare(tmp_path / "a", G.GridTaskConfig(seed=5, n_train=30, n_heldout=6))
    b = G.prepare(tmp_path / "b", G.GridTaskConfig(seed=5, n_train=30, n_heldout=6))
    c = G.prepare(tmp_path / "c", G.GridTaskConfig(seed=6, n_train=30, n_heldout=6))
    sa, sb, sc = (snapshot(t.out_dir) for t in (a, b, c))
    assert sa.keys() == sb.keys() == sc.keys()
    assert all(sa[k][0] == sb[k][0] for k in sa)
    for name in ["data/train.jsonl", "data/heldout.jsonl", "data/images/train-0.png", "init/model.safetensors"]:
        assert sa[name][0] != sc[name][0]


def test_cached_and_refusals(tmp_path, monkeypatch):
    cfg = G.GridTaskConfig(seed=1, n_train=20, n_heldout=4)
    task = G.prepare(tmp_path / "t", cfg)
    before = snapshot(task.out_dir)
    assert json.loads((task.out_dir / G.MANIFEST).read_text())["seed"] == 1

    def no_work(*args):
        raise AssertionError("a cached prepare generated data")
    monkeypatch.setattr(G, "sample", no_work)
    monkeypatch.setattr(G, "write_init", no_work)
    assert G.prepare(tmp_path / "t", cfg).train_jsonl == task.train_jsonl
    assert snapshot(task.out_dir) == before  # same files, bytes and modification times
    with pytest.raises(ValueError, match="'seed': \\(1, 2\\)"):
        G.prepare(tmp_path / "t", G.GridTaskConfig(seed=2, n_train=20, n_heldout=4))
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "data").mkdir()
    (foreign / "todo.txt").write_text("keep me")
    with pytest.raises(ValueError, match="todo.txt"):
        G.prepare(foreign, cfg)
    assert (foreign / "todo.txt").read_text() == "keep me" and (foreign / "data").is_dir()
    monkeypatch.undo()

    # An interrupted prepare (no manifest, damaged files) starts over and ends byte-identical.
    (task.out_dir / G.MANIFEST).unlink()
    task.train_jsonl.write_text("cut sho")
    (task.heldout_jsonl.parent / "images" / "heldout-0.png").unlink()
    G.prepare(tmp_path / "t", cfg)
    assert {k: v[0] for k, v in snapshot(task.out_dir).items()} == {k: v[0] for k, v in before.items()}


def test_config_checks():
    for bad in [dict(p_red=1.5), dict(n_train=0), dict(jitter=41), dict(image_size=60), dict(seed=-1)]:
        with pytest.raises(ValueError):
            G.GridTaskConfig(**bad)


def test_command_line(tmp_path, capsys):
    """`python grid_task.py --out DIR --n_train 8 ...`: one flag per GridTaskConfig field, spelt like the field."""
    G.main(["--out", str(tmp_path / "g"), "--seed", "2", "--n_train", "8", "--n_heldout", "4", "--p_full", "1"])
    out = capsys.readouterr().out
    assert "'n_train': 8" in out and "train 8 rows (100.0% full traces), held-out 4 rows" in out
    assert "round trip ok" in out
    assert G._manifest(tmp_path / "g") == G._settings(G.GridTaskConfig(seed=2, n_train=8, n_heldout=4, p_full=1.0))
    with pytest.raises(SystemExit) as e:
        G.main(["--out", str(tmp_path / "h"), "--n-train", "8"])
    assert e.value.code == 2
