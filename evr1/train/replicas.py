"""Data-parallel rollouts: which groups each replica rolls out, and how its results come back.

A job of W ranks with tensor parallel TP and pipeline parallel PP has R = W / (TP x PP)
data-parallel *replicas* (the hf backend: every rank is one). Each step's
``train.prompts_per_step`` prompts are split into R equal blocks of whole groups
(:func:`group_share`; a count that does not divide is a config error,
``TrainConfig.check_replicas``). Replica r draws its block from the shared prompt stream
(``PromptSampler`` with ``replica=r``), generates its groups, scores them, mixes its offline
slots and computes its groups' advantages: GRPO's advantages only look inside a group, so no
replica needs another's rollouts. The update is then one optimiser step over every replica's
rows: the backends normalise the loss by the global batch and sum gradients over replicas.

Inside one replica the TP x PP ranks work on the same rollouts. They *generate identically*:
every rank of the replica runs the same draw with the same seed (:func:`step_seed` depends on
the replica and the step, not on the rank) on the same weights. A vLLM engine with
``tensor_parallel_size = TP`` is one engine across those ranks anyway, each of which must pass
it the same requests and gets the same outputs back; the hf engine is deterministic on the
same weights and seed. Generating once and broadcasting would leave the other ranks idle
during the longest phase and still need a transfer per step, for nothing. What could still
differ is guarded: :func:`check_replicas_agree` compares a digest of every rank's rollouts
(token ids, rewards, offline slots) with its replica's first rank each step and stops the job
with the ranks named, instead of training TP shards on different data.

The random stream of each replica is re-seeded at every draw from (seed, replica, step, round),
so a resumed run continues exactly, with nothing per replica in the checkpoint besides the
shared prompt position.

Metrics are reduced as sums and weights (:class:`Tally`), never as a mean of means, and the
completion records of every replica are gathered to rank 0, which alone writes. Both go over
the whole world as JSON bytes (no pickle); the first rank of each replica speaks for it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Replicas:
    """Where this rank sits among the data-parallel replicas."""

    count: int = 1
    index: int = 0
    leader: bool = True  # the replica's first rank: it speaks for the replica in gathers

    @classmethod
    def of_this_rank(cls, count: int, index: int) -> Replicas:
        """From the backend's data-parallel size and rank; the leader is the replica's lowest
        global rank (collective over the world under torch.distributed)."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return cls(count, index, True)
        indices = gather_json(index, None)
        first = indices.index(index)
        return cls(count, index, first == dist.get_rank())

    def share(self, num_groups: int) -> range:
        return group_share(num_groups, self.count, self.index)


def group_share(num_groups: int, replicas: int, replica: int) -> range:
    """The groups (indices into the step's ``num_groups``) that ``replica`` of ``replicas``
    rolls out: block ``replica`` of equal blocks of whole groups."""
    if not 0 <= replica < replicas:
        raise ValueError(f"replica {replica} of {replicas}")
    if num_groups % replicas:
        raise ValueError(f"{num_groups} groups do not split into {replicas} equal shares of "
                         "whole groups")
    size = num_groups // replicas
    return range(replica * size, (replica + 1) * size)


def step_seed(seed: int, replica: int, step: int, draw: int = 0) -> int:
    """The seed of one draw's random stream (sampling responses): distinct per replica,
    step and draw (dynamic sampling's rounds), the same on every rank of a replica."""
    return int(np.random.SeedSequence([seed, replica, step, draw]).generate_state(1)[0])


# --------------------------------------------------------------------------- gathering


