"""Training backend ``megatron``: megatron-core TP/PP for the language model of Qwen2.5-VL and
Qwen3-VL (dense).

Same interface as :class:`evr1.train.backends.hf.HFBackend` (``logprobs``, ``train_step``,
``named_hf_weights``, ``save``, ``load``) and the same GRPO loss (``evr1.train.grpo``), so the
trainer can swap one for the other. Every rank of the job constructs the backend and calls
every method with the same arguments (the whole optimiser batch); the backend itself hands
each data-parallel replica its share of the micro-batches (``batches[dp_rank::dp]``).

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
  ``[S, B, H]`` activations, and of the deepstack levels to the stages that add them).
  Simple, and it runs on gloo as well as NCCL; it holds the activations of every micro-batch
  of a step, which 1F1B would bound to PP of them.
* Optimiser: ``torch.optim.AdamW`` over this rank's shards. AdamW is elementwise, so AdamW on
  shards is AdamW on the full tensors; gradients are summed across data-parallel replicas
  (the loss normaliser counts the whole batch) and clipped by the global norm over all
  shards. megatron-core's DDP wrapper and distributed optimizer assume CUDA beyond what the CPU
  shims cover (``device='cuda'`` literals, ``torch.cuda.*Tensor`` type checks; see
  docs/architecture.md) and are not used: the optimiser state is replicated across DP ranks.
* Checkpoints: an HF folder (the model, directly usable by eval and vLLM, gathered with the
  weight mapping) plus, for resuming, a megatron-core distributed checkpoint (torch_dist) in
  which every rank writes its shards of the weights and AdamW moments; megatron-core reshards
  it on load, so a run can resume with another TP/PP layout. With
  ``train.megatron.dist_checkpoint: false`` the moments are gathered under HF names instead
  and resume reads the HF folder (also resharded).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import AutoConfig

from evr1.config import GRPOConfig, TrainConfig
from evr1.train.backends.base import grpo_terms, lr_lambda
from evr1.train.backends.megatron import model as mg_model
from evr1.train.backends.megatron import parallel
from evr1.train.backends.megatron.deepstack import Deepstack, add_after_layers, visual_index
from evr1.train.backends.megatron.logprobs import (
    mask_padded_vocab,
    vocab_parallel_entropy,
    vocab_parallel_logprobs,
)
from evr1.train.backends.megatron.packing import TokenLayout, build_layout
from evr1.train.backends.megatron.vision import VisionFrontEnd
from evr1.train.backends.megatron.weights import (
    HEAD_NORMS,
    Geometry,
    HFCheckpoint,
    LayerKind,
    Rule,
    gather_hf,
    is_tied_copy,
    model_rules,
    shard,
    write_hf_folder,
)
from evr1.train.batch import PolicyBatch
from evr1.train.grpo import (
    SUMMED_METRICS,
    LossMetrics,
    clip_coefficient,
    loss_normaliser,
    masked_mean,
)

VISUAL = "model.visual."
_METRICS = [f.name for f in dataclasses.fields(LossMetrics)]
_MOMENTS = ("exp_avg", "exp_avg_sq")
DIST_DIR = "megatron"  # the megatron-core distributed checkpoint inside a checkpoint folder


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
    """

    def __init__(self, model_path: str | Path, cfg: TrainConfig, temperature: float = 1.0, *,
                 dtype: torch.dtype | str = "float32", seed: int = 0):
        self.cfg = cfg
        self.temperature = temperature if temperature > 0 else 1.0
        self.dtype = _to_dtype(dtype)
        self.source = Path(model_path).expanduser()
        self.grid = parallel.setup_model_parallel(cfg.megatron)
        parallel.seed_model_parallel(seed)
        self.device = parallel.device()
        self.hf_config = AutoConfig.from_pretrained(str(self.source))
        self.spec = mg_model.lm_spec(self.hf_config)
        self.use_te = mg_model.transformer_engine_available()
        g = self.grid
        self.geometry = Geometry(self.spec.num_heads, self.spec.num_kv_heads, self.spec.head_dim,
                                 self.spec.vocab_size, self.spec.padded_vocab(g.tp), g.tp)
        config = mg_model.transformer_config(self.spec, g.tp, g.pp, self.dtype)
        self.gpt = mg_model.build_gpt(self.spec, config, tp=g.tp, first_stage=g.first_stage,
                                      last_stage=g.last_stage, use_te=self.use_te)
        self.gpt.to(self.device)
        self.rules = model_rules(self.spec.num_layers, g.pp, self.spec.tied_embeddings,
                                 LayerKind(te_fused_norms=self.use_te, qkv_bias=self.spec.qkv_bias,
                                           qk_norm=self.spec.qk_norm))
        self.deepstack = Deepstack(self.spec.deepstack_layers, self.spec.num_layers // g.pp) \
            if self.spec.deepstack_layers else None
        checkpoint = HFCheckpoint(self.source)
        self._hf_shapes = self._read_shapes(checkpoint)
        self._disk_names = checkpoint.disk_names()
        self.vision = VisionFrontEnd(self.hf_config, checkpoint, with_tower=g.first_stage,
                                     dtype=self.dtype, device=self.device)
        self._load_decoder(checkpoint)
        if cfg.freeze_vision_tower and self.vision.visual is not None:
            self.vision.visual.requires_grad_(False)
        self.optimizer = torch.optim.AdamW(
            self._params(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self._ref_state: dict[str, Tensor] | None = None
        if cfg.grpo.kl_coef > 0:  # the frozen starting policy, only when the KL term is used
            self._ref_state = {k: v.detach().clone() for k, v in self._named_params()}

    # ------------------------------------------------------------------ parameters

    def _named_params(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        yield from self.gpt.named_parameters()
        if self.vision.visual is not None:
            for name, p in self.vision.visual.named_parameters():
                yield VISUAL + name, p

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self._named_params() if p.requires_grad]

    def _read_shapes(self, checkpoint: HFCheckpoint) -> dict[str, torch.Size]:
        shapes = {}
        for name in checkpoint.names():
            file, key = checkpoint._where[name]
            with safe_open(str(file), "pt") as f:
                shapes[name] = torch.Size(f.get_slice(key).get_shape())
        return shapes

    def _local_rules(self) -> list[Rule]:
        return [r for r in self.rules if r.stage == self.grid.pp_rank]

    def _load_decoder(self, checkpoint: HFCheckpoint,
                      target: Callable[[str], Tensor] | None = None) -> None:
        """Copy this rank's shards of the HF decoder tensors into the GPTModel (or into
        ``target(megatron_name)``, e.g. optimiser moments)."""
        params = dict(self.gpt.named_parameters())
        covered = set()
        for rule in self._local_rules():
            hf = [checkpoint.get(name) for name in rule.hf]
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

    # ------------------------------------------------------------------ forward

    def _layout(self, batch: PolicyBatch) -> TokenLayout:
        inputs = batch.model_inputs
        positions = self.vision.positions(inputs)
        # Transformer Engine's fused attention gets no dense mask: with it, micro-batches are
        # always packed (THD), which is also its fast path.
        packed = self.cfg.megatron.sequence_packing or self.use_te
        layout = build_layout(inputs, batch.responses, batch.mask, positions, packed=packed,
                              thd=self.use_te)
        return _to_device(layout, self.device)

    @contextlib.contextmanager
    def _project_only(self, index: Tensor) -> Iterator[None]:
        """Make the output layer see only the hidden states at ``index`` (flat s * B + b):
        the logits of a long video prompt are never computed, only those that predict
        response tokens."""
        def select(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            hidden = args[0]
            picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)[:, None]
            return (picked, *args[1:]), kwargs

        handle = self.gpt.output_layer.register_forward_pre_hook(select, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def _stage_forward(self, batch: PolicyBatch, layout: TokenLayout, received: Tensor | None,
                       deepstack: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """This stage's output: hidden states ``[S, B, H]`` for the next stage, or on the last
        stage the tempered vocab-parallel logits ``[K, V/tp]`` at the response positions.

        Also returns the micro-batch's deepstack levels ``[levels, N, H]`` (Qwen3-VL with
        vision input, else None): computed here on the first stage, ``deepstack`` (from the
        previous stage) on the others; they are added inside this stage's first layers.
        """
        decoder_input = None
        if self.grid.first_stage:
            embeds = self.gpt.embedding(input_ids=layout.ids, position_ids=None)  # [S, B, H]
            embeds, deepstack = self.vision.scatter_features(
                embeds.transpose(0, 1), layout.ids, _inputs_on(batch, self.device))
            decoder_input = embeds.transpose(0, 1).contiguous()
        else:
            self.gpt.set_input_tensor(received)
        with contextlib.ExitStack() as hooks:
            if deepstack is not None:
                index = visual_index(self.vision.visual_mask(layout.ids, batch.model_inputs))
                hooks.enter_context(add_after_layers(self.gpt.decoder.layers, index, deepstack))
            if self.grid.last_stage:
                hooks.enter_context(self._project_only(layout.logit_index))
            out = self.gpt(input_ids=None, position_ids=layout.positions,
                           attention_mask=layout.attention_mask, decoder_input=decoder_input,
                           packed_seq_params=layout.packed_seq_params)
        if not self.grid.last_stage:
            return out, deepstack
        logits = out[0].float() / self.temperature
        vocab_start = self.grid.tp_rank * logits.shape[-1]
        return mask_padded_vocab(logits, vocab_start, self.spec.vocab_size), deepstack

    def _token_logprobs(self, logits: Tensor, layout: TokenLayout) -> Tensor:
        vocab_start = self.grid.tp_rank * logits.shape[-1]
        flat = vocab_parallel_logprobs(logits, layout.targets, vocab_start, self._tp_group())
        return layout.scatter(flat)

    def _pipeline(self, batches: list[PolicyBatch],
                  on_logits: Callable[[int, Tensor, TokenLayout], Tensor | None],
                  backward: bool) -> None:
        """Run micro-batches through this rank's stage (GPipe when PP > 1).

        On the last stage ``on_logits(i, logits, layout)`` returns micro-batch i's loss (or
        None for a forward only); ``backward`` then back-propagates every loss through all
        stages, sending activation gradients from stage to stage. Deepstack levels travel
        with the hidden states to the stages that need them, and their gradients back.
        """
        g = self.grid
        saved: list[_StageIO] = []
        for i, batch in enumerate(batches):
            layout = self._layout(batch)
            io = _StageIO()
            if not g.first_stage:
                io.received = self._recv((layout.seq_len, layout.batch, self.spec.hidden_size),
                                         _prev_rank(), grad=backward)
                shape = self._deepstack_shape(batch, layout, g.pp_rank)
                if shape is not None:
                    io.deepstack_in = self._recv(shape, _prev_rank(), grad=backward)
            out, deepstack = self._stage_forward(batch, layout, io.received, io.deepstack_in)
            if g.last_stage:
                loss = on_logits(i, out, layout)
                if backward and g.pp == 1:
                    assert loss is not None
                    loss.backward()  # PP=1: free this micro-batch's graph right away
                    loss = None
                io.out = loss
            else:
                io.out = out
                dist.send(out.detach().contiguous(), _next_rank())
                if self._deepstack_shape(batch, layout, g.pp_rank + 1) is not None:
                    assert deepstack is not None
                    io.deepstack_out = deepstack
                    dist.send(deepstack.detach().contiguous(), _next_rank())
            saved.append(io)
        if not backward or g.pp == 1:
            return
        for io in reversed(saved):
            assert io.out is not None
            if g.last_stage:
                io.out.backward()
            else:
                roots = [io.out]
                grads = [self._recv(io.out.shape, _next_rank(), grad=False)]
                if io.deepstack_out is not None:
                    grad = self._recv(io.deepstack_out.shape, _next_rank(), grad=False)
                    if io.deepstack_out.requires_grad:  # not with a frozen vision tower
                        roots.append(io.deepstack_out)
                        grads.append(grad)
                torch.autograd.backward(roots, grads)
            if not g.first_stage:
                assert io.received is not None and io.received.grad is not None
                dist.send(io.received.grad.contiguous(), _prev_rank())
                if io.deepstack_in is not None:
                    assert io.deepstack_in.grad is not None
                    dist.send(io.deepstack_in.grad.contiguous(), _prev_rank())

    def _deepstack_shape(self, batch: PolicyBatch, layout: TokenLayout,
                         stage: int) -> tuple[int, int, int] | None:
        """Shape of the deepstack levels pipeline stage ``stage`` receives from the stage
        before it for this micro-batch, or None when it receives none (no deepstack, no
        vision tokens, or no layer of its own or of a later stage takes them)."""
        if self.deepstack is None or not self.deepstack.stage_receives(stage):
            return None
        tokens = int(self.vision.visual_mask(layout.ids, batch.model_inputs).sum())
        if not tokens:
            return None
        return self.deepstack.levels, tokens, self.spec.hidden_size

    def _recv(self, shape: tuple[int, ...] | torch.Size, src: int, grad: bool) -> Tensor:
        buffer = torch.empty(shape, dtype=self.dtype, device=self.device)
        dist.recv(buffer, src)
        return buffer.requires_grad_(grad)

    def _tp_group(self) -> Any:
        # heavy: megatron-core is imported only when the megatron backend runs
        from megatron.core import parallel_state as ps

        return ps.get_tensor_model_parallel_group() if self.grid.tp > 1 else None

    # ------------------------------------------------------------------ log-probs

    @torch.no_grad()
    def logprobs(self, batch: PolicyBatch) -> Tensor:
        """Per-token log-probs of the batch's responses under the current weights, [B, R],
        on every rank (collective: all ranks call it with the same batch)."""
        self._eval_mode()
        return self._forward_logprobs([batch])[0]

    def _forward_logprobs(self, batches: list[PolicyBatch]) -> list[Tensor]:
        results: list[Tensor] = []

        def keep(i: int, logits: Tensor, layout: TokenLayout) -> None:
            results.append(self._token_logprobs(logits, layout).cpu())

        self._pipeline(batches, keep, backward=False)
        return self._from_last_stage(results, [b.mask.shape for b in batches])

    def _from_last_stage(self, values: list[Tensor], shapes: list[torch.Size]) -> list[Tensor]:
        """Broadcast per-micro-batch ``[B, R]`` results from the last pipeline stage."""
        if self.grid.pp == 1:
            return values
        # heavy: megatron-core is imported only when the megatron backend runs
        from megatron.core import parallel_state as ps

        out = []
        for i, shape in enumerate(shapes):
            t = values[i].to(self.device) if self.grid.last_stage else \
                torch.empty(shape, dtype=torch.float32, device=self.device)
            dist.broadcast(t, ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
            out.append(t.cpu())
        return out

    @contextlib.contextmanager
    def _reference_weights(self) -> Iterator[None]:
        """Temporarily swap in the starting policy's weights (for the KL term)."""
        assert self._ref_state is not None
        params = dict(self._named_params())
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

    def _eval_mode(self) -> None:
        self.gpt.eval()
        if self.vision.visual is not None:
            self.vision.visual.eval()

    def _train_mode(self) -> None:
        self.gpt.train()
        if self.vision.visual is not None:
            self.vision.visual.train()

    # ------------------------------------------------------------------ update

    def train_step(self, batches: list[PolicyBatch], grpo: GRPOConfig) -> dict[str, float]:
        """One optimiser step over the micro-batches of the whole batch (all ranks pass the
        same list; data-parallel replica d trains on ``batches[d::dp]``)."""
        start = time.perf_counter()
        g = self.grid
        normaliser = sum(loss_normaliser(b.mask, grpo.loss_agg) for b in batches)
        mine = batches[g.dp_rank::g.dp]
        ref = None
        if self._ref_state is not None:
            self._eval_mode()
            with torch.no_grad(), self._reference_weights():
                ref = self._forward_logprobs(mine)
        self._train_mode()
        totals = torch.zeros(len(_METRICS) + 2, dtype=torch.float64)  # + loss, tokens

        def loss_of(i: int, logits: Tensor, layout: TokenLayout) -> Tensor:
            batch = mine[i]
            logp = self._token_logprobs(logits, layout)
            old_logp = logp.detach()
            entropy = None
            if grpo.entropy_coef > 0:
                entropy = layout.scatter(vocab_parallel_entropy(logits, self._tp_group()))
            view = dataclasses.replace(
                batch, advantages=batch.advantages.to(logp.device), mask=layout.response_mask,
                extras={k: v.to(logp.device) for k, v in batch.extras.items()})
            loss, metrics = grpo_terms(
                logp, old_logp, view, grpo,
                ref_logp=None if ref is None else ref[i].to(logp.device), entropy=entropy,
                normaliser=normaliser)
            if entropy is None:
                with torch.no_grad():
                    ent = layout.scatter(vocab_parallel_entropy(logits.detach(),
                                                                self._tp_group()))
                    metrics.entropy_mean = masked_mean(ent, layout.response_mask)
            values = metrics.as_floats()
            n = batch.num_tokens
            for j, key in enumerate(_METRICS):  # step totals summed, token means weighted
                totals[j] += values[key] * (1 if key in SUMMED_METRICS else n)
            totals[-2] += float(loss.detach())
            totals[-1] += n
            return loss

        self._pipeline(mine, loss_of, backward=True)
        grad_norm = self._reduce_and_clip()
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        totals = self._reduce_metrics(totals)
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

    def _reduce_metrics(self, totals: Tensor) -> Tensor:
        """Sum token-weighted metrics over data-parallel replicas and pipeline stages (only
        the last stage has them); TP ranks hold identical copies."""
        # heavy: megatron-core is imported only when the megatron backend runs
        from megatron.core import parallel_state as ps

        t = totals.to(self.device)
        if self.grid.dp > 1:
            dist.all_reduce(t, group=ps.get_data_parallel_group())
        if self.grid.pp > 1:
            dist.all_reduce(t, group=ps.get_pipeline_model_parallel_group())
        return t.cpu()

    def _reduce_and_clip(self) -> float:
        """Make every rank's gradients the full-batch gradient of its shards, clip by the
        global norm (as ``torch.nn.utils.clip_grad_norm_``) and return that norm."""
        # heavy: megatron-core is imported only when the megatron backend runs
        from megatron.core import parallel_state as ps

        g = self.grid
        params = self._params()
        if g.pp > 1 and self.spec.tied_embeddings:
            self._sum_tied_embedding_grads()
        if g.tp > 1 and self.spec.qk_norm:
            self._sum_head_norm_grads()
        if g.dp > 1:
            _all_reduce_grads(params, ps.get_data_parallel_group())
        squares = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in self._norm_params():
            if p.grad is not None:
                squares += p.grad.detach().double().square().sum()
        if g.tp > 1:
            dist.all_reduce(squares, group=ps.get_tensor_model_parallel_group())
        if g.pp > 1:
            dist.all_reduce(squares, group=ps.get_pipeline_model_parallel_group())
        norm = float(squares.sqrt())
        coef = clip_coefficient(norm, self.cfg.grad_clip)  # grad_clip 0: no clipping
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)
        return norm

    def _norm_params(self) -> list[torch.nn.Parameter]:
        """The parameters whose gradients this rank counts in the global norm: its TP shards,
        and replicated tensors (norms, vision tower) on TP rank 0 only; the last stage's copy
        of a tied embedding is the first stage's matrix and is not counted twice."""
        sharded = {r.megatron for r in self._local_rules() if r.kind != "replicated"}
        tied_copy = self.grid.pp > 1 and self.spec.tied_embeddings
        keep = []
        for name, p in self._named_params():
            if tied_copy and name == "output_layer.weight":
                continue
            if name in sharded or self.grid.tp_rank == 0:
                keep.append(p)
        return keep

    def _sum_tied_embedding_grads(self) -> None:
        """With PP > 1 the tied matrix lives on the first and last stage: sum both
        gradients so that the two copies take identical steps."""
        # heavy: megatron-core is imported only when the megatron backend runs
        from megatron.core import parallel_state as ps

        if not ps.is_rank_in_embedding_group():
            return
        weight = self.gpt.embedding.word_embeddings.weight if self.grid.first_stage \
            else self.gpt.output_layer.weight
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        dist.all_reduce(weight.grad, group=ps.get_embedding_group())

    def _sum_head_norm_grads(self) -> None:
        """Each TP rank's Q/K norm gradient covers only its own heads: sum them, so that
        every rank holds the full gradient of the replicated weight."""
        # heavy: megatron-core is imported only when the megatron backend runs
        from megatron.core import parallel_state as ps

        params = dict(self.gpt.named_parameters())
        norms = [params[r.megatron] for r in self._local_rules()
                 if r.megatron.endswith(HEAD_NORMS)]
        _all_reduce_grads(norms, ps.get_tensor_model_parallel_group())

    # ------------------------------------------------------------------ weights out

    def named_hf_weights(self) -> Iterator[tuple[str, Tensor]]:
        """Full tensors under transformers' in-memory names (``model.visual.*``,
        ``model.language_model.*``, ``lm_head.weight``), on every rank. Collective: every
        rank must consume the iterator to the end."""
        params = dict(self._named_params())
        yield from self._gather(params.get)

    def named_hf_grads(self) -> Iterator[tuple[str, Tensor]]:
        """Current gradients (zeros where none), gathered like :meth:`named_hf_weights`.
        For checks against the hf backend; collective like it."""
        params = dict(self._named_params())

        def grad(name: str) -> Tensor | None:
            p = params.get(name)
            if p is None:
                return None
            return p.grad if p.grad is not None else torch.zeros_like(p)

        yield from self._gather(grad)

    def _gather(self, local: Callable[[str], Tensor | None]) -> Iterator[tuple[str, Tensor]]:
        """Full HF tensors from ``local(name)`` shards: vision tower, then the decoder."""
        # heavy: megatron-core is imported only when the megatron backend runs
        from megatron.core import parallel_state as ps

        g = self.grid
        pp_group = ps.get_pipeline_model_parallel_group() if g.pp > 1 else None
        stage_ranks = dist.get_process_group_ranks(pp_group) if pp_group is not None else [0]
        vision = [Rule(name, (name,), "replicated", 0)
                  for name in sorted(self._hf_shapes) if name.startswith(VISUAL)]
        # The last stage's copy of a tied embedding is not an HF tensor of its own.
        decoder = [r for r in self.rules
                   if not (g.pp > 1 and is_tied_copy(r, self.spec.tied_embeddings))]
        yield from gather_hf(vision + decoder, local, self.geometry, g.pp_rank,
                             self._tp_group(), pp_group, lambda stage: stage_ranks[stage],
                             lambda name: (self._hf_shapes[name], self.dtype))

    # ------------------------------------------------------------------ checkpoints

    def save(self, folder: Path) -> None:
        """``folder/model`` (HF folder, for eval and vLLM), ``folder/optimizer/state.json``
        (step count, scheduler) and what resume reads: ``folder/megatron``, a megatron-core
        distributed checkpoint of the weights and AdamW moments that every rank writes its own
        shards of (``train.megatron.dist_checkpoint``), or else the moments gathered under HF
        names (``folder/optimizer/<moment>.safetensors``). Collective; global rank 0 writes
        the rest."""
        folder = Path(folder)
        writer = dist.get_rank() == 0
        self._write(folder / "model", self.named_hf_weights(), writer)
        if self.cfg.megatron.dist_checkpoint:
            self._save_dist(folder / DIST_DIR)
        else:
            self._save_hf_moments(folder / "optimizer", writer)
        state = self.optimizer.state
        all_steps = self._merge_steps({name: int(state[p]["step"]) if p in state else 0
                                       for name, p in self._named_params()})
        if writer:
            (folder / "optimizer").mkdir(parents=True, exist_ok=True)
            (folder / "optimizer" / "state.json").write_text(json.dumps(
                {"steps": all_steps, "scheduler": self.scheduler.state_dict()}))
        dist.barrier()

    def named_hf_moments(self, moment: str) -> Iterator[tuple[str, Tensor]]:
        """AdamW's ``exp_avg`` or ``exp_avg_sq`` (zeros where a parameter has no state yet),
        gathered like :meth:`named_hf_weights`; collective like it."""
        params = dict(self._named_params())

        def local(name: str) -> Tensor | None:
            p = params.get(name)
            return None if p is None else self._moment_or_zeros(p, moment)

        yield from self._gather(local)

    def _moment_or_zeros(self, p: torch.nn.Parameter, moment: str) -> Tensor:
        state = self.optimizer.state
        return state[p][moment] if p in state else torch.zeros_like(p)

    def _save_hf_moments(self, folder: Path, writer: bool) -> None:
        for moment in _MOMENTS:
            tensors = self.named_hf_moments(moment)
            if writer:
                folder.mkdir(parents=True, exist_ok=True)
                save_file({n: t.cpu().contiguous() for n, t in tensors},
                          str(folder / f"{moment}.safetensors"))
            else:
                for _ in tensors:
                    pass

    def _save_dist(self, folder: Path) -> None:
        # heavy: megatron-core is imported only when the megatron backend runs
        from megatron.core import dist_checkpointing

        if dist.get_rank() == 0:
            # megatron-core wants the folder to exist; emptied so that no shard file of an
            # earlier save (another world size) lingers beside the new ones.
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        dist.barrier()
        dist_checkpointing.save(self._sharded_state(self._moment_or_zeros), str(folder))

    def _sharded_state(self, moment: Callable[[torch.nn.Parameter, str], Tensor] | None
                       ) -> dict[str, Any]:
        """This rank's part of the distributed checkpoint as megatron-core ``ShardedTensor``s,
        which record where each local piece lies in the full tensor, so that a run with
        another TP/PP layout reads its own pieces: the GPTModel's ``sharded_state_dict()``,
        the replicated vision tower (HF names) and, given ``moment(param, name)``, the AdamW
        moments of the trainable parameters under ``optimizer.state.<moment>.<key>`` (the keys
        of Megatron's non-distributed optimiser)."""
        # heavy: megatron-core is imported only when the megatron backend runs
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        # heavy: megatron-core is imported only when the megatron backend runs
        from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

        model = self.gpt.sharded_state_dict()
        self._tie_output_copy(model)
        visual = {}
        if self.vision.visual is not None:
            # Every TP and DP rank of the first stage holds the whole tower: one writes it.
            replica = (0, self.grid.tp_rank, self.grid.dp_rank)
            for name, p in self.vision.visual.named_parameters():
                visual[VISUAL + name] = ShardedTensor.from_rank_offsets(
                    VISUAL + name, p.detach(), replica_id=replica)
        out: dict[str, Any] = {"model": model, "visual": visual}
        if moment is not None:
            entries = {**model, **visual}
            out["optimizer"] = {
                m: {name: make_sharded_optimizer_tensor(entries[name], moment(p, m),
                                                        f"optimizer.state.{m}")
                    for name, p in self._named_params() if p.requires_grad}
                for m in _MOMENTS}
        return out

    def _tie_output_copy(self, model: dict[str, Any]) -> None:
        """With PP > 1 and tied embeddings the last stage's output matrix is a copy of the
        first stage's embedding: point its entry at the embedding's key as a non-main replica
        (as megatron-core does for its own tied models), so that it is not written twice and
        PP = 1, which has no such copy, can load the checkpoint and the other way round."""
        if not (self.grid.pp > 1 and self.spec.tied_embeddings and self.grid.last_stage):
            return
        copy = model["output_layer.weight"]
        model["output_layer.weight"] = dataclasses.replace(
            copy, key="embedding.word_embeddings.weight", replica_id=(1, *copy.replica_id[1:]))

    def _merge_steps(self, steps: dict[str, int]) -> int:
        """All parameters that have optimiser state took the same number of steps."""
        values = {v for v in steps.values() if v}
        if len(values) > 1:
            raise RuntimeError(f"parameters at different optimiser steps: {sorted(values)}")
        t = torch.tensor([max(values) if values else 0], dtype=torch.long, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t)

    def _write(self, folder: Path, tensors: Iterator[tuple[str, Tensor]], writer: bool) -> None:
        if writer:
            write_hf_folder(folder, self.source, tensors, self._disk_names)
        else:
            for _ in tensors:
                pass

    def export_hf(self, folder: str | Path) -> None:
        """Write the current weights as an HF folder (collective; global rank 0 writes)."""
        self._write(Path(folder), self.named_hf_weights(), dist.get_rank() == 0)
        dist.barrier()

    def load(self, folder: Path) -> None:
        """Resume from :meth:`save` output, from ``folder/megatron`` when the checkpoint has
        one, else from the HF folder and HF-named moments; TP/PP may differ from the saving
        run either way."""
        folder = Path(folder)
        meta = json.loads((folder / "optimizer" / "state.json").read_text())
        self.optimizer.state.clear()
        if (folder / DIST_DIR).is_dir():
            self._load_dist(folder / DIST_DIR, with_moments=bool(meta["steps"]))
        else:
            self._load_hf(folder, with_moments=bool(meta["steps"]))
        self.scheduler.load_state_dict(meta["scheduler"])
        self._set_steps(meta["steps"])

    def _load_dist(self, folder: Path, with_moments: bool) -> None:
        # heavy: megatron-core is imported only when the megatron backend runs
        from megatron.core import dist_checkpointing

        state = self.optimizer.state
        if with_moments:
            for p in self._params():
                for m in _MOMENTS:
                    state[p][m] = torch.zeros_like(p)

        def moment(p: torch.nn.Parameter, name: str) -> Tensor:
            return state[p][name]

        sharded = self._sharded_state(moment if with_moments else None)
        loaded = dist_checkpointing.load(sharded, str(folder))
        self.gpt.load_state_dict(loaded["model"])
        params = dict(self._named_params())
        with torch.no_grad():  # (megatron-core drops empty dicts: no tower off stage 0)
            for name, tensor in loaded.get("visual", {}).items():
                params[name].copy_(tensor)
            for m, tensors in loaded.get("optimizer", {}).items():
                for name, tensor in tensors.items():
                    state[params[name]][m].copy_(tensor)

    def _load_hf(self, folder: Path, with_moments: bool) -> None:
        checkpoint = HFCheckpoint(folder / "model")
        self._load_decoder(checkpoint)
        if self.vision.visual is not None:
            for name, p in self.vision.visual.named_parameters():
                with torch.no_grad():
                    p.copy_(checkpoint.get(VISUAL + name))
        if with_moments:
            self._load_moments(folder / "optimizer")

    def _load_moments(self, folder: Path) -> None:
        params = dict(self._named_params())
        for moment in _MOMENTS:
            hf = _DictCheckpoint(load_file(str(folder / f"{moment}.safetensors")))
            for p in params.values():
                if p.requires_grad:  # a frozen vision tower has no optimiser state
                    self.optimizer.state[p].setdefault(moment, torch.zeros_like(p))
            self._load_decoder(hf, lambda name, m=moment: self.optimizer.state[
                self.gpt.get_parameter(name)][m])  # type: ignore[misc]
            if self.vision.visual is not None:
                for name, p in self.vision.visual.named_parameters():
                    if p.requires_grad:
                        self.optimizer.state[p][moment].copy_(hf.get(VISUAL + name))

    def _set_steps(self, step: int) -> None:
        for p in self._params():
            if step:
                self.optimizer.state[p]["step"] = torch.tensor(float(step))


@dataclasses.dataclass
class _StageIO:
    """What one micro-batch exchanged with the neighbouring pipeline stages, kept for the
    backward pass: the received tensors are leaves whose gradients go back, the sent ones
    roots that take the next stage's gradients."""

    received: Tensor | None = None  # hidden states from the previous stage
    deepstack_in: Tensor | None = None  # deepstack levels from the previous stage
    out: Tensor | None = None  # hidden states sent on, or the loss on the last stage
    deepstack_out: Tensor | None = None  # deepstack levels sent on


class _DictCheckpoint(HFCheckpoint):
    """An in-memory ``HFCheckpoint`` (the optimiser moments of a checkpoint)."""

    def __init__(self, tensors: dict[str, Tensor]):  # noqa: D107 - no files to index
        self._tensors = tensors

    def names(self) -> list[str]:
        return list(self._tensors)

    def get(self, name: str) -> Tensor:
        return self._tensors[name]


# --------------------------------------------------------------------------- helpers



def _next_rank() -> int:
    # heavy: megatron-core is imported only when the megatron backend runs
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_next_rank()


def _prev_rank() -> int:
    # heavy: megatron-core is imported only when the megatron backend runs
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_prev_rank()


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


def _all_reduce_grads(params: list[torch.nn.Parameter], group: Any) -> None:
    """Sum gradients over ``group`` (data-parallel replicas; or the TP ranks, for the Q/K
    norms), in one flat buffer per dtype.

    A parameter no replica produced a gradient for (the vision tower in a text-only step)
    keeps ``grad = None``, so AdamW skips it exactly as on a single process.
    """
    had = torch.tensor([p.grad is not None for p in params], dtype=torch.int32,
                       device=params[0].device)
    dist.all_reduce(had, op=dist.ReduceOp.MAX, group=group)
    live = [p for p, h in zip(params, had.tolist(), strict=True) if h]
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in live:
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group_params in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group_params])
        dist.all_reduce(flat, group=group)
        offset = 0
        for p in group_params:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n
