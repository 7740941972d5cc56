"""FSDP2 for the ``hf`` backend: the model sharded over the data-parallel ranks of a torchrun /
srun job, and checkpoints that any world size can resume.

Sharding (``torch.distributed.fsdp.fully_shard`` over a 1-D device mesh of every rank): each
transformer block (the classes the model lists in ``_no_split_modules``: decoder layers and
vision blocks) is one FSDP unit, the vision tower's remaining parts (patch embedding, merger)
another, the rest (embeddings, final norm, head) the root unit. Parameters, gradients and
AdamW moments are DTensors holding 1/world of each tensor. Gloo on CPU, NCCL on GPU (one GPU
per rank, ``LOCAL_RANK``).

Two states of the parameters, switched by :class:`Sharding`:

* **sharded** during the update: every forward all-gathers a unit's parameters and frees them
  after use (``reshard_after_forward``), every backward reduce-scatters its gradients;
* **gathered** for rollouts, evaluation and ``named_hf_weights``: every unit is all-gathered
  once after the optimiser step and kept, with resharding after forward turned off, so that
  ``generate`` runs with no collective at all. Ranks generate different numbers of tokens
  (their own prompts, their own stopping points), which per-layer all-gathers could not
  survive: they would wait on each other forever. ``model.state_dict()`` must not be called
  in this state: FSDP2's state-dict pre-hook puts the shards back and frees the gathered copy
  (the rollout engine reads ``named_parameters`` instead).

Every rank must run every unit as often as the others, in the same order, while sharded: each
run is an all-gather (and, in the backward, a reduce-scatter) that the other ranks join. The
language model's units run once per forward on every rank, but the vision tower's run once for
the images and once for the videos of a micro-batch, if it has any: ranks whose micro-batches
differ in modality (one text-only, another with a video) would wait on different collectives.
:meth:`Sharding.vision_stand_ins` closes the gap: the ranks agree which kinds any of them has,
and a rank without one runs the tower on a minimal stand-in input whose output enters the
loss multiplied by zero (the same collectives, no change to any gradient).

Gradients are summed over ranks, not averaged (gradient divide factor 1): the loss of every
micro-batch is already divided by the normaliser of the whole step's batch (all ranks), so the
sum of the ranks' gradients is the gradient of the one-process loss.

Checkpoints (``torch.distributed.checkpoint``, DCP): every rank writes its own shards of the
weights and AdamW moments to ``<folder>/dcp``, with the layout (global shapes and offsets) in
DCP's metadata file, so a run at another world size, one process included, reads its own
pieces. Only tensors go through DCP: DCP reads non-tensor entries with pickle, so the
optimiser's hyper-parameters and the scheduler go to a JSON file (see ``HFBackend.save``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

DCP_DIR = "dcp"
# The model inputs of each kind of visual item, in the order the model's forward encodes them.
VISION_PIXELS = ("pixel_values", "pixel_values_videos")


def launched_world_size() -> int:
    """The number of ranks torchrun started (1 for a plain ``python`` call); Slurm tasks have
    ``WORLD_SIZE`` set from their ``SLURM_*`` variables by the train stage before this."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def join_process_group() -> None:
    """Join the job's process group (gloo on CPU, NCCL on GPU) and make this rank's GPU
    (``LOCAL_RANK``) the current device, so that a model loaded to ``cuda`` lands on it.
    Does nothing in a plain single process or when already joined."""
    if dist.is_initialized() or launched_world_size() == 1:
        return
    from evr1.train.backends.megatron.parallel import init_distributed  # the one rendezvous

    init_distributed()


