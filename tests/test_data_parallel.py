"""Data parallelism (issue 19): one update however many replicas, and DP=2 training end to end.

* On fixed rollouts: each of 2 replicas trains on its share of the groups
  (``evr1.train.replicas.group_share``) and the step equals the one a single process takes on
  all of them: loss metrics, gradients (up to float32 summation order) and weights after the
  AdamW step. Micro-batches of 3 rows split the 8 rows 3+3+2 on one process and 3+1 per
  replica, and the responses have different lengths: a per-replica normaliser (or a mean of
  the replicas' losses) would be off by the replicas' token shares.
* The trainer at DP=2 (megatron backend, TP=1, 2 processes): each replica rolls out its own
  half of the step's groups, and a run stopped after step 2 and resumed reproduces the
  uninterrupted run exactly.

``BACKENDS`` maps a backend name to a function that builds it in a worker process; the hf
backend's FSDP path (issue 19, item 3) adds its entry there and the equivalence test covers it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import assert_equal_up_to_rounding, small_config

from evr1.config import MegatronConfig, TrainConfig
from evr1.train.backends.megatron import spawn
from evr1.train.replicas import group_share

pytest.importorskip("megatron.core")

LR = 1e-3
N = 2  # responses per group
GROUPS = 4


def fixed_rollouts(model_dir: Path) -> tuple[list[Any], list[list[int]], torch.Tensor]:
    """Four groups of two (video, video, text, image prompts), responses of 1 to 5 tokens,
    their advantages."""
    from evr1.models import load_processor
    from evr1.rollout.base import Prompt

    processor = load_processor(model_dir)
    unit = processor.image_processor.patch_size * processor.image_processor.merge_size
    rng = np.random.default_rng(0)

    def frames(t: int, h: int, w: int) -> np.ndarray:
        return rng.integers(0, 256, (t, h * unit, w * unit, 3), dtype=np.uint8)

    prompts = [Prompt("a", "What colour is the moving shape?", "video", frames(4, 2, 2)),
               Prompt("b", "How many shapes appear in the video?", "video", frames(2, 2, 3)),
               Prompt("c", "Is the square larger than the circle?", "text"),
               Prompt("d", "Which direction does the shape move?", "image", frames(1, 2, 2))]
    responses = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14], [15, 16], [17, 18, 19, 20, 21],
                 [22], [23, 24, 25]]
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, -0.8, 0.8, 1.2, -1.2])
    return prompts, responses, advantages


def share_batches(model_dir: Path, replicas: int, replica: int, micro: int = 3) -> list[Any]:
    """The micro-batches replica ``replica`` of ``replicas`` builds from its groups."""
    from evr1.models import load_processor
    from evr1.train.batch import make_policy_batches

    prompts, responses, advantages = fixed_rollouts(model_dir)
    groups = list(group_share(GROUPS, replicas, replica))
    rows = [g * N + i for g in groups for i in range(N)]
    processor = load_processor(model_dir)
    pad = processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    batches = make_policy_batches(processor, [prompts[g] for g in groups], N,
                                  [responses[r] for r in rows], list(range(len(rows))), micro,
                                  pad)
    mine = advantages[rows]
    for b in batches:
        b.advantages = mine[b.rows]
    return batches


def _megatron(model_dir: Path, cfg: TrainConfig) -> Any:
    from evr1.train.backends.megatron import MegatronBackend

    return MegatronBackend(model_dir, cfg)


# name -> builder(model_dir, TrainConfig) run in each worker; the backend has dp_size, dp_rank.
BACKENDS = {"megatron": _megatron}


def _one_step(backend_name: str, model_dir: Path) -> dict[str, Any]:
    cfg = TrainConfig(lr=LR, grad_clip=1.0, megatron=MegatronConfig())
    backend = BACKENDS[backend_name](model_dir, cfg)
    backend.optimizer.zero_grad = lambda set_to_none=True: None  # keep this step's gradients
    batches = share_batches(model_dir, backend.dp_size, backend.dp_rank)
    metrics = backend.train_step(batches, cfg.grpo)
    grads = {k: v.clone() for k, v in backend.named_hf_grads()}
    weights = {k: v.clone() for k, v in backend.named_hf_weights()}
    return {"metrics": metrics, "grads": grads, "weights": weights,
            "rows": sum(len(b.rows) for b in batches), "dp": backend.dp_size}


@pytest.mark.slow
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_dp2_on_fixed_rollouts_takes_the_dp1_update(tiny_model_dir, backend):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    one = spawn.run(_one_step, 1, backend, tiny_model_dir)[0]
    two = spawn.run(_one_step, 2, backend, tiny_model_dir)
    assert one["dp"] == 1 and [r["dp"] for r in two] == [2, 2]
    assert [r["rows"] for r in two] == [4, 4]  # each replica trained its own half
    # Token positions of the step: the terms one weight-gradient element sums.
    terms = 400
    for rank in two:
        got, want = rank["metrics"], one["metrics"]
        assert got["train_tokens"] == want["train_tokens"] and got["num_tokens"] == \
            want["num_tokens"]
        for key in ("loss", "pg_loss", "grad_norm", "entropy_mean", "ratio_mean"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
        for name, grad in one["grads"].items():
            assert_equal_up_to_rounding(rank["grads"][name].float(), grad.float(), terms, name)
        # AdamW's first step is lr * g / |g| per element: a gradient that is float noise in
        # both runs may flip sign; everything else agrees to a fraction of one lr step.
        diff = max(float((rank["weights"][k] - w).abs().max()) for k, w in one["weights"].items())
        assert diff < 0.1 * LR


# --------------------------------------------------------------------------- the trainer


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    from evr1.data.synthetic import make_synthetic
    from evr1.pipeline import stages

    root = tmp_path_factory.mktemp("dp")
    cfg = small_config(root)
    make_synthetic(cfg.synthetic, progress=False)
    assert stages.preprocess_sequential(cfg) == 0
    return root


def _train_twice(prepared: Path, out: Path) -> None:
    """On each of 2 ranks: the uninterrupted run, then a run stopped after step 2 and
    resumed (three trainers in a row, as a job and its requeue would be)."""
    from evr1.train.build import trainer_from_config

    common = ["train.backend=megatron", "train.steps=4", "train.save_every=2",
              "train.prompts_per_step=4", "train.log_completions=1"]
    trainer_from_config(small_config(prepared, f"run_dir={out / 'a'}", *common)).run()
    trainer_from_config(small_config(prepared, f"run_dir={out / 'b'}", *common)).run(stop_after=2)
    trainer_from_config(small_config(prepared, f"run_dir={out / 'b'}", *common)).run()


@pytest.mark.slow
def test_dp2_trainer_splits_the_rollouts_and_resumes_exactly(prepared, tmp_path):
    from safetensors.torch import load_file

    from evr1.models.loading import ensure_model

    ensure_model(small_config(prepared))  # built once, before two ranks would race for it
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    spawn.run(_train_twice, 2, prepared, tmp_path)
    final = [load_file(str(tmp_path / run / "checkpoints/step-00000004/model/model.safetensors"))
             for run in ("a", "b")]
    assert final[0].keys() == final[1].keys()
    for name, tensor in final[0].items():
        assert torch.equal(tensor, final[1][name]), f"{name} differs after resume"
    start = load_file(str(prepared / "tiny_model/model.safetensors"))
    assert start.keys() == final[0].keys()
    assert any(not torch.equal(final[0][k], v) for k, v in start.items()), "nothing trained"

    def train_rows(run: str) -> list[dict[str, Any]]:
        rows = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [r for r in rows if r["kind"] == "train"]

    a, b = train_rows("a"), train_rows("b")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b, strict=True):
        for key in ("reward", "accuracy", "response_len", "loss", "grad_norm", "data_position"):
            assert x[key] == y[key], key
    # Each replica generated half of every step's rollouts (2 groups x rollout.n = 4).
    assert all(r["rollouts/replica0"] == r["rollouts/replica1"] == 8 for r in a)
    assert all(r["rollouts"] == 16 and r["groups_drawn"] == 4 for r in a)
    records = [json.loads(x) for x in (tmp_path / "a/completions.jsonl").read_text().splitlines()]
    first = [r for r in records if r["step"] == 1]
    assert [r["replica"] for r in first] == [0, 1]  # one group logged per replica
    assert first[0]["sample_id"] != first[1]["sample_id"]
    # The held-out figures before training, gathered from the replicas' shares, are those of
    # one process evaluating the same model (greedy, the same batches: exactly).
    from evr1.train.build import trainer_from_config

    rows = [json.loads(x) for x in (tmp_path / "a/metrics.jsonl").read_text().splitlines()]
    before = next(r for r in rows if r["kind"] == "heldout" and r["step"] == 0)
    one = trainer_from_config(small_config(prepared, f"run_dir={tmp_path / 'one'}")).evaluate()
    assert one and {k: before[k] for k in one} == one
