"""The method's claims in miniature, on the synthetic tasks and the tiny model, over seeds.

    OMP_NUM_THREADS=1 nice -n 10 python tools/ablations.py --out runs/ablations \\
        --results docs/results.md                       # the full table (docs/results.md)
    python tools/ablations.py --smoke --out /tmp/abl    # a short version of every run (CI)

The full table is 21 training runs (55 min summed over runs on a 2-core box loaded by other
jobs, 32 min of wall clock in two processes: docs/results.md). To use both cores, run
disjoint parts side by side (``--only``, ``--seeds``; each call prepares the data and models
first, so start the second once the first is training) and then the full command, which
reuses every complete run and writes the report.

(a) Offline-online mixing vs online-only vs SFT-only, on the harder tasks (direction of motion,
    counting, temporal grounding: ``--tasks``). Every arm of a seed starts from the same model:
    ``--warm`` steps of cold-start SFT on the expert answers (from random init the online-only
    arm never produces the answer format at all). Then ``--steps`` more steps of SFT (SFT only),
    of GRPO with the expert answer in one slot of every group (mixing, train.offline.mode=always)
    or of GRPO on sampled answers alone (online only, mode=never).
(b) Joint image + video training vs video only: the colour question, on videos and on
    single-shape images (the same attribute), or on the videos alone; both measured on the
    video held-out set. Each arm: ``--warm`` steps of SFT, then ``--steps`` of GRPO with mixing,
    on its own training set.

Every run evaluates held-out accuracy (greedy) every ``--eval-every`` steps; the step axis
counts SFT and GRPO steps alike (a GRPO step also samples rollout.n answers per prompt, so it
costs more). Writes ``<out>/ablations.json`` (every curve of every seed), one PNG per ablation
(mean over seeds, band: min to max) and a markdown report (``--results``, default
``<out>/results.md``) with the final accuracies, mean +- standard deviation over seeds; in a
results file that has the BEGIN/END markers below, only the block between them is replaced, so
a write-up around it stays. Complete runs are reused and interrupted ones resume, so a second
call continues where the first stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display in batch jobs
import matplotlib.pyplot as plt  # noqa: E402

from evr1 import runs  # noqa: E402
from evr1.config import Config, load_config  # noqa: E402
from evr1.data.dataset import sample_task  # noqa: E402
from evr1.data.schema import load_samples, write_samples  # noqa: E402
from evr1.data.synthetic import make_synthetic  # noqa: E402
from evr1.files import atomic_write_bytes, atomic_write_figure, atomic_write_json  # noqa: E402
from evr1.models.loading import ensure_model  # noqa: E402
from evr1.pipeline import stages  # noqa: E402
from evr1.train import checkpoint as ckpt  # noqa: E402
from evr1.train.build import trainer_from_config  # noqa: E402
from evr1.train.groups import score_responses  # noqa: E402
from evr1.train.metrics import read_metrics  # noqa: E402
from evr1.train.sft import SFTTrainer, sft_config  # noqa: E402
from evr1.train.trainer import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# GRPO settings of the arms (the learning check's recipe, tools/learning_check.py): small
# groups over many prompts, mild temperature, Dr.GRPO advantages, lr decaying linearly.
RECIPE = ["rollout.n=4", "train.prompts_per_step=16", "rollout.temperature=0.5",
          "train.grpo.estimator=drgrpo", "train.lr=3e-4", "train.lr_schedule=linear",
          "train.min_lr_ratio=0.1"]
SFT_LR = 1e-3
ARMS_A = ("SFT only", "SFT + GRPO mixing", "SFT + GRPO online only")
ARMS_B = ("joint image + video", "video only")


@dataclasses.dataclass
class Settings:
    out: Path
    seeds: list[int]
    tasks: list[str]
    warm: int
    steps: int
    eval_every: int
    videos: int
    images: int
    overrides: list[str]


def parse(argv: list[str] | None) -> tuple[Settings, Path, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/ablations"))
    parser.add_argument("--results", type=Path, default=None,
                        help="markdown report (default <out>/results.md); PNGs beside it")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tasks", nargs="+", default=["direction", "count", "when"])
    parser.add_argument("--warm", type=int, default=60, help="cold-start SFT steps")
    parser.add_argument("--steps", type=int, default=45, help="steps after the warm start")
    parser.add_argument("--eval-every", type=int, default=30)
    parser.add_argument("--videos", type=int, default=256)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--only", choices=["a", "b"], default=None, help="one ablation only")
    parser.add_argument("--smoke", action="store_true",
                        help="2 seeds, 1 task, 8 videos, 1 + 1 steps: every code path, quickly")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run (a.b=c)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.tasks, args.warm, args.steps, args.eval_every = [0, 1], ["direction"], \
            1, 1, 1
        args.videos, args.images = 8, 4
        args.overrides = ["rollout.n=2", "train.prompts_per_step=2", "rollout.max_new_tokens=6",
                          "train.eval_samples=4", *args.overrides]
    which = ["a", "b"] if args.only is None else [args.only]
    settings = Settings(args.out, args.seeds, args.tasks, args.warm, args.steps,
                        args.eval_every, args.videos, args.images, args.overrides)
    return settings, args.results or args.out / "results.md", which


def base_config(s: Settings, run_dir: Path, seed: int, *extra: str) -> Config:
    out = s.out
    return load_config(ROOT / "configs/demo_cpu.yaml", [
        f"run_dir={run_dir}", f"seed={seed}", f"synthetic.out_dir={out / 'data'}",
        f"synthetic.num_videos={s.videos}", f"synthetic.num_images={s.images}",
        "synthetic.include_real_videos=false", "synthetic.include_corrupt=false",
        # static and flashing shapes: the counting and temporal-grounding questions need them
        "synthetic.distractors=true",
        f"data.train_jsonl={out / 'data/train.jsonl'}",
        f"data.eval_jsonl={out / 'data/heldout.jsonl'}", f"preprocess.out_dir={out / 'shards'}",
        "preprocess.num_tasks=1", f"model.path={out / f'models/seed{seed}'}",
        "launch.cluster=local", "train.wandb_mode=disabled", "train.eval_samples=256",
        "train.keep_last=0", "train.log_completions=0", f"train.eval_every={s.eval_every}",
        *RECIPE, *s.overrides, *extra])


def prepare(s: Settings) -> None:
    """Synthetic data (one data seed for every run), its shards, the video-only files and each
    seed's tiny starting model."""
    cfg = base_config(s, s.out, 0)
    if not (s.out / "data/train.jsonl").exists():
        made = make_synthetic(cfg.synthetic, progress=False)
        print(f"data: {made.num_train} train and {made.num_heldout} held-out questions")
    if stages.preprocess_sequential(cfg):
        raise SystemExit("preprocessing failed")
    for split in ("train", "heldout"):
        target = s.out / f"data/{split}_video.jsonl"
        if not target.exists():
            samples = load_samples(s.out / f"data/{split}.jsonl", check_media=False)
            write_samples(target, [x for x in samples if x.data_type == "video"])
    # Built here, from the full train + held-out texts (the tiny tokenizer is trained on
    # them), so that every arm of a seed starts from the same model whichever run comes first
    # (an ablation (b) run would otherwise build it from its own video-only files).
    for seed in s.seeds:
        ensure_model(base_config(s, s.out, seed))


