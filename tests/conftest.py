"""Shared test setup and helpers: without a GPU, Triton kernels run in the interpreter (set before triton is
imported); a word-level tokenizer, tiny random transformers checkpoints (the parity oracle) and image prompts;
scripts launched as a user runs them (`start`, `finish`)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

import checkpoint as C  # noqa: E402 - after TRITON_INTERPRET is set
import data as D  # noqa: E402

WORDS = "how many red squares are there in the image answer is one two three".split()
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
            "ROLE_RANK", "TORCHELASTIC_RUN_ID")  # what torchrun sets for its ranks: never inherited by a launch


@pytest.fixture(scope="session")
def tok():
    return D.word_tokenizer(WORDS)


def randomize(hf_model, seed: int):
    """transformers initialises norms to 1, layer scales to 0.1 and positions/CLS to 0: perturb every parameter so
    that a wrong key mapping or a missing term cannot hide behind a trivial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hf_model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return hf_model


def text_config(vocab: int, tie: bool) -> dict:
    return dict(model_type="qwen2", vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie, rope_theta=10000.0,
                max_position_embeddings=512)


VISION_VARIANTS = {  # InternViT-300M style and InternViT-6B style, each with a fixed seed for its random weights
    "300m": (11, dict(norm_type="layer_norm", use_qk_norm=False, attention_bias=True)),
    "6b": (23, dict(norm_type="rms_norm", use_qk_norm=True, attention_bias=False)),
}


def make_hf_internvl(tok, variant: str, tie: bool, path, vision: dict | None = None, **config):
    """A tiny random transformers InternVLForConditionalGeneration saved to `path` with the tokenizer; `vision`
    overrides vision_config fields (num_hidden_layers, ...), `config` InternVLConfig fields (vision_feature_layer)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration
    seed, variant_config = VISION_VARIANTS[variant]
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=56,
                  patch_size=14, **variant_config) | (vision or {})
    cfg = InternVLConfig(vision_config=vision, text_config=text_config(tok.get_vocab_size(), tie),
                         image_token_id=tok.token_to_id(C.IMG_CONTEXT), tie_word_embeddings=tie, **config)
    hf = randomize(InternVLForConditionalGeneration(cfg), seed=seed + tie).eval()
    hf.config._attn_implementation = "eager"
    hf.save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    return hf


def image_prompt(tok, config, size=(112, 56)):
    """A two-tile image (plus thumbnail: three tiles) with some texture so that the tiles differ."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    ids, pixels = D.build_prompt(tok, config, "how many red squares are there", [img])
    return torch.tensor([ids]), pixels


@pytest.fixture
def in_process():
    """train_rl.train() run inside pytest: a world of one, torn down afterwards with the environment and the thread
    count it set."""
    import torch.distributed as dist
    env, threads = dict(os.environ), torch.get_num_threads()
    for k in DIST_ENV:
        os.environ.pop(k, None)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(env)
    torch.set_num_threads(threads)


REPO = Path(__file__).resolve().parent.parent


def start(args: list, nproc: int = 1, torchrun: tuple[str, ...] = (), merge_output: bool = False,
          **env) -> subprocess.Popen:
    """`python ARGS`; with nproc > 1 `torchrun --standalone --nproc_per_node=NPROC ARGS`; with `torchrun`, those
    torchrun flags instead (gloo on CPU). In the repository, one thread, no rendezvous variables inherited, ENV
    added; output piped (stderr into stdout with merge_output), read as it comes or collected by `finish`."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV} | {"OMP_NUM_THREADS": "1"} | env
    if nproc > 1 and not torchrun:
        torchrun = ("--standalone", f"--nproc_per_node={nproc}")
    head = [sys.executable, "-m", "torch.distributed.run", *torchrun] if torchrun else [sys.executable]
    return subprocess.Popen([*head, *map(str, args)], stdout=subprocess.PIPE, text=True, cwd=REPO, env=env,
                            stderr=subprocess.STDOUT if merge_output else subprocess.PIPE)


def finish(*runs: subprocess.Popen, timeout: int = 300, check: bool = True) -> list[subprocess.CompletedProcess]:
    """Waits for runs `start`ed together: each fills the cores another leaves idle (torch's start-up, torchrun's
    rendezvous, the teardowns). With `check`, each must exit 0. One still going when this leaves (a timeout) is
    ended: torchrun ends its ranks on SIGTERM."""
    try:
        outputs = [r.communicate(timeout=timeout) for r in runs]
    finally:
        for r in runs:
            if r.poll() is None:
                r.terminate()
    done = [subprocess.CompletedProcess(r.args, r.returncode, out, err) for r, (out, err) in zip(runs, outputs)]
    for d in done if check else ():  # a rank's traceback precedes torchrun's report
        assert d.returncode == 0, d.stdout[-3000:] + (d.stderr or "")[-12000:]
    return done


@pytest.fixture
def one_thread():
    """One-process references in pytest's process on one thread, as each launched process runs (OMP_NUM_THREADS=1):
    the same reductions, and the tiny models' ops are too small to share (on a busy machine a second thread mostly
    waits for a core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def in_this_process(main, argv: list):
    """`main(argv)` in pytest's process, as a plain `python` launch runs it (a world of one on a free port) without
    another start-up of torch: the rendezvous variables the last call set are dropped first. For `in_process`."""
    for k in DIST_ENV:
        os.environ.pop(k, None)
    main(list(map(str, argv)))


def hf_greedy(hf, request, n: int, stop: list[int], banned: list[int]) -> list[int]:
    """transformers' greedy completion of a rollout.Request (the independent reference for the sampler): up to n
    tokens, never a banned id, cut after the first stop id as the sampler's completions are."""
    image = {} if request.pixel_values is None else dict(pixel_values=request.pixel_values)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([request.ids]), **image, do_sample=False, max_new_tokens=n, eos_token_id=stop,
                          pad_token_id=stop[0], suppress_tokens=banned)[0, len(request.ids):].tolist()
    ends = [k for k, t in enumerate(ref) if t in stop]
    return ref[:ends[0] + 1] if ends else ref[:n]
