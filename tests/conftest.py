"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest_slurm import slurm_cluster  # noqa: F401  (the local Slurm cluster fixture)

# Prompts like the synthetic tasks', so the tiny tokenizer keeps them short.
TINY_CORPUS = [
    "What colour is the moving shape?",
    "Which direction does the shape move? A. left B. right C. up D. down",
    "How many shapes appear in the video?",
    "Is the square larger than the circle?",
    "<answer>B</answer>",
]


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
