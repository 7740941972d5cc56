"""Training backend ``hf``: plain PyTorch over a transformers Qwen-VL model (CPU default).

One ``train_step`` is one optimiser step over a list of micro-batches (gradient accumulation):
every micro-batch's loss is divided by the token (or sequence) count of the whole step, so the
accumulated gradient equals the full-batch gradient whatever the micro-batch sizes
(see ``evr1.train.grpo``). The rollout batch is used for exactly one optimiser step, so the
"old" policy is the current one: its log-probs are the detached log-probs of the same forward.

Under torchrun / srun with more than one rank the model is sharded over the ranks with FSDP2
(:mod:`evr1.train.backends.fsdp`): every rank is a data-parallel replica that trains on its share
of the step's micro-batches, and the parameters are gathered again after each optimiser step for
the rollout engine. A single process keeps the plain model (no wrapping: FSDP over one rank would
compute the same numbers through DTensors and a process group that a plain ``python`` run does
not have).
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor
from transformers.modeling_outputs import BaseModelOutputWithPooling

from evr1.config import GRPOConfig, TrainConfig
from evr1.train.backends import fsdp
from evr1.train.backends.base import accumulate_metrics, grpo_terms, lr_lambda, step_metrics
from evr1.train.batch import PolicyBatch
from evr1.train.grpo import (
    loss_normaliser,
    masked_mean,
    token_entropy,
    token_logprobs,
)


class HFBackend:
    """GRPO updates of a transformers model in place. ``gradient_checkpointing``
    (``model.gradient_checkpointing``): transformers' activation checkpointing of every decoder
    and vision block, which keeps only the blocks' inputs and recomputes the rest in the
    backward pass (same gradients, less memory, about one more forward of compute)."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, temperature: float = 1.0, *,
                 gradient_checkpointing: bool = False, gather_for_rollouts: bool = True):
        """``gather_for_rollouts`` (FSDP only): keep the whole weights gathered between
        updates, for a rollout engine that generates with ``model`` itself (the ``hf``
        engine). Off for an engine with its own copy (vLLM): the ranks keep their shards only
        and ``named_hf_weights`` gathers one tensor at a time."""
        self.model = model
        self.gather_for_rollouts = gather_for_rollouts
        self.cfg = cfg
        self.gradient_checkpointing = gradient_checkpointing
        if gradient_checkpointing:
            # Non-reentrant: works with inputs that need no gradient (a frozen tower) and with
            # torch.no_grad callers; only active in training mode with gradients enabled, so
            # the hf rollouts that share this model generate with their KV cache as before.
            # (transformers 5.25 renamed gradient_checkpointing_enable; 5.24 has only that)
            enable = getattr(model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})
        # Log-probs of the tempered distribution the sampler drew from.
        self.temperature = temperature if temperature > 0 else 1.0
        if cfg.freeze_vision_tower:
            model.model.visual.requires_grad_(False)
        self.ref_model = None
        if cfg.grpo.kl_coef > 0:  # the frozen starting policy, only when the KL term is used
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        # More than one rank: FSDP2 over all of them (data parallel); the optimiser is built
        # on the sharded parameters, so its moments are sharded too.
        self.sharding: fsdp.Sharding | None = None
        self.ref_sharding: fsdp.Sharding | None = None
        if dist.is_initialized() and dist.get_world_size() > 1:
            self.sharding = fsdp.Sharding(model)
            if self.ref_model is not None:  # stays sharded: only the update runs it
                self.ref_sharding = fsdp.Sharding(self.ref_model)
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
            betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self._after_update()  # ready for the first rollouts

    @property
    def dp_rank(self) -> int:
        """This rank's place among the data-parallel replicas (0 in a single process)."""
        return self.sharding.rank if self.sharding else 0

    @property
    def dp_size(self) -> int:
        """How many data-parallel replicas train together (every rank under FSDP)."""
        return self.sharding.world if self.sharding else 1

    # ------------------------------------------------------------------ forward

    def _logits(self, model: torch.nn.Module, batch: PolicyBatch,
                sharding: fsdp.Sharding | None = None) -> Tensor:
        """Logits that predict the response tokens, [B, R, V] (fp32, divided by temperature).

        With ``train.shared_prefix`` (default) each distinct prompt of the micro-batch runs
        once and its KV cache is shared by its responses (:func:`shared_prefix_logits`);
        otherwise every row runs prompt + response (vision once per prompt on Qwen2.5-VL).
        Under FSDP (``sharding``) the vision tower also runs for the kinds of visual input
        that other ranks have and this batch lacks (:meth:`fsdp.Sharding.vision_stand_ins`).
        """
        width = batch.responses.shape[1]
        inputs = {k: v.to(model.device) if isinstance(v, Tensor) else v
                  for k, v in batch.model_inputs.items()}
        zero = sharding.vision_stand_ins(inputs) if sharding is not None else None
        logits = self._response_logits(model, batch, inputs, width)
        return logits if zero is None else logits + zero

    def _response_logits(self, model: torch.nn.Module, batch: PolicyBatch, inputs: dict,
                         width: int) -> Tensor:
        # The shared-prefix forward hands the prompt's KV cache to the response forward, which
        # a checkpointed layer drops (transformers: a recomputed layer would write the cache
        # twice): with gradient checkpointing every row runs prompt + response.
        if self.cfg.shared_prefix and batch.owners and not self.gradient_checkpointing and \
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
        logits = self._logits(self.model, batch, self.sharding)
        return token_logprobs(logits, batch.to(logits.device).responses)

    # ------------------------------------------------------------------ update

    def train_step(self, batches: list[PolicyBatch], grpo: GRPOConfig) -> dict[str, float]:
        """One optimiser step on this data-parallel replica's micro-batches ``batches``
        (evr1.train.replicas: under FSDP each rank is one replica with its own share). The
        normaliser counts every rank's batches and the ranks' gradients are summed, which
        makes the update the one a single process computes from all of them."""
        self.model.train()
        start = time.perf_counter()
        if self.sharding is not None:
            self.sharding.shard()
        normaliser = self._global(sum(loss_normaliser(b.mask, grpo.loss_agg) for b in batches),
                                  torch.float32)
        # Every rank must run as many forward/backward passes as the others (each pass
        # gathers and reduces across ranks): a rank short of micro-batches repeats one with
        # its loss multiplied by zero, adding nothing.
        most = self._most(len(batches))
        if most and not batches:  # nothing to repeat: the other ranks would wait forever
            raise RuntimeError(
                f"FSDP rank {self.dp_rank}: this replica has no rows to train on while others "
                "have (train.filter_no_signal or train.overlong=mask dropped all of its "
                "groups); use larger train.prompts_per_step per replica or turn those off")
        passes = batches + batches[:1] * (most - len(batches))
        totals: dict[str, float] = {}
        tokens = 0
        for i, batch in enumerate(passes):
            padding = i >= len(batches)
            logits = self._logits(self.model, batch, self.sharding)
            batch.to(logits.device)
            logp = token_logprobs(logits, batch.responses)
            old_logp = logp.detach()
            entropy = token_entropy(logits) if grpo.entropy_coef > 0 else None
            ref_logp = None
            if self.ref_model is not None:
                with torch.no_grad():
                    ref_logits = self._logits(self.ref_model, batch, self.ref_sharding)
                    ref_logp = token_logprobs(ref_logits, batch.responses)
            loss, metrics = grpo_terms(logp, old_logp, batch, grpo, ref_logp=ref_logp,
                                       entropy=entropy, normaliser=normaliser)
            if padding:
                (loss * 0).backward()
                for key in metrics.as_floats():  # same metric names on every rank
                    totals.setdefault(key, 0.0)
                continue
            loss.backward()
            if entropy is None:
                with torch.no_grad():
                    metrics.entropy_mean = masked_mean(token_entropy(logits.detach()),
                                                        batch.mask)
            n = batch.num_tokens
            tokens += n
            accumulate_metrics(totals, metrics, n)
            totals["loss"] = totals.get("loss", 0.0) + float(loss.detach())
        totals["loss"] = totals.get("loss", 0.0)
        totals, tokens = self._sum_over_ranks(totals, tokens)
        # max_norm inf: the norm is measured and nothing is scaled (train.grad_clip = 0: off)
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if isinstance(grad_norm, DTensor):  # FSDP: the norm over every rank's shards
            grad_norm = grad_norm.full_tensor()
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._after_update()  # the updated weights, whole, for the next rollouts
        out = step_metrics(totals, tokens)
        out.update(loss=totals.get("loss", 0.0), grad_norm=float(grad_norm), lr=lr,
                   train_tokens=tokens, time_update=time.perf_counter() - start)
        return out

    def _after_update(self) -> None:
        if self.sharding is not None and self.gather_for_rollouts:
            self.sharding.gather()

    def _global(self, value: float | Tensor, dtype: torch.dtype) -> Tensor:
        """``value`` summed over the data-parallel ranks (itself in a single process)."""
        value = torch.as_tensor(value, dtype=dtype)
        if self.sharding is not None:
            value = value.to(self._comm_device())
            dist.all_reduce(value)
        return value.cpu()

    def _most(self, count: int) -> int:
        """The largest ``count`` over the data-parallel ranks (itself in a single process)."""
        if self.sharding is None:
            return count
        value = torch.tensor(count, dtype=torch.int64, device=self._comm_device())
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return int(value)

    def _sum_over_ranks(self, totals: dict[str, float], tokens: int
                        ) -> tuple[dict[str, float], int]:
        """The step's metric totals and token count summed over the ranks' shares, so the
        metrics are those of the whole batch (token-weighted, not a mean of means)."""
        if self.sharding is None:
            return totals, tokens
        keys = sorted(totals)
        summed = self._global([totals[k] for k in keys] + [tokens], torch.float64).tolist()
        return dict(zip(keys, summed[:-1], strict=True)), int(summed[-1])

    def _comm_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) \
            if torch.cuda.is_available() else torch.device("cpu")

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
        """Every state-dict tensor, whole, under the model's names. Under FSDP: the gathered
        parameters the rollout engine generates with (no collective), or, when they are not
        kept gathered, each tensor all-gathered in turn (collective: every rank iterates)."""
        if self.sharding is None:
            yield from self.model.state_dict().items()
        elif self.sharding.gathered:
            yield from self.sharding.full_tensors()
        else:
            for name, tensor in self.model.state_dict().items():
                yield name, tensor.full_tensor() if isinstance(tensor, DTensor) else tensor

    def weight_shards(self) -> None:
        """No tensor parallelism: a rollout engine of its own (vLLM, one per rank) needs the
        whole weights, which ``named_hf_weights`` gathers one tensor at a time."""
        return None

    def save(self, folder: Path) -> None:
        """``folder/model``: the HF folder (safetensors, whole tensors) that eval, vLLM and
        export read, written by rank 0; ``folder/dcp``: the weights and AdamW moments as a
        torch.distributed.checkpoint, each rank writing its shards, which resume reads at any
        world size; ``folder/optimizer.json``: the scheduler and the optimiser's
        hyper-parameters. Collective under FSDP."""
        folder = Path(folder)
        if self.sharding is not None:
            self.sharding.gather()  # (already, when kept gathered for the rollout engine)
        if self.dp_rank == 0:
            # Rank 0 holds the gathered weights: writing them needs no collective.
            self.model.save_pretrained(folder / "model", safe_serialization=True,
                                       state_dict=dict(self.named_hf_weights()))
        if self.sharding is not None:
            self.sharding.shard()  # DCP reads the shards (through model.state_dict())
        saved = fsdp.save_dcp(folder / fsdp.DCP_DIR, self.model, self.optimizer)
        self._after_update()
        steps = [int(s["step"]) for s in self.optimizer.state.values() if "step" in s]
        if self.dp_rank == 0:
            (folder / OPTIMIZER_JSON).write_text(json.dumps(
                {**saved, "optimizer_steps": max(steps, default=0),
                 "scheduler": self.scheduler.state_dict()}) + "\n")

    def load(self, folder: Path) -> None:
        """Resume from :meth:`save` output written at any world size (or, in a single
        process, from the older ``model/`` + ``optimizer.pt`` layout)."""
        folder = Path(folder)
        if not (folder / fsdp.DCP_DIR).is_dir():
            self._load_single_process_layout(folder)
            return
        saved = json.loads((folder / OPTIMIZER_JSON).read_text())
        if self.sharding is not None:
            self.sharding.shard()  # loaded into the shards; gathered again below
        self.optimizer.state.clear()
        fsdp.load_dcp(folder / fsdp.DCP_DIR, self.model, self.optimizer, saved)
        self.scheduler.load_state_dict(saved["scheduler"])
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr(),
                             strict=True):
            group["lr"] = lr
        self._after_update()

    def _load_single_process_layout(self, folder: Path) -> None:
        if self.sharding is not None:
            raise ValueError(f"{folder} has no {fsdp.DCP_DIR}/ (a checkpoint of an older "
                             "single-process run): resume it with one process")
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


OPTIMIZER_JSON = "optimizer.json"


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
