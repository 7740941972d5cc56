"""Training backend ``megatron`` against the ``hf`` backend, on CPU under gloo.

Multi-process runs (``evr1.train.backends.megatron.spawn``) do the heavy work once per
session and the tests check different parts of their results; runs of one world size share
their processes, one after another (a process start costs more than a run). On a tiny
Qwen2.5-VL:

* run A: TP=2, sequence packing: log-probs, loss, gradients, three GRPO steps, HF export
  right after loading, a checkpoint after step 2 in both formats (megatron-core distributed
  checkpoint, and HF-named AdamW moments);
* run B: PP=2 (GPipe over gloo send/recv), padded layout: log-probs, gradients, export, then
  a resume from run A's TP=2 distributed checkpoint (resharded to PP=2) that takes step 3
  again;
* run C: data parallel 2: gradients summed over replicas that each saw one micro-batch;
* run D: one process (TP=1): loads both of run A's checkpoints, then takes step 3 again;
  then, in the same process, one step with grad_clip=0.

On a tiny Qwen3-VL (Q/K norms, interleaved M-RoPE, deepstack; tied embeddings, grouped-query
attention with heads x head_dim != hidden_size), runs ``qwen3_tp1`` (one process, packed),
``qwen3_tp2`` (packed) and ``qwen3_pp2`` (padded): HF export, log-probs, loss and gradients
of one step. It has 4 decoder layers and 3 deepstack levels, so at PP=2 a level is added in
the second stage, with a layer after it (a level added after the last layer changes nothing
that is scored).

The reference is the ``hf`` backend on the same folder and the same fixed micro-batches
(video, image and text prompts, responses of different lengths).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("megatron.core")

from conftest import assert_equal_up_to_rounding, rounding_bound  # noqa: E402

from evr1.config import MegatronConfig, TrainConfig  # noqa: E402
from evr1.train.backends.megatron import spawn  # noqa: E402
from evr1.train.backends.megatron.logprobs import (  # noqa: E402
    mask_padded_vocab,
    vocab_parallel_entropy,
    vocab_parallel_logprobs,
)
from evr1.train.backends.megatron.packing import build_layout  # noqa: E402
from evr1.train.backends.megatron.weights import (  # noqa: E402
    Geometry,
    Rule,
    memory_name,
    shard,
    unshard,
)
from evr1.train.grpo import token_entropy, token_logprobs  # noqa: E402

LR = 1e-3
STEPS = 3
# The tiny Qwen3-VL: see the module docstring.
QWEN3_SIZES = dict(num_layers=4, num_heads=4, num_kv_heads=2, attention_head_dim=64,
                   vision_depth=3, deepstack_levels=3, tie_embeddings=True)
QWEN3_RUNS = {"qwen3_tp1": (1, 1, True), "qwen3_tp2": (2, 1, True),
              "qwen3_pp2": (1, 2, False)}  # run -> (TP, PP, sequence packing)


def _train_config(tp: int = 1, pp: int = 1, packing: bool = True) -> TrainConfig:
    return TrainConfig(lr=LR, grad_clip=1.0, megatron=MegatronConfig(
        tensor_parallel=tp, pipeline_parallel=pp, sequence_packing=packing))


def make_batches(model_dir: Path) -> list[Any]:
    """Two micro-batches: four video rows (two clip geometries), then text and image rows."""
    from evr1.models import load_processor
    from evr1.rollout.base import Prompt
    from evr1.train.batch import make_policy_batches

    processor = load_processor(model_dir)
    # Frame sides in units of patch x merge: 28 pixels for Qwen2.5-VL, 32 for Qwen3-VL.
    unit = processor.image_processor.patch_size * processor.image_processor.merge_size
    rng = np.random.default_rng(0)
    frames = lambda t, h, w: rng.integers(0, 256, (t, h * unit, w * unit, 3), dtype=np.uint8)
    prompts = [
        Prompt("a", "What colour is the moving shape?", "video", frames(4, 2, 2)),
        Prompt("b", "How many shapes appear in the video?", "video", frames(2, 2, 3)),
        Prompt("c", "Is the square larger than the circle?", "text"),
        Prompt("d", "Which direction does the shape move?", "image", frames(1, 2, 2)),
    ]
    responses = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14], [15, 16], [17, 18, 19, 20, 21],
                 [22], [23, 24, 25]]
    pad = processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    batches = make_policy_batches(processor, prompts, 2, responses, list(range(8)), 4, pad)
    for batch, adv in zip(batches, ([1.0, -1.0, 0.5, -0.5], [-0.8, 0.8, 1.2, -1.2]),
                          strict=True):
        batch.advantages = torch.tensor(adv)
    return batches


# --------------------------------------------------------------------------- workers


def _keep_grads(backend: Any) -> None:
    """Leave the gradients of the next train_step in place (the step is still taken)."""
    backend.optimizer.zero_grad = lambda set_to_none=True: None


def _drop_grads(backend: Any) -> None:
    del backend.optimizer.zero_grad
    backend.optimizer.zero_grad(set_to_none=True)


def _run_parity(model_dir: Path, out: Path, name: str, tp: int, pp: int,
                packing: bool) -> tuple[Any, dict[str, Any]]:
    """The parity part of every run but C: HF export right after loading (to
    ``out/export_<name>``), log-probs, then one GRPO step whose gradients are kept."""
    from evr1.train.backends.megatron import MegatronBackend

    cfg = _train_config(tp=tp, pp=pp, packing=packing)
    backend = MegatronBackend(model_dir, cfg)
    backend.export_hf(out / f"export_{name}")
    batches = make_batches(model_dir)
    result: dict[str, Any] = {"logprobs": [backend.logprobs(b) for b in batches]}
    _keep_grads(backend)
    result["metrics"] = [backend.train_step(batches, cfg.grpo)]
    result["grads"] = dict(backend.named_hf_grads())
    _drop_grads(backend)
    return backend, result


def _run_qwen3(model_dir: Path, out: Path, name: str) -> dict[str, Any]:
    """Qwen3-VL run ``name`` of :data:`QWEN3_RUNS`: the parity part only."""
    return _run_parity(model_dir, out, name, *QWEN3_RUNS[name])[1]


def _run_a(model_dir: Path, out: Path) -> dict[str, Any]:
    """TP=2, packed: parity data, export, three steps, a checkpoint after step 2."""
    backend, result = _run_parity(model_dir, out, "a", tp=2, pp=1, packing=True)
    batches = make_batches(model_dir)
    for step in range(1, STEPS):
        if step == STEPS - 1:
            backend.save(out / "ckpt")
            backend.cfg.megatron.dist_checkpoint = False
            backend.save(out / "ckpt_hf")
            backend.cfg.megatron.dist_checkpoint = True
        result["metrics"].append(backend.train_step(batches, backend.cfg.grpo))
    result["weights"] = dict(backend.named_hf_weights())
    return result


def _run_b(model_dir: Path, out: Path) -> dict[str, Any]:
    """PP=2, padded: parity data and export; then resume run A's checkpoint, take step 3."""
    backend, result = _run_parity(model_dir, out, "b", tp=1, pp=2, packing=False)
    backend.load(out / "ckpt")
    result["resumed_metrics"] = backend.train_step(make_batches(model_dir), backend.cfg.grpo)
    result["resumed_weights"] = dict(backend.named_hf_weights())
    return result


