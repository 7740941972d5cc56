"""The megatron backend on CUDA in bf16 against the hf backend (marker ``gpu``; issue 22).

Skipped without CUDA. ``EVR1_GPU_TEST_DEVICE=cpu`` runs the same tests on the CPU (gloo, the
plain AdamW path), which is how they are checked where there is no GPU
(``tools/gpu_check.sh megatron --cpu``). On CUDA the backend uses megatron-core's
``DistributedDataParallel`` + ``DistributedOptimizer`` (:mod:`evr1.train.backends.megatron.
dist_optimizer`) and the tests check that it does.

One process runs every megatron part (megatron-core's process groups are per process): three
GRPO steps with a checkpoint after step 2, a resume from it that takes step 3 again, and
training on one fixed batch. The hf backend runs the same steps in the test process, on the
same weights (a tiny Qwen2.5-VL saved in bf16) and the same micro-batches (video, image and
text prompts).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

DEVICE = os.environ.get("EVR1_GPU_TEST_DEVICE", "cuda")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                       reason="needs CUDA (torch.cuda.is_available() is False); "
                              "EVR1_GPU_TEST_DEVICE=cpu runs it on CPU"),
]

pytest.importorskip("megatron.core")

from conftest import TINY_CORPUS  # noqa: E402
from test_megatron import make_batches  # noqa: E402

from evr1.config import TrainConfig  # noqa: E402

LR = 1e-3
STEPS = 3
BF16_EPS = 2.0 ** -8  # bf16 keeps 8 significant bits: relative rounding up to 2^-8
# Log-probs of the same bf16 weights through two implementations (fused QKV and gate/up
# matrices, other kernels and summation orders): every layer's output is rounded to bf16,
# so the two hidden states drift apart by a few bf16 steps per layer, and a log-prob (fp32,
# from logits of size ~10) moves by up to ~10 x 4 x 2^-8 = 0.16. A wrong weight mapping,
# position id or mask moves log-probs by whole units (the tiny model's log-probs are ~ -8).
LOGPROB_TOL = 0.25


def _config(**kw: Any) -> TrainConfig:
    return TrainConfig(lr=LR, grad_clip=1.0, **kw)


def _megatron_parts(model_dir: Path, out: Path) -> dict[str, Any]:
    """Every megatron part, in one process (spawned with world size 1)."""
    from evr1.train.backends.megatron import MegatronBackend

    cfg = _config()
    backend = MegatronBackend(model_dir, cfg, dtype="bfloat16")
    batches = make_batches(model_dir)
    result: dict[str, Any] = {
        "device": str(backend.device),
        "dtype": str(next(backend.gpt.parameters()).dtype),
        "distributed_optimizer": backend.uses_distributed_optimizer,
        "logprobs": [backend.logprobs(b) for b in batches], "metrics": []}
    for step in range(1, STEPS + 1):
        if step == STEPS:
            backend.save(out / "ckpt")
        result["metrics"].append(backend.train_step(batches, cfg.grpo))
    result["logprobs_after"] = [backend.logprobs(b) for b in batches]
    del backend

    resumed = MegatronBackend(model_dir, cfg, dtype="bfloat16")
    resumed.load(out / "ckpt")
    result["resumed_metrics"] = resumed.train_step(batches, cfg.grpo)
    result["resumed_logprobs"] = [resumed.logprobs(b) for b in batches]
    del resumed

    # A fixed batch whose every response has advantage +1: each step makes them likelier.
    fixed = MegatronBackend(model_dir, cfg, dtype="bfloat16")
    for b in batches:
        b.advantages = torch.ones_like(b.advantages)
    result["fixed_nll"] = []
    for _ in range(STEPS):
        result["fixed_nll"].append(_nll(fixed, batches))
        fixed.train_step(batches, cfg.grpo)
    result["fixed_nll"].append(_nll(fixed, batches))
    return result


def _nll(backend: Any, batches: list[Any]) -> float:
    """Mean negative log-likelihood of the response tokens: the loss a positive-advantage
    step lowers (the GRPO loss itself is -mean(A) at ratio 1 whatever the weights)."""
    total = sum(float(-(backend.logprobs(b) * b.mask).sum()) for b in batches)
    return total / sum(b.num_tokens for b in batches)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from evr1.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("bf16-model"), TINY_CORPUS, seed=0,
                            dtype="bfloat16")


@pytest.fixture(scope="module")
def megatron(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from evr1.train.backends.megatron import spawn

    return spawn.run(_megatron_parts, 1, model_dir, tmp_path_factory.mktemp("mg"))[0]


@pytest.fixture(scope="module")
def hf(model_dir: Path) -> dict[str, Any]:
    from evr1.models import load_model
    from evr1.train.backends.hf import HFBackend

    model = load_model(model_dir, torch.bfloat16, DEVICE)
    cfg = _config()
    backend = HFBackend(model, cfg)
    batches = make_batches(model_dir)
    result = {"logprobs": [backend.logprobs(b).cpu() for b in batches],
              "metrics": [backend.train_step(batches, cfg.grpo) for _ in range(STEPS)]}
    result["logprobs_after"] = [backend.logprobs(b).cpu() for b in batches]
    result["masks"] = [b.mask.cpu() for b in batches]  # train_step moved them to the device
    return result


def _max_diff(got: list[torch.Tensor], want: list[torch.Tensor],
              masks: list[torch.Tensor]) -> float:
    return max(float(((g.float() - w.float()).abs() * m).max())
               for g, w, m in zip(got, want, masks, strict=True))


def test_runs_in_bf16_on_the_device_with_the_distributed_optimizer_on_cuda(megatron) -> None:
    assert megatron["device"].startswith(DEVICE)
    assert megatron["dtype"] == "torch.bfloat16"
    assert megatron["distributed_optimizer"] == (DEVICE == "cuda")
    # log-probs come out in fp32 whatever the weights' dtype
    assert all(lp.dtype == torch.float32 for lp in megatron["logprobs"])


def test_logprobs_match_hf_in_bf16(megatron, hf) -> None:
    diff = _max_diff(megatron["logprobs"], hf["logprobs"], hf["masks"])
    assert diff <= LOGPROB_TOL, f"megatron vs hf log-probs differ by {diff:.3f} in bf16"


def test_three_grpo_steps_match_hf(megatron, hf) -> None:
    for step, (got, want) in enumerate(zip(megatron["metrics"], hf["metrics"], strict=True), 1):
        assert got["num_tokens"] == want["num_tokens"]
        # The loss is a token mean of terms ~|A| x ratio, ratio 1 +- bf16 rounding of the
        # log-probs above: the two agree to a few bf16 steps of |A| ~ 1.
        assert got["loss"] == pytest.approx(want["loss"], abs=8 * BF16_EPS), step
        # Gradient norms: sums of many bf16-rounded products; 10% is far below what a wrong
        # gradient (a missing micro-batch, a doubled shard, no clipping) changes.
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=0.1), step
    # After three AdamW steps of lr 1e-3 from the same weights (updates ~1e-3 per weight,
    # the same sign in both where the gradients agree), the log-probs still agree within
    # the bf16 tolerance, and both moved away from the start.
    after = _max_diff(megatron["logprobs_after"], hf["logprobs_after"], hf["masks"])
    assert after <= LOGPROB_TOL, f"after {STEPS} steps: differ by {after:.3f}"
    moved = _max_diff(megatron["logprobs_after"], megatron["logprobs"], hf["masks"])
    assert moved > LOGPROB_TOL, "the steps did not change the log-probs"


def test_resume_from_the_checkpoint_repeats_the_last_step(megatron) -> None:
    """Saved after step 2, loaded into a fresh backend: step 3 again gives the same loss and
    the same weights (log-probs) as the uninterrupted run. On the CPU bit for bit; on CUDA
    up to the order of atomic additions in the backward kernels, far below a bf16 step."""
    exact = DEVICE == "cpu"
    straight, resumed = megatron["metrics"][-1], megatron["resumed_metrics"]
    for key in ("loss", "grad_norm", "lr", "num_tokens"):
        assert resumed[key] == (straight[key] if exact else pytest.approx(straight[key],
                                                                          rel=1e-3)), key
    for got, want in zip(megatron["resumed_logprobs"], megatron["logprobs_after"], strict=True):
        if exact:
            assert torch.equal(got, want)
        else:
            assert float((got - want).abs().max()) <= 4 * BF16_EPS * 10


def test_training_on_a_fixed_batch_lowers_its_loss(megatron) -> None:
    nll = megatron["fixed_nll"]
    assert all(b < a for a, b in zip(nll, nll[1:], strict=False)), nll
