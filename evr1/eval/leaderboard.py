"""Every evaluated checkpoint of a training run in one table, and score vs step per benchmark.

Reads the per-checkpoint eval folders that ``evr1.eval.while_training`` writes
(``<eval.out_dir>/steps/step-XXXXXXXX[-full]/``: ``request.json``, ``status.json``,
``results.json``) and writes ``leaderboard.md``, ``leaderboard.json`` and ``leaderboard.png``
beside them. A checkpoint whose evaluation failed, was skipped or has not finished is shown as
such; a benchmark without a score is shown as missing, never as zero, and the average over
benchmarks exists only where every benchmark has a score.

    python launchers/collect.py --leaderboard RUN_DIR
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from evr1.files import atomic_write_bytes, atomic_write_figure, atomic_write_json


@dataclass
class Entry:
    """One checkpoint evaluation (one suite on one checkpoint)."""

    step: int
    label: str
    suite: str  # quick | full
    status: str  # done | failed | skipped | running | pending
    scores: dict[str, float | None] = field(default_factory=dict)  # alias -> score (%)
    complete: dict[str, bool] = field(default_factory=dict)  # alias -> all shards present
    average: float | None = None
    error: str = ""
    seconds: float | None = None  # submission to results


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def read_entry(out_dir: Path) -> Entry:
    request = _read(out_dir / "request.json")
    status = _read(out_dir / "status.json")
    results = _read(out_dir / "results.json")
    state = status.get("state") or "pending"  # submitted or queued, not started
    entry = Entry(step=int(request.get("step", -1)), label=request.get("label", out_dir.name),
                  suite=request.get("suite", "quick"), status=state,
                  error=status.get("error", ""))
    for bench in request.get("benchmarks", []):
        entry.scores[bench] = None
        entry.complete[bench] = False
    if state == "done" and not results:
        entry.status, entry.error = "failed", "done, but no results.json"
    for row in results.get("results", []):
        entry.scores[row["benchmark"]] = row.get("score")
        entry.complete[row["benchmark"]] = bool(row.get("complete"))
    values = list(entry.scores.values())
    if entry.status == "done" and values and all(v is not None for v in values):
        entry.average = sum(values) / len(values)
    if status.get("finished_at") and request.get("submitted_at"):
        entry.seconds = status["finished_at"] - request["submitted_at"]
    return entry


def gather(steps_dir: Path) -> list[Entry]:
    """Every checkpoint evaluation under ``steps_dir``, by step (quick suite first)."""
    if not steps_dir.is_dir():
        return []
    entries = [read_entry(p) for p in steps_dir.iterdir()
               if p.is_dir() and (p / "request.json").is_file()]
    return sorted(entries, key=lambda e: (e.step, e.suite != "quick"))


def best(entries: list[Entry], benchmarks: list[str]) -> dict[str, dict[str, Any]]:
    """Per benchmark and ``average``: the best checkpoint's step, label and score."""
    out: dict[str, dict[str, Any]] = {}
    for key in [*benchmarks, "average"]:
        scored = [(e.average if key == "average" else e.scores.get(key), e) for e in entries
                  if e.status == "done"]
        scored = [(v, e) for v, e in scored if v is not None]
        if scored:
            value, entry = max(scored, key=lambda ve: (ve[0], ve[1].step))
            out[key] = {"step": entry.step, "label": entry.label, "score": value}
    return out


def leaderboard(steps_dir: Path) -> dict[str, Any]:
    entries = gather(steps_dir)
    board: dict[str, Any] = {"steps_dir": str(steps_dir)}
    for suite in ("quick", "full"):
        rows = [e for e in entries if e.suite == suite]
        benches = list(dict.fromkeys(b for e in rows for b in e.scores))
        board[suite] = {"benchmarks": benches, "rows": [asdict(e) for e in rows],
                        "best": best(rows, benches)}
    return board


def _cell(entry: dict[str, Any], bench: str) -> str:
    if entry["status"] != "done":
        return entry["status"]
    value = entry["scores"].get(bench)
    if value is None:
        return "missing"
    return f"{value:.1f}" + ("" if entry["complete"].get(bench) else " (partial)")


def _table(part: dict[str, Any], title: str) -> list[str]:
    benches, rows = part["benchmarks"], part["rows"]
    if not rows:
        return []
    bold = {(b["step"], key) for key, b in part["best"].items()}
    lines = [f"## {title}", "", "| step | " + " | ".join([*benches, "average"]) + " |",
             "|---:|" + "---:|" * (len(benches) + 1)]
    for e in rows:
        cells = []
        for key in [*benches, "average"]:
            text = _cell(e, key) if key != "average" else (
                f"{e['average']:.1f}" if e["average"] is not None else
                (e["status"] if e["status"] != "done" else "n/a"))
            cells.append(f"**{text}**" if (e["step"], key) in bold else text)
        lines.append(f"| {e['step']} | " + " | ".join(cells) + " |")
    lines += ["", "Best checkpoint: " + ("; ".join(
        f"{key} step {b['step']} ({b['score']:.1f})" for key, b in part["best"].items())
        or "none yet") + "."]
    failed = [e for e in rows if e["status"] in ("failed", "skipped")]
    if failed:
        lines += [""] + [f"- step {e['step']}: {e['status']}: {e['error']}" for e in failed]
    return lines + [""]


def markdown(board: dict[str, Any]) -> str:
    lines = ["# Checkpoint leaderboard", "",
             "Scores in %; the average is over the benchmarks of the row and only where every "
             "one has a score; the best per column is in bold.", ""]
    lines += _table(board["quick"], "Per checkpoint (quick suite)")
    lines += _table(board["full"], "Full suite")
    if not board["quick"]["rows"] and not board["full"]["rows"]:
        lines += [f"No checkpoint evaluations in {board['steps_dir']} yet."]
    return "\n".join(lines).rstrip() + "\n"


def plot(board: dict[str, Any], path: Path) -> None:
    """Score vs step, one panel per benchmark of the quick suite (and the average)."""
    # heavy import, needed only when a figure is drawn
    import matplotlib

    matplotlib.use("Agg")
    # heavy import, needed only when a figure is drawn
    import matplotlib.pyplot as plt

    part = board["quick"]
    keys = [*part["benchmarks"], "average"]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        points = [(e["step"], e["average"] if key == "average" else e["scores"].get(key))
                  for e in part["rows"] if e["status"] == "done"]
        points = [(s, v) for s, v in points if v is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o")
        failed = [e["step"] for e in part["rows"] if e["status"] != "done"]
        for step in failed:  # no score: a mark on the axis, not a point at zero
            ax.axvline(step, color="red", linestyle=":", alpha=0.6)
        ax.set(title=key + (f" (no score at steps {failed})" if failed else ""), xlabel="step",
               ylabel="score (%)", ylim=(-2, 102))
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write_figure(path, fig, dpi=110)


def write_leaderboard(steps_dir: Path) -> tuple[dict[str, Any], dict[str, str]]:
    board = leaderboard(steps_dir)
    files = {"markdown": str(steps_dir / "leaderboard.md"),
             "json": str(steps_dir / "leaderboard.json"),
             "png": str(steps_dir / "leaderboard.png")}
    steps_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(Path(files["markdown"]), markdown(board).encode())
    atomic_write_json(Path(files["json"]), board)
    plot(board, Path(files["png"]))
    return board, files
