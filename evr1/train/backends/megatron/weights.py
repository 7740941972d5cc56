"""Hugging Face <-> megatron-core weight mapping for the Qwen2.5-VL / Qwen3-VL language model.

Every HF tensor of the decoder maps to one Megatron parameter by one of a few rules; each rule
knows how to cut the HF tensor(s) into this rank's tensor-parallel shard and how to put the
gathered shards back together, so that load -> export is bit-exact (only slicing,
concatenation and views, never arithmetic).

* ``replicated``: norms (and the vision tower): every TP rank holds the whole tensor. That
  includes Qwen3-VL's per-head Q/K norms (``q_norm`` / ``k_norm`` ->
  ``q_layernorm`` / ``k_layernorm``), whose gradient is per-rank partial (:data:`HEAD_NORMS`).
* ``column`` / ``row``: split along the output (dim 0) / input (dim 1) features.
* ``vocab``: embedding and output rows, zero-padded to a multiple of TP first.
* ``qkv``: Q, K and V fused into ``linear_qkv`` in Megatron's per-group layout: for each of
  the G query groups, that group's query heads, then its key head, then its value head
  (``[G, (heads/G + 2) * head_dim, ...]``); TP rank r holds groups r*G/tp .. (r+1)*G/tp.
* ``gate_up``: gate and up projections fused into ``linear_fc1``; every TP rank holds
  ``[its slice of gate; its slice of up]``, which is what the SwiGLU split expects.

Names: in memory transformers 5 calls the decoder ``model.language_model.*`` and the tower
``model.visual.*``. On disk Qwen2.5-VL folders (released, and as transformers 5 writes them)
use ``model.*`` and ``visual.*``, Qwen3-VL folders the in-memory names. :class:`HFCheckpoint`
reads either and hands out the in-memory names; an exported folder names every tensor as the
source folder did (:meth:`HFCheckpoint.disk_names`).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from evr1.rollout.base import WeightShard

LM = "model.language_model."
Kind = Literal["replicated", "column", "row", "vocab", "qkv", "gate_up"]
# Q/K norms act on each TP rank's own heads: the weight is replicated, but a rank's gradient
# covers its heads only and must be summed over TP (as megatron's finalize_model_grads does).
HEAD_NORMS = ("self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight")


# --------------------------------------------------------------------------- names


def memory_name(name: str) -> str:
    """Checkpoint name -> transformers 5 in-memory name (identity for new-style names)."""
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model.") and not name.startswith((LM, "model.visual.")):
        return LM + name[len("model."):]
    return name


class HFCheckpoint:
    """Lazy reader of the safetensors files of an HF folder (one or sharded)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.folder} has no *.safetensors weights")
        self._where: dict[str, tuple[Path, str]] = {}
        for file in files:
            with safe_open(str(file), "pt") as f:
                for key in f.keys():
                    self._where[memory_name(key)] = (file, key)
        self._open: dict[Path, object] = {}

    def names(self) -> list[str]:
        return list(self._where)

    def disk_names(self) -> dict[str, str]:
        """In-memory name -> the name this folder stores the tensor under."""
        return {name: key for name, (_, key) in self._where.items()}

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> Tensor:
        file, key = self._locate(name)
        return self._handle(file).get_tensor(key)  # type: ignore[attr-defined]

    def shape(self, name: str) -> torch.Size:
        """The tensor's shape, read from the file header (the tensor is not loaded)."""
        file, key = self._locate(name)
        return torch.Size(self._handle(file).get_slice(key).get_shape())  # type: ignore[attr-defined]

    def _locate(self, name: str) -> tuple[Path, str]:
        if name not in self._where:
            raise KeyError(f"{self.folder}: no tensor {name!r} in the checkpoint")
        return self._where[name]

    def _handle(self, file: Path) -> object:
        handle = self._open.get(file)
        if handle is None:
            handle = self._open[file] = safe_open(str(file), "pt")
        return handle


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rule:
    """One Megatron parameter and the HF tensor(s) it is made of."""

    megatron: str  # name in this stage's GPTModel
    hf: tuple[str, ...]
    kind: Kind
    stage: int  # pipeline stage that owns it