def _resume_state(backend: Any) -> dict[str, Any]:
    """What a resume restores, under HF names: weights, AdamW moments and steps, the lr.
    Copies: at TP=1 the gathered tensors are the live ones, which later steps update."""
    state = {"weights": _copies(backend.named_hf_weights()),
             "lr": backend.scheduler.get_last_lr(),
             "steps": {int(s["step"]) for s in backend.optimizer.state.values()}}
    for moment in ("exp_avg", "exp_avg_sq"):
        state[moment] = _copies(backend.named_hf_moments(moment))
    return state


def _copies(named: Any) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in named}


def _run_d(model_dir: Path, out: Path) -> dict[str, Any]:
    """TP=1: load run A's HF-named and distributed checkpoints, take step 3 from the latter."""
    from evr1.train.backends.megatron import MegatronBackend

    cfg = _train_config()
    backend = MegatronBackend(model_dir, cfg)
    backend.load(out / "ckpt_hf")
    result = {"hf": _resume_state(backend)}
    backend.load(out / "ckpt")
    result["dist"] = _resume_state(backend)
    result["resumed_metrics"] = backend.train_step(make_batches(model_dir), cfg.grpo)
    result["resumed_weights"] = dict(backend.named_hf_weights())
    return result


def _run_c(model_dir: Path) -> dict[str, Any]:
    """Data parallel 2 (TP=1, PP=1): each replica trains on one micro-batch."""
    from evr1.train.backends.megatron import MegatronBackend

    cfg = _train_config()
    backend = MegatronBackend(model_dir, cfg)
    _keep_grads(backend)
    mine = make_batches(model_dir)[backend.dp_rank::backend.dp_size]  # this replica's share
    metrics = backend.train_step(mine, cfg.grpo)
    return {"metrics": [metrics], "grads": dict(backend.named_hf_grads())}


