"""The collector: merge the shards, find the missing ones, judge, score, report.

For every (model, benchmark) it reads the shard files the array tasks wrote, names each shard
that is missing (its task failed or never ran) or stale (it ran with other settings or an
older prepared file), merges the rest into one predictions file, lets the judge score the
open-ended answers when one is configured, and computes the benchmark's metric. It writes
``results.json`` (everything), ``results.md`` (benchmark x model, the official score beside
ours, the gap, and a flag where the gap is beyond ``eval.official_gap_bound`` points) and
``results.png`` (a bar chart). The exit status is non-zero while any shard is missing.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evr1.config import Config
from evr1.eval.judge import judge_rows, make_judge
from evr1.eval.metrics import summarize
from evr1.eval.plan import (
    BenchmarkRun,
    ModelRun,
    ShardFiles,
    eval_dir,
    eval_tasks,
    judgments_file,
    merged_predictions,
)
from evr1.eval.runner import fingerprint, sampling_settings
from evr1.files import (
    atomic_write_bytes,
    atomic_write_figure,
    atomic_write_json,
    atomic_write_jsonl,
    read_jsonl,
)

log = logging.getLogger("evr1.eval")


@dataclass
class Cell:
    """One (model, benchmark) pair of the results."""

    model: ModelRun
    bench: BenchmarkRun
    num_shards: int
    missing: list[dict[str, Any]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    sampling: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return not self.missing


@dataclass
class CollectReport:
    cells: list[Cell]
    results: dict[str, Any]
    files: dict[str, str]

    @property
    def missing(self) -> list[dict[str, Any]]:
        return [m for cell in self.cells for m in cell.missing]


# --------------------------------------------------------------------------- shards


def _shard_state(cfg: Config, task: Any, files: ShardFiles) -> tuple[str | None, Any]:
    """(why the shard is unusable or None, its marker)."""
    if not files.predictions.is_file() or not files.marker.is_file():
        return "missing (its task failed or has not run)", None
    try:
        marker = json.loads(files.marker.read_text())
    except (OSError, json.JSONDecodeError):
        return "unreadable marker", None
    if task.bench.prepared.is_file() and marker.get("fingerprint") != fingerprint(cfg, task):
        return "stale (run with other settings or an older prepared file)", marker
    return None, marker


def gather(cfg: Config) -> list[Cell]:
    cells: dict[tuple[str, str], Cell] = {}
    for task in eval_tasks(cfg, pinned=True):
        key = (task.model.label, task.bench.alias)
        cell = cells.setdefault(key, Cell(task.model, task.bench, task.num_shards))
        files = ShardFiles.of(cfg, task.model.label, task.bench.alias, task.shard,
                              task.num_shards)
        problem, marker = _shard_state(cfg, task, files)
        if problem is not None:
            cell.missing.append({"model": task.model.label, "benchmark": task.bench.alias,
                                 "shard": task.shard, "num_shards": task.num_shards,
                                 "task_index": task.index, "reason": problem,
                                 "file": str(files.predictions)})
            continue
        cell.rows.extend(read_jsonl(files.predictions))
        cell.sampling.append(marker.get("sampling", {}))
    return list(cells.values())


# --------------------------------------------------------------------------- the report


def collect(cfg: Config) -> CollectReport:
    cells = gather(cfg)
    judge = make_judge(cfg.eval.judge)
    for cell in cells:
        atomic_write_jsonl(merged_predictions(cfg, cell.model.label, cell.bench.alias),
                           cell.rows)
        if judge is not None:
            judged = judge_rows(cell.rows, judge,
                                judgments_file(cfg, cell.model.label, cell.bench.alias))
            if judged:
                atomic_write_jsonl(merged_predictions(cfg, cell.model.label, cell.bench.alias),
                                   cell.rows)
        cell.summary = summarize(cell.rows, cell.bench.bench.metric)
    results = results_json(cfg, cells)
    out = eval_dir(cfg)
    files = {"json": str(out / "results.json"), "markdown": str(out / "results.md"),
             "png": str(out / "results.png")}
    atomic_write_json(Path(files["json"]), results)
    atomic_write_bytes(Path(files["markdown"]), markdown(results).encode())
    bar_chart(results, Path(files["png"]))
    return CollectReport(cells, results, files)


@dataclass(frozen=True)
class OfficialGap:
    """Our score minus the officially reported one, in points, and whether it is beyond the
    bound (``eval.official_gap_bound``); None where either score is missing."""

    gap: float | None
    flagged: bool

    @classmethod
    def of(cls, score: float | None, official: float | None, bound: float) -> OfficialGap:
        if score is None or official is None:
            return cls(None, False)
        gap = round(score - official, 4)
        return cls(gap, abs(gap) > bound)


def results_json(cfg: Config, cells: list[Cell]) -> dict[str, Any]:
    rows = []
    bound = cfg.eval.official_gap_bound
    for cell in cells:
        sampling = cell.sampling[0] if cell.sampling else {}
        gap = OfficialGap.of(cell.summary.get("score"), cell.bench.official_score, bound)
        rows.append({
            "model": cell.model.label, "model_path": str(cell.model.path),
            "benchmark": cell.bench.alias, "benchmark_name": cell.bench.bench.name,
            "title": cell.bench.bench.title, "official_score": cell.bench.official_score,
            "official_gap": gap.gap, "official_gap_flagged": gap.flagged,
            "complete": cell.complete, "shards": cell.num_shards,
            "missing_shards": [m["shard"] for m in cell.missing],
            "sampling": sampling,
            "sampling_consistent": all(s == sampling for s in cell.sampling),
            **cell.summary})
    missing = [m for cell in cells for m in cell.missing]
    models = list(dict.fromkeys(c.model.label for c in cells))
    benches = list(dict.fromkeys(c.bench.alias for c in cells))
    return {"complete": not missing, "missing_shards": missing, "models": models,
            "benchmarks": benches, "sampling": sampling_settings(cfg),
            "judge": cfg.eval.judge.backend, "official_gap_bound": bound, "results": rows}


def _fmt(score: float | None, complete: bool, n_unjudged: int) -> str:
    if score is None:
        return "unjudged" if n_unjudged else "-"
    text = f"{score:.1f}"
    if n_unjudged:
        text += "†"
    return text if complete else f"{text} (partial)"


def _decoding(sampling: dict[str, Any]) -> str:
    how = ("greedy (temperature 0)" if sampling.get("temperature") == 0 else
           f"sampling (temperature {sampling.get('temperature')}, top_p {sampling.get('top_p')},"
           f" seed {sampling.get('seed')})")
    return (f"Decoding: {how}, max_new_tokens {sampling.get('max_new_tokens')}, engine "
            f"{sampling.get('engine')}, prompt style {sampling.get('prompt_style')}, frames from "
            f"{sampling.get('frames')}.")


def _fmt_gap(row: dict[str, Any] | None) -> str:
    if row is None or row.get("official_gap") is None:
        return ""
    text = f"{row['official_gap']:+.1f}"
    return f"**{text}** ⚠" if row["official_gap_flagged"] else text


def markdown(results: dict[str, Any]) -> str:
    """Benchmark x model table (official score and the gap to it beside ours), then the
    item counts."""
    models, rows = results["models"], results["results"]
    by = {(r["benchmark"], r["model"]): r for r in rows}
    has_official = any(r["official_score"] is not None for r in rows)
    # results.json written before the gap existed has no bound: the default.
    bound = results.get("official_gap_bound", 1.0)
    gap_heads = (["gap"] if len(models) == 1 else [f"gap {m}" for m in models])
    head = ["benchmark", "metric", *models] + (["official", *gap_heads] if has_official else [])
    lines = ["# Evaluation results", "", _decoding(results["sampling"]), "",
             "| " + " | ".join(head) + " |",
             "|---|---|" + "---:|" * (len(head) - 2)]
    for alias in results["benchmarks"]:
        cells = [by.get((alias, m)) for m in models]
        first = next(c for c in cells if c is not None)
        row = [alias, first["metric"]]
        row += [_fmt(c["score"], c["complete"], c["n_unjudged"]) if c else "-" for c in cells]
        if has_official:
            official = first["official_score"]
            row.append("" if official is None else f"{official:.1f}")
            row += [_fmt_gap(c) for c in cells]
        lines.append("| " + " | ".join(row) + " |")
    if any(r["n_unjudged"] for r in rows):
        lines += ["", "† open-ended items without a judge are left out of that score (see the "
                  "unjudged column)."]
    if has_official:
        lines += ["", f"gap = ours - official, in points; ⚠ beyond ±{bound:g} "
                  "(eval.official_gap_bound): the protocol (frames, pixels, prompt, decoding) or "
                  "the loader may differ from the report's (docs/eval_benchmarks.md)."]
        flagged = [r for r in rows if r.get("official_gap_flagged")]
        if flagged:
            lines += ["", f"## Beyond ±{bound:g} points of the official score", ""]
            lines += [f"- {r['benchmark']} / {r['model']}: {r['score']:.1f} vs "
                      f"{r['official_score']:.1f} official ({r['official_gap']:+.1f})"
                      + ("" if r["complete"] else ", partial") for r in flagged]
    lines += ["", "| benchmark | model | items | scored | unextracted | media failed | errors | "
              "unjudged | missing shards |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['benchmark']} | {r['model']} | {r['n']} | {r['n_scored']} | "
                     f"{r['n_unextracted']} | {r['n_media_failed']} | {r['n_error']} | "
                     f"{r['n_unjudged']} | {', '.join(map(str, r['missing_shards'])) or '-'} |")
    lines += ["", "## Sub-scores", ""]
    for r in rows:
        parts = []
        for group, values in r["sub_scores"].items():
            if isinstance(values, dict) and values:
                inner = ", ".join(f"{k} {v:.1f}" if isinstance(v, (int, float)) else f"{k}"
                                  for k, v in values.items())
                parts.append(f"{group}: {inner}")
        lines.append(f"- **{r['benchmark']} / {r['model']}**: " + ("; ".join(parts) or "-"))
    if results["missing_shards"]:
        lines += ["", "## Missing shards", ""]
        lines += [f"- {m['model']}/{m['benchmark']} shard {m['shard']} of {m['num_shards']} "
                  f"(array task {m['task_index']}): {m['reason']}"
                  for m in results["missing_shards"]]
    return "\n".join(lines) + "\n"


def bar_chart(results: dict[str, Any], path: Path) -> None:
    """Grouped bars: one group per benchmark, one bar per model, the official score hatched."""
    # heavy import, needed only when a figure is drawn
    import matplotlib

    matplotlib.use("Agg")
    # heavy import, needed only when a figure is drawn
    import matplotlib.pyplot as plt

    models, benches = results["models"], results["benchmarks"]
    by = {(r["benchmark"], r["model"]): r for r in results["results"]}
    officials = {r["benchmark"]: r["official_score"] for r in results["results"]}
    series = [(m, [(by.get((b, m)) or {}).get("score") for b in benches], {}) for m in models]
    if any(v is not None for v in officials.values()):
        series.append(("official", [officials.get(b) for b in benches],
                       {"hatch": "//", "edgecolor": "black", "facecolor": "white"}))
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(benches) + 2), 3.6))
    for i, (label, values, style) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(benches))]
        ax.bar(xs, [v or 0.0 for v in values], width, label=label, **style)
    ax.set_xticks(range(len(benches)))
    ax.set_xticklabels(benches, rotation=30, ha="right")
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title("evr1 evaluation")
    fig.tight_layout()
    atomic_write_figure(path, fig, dpi=120)