@dataclass(frozen=True)
class Geometry:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    padded_vocab: int
    tp: int


@dataclass(frozen=True)
class LayerKind:
    """What a decoder layer has beyond the common Qwen decoder layer."""

    te_fused_norms: bool  # Transformer Engine spec (norms fused into the next linear layer)
    qkv_bias: bool  # Qwen2.5-VL
    qk_norm: bool  # Qwen3-VL


def layer_rules(layer: int, local: int, stage: int, kind: LayerKind) -> list[Rule]:
    """Rules of decoder layer ``layer`` (global index), which is layer ``local`` of its stage.

    With the Transformer Engine spec the pre-attention and pre-MLP norms are fused into the
    following linear layer and are named ``...linear_qkv.layer_norm_weight`` and
    ``...linear_fc1.layer_norm_weight``.
    """
    hf = f"{LM}layers.{layer}."
    mg = f"decoder.layers.{local}."
    attn_norm = "self_attention.linear_qkv.layer_norm_weight" if kind.te_fused_norms \
        else "input_layernorm.weight"
    mlp_norm = "mlp.linear_fc1.layer_norm_weight" if kind.te_fused_norms \
        else "pre_mlp_layernorm.weight"
    q, k, v = (f"{hf}self_attn.{p}_proj" for p in "qkv")
    rules = [
        Rule(mg + attn_norm, (hf + "input_layernorm.weight",), "replicated", stage),
        Rule(mg + "self_attention.linear_qkv.weight", (q + ".weight", k + ".weight",
                                                       v + ".weight"), "qkv", stage),
    ]
    if kind.qkv_bias:
        rules.append(Rule(mg + "self_attention.linear_qkv.bias",
                          (q + ".bias", k + ".bias", v + ".bias"), "qkv", stage))
    rules.append(Rule(mg + "self_attention.linear_proj.weight", (hf + "self_attn.o_proj.weight",),
                      "row", stage))
    if kind.qk_norm:
        q_norm, k_norm = HEAD_NORMS
        rules += [Rule(mg + q_norm, (hf + "self_attn.q_norm.weight",), "replicated", stage),
                  Rule(mg + k_norm, (hf + "self_attn.k_norm.weight",), "replicated", stage)]
    return rules + [
        Rule(mg + mlp_norm, (hf + "post_attention_layernorm.weight",), "replicated", stage),
        Rule(mg + "mlp.linear_fc1.weight", (hf + "mlp.gate_proj.weight",
                                            hf + "mlp.up_proj.weight"), "gate_up", stage),
        Rule(mg + "mlp.linear_fc2.weight", (hf + "mlp.down_proj.weight",), "row", stage),
    ]


def model_rules(num_layers: int, pp: int, tied: bool, kind: LayerKind) -> list[Rule]:
    """All rules of the decoder, every stage, in HF order (embedding, layers, norm, head).

    With tied embeddings and PP > 1 the last stage's output matrix is a copy of the
    embedding; its rule (``hf`` = the embedding) is listed after the head position and marked
    by ``stage = pp - 1``; export skips it (the HF folder stores the tied matrix once).
    """
    per_stage = num_layers // pp
    rules = [Rule("embedding.word_embeddings.weight", (f"{LM}embed_tokens.weight",), "vocab", 0)]
    for layer in range(num_layers):
        stage = layer // per_stage
        rules += layer_rules(layer, layer - stage * per_stage, stage, kind)
    rules.append(Rule("decoder.final_layernorm.weight", (f"{LM}norm.weight",), "replicated",
                      pp - 1))
    if not tied:
        rules.append(Rule("output_layer.weight", ("lm_head.weight",), "vocab", pp - 1))
    elif pp > 1:
        rules.append(Rule("output_layer.weight", (f"{LM}embed_tokens.weight",), "vocab", pp - 1))
    return rules


def is_tied_copy(rule: Rule, tied: bool) -> bool:
    return tied and rule.megatron == "output_layer.weight"