def _run_weight_shards(model_dir: Path, tp: int, pp: int) -> dict[str, Any]:
    """A backend at TP x PP: this rank's ``weight_shards()`` (or the error it raises) and the
    gathered ``named_hf_weights()``."""
    from evr1.train.backends.megatron import MegatronBackend

    backend = MegatronBackend(model_dir, _train_config(tp=tp, pp=pp))
    gathered = _copies(backend.named_hf_weights())
    try:
        own = backend.weight_shards()
    except ValueError as exc:
        return {"error": str(exc)}
    return {"gathered": gathered, "tp": (own.tp_rank, own.tp_size),
            "shards": [(s.name, s.tensor.clone(), s.dim, s.chunk, s.size, s.vocab)
                       for s in own.shards]}


# --------------------------------------------------------------------------- fixtures


def _hf_run(model_dir: Path, steps: int) -> dict[str, Any]:
    """The hf backend on the same batches: log-probs, ``steps`` GRPO steps (the gradients of
    the first kept), the weights after them."""
    from evr1.models import load_model
    from evr1.train.backends.hf import HFBackend

    torch.manual_seed(0)
    model = load_model(model_dir, torch.float32, "cpu")
    cfg = _train_config()
    backend = HFBackend(model, cfg)
    batches = make_batches(model_dir)
    ref: dict[str, Any] = {"logprobs": [backend.logprobs(b) for b in batches], "masks":
                           [b.mask for b in batches],
                           # token positions of the step: the terms a gradient sums
                           "positions": sum(b.model_inputs["input_ids"].numel()
                                            for b in batches)}
    _keep_grads(backend)
    ref["metrics"] = [backend.train_step(batches, cfg.grpo)]
    ref["grads"] = {k: p.grad.clone() for k, p in model.named_parameters()}
    _drop_grads(backend)
    for _ in range(1, steps):
        ref["metrics"].append(backend.train_step(batches, cfg.grpo))
    ref["weights"] = {k: v.clone() for k, v in model.state_dict().items()}
    return ref


@pytest.fixture(scope="module")
def hf_reference(tiny_model_dir: Path) -> dict[str, Any]:
    return _hf_run(tiny_model_dir, STEPS)


def _one_after_another(runs: list[tuple[str, Callable[..., Any], tuple]]) -> dict[str, Any]:
    """Several runs, each with its own TP/PP layout, in one set of processes: starting a
    process (importing torch, transformers and megatron-core) costs more CPU than a run of
    the tiny model. Between runs every rank waits for the others (run B reads the checkpoint
    run A wrote) and megatron-core's model-parallel groups are torn down; the default process
    group stays."""
    # heavy: megatron-core is imported only where the megatron backend runs
    from megatron.core import parallel_state

    results = {}
    for name, fn, args in runs:
        results[name] = fn(*args)
        torch.distributed.barrier()
        parallel_state.destroy_model_parallel()
    return results


def _spawn_runs(world_size: int, runs: list[tuple[str, Callable[..., Any], tuple]]
                ) -> dict[str, list[Any]]:
    """``runs`` one after another on ``world_size`` processes: run name -> every rank's result."""
    ranks = spawn.run(_one_after_another, world_size, runs)
    return {name: [rank[name] for rank in ranks] for name, _, _ in runs}