def curve(run_dir: Path, task: str, offset: int = 0, upto: int | None = None
          ) -> list[tuple[int, float]]:
    """(step, held-out accuracy on ``task``) of a run, steps shifted by ``offset``."""
    rows = [r for r in read_metrics(run_dir, "heldout") if f"accuracy/{task}" in r]
    return [(r["step"] + offset, r[f"accuracy/{task}"]) for r in rows
            if upto is None or r["step"] <= upto]


def complete(cfg: Config) -> bool:
    """The run of ``cfg`` has its final checkpoint and its final held-out evaluation.

    Such a run is not started again: building its trainer would load the data and the model
    only to find the run finished (the trainer then reports its logged figures)."""
    steps = cfg.train.steps
    return (ckpt.step_dir(cfg.checkpoint_dir, steps) / "meta.json").exists() and \
        any(r["step"] == steps for r in read_metrics(Path(cfg.run_dir), "heldout"))


def train(cfg: Config, trainer_class: type[Trainer] = Trainer) -> Path:
    """Train (resume, or reuse when complete) the run of ``cfg``; its run folder."""
    if not complete(cfg):
        trainer_from_config(cfg, trainer_class).run()
    return Path(cfg.run_dir)


def run_sft(cfg: Config, steps: int, save_every: int) -> Path:
    """SFT of ``cfg`` for ``steps`` (resumes); its run folder (``<run_dir>/sft``)."""
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, sft=dataclasses.replace(
        cfg.train.sft, enabled=True, steps=steps, lr=SFT_LR, save_every=save_every)))
    return train(sft_config(cfg), SFTTrainer)