# --------------------------------------------------------------------------- shard / unshard


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, g: Geometry) -> Tensor:
    per_group = g.num_heads // g.num_kv_heads
    tail = q.shape[1:]
    parts = (q.reshape(g.num_kv_heads, per_group * g.head_dim, *tail),
             k.reshape(g.num_kv_heads, g.head_dim, *tail),
             v.reshape(g.num_kv_heads, g.head_dim, *tail))
    return torch.cat(parts, dim=1).reshape(-1, *tail)


def split_qkv(fused: Tensor, g: Geometry) -> tuple[Tensor, Tensor, Tensor]:
    per_group = g.num_heads // g.num_kv_heads
    tail = fused.shape[1:]
    grouped = fused.reshape(g.num_kv_heads, (per_group + 2) * g.head_dim, *tail)
    q, k, v = grouped.split([per_group * g.head_dim, g.head_dim, g.head_dim], dim=1)
    return (q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail))


def shard(rule: Rule, tensors: list[Tensor], g: Geometry, rank: int) -> Tensor:
    """This TP rank's piece of the Megatron parameter built from the HF ``tensors``."""
    if rule.kind == "replicated":
        return tensors[0]
    if rule.kind == "column":
        return tensors[0].chunk(g.tp, 0)[rank]
    if rule.kind == "row":
        return tensors[0].chunk(g.tp, 1)[rank]
    if rule.kind == "vocab":
        full = tensors[0]
        pad = g.padded_vocab - full.shape[0]
        if pad:
            full = torch.cat([full, full.new_zeros(pad, *full.shape[1:])])
        return full.chunk(g.tp, 0)[rank]
    if rule.kind == "qkv":
        return fuse_qkv(*tensors, g).chunk(g.tp, 0)[rank]
    if rule.kind == "gate_up":
        gate, up = tensors
        return torch.cat([gate.chunk(g.tp, 0)[rank], up.chunk(g.tp, 0)[rank]])
    raise ValueError(f"unknown rule kind {rule.kind!r}")


def unshard(rule: Rule, shards: list[Tensor], g: Geometry) -> list[Tensor]:
    """The HF tensor(s) of ``rule`` from all TP ranks' shards (in rank order)."""
    if rule.kind == "replicated":
        return [shards[0]]
    if rule.kind == "row":
        return [torch.cat(shards, 1)]
    full = torch.cat(shards, 0)
    if rule.kind == "column":
        return [full]
    if rule.kind == "vocab":
        return [full[:g.vocab_size]]
    if rule.kind == "qkv":
        return list(split_qkv(full, g))
    if rule.kind == "gate_up":
        halves = [s.chunk(2, 0) for s in shards]
        return [torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])]
    raise ValueError(f"unknown rule kind {rule.kind!r}")


def is_tp_sharded(rule: Rule) -> bool:
    return rule.kind != "replicated"


# --------------------------------------------------------------------------- own shards (rollouts)


