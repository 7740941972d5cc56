"""``--prepare``: each benchmark's official annotation file -> an evr1 sample JSONL.

The prepared JSONL is what the rest of the stage reads: the preprocess stage caches its media's
frames into shards (one decode per video, as for training data) and the array tasks take their
questions from it. Preparing is cheap and deterministic, so launchers redo it before every
submission; a changed annotation or prompt style changes the file, and the finished shards
that were computed from the old file are redone (their marker records the file's checksum).

One benchmark whose files cannot be read does not stop the others: ``prepare_all`` prepares
every benchmark it can and reports the ones that failed (their old prepared file, if any, is
removed, so nothing downstream reads questions made from other files).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from evr1.config import Config
from evr1.data.schema import Sample, SampleError, check_reward, write_samples
from evr1.eval.benchmarks import LoadContext, load_benchmark
from evr1.eval.formats import FormatError, MediaResolver
from evr1.eval.plan import BenchmarkRun, eval_dir, resolve_benchmarks

log = logging.getLogger("evr1.eval")


@dataclass
class PrepareSummary:
    alias: str
    name: str
    samples: int
    path: str
    media_files: int = 0
    media_missing: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        text = (f"{self.alias} ({self.name}): {self.samples} questions -> {self.path}; "
                f"{self.media_files} media files")
        if self.media_missing:
            text += (f", {self.media_missing} NOT FOUND under the video root (they will be "
                     "counted as failed media)")
        if self.skipped:
            text += "; skipped: " + ", ".join(f"{n} {why}" for why, n in self.skipped.items())
        return text


def check_solutions(samples: list[Sample], alias: str) -> None:
    """Every solution must be readable by its problem type: a dataset error found here is
    cheaper than zero scores found after the array ran."""
    for sample in samples:
        try:
            check_reward(sample)  # the registry's check: what the trainer's scoring reads
        except SampleError as exc:
            raise FormatError(f"{alias}: question {sample.id}: {exc.field}: {exc.what}") from exc


def prepare_benchmark(cfg: Config, run: BenchmarkRun) -> PrepareSummary:
    media = MediaResolver(run.video_root)
    ctx = LoadContext(name=run.bench.name, alias=run.alias, annotation=run.annotation,
                      media=media, style=cfg.eval.prompt_style,
                      media_out=eval_dir(cfg) / "prepared" / "media" / run.alias)
    samples = load_benchmark(run.bench, ctx, run.limit)
    check_solutions(samples, run.alias)
    write_samples(run.prepared, samples)
    summary = PrepareSummary(run.alias, run.bench.name, len(samples), str(run.prepared),
                             media.checked, media.missing, dict(ctx.skipped))
    if run.bench.name == "synthetic":  # paths are not resolved through the resolver
        paths = {s.path for s in samples if s.path}
        summary.media_files = len(paths)
    log.info("%s", summary.line())
    return summary


@dataclass
class PrepareFailure:
    alias: str
    name: str
    error: str

    def line(self) -> str:
        return f"{self.alias} ({self.name}): {self.error}"


@dataclass
class PrepareReport:
    prepared: list[PrepareSummary] = field(default_factory=list)
    failed: list[PrepareFailure] = field(default_factory=list)

    def check(self) -> None:
        """Raise a FormatError naming every benchmark that failed (for scripts)."""
        if self.failed:
            raise FormatError("could not prepare " + "; ".join(f.line() for f in self.failed))


def prepare_all(cfg: Config) -> PrepareReport:
    """Prepare every configured benchmark; a benchmark that fails is reported and skipped."""
    report = PrepareReport()
    for run in resolve_benchmarks(cfg):
        try:
            report.prepared.append(prepare_benchmark(cfg, run))
        except (FormatError, SampleError, OSError) as exc:  # files not as the loader expects
            log.error("%s (%s): %s", run.alias, run.bench.name, exc)
            report.failed.append(PrepareFailure(run.alias, run.bench.name, str(exc)))
            run.prepared.unlink(missing_ok=True)  # never leave questions from older files
        except Exception as exc:  # a loader bug on an unforeseen record: the others go on
            log.exception("%s (%s): the loader failed", run.alias, run.bench.name)
            report.failed.append(PrepareFailure(run.alias, run.bench.name,
                                                f"{type(exc).__name__}: {exc}"))
            run.prepared.unlink(missing_ok=True)  # never leave questions from older files
    return report
