"""Training backend ``hf``: plain PyTorch over a transformers Qwen-VL model (CPU default).

One ``train_step`` is one optimiser step over a list of micro-batches (gradient accumulation):
every micro-batch's loss is divided by the token (or sequence) count of the whole step, so the
accumulated gradient equals the full-batch gradient whatever the micro-batch sizes
(see ``evr1.train.grpo``). The rollout batch is used for exactly one optimiser step, so the
"old" policy is the current one: its log-probs are the detached log-probs of the same forward.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor
from transformers.modeling_outputs import BaseModelOutputWithPooling

from evr1.config import GRPOConfig, TrainConfig
from evr1.train.backends.base import accumulate_metrics, grpo_terms, lr_lambda, step_metrics
from evr1.train.batch import PolicyBatch
from evr1.train.grpo import (
    loss_normaliser,
    masked_mean,
    token_entropy,
    token_logprobs,
)


class HFBackend:
    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, temperature: float = 1.0):
        self.model = model
        self.cfg = cfg
        # Log-probs of the tempered distribution the sampler drew from.
        self.temperature = temperature if temperature > 0 else 1.0
        if cfg.freeze_vision_tower:
            model.model.visual.requires_grad_(False)
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
            betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.ref_model = None
        if cfg.grpo.kl_coef > 0:  # the frozen starting policy, only when the KL term is used
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)

    # ------------------------------------------------------------------ forward

    def _logits(self, model: torch.nn.Module, batch: PolicyBatch) -> Tensor:
        """Logits that predict the response tokens, [B, R, V] (fp32, divided by temperature).

        With ``train.shared_prefix`` (default) each distinct prompt of the micro-batch runs
        once and its KV cache is shared by its responses (:func:`shared_prefix_logits`);
        otherwise every row runs prompt + response (vision once per prompt on Qwen2.5-VL).
        """
        width = batch.responses.shape[1]
        inputs = {k: v.to(model.device) if isinstance(v, Tensor) else v
                  for k, v in batch.model_inputs.items()}
        if self.cfg.shared_prefix and batch.owners and \
                model.config.model_type in SHARED_PREFIX_MODELS:
            return shared_prefix_logits(model, inputs, batch.owners, batch.data_types,
                                        width) / self.temperature
        if model.config.model_type == "qwen2_5_vl" and batch.owners:
            inputs = shared_vision_inputs(model, inputs, batch.owners, batch.data_types)
        out = model(**inputs, logits_to_keep=width + 1, use_cache=False)
        return out.logits[:, :-1].float() / self.temperature

    @torch.no_grad()
    def logprobs(self, batch: PolicyBatch) -> Tensor:
        """Per-token log-probs of the batch's responses under the current weights, [B, R]."""
        logits = self._logits(self.model, batch)
        return token_logprobs(logits, batch.to(logits.device).responses)

    # ------------------------------------------------------------------ update

    def train_step(self, batches: list[PolicyBatch], grpo: GRPOConfig) -> dict[str, float]:
        self.model.train()
        start = time.perf_counter()
        normaliser = sum(loss_normaliser(b.mask, grpo.loss_agg) for b in batches)
        totals: dict[str, float] = {}
        tokens = 0
        for batch in batches:
            logits = self._logits(self.model, batch)
            batch.to(logits.device)
            logp = token_logprobs(logits, batch.responses)
            old_logp = logp.detach()
            entropy = token_entropy(logits) if grpo.entropy_coef > 0 else None
            ref_logp = None
            if self.ref_model is not None:
                with torch.no_grad():
                    ref_logp = token_logprobs(self._logits(self.ref_model, batch),
                                              batch.responses)
            loss, metrics = grpo_terms(logp, old_logp, batch, grpo, ref_logp=ref_logp,
                                       entropy=entropy, normaliser=normaliser)
            loss.backward()
            if entropy is None:
                with torch.no_grad():
                    metrics.entropy_mean = masked_mean(token_entropy(logits.detach()),
                                                        batch.mask)
            n = batch.num_tokens
            tokens += n
            accumulate_metrics(totals, metrics, n)
            totals["loss"] = totals.get("loss", 0.0) + float(loss.detach())
        # max_norm inf: the norm is measured and nothing is scaled (train.grad_clip = 0: off)
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        out = step_metrics(totals, tokens)
        out.update(loss=totals.get("loss", 0.0), grad_norm=float(grad_norm), lr=lr,
                   train_tokens=tokens, time_update=time.perf_counter() - start)
        return out

    def skip_update(self) -> dict[str, float]:
        """A step with nothing to train on (every group filtered out): no optimiser step, but
        the learning-rate schedule advances with the step counter, as a real step would."""
        lr = self.scheduler.get_last_lr()[0]
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": meant so
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        return {"lr": lr, "skipped_update": 1}

    # ------------------------------------------------------------------ state

    def named_hf_weights(self) -> Iterator[tuple[str, Tensor]]:
        yield from self.model.state_dict().items()

    def save(self, folder: Path) -> None:
        """Model (HF safetensors) + optimizer and scheduler state."""
        self.model.save_pretrained(folder / "model", safe_serialization=True)
        torch.save({"optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict()}, folder / "optimizer.pt")

    def load(self, folder: Path) -> None:
        # from_pretrained applies transformers' own checkpoint key mapping (saved names differ
        # from module names in transformers 5), then the tensors are copied in place so the
        # optimizer keeps pointing at the same parameters.
        saved = type(self.model).from_pretrained(folder / "model", dtype=self.model.dtype)
        self.model.load_state_dict(saved.state_dict())
        # map_location: a checkpoint written on a GPU also resumes on a CPU-only machine;
        # load_state_dict moves the moments to the parameters' device either way.
        opt = torch.load(folder / "optimizer.pt", weights_only=True, map_location="cpu")
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])