def run_grpo_from(cfg: Config, model: Path, steps: int, mode: str) -> Path:
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, path=str(model), tiny=False),
        train=dataclasses.replace(cfg.train, steps=steps, save_every=steps,
                                  offline=dataclasses.replace(cfg.train.offline, mode=mode)))
    return train(cfg)


def arms_of_a_seed(s: Settings, seed: int, root: Path, extra: list[str], arms: dict[str, str],
                   tasks: list[str], grpo_runs: dict[str, dict[str, str]]
                   ) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """The warm start (SFT, continued to warm + steps: the SFT-only arm), then one GRPO run
    per ``arms`` entry (label -> offline mode) from the warm start's checkpoint; each GRPO
    run's folder goes to ``grpo_runs[label][seed]``."""
    cfg = base_config(s, root / f"seed{seed}", seed, *extra)
    sft_dir = run_sft(cfg, s.warm + s.steps, s.warm)
    warm_model = ckpt.step_dir(sft_dir / "checkpoints", s.warm) / "model"
    curves = {"SFT only": {t: curve(sft_dir, t) for t in tasks}}
    for label, mode in arms.items():
        run = run_grpo_from(base_config(s, root / f"seed{seed}/{mode}", seed, *extra),
                            warm_model, s.steps, mode)
        grpo_runs.setdefault(label, {})[str(seed)] = str(run)
        # the GRPO run's step-0 evaluation is the warm start's model (whether or not the SFT
        # run evaluated at step ``warm``: eval_every need not divide it)
        curves[label] = {t: curve(sft_dir, t, upto=s.warm - 1) + curve(run, t, offset=s.warm)
                         for t in tasks}
    return curves


def ablation_a(s: Settings) -> dict:
    tasks = list(s.tasks)
    extra = [f"data.include_tasks=[{','.join(tasks)}]"]
    arms = {"SFT + GRPO mixing": "always", "SFT + GRPO online only": "never"}
    grpo_runs: dict[str, dict[str, str]] = {}
    per_seed = {seed: arms_of_a_seed(s, seed, s.out / "a", extra, arms, tasks, grpo_runs)
                for seed in s.seeds}
    return {"tasks": tasks, "arms": list(ARMS_A), "curves": _by_arm(per_seed, ARMS_A),
            "grpo_runs": grpo_runs,
            "constant": constant_answer(s, tasks, s.out / "data/heldout.jsonl")}


def ablation_b(s: Settings) -> dict:
    """Joint vs video only on colour: SFT warm start then GRPO with mixing, per training set;
    both evaluated on the video held-out colour questions."""
    per_seed: dict[int, dict] = {}
    grpo_runs: dict[str, dict[str, str]] = {}
    held = f"data.eval_jsonl={s.out / 'data/heldout_video.jsonl'}"
    for seed in s.seeds:
        per_seed[seed] = {}
        for label, train in (("joint image + video", "train.jsonl"),
                             ("video only", "train_video.jsonl")):
            root = s.out / "b" / label.split()[0] / f"seed{seed}"
            cfg = base_config(s, root, seed, "data.include_tasks=[colour]", held,
                              f"data.train_jsonl={s.out / 'data' / train}")
            sft_dir = run_sft(cfg, s.warm, s.warm)
            run = run_grpo_from(cfg, ckpt.step_dir(sft_dir / "checkpoints", s.warm) / "model",
                                s.steps, "always")
            grpo_runs.setdefault(label, {})[str(seed)] = str(run)
            per_seed[seed][label] = {"colour": curve(sft_dir, "colour") +
                                     curve(run, "colour", offset=s.warm)[1:]}
    return {"tasks": ["colour"], "arms": list(ARMS_B), "curves": _by_arm(per_seed, ARMS_B),
            "grpo_runs": grpo_runs,
            "constant": constant_answer(s, ["colour"], s.out / "data/heldout_video.jsonl")}


