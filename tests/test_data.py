"""data.py against independent restatements: InternVL's tiling, hand-written ChatML, 16-bit and float images
against numpy, and a JSONL file holding every kind of bad row at known line numbers."""
import json
import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

import checkpoint as C
import data as D
import model as M


def reference_tiling(image, tile, min_num, max_num):
    """InternVL's `dynamic_preprocess` + `build_transform`, restated independently for the test."""
    w, h = image.size
    ratios = set()
    for n in range(min_num, max_num + 1):
        for i in range(1, n + 1):
            for j in range(1, n + 1):
                if min_num <= i * j <= max_num:
                    ratios.add((i, j))
    ratios = sorted(ratios, key=lambda x: x[0] * x[1])
    best_diff, best = float("inf"), (1, 1)
    for r in ratios:
        d = abs(w / h - r[0] / r[1])
        if d < best_diff:
            best_diff, best = d, r
        elif d == best_diff and w * h > 0.5 * tile * tile * r[0] * r[1]:
            best = r
    tw, th = tile * best[0], tile * best[1]
    resized = image.resize((tw, th))
    tiles = []
    for i in range(best[0] * best[1]):
        x0, y0 = (i % (tw // tile)) * tile, (i // (tw // tile)) * tile
        tiles.append(resized.crop((x0, y0, x0 + tile, y0 + tile)))
    if len(tiles) != 1:
        tiles.append(image.resize((tile, tile)))
    arr = np.stack([np.asarray(t, dtype=np.float64) / 255.0 for t in tiles])
    arr = (arr - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    return best, arr.transpose(0, 3, 1, 2)


def noise_image(width, height, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("size,tile,max_num,grid", [
    ((1000, 200), 448, 12, (5, 1)), ((200, 1000), 448, 12, (1, 5)), ((448, 448), 448, 12, (1, 1)),
    ((1000, 1000), 448, 12, (3, 3)),  # the area tie-break: (1,1), (2,2), (3,3) tie on aspect
    ((500, 333), 56, 6, (3, 2)), ((97, 301), 56, 12, (2, 6)), ((640, 480), 56, 12, (4, 3)), ((30, 40), 56, 6, (2, 3)),
])
def test_dynamic_tiling_matches_internvl(size, tile, max_num, grid):
    img = noise_image(*size, seed=sum(size))
    ref_grid, ref = reference_tiling(img, tile, 1, max_num)
    assert D.tile_grid(*size, tile, 1, max_num) == ref_grid == grid
    cfg = M.VLMConfig(vision=M.ViTConfig(image_size=tile, patch_size=14), max_dynamic_patch=max_num)
    got = D.load_image(img, cfg)
    assert got.shape == ref.shape
    assert np.abs(got.double().numpy() - ref).max() < 1e-5


def test_chat_template():
    text = D.chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}])
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    assert D.expand_image_placeholders("a<image>b", [2], 3) == "a<img>" + "<IMG_CONTEXT>" * 6 + "</img>b"
    with pytest.raises(ValueError, match="unknown chat role 'tool'"):
        D.chat_template([{"role": "tool", "content": "x"}])


def test_bad_images_and_prompts(tmp_path, tok):
    cfg = M.tiny_config(tok.get_vocab_size(), tok.token_to_id(C.IMG_CONTEXT))
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError, match="cannot read image .*corrupt.png"):
        D.build_prompt(tok, cfg, "how many", [bad])
    with pytest.raises(FileNotFoundError, match="image file not found: .*missing.jpg"):
        D.load_image(tmp_path / "missing.jpg", cfg)
    with pytest.raises(ValueError, match="2 <image> placeholders for 1 images"):
        D.build_prompt(tok, cfg, "<image> and <image>", [Image.new("RGB", (56, 56))])
    for size in [(0, 0), (0, 5), (5, 0)]:
        with pytest.raises(ValueError, match=rf"image \(in memory\) has no pixels \({size[0]}x{size[1]}\)"):
            D.build_prompt(tok, cfg, "how many", [Image.new("RGB", size)])
    with pytest.raises(ValueError, match="max_tiles 0 is below the config's min_dynamic_patch 1"):
        D.load_image(Image.new("RGB", (56, 56)), cfg, max_tiles=0)
    text_only = M.VLMConfig(llm=cfg.llm, vision=None, layout="qwen2")
    with pytest.raises(ValueError, match="no vision tower"):
        D.load_image(Image.new("RGB", (56, 56)), text_only)


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    """A 16-bit grey PNG (Pillow mode I;16) -> 8-bit RGB as value / 257, rounded; Pillow's own convert would clip
    everything above 255 to white."""
    a = np.linspace(0, 65535, 7 * 9).round().astype(np.uint16).reshape(7, 9)
    a[0, :3] = [256, 257 * 128 + 128, 65534]  # around rounding boundaries
    Image.fromarray(a).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as f:
        assert f.mode.startswith("I")  # the path under test, not an 8-bit file
        assert (np.asarray(f.convert("RGB"))[..., 0] == 255).mean() > 0.9  # what the fix is for
    got = np.asarray(D.open_image(tmp_path / "grey16.png"))
    want = np.round(a / 257).astype(np.uint8)
    assert got.shape == (7, 9, 3) and all(np.array_equal(got[..., c], want) for c in range(3))
    # float images: [0, 1] is scaled to 0..255
    f = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    assert np.array_equal(np.asarray(D.to_rgb(Image.fromarray(f), "f"))[..., 1], np.round(f * 255).astype(np.uint8))


