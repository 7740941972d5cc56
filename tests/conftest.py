"""Shared pytest fixtures, and ``small_config`` (test modules import it from here)."""

from __future__ import annotations

from pathlib import Path

import pytest
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
