"""The ``hf`` backend across processes (FSDP2 over gloo, 1 thread per process) against itself in
one process, on fixed micro-batches of a tiny Qwen2.5-VL.

Runs (``evr1.train.backends.megatron.spawn``: N fresh processes with torchrun's variables):

* ``dp2``: 2 ranks: rollouts from the gathered model (each rank its own prompt and length),
  step 1 (gradients kept), a checkpoint, step 2;
* ``single``: 1 process: the same rollouts and steps, a checkpoint after step 1; then a fresh
  backend resumes ``dp2``'s checkpoint and takes step 2 again;
* ``dp2_resume``: 2 ranks, weights not kept gathered (as with vLLM), resume ``single``'s
  checkpoint and take step 2 again.

The step has three micro-batches, so at DP=2 rank 1 trains on one and runs a zero-weighted
pass to keep the ranks' collectives in step; the ranks' passes differ in modality (see
``make_batches``), so the vision tower's FSDP units must run as often on the text-only rank.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import assert_equal_up_to_rounding, rounding_bound

from evr1.config import GRPOConfig, TrainConfig
from evr1.train.backends.megatron import spawn

STEPS = 2


def _config() -> TrainConfig:
    # KL term on: the reference model is sharded too; clipping on: the global norm is used.
    return TrainConfig(lr=1e-3, grad_clip=0.5, freeze_vision_tower=False,
                       grpo=GRPOConfig(kl_coef=0.05))


def _prompts(model_dir: Path) -> list[Any]:
    from evr1.models import load_processor
    from evr1.rollout.base import Prompt

    processor = load_processor(model_dir)
    unit = processor.image_processor.patch_size * processor.image_processor.merge_size
    rng = np.random.default_rng(0)
    frames = lambda t, h, w: rng.integers(0, 256, (t, h * unit, w * unit, 3), dtype=np.uint8)
    return [Prompt("a", "What colour is the moving shape?", "video", frames(4, 2, 2)),
            Prompt("b", "How many shapes appear in the video?", "video", frames(2, 2, 3)),
            Prompt("c", "Is the square larger than the circle?", "text"),
            Prompt("d", "Which direction does the shape move?", "image", frames(1, 2, 2))]


def make_batches(model_dir: Path) -> list[Any]:
    """Three micro-batches of video + image (4 rows), text (2) and video (2) prompts.

    Split over 2 ranks as ``[rank::2]``, the ranks' passes differ in modality, as the
    demo's mixed data makes them: pass 1 runs the vision tower for images and for videos on
    rank 0 and not at all on rank 1 (text); pass 2 runs it for videos on rank 0 and repeats
    the text pass, zero-weighted, on rank 1."""
    from evr1.models import load_processor
    from evr1.train.batch import make_policy_batches

    processor = load_processor(model_dir)
    responses = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14], [15, 16], [17, 18, 19, 20, 21],
                 [22], [23, 24, 25]]
    advantages = [1.0, -1.0, 0.5, -0.5, -0.8, 0.8, 1.2, -1.2]
    pad = processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    batches = []
    for rows in ([0, 1, 6, 7], [4, 5], [2, 3]):  # rows of prompts a + d, c, b (2 per prompt)
        batch, = make_policy_batches(processor, _prompts(model_dir), 2, responses, rows, 4, pad)
        batch.advantages = torch.tensor([advantages[r] for r in rows])
        batches.append(batch)
    assert [b.data_types for b in batches] == [["video", "video", "image", "image"],
                                               ["text", "text"], ["video", "video"]]
    return batches


def _backend(model_dir: Path, gather_for_rollouts: bool = True) -> Any:
    from evr1.models import load_model
    from evr1.train.backends import fsdp
    from evr1.train.backends.hf import HFBackend

    fsdp.join_process_group()
    return HFBackend(load_model(model_dir, torch.float32, "cpu"), _config(),
                     gather_for_rollouts=gather_for_rollouts)


COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
               "broadcast", "barrier")


def _rollouts(backend: Any, model_dir: Path, rank: int) -> tuple[list[list[int]], int]:
    """Sampled responses to prompt ``rank`` (of a different length on each rank), and the
    number of torch.distributed collectives the generate call made."""
    import torch.distributed as dist

    from evr1.models import load_processor
    from evr1.rollout.base import SamplingParams
    from evr1.rollout.hf import HFRolloutEngine

    engine = HFRolloutEngine(backend.model, load_processor(model_dir))
    torch.manual_seed(7)
    calls = []
    plain = {name: getattr(dist, name) for name in COLLECTIVES}

    def counted(name):
        def collective(*args, **kwargs):
            calls.append(name)
            return plain[name](*args, **kwargs)
        return collective

    for name in COLLECTIVES:
        setattr(dist, name, counted(name))
    try:
        out = engine.generate([_prompts(model_dir)[rank + 1]],
                              SamplingParams(n=2, temperature=1.0, max_new_tokens=4 + 3 * rank))
    finally:
        for name, fn in plain.items():
            setattr(dist, name, fn)
    return [list(r) for r in out.response_ids], len(calls)


def _state(backend: Any) -> dict[str, Any]:
    """Weights and AdamW moments, whole, under parameter names; steps and lr (collective)."""
    from torch.distributed.tensor import DTensor

    def whole(t: torch.Tensor) -> torch.Tensor:
        return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()

    state: dict[str, Any] = {"weights": {}, "exp_avg": {}, "exp_avg_sq": {}, "steps": set(),
                             "lr": backend.scheduler.get_last_lr()}
    for name, p in _trained(backend):
        state["weights"][name] = whole(p)
        moments = backend.optimizer.state.get(p, {})
        for m in ("exp_avg", "exp_avg_sq"):
            if m in moments:
                state[m][name] = whole(moments[m])
        if "step" in moments:
            state["steps"].add(int(moments["step"]))
    return state


def _trained(backend: Any) -> list[tuple[str, torch.Tensor]]:
    """The optimiser's parameters (under FSDP: the shards, which hold the gradients and key
    the moments; ``named_parameters`` gives the gathered copies between updates), named."""
    names = [n for n, _ in backend.model.named_parameters()]
    params = [p for g in backend.optimizer.param_groups for p in g["params"]]
    return list(zip(names, params, strict=True))


def _step_with_grads(backend: Any, batches: list[Any]) -> tuple[dict, dict]:
    from torch.distributed.tensor import DTensor

    backend.optimizer.zero_grad = lambda set_to_none=True: None  # keep this step's gradients
    metrics = backend.train_step(batches, backend.cfg.grpo)
    grads = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
             for n, p in _trained(backend) if p.grad is not None}
    del backend.optimizer.zero_grad
    backend.optimizer.zero_grad(set_to_none=True)
    return metrics, grads


def _run_dp2(model_dir: Path, out: Path) -> dict[str, Any]:
    import torch.distributed as dist

    backend = _backend(model_dir)
    assert (backend.dp_rank, backend.dp_size) == (dist.get_rank(), 2)
    result: dict[str, Any] = {"rollouts": _rollouts(backend, model_dir, backend.dp_rank)}
    # Each rank is one data-parallel replica and trains on its own share (uneven: 2 and 1).
    batches = make_batches(model_dir)[backend.dp_rank::2]
    result["metrics"], result["grads"] = _step_with_grads(backend, batches)
    backend.save(out / "dp2")
    dist.barrier()
    result["state1"] = _state(backend)
    result["metrics"] = [result["metrics"], backend.train_step(batches, backend.cfg.grpo)]
    result["state2"] = _state(backend)
    result["sharded"] = {n: (tuple(p.to_local().shape),
                             tuple(backend.optimizer.state[p]["exp_avg"].to_local().shape))
                         for n, p in _trained(backend)}
    return result


def _run_single(model_dir: Path, out: Path) -> dict[str, Any]:
    backend = _backend(model_dir)
    assert backend.sharding is None and (backend.dp_rank, backend.dp_size) == (0, 1)
    result: dict[str, Any] = {"rollouts": [_rollouts(backend, model_dir, r) for r in (0, 1)]}
    batches = make_batches(model_dir)
    result["metrics"], result["grads"] = _step_with_grads(backend, batches)
    backend.save(out / "single")
    result["state1"] = _state(backend)
    result["metrics"] = [result["metrics"], backend.train_step(batches, backend.cfg.grpo)]
    result["state2"] = _state(backend)
    resumed = _backend(model_dir)
    resumed.load(out / "dp2")
    result["loaded_dp2"] = _state(resumed)
    resumed.train_step(batches, resumed.cfg.grpo)
    result["resumed_dp2"] = _state(resumed)
    return result


def _run_dp2_resume(model_dir: Path, out: Path) -> dict[str, Any]:
    """As a vLLM run has it: the weights are not kept gathered between updates."""
    backend = _backend(model_dir, gather_for_rollouts=False)
    backend.load(out / "single")
    assert not backend.sharding.gathered
    result = {"loaded_single": _state(backend)}
    backend.train_step(make_batches(model_dir)[backend.dp_rank::2], backend.cfg.grpo)
    result["resumed_single"] = _state(backend)
    result["hf_weights"] = {n: t.clone() for n, t in backend.named_hf_weights()}
    return result


@pytest.fixture(scope="module")
def runs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("fsdp")
    dp2 = spawn.run(_run_dp2, 2, tiny_model_dir, out)
    single = spawn.run(_run_single, 1, tiny_model_dir, out)[0]
    dp2_resume = spawn.run(_run_dp2_resume, 2, tiny_model_dir, out)
    positions = sum(b.model_inputs["input_ids"].numel() for b in make_batches(tiny_model_dir))
    return {"dp2": dp2, "single": single, "dp2_resume": dp2_resume, "out": out,
            "positions": positions}


def _assert_states_close(got: dict, want: dict, terms: int, what: str) -> None:
    """Moments (linear in the gradients and their squares) up to the rounding of the
    gradient sums; weights to a tenth of an lr step: AdamW divides by sqrt(v), so a gradient
    element that is float noise in both runs becomes an lr-sized step of either sign (as in
    tests/test_megatron.py). A wrong normaliser or a lost micro-batch moves the moments by
    far more than rounding."""
    assert got["steps"] == want["steps"] and got["lr"] == want["lr"], what
    for key in ("exp_avg", "exp_avg_sq"):
        assert got[key].keys() == want[key].keys(), (what, key)
        for name, tensor in want[key].items():
            assert_equal_up_to_rounding(got[key][name], tensor, terms, f"{what} {key} {name}")
    assert got["weights"].keys() == want["weights"].keys(), what
    for name, tensor in want["weights"].items():
        diff = float((got["weights"][name] - tensor).abs().max())
        assert diff < 0.1 * _config().lr, f"{what}: weight {name} differs by {diff:.3g}"


def _assert_states_equal(got: dict, want: dict, what: str) -> None:
    assert got["steps"] == want["steps"] and got["lr"] == want["lr"], what
    for key in ("weights", "exp_avg", "exp_avg_sq"):
        assert got[key].keys() == want[key].keys(), (what, key)
        for name, tensor in want[key].items():
            assert torch.equal(got[key][name], tensor), f"{what}: {key} {name} differs"


def test_parameters_and_moments_are_sharded(runs):
    """Each rank holds half of every parameter's rows (FSDP2 shards dim 0), and AdamW
    moments of the same shape."""
    full = runs["single"]["state1"]["weights"]
    for rank in (0, 1):
        for name, (shape, moment) in runs["dp2"][rank]["sharded"].items():
            rows = full[name].shape[0]
            assert shape[0] == ((rows + 1) // 2 if rank == 0 else rows - (rows + 1) // 2), name
            assert shape[1:] == tuple(full[name].shape[1:]) and moment == shape, name


def test_rollouts_from_the_gathered_model_match_one_process(runs):
    """Each rank samples its own prompt, to its own length, with no collective in generate:
    the tokens are those of the plain model (same weights, same seed)."""
    for rank in (0, 1):
        responses, collectives = runs["dp2"][rank]["rollouts"]
        assert responses == runs["single"]["rollouts"][rank][0]
        # transformers' default for FSDP modules (synced_gpus) all-reduced a flag per token
        assert collectives == 0, f"rank {rank}: {collectives} collectives in generate"


def test_dp2_update_equals_the_single_process_update(runs):
    """Same micro-batches: DP=2 (two on rank 0, one plus a zero-weighted pass on rank 1)
    computes the gradient, metrics and weights of one process. Rounding bound: the ranks'
    gradients are summed in another order than one process accumulates them, over the
    step's token positions (tests/conftest.py); a normaliser counting one rank's batch only
    or a mean over ranks would be off by a factor ~2, far beyond it."""
    single, terms = runs["single"], runs["positions"]
    for rank in (0, 1):
        got = runs["dp2"][rank]
        assert got["grads"].keys() == single["grads"].keys()
        for name, grad in single["grads"].items():
            assert_equal_up_to_rounding(got["grads"][name], grad, terms, f"grad {name}")
        for step in range(STEPS):
            mine, ref = got["metrics"][step], single["metrics"][step]
            assert mine["num_tokens"] == ref["num_tokens"] and \
                mine["train_tokens"] == ref["train_tokens"]
            assert mine.keys() == ref.keys()
            for key, value in ref.items():  # sums and means over the step's token positions
                if key != "time_update":
                    assert mine[key] == pytest.approx(value, rel=rounding_bound(terms, 1.0),
                                                      abs=1e-7), key
        _assert_states_close(got["state1"], single["state1"], terms, "after step 1")
        _assert_states_close(got["state2"], single["state2"], terms, "after step 2")


def test_checkpoint_saved_at_2_ranks_resumes_at_1_and_back(runs):
    """The distributed checkpoint restores the saving run's state bit for bit at the other
    world size, and the resumed step 2 matches the saving run's own step 2 (up to the
    rounding of DP=2 against one process, as above)."""
    single, terms = runs["single"], runs["positions"]
    dp2, dp2_resume = runs["dp2"][0], runs["dp2_resume"]
    _assert_states_equal(single["loaded_dp2"], dp2["state1"], "2 ranks -> 1")
    _assert_states_close(single["resumed_dp2"], dp2["state2"], terms, "2 ranks -> 1, step 2")
    for rank in (0, 1):
        _assert_states_equal(dp2_resume[rank]["loaded_single"], single["state1"],
                             f"1 -> 2 ranks (rank {rank})")
        _assert_states_close(dp2_resume[rank]["resumed_single"], single["state2"], terms,
                             "1 -> 2 ranks, step 2")
        # Gathered one tensor at a time (the vLLM sync path): the whole weights.
        hf = dp2_resume[rank]["hf_weights"]
        for name, tensor in dp2_resume[rank]["resumed_single"]["weights"].items():
            assert torch.equal(hf[name], tensor), name


def test_checkpoint_holds_the_gathered_hf_model(runs):
    """``model/`` (written by rank 0 from the gathered weights) is a whole transformers
    model equal to the training state."""
    from transformers import AutoModelForImageTextToText

    loaded = AutoModelForImageTextToText.from_pretrained(runs["out"] / "dp2" / "model")
    want = runs["dp2"][0]["state1"]["weights"]
    got = dict(loaded.named_parameters())
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
