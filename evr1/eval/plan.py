"""The eval plan: where evaluation reads and writes, and the list of array tasks.

    <eval.out_dir>/                            default <run_dir>/eval
      prepared/<alias>.jsonl                   the benchmark's questions as evr1 samples
      prepared/media/<alias>/                  media that annotations embed (images)
      shards/<alias>/                          cached frames (the preprocess stage's output)
      predictions/<model>/<alias>/
        predictions-0000i-of-0000N.jsonl       one file per array task (the contract)
        shard-0000i-of-0000N.json              its completion marker: settings, counts, timing
        predictions.jsonl                      merged by the collector
      judgments/<model>/<alias>.jsonl          the judge's verdicts, cached
      results.json, results.md, results.png    written by the collector

Every task's share is computed from the config alone: the same config on the submitting node
and in every array task gives the same task list, so no coordinator is needed.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

from evr1.config import Config, ConfigError, EvalBenchmarkConfig
from evr1.eval.benchmarks import Benchmark, get_benchmark
from evr1.files import atomic_write_json
from evr1.train.checkpoint import latest_checkpoint
from evr1.video.shards import part_name

LATEST = "latest"


def eval_dir(cfg: Config) -> Path:
    return cfg.eval_dir


@dataclass(frozen=True)
class BenchmarkRun:
    """One configured benchmark with every path resolved."""

    alias: str
    bench: Benchmark
    annotation: Path
    video_root: Path
    shard_dir: Path
    prepared: Path
    official_score: float | None
    limit: int


@dataclass(frozen=True)
class ModelRun:
    label: str  # column name in the results
    path: Path


@dataclass(frozen=True)
class EvalTask:
    index: int
    model: ModelRun
    bench: BenchmarkRun
    shard: int
    num_shards: int

    @property
    def name(self) -> str:
        return f"{self.model.label}/{self.bench.alias} shard {self.shard}/{self.num_shards}"


def resolve_benchmarks(cfg: Config) -> list[BenchmarkRun]:
    """The configured benchmarks (default: the synthetic held-out set), paths resolved."""
    out_dir = eval_dir(cfg)
    entries = cfg.eval.benchmarks
    if not entries:
        entries = [EvalBenchmarkConfig(name="synthetic")]
    runs = []
    for i, entry in enumerate(entries):
        try:
            bench = get_benchmark(entry.name)
        except KeyError as exc:
            raise ConfigError(f"eval.benchmarks[{i}]: {exc.args[0]}") from None
        alias = entry.alias or bench.name
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", alias):
            raise ConfigError(f"eval.benchmarks[{i}]: alias {alias!r} must be a plain name "
                              "(letters, digits, _ . -)")
        annotation = entry.annotation
        if bench.name == "synthetic":
            annotation = annotation or cfg.data.eval_jsonl
        if not annotation:
            what = ("data.eval_jsonl (or the entry's annotation) to an evr1 JSONL"
                    if bench.name == "synthetic" else
                    "annotation to the benchmark's official file (see docs/eval_benchmarks.md)")
            raise ConfigError(f"eval.benchmarks[{i}] ({alias}): set {what}")
        annotation_path = cfg.path(annotation)
        default_root = (cfg.data.media_root if bench.name == "synthetic" else "") or str(
            annotation_path if annotation_path.is_dir() else annotation_path.parent)
        default_shards = (cfg.shard_dir if bench.name == "synthetic"
                          else out_dir / "shards" / alias)
        runs.append(BenchmarkRun(
            alias=alias, bench=bench, annotation=annotation_path,
            video_root=cfg.path(entry.video_root or default_root),
            shard_dir=cfg.path(entry.shard_dir) if entry.shard_dir else default_shards,
            prepared=out_dir / "prepared" / f"{alias}.jsonl",
            official_score=entry.official_score, limit=entry.limit))
    return runs


def resolve_model(cfg: Config, spec: str) -> Path:
    """A model folder; ``latest`` is the newest checkpoint's model/, else model.path."""
    if spec != LATEST:
        path = cfg.path(spec)
        if not (path / "config.json").is_file():
            raise ConfigError(f"eval.models: {path} is not a model folder (no config.json)")
        return path
    checkpoint = latest_checkpoint(cfg.checkpoint_dir)
    if checkpoint is not None and (checkpoint / "model" / "config.json").is_file():
        return checkpoint / "model"
    if (cfg.model_path / "config.json").is_file():
        return cfg.model_path
    raise ConfigError(f"eval.models=latest: no checkpoint in {cfg.checkpoint_dir} and no model "
                      f"at model.path ({cfg.model_path}); train first or list model folders in "
                      "eval.models")