def constant_answer(s: Settings, tasks: list[str], heldout: Path) -> dict[str, float]:
    """Per task, the held-out accuracy of answering every question with one fixed answer: the
    expert answer (of that task's video training questions) that scores best over those
    training questions. What a model that ignores the video can reach; an arm at this level
    has learned the answer format and the answers' distribution, nothing more."""
    reward = base_config(s, s.out, 0).reward
    train = load_samples(s.out / "data/train.jsonl", check_media=False)
    held = load_samples(heldout, check_media=False)
    out = {}
    for task in tasks:
        mine = [x for x in train if sample_task(x) == task and x.data_type == "video"]
        theirs = [x for x in held if sample_task(x) == task and x.data_type == "video"]
        if not mine or not theirs:
            continue

        def mean(samples: list, text: str) -> float:
            scores = score_responses(samples, [text] * len(samples), reward).accuracy.tolist()
            return sum(scores) / len(scores)

        best = max(sorted({x.offline_output for x in mine}), key=lambda text: mean(mine, text))
        out[task] = mean(theirs, best)
    return out


def _by_arm(per_seed: dict[int, dict], arms) -> dict:
    """arm -> task -> seed -> [[step, accuracy], ...]"""
    out: dict = {}
    for seed, by_arm in per_seed.items():
        for arm in arms:
            for task, points in by_arm[arm].items():
                out.setdefault(arm, {}).setdefault(task, {})[str(seed)] = \
                    [list(p) for p in points]
    return out


def final(points: list[list[float]]) -> float:
    return points[-1][1]


