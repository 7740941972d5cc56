"""Qwen3-VL deepstack on a megatron-core ``GPTModel``: vision features added inside the decoder.

Qwen3-VL's vision tower returns, besides the embeddings that replace the placeholder tokens,
one more feature map per ``deepstack_visual_indexes`` entry ("levels", 3 in the released
models). transformers (``Qwen3VLTextModel``) adds level l to the hidden states at the vision
token positions right after decoder layer l, for l = 0 .. levels - 1, before the next layer.

Here the levels of a micro-batch are one tensor ``[levels, N, H]`` (N vision tokens, in the
row-major order of the placeholders in the ``[B, S]`` token ids, the order in which
transformers lines them up) and :func:`add_after_layers` registers forward hooks on this
stage's ``TransformerLayer``s that do the same addition on the layer output, in Megatron's
``[S, B, H]`` layout. Sequence parallelism is off in this backend, so every tensor-parallel
rank holds the whole sequence and adds all N rows; the gradient that reaches the features
is the full one on every TP rank (layer outputs are replicated across TP).

With pipeline parallelism the vision tower lives on the first stage only. A later stage that
owns one of the first ``levels`` layers receives the whole ``[levels, N, H]`` tensor from
the previous stage next to the hidden states (:meth:`Deepstack.stage_receives`), and passes
it on while a stage after it still needs it; in the backward pass its gradient travels back
the same way, so the tower gets the gradient of every level.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class Deepstack:
    """Which decoder layers get vision features added: global layers ``0 .. levels - 1``."""

    levels: int
    layers_per_stage: int

    def stage_receives(self, stage: int) -> bool:
        """Whether pipeline stage ``stage`` (> 0) needs the levels from the stage before it:
        it, or a stage after it, owns a layer below ``levels``."""
        return stage > 0 and self.levels > stage * self.layers_per_stage


def visual_index(visual: Tensor) -> Tensor:
    """``[N]`` flat index ``s * B + b`` into the decoder's ``[S, B, H]`` hidden states of the
    vision tokens (``visual [B, S]`` bool), listed in the row-major order of ``visual``."""
    rows, cols = torch.nonzero(visual, as_tuple=True)
    return cols * visual.shape[0] + rows


@contextlib.contextmanager
def add_after_layers(decoder_layers: Any, index: Tensor, levels: Tensor) -> Iterator[None]:
    """Within the context, each layer of ``decoder_layers`` (this stage's
    ``TransformerLayer``s) whose global index l is below ``len(levels)`` adds ``levels[l]``
    to its output hidden states at the flat positions ``index``."""
    handles = []
    for layer in decoder_layers:
        level = layer.layer_number - 1  # megatron numbers layers globally, from 1
        if level < levels.shape[0]:
            handles.append(layer.register_forward_hook(_adder(index, levels[level])))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _adder(index: Tensor, features: Tensor) -> Any:
    def hook(module: Any, args: Any, output: tuple[Tensor, Any]) -> tuple[Tensor, Any]:
        hidden, context = output
        flat = hidden.reshape(-1, hidden.shape[-1])
        # One addition per vision row, like transformers' hidden[mask] + features; the
        # out-of-place index_add keeps the layer's output intact for autograd.
        added = flat.index_add(0, index, features.to(hidden.dtype))
        return added.view_as(hidden), context

    return hook
