"""Checkpoint I/O of the megatron backend: save, resume and HF export.

A checkpoint folder holds:

* ``model/``: an HF folder (the model, directly usable by eval and vLLM), gathered with the
  weight mapping;
* ``optimizer/state.json``: step count and lr scheduler;
* for resuming, ``megatron/``: a megatron-core distributed checkpoint (torch_dist) in which
  every rank writes its shards of the weights and AdamW moments; megatron-core reshards it on
  load, so a run can resume with another TP/PP layout. With
  ``train.megatron.dist_checkpoint: false`` the moments are gathered under HF names instead
  (``optimizer/<moment>.safetensors``) and resume reads the HF folder (also resharded).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor

from evr1.train.backends.megatron.shards import VISUAL, LocalModel
from evr1.train.backends.megatron.weights import HFCheckpoint, write_hf_folder

MOMENTS = ("exp_avg", "exp_avg_sq")
DIST_DIR = "megatron"  # the megatron-core distributed checkpoint inside a checkpoint folder


class CheckpointIO:
    """Saves and restores ``model``'s shards with the AdamW ``optimizer``'s moments and the
    lr ``scheduler``. ``dist_checkpoint``: ``train.megatron.dist_checkpoint``."""

    def __init__(self, model: LocalModel, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, dist_checkpoint: bool):
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.dist_checkpoint = dist_checkpoint

    # ------------------------------------------------------------------ out

    def save(self, folder: Path) -> None:
        """``folder/model``, ``folder/optimizer/state.json`` and what resume reads (see the
        module docstring). Collective; global rank 0 writes the shared files."""
        folder = Path(folder)
        writer = dist.get_rank() == 0
        self._write(folder / "model", self.named_hf_weights(), writer)
        if self.dist_checkpoint:
            self._save_dist(folder / DIST_DIR)
        else:
            self._save_hf_moments(folder / "optimizer", writer)
        state = self.optimizer.state
        all_steps = self._merge_steps({name: int(state[p]["step"]) if p in state else 0
                                       for name, p in self.model.named_params()})
        if writer:
            (folder / "optimizer").mkdir(parents=True, exist_ok=True)
            (folder / "optimizer" / "state.json").write_text(json.dumps(
                {"steps": all_steps, "scheduler": self.scheduler.state_dict()}))
        dist.barrier()

    def export_hf(self, folder: str | Path) -> None:
        """Write the current weights as an HF folder (collective; global rank 0 writes)."""
        self._write(Path(folder), self.named_hf_weights(), dist.get_rank() == 0)
        dist.barrier()

    def named_hf_weights(self) -> Iterator[tuple[str, Tensor]]:
        params = dict(self.model.named_params())
        yield from self.model.gather(params.get)

    def named_hf_moments(self, moment: str) -> Iterator[tuple[str, Tensor]]:
        """AdamW's ``exp_avg`` or ``exp_avg_sq`` (zeros where a parameter has no state yet),
        gathered under HF names; collective."""
        params = dict(self.model.named_params())

        def local(name: str) -> Tensor | None:
            p = params.get(name)
            return None if p is None else self._moment_or_zeros(p, moment)

        yield from self.model.gather(local)

    def _moment_or_zeros(self, p: torch.nn.Parameter, moment: str) -> Tensor:
        state = self.optimizer.state
        return state[p][moment] if p in state else torch.zeros_like(p)

    def _save_hf_moments(self, folder: Path, writer: bool) -> None:
        for moment in MOMENTS:
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
        from megatron.core.dist_checkpointing.optimizer import (  # heavy, as above
            make_sharded_optimizer_tensor,
        )

        m = self.model
        model = m.gpt.sharded_state_dict()
        self._tie_output_copy(model)
        visual = {}
        if m.vision.visual is not None:
            # Every TP and DP rank of the first stage holds the whole tower: one writes it.
            replica = (0, m.grid.tp_rank, m.grid.dp_rank)
            for name, p in m.vision.visual.named_parameters():
                visual[VISUAL + name] = ShardedTensor.from_rank_offsets(
                    VISUAL + name, p.detach(), replica_id=replica)
        out: dict[str, Any] = {"model": model, "visual": visual}
        if moment is not None:
            entries = {**model, **visual}
            out["optimizer"] = {
                mo: {name: make_sharded_optimizer_tensor(entries[name], moment(p, mo),
                                                         f"optimizer.state.{mo}")
                     for name, p in m.named_params() if p.requires_grad}
                for mo in MOMENTS}
        return out

    def _tie_output_copy(self, model: dict[str, Any]) -> None:
        """With PP > 1 and tied embeddings the last stage's output matrix is a copy of the
        first stage's embedding: point its entry at the embedding's key as a non-main replica
        (as megatron-core does for its own tied models), so that it is not written twice and
        PP = 1, which has no such copy, can load the checkpoint and the other way round."""
        m = self.model
        if not (m.grid.pp > 1 and m.spec.tied_embeddings and m.grid.last_stage):
            return
        copy = model["output_layer.weight"]
        model["output_layer.weight"] = dataclasses.replace(
            copy, key="embedding.word_embeddings.weight", replica_id=(1, *copy.replica_id[1:]))

    def _merge_steps(self, steps: dict[str, int]) -> int:
        """All parameters that have optimiser state took the same number of steps."""
        values = {v for v in steps.values() if v}
        if len(values) > 1:
            raise RuntimeError(f"parameters at different optimiser steps: {sorted(values)}")
        t = torch.tensor([max(values) if values else 0], dtype=torch.long,
                         device=self.model.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t)

    def _write(self, folder: Path, tensors: Iterator[tuple[str, Tensor]], writer: bool) -> None:
        if writer:
            write_hf_folder(folder, self.model.source, tensors, self.model.disk_names)
        else:
            for _ in tensors:
                pass

    # ------------------------------------------------------------------ in

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
            for p in self.model.params():
                for mo in MOMENTS:
                    state[p][mo] = torch.zeros_like(p)

        def moment(p: torch.nn.Parameter, name: str) -> Tensor:
            return state[p][name]

        sharded = self._sharded_state(moment if with_moments else None)
        loaded = dist_checkpointing.load(sharded, str(folder))
        self.model.gpt.load_state_dict(loaded["model"])
        params = dict(self.model.named_params())
        with torch.no_grad():  # (megatron-core drops empty dicts: no tower off stage 0)
            for name, tensor in loaded.get("visual", {}).items():
                params[name].copy_(tensor)
            for mo, tensors in loaded.get("optimizer", {}).items():
                for name, tensor in tensors.items():
                    state[params[name]][mo].copy_(tensor)

    def _load_hf(self, folder: Path, with_moments: bool) -> None:
        m = self.model
        checkpoint = HFCheckpoint(folder / "model")
        m.load_decoder(checkpoint.get)
        if m.vision.visual is not None:
            for name, p in m.vision.visual.named_parameters():
                with torch.no_grad():
                    p.copy_(checkpoint.get(VISUAL + name))
        if with_moments:
            self._load_moments(folder / "optimizer")

    def _load_moments(self, folder: Path) -> None:
        m = self.model
        state = self.optimizer.state
        params = dict(m.named_params())
        for moment in MOMENTS:
            hf = load_file(str(folder / f"{moment}.safetensors"))
            for p in params.values():
                if p.requires_grad:  # a frozen vision tower has no optimiser state
                    state[p].setdefault(moment, torch.zeros_like(p))
            m.load_decoder(hf.__getitem__, lambda name, mo=moment: state[  # type: ignore[misc]
                m.gpt.get_parameter(name)][mo])
            if m.vision.visual is not None:
                for name, p in m.vision.visual.named_parameters():
                    if p.requires_grad:
                        state[p][moment].copy_(hf[VISUAL + name])

    def _set_steps(self, step: int) -> None:
        for p in self.model.params():
            if step:
                self.optimizer.state[p]["step"] = torch.tensor(float(step))