def spread(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


def plot(result: dict, title: str, png: Path, warm: int) -> Path:
    tasks = result["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for arm in result["arms"]:
            seeds = result["curves"][arm][task]
            steps = sorted({p[0] for pts in seeds.values() for p in pts})
            at = [[dict((int(a), b) for a, b in pts).get(x) for pts in seeds.values()]
                  for x in steps]
            keep = [(x, [v for v in vals if v is not None]) for x, vals in zip(steps, at,
                                                                              strict=True)]
            keep = [(x, v) for x, v in keep if v]
            xs = [x for x, _ in keep]
            line, = ax.plot(xs, [statistics.mean(v) for _, v in keep], marker="o", label=arm)
            ax.fill_between(xs, [min(v) for _, v in keep], [max(v) for _, v in keep],
                            color=line.get_color(), alpha=0.15)
        if task in result["constant"]:
            ax.axhline(result["constant"][task], color="grey", linestyle="--", linewidth=1,
                       label="one fixed answer")
        # before it every arm is the same warm-start SFT run (the curves lie on each other)
        ax.axvline(warm, color="black", linestyle=":", linewidth=1, label="end of warm start")
        ax.set(title=f"{title}: held-out {task}", xlabel="step (SFT and GRPO)",
               ylabel="accuracy (greedy)", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    atomic_write_figure(png, fig, dpi=100)
    return png


def table(result: dict) -> list[str]:
    seeds = sorted(next(iter(next(iter(result["curves"].values())).values())))
    head = "| arm | " + " | ".join(f"{t} (mean ± sd)" for t in result["tasks"]) + \
        " | per seed (" + ", ".join(seeds) + ") |"
    lines = [head, "|" + "---|" * (len(result["tasks"]) + 2)]
    for arm in result["arms"]:
        cells, per = [], []
        for task in result["tasks"]:
            values = [final(result["curves"][arm][task][sd]) for sd in seeds]
            cells.append(spread(values))
            per.append(f"{task} " + " / ".join(f"{v:.2f}" for v in values))
        lines.append(f"| {arm} | " + " | ".join(cells) + " | " + "; ".join(per) + " |")
    lines.append("| one fixed answer (best on the training questions) | " + " | ".join(
        f"{result['constant'][task]:.2f}" if task in result["constant"] else "n/a"
        for task in result["tasks"]) + " | |")
    return lines


BEGIN, END = "<!-- ablations.py: begin -->", "<!-- ablations.py: end -->"


def run_minutes(s: Settings, which: list[str]) -> tuple[float, int]:
    """Minutes of training and evaluation summed over the runs of ``which`` (each run: its
    first to its last metrics row, so a reused run counts what it took when it was made) and
    how many runs."""
    seconds, runs_found = 0.0, 0
    # the run folders of these seeds only (another call may be training other seeds)
    patterns = {"a": "a/seed{}/**/", "b": "b/*/seed{}/**/"}
    for key in which:
        found = {p.parent for seed in s.seeds
                 for p in s.out.glob(patterns[key].format(seed) + runs.METRICS)}
        for folder in sorted(found):
            times = [r["time"] for r in read_metrics(folder)]
            if times:
                seconds += max(times) - min(times)
                runs_found += 1
    return seconds / 60, runs_found


def grpo_lines(result: dict, window: int = 10) -> list[str]:
    """What the GRPO runs did on their training prompts: the sampled answers' accuracy over
    the first and the last ``window`` steps, and the share of groups whose rewards differ (a
    learning signal), each a mean over steps, then mean ± sd over seeds."""
    lines = [f"| GRPO arm | sampled-answer accuracy, first {window} steps | last {window} steps "
             "| groups with a signal |", "|---|---|---|---|"]
    for arm, by_seed in result["grpo_runs"].items():
        first, last, signal = [], [], []
        for folder in by_seed.values():
            rows = read_metrics(Path(folder), "train")
            first.append(statistics.mean(r["online_accuracy"] for r in rows[:window]))
            last.append(statistics.mean(r["online_accuracy"] for r in rows[-window:]))
            signal.append(statistics.mean(r["groups_with_signal"] / r["groups_drawn"]
                                          for r in rows))
        lines.append(f"| {arm} | {spread(first)} | {spread(last)} | {spread(signal)} |")
    return lines


def report_lines(s: Settings, results: dict, pngs: dict[str, Path], md: Path, command: str,
                 seconds: float, which: list[str]) -> list[str]:
    minutes, count = run_minutes(s, which)
    lines = [f"Made by `{command}` ({seconds / 60:.0f} min for this call, which reuses complete "
             f"runs; the {count} runs took "
             f"{minutes:.0f} min of training and evaluation, summed; seeds "
             f"{', '.join(map(str, s.seeds))}; {s.videos} videos, {s.images} images; "
             f"{s.warm} SFT warm-start steps, then {s.steps} steps; held-out accuracy every "
             f"{s.eval_every} steps). Final held-out accuracy, mean ± standard deviation over "
             "seeds; the plots show the mean and, shaded, the range over seeds.", ""]
    names = {"a": "(a) offline-online mixing vs online only vs SFT only",
             "b": "(b) joint image + video vs video only (video held-out colour questions)"}
    for key, result in results.items():
        lines += [f"### {names[key]}", "", *table(result), "", *grpo_lines(result), "",
                  f"![{key}]({pngs[key].relative_to(md.parent)})", ""]
    return lines


def write_report(md: Path, lines: list[str]) -> None:
    """The generated lines go between the BEGIN and END markers of ``md`` when it has them
    (the text around them, the write-up, stays); else ``md`` is (re)written with a title and
    the marked block."""
    block = "\n".join([BEGIN, *lines, END])
    old = md.read_text() if md.exists() else ""
    if BEGIN in old and END in old and old.index(BEGIN) < old.index(END):
        text = old[:old.index(BEGIN)] + block + old[old.index(END) + len(END):]
    else:
        text = "# Ablations in miniature\n\n" + block + "\n"
    atomic_write_bytes(md, text.encode())


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    s, md, which = parse(argv)
    prepare(s)
    results = {}
    if "a" in which:
        results["a"] = ablation_a(s)
    if "b" in which:
        results["b"] = ablation_b(s)
    atomic_write_json(s.out / "ablations.json", results)
    pngs = {k: plot(r, k, md.parent / f"ablation_{k}.png", s.warm) for k, r in results.items()}
    command = "python tools/ablations.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_report(md, report_lines(s, results, pngs, md, command, time.perf_counter() - start,
                                  which))
    for result in results.values():
        print("\n".join(table(result)))
    print(f"report: {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
