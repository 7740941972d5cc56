"""Shared pytest fixtures, ``small_config`` and ``script_module`` (test modules import them
from here)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from conftest_slurm import slurm_cluster  # noqa: F401  (the local Slurm cluster fixture)

from evr1.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]

# Prompts like the synthetic tasks', so the tiny tokenizer keeps them short.
TINY_CORPUS = [
    "What colour is the moving shape?",
    "Which direction does the shape move? A. left B. right C. up D. down",
    "How many shapes appear in the video?",
    "Is the square larger than the circle?",
    "<answer>B</answer>",
]


def script_module(relative: str) -> ModuleType:
    """A launcher or tool script (``launchers/pipeline.py``, ``tools/ablations.py``) loaded as
    a module, so that a test calls its ``main`` or functions in this process."""
    name = f"evr1_script_{Path(relative).stem}"
    spec = importlib.util.spec_from_file_location(name, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses defined in the script look their module up here
    spec.loader.exec_module(module)
    return module


def small_config(root: Path, *overrides: str) -> Config:
    """The CPU demo config shrunk for the training tests: synthetic data, shards and the tiny
    model under ``root``, which is also the run_dir unless an override names another."""
    return load_config(ROOT / "configs/demo_cpu.yaml", [
        f"run_dir={root}", f"synthetic.out_dir={root / 'data'}", "synthetic.num_videos=6",
        "synthetic.include_real_videos=false", "synthetic.include_corrupt=false",
        f"data.train_jsonl={root / 'data/train.jsonl'}",
        f"data.eval_jsonl={root / 'data/heldout.jsonl'}",
        f"model.path={root / 'tiny_model'}", f"preprocess.out_dir={root / 'shards'}",
        "preprocess.num_tasks=1",
        "rollout.n=4", "rollout.max_new_tokens=8", "train.prompts_per_step=2",
        "train.micro_batch_size=3", "train.eval_samples=2", "train.wandb_mode=disabled",
        *overrides])


# Float32 results of one computation done in two summation orders (one batching or another,
# another BLAS kernel, another machine) differ by rounding. Each of the N terms summed into an
# element adds an error of at most eps/2 of the running sum, with random sign: the total grows
# like sqrt(N) * eps * (size of the terms). The tiny models' shared-prefix and plain gradients
# differ by up to 1.3 of that unit (largest element of the tensor as the size of the terms);
# the bugs planted to check the bound (positions off by one, a response attending to prompt
# padding, a detached KV cache, a row reading a neighbour's prompt, one token's gradient
# dropped) by 1e3 to 1e6 of it. ROUNDING_SLACK leaves room for other kernels and machines.
ROUNDING_SLACK = 30.0


def rounding_bound(terms: int, scale: float) -> float:
    """How far float32 rounding can move a sum of ``terms`` numbers of size ``scale``."""
    return ROUNDING_SLACK * torch.finfo(torch.float32).eps * math.sqrt(terms) * scale


def assert_equal_up_to_rounding(got: torch.Tensor, want: torch.Tensor, terms: int,
                                what: str = "", scale: float | None = None) -> None:
    """``got`` and ``want`` compute the same float32 quantity in different summation orders.

    ``terms``: how many numbers are summed into one element (for a weight gradient, the token
    positions of the batch). ``scale``: the size of those numbers; by default the largest
    element of ``want``, so an element that is a small sum of large cancelling terms (an
    embedding row of a frequent token) is not held to a bound relative to itself.
    """
    assert got.shape == want.shape, f"{what}: shapes {tuple(got.shape)} != {tuple(want.shape)}"
    want64, got64 = want.double(), got.double()
    size = float(want64.abs().max()) if scale is None else scale
    bound = rounding_bound(terms, size)
    diff = float((got64 - want64).abs().max()) if want.numel() else 0.0
    assert diff <= bound, (f"{what}: differs by {diff:.3g}, more than float32 rounding of "
                           f"{terms} terms of size {size:.3g} explains ({bound:.3g})")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-init Qwen2.5-VL folder (model, tokenizer, processor), built once."""
    from evr1.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), TINY_CORPUS, seed=0)


@pytest.fixture
def clean_registry():
    """Leave the process-wide registry of types and judges as this test found it."""
    from evr1.rewards import preference, router

    saved = [(d, dict(d)) for d in (router._TYPES, router._ALIASES, preference._JUDGES)]
    yield
    for live, copy in saved:
        live.clear()
        live.update(copy)
