"""The trainer on CUDA: GRPO steps in bf16, checkpoint, exact resume, eval (marker ``gpu``).

Skipped without CUDA. ``EVR1_GPU_TEST_DEVICE=cpu`` runs the same tests on CPU, which is how
the test itself is checked where there is no GPU (``tools/gpu_check.sh pipeline --cpu``).

Exact resume on a GPU needs deterministic kernels: ``torch.use_deterministic_algorithms``
with cuBLAS's fixed workspace (``CUBLAS_WORKSPACE_CONFIG``, read when cuBLAS starts, so it is
set at import), and eager attention (the fused SDPA kernels' backward may add in any order).
Under those, an interrupted and resumed run must give the uninterrupted run's weights bit for
bit: any state the checkpoint misses (the CUDA generator behind the sampled responses, the
optimizer's moments) shows up as a difference.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import small_config

from evr1.data.synthetic import make_synthetic
from evr1.pipeline import stages
from evr1.train import checkpoint as ckpt
from evr1.train.build import trainer_from_config
from evr1.train.trainer import Trainer

DEVICE = os.environ.get("EVR1_GPU_TEST_DEVICE", "cuda")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                       reason="needs CUDA (torch.cuda.is_available() is False); "
                              "EVR1_GPU_TEST_DEVICE=cpu runs it on CPU"),
]

ON_DEVICE = [f"model.device={DEVICE}", f"eval.device={DEVICE}", "model.dtype=bfloat16",
             "model.attn_implementation=eager"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gpu")
    cfg = small_config(root, *ON_DEVICE)
    make_synthetic(cfg.synthetic, progress=False)
    assert stages.preprocess_sequential(cfg) == 0
    return root


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    # warn_only: an op without a deterministic CUDA kernel warns (pytest lists it) instead of
    # stopping the run; if it did change a result, the equality below fails and names it.
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(before)


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()}


def train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def test_steps_checkpoint_resume_and_eval_on_device(prepared, tmp_path, deterministic):
    common = [*ON_DEVICE, "train.steps=4", "train.save_every=2", "train.offline.mode=always"]
    straight = trainer_from_config(small_config(prepared, f"run_dir={tmp_path / 'a'}", *common))
    param = next(straight.model.parameters())
    assert (param.device.type, param.dtype) == (torch.device(DEVICE).type, torch.bfloat16)
    straight.run()

    first = trainer_from_config(small_config(prepared, f"run_dir={tmp_path / 'b'}", *common))
    first.run(stop_after=2)  # the job ends (time limit, preemption) after step 2
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "b/checkpoints")] == \
        ["step-00000002"]
    resumed = trainer_from_config(small_config(prepared, f"run_dir={tmp_path / 'b'}", *common))
    assert resumed.run().steps == 4
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume on {DEVICE}"
    # The same sampled responses and the same losses, step by step.
    rec_a, rec_b = train_records(tmp_path / "a"), train_records(tmp_path / "b")
    assert [r["step"] for r in rec_b] == [1, 2, 3, 4]
    for key in ("reward", "loss", "grad_norm", "response_len"):
        assert [r[key] for r in rec_a] == [r[key] for r in rec_b], key
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rec_a)
    # The weights did move: the comparison is not trivially true.
    start = trainer_from_config(small_config(prepared, f"run_dir={tmp_path / 'c'}", *ON_DEVICE,
                                             "train.resume=never"))
    assert any(not torch.equal(a[k], v) for k, v in weights(start).items())

    # A checkpoint written on the device resumes on a CPU-only machine too.
    on_cpu = trainer_from_config(small_config(
        prepared, f"run_dir={tmp_path / 'd'}", "model.device=cpu", "model.dtype=bfloat16",
        f"train.resume={tmp_path / 'b/checkpoints/step-00000004'}"))
    on_cpu.resume()
    assert on_cpu.state.step == 4
    for name, value in weights(on_cpu).items():
        assert torch.equal(value, a[name]), f"{name} differs when loaded on CPU"

    # The eval stage on the device: the starting model and the trained checkpoint.
    cfg = small_config(prepared, f"run_dir={tmp_path / 'b'}", *ON_DEVICE,
                       f"eval.models=[{prepared / 'tiny_model'},latest]", "eval.num_shards=1",
                       "eval.max_new_tokens=8")
    assert stages.run_evaluation(cfg, submit=False) == 0
    assert stages.collect_results(cfg) == 0
    results = json.loads((tmp_path / "b/eval/results.json").read_text())["results"]
    heldout = len((prepared / "data/heldout.jsonl").read_text().splitlines())
    assert len(results) == 2 and all(r["n"] == heldout for r in results), results
