"""Learning curves from a run's metrics.jsonl: reward while training, held-out accuracy."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # batch jobs have no display
import matplotlib.pyplot as plt  # noqa: E402

from evr1.files import atomic_write_figure  # noqa: E402
from evr1.train.metrics import read_metrics  # noqa: E402


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average: noisy per-step rewards become a readable curve."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_runs(runs: dict[str, Path], out_png: Path, task: str = "") -> Path:
    """One figure: training reward (left) and held-out accuracy (right) per run.

    ``task`` picks ``accuracy/<task>`` from the held-out metrics; empty means overall accuracy.
    """
    fig, (ax_reward, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    key = f"accuracy/{task}" if task else "accuracy"
    for label, run_dir in runs.items():
        # SFT runs (evr1.train.sft) sample nothing while training: held-out accuracy only
        train = [r for r in read_metrics(run_dir, "train") if "online_accuracy" in r]
        if train:
            steps = [r["step"] for r in train]
            window = max(1, len(train) // 25)
            ax_reward.plot(steps, smooth([r["online_accuracy"] for r in train], window),
                           label=f"{label}: on-policy accuracy")
        held = [r for r in read_metrics(run_dir, "heldout") if key in r]
        if held:
            ax_acc.plot([r["step"] for r in held], [r[key] for r in held], marker="o",
                        label=label)
    ax_reward.set(title="training (sampled responses, smoothed)", xlabel="step",
                  ylabel="accuracy", ylim=(-0.02, 1.02))
    ax_acc.set(title=f"held-out {key} (greedy)", xlabel="step", ylabel="accuracy",
               ylim=(-0.02, 1.02))
    for ax in (ax_reward, ax_acc):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # an SFT run has no reward curve
            ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    atomic_write_figure(out_png, fig, dpi=110)
    return out_png
