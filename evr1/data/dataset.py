"""Training and evaluation prompts over the preprocessing shards: no decoding at train time.

A ``PromptSet`` pairs the samples of a JSONL file with their cached frames. Samples whose media
failed in preprocessing (listed in failures.jsonl) are left out and counted. The order in which
prompts are drawn is a pure function of (seed, position), so a resumed run that restores its
position draws exactly the prompts the uninterrupted run would have drawn.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from evr1.data.schema import Sample, load_samples
from evr1.video.shards import MediaEntry, ShardReader
from evr1.video.types import Prompt

log = logging.getLogger("evr1.data")


@dataclass
class PromptSet:
    samples: list[Sample]
    reader: ShardReader | None
    default_fps: float = 2.0

    @classmethod
    def load(cls, jsonl: str, reader: ShardReader | None, media_root: str = "",
             include_tasks: list[str] | None = None, default_fps: float = 2.0,
             fallback_type: str = "") -> PromptSet:
        """Samples of ``jsonl`` that have frames in the shards (or need none).

        Every sample must be one the rewards can score (``reward.fallback_type`` admits unknown
        types): a bad one is a ``SampleError`` here, not at the step that first draws it.
        """
        samples = load_samples(jsonl, media_root=media_root or None, check_media=False,
                               fallback_type=fallback_type)
        if include_tasks:
            samples = [s for s in samples if sample_task(s) in include_tasks]
        kept = [s for s in samples if s.data_type == "text" or (reader and s.id in reader)]
        if len(kept) < len(samples):
            log.info("%s: %d of %d samples have no frames in the shards (failed or not "
                     "preprocessed) and are left out", jsonl, len(samples) - len(kept),
                     len(samples))
        if not kept:
            raise ValueError(f"{jsonl}: no usable samples (include_tasks={include_tasks})")
        return cls(kept, reader, default_fps)

    def __len__(self) -> int:
        return len(self.samples)

    def prompt(self, index: int) -> Prompt:
        sample = self.samples[index]
        if sample.data_type == "text":
            return Prompt(sample.id, sample.problem, "text")
        assert self.reader is not None
        cached = self.reader.get(sample.id)
        return Prompt(sample.id, sample.problem, sample.data_type, cached.frames,
                      fps=sampled_fps(cached.media, self.default_fps))


def sample_task(sample: Sample) -> str:
    """The kind of question: ``meta.task`` when the dataset names it, else the problem type."""
    return str(sample.meta.get("task") or sample.problem_type)


def sampled_fps(media: MediaEntry, default: float) -> float:
    """The rate the stored frames were actually taken at (what the model's time axis uses)."""
    ts = media.timestamps_s
    if len(ts) > 1 and ts[-1] > ts[0]:
        return (len(ts) - 1) / (ts[-1] - ts[0])
    return default


@dataclass
class PromptSampler:
    """Epoch-wise shuffled indices; ``position`` counts prompts drawn so far by all replicas.

    One seeded stream of prompts (a new permutation per epoch) serves every data-parallel
    replica: a draw of ``count`` prompts by replica ``replica`` of ``replicas`` takes block
    ``replica`` of the next ``count x replicas`` positions, and every replica advances
    ``position`` by that whole span. So the replicas never draw the same position, together
    they draw exactly the prompts a single process drawing ``count x replicas`` would, and a
    resumed run needs one number, ``position``, whatever the number of replicas.
    """

    size: int
    seed: int
    position: int = 0
    replicas: int = 1
    replica: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.replica < self.replicas:
            raise ValueError(f"replica {self.replica} of {self.replicas}")

    def next(self, count: int) -> list[int]:
        """This replica's ``count`` prompts of the next draw (all replicas draw ``count``)."""
        start = self.position + self.replica * count
        out = [self._index(start + k) for k in range(count)]
        self.position += count * self.replicas
        return out

    def _index(self, k: int) -> int:
        epoch, offset = divmod(k, self.size)
        if getattr(self, "_epoch", None) != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.size, generator=g).tolist(), epoch
        return self._perm[offset]
