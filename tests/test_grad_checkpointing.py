"""``model.gradient_checkpointing`` on both training backends: a lower peak of memory in the
training step and the same gradients as without it.

The model is a tiny Qwen2.5-VL with 6 decoder layers, trained on two text rows of 512 tokens:
its weights take ~4 MB, the activations each layer keeps for the backward pass (attention
probabilities, MLP inputs, norms) several MB, so the activations dominate the step's memory,
as they do for a 7B model on long video prompts (hf backend, measured: 58 MiB peak without,
18 MiB with checkpointing).

Peak memory is measured with torch's profiler (``profile_memory=True``): it records every
allocation and free of torch's CPU allocator in order, so the running sum of its ``[memory]``
events is exactly the bytes held by tensors. The process's RSS would include the allocator's
caching, fragmentation and every other library, and ``tracemalloc`` does not see torch's C++
allocations at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_CORPUS, assert_equal_up_to_rounding
from torch import Tensor

from evr1.config import TrainConfig
from evr1.train.batch import PolicyBatch

ROWS, PROMPT, RESPONSE = 2, 496, 16
# Checkpointing keeps each layer's input and one layer's activations at a time instead of all
# 6 layers' activations: the step's peak must drop by more than half (hf measured 0.32 of
# it); a knob that does nothing leaves it unchanged, up to allocator noise of a few percent.
MAX_PEAK_RATIO = 0.5


@pytest.fixture(scope="module")
def deep_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from evr1.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("deep-model"), TINY_CORPUS, seed=0,
                            num_layers=6)


def long_text_batch(vocab: int) -> PolicyBatch:
    """Two rows of random text, all tokens valid (no padding), random advantages."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, vocab, (ROWS, PROMPT + RESPONSE), generator=gen)
    return PolicyBatch(
        model_inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)},
        responses=ids[:, PROMPT:].clone(), mask=torch.ones(ROWS, RESPONSE, dtype=torch.bool),
        rows=list(range(ROWS)), advantages=torch.tensor([1.0, -0.7]))


def peak_bytes(fn: Any) -> tuple[Any, int]:
    """``fn()``'s result and the highest number of bytes its tensors held at one time,
    beyond what was allocated before the call."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()  # > 0 for an allocation, < 0 for a free
        peak = max(peak, live)
    return result, peak


def grads_before_step(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """A list that receives the parameters' gradients right before the optimiser step (the
    backends zero them after it)."""
    got: list[Tensor] = []

    def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        got.extend(p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                   for group in opt.param_groups for p in group["params"])

    optimizer.register_step_pre_hook(hook)
    return got


def _config() -> TrainConfig:
    # One prompt per row: the shared-prefix forward (off with checkpointing, see HFBackend)
    # would not run anyway; off for both so that the two runs do the same computation.
    return TrainConfig(lr=1e-3, grad_clip=0.0, shared_prefix=False)


def _check(runs: dict[bool, tuple[list[Tensor], int]], what: str) -> None:
    (plain_grads, plain_peak), (ckpt_grads, ckpt_peak) = runs[False], runs[True]
    assert ckpt_peak < MAX_PEAK_RATIO * plain_peak, \
        f"{what}: peak {ckpt_peak / 2**20:.1f} MiB with checkpointing, " \
        f"{plain_peak / 2**20:.1f} MiB without"
    assert len(ckpt_grads) == len(plain_grads) > 0
    # The recomputed forward is the same float32 computation as the first one; the gradients
    # can differ only by the order in which a weight's per-token terms are summed.
    for i, (got, want) in enumerate(zip(ckpt_grads, plain_grads, strict=True)):
        assert_equal_up_to_rounding(got, want, ROWS * (PROMPT + RESPONSE), f"{what} grad {i}")


# --------------------------------------------------------------------------- hf


def test_hf_gradient_checkpointing_lowers_peak_memory_with_equal_gradients(
        deep_model_dir: Path) -> None:
    from evr1.models import load_model
    from evr1.train.backends.hf import HFBackend

    runs = {}
    for checkpointing in (False, True):
        model = load_model(deep_model_dir, torch.float32, "cpu")
        backend = HFBackend(model, _config(), gradient_checkpointing=checkpointing)
        assert any(getattr(m, "gradient_checkpointing", False) is True
                   for m in model.modules()) == checkpointing
        grads = grads_before_step(backend.optimizer)
        batch = long_text_batch(model.config.text_config.vocab_size)
        _, peak = peak_bytes(lambda b=backend, x=batch: b.train_step([x], _config().grpo))
        runs[checkpointing] = (grads, peak)
    _check(runs, "hf")


# --------------------------------------------------------------------------- megatron


def _megatron_runs(model_dir: Path) -> dict[bool, tuple[list[Tensor], int]]:
    """One process: the megatron backend without and with recomputation, one step each."""
    from evr1.train.backends.megatron import MegatronBackend

    runs = {}
    for checkpointing in (False, True):
        backend = MegatronBackend(model_dir, _config(), gradient_checkpointing=checkpointing)
        grads = grads_before_step(backend.optimizer)
        batch = long_text_batch(backend.model.spec.vocab_size)
        _, peak = peak_bytes(lambda b=backend, x=batch: b.train_step([x], _config().grpo))
        runs[checkpointing] = (grads, peak)
        del backend
    return runs


@pytest.mark.slow
def test_megatron_recomputation_lowers_peak_memory_with_equal_gradients(
        deep_model_dir: Path) -> None:
    pytest.importorskip("megatron.core")
    from evr1.train.backends.megatron import spawn

    _check(spawn.run(_megatron_runs, 1, deep_model_dir)[0], "megatron")


def test_megatron_recomputation_refuses_deepstack() -> None:
    """Qwen3-VL's deepstack levels are added by forward hooks that megatron-core's
    recomputation would not replay: the backend refuses the combination by name instead of
    training on wrong gradients."""
    pytest.importorskip("megatron.core")
    from transformers import Qwen3VLConfig

    from evr1.train.backends.megatron.model import lm_spec, transformer_config

    spec = lm_spec(Qwen3VLConfig())
    assert spec.deepstack_layers > 0
    with pytest.raises(ValueError, match="model.gradient_checkpointing.*deepstack"):
        transformer_config(spec, 1, 1, torch.float32, recompute=True)