def rank_shards(rules: list[Rule], local: Callable[[str], Tensor | None], g: Geometry,
                tp_rank: int) -> Iterator[WeightShard]:
    """This TP rank's pieces of the HF tensors of ``rules`` (this stage's), cut from its own
    Megatron shards alone: no communication, only views and per-rank reshapes.

    Each HF tensor piece is chunk ``tp_rank`` of its tensor, as :func:`shard` cut it: q/k/v out
    of this rank's query groups of ``linear_qkv`` (Megatron interleaves them per group: q heads,
    k head, v head of group 0, then group 1, ...; the HF tensors, like vLLM's fused
    ``qkv_proj``, hold all q heads, then all k, then all v, so a rank's groups give the rank's
    slice of each), gate/up as the two halves of ``linear_fc1``, o/down along their input
    features, the vocabulary matrices as rows without the padding rows. Replicated tensors
    (norms) go whole.
    """
    # The same geometry over this rank's heads: its linear_qkv is the fused layout of them.
    mine_g = replace(g, num_heads=g.num_heads // g.tp, num_kv_heads=g.num_kv_heads // g.tp)
    for rule in rules:
        mine = local(rule.megatron)
        if mine is None:
            raise KeyError(f"this rank has no parameter {rule.megatron}")
        mine = mine.detach()
        if rule.kind == "replicated":
            yield WeightShard(rule.hf[0], mine)
        elif rule.kind in ("column", "row"):
            dim = 0 if rule.kind == "column" else 1
            yield _split(rule.hf[0], mine, dim, g.tp)
        elif rule.kind == "vocab":
            rows = mine.shape[0]  # padded_vocab / tp
            real = max(0, min(rows, g.vocab_size - tp_rank * rows))
            if g.tp == 1:
                yield WeightShard(rule.hf[0], mine[:real])
                continue
            yield WeightShard(rule.hf[0], mine[:real], dim=0, chunk=rows, size=g.vocab_size,
                              vocab=True)
        elif rule.kind == "qkv":
            for name, piece in zip(rule.hf, split_qkv(mine, mine_g), strict=True):
                yield _split(name, piece, 0, g.tp)
        elif rule.kind == "gate_up":
            for name, piece in zip(rule.hf, mine.chunk(2, 0), strict=True):
                yield _split(name, piece, 0, g.tp)
        else:
            raise ValueError(f"unknown rule kind {rule.kind!r}")


def _split(name: str, piece: Tensor, dim: int, tp: int) -> WeightShard:
    """Chunk of ``tp`` equal chunks along ``dim``; with one rank, the whole tensor."""
    if tp == 1:
        return WeightShard(name, piece)
    return WeightShard(name, piece, dim=dim, chunk=piece.shape[dim],
                       size=piece.shape[dim] * tp)


# --------------------------------------------------------------------------- gather for export


def gather_hf(rules: list[Rule], local: Callable[[str], Tensor | None], g: Geometry,
              pp_rank: int, tp_group: object, pp_group: object | None,
              pp_src: Callable[[int], int], hf_meta: Callable[[str], tuple[torch.Size,
                                                                          torch.dtype]],
              ) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(hf_name, full tensor)`` for every rule, on every rank.

    ``local(megatron_name)`` gives this rank's shard (stage-local name) or None when the
    stage does not own it. Collective: every rank of the job must iterate to the end, in the
    same order. TP shards are all-gathered within the owning stage; with PP > 1 each full
    tensor is then broadcast from the owning stage to the others (``pp_src(stage)`` is that
    stage's global rank in this rank's pipeline group).
    """
    for rule in rules:
        tensors: list[Tensor] | None = None
        if rule.stage == pp_rank:
            mine = local(rule.megatron)
            if mine is None:
                raise KeyError(f"stage {pp_rank} has no parameter {rule.megatron}")
            mine = mine.detach().contiguous()
            if is_tp_sharded(rule) and g.tp > 1:
                shards = [torch.empty_like(mine) for _ in range(g.tp)]
                dist.all_gather(shards, mine, group=tp_group)
            else:
                shards = [mine]
            tensors = unshard(rule, shards, g)
        for i, name in enumerate(rule.hf):
            if pp_group is None:
                assert tensors is not None
                yield name, tensors[i]
                continue
            if tensors is None:
                shape, dtype = hf_meta(name)
                out = torch.empty(shape, dtype=dtype, device=_device())
            else:
                out = tensors[i].contiguous()
            dist.broadcast(out, src=pp_src(rule.stage), group=pp_group)
            yield name, out


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


# --------------------------------------------------------------------------- HF folder export


def write_hf_folder(folder: Path, source: Path, tensors: Iterator[tuple[str, Tensor]],
                    disk_names: Mapping[str, str], *, max_shard_bytes: int = 4 << 30) -> None:
    """Write ``tensors`` (in-memory HF names) as safetensors under ``disk_names[name]`` (the
    source folder's names), plus every non-weight file of ``source`` (config, tokenizer,
    processor, templates)."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and not re.search(r"\.safetensors(\.index\.json)?$", path.name):
            shutil.copy2(path, folder / path.name)
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][disk_names[name]] = tensor.detach().cpu().contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    index: dict[str, str] = {}
    for i, part in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(part, str(folder / file), metadata={"format": "pt"})
        index.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for part in shards for t in part.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": index}, indent=2))