@pytest.fixture(scope="module")
def runs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Runs A, B and C and the weight_shards runs (TP=2, PP=2) on one pair of processes, then
    D and the grad_clip=0 run on one."""
    out = tmp_path_factory.mktemp("megatron")
    return {**_spawn_runs(2, [("a", _run_a, (tiny_model_dir, out)),
                              ("b", _run_b, (tiny_model_dir, out)),
                              ("c", _run_c, (tiny_model_dir,)),
                              ("weight_shards_tp2", _run_weight_shards, (tiny_model_dir, 2, 1)),
                              ("weight_shards_pp2", _run_weight_shards, (tiny_model_dir, 1, 2))]),
            **_spawn_runs(1, [("d", _run_d, (tiny_model_dir, out)),
                              ("grad_clip_off", _run_grad_clip_off, (tiny_model_dir,))]),
            "out": out}


@pytest.fixture(scope="module")
def qwen3_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import TINY_CORPUS

    from evr1.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen3"), TINY_CORPUS,
                            family="qwen3_vl", seed=0, **QWEN3_SIZES)


@pytest.fixture(scope="module")
def qwen3_reference(qwen3_model_dir: Path) -> dict[str, Any]:
    return _hf_run(qwen3_model_dir, 1)


@pytest.fixture(scope="module")
def qwen3_runs(qwen3_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
               ) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("megatron-qwen3")
    runs: dict[str, Any] = {"out": out}
    for world in sorted({tp * pp for tp, pp, _ in QWEN3_RUNS.values()}):  # one spawn per size
        more = [("weight_shards_tp2", _run_weight_shards, (qwen3_model_dir, 2, 1))] \
            if world == 2 else []
        runs.update(_spawn_runs(world, [(name, _run_qwen3, (qwen3_model_dir, out, name))
                                        for name, (tp, pp, _) in QWEN3_RUNS.items()
                                        if tp * pp == world] + more))
    return runs


@dataclass
class Parity:
    """One run's results (every rank's), the hf reference and the model folder it ran on."""

    ranks: list[dict[str, Any]]
    reference: dict[str, Any]
    model_dir: Path
    out: Path


def _parity(request: pytest.FixtureRequest, run: str) -> Parity:
    """Fixtures are fetched by name so that selecting the tests of one model family runs
    only that family's processes."""
    qwen3 = run in QWEN3_RUNS
    runs = request.getfixturevalue("qwen3_runs" if qwen3 else "runs")
    return Parity(runs[run], request.getfixturevalue("qwen3_reference" if qwen3
                                                     else "hf_reference"),
                  request.getfixturevalue("qwen3_model_dir" if qwen3 else "tiny_model_dir"),
                  runs["out"])


def _max_diff(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    assert set(got) == set(want)
    return max(float((got[k].float() - want[k].float()).abs().max()) for k in want)


def _masked_diff(got: list[torch.Tensor], want: list[torch.Tensor],
                 masks: list[torch.Tensor]) -> float:
    return max(float((g - w).abs()[m].max()) for g, w, m in zip(got, want, masks, strict=True))


# --------------------------------------------------------------------------- parity (slow)


@pytest.mark.slow
@pytest.mark.parametrize("run", ["a", "b", *QWEN3_RUNS])
def test_logprobs_match_hf_on_every_rank(request, run: str) -> None:
    parity = _parity(request, run)
    ref = parity.reference
    # Megatron and transformers sum in other orders: equal up to float32 rounding (conftest).
    size = max(float(lp[m].abs().max()) for lp, m in zip(ref["logprobs"], ref["masks"],
                                                          strict=True))
    for rank_result in parity.ranks:
        diff = _masked_diff(rank_result["logprobs"], ref["logprobs"], ref["masks"])
        assert diff <= rounding_bound(ref["positions"], size), \
            f"run {run}: log-prob difference {diff}"


@pytest.mark.slow
@pytest.mark.parametrize("run", ["a", "b", "c", *QWEN3_RUNS])
def test_loss_and_gradients_match_hf(request, run: str) -> None:
    parity = _parity(request, run)
    want, terms = parity.reference["metrics"][0], parity.reference["positions"]
    for rank_result in parity.ranks:  # TP, PP and DP ranks all report the whole batch
        got = rank_result["metrics"][0]
        # Means of per-token terms of size ~1 (advantages, ratios, small-vocabulary entropies).
        for key in ("loss", "pg_loss", "entropy_mean", "ratio_mean"):
            assert abs(got[key] - want[key]) <= rounding_bound(terms, max(1.0, abs(want[key]))), key
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=rounding_bound(terms, 1.0))
        assert got["train_tokens"] == want["train_tokens"]
        assert got["num_tokens"] == want["num_tokens"]
    # Gradients after clipping, mapped back to HF names.
    got_grads, want_grads = parity.ranks[0]["grads"], parity.reference["grads"]
    assert set(got_grads) == set(want_grads)
    for name, grad in want_grads.items():
        assert_equal_up_to_rounding(got_grads[name].float(), grad.float(), terms, name)


@pytest.mark.slow
def test_three_grpo_steps_match_hf(runs, hf_reference) -> None:
    got = runs["a"][0]
    for mine, theirs in zip(got["metrics"], hf_reference["metrics"], strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], abs=1e-5)
    # AdamW divides by sqrt(v): gradients that are float noise in both runs (~1e-9) turn
    # into lr-sized steps of either sign, so weights agree to a fraction of one lr step.
    assert _max_diff(got["weights"], hf_reference["weights"]) < 0.1 * LR
    # The two TP ranks hold, and export, identical full weights.
    assert _max_diff(runs["a"][1]["weights"], got["weights"]) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("run", ["a", "b", *QWEN3_RUNS])