def model_label(path: Path) -> str:
    """``.../checkpoints/step-00000150/model`` -> ``step-00000150``; else the folder name."""
    if path.name == "model" and path.parent.name.startswith("step-"):
        return path.parent.name
    return path.name


def pinned_file(cfg: Config) -> Path:
    return eval_dir(cfg) / "pinned_models.json"


def resolve_models(cfg: Config, pinned: bool = False) -> list[ModelRun]:
    """The models to evaluate. With ``pinned``, ``latest`` means the folder the last
    submission evaluated (the collector must not switch to a checkpoint written since)."""
    recorded: dict[str, str] = {}
    if pinned and pinned_file(cfg).is_file():
        recorded = json.loads(pinned_file(cfg).read_text())
    runs: list[ModelRun] = []
    for spec in cfg.eval.models or [LATEST]:
        path = Path(recorded[spec]) if spec in recorded else resolve_model(cfg, spec)
        label = model_label(path)
        if any(r.label == label for r in runs):
            label = f"{path.parent.name}-{label}"
        runs.append(ModelRun(label, path))
    return runs


def pin_models(cfg: Config, record: bool = False) -> Config:
    """The config with ``latest`` replaced by the folder it means now, so that every array
    task evaluates the same checkpoint even if training writes a newer one meanwhile; with
    ``record`` the choice is saved for the collector."""
    specs = cfg.eval.models or [LATEST]
    paths = [str(m.path) for m in resolve_models(cfg)]
    if record:
        atomic_write_json(pinned_file(cfg), dict(zip(specs, paths, strict=True)))
    return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, models=paths))


def eval_tasks(cfg: Config, pinned: bool = False) -> list[EvalTask]:
    """Every (model, benchmark, shard) task, in a fixed order."""
    n = cfg.eval.num_shards
    tasks = []
    for model in resolve_models(cfg, pinned):
        for bench in resolve_benchmarks(cfg):
            for shard in range(n):
                tasks.append(EvalTask(len(tasks), model, bench, shard, n))
    return tasks


def task_count(cfg: Config) -> int:
    """How many tasks ``eval_tasks`` will list, without resolving the models (a chained
    submission counts them before the checkpoint they will evaluate exists)."""
    return len(cfg.eval.models or [LATEST]) * len(resolve_benchmarks(cfg)) * cfg.eval.num_shards


@dataclass(frozen=True)
class ShardFiles:
    predictions: Path
    marker: Path

    @classmethod
    def of(cls, cfg: Config, model: str, alias: str, shard: int, num_shards: int) -> ShardFiles:
        folder = eval_dir(cfg) / "predictions" / model / alias
        return cls(folder / part_name("predictions", shard, num_shards, ".jsonl"),
                   folder / part_name("shard", shard, num_shards, ".json"))


def merged_predictions(cfg: Config, model: str, alias: str) -> Path:
    return eval_dir(cfg) / "predictions" / model / alias / "predictions.jsonl"


def judgments_file(cfg: Config, model: str, alias: str) -> Path:
    return eval_dir(cfg) / "judgments" / model / f"{alias}.jsonl"