def zero_size_png() -> bytes:
    """A well-formed PNG whose header declares a 0x0 image (valid CRCs)."""
    chunk = lambda kind, body: (struct.pack(">I", len(body)) + kind + body +
                                struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 0, 8, 2, 0, 0, 0)) +
            chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


@pytest.fixture
def data_dir(tmp_path):
    """A data folder: rows.jsonl beside images/ with a good, a corrupt and a 0x0 image."""
    d = tmp_path / "data"
    (d / "images").mkdir(parents=True)
    noise_image(112, 56).save(d / "images" / "good.png")
    (d / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (d / "images" / "empty.png").write_bytes(zero_size_png())
    return d


def good_row(i, **kw):
    return {"id": f"r{i}", "question": "how many red squares", "answer": "2", "answer_type": "numeric", **kw}


def test_load_rows_reports_every_bad_row(data_dir, capsys):
    lines = [  # (line text, regex of the problem on that line, or None for a good row)
        (json.dumps(good_row(1, image="images/good.png")), None),
        ('{"id": "r2", "question": "how many"', "malformed JSON"),
        (json.dumps({"id": "r3", "answer": "2"}), "missing field 'question'"),
        (json.dumps(good_row(4, answer=None)), "answer is null"),
        ("", None),  # blank lines are skipped but still count for line numbers
        (json.dumps(good_row(6, answer_type="essay")), "unknown answer_type 'essay'"),
        (json.dumps(good_row(7, options="A or B")), "options must be a list of strings, got 'A or B'"),
        (json.dumps(good_row(8, image="images/nowhere.png")), "image file not found: .*images/nowhere.png"),
        (json.dumps(good_row(9, image="images/corrupt.png")), "cannot read image .*images/corrupt.png"),
        (json.dumps(good_row(1)), "duplicate id 'r1' \\(first on line 1\\)"),
        (json.dumps(["not", "an", "object"]), "a row must be a JSON object, got list"),
        (json.dumps(good_row(12, image="images/empty.png")), "cannot read image .*images/empty.png"),
        (json.dumps(good_row(13, answer_type="multiple_choice", options=["one", "two"], answer="C")),
         "multiple_choice answer 'C' is neither an option letter nor an option's text"),
        (json.dumps(good_row(14, question="  ")), "question must be a non-empty string"),
        (json.dumps(good_row(15, id=None)), "id must be a string or an integer, got None"),
        (json.dumps(good_row(16, response=7)), "response must be a string, got int"),
        (json.dumps(good_row(17, answer_type="multiple_choice", options=["one", "two", "three"], answer="two")), None),
    ]
    path = data_dir / "rows.jsonl"
    raw = "\n".join(text for text, _ in lines).encode() + b"\n" + b'{"id": "r19", "question": "\xff"}\n'
    path.write_bytes(raw)
    expected = [(n, want) for n, (_, want) in enumerate(lines, 1) if want] + [(len(lines) + 1, "not UTF-8")]
    with pytest.raises(D.DataError) as e:
        D.load_rows(path)
    problems = e.value.problems
    assert len(problems) == len(expected), "\n".join(problems)
    for problem, (line_no, want) in zip(problems, expected, strict=True):
        assert problem.startswith(f"{path}:{line_no}: "), problem
        assert re.search(want, problem), (want, problem)
        assert problem in str(e.value)
    assert str(e.value).startswith(f"{path}: {len(expected)} bad row(s) of {len(expected) + 2}:")

    rows = D.load_rows(path, skip_bad=True)
    assert [r["id"] for r in rows] == ["r1", "r17"]
    assert rows[1]["answer"] == "B"  # multiple choice answers become letters
    out = capsys.readouterr().out
    assert f"{path}: skipped {len(expected)} bad row(s) of {len(expected) + 2}; first: {problems[0]}" in out


def test_load_rows_paths_and_empty_files(data_dir, tmp_path, monkeypatch):
    path = data_dir / "rows.jsonl"
    path.write_text(json.dumps(good_row(1, image=["images/good.png", "images/good.png"])) + "\n" +
                    json.dumps(good_row(2, image=str(data_dir / "images" / "good.png"))) + "\n")
    monkeypatch.chdir(tmp_path)  # image paths are relative to the JSONL file's folder, not the working directory
    rows = D.load_rows("data/rows.jsonl")
    good = str((data_dir / "images" / "good.png").resolve())
    assert rows[0]["image"] == [good, good] and rows[1]["image"] == [good]
    (data_dir / "empty.jsonl").write_text("\n\n")
    with pytest.raises(D.DataError, match="empty.jsonl: no rows"):
        D.load_rows(data_dir / "empty.jsonl")
    with pytest.raises(FileNotFoundError, match="data file not found: .*absent.jsonl"):
        D.load_rows(data_dir / "absent.jsonl")


def test_encode_sft_and_multiple_choice_rows(data_dir, tok):
    cfg = M.tiny_config(tok.get_vocab_size(), tok.token_to_id(C.IMG_CONTEXT))
    path = data_dir / "rows.jsonl"
    mc = good_row(2, answer_type="multiple_choice", options=["one", "two", "three"], answer="three")
    path.write_text(json.dumps(good_row(1, image="images/good.png", response="answer is two")) + "\n" +
                    json.dumps(mc) + "\n")
    sft, mc = D.load_rows(path)

    ex = D.encode(sft, tok, cfg)
    assert ex.pixel_values.shape == (3, 3, 56, 56)  # 112x56 -> 2x1 grid + thumbnail
    image = "<img>" + "<IMG_CONTEXT>" * 12 + "</img>"
    prompt = f"<|im_start|>user\n{image}\nhow many red squares<|im_end|>\n<|im_start|>assistant\n"  # by hand
    assert ex.prompt_ids == tok.encode(prompt, add_special_tokens=False).ids
    assert ex.prompt_ids[-2:] == [tok.token_to_id("<|im_start|>"), tok.token_to_id("assistant")]
    assert ex.response_ids == [tok.token_to_id(w) for w in ("answer", "is", "two", "<|im_end|>")]
    assert ex.ids == ex.prompt_ids + ex.response_ids
    assert ex.loss_mask == [False] * len(ex.prompt_ids) + [True] * 4

    assert mc["answer"] == "C" and D.question_text(mc) == "how many red squares\nA. one\nB. two\nC. three"
    ex = D.encode(mc, tok, cfg)
    assert ex.pixel_values is None and ex.response_ids == [] and not any(ex.loss_mask)
    want = D.chat_template([{"role": "user", "content": "how many red squares\nA. one\nB. two\nC. three"}])
    assert ex.prompt_ids == tok.encode(want, add_special_tokens=False).ids


def test_max_tiles_caps_a_big_image(data_dir, tok):
    """A 1000x200 image at 56px tiles: 5x1 + thumbnail under the config's cap of 6, 2x1 + thumbnail with
    max_tiles=2, each equal to InternVL's tiling with that cap."""
    cfg = M.tiny_config(tok.get_vocab_size(), tok.token_to_id(C.IMG_CONTEXT))
    img = noise_image(1000, 200, seed=5)
    img.save(data_dir / "images" / "wide.png")
    (data_dir / "rows.jsonl").write_text(json.dumps(good_row(1, image="images/wide.png")) + "\n")
    [row] = D.load_rows(data_dir / "rows.jsonl")
    for max_tiles, tiles in [(None, 6), (2, 3), (100, 6)]:
        ex = D.encode(row, tok, cfg, max_tiles=max_tiles)
        _, ref = reference_tiling(img, 56, 1, min(max_tiles or 6, 6))
        assert ex.pixel_values.shape[0] == tiles == ref.shape[0]
        assert np.abs(ex.pixel_values.double().numpy() - ref).max() < 1e-5
        assert ex.prompt_ids.count(cfg.image_token_id) == tiles * cfg.tokens_per_tile
        model_error = M.VLM(cfg).image_input_error(ex.prompt_ids.count(cfg.image_token_id), ex.pixel_values)
        assert model_error is None


def test_special_ids(tok):
    stop, banned = D.special_ids(tok)
    assert stop == [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    assert banned == [tok.token_to_id(t) for t in ("<img>", "</img>", "<IMG_CONTEXT>")]