def test_export_round_trips_bit_exactly(request, run: str) -> None:
    from safetensors.torch import load_file

    parity = _parity(request, run)
    source, export = parity.model_dir, parity.out / f"export_{run}"
    original = load_file(str(source / "model.safetensors"))
    exported = load_file(str(export / "model.safetensors"))
    assert set(exported) == set(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    for file in ("config.json", "tokenizer.json", "chat_template.jinja"):
        assert (export / file).read_bytes() == (source / file).read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny_model_dir", "qwen3_model_dir"])
def test_weight_shards_are_each_ranks_slice_of_the_gathered_weights(request, model) -> None:
    """``weight_shards`` at TP=2 (what a vLLM engine of TP=2 in the same processes gets; no
    communication): each rank's pieces are exactly its chunk of the tensors the collective
    gather exports, under the same names in the same order, and add up to half the
    tensor-parallel tensors plus the replicated ones (norms, vision tower) whole. Qwen2.5-VL
    (biases, untied head) and Qwen3-VL (grouped-query attention, Q/K norms, tied embedding).
    At PP=2 a rank holds one stage only, which an engine cannot use: refused."""
    # run in the processes of the module's runs (fixtures ``runs`` and ``qwen3_runs``)
    runs = request.getfixturevalue("runs" if model == "tiny_model_dir" else "qwen3_runs")
    ranks = runs["weight_shards_tp2"]
    pieces = {}
    split_sent = 0
    for rank, result in enumerate(ranks):
        assert result["tp"] == (rank, 2)
        gathered = result["gathered"]
        assert [name for name, *_ in result["shards"]] == list(gathered)
        sent = whole_bytes = 0
        for name, tensor, dim, chunk, size, vocab in result["shards"]:
            full = gathered[name]
            nbytes = tensor.numel() * tensor.element_size()
            sent += nbytes
            if dim is None:  # replicated on every TP rank: norms, the vision tower
                assert "norm" in name or name.startswith("model.visual."), name
                assert torch.equal(tensor, full), name
                whole_bytes += nbytes
                continue
            assert size == full.shape[dim], name
            assert vocab == name.endswith(("embed_tokens.weight", "lm_head.weight")), name
            assert vocab or chunk * 2 == size, name
            assert torch.equal(tensor, full.narrow(dim, rank * chunk, tensor.shape[dim])), name
            pieces[name, rank] = tensor
        total = sum(t.numel() * t.element_size() for t in gathered.values())
        # Half of each split tensor (an odd vocabulary: one row more on rank 0).
        assert abs(sent - (whole_bytes + (total - whole_bytes) / 2)) < total / 1000
        split_sent += sent - whole_bytes
    assert split_sent == total - whole_bytes  # the two ranks' pieces cover the split tensors
    split = {name for name, _ in pieces}
    assert any("q_proj" in n for n in split) and any("down_proj" in n for n in split)
    # (weights: the tiny models' biases start at zero, equal on both ranks)
    assert [n for n in split if n.endswith("weight") and torch.equal(pieces[n, 0], pieces[n, 1])
            ] == []
    if model == "tiny_model_dir":
        (refused,) = {r["error"] for r in runs["weight_shards_pp2"]}
        assert "pipeline_parallel=2" in refused


@pytest.mark.slow
def test_resume_with_another_split_repeats_the_step(runs) -> None:
    a, b = runs["a"][0], runs["b"][0]
    assert b["resumed_metrics"]["loss"] == pytest.approx(a["metrics"][-1]["loss"], abs=1e-6)
    assert b["resumed_metrics"]["lr"] == a["metrics"][-1]["lr"]
    assert _max_diff(b["resumed_weights"], a["weights"]) < 0.1 * LR


@pytest.mark.slow
def test_distributed_checkpoint_resumes_like_the_hf_named_one(runs) -> None:
    """TP=2 -> TP=1 through megatron-core's resharding gives exactly what the HF-named
    checkpoint of the same state gives, and the resumed step repeats run A's step 3."""
    out, d, a = runs["out"], runs["d"][0], runs["a"][0]
    assert (out / "ckpt" / "megatron" / "metadata.json").is_file()
    assert not (out / "ckpt" / "optimizer" / "exp_avg.safetensors").exists()
    assert not (out / "ckpt_hf" / "megatron").exists()
    hf, dist = d["hf"], d["dist"]
    assert dist["steps"] == hf["steps"] == {STEPS - 1}
    assert dist["lr"] == hf["lr"]
    for key in ("weights", "exp_avg", "exp_avg_sq"):
        assert _max_diff(dist[key], hf[key]) == 0.0, key
    assert d["resumed_metrics"]["loss"] == pytest.approx(a["metrics"][-1]["loss"], abs=1e-6)
    assert _max_diff(d["resumed_weights"], a["weights"]) < 0.1 * LR


@pytest.mark.slow
def test_checkpoint_holds_a_loadable_hf_model(runs, hf_reference) -> None:
    from evr1.models import load_model

    model = load_model(runs["out"] / "ckpt" / "model", torch.float32, "cpu")
    assert set(model.state_dict()) == set(hf_reference["weights"])


# --------------------------------------------------------------------------- units (fast)


GEOMETRY = Geometry(num_heads=8, num_kv_heads=4, head_dim=4, vocab_size=10, padded_vocab=12,
                    tp=2)


@pytest.mark.parametrize("kind,shapes", [
    ("qkv", [(32, 6), (16, 6), (16, 6)]), ("qkv", [(32,), (16,), (16,)]),
    ("gate_up", [(10, 6), (10, 6)]), ("row", [(6, 10)]), ("column", [(10, 6)]),
    ("vocab", [(10, 6)]), ("replicated", [(6,)]),
])
def test_shard_unshard_is_exact(kind: str, shapes: list[tuple[int, ...]]) -> None:
    tensors = [torch.randn(s) for s in shapes]
    rule = Rule("m", tuple(f"hf{i}" for i in range(len(shapes))), kind, 0)  # type: ignore[arg-type]
    shards = [shard(rule, tensors, GEOMETRY, r) for r in range(GEOMETRY.tp)]
    for back, original in zip(unshard(rule, shards, GEOMETRY), tensors, strict=True):
        assert torch.equal(back, original)


def test_qkv_shards_hold_whole_query_groups() -> None:
    """Rank r's fused QKV rows are exactly its groups' q heads, k head and v head."""
    g = GEOMETRY
    q = torch.arange(g.num_heads * g.head_dim).float()[:, None]
    k = 1000 + torch.arange(g.num_kv_heads * g.head_dim).float()[:, None]
    v = 2000 + torch.arange(g.num_kv_heads * g.head_dim).float()[:, None]
    rank1 = shard(Rule("m", ("q", "k", "v"), "qkv", 0), [q, k, v], g, 1)
    per_group = (g.num_heads // g.num_kv_heads + 2) * g.head_dim
    first_group = rank1[:per_group, 0]
    group = 2  # rank 1 of 2 starts at group 2 of 4
    q_rows = g.num_heads // g.num_kv_heads * g.head_dim
    assert torch.equal(first_group[:q_rows], q[group * q_rows:(group + 1) * q_rows, 0])
    assert torch.equal(first_group[q_rows:q_rows + g.head_dim],
                       k[group * g.head_dim:(group + 1) * g.head_dim, 0])


def test_both_checkpoint_layouts_read_as_memory_names() -> None:
    """Qwen2.5-VL folders store ``model.*`` / ``visual.*``, Qwen3-VL folders the in-memory
    names (writing them back under the source's names: the export tests)."""
    for disk, memory in [("model.layers.0.mlp.up_proj.weight",
                          "model.language_model.layers.0.mlp.up_proj.weight"),
                         ("visual.blocks.0.attn.qkv.bias", "model.visual.blocks.0.attn.qkv.bias"),
                         ("lm_head.weight", "lm_head.weight")]:
        assert memory_name(disk) == memory
        assert memory_name(memory) == memory


def test_vocab_logprobs_without_parallelism_match_full_softmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(7, 12, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 10, (7,))
    masked = mask_padded_vocab(logits, 0, 10)  # the last two columns are padding
    got = vocab_parallel_logprobs(masked, targets, 0, None)
    ent = vocab_parallel_entropy(masked, None)
    want = token_logprobs(logits[:, :10], targets)
    want_ent = token_entropy(logits[:, :10])
    assert torch.allclose(got, want) and torch.allclose(ent, want_ent)
    (g1,) = torch.autograd.grad((got * torch.arange(7)).sum() + ent.sum(), logits)
    (g2,) = torch.autograd.grad((want * torch.arange(7)).sum() + want_ent.sum(), logits)
    assert torch.allclose(g1, g2)
    assert torch.equal(g1[:, 10:], torch.zeros(7, 2, dtype=torch.float64))


def test_packed_layout_predicts_each_response_token_from_its_predecessor() -> None:
    # Row 0: one left pad, prompt [1, 2], response [3, 4]; row 1: prompt [5, 6, 7], response
    # [8] and one right pad.
    inputs = {"input_ids": torch.tensor([[0, 1, 2, 3, 4], [5, 6, 7, 8, 0]]),
              "attention_mask": torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 0]])}
    responses = torch.tensor([[3, 4], [8, 0]])
    mask = torch.tensor([[True, True], [True, False]])
    positions = torch.arange(5).expand(3, 2, 5)
    layout = build_layout(inputs, responses, mask, positions, packed=True, thd=False)
    assert layout.ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]
    assert layout.ids[0, layout.logit_index].tolist() == [2, 3, 7]
    assert layout.targets.tolist() == [3, 4, 8]
    assert layout.positions[0, 0].tolist() == [1, 2, 3, 4, 0, 1, 2, 3]
    blocked = layout.attention_mask[0, 0]
    assert bool(blocked[4, 3]) and not bool(blocked[3, 2]) and bool(blocked[2, 3])
    padded = build_layout(inputs, responses, mask, positions, packed=False, thd=False)
    flat = padded.ids.t().reshape(-1)  # [S, B] order, as the decoder sees it
    assert flat[padded.logit_index].tolist() == [2, 3, 7]