class Sharding:
    """``model`` sharded over every rank of the default process group (FSDP2)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.world = dist.get_world_size()
        self.rank = dist.get_rank()
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        mesh = init_device_mesh(device_type, (self.world,))
        blocks = set(getattr(model, "_no_split_modules", None) or ())
        if not blocks:
            raise ValueError(f"{type(model).__name__} names no transformer block class "
                             "(_no_split_modules): cannot choose FSDP units")
        # The state-dict names, read now: model.state_dict() under FSDP2 switches every unit
        # back to its shards (a pre-hook), which would drop the gathered parameters.
        self.names = list(model.state_dict())
        for module in list(model.modules()):
            if type(module).__name__ in blocks:
                fully_shard(module, mesh=mesh)
        # The vision tower is a unit of its own: it is also called outside the model's forward
        # (``get_video_features`` in hf.shared_vision_inputs), whose hooks would not gather
        # its patch embedding and merger if the root unit held them.
        visual = getattr(getattr(model, "model", None), "visual", None)
        if visual is not None:
            fully_shard(visual, mesh=mesh)
        self.visual = visual
        fully_shard(model, mesh=mesh)
        self.model = model
        self.units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for unit in self.units:
            # A plain sum (see the module docstring); "force sum" keeps it a SUM reduction,
            # which gloo has (a divide factor alone becomes NCCL's PREMUL_SUM).
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)
        self.gathered = False
        # FSDP2 takes the first unit to run forward as the root of all the others; generate
        # may reach the vision tower before the model's forward, so one token goes through
        # the whole model now (every rank: collective).
        device = torch.device("cuda", torch.cuda.current_device()) \
            if device_type == "cuda" else torch.device("cpu")
        with torch.no_grad():
            model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device))
        # The root keeps its parameters gathered after a forward: shard them again, so that
        # model.parameters() (the optimiser's) are the shards.
        self.gathered = True
        self.shard()

    def vision_stand_ins(self, inputs: dict) -> Tensor | None:
        """Run the vision tower for each kind of visual input (images, videos) that another
        rank's micro-batch has and ``inputs`` lacks, on a stand-in of one merged token; returns
        the sum of the outputs times zero, for the caller to add to its loss (so the backward
        runs the tower's units too), or None when nothing was run. Collective while sharded,
        once per forward; nothing at all while gathered (no forward gathers then)."""
        if self.gathered or self.visual is None:
            return None
        device = next(self.model.parameters()).device
        mine = torch.tensor([inputs.get(key) is not None for key in VISION_PIXELS],
                            dtype=torch.int32, device=device)
        anyone = mine.clone()
        dist.all_reduce(anyone, op=dist.ReduceOp.MAX)
        zero = None
        for have, needed in zip(mine.tolist(), anyone.tolist(), strict=True):
            if needed and not have:
                # The root unit first, as the model's forward on the other ranks gathers it
                # before their tower runs (a no-op once gathered).
                self.model.unshard()
                out = self.visual(*self._stand_in(device))
                term = sum(t.float().sum() for t in _tensors(out)) * 0.0
                zero = term if zero is None else zero + term
        return zero

    def _stand_in(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """The smallest visual input the tower takes: one frame of merge x merge patches."""
        embed = self.visual.patch_embed
        merge = self.visual.spatial_merge_size
        width = embed.in_channels * embed.temporal_patch_size * embed.patch_size ** 2
        dtype = next(self.visual.parameters()).dtype
        pixels = torch.zeros((merge * merge, width), dtype=dtype, device=device)
        return pixels, torch.tensor([[1, merge, merge]], device=device)

    def gather(self) -> None:
        """All-gather every unit's parameters and keep them (collective)."""
        if self.gathered:
            return
        for unit in self.units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        self.gathered = True

    def shard(self) -> None:
        """Free the gathered parameters; forwards gather unit by unit again."""
        if not self.gathered:
            return
        for unit in self.units:
            # Turned on first: a unit whose last forward left it in FSDP's forward state
            # ignores reshard() while resharding after forward is off.
            unit.set_reshard_after_forward(True, recurse=False)
            unit.reshard()
        # FSDP2's default for the root: kept after forward, as backward needs it at once.
        self.model.set_reshard_after_forward(False, recurse=False)
        self.gathered = False

    def full_tensors(self) -> Iterator[tuple[str, Tensor]]:
        """The model's state-dict entries as full tensors, from the gathered parameters (no
        collective; the caller gathers first). Tied weights appear under each of their
        names, as in the model's own ``state_dict``."""
        if not self.gathered:
            raise RuntimeError("full_tensors needs the gathered parameters (Sharding.gather)")
        live = dict(self.model.named_parameters(remove_duplicate=False))
        live.update(self.model.named_buffers(remove_duplicate=False))
        for name in self.names:
            yield name, live[name]


def _tensors(value: object) -> Iterator[Tensor]:
    """Every floating tensor in a model output (nested outputs, tuples and lists)."""
    if isinstance(value, Tensor):
        if value.is_floating_point():
            yield value
    elif isinstance(value, dict):  # transformers' ModelOutput is a dict
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _tensors(item)


def save_dcp(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Write the weights and AdamW moments (this rank's shards) to ``folder``; returns the
    optimiser's ``param_groups`` (numbers and parameter names) for the caller's JSON file.
    Collective under torch.distributed."""
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state["state"]}, checkpoint_id=str(folder))
    return {"param_groups": optim_state["param_groups"]}


def load_dcp(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             saved: dict) -> None:
    """Read :func:`save_dcp` output into ``model`` and ``optimizer``, whatever the world size
    that wrote it. ``saved`` is what ``save_dcp`` returned (from the JSON file)."""
    with_moments = any(name for group in saved["param_groups"] for name in group["params"]) \
        and saved.get("optimizer_steps", 1) > 0
    if with_moments:
        _init_adam_state(optimizer)
    model_state, optim_state = get_state_dict(model, optimizer)
    target = {"model": model_state}
    if with_moments:
        target["optim"] = optim_state["state"]
    dcp.load(target, checkpoint_id=str(folder))
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g
              for g in saved["param_groups"]]
    set_state_dict(model, optimizer, model_state_dict=target["model"],
                   optim_state_dict={"state": target.get("optim", {}), "param_groups": groups})


def _init_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Empty AdamW state for every trainable parameter (the tensors DCP loads into)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
