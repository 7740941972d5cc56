"""One pipeline stage's forward of one micro-batch, and the log-probs on the last stage.

The first stage embeds the tokens, scatters the vision features into the embeddings and
passes the result to the ``GPTModel`` as ``decoder_input``; the other stages take the hidden
states received from the stage before (:mod:`.schedule` moves them). On the last stage the
output layer sees only the positions that predict response tokens: the logits of a long video
prompt are never computed. Log-probs come from the vocab-parallel logits (:mod:`.logprobs`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from evr1.train.backends.megatron.deepstack import add_after_layers, visual_index
from evr1.train.backends.megatron.logprobs import mask_padded_vocab, vocab_parallel_logprobs
from evr1.train.backends.megatron.packing import TokenLayout, build_layout
from evr1.train.backends.megatron.shards import LocalModel
from evr1.train.batch import PolicyBatch


class StageForward:
    """Forward of this rank's stage. ``temperature``: the sampler's (log-probs are those of
    the tempered distribution); ``sequence_packing``: ``train.megatron.sequence_packing``."""

    def __init__(self, model: LocalModel, temperature: float, sequence_packing: bool):
        self.model = model
        self.temperature = temperature
        self.sequence_packing = sequence_packing

    def layout(self, batch: PolicyBatch) -> TokenLayout:
        m = self.model
        inputs = batch.model_inputs
        positions = m.vision.positions(inputs)
        # Transformer Engine's fused attention gets no dense mask: with it, micro-batches are
        # always packed (THD), which is also its fast path.
        packed = self.sequence_packing or m.use_te
        layout = build_layout(inputs, batch.responses, batch.mask, positions, packed=packed,
                              thd=m.use_te)
        return _to_device(layout, m.device)

    @contextlib.contextmanager
    def _project_only(self, index: Tensor) -> Iterator[None]:
        """Make the output layer see only the hidden states at ``index`` (flat s * B + b)."""
        def select(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            hidden = args[0]
            picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)[:, None]
            return (picked, *args[1:]), kwargs

        handle = self.model.gpt.output_layer.register_forward_pre_hook(select, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def __call__(self, batch: PolicyBatch, layout: TokenLayout, received: Tensor | None,
                 deepstack: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """This stage's output: hidden states ``[S, B, H]`` for the next stage, or on the last
        stage the tempered vocab-parallel logits ``[K, V/tp]`` at the response positions.

        Also returns the micro-batch's deepstack levels ``[levels, N, H]`` (Qwen3-VL with
        vision input, else None): computed here on the first stage, ``deepstack`` (from the
        previous stage) on the others; they are added inside this stage's first layers.
        """
        m = self.model
        decoder_input = None
        if m.grid.first_stage:
            embeds = m.gpt.embedding(input_ids=layout.ids, position_ids=None)  # [S, B, H]
            embeds, deepstack = m.vision.scatter_features(
                embeds.transpose(0, 1), layout.ids, _inputs_on(batch, m.device))
            decoder_input = embeds.transpose(0, 1).contiguous()
        else:
            m.gpt.set_input_tensor(received)
        with contextlib.ExitStack() as hooks:
            if deepstack is not None:
                index = visual_index(m.vision.visual_mask(layout.ids, batch.model_inputs))
                hooks.enter_context(add_after_layers(m.gpt.decoder.layers, index, deepstack))
            if m.grid.last_stage:
                hooks.enter_context(self._project_only(layout.logit_index))
            out = m.gpt(input_ids=None, position_ids=layout.positions,
                        attention_mask=layout.attention_mask, decoder_input=decoder_input,
                        packed_seq_params=layout.packed_seq_params)
        if not m.grid.last_stage:
            return out, deepstack
        logits = out[0].float() / self.temperature
        vocab_start = m.grid.tp_rank * logits.shape[-1]
        return mask_padded_vocab(logits, vocab_start, m.spec.vocab_size), deepstack

    def token_logprobs(self, logits: Tensor, layout: TokenLayout) -> Tensor:
        """``[B, R]`` log-probs of the response tokens from the last stage's logits."""
        vocab_start = self.model.grid.tp_rank * logits.shape[-1]
        flat = vocab_parallel_logprobs(logits, layout.targets, vocab_start,
                                       self.model.tp_group())
        return layout.scatter(flat)

    def deepstack_shape(self, batch: PolicyBatch, layout: TokenLayout,
                        stage: int) -> tuple[int, int, int] | None:
        """Shape of the deepstack levels pipeline stage ``stage`` receives from the stage
        before it for this micro-batch, or None when it receives none (no deepstack, no
        vision tokens, or no layer of its own or of a later stage takes them)."""
        m = self.model
        if m.deepstack is None or not m.deepstack.stage_receives(stage):
            return None
        tokens = int(m.vision.visual_mask(layout.ids, batch.model_inputs).sum())
        if not tokens:
            return None
        return m.deepstack.levels, tokens, m.spec.hidden_size


def _to_device(layout: TokenLayout, device: torch.device) -> TokenLayout:
    if device.type == "cpu":
        return layout
    moved = {f.name: getattr(layout, f.name) for f in dataclasses.fields(layout)}
    for key, value in moved.items():
        if isinstance(value, Tensor):
            moved[key] = value.to(device, non_blocking=True)
    params = layout.packed_seq_params
    if params is not None:
        for name in ("cu_seqlens_q", "cu_seqlens_kv"):
            setattr(params, name, getattr(params, name).to(device))
    return TokenLayout(**moved)


def _inputs_on(batch: PolicyBatch, device: torch.device) -> dict[str, Any]:
    if device.type == "cpu":
        return batch.model_inputs
    return {k: v.to(device) if isinstance(v, Tensor) else v
            for k, v in batch.model_inputs.items()}