def test_unsupported_models_are_refused_by_name() -> None:
    from transformers import Qwen3VLMoeConfig

    from evr1.train.backends.megatron.model import lm_spec

    with pytest.raises(ValueError, match="dense decoders only.*qwen3_vl_moe.*train.backend=hf"):
        lm_spec(Qwen3VLMoeConfig())


def test_qwen3_vl_decoder_spec() -> None:
    from transformers import Qwen3VLConfig

    from evr1.train.backends.megatron.model import lm_spec

    spec = lm_spec(Qwen3VLConfig(text_config={"hidden_size": 2560, "num_attention_heads": 32,
                                              "head_dim": 128}))
    assert (spec.head_dim, spec.qk_norm, spec.qkv_bias) == (128, True, False)
    # transformers interleaves Qwen3-VL's M-RoPE even where the config does not say so.
    assert spec.mrope_interleaved and spec.mrope_section == (24, 20, 20)
    assert spec.deepstack_layers == 3  # deepstack_visual_indexes (8, 16, 24)


def test_interleaved_mrope_matches_transformers() -> None:
    from transformers import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    from evr1.train.backends.megatron.model import InterleavedMRoPE

    section = [12, 10, 10]
    config = Qwen3VLTextConfig(head_dim=64, rope_parameters={
        "rope_type": "default", "rope_theta": 5e6, "mrope_section": section,
        "mrope_interleaved": True})
    positions = torch.randint(0, 5000, (3, 2, 7))
    cos, sin = Qwen3VLTextRotaryEmbedding(config)(torch.zeros(1), positions)  # [B, S, D]
    angles = InterleavedMRoPE(64, 5e6)(positions, section)  # [S, B, 1, D]
    assert angles.shape == (7, 2, 1, 64)
    angles = angles[:, :, 0].transpose(0, 1)
    assert torch.equal(angles.cos(), cos) and torch.equal(angles.sin(), sin)


