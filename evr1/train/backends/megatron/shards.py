"""This rank's part of the model: the stage's ``GPTModel`` (its TP shards), the vision tower
on the first stage, and the rules that map them to HF tensors.

:class:`LocalModel` is what the forward (:mod:`.forward`), the pipeline schedule
(:mod:`.schedule`), the gradient reduction (:mod:`.grads`) and the checkpoint I/O
(:mod:`.checkpoint_io`) share: parameters by name, loading HF tensors into the shards and
gathering full HF tensors back from them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from transformers import AutoConfig

from evr1.rollout.base import ShardedWeights, WeightShard
from evr1.train.backends.megatron import model as mg_model
from evr1.train.backends.megatron import parallel
from evr1.train.backends.megatron.deepstack import Deepstack
from evr1.train.backends.megatron.vision import VisionFrontEnd
from evr1.train.backends.megatron.weights import (
    Geometry,
    HFCheckpoint,
    LayerKind,
    Rule,
    gather_hf,
    is_tied_copy,
    model_rules,
    rank_shards,
    shard,
)

VISUAL = "model.visual."


class LocalModel:
    """The GPTModel stage and vision tower of this rank, built from the HF folder ``source``
    and loaded with its weights. ``recompute``: megatron-core's activation recomputation
    (``model.gradient_checkpointing``, :func:`.model.transformer_config`)."""

    def __init__(self, source: Path, grid: parallel.Layout, dtype: torch.dtype, *,
                 freeze_vision_tower: bool, recompute: bool = False):
        self.source = source
        self.grid = grid
        self.dtype = dtype
        self.device = parallel.device()
        self.hf_config = AutoConfig.from_pretrained(str(source))
        self.spec = mg_model.lm_spec(self.hf_config)
        self.use_te = mg_model.transformer_engine_available()
        g = grid
        self.geometry = Geometry(self.spec.num_heads, self.spec.num_kv_heads, self.spec.head_dim,
                                 self.spec.vocab_size, self.spec.padded_vocab(g.tp), g.tp)
        config = mg_model.transformer_config(self.spec, g.tp, g.pp, dtype, recompute=recompute)
        self.gpt = mg_model.build_gpt(self.spec, config, tp=g.tp, first_stage=g.first_stage,
                                      last_stage=g.last_stage, use_te=self.use_te)
        self.gpt.to(self.device)
        self.rules = model_rules(self.spec.num_layers, g.pp, self.spec.tied_embeddings,
                                 LayerKind(te_fused_norms=self.use_te, qkv_bias=self.spec.qkv_bias,
                                           qk_norm=self.spec.qk_norm))
        self.deepstack = Deepstack(self.spec.deepstack_layers, self.spec.num_layers // g.pp) \
            if self.spec.deepstack_layers else None
        checkpoint = HFCheckpoint(source)
        self.hf_shapes = {name: checkpoint.shape(name) for name in checkpoint.names()}
        self.disk_names = checkpoint.disk_names()
        self.vision = VisionFrontEnd(self.hf_config, checkpoint, with_tower=g.first_stage,
                                     dtype=dtype, device=self.device)
        self.load_decoder(checkpoint.get)
        if freeze_vision_tower and self.vision.visual is not None:
            self.vision.visual.requires_grad_(False)

    # ------------------------------------------------------------------ parameters

    def named_params(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """The GPTModel's parameters (Megatron names), then the vision tower's (HF names)."""
        yield from self.gpt.named_parameters()
        if self.vision.visual is not None:
            for name, p in self.vision.visual.named_parameters():
                yield VISUAL + name, p

    def params(self) -> list[torch.nn.Parameter]:
        """The trainable parameters (the optimiser's)."""
        return [p for _, p in self.named_params() if p.requires_grad]

    def local_rules(self) -> list[Rule]:
        return [r for r in self.rules if r.stage == self.grid.pp_rank]

    def tp_group(self) -> Any:
        # megatron-core: imported only when the megatron backend runs
        from megatron.core import parallel_state as ps

        return ps.get_tensor_model_parallel_group() if self.grid.tp > 1 else None

    def eval_mode(self) -> None:
        self.gpt.eval()
        if self.vision.visual is not None:
            self.vision.visual.eval()

    def train_mode(self) -> None:
        self.gpt.train()
        if self.vision.visual is not None:
            self.vision.visual.train()

    # ------------------------------------------------------------------ HF tensors in / out

    def load_decoder(self, hf_tensor: Callable[[str], Tensor],
                     target: Callable[[str], Tensor] | None = None) -> None:
        """Copy this rank's shards of the HF decoder tensors (``hf_tensor(hf_name)``) into
        the GPTModel (or into ``target(megatron_name)``, e.g. optimiser moments)."""
        params = dict(self.gpt.named_parameters())
        covered = set()
        for rule in self.local_rules():
            hf = [hf_tensor(name) for name in rule.hf]
            piece = shard(rule, hf, self.geometry, self.grid.tp_rank)
            dest = params[rule.megatron] if target is None else target(rule.megatron)
            if dest.shape != piece.shape:
                raise ValueError(f"{rule.megatron}: HF tensors {rule.hf} give a shard of shape "
                                 f"{tuple(piece.shape)}, the model has {tuple(dest.shape)}")
            with torch.no_grad():
                dest.copy_(piece)
            covered.add(rule.megatron)
        missing = sorted(set(params) - covered)
        if target is None and missing:
            raise RuntimeError(f"no HF weights mapped to Megatron parameters {missing[:5]}")

    def gather(self, local: Callable[[str], Tensor | None]) -> Iterator[tuple[str, Tensor]]:
        """Full HF tensors from ``local(name)`` shards: vision tower, then the decoder.
        Collective: every rank must consume the iterator to the end."""
        # megatron-core: imported only when the megatron backend runs
        from megatron.core import parallel_state as ps

        g = self.grid
        pp_group = ps.get_pipeline_model_parallel_group() if g.pp > 1 else None
        stage_ranks = dist.get_process_group_ranks(pp_group) if pp_group is not None else [0]
        vision = [Rule(name, (name,), "replicated", 0)
                  for name in sorted(self.hf_shapes) if name.startswith(VISUAL)]
        # The last stage's copy of a tied embedding is not an HF tensor of its own.
        decoder = [r for r in self.rules
                   if not (g.pp > 1 and is_tied_copy(r, self.spec.tied_embeddings))]
        yield from gather_hf(vision + decoder, local, self.geometry, g.pp_rank,
                             self.tp_group(), pp_group, lambda stage: stage_ranks[stage],
                             lambda name: (self.hf_shapes[name], self.dtype))

    def own_shards(self) -> ShardedWeights:
        """This rank's own pieces of the HF tensors (vision tower whole, then the decoder in
        HF order), for a rollout engine with the same tensor parallelism in the same
        processes; no communication (:func:`.weights.rank_shards`). One pipeline stage only:
        with PP > 1 a rank holds only its stage's layers, and the engine needs them all."""
        g = self.grid
        if g.pp > 1:
            raise ValueError(f"own_shards: pipeline_parallel={g.pp}; a rollout engine in the "
                             "trainer's processes needs pipeline_parallel=1")
        params = dict(self.named_params())

        def shards() -> Iterator[WeightShard]:
            for name in sorted(self.hf_shapes):
                if name.startswith(VISUAL):
                    yield WeightShard(name, params[name].detach())
            yield from rank_shards(self.rules, params.get, self.geometry, g.tp_rank)

        return ShardedWeights(tp_rank=g.tp_rank, tp_size=g.tp, shards=shards())