_VISION_INPUTS = (("image", "pixel_values", "image_grid_thw", "get_image_features"),
                  ("video", "pixel_values_videos", "video_grid_thw", "get_video_features"))


def shared_vision_inputs(model: torch.nn.Module, inputs: dict, owners: list[int],
                         data_types: list[str]) -> dict:
    """Run the vision tower once per distinct prompt instead of once per response.

    The n responses of a group share the prompt's frames; transformers accepts precomputed
    vision features (``mm_encoder_outputs``), and the gradient of a shared feature is the sum
    over the rows that use it, exactly what the repeated computation gives. At n=8 this removes
    7/8 of the vision tower's forward and backward work.
    """
    inputs = dict(inputs)
    encoded = {}
    for kind, pixel_key, grid_key, encoder in _VISION_INPUTS:
        if inputs.get(pixel_key) is None:
            continue
        grids = inputs[grid_key]
        chunks = inputs.pop(pixel_key).split(grids.prod(-1).tolist())
        item_owner = [o for o, t in zip(owners, data_types, strict=True) if t == kind]
        first = {}  # owner -> index of its first item
        for i, owner in enumerate(item_owner):
            first.setdefault(owner, i)
        unique = list(first.values())
        features = getattr(model.model, encoder)(
            torch.cat([chunks[i] for i in unique]), grids[unique], return_dict=True).pooler_output
        by_owner = {item_owner[i]: f for i, f in zip(unique, features, strict=True)}
        encoded[kind] = BaseModelOutputWithPooling(
            pooler_output=tuple(by_owner[o] for o in item_owner))
    if encoded:
        inputs["mm_encoder_outputs"] = encoded
    return inputs


# Model types whose training forward can run a shared prompt once (see shared_prefix_logits).
# Qwen3-VL's deepstack features enter at the vision tokens, all in the prompt forward.
SHARED_PREFIX_MODELS = ("qwen2_5_vl", "qwen3_vl")