def test_deepstack_adds_levels_at_the_vision_tokens_of_their_layers() -> None:
    from evr1.train.backends.megatron.deepstack import (
        Deepstack,
        add_after_layers,
        visual_index,
    )

    class Layer(torch.nn.Module):  # a TransformerLayer's numbering and output, nothing else
        def __init__(self, layer_number: int):
            super().__init__()
            self.layer_number = layer_number

        def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, None]:
            return hidden, None

    visual = torch.tensor([[False, True, True], [True, False, False]])  # [B=2, S=3]
    levels = torch.arange(1.0, 7.0).view(2, 3, 1)  # 2 levels, 3 vision tokens, H=1
    layers = [Layer(2), Layer(3)]  # the second stage's layers at 2 per stage: 1 and 2
    with add_after_layers(layers, visual_index(visual), levels):
        hidden, _ = layers[0](torch.zeros(3, 2, 1))  # [S, B, H]
        untouched, _ = layers[1](torch.zeros(3, 2, 1))
    # Level 1 (the second layer's), in row-major order of the tokens: (0,1), (0,2), (1,0).
    assert hidden[:, :, 0].t().tolist() == [[0, 4, 5], [6, 0, 0]]
    assert not untouched.any()
    assert Deepstack(levels=3, layers_per_stage=2).stage_receives(1)
    assert not Deepstack(levels=2, layers_per_stage=2).stage_receives(1)


