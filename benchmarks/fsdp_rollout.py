"""Generation from the FSDP2-sharded hf backend: what gathering costs, in time and memory.

    PYTHONPATH=. python benchmarks/fsdp_rollout.py --model <folder> [--world 2] [--reps 3]

Under FSDP (train.backend=hf, several ranks) the weights are all-gathered once after each
optimiser step and kept for the rollouts (``evr1.train.backends.fsdp``). This runs, on
``--world`` local processes (gloo, 1 thread each), greedy ``generate`` of 4 prompts from the
gathered FSDP model and from a plain copy of the same weights in the same process (interleaved,
so both see the same machine load), and prints side by side: the time of the gather, the
generate times, and the bytes of weights rank 0 holds sharded, gathered and plain (read from
the live tensors). Defaults: the tiny demo model if ``--model`` is not given (built here).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

PROMPT = "Which direction does the shape move, and what colour is it?"


def _generate(model: torch.nn.Module, processor: Any, tokens: int) -> float:
    from evr1.rollout.base import Prompt, SamplingParams
    from evr1.rollout.hf import HFRolloutEngine

    engine = HFRolloutEngine(model, processor)
    start = time.perf_counter()
    engine.generate([Prompt(f"p{i}", PROMPT, "text") for i in range(4)],
                    SamplingParams(n=1, temperature=0.0, max_new_tokens=tokens))
    return time.perf_counter() - start


def _bytes(tensors: Any) -> int:
    from torch.distributed.tensor import DTensor

    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors)


def _rank(model_dir: Path, reps: int, tokens: int) -> dict[str, float]:
    import torch.distributed as dist

    from evr1.config import TrainConfig
    from evr1.models import load_model, load_processor
    from evr1.train.backends import fsdp
    from evr1.train.backends.hf import HFBackend

    fsdp.join_process_group()
    processor = load_processor(model_dir)
    model = load_model(model_dir, torch.float32, "cpu")
    plain_model = load_model(model_dir, torch.float32, "cpu")  # the same weights, unwrapped
    out: dict[str, Any] = {"plain_bytes": _bytes(model.parameters()), "gather_s": [],
                           "generate_s": [], "plain_generate_s": []}
    sharding = HFBackend(model, TrainConfig(), gather_for_rollouts=True).sharding
    sharding.shard()
    out["shard_bytes"] = _bytes(model.parameters())
    for _ in range(reps):
        sharding.shard()
        dist.barrier()
        start = time.perf_counter()
        sharding.gather()
        out["gather_s"].append(time.perf_counter() - start)
    out["gathered_bytes"] = _bytes(model.parameters())
    for _ in range(reps):  # interleaved, in this process: the same load on both
        out["generate_s"].append(_generate(model, processor, tokens))
        out["plain_generate_s"].append(_generate(plain_model, processor, tokens))
    return out


def main() -> None:
    from evr1.train.backends.megatron import spawn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from evr1.models.tiny import build_tiny_model

            model = build_tiny_model(Path(tmp) / "tiny", [PROMPT], seed=0)
        r0 = spawn.run(_rank, args.world, model, args.reps, args.tokens)[0]
    med = statistics.median
    print(f"model {model}: {r0['plain_bytes'] / 2**20:.1f} MiB of parameters; "
          f"{args.world} ranks, rank 0, {args.reps} reps, median")
    print(f"{'':34} {'FSDP':>12} {'plain model':>12}")
    print(f"{'weights held, sharded (MiB)':34} {r0['shard_bytes'] / 2**20:12.1f} "
          f"{r0['plain_bytes'] / 2**20:12.1f}")
    print(f"{'weights held, gathered (MiB)':34} "
          f"{(r0['shard_bytes'] + r0['gathered_bytes']) / 2**20:12.1f} {'':>12}")
    print(f"{'gather after a step (s)':34} {med(r0['gather_s']):12.4f} {'':>12}")
    label = f"generate 4 x {args.tokens} tokens (s)"
    print(f"{label:34} {med(r0['generate_s']):12.3f} {med(r0['plain_generate_s']):12.3f}"
          f"  ratio {med(r0['generate_s']) / med(r0['plain_generate_s']):.2f}")


if __name__ == "__main__":
    main()