def gather_json(obj: Any, replicas: Replicas | None) -> list[Any]:
    """Every rank's JSON-able ``obj``, in rank order (``replicas`` None), or each replica's
    leader's, in replica order. Collective over the world; one process: ``[obj]``."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    if replicas is not None:
        seen = gather_json([replicas.index, replicas.leader, obj], None)
        by_replica = {index: value for index, leader, value in seen if leader}
        return [by_replica[r] for r in range(replicas.count)]
    device = _device()
    payload = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8, device=device)
    world = dist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([payload.numel()], dtype=torch.long, device=device))
    longest = max(int(s) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[:payload.numel()] = payload
    parts = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(world)]
    dist.all_gather(parts, padded)
    return [json.loads(bytes(p[:int(s)].cpu().tolist()).decode())
            for p, s in zip(parts, sizes, strict=True)]


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def rollout_digest(responses: list[list[int]], rewards: torch.Tensor,
                   offline: torch.Tensor) -> str:
    """A fingerprint of one replica's rollouts: what every rank of it must agree on."""
    h = hashlib.sha256()
    h.update(json.dumps(responses).encode())
    h.update(rewards.to(torch.float64).numpy().tobytes())
    h.update(offline.to(torch.bool).numpy().tobytes())
    return h.hexdigest()


def check_replicas_agree(digest: str, replicas: Replicas) -> None:
    """Raise, on every rank, if a rank's rollouts differ from its replica leader's (GPU
    non-determinism in generation, a reward with a time limit that fired on one rank only):
    the TP/PP ranks of a replica must train on the same rows. Collective over the world."""
    if not dist.is_initialized() or dist.get_world_size() == replicas.count:
        return  # one rank per replica: nothing to compare
    seen = gather_json([replicas.index, replicas.leader, digest], None)
    leaders = {index: d for index, leader, d in seen if leader}
    differ = [rank for rank, (index, _, d) in enumerate(seen) if d != leaders[index]]
    if differ:
        raise RuntimeError(
            f"ranks {differ} drew other rollouts than the first rank of their data-parallel "
            "replica (generation or rewards are not deterministic across the replica's "
            "tensor/pipeline-parallel ranks); refusing to train their shards on different rows")


# --------------------------------------------------------------------------- metrics


@dataclass
class Tally:
    """One replica's step metrics as sums and weights, so that replicas combine exactly:
    a mean over rows is (sum over rows, rows), never a mean of the replicas' means."""

    means: dict[str, list[float]] = field(default_factory=dict)  # name -> [sum, weight]
    sums: dict[str, float] = field(default_factory=dict)  # counts: added over replicas
    maxima: dict[str, float] = field(default_factory=dict)  # e.g. seconds: the slowest replica

    def mean(self, name: str, values: torch.Tensor) -> None:
        """Add ``values`` (one per row, or per token) to the mean ``name``."""
        entry = self.means.setdefault(name, [0.0, 0.0])
        entry[0] += float(values.double().sum())
        entry[1] += float(values.numel())

    def add(self, name: str, value: float) -> None:
        self.sums[name] = self.sums.get(name, 0) + value

    def slowest(self, name: str, value: float) -> None:
        self.maxima[name] = max(self.maxima.get(name, value), value)

    @staticmethod
    def combine(parts: list[Tally], per_replica: tuple[str, ...] = ()) -> dict[str, float]:
        """The step's metrics over every replica; a mean with no rows anywhere is left out.
        Each ``per_replica`` sum or maximum is also reported per replica, as
        ``<name>/replica<i>``."""
        out: dict[str, float] = {}
        weights: dict[str, list[float]] = {}
        for part in parts:
            for name, (total, weight) in part.means.items():
                acc = weights.setdefault(name, [0.0, 0.0])
                acc[0] += total
                acc[1] += weight
            for name, value in part.sums.items():
                out[name] = out.get(name, 0) + value
            for name, value in part.maxima.items():
                out[name] = max(out.get(name, value), value)
        for name, (total, weight) in sorted(weights.items()):
            if weight > 0:
                out[name] = total / weight
        for name in per_replica:
            for i, part in enumerate(parts):
                out[f"{name}/replica{i}"] = part.sums.get(name, part.maxima.get(name, 0.0))
        return out

    def gather(self, replicas: Replicas) -> list[Tally]:
        """Every replica's tally (collective over the world)."""
        return [Tally(**t) for t in gather_json(asdict(self), replicas)]
