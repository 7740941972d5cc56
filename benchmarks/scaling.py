"""Data-parallel scaling of a GRPO step: the same global batch on 1 and 2 processes.

    python benchmarks/scaling.py                         # 16 prompts x 8, 9 steps, both backends
    python benchmarks/scaling.py --steps 2 --prompts 4   # a quick check that it runs
    python benchmarks/scaling.py --hidden 512 --backends hf  # a wider language model

The demo's data (synthetic videos, their shards) and tiny Qwen2.5-VL are prepared once in a
temporary folder (``--workdir`` keeps them). Then, for each backend (``hf``, ``megatron``) the
real launcher trains ``--steps`` steps of ``--prompts`` prompts x ``--n`` responses at DP=1
(``torchrun --nproc-per-node 1``) and DP=2 (``--nproc-per-node 2``: each replica rolls out,
scores and trains its half of the groups; one update over both). Every process runs with
``--threads`` torch threads (default 1: on a shared 2-core machine more threads measure the
neighbours). The per-step seconds come from each run's ``metrics.jsonl``: ``time_rollout``
(generation, the slowest replica's), ``time_update`` (the backend's forward/backward and
optimiser step), ``time_step`` (the whole step); each figure is the median over the steps
after the first (warm-up). The rollout phase ends with the slowest replica; the row "rollout,
replicas' mean" (``time_rollout/replica<i>``) shows how much of the gap is imbalance between
the replicas' draws. Printed side by side, with DP=1 / DP=2 as the speed-up.

``--hidden`` replaces the demo's tiny model (hidden size 128) by a wider one of the same kind
(heads of 64, MLP 4x): the demo model's decoding step is mostly fixed per-step cost (Python,
sampling, cache bookkeeping) that a replica pays whatever its batch, so its rollouts split
worse than those of a model whose per-token compute dominates, as on a GPU cluster's 7B.

Before the runs, one process times the rollout engine alone on the same draw of ``--prompts``
prompts and on each of its halves (the same seeded stream the trainer samples): the whole over
the slower half is about the most DP=2 can give the rollout phase with this model, since a
generate call's fixed cost (the per-token Python of the decoding loop, the prefill call) is
paid by every replica whatever its batch, and the phase ends with the slower replica. (About:
the replicas draw their own prompts and sample their own responses, not these halves.) It is
printed beside the measured ratio.

On a machine with fewer free cores than processes the DP=2 figures measure contention, not
scaling: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from evr1.config import load_config
from evr1.data.dataset import PromptSampler
from evr1.models.tiny import build_tiny_model, corpus_from_jsonl
from evr1.rollout.base import SamplingParams
from evr1.train.build import make_trainer_parts

ROOT = Path(__file__).resolve().parents[1]
PHASES = (("rollout", "time_rollout"), ("update", "time_update"), ("step", "time_step"))


def prepare(work: Path, python: str, hidden: int) -> list[str]:
    """The demo data, shards and tiny model under ``work``; returns the common overrides."""
    data = work / "data"
    model = work / ("tiny_model" if not hidden else f"model-h{hidden}")
    common = [f"synthetic.out_dir={data}", "synthetic.num_videos=16",
              "synthetic.include_real_videos=false", "synthetic.include_corrupt=false",
              f"data.train_jsonl={data / 'train.jsonl'}", "data.eval_jsonl=",
              f"model.path={model}", "model.tiny=true",
              f"preprocess.out_dir={work / 'shards'}", "preprocess.num_tasks=1",
              "launch.cluster=local", "train.wandb_mode=disabled", "train.resume=never"]
    if not (work / "shards" / "manifest.json").exists():
        _run([python, str(ROOT / "tools/make_synthetic.py"), "--config",
              str(ROOT / "configs/demo_cpu.yaml"), *common], "make_synthetic")
        _run([python, str(ROOT / "launchers/preprocess.py"), "--config",
              str(ROOT / "configs/demo_cpu.yaml"), *common], "preprocess")
    if hidden and not (model / "config.json").exists():
        build_tiny_model(model, corpus_from_jsonl([data / "train.jsonl"]), hidden_size=hidden,
                         num_heads=hidden // 64, num_kv_heads=2, intermediate_size=4 * hidden)
    return common


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None) -> None:
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{what} failed ({done.returncode}):\n{' '.join(cmd)}\n"
                         f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}")


def train(work: Path, common: list[str], backend: str, dp: int, args: argparse.Namespace
          ) -> dict[str, float]:
    """One run through ``torchrun`` (the launcher users run); its median seconds per phase."""
    run_dir = work / f"run-{backend}-dp{dp}"
    shutil.rmtree(run_dir, ignore_errors=True)
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--standalone", f"--nproc-per-node={dp}",
           str(ROOT / "launchers/train.py"), "--config", str(ROOT / "configs/demo_cpu.yaml"),
           *common, f"run_dir={run_dir}", f"train.backend={backend}",
           f"train.steps={args.steps}", f"train.save_every={args.steps + 1}",
           f"train.prompts_per_step={args.prompts}", f"rollout.n={args.n}",
           f"rollout.max_new_tokens={args.max_new_tokens}",
           f"train.micro_batch_size={args.micro_batch}", "train.log_completions=0"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    _run(cmd, f"{backend} DP={dp}", env)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("kind") == "train"]
    timed = rows[1:] if len(rows) > 1 else rows  # the first step warms caches up
    out = {name: statistics.median(r[key] for r in timed) for name, key in PHASES}
    # The rollout phase waits for the slowest replica; their mean shows what balance would give.
    out["rollout, replicas' mean"] = statistics.median(
        statistics.mean(v for k, v in r.items() if k.startswith("time_rollout/replica"))
        for r in timed)
    counts = [v for k, v in sorted(rows[-1].items()) if k.startswith("rollouts/replica")]
    out["per_replica"] = counts  # type: ignore[assignment]
    return out


def rollout_bound(work: Path, common: list[str], args: argparse.Namespace) -> dict[str, float]:
    """Seconds per ``generate`` call of one process (``--threads`` threads) on a draw of
    ``--prompts`` prompts ("whole") and on each of its halves ("first", "second"): the best
    of 3 calls each, after a warm-up."""
    torch.set_num_threads(args.threads)
    cfg = load_config(ROOT / "configs/demo_cpu.yaml", [*common, f"run_dir={work / 'bound'}",
                                                       "train.backend=hf"])
    parts = make_trainer_parts(cfg)
    drawn = PromptSampler(len(parts.train_set.samples), cfg.seed).next(args.prompts)
    prompts = [parts.train_set.prompt(i) for i in drawn]
    params = SamplingParams(n=args.n, temperature=cfg.rollout.temperature,
                            top_p=cfg.rollout.top_p, max_new_tokens=args.max_new_tokens, seed=0)
    half = args.prompts // 2
    seconds = {}
    for name, share in (("whole", prompts), ("first", prompts[:half]),
                        ("second", prompts[half:])):
        parts.engine.generate(share, params)  # warm-up
        calls = []
        for _ in range(3):
            start = time.perf_counter()
            parts.engine.generate(share, params)
            calls.append(time.perf_counter() - start)
        seconds[name] = min(calls)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=9,
                        help="steps per run (the first is not timed; a step's rollout time "
                        "varies with the sampled lengths: fewer steps, noisier medians)")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per step (global)")
    parser.add_argument("--n", type=int, default=8, help="responses per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--micro-batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--backends", default="hf,megatron")
    parser.add_argument("--hidden", type=int, default=0,
                        help="language model width (default 0: the demo's tiny model, 128)")
    parser.add_argument("--workdir", default="", help="keep data and runs here (default: temp)")
    args = parser.parse_args(argv)
    if args.prompts % 2:
        parser.error("--prompts must be even (DP=2 splits whole groups in two)")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        common = prepare(work, sys.executable, args.hidden)
        print("one process, rollouts only ...", flush=True)
        bound = rollout_bound(work, common, args)
        results = {}
        for backend in args.backends.split(","):
            for dp in (1, 2):
                print(f"{backend} DP={dp} ...", flush=True)
                results[backend, dp] = train(work, common, backend, dp, args)
    print(f"\n{args.prompts} prompts x {args.n} responses per step, {args.max_new_tokens} new "
          f"tokens, {args.threads} thread(s) per process, "
          f"model {f'hidden {args.hidden}' if args.hidden else 'the demo tiny model'}, "
          f"median of steps 2..{args.steps}\n")
    header = "| backend | phase | DP=1 s/step | DP=2 s/step | speed-up |"
    print(header)
    print("|---|---|---:|---:|---:|")
    for backend in args.backends.split(","):
        one, two = results[backend, 1], results[backend, 2]
        for name in [name for name, _ in PHASES] + ["rollout, replicas' mean"]:
            print(f"| {backend} | {name} | {one[name]:.3f} | {two[name]:.3f} | "
                  f"{one[name] / two[name]:.2f}x |")
    slower = max(bound["first"], bound["second"])
    print(f"\none process, the engine alone on the same {args.prompts} prompts and on each half "
          f"of them: {bound['whole']:.3f} s / {bound['first']:.3f} s and {bound['second']:.3f} s "
          f"per call: DP=2, which waits for the slower half, can make the rollout phase at most "
          f"about {bound['whole'] / slower:.2f}x faster with this model (the rest of a call is "
          "fixed cost)")
    print("rollouts per replica in the last step (DP=2): " + ", ".join(
        f"{b}: {results[b, 2]['per_replica']}" for b in args.backends.split(",")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