def shared_prefix_logits(model: torch.nn.Module, inputs: dict, owners: list[int],
                         data_types: list[str], width: int) -> Tensor:
    """Response logits, [B, R, V] fp32, running each distinct prompt once for all its rows.

    ``inputs`` is a :class:`PolicyBatch`'s model inputs: [B, P + R] with left-padded prompts
    and right-padded responses; ``owners`` gives each row's prompt. The rows of one prompt have
    identical prompt columns, so:

    1. the distinct prompts (U rows, with their frames: the vision tower runs once per prompt)
       go through the model once, with ``use_cache=True``, keeping the last position's logits,
       which predict every row's first response token;
    2. the KV cache is indexed by owner to the B rows (differentiable: the gradient of a shared
       key or value is the sum over its rows, what the repeated computation gives);
    3. the response tokens 0..R-2 run on that cache and predict tokens 1..R-1.

    Positions are passed explicitly, the ones the one-pass forward computes: M-RoPE positions
    of the prompt from ``get_rope_index`` (the model's cached ``rope_deltas`` are neither read
    nor written), and the text positions of the response continuing after the prompt's largest.
    Without any vision input the one-pass forward numbers the padded columns 0..P+R-1, and so
    does this. LLM work drops from B x (P + R) to U x P + B x R tokens.
    """
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    rows, total = ids.shape
    prompt_len = total - width
    first: dict[int, int] = {}  # owner -> its first row
    for row, owner in enumerate(owners):
        first.setdefault(owner, row)
    unique = list(first.values())
    slot = {owner: i for i, owner in enumerate(first)}
    row_to_prompt = torch.tensor([slot[o] for o in owners], device=ids.device)

    prompt = {k: v[unique, :prompt_len] for k, v in inputs.items()
              if isinstance(v, Tensor) and v.shape == ids.shape}
    kept_rows = set(unique)
    per_item = {"image": ("pixel_values", "image_grid_thw", ()),
                "video": ("pixel_values_videos", "video_grid_thw", ("second_per_grid_ts",))}
    for kind, (pixel_key, grid_key, extra_keys) in per_item.items():
        if inputs.get(pixel_key) is None:
            continue
        grids = inputs[grid_key]
        chunks = inputs[pixel_key].split(grids.prod(-1).tolist())
        item_rows = [r for r, t in enumerate(data_types) if t == kind]
        if len(item_rows) != len(chunks):
            raise ValueError(f"{len(chunks)} {kind} inputs for {len(item_rows)} {kind} rows")
        keep = [i for i, r in enumerate(item_rows) if r in kept_rows]
        prompt[pixel_key] = torch.cat([chunks[i] for i in keep])
        prompt[grid_key] = grids[keep]
        for key in extra_keys:
            if inputs.get(key) is not None:
                prompt[key] = inputs[key][keep]

    has_vision = any(k in prompt for k in ("image_grid_thw", "video_grid_thw"))
    if has_vision:
        rope = {k: prompt[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
                if k in prompt}
        positions, _ = model.model.get_rope_index(
            prompt["input_ids"], mm_token_type_ids=prompt["mm_token_type_ids"],
            attention_mask=prompt["attention_mask"], **rope)
        start = positions.amax(dim=(0, 2)) + 1  # [U]: first text position after the prompt
    else:
        positions = torch.arange(prompt_len, device=ids.device).view(1, 1, -1).expand(
            3, len(unique), -1)
        start = torch.full((len(unique),), prompt_len, device=ids.device)

    out = model(**prompt, position_ids=positions, use_cache=True, logits_to_keep=1)
    first_logits = out.logits[:, -1:].float()[row_to_prompt]  # [B, 1, V]
    if width == 1:
        return first_logits
    cache = out.cache
    cache.batch_select_indices(row_to_prompt)
    steps = torch.arange(width - 1, device=ids.device)
    response_positions = (start[row_to_prompt, None] + steps).unsqueeze(0).expand(3, -1, -1)
    response_mask = torch.cat([mask[:, :prompt_len], mask[:, prompt_len:total - 1]], dim=1)
    rest = model(input_ids=ids[:, prompt_len:total - 1], attention_mask=response_mask,
                 position_ids=response_positions, cache=cache, use_cache=True)
    return torch.cat([first_logits, rest.logits.float()], dim=1)