def test_parallel_sizes_must_divide_the_model() -> None:
    from transformers import Qwen2_5_VLConfig

    from evr1.train.backends.megatron.model import lm_spec

    spec = lm_spec(Qwen2_5_VLConfig(text_config={"num_key_value_heads": 2,
                                                 "num_attention_heads": 4,
                                                 "hidden_size": 512,
                                                 "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="num_key_value_heads=2.*tensor_parallel=4"):
        spec.check_parallel(4, 1)
    with pytest.raises(ValueError, match="num_hidden_layers=3.*pipeline_parallel=2"):
        spec.check_parallel(1, 2)



# --------------------------------------------------------------------------- grad_clip = 0


def _run_grad_clip_off(model_dir: Path) -> dict[str, Any]:
    """One process, two micro-batches, train.grad_clip = 0 (no clipping)."""
    from evr1.train.backends.megatron import MegatronBackend

    cfg = TrainConfig(lr=LR, grad_clip=0.0)
    backend = MegatronBackend(model_dir, cfg)
    _keep_grads(backend)
    metrics = backend.train_step(make_batches(model_dir), cfg.grpo)
    return {"metrics": metrics, "grads": dict(backend.named_hf_grads())}


@pytest.mark.slow
def test_grad_clip_zero_is_off_and_step_metrics_sum_over_micro_batches(tiny_model_dir,
                                                                      runs) -> None:
    """grad_clip = 0 used to scale every gradient by 0; and pg_loss / num_tokens were
    token-averaged over the two micro-batches instead of summed. The hf backend with the
    same settings is the reference (its own tests check it against the full-batch loss)."""
    from evr1.models import load_model
    from evr1.train.backends.hf import HFBackend

    got = runs["grad_clip_off"][0]  # run in run D's process, after it
    torch.manual_seed(0)
    model = load_model(tiny_model_dir, torch.float32, "cpu")
    cfg = TrainConfig(lr=LR, grad_clip=0.0)
    backend = HFBackend(model, cfg)
    _keep_grads(backend)
    batches = make_batches(tiny_model_dir)
    terms = sum(b.model_inputs["input_ids"].numel() for b in batches)  # what a gradient sums
    want = backend.train_step(batches, cfg.grpo)
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    assert want["grad_norm"] > 1.0  # clipping at 1 would have scaled these
    m = got["metrics"]
    assert m["num_tokens"] == m["train_tokens"] == want["num_tokens"] == want["train_tokens"]
    # Sums of the step's terms in other orders: equal up to float32 rounding (conftest).
    for key in ("loss", "pg_loss"):
        assert abs(m[key] - want[key]) <= rounding_bound(terms, max(1.0, abs(want[key]))), key
    assert m["loss"] == pytest.approx(m["pg_loss"], abs=1e-6)  # no KL / entropy terms
    assert m["grad_norm"] == pytest.approx(want["grad_norm"], rel=rounding_bound(terms, 1.0))
    # the gradients were left unscaled (clipping at 1 would divide them by grad_norm > 1)
    assert float(torch.stack([g.norm() for g in got["grads"].values()]).norm()) == \
        pytest.approx(m["grad_norm"], rel=rounding_bound(terms, 1.0))
    assert set(got["grads"]) == set(grads)
    for name, grad in grads.items():
        assert_equal_up_to_rounding(got["grads"][name].float(), grad.float(), terms, name)


# What each CPU shim patches still fails without it (so the shim is still needed with the
# installed megatron-core) and runs on the host with it. A fresh process: the shims are
# process-wide. The fourth (distributed checkpointing) is run A's checkpoint above.
_SHIM_CHECK = """
import torch
from megatron.core import utils
from megatron.core.models.common.embeddings import rotary_pos_embedding as rope
from megatron.core.tensor_parallel import random
from evr1.train.backends.megatron import cpu_shims

def tracker():
    t = random.CudaRNGStatesTracker()
    t.states_["model-parallel-rng"] = torch.get_rng_state()  # add() would need CUDA
    return t

calls = {
    "memory buffer": lambda: utils.GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "x"),
    "rng fork": lambda: tracker().fork().__enter__(),
    "mrope": lambda: rope.MultimodalRotaryEmbedding(kv_channels=16, rotary_percent=1.0).inv_freq,
    "recompute rng": lambda: random._set_all_rng_states(*random._get_all_rng_states()),
}
for name, call in calls.items():
    try:
        call()
    except RuntimeError:
        continue
    raise SystemExit(f"{name}: runs on CPU without its shim; remove the shim")
cpu_shims.install()
assert calls["memory buffer"]().device.type == "cpu"
calls["rng fork"]()
assert calls["mrope"]().device.type == "cpu"
calls["recompute rng"]()
print("ok")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shims are for CPU-only machines")
def test_cpu_shims_are_needed_and_work() -> None:
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-c", _SHIM_CHECK], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr
