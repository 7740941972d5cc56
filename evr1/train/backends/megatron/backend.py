"""Training backend ``megatron``: megatron-core TP/PP for the language model of Qwen2.5-VL and
Qwen3-VL (dense).

Same interface as :class:`evr1.train.backends.hf.HFBackend` (``logprobs``, ``train_step``,
``named_hf_weights``, ``save``, ``load``) and the same GRPO loss (``evr1.train.grpo``), so the
trainer can swap one for the other. Every rank of the job constructs the backend and calls
every method; the ranks of one data-parallel replica pass the same arguments, and
``train_step`` takes that replica's own micro-batches (each replica rolls out its share of the
step, ``evr1.train.replicas``).

What runs where
---------------
* Language model: a megatron-core ``GPTModel``, split by tensor parallelism (TP) and, across
  pipeline stages, by layers (PP). Log-probs are computed from vocab-parallel logits
  (:mod:`.logprobs`), only at the positions that predict response tokens.
* Vision tower: the transformers module, replicated on every TP rank of the first stage
  (:mod:`.vision`); its features are scattered into the token embeddings and the result goes
  to ``GPTModel`` as ``decoder_input``. Qwen3-VL's deepstack levels are added after the
  first decoder layers by forward hooks (:mod:`.deepstack`).
* Pipeline schedule: GPipe (all forwards, then all backwards, point-to-point send/recv of
  ``[S, B, H]`` activations, and of the deepstack levels to the stages that add them;
  :mod:`.schedule`). Simple, and it runs on gloo as well as NCCL; it holds the activations of
  every micro-batch of a step, which 1F1B would bound to PP of them.
* Optimiser: on CUDA megatron-core's ``DistributedDataParallel`` + ``DistributedOptimizer``
  (fp32 main grads, weights and AdamW moments, each data-parallel rank stepping 1/DP of them,
  gradient reduce-scatter overlapped with the last backward; :mod:`.dist_optimizer`). On CPU,
  where megatron-core's optimisers do not run (``device='cuda'`` literals, ``torch.cuda.*Tensor``
  type checks; see docs/architecture.md), ``torch.optim.AdamW`` over this rank's shards: AdamW
  is elementwise, so AdamW on shards is AdamW on the full tensors; gradients are summed across
  data-parallel replicas (the loss normaliser counts the whole batch) and clipped by the
  global norm over all shards (:mod:`.grads`); the optimiser state is replicated across DP
  ranks.
* Checkpoints: an HF folder (the model, directly usable by eval and vLLM, gathered with the
  weight mapping) plus, for resuming, a megatron-core distributed checkpoint (torch_dist) in
  which every rank writes its shards of the weights and AdamW moments; megatron-core reshards
  it on load, so a run can resume with another TP/PP layout. With
  ``train.megatron.dist_checkpoint: false`` the moments are gathered under HF names instead
  and resume reads the HF folder (also resharded). :mod:`.checkpoint_io`.

The modules: :mod:`.shards` (this rank's GPTModel stage and vision tower, HF tensors in and
out), :mod:`.forward` (one stage's forward, log-probs), :mod:`.schedule`, :mod:`.grads`,
:mod:`.checkpoint_io`; this one composes them into the backend.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from evr1.config import GRPOConfig, TrainConfig
from evr1.rollout.base import ShardedWeights
from evr1.train.backends.base import grpo_terms, lr_lambda
from evr1.train.backends.megatron import dist_optimizer, parallel
from evr1.train.backends.megatron.checkpoint_io import CheckpointIO
from evr1.train.backends.megatron.forward import StageForward
from evr1.train.backends.megatron.grads import global_normaliser, reduce_and_clip, reduce_metrics
from evr1.train.backends.megatron.logprobs import vocab_parallel_entropy
from evr1.train.backends.megatron.packing import TokenLayout
from evr1.train.backends.megatron.schedule import forward_logprobs, run_gpipe
from evr1.train.backends.megatron.shards import LocalModel
from evr1.train.batch import PolicyBatch
from evr1.train.grpo import SUMMED_METRICS, LossMetrics, masked_mean

_METRICS = [f.name for f in dataclasses.fields(LossMetrics)]


def _to_dtype(dtype: torch.dtype | str) -> torch.dtype:
    resolved = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return resolved


class MegatronBackend:
    """GRPO updates of a Qwen2.5-VL or Qwen3-VL HF folder with megatron-core TP/PP.

    ``cfg.megatron`` gives the TP and PP sizes (data parallel takes the rest of the world);
    ``cfg.megatron.sequence_packing`` packs the valid tokens of a micro-batch into one
    sequence instead of padding. ``dtype``: float32 for exact comparisons, bfloat16 on GPUs.
    ``gradient_checkpointing`` (``model.gradient_checkpointing``): megatron-core's full
    activation recomputation, one decoder layer at a time.
    """

    def __init__(self, model_path: str | Path, cfg: TrainConfig, temperature: float = 1.0, *,
                 dtype: torch.dtype | str = "float32", seed: int = 0,
                 gradient_checkpointing: bool = False):
        self.cfg = cfg
        self.temperature = temperature if temperature > 0 else 1.0
        self.dtype = _to_dtype(dtype)
        self.source = Path(model_path).expanduser()
        self.grid = parallel.setup_model_parallel(cfg.megatron)
        parallel.seed_model_parallel(seed)
        self.model = LocalModel(self.source, self.grid, self.dtype,
                                freeze_vision_tower=cfg.freeze_vision_tower,
                                recompute=gradient_checkpointing)
        self.device = self.model.device
        self.gpt = self.model.gpt
        self.forward = StageForward(self.model, self.temperature,
                                    cfg.megatron.sequence_packing)
        # On CUDA megatron-core's DDP + distributed optimiser (fp32 main weights, grads and
        # moments, sharded over data-parallel ranks); elsewhere AdamW over this rank's shards
        # (.dist_optimizer says why). ``self.optimizer`` is the torch optimiser the lr
        # schedule drives: the distributed one's inner AdamW over its fp32 shards.
        self.distributed: dist_optimizer.DistributedAdamW | None = None
        if dist_optimizer.wanted(self.device):
            self.distributed = dist_optimizer.DistributedAdamW(self.model, cfg)
            self.optimizer = self.distributed.inner
        else:
            self.optimizer = torch.optim.AdamW(
                self.model.params(), lr=cfg.lr, betas=tuple(cfg.betas),
                weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.checkpoints = CheckpointIO(self.model, self.optimizer, self.scheduler,
                                        cfg.megatron, self.distributed)
        self._ref_state: dict[str, Tensor] | None = None
        if cfg.grpo.kl_coef > 0:  # the frozen starting policy, only when the KL term is used
            self._ref_state = {k: v.detach().clone() for k, v in self.model.named_params()}

    @property
    def uses_distributed_optimizer(self) -> bool:
        return self.distributed is not None

    # ------------------------------------------------------------------ log-probs

    @torch.no_grad()
    def logprobs(self, batch: PolicyBatch) -> Tensor:
        """Per-token log-probs of the batch's responses under the current weights, [B, R],
        on every rank (collective: all ranks call it with the same batch)."""
        self.model.eval_mode()
        return forward_logprobs(self.forward, [batch])[0]

    @contextlib.contextmanager
    def _reference_weights(self) -> Iterator[None]:
        """Temporarily swap in the starting policy's weights (for the KL term)."""
        assert self._ref_state is not None
        params = dict(self.model.named_params())
        current = {k: p.detach().clone() for k, p in params.items()}
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(self._ref_state[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(current[k])

    # ------------------------------------------------------------------ update

    @property
    def dp_size(self) -> int:
        """Data-parallel replicas (world / (TP x PP)); see evr1.train.replicas."""
        return self.grid.dp

    @property
    def dp_rank(self) -> int:
        return self.grid.dp_rank

    def train_step(self, batches: list[PolicyBatch], grpo: GRPOConfig) -> dict[str, float]:
        """One optimiser step over every replica's micro-batches: ``batches`` are this
        data-parallel replica's (the same list on all of its TP/PP ranks; may be empty).
        The loss is normalised by the count over all replicas' batches and the gradients are
        summed over replicas, so the step is the one a single replica would take on all of
        them."""
        start = time.perf_counter()
        normaliser = global_normaliser(self.model, batches, grpo.loss_agg)
        ref = None
        if self._ref_state is not None:
            self.model.eval_mode()
            with torch.no_grad(), self._reference_weights():
                ref = forward_logprobs(self.forward, batches)
        self.model.train_mode()
        totals = torch.zeros(len(_METRICS) + 2, dtype=torch.float64)  # + loss, tokens
        tp_group = self.model.tp_group()

        def loss_of(i: int, logits: Tensor, layout: TokenLayout) -> Tensor:
            batch = batches[i]
            logp = self.forward.token_logprobs(logits, layout)
            old_logp = logp.detach()
            entropy = None
            if grpo.entropy_coef > 0:
                entropy = layout.scatter(vocab_parallel_entropy(logits, tp_group))
            view = dataclasses.replace(
                batch, advantages=batch.advantages.to(logp.device), mask=layout.response_mask,
                extras={k: v.to(logp.device) for k, v in batch.extras.items()})
            loss, metrics = grpo_terms(
                logp, old_logp, view, grpo,
                ref_logp=None if ref is None else ref[i].to(logp.device), entropy=entropy,
                normaliser=normaliser)
            if entropy is None:
                with torch.no_grad():
                    ent = layout.scatter(vocab_parallel_entropy(logits.detach(), tp_group))
                    metrics.entropy_mean = masked_mean(ent, layout.response_mask.bool())
            values = metrics.as_floats()
            n = batch.num_tokens
            for j, key in enumerate(_METRICS):  # step totals summed, token means weighted
                totals[j] += values[key] * (1 if key in SUMMED_METRICS else n)
            totals[-2] += float(loss.detach())
            totals[-1] += n
            return loss

        lr = self.scheduler.get_last_lr()[0]
        if self.distributed is not None:
            run_gpipe(self.forward, batches, loss_of, backward=True,
                      grad_sync=self.distributed.grad_sync)
            grad_norm = self.distributed.step()
            self.scheduler.step()
            self.distributed.zero_grad()
        else:
            run_gpipe(self.forward, batches, loss_of, backward=True)
            grad_norm = reduce_and_clip(self.model, self.cfg.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        totals = reduce_metrics(self.model, totals)
        tokens = float(totals[-1])
        # Token-weighted means over the whole batch, as the hf backend reports them.
        out = {key: float(totals[j]) / (1.0 if key in SUMMED_METRICS else max(tokens, 1.0))
               for j, key in enumerate(_METRICS)}
        out.update(loss=float(totals[-2]), grad_norm=grad_norm, lr=lr, train_tokens=int(tokens),
                   time_update=time.perf_counter() - start)
        return out

    def skip_update(self) -> dict[str, float]:
        """No optimiser step (every group filtered out); the lr schedule still advances."""
        lr = self.scheduler.get_last_lr()[0]
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": meant so
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        return {"lr": lr, "skipped_update": 1}

    # ------------------------------------------------------------------ weights out

    def named_hf_weights(self) -> Iterator[tuple[str, Tensor]]:
        """Full tensors under transformers' in-memory names (``model.visual.*``,
        ``model.language_model.*``, ``lm_head.weight``), on every rank. Collective: every
        rank must consume the iterator to the end."""
        yield from self.checkpoints.named_hf_weights()

    def weight_shards(self) -> ShardedWeights:
        """This rank's own TP shards under HF names (q/k/v and gate/up unfused per rank, no
        padding rows), for a rollout engine with the same TP in the same processes (vLLM per
        replica): not collective, nothing crosses ranks. PP must be 1."""
        return self.model.own_shards()

    def named_hf_grads(self) -> Iterator[tuple[str, Tensor]]:
        """Current gradients (zeros where none), gathered like :meth:`named_hf_weights`.
        For checks against the hf backend; collective like it."""
        params = dict(self.model.named_params())

        def grad(name: str) -> Tensor | None:
            p = params.get(name)
            if p is None:
                return None
            # megatron-core's DDP accumulates into fp32 ``main_grad`` buffers
            g = p.grad if p.grad is not None else getattr(p, "main_grad", None)
            return g.to(p.dtype) if g is not None else torch.zeros_like(p)

        yield from self.model.gather(grad)

    def named_hf_moments(self, moment: str) -> Iterator[tuple[str, Tensor]]:
        """AdamW's ``exp_avg`` or ``exp_avg_sq`` (zeros where a parameter has no state yet),
        gathered like :meth:`named_hf_weights`; collective like it."""
        yield from self.checkpoints.named_hf_moments(moment)

    # ------------------------------------------------------------------ checkpoints

    def save(self, folder: Path) -> None:
        """``folder/model`` (HF folder, for eval and vLLM), ``folder/optimizer/state.json``
        (step count, scheduler) and what resume reads (:mod:`.checkpoint_io`). Collective."""
        self.checkpoints.save(folder)

    def load(self, folder: Path) -> None:
        """Resume from :meth:`save` output; TP/PP may differ from the saving run."""
        self.checkpoints.load(folder)

    def export_hf(self, folder: str | Path) -> None:
        """Write the current weights as an HF folder (collective; global rank 0 writes)."""
        self.checkpoints.export_hf(folder)
