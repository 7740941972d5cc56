"""The part of Qwen-VL that stays a transformers module: vision tower and M-RoPE positions.

Qwen2.5-VL's tower returns the embeddings of the vision placeholder tokens; Qwen3-VL's (patch
16, learned position grid) returns those plus its deepstack levels, which
:meth:`VisionFrontEnd.scatter_features` hands back aligned with the vision tokens for
:mod:`.deepstack`.

The vision tower is small next to the language model (~0.7B of Qwen2.5-VL-7B), so every
tensor-parallel rank of the first pipeline stage keeps a full replica: given the same pixels
all replicas compute the same features, and the gradients that reach them are the same too
(the decoder's input gradient is all-reduced by its column-parallel layers), so the replicas
stay equal without any extra communication inside a TP group.

Multimodal RoPE positions come from transformers' own ``get_rope_index`` so that they match
the HF model token for token; every pipeline stage needs them (each attention layer applies
the rotation), the vision tower only the first.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
import transformers
from torch import Tensor

from evr1.train.backends.megatron.weights import HFCheckpoint

VISUAL_PREFIX = "model.visual."

# model_type -> (transformers model class whose get_rope_index gives the positions, its
# package under transformers.models, the vision tower class in that package's modeling module).
_CLASSES = {
    "qwen2_5_vl": ("Qwen2_5_VLModel", "qwen2_5_vl", "Qwen2_5_VisionTransformerPretrainedModel"),
    "qwen3_vl": ("Qwen3VLModel", "qwen3_vl", "Qwen3VLVisionModel"),
}
# (pixels, grid, placeholder token id) of each vision modality, in transformers' order.
_MODALITIES = (("pixel_values", "image_grid_thw", "image_token_id"),
               ("pixel_values_videos", "video_grid_thw", "video_token_id"))


class VisionFrontEnd(torch.nn.Module):
    """Vision features and 3-D positions of a Qwen2.5-VL or Qwen3-VL batch.

    ``with_tower=False`` (later pipeline stages) builds no vision weights at all.
    """

    def __init__(self, hf_config: Any, checkpoint: HFCheckpoint | None, *, with_tower: bool,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()

        self.config = hf_config
        model_class, _, _ = _CLASSES[hf_config.model_type]
        # A model shell on the meta device gives get_rope_index (which only reads the config)
        # without allocating the language model a second time.
        with torch.device("meta"):
            shell = getattr(transformers, model_class)(hf_config)
        shell.language_model = None
        shell.visual = None
        self._shell = [shell]  # a list: not a registered submodule, so not in parameters()
        self.visual: torch.nn.Module | None = None
        if with_tower:
            self.visual = self._load_tower(hf_config, checkpoint, dtype, device)

    @staticmethod
    def _load_tower(hf_config: Any, checkpoint: HFCheckpoint | None, dtype: torch.dtype,
                    device: torch.device) -> torch.nn.Module:
        _, module, tower_class = _CLASSES[hf_config.model_type]
        modeling = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
        tower = getattr(modeling, tower_class)._from_config(hf_config.vision_config)
        if checkpoint is not None:
            names = [n for n in checkpoint.names() if n.startswith(VISUAL_PREFIX)]
            state = {n[len(VISUAL_PREFIX):]: checkpoint.get(n) for n in names}
            tower.load_state_dict(state, strict=True)
        return tower.to(device=device, dtype=dtype)

    # ------------------------------------------------------------------ positions

    def positions(self, inputs: dict[str, Any]) -> Tensor:
        """``[3, B, L]`` M-RoPE position ids, exactly as the HF model computes them.

        With vision input: ``get_rope_index`` (padding-aware). Without: transformers falls
        back to ``arange(L)`` for every row, and so does this, so that text-only batches match
        the HF forward too.
        """
        ids = inputs["input_ids"]
        image_grid = inputs.get("image_grid_thw")
        video_grid = inputs.get("video_grid_thw")
        types = inputs.get("mm_token_type_ids")
        if types is not None and (image_grid is not None or video_grid is not None):
            positions, _ = self._shell[0].get_rope_index(
                ids, mm_token_type_ids=types, image_grid_thw=image_grid,
                video_grid_thw=video_grid, second_per_grid_ts=inputs.get("second_per_grid_ts"),
                attention_mask=inputs.get("attention_mask"))
            return positions.to(ids.device)
        batch, length = ids.shape
        return torch.arange(length, device=ids.device).view(1, 1, -1).expand(3, batch, -1)

    # ------------------------------------------------------------------ features

    def visual_mask(self, ids: Tensor, inputs: dict[str, Any]) -> Tensor:
        """``[B, S]``: the placeholder tokens of ``ids`` that vision features replace (those
        of the modalities whose pixels the batch has), as transformers' ``visual_pos_masks``.
        Every pipeline stage can compute it: it needs no tower."""
        mask = torch.zeros_like(ids, dtype=torch.bool)
        for pixels_key, _, token_key in _MODALITIES:
            if inputs.get(pixels_key) is not None:
                mask |= ids == getattr(self.config, token_key)
        return mask

    def scatter_features(self, embeds: Tensor, ids: Tensor,
                         inputs: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
        """Replace the image/video placeholder rows of ``embeds [B, S, H]`` (token ids
        ``ids [B, S]``) by the vision tower's features, in row-major token order.

        Also returns Qwen3-VL's deepstack levels ``[levels, N, H]``, row n belonging to the
        n-th token of :meth:`visual_mask` (images and videos interleaved as in the sequence,
        like transformers' joint deepstack embeddings); None without vision input or
        deepstack.
        """
        visual = self.visual_mask(ids, inputs)
        deepstack = None
        for pixels_key, grid_key, token_key in _MODALITIES:
            pixels = inputs.get(pixels_key)
            if pixels is None:
                continue
            if self.visual is None:
                raise RuntimeError("vision input reached a pipeline stage without the tower")
            out = self.visual(pixels.to(self._dtype()), grid_thw=inputs[grid_key])
            features = out.pooler_output.to(embeds.dtype)
            mask = ids == getattr(self.config, token_key)
            if int(mask.sum()) != features.shape[0]:
                raise ValueError(f"{pixels_key}: {features.shape[0]} vision features for "
                                 f"{int(mask.sum())} placeholder tokens (a response must not "
                                 "contain vision placeholder tokens)")
            embeds = embeds.masked_scatter(mask[..., None], features)
            levels = getattr(out, "deepstack_features", None)
            if levels:
                if deepstack is None:
                    deepstack = embeds.new_zeros(len(levels), int(visual.sum()),
                                                 embeds.shape[-1])
                # This modality's rows among all vision tokens (a copy, no arithmetic).
                deepstack[:, mask[visual]] = torch.stack(levels).to(embeds.dtype)
        return embeds, deepstack

    def _dtype(self) -> torch.dtype:
        assert self.visual is not None
        return next(self.visual.parameters()).dtype
