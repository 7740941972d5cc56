"""Data curation by pass rate: keep what the starting model sometimes, but not always, solves.

Each array task takes every ``num_shards``-th sample of the input JSONL (round robin), reads
its frames from the preprocessing shards (nothing is decoded again), samples ``k`` responses
per prompt with the starting model (vLLM where installed, ``hf`` otherwise; the model is
loaded once per task), scores them with ``evr1.rewards`` and writes one pass-rate record per
sample. A response *passes* when the reward's ``accuracy`` is >= ``curate.pass_threshold``
(1.0: exactly right); a sample's pass rate is passes / k. A sample whose frames are missing
(failed in preprocessing, or not preprocessed) or whose generation or scoring raises gets a
record with its status and reason; the task goes on.

    <curate.out_dir>/                             default <run_dir>/curate
      records/pass_rates-0000i-of-0000N.jsonl     one per array task, written atomically
      records/shard-0000i-of-0000N.json           its completion marker (settings, counts)
      records/partial-0000i-of-0000N.jsonl        progress of a running task (whole batches)
      pass_rates.jsonl                            every record, merged by the collector
      report.json, report.md, pass_rates.png      counts per problem type and pass-rate bucket
      curated.jsonl                               the kept samples (curate.output_jsonl)

A re-run skips a shard whose marker matches the current settings; a task that was killed
resumes from its partial file after the last whole batch (batches are fixed positions in the
shard and each is seeded from its sample ids, so the resumed records equal the uninterrupted
ones). The collector merges the shards (it refuses while one is missing), keeps the samples
whose pass rate is in the configured range, applies the per-type caps (a seeded draw, the same
on every run), attaches one correct sampled response as ``offline_output`` where the pass rate
is above 0 and below ``attach_offline_below``, and writes the report. Filter settings are not
part of a shard's settings: changing them only needs ``--collect`` again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evr1.config import Config, ConfigError
from evr1.data.dataset import sample_task
from evr1.data.schema import Sample, check_files, load_samples, write_samples
from evr1.files import (
    atomic_write_bytes,
    atomic_write_figure,
    atomic_write_json,
    atomic_write_jsonl,
    file_sha256,
    read_jsonl,
)
from evr1.video.shards import part_name

if TYPE_CHECKING:  # evr1.rollout.base imports torch: only the tasks that generate load it
    from evr1.rollout.base import Response

log = logging.getLogger("evr1.curate")

OK = "ok"
MEDIA_FAILED = "media_failed"  # no frames: failed in preprocessing or not preprocessed
ERROR = "error"  # generation or scoring raised for this sample

# Report buckets over the pass rate p: p == 0, four quarters of (0, 1), p == 1.
BUCKETS = ("0", "(0,0.25]", "(0.25,0.5]", "(0.5,0.75]", "(0.75,1)", "1")


def bucket(pass_rate: float) -> str:
    if pass_rate <= 0.0:
        return BUCKETS[0]
    if pass_rate >= 1.0:
        return BUCKETS[-1]
    for name, upper in zip(BUCKETS[1:4], (0.25, 0.5, 0.75), strict=True):
        if pass_rate <= upper:
            return name
    return BUCKETS[4]


# --------------------------------------------------------------------------- where things are


def curate_dir(cfg: Config) -> Path:
    return cfg.curate_dir


def input_jsonl(cfg: Config) -> Path:
    path = cfg.curate.input_jsonl or cfg.data.train_jsonl
    if not path:
        raise ConfigError("curate.input_jsonl is empty and so is data.train_jsonl: name the "
                          "JSONL to curate")
    return cfg.path(path)


def frames_dir(cfg: Config) -> Path:
    return cfg.path(cfg.curate.shard_dir) if cfg.curate.shard_dir else cfg.shard_dir


def output_jsonl(cfg: Config) -> Path:
    return cfg.path(cfg.curate.output_jsonl) if cfg.curate.output_jsonl else \
        curate_dir(cfg) / "curated.jsonl"


def model_dir(cfg: Config) -> Path:
    return cfg.path(cfg.curate.model) if cfg.curate.model else cfg.model_path


@dataclass(frozen=True)
class CurateFiles:
    records: Path
    marker: Path
    partial: Path

    @classmethod
    def of(cls, cfg: Config, shard: int, num_shards: int) -> CurateFiles:
        folder = curate_dir(cfg) / "records"
        return cls(folder / part_name("pass_rates", shard, num_shards, ".jsonl"),
                   folder / part_name("shard", shard, num_shards, ".json"),
                   folder / part_name("partial", shard, num_shards, ".jsonl"))


# --------------------------------------------------------------------------- settings


def resolve_engine(engine: str) -> str:
    """``auto``: vLLM where it is installed and a GPU is present, else ``hf``."""
    if engine != "auto":
        return engine
    import importlib.util

    import torch

    return "vllm" if importlib.util.find_spec("vllm") and torch.cuda.is_available() else "hf"


def sampling_settings(cfg: Config) -> dict[str, Any]:
    """What decides the records; a shard made with other settings is redone."""
    c = cfg.curate
    return {"k": c.k, "temperature": c.temperature, "top_p": c.top_p,
            "max_new_tokens": c.max_new_tokens, "seed": c.seed, "batch_size": c.batch_size,
            "pass_threshold": c.pass_threshold, "engine": resolve_engine(c.engine),
            "dtype": cfg.model.dtype}


def fingerprint(cfg: Config) -> dict[str, Any]:
    return {"model": str(model_dir(cfg)), "input": str(input_jsonl(cfg)),
            "input_sha256": file_sha256(input_jsonl(cfg)), "sampling": sampling_settings(cfg),
            "num_shards": cfg.curate.num_shards}


def _marker_matches(files: CurateFiles, expected: dict[str, Any]) -> str | None:
    """None when the shard is complete for ``expected``; else why not."""
    if not files.marker.is_file() or not files.records.is_file():
        return "not written (its task failed or never ran)"
    try:
        marker = json.loads(files.marker.read_text())
    except (OSError, json.JSONDecodeError):
        return "unreadable marker"
    if marker.get("fingerprint") != expected:
        return "made with other settings, model or input (stale)"
    return None


def load_input(cfg: Config) -> list[Sample]:
    return load_samples(input_jsonl(cfg), media_root=cfg.data.media_root or None,
                        check_media=False, fallback_type=cfg.reward.fallback_type)


def check_inputs(cfg: Config) -> list[Sample]:
    """Fail before any job starts: every sample is one the rewards can score (a
    ``DatasetError`` lists each problem: schema.check_files) and the caps are known."""
    if not input_jsonl(cfg).is_file():
        raise ConfigError(f"curate: input {input_jsonl(cfg)} does not exist")
    check_files([input_jsonl(cfg)], cfg.data.media_root, fallback_type=cfg.reward.fallback_type)
    samples = load_input(cfg)
    canonical_caps(cfg)
    if any(s.data_type != "text" for s in samples) and \
            not (frames_dir(cfg) / "manifest.json").is_file():
        raise ConfigError(f"curate: no frame cache in {frames_dir(cfg)} (run python "
                          "launchers/preprocess.py --config C --array first, or set "
                          "curate.shard_dir)")
    return samples


def canonical_caps(cfg: Config) -> dict[str, int]:
    from evr1.rewards import UnknownProblemType, canonical_type

    caps: dict[str, int] = {}
    for name, cap in cfg.curate.caps.items():
        try:
            caps[canonical_type(name)] = cap
        except UnknownProblemType as exc:
            raise ConfigError(f"curate.caps.{name}: {exc}") from None
    return caps


# --------------------------------------------------------------------------- one task


def batch_seed(seed: int, sample_ids: list[str]) -> int:
    """The sampling seed of one generate call: a function of the run seed and the batch."""
    digest = hashlib.sha256(f"{seed}\n".encode() + "\n".join(sample_ids).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFF_FFFF


def make_engine(cfg: Config, model_path: Path) -> Any:
    """The rollout engine of ``curate.engine``; the model is loaded once per task."""
    if resolve_engine(cfg.curate.engine) == "vllm":
        from evr1.rollout.vllm import make_vllm_engine

        return make_vllm_engine(model_path, cfg.rollout, seed=cfg.curate.seed)
    from evr1.models.loading import load_model, load_processor, resolve_device
    from evr1.rollout.hf import HFRolloutEngine

    device = resolve_device(cfg.curate.device, "curate.device")
    model = load_model(model_path, cfg.model.dtype, device,
                       attn_implementation=cfg.model.attn_implementation)
    return HFRolloutEngine(model, load_processor(model_path))


def _base(sample: Sample) -> dict[str, Any]:
    return {"id": sample.id, "problem_type": sample.problem_type, "task": sample_task(sample)}


def failed_record(sample: Sample, status: str, reason: str) -> dict[str, Any]:
    return {**_base(sample), "status": status, "reason": reason[:500], "k": 0, "passes": 0,
            "pass_rate": None, "accuracies": [], "mean_reward": None, "truncated": 0,
            "lengths": [], "correct_response": None}


def pass_record(sample: Sample, responses: list[Response], accuracies: list[float],
                rewards: list[float], pass_threshold: float) -> dict[str, Any]:
    passed = [a >= pass_threshold for a in accuracies]
    correct = next((r[0] for r, ok in zip(responses, passed, strict=True) if ok), None)
    return {**_base(sample), "status": OK, "k": len(responses), "passes": sum(passed),
            "pass_rate": sum(passed) / len(responses), "accuracies": accuracies,
            "mean_reward": sum(rewards) / len(rewards),
            "truncated": sum(1 for r in responses if r[1]), "lengths": [r[2] for r in responses],
            "correct_response": correct}


def score_group(sample: Sample, texts: list[str], cfg: Config) -> tuple[list[float], list[float]]:
    """(accuracy, overall reward) of each response: the training reward's own scorer."""
    from evr1.rewards import score_batch
    from evr1.train.groups import reward_item

    batch = score_batch([reward_item(sample, t) for t in texts], cfg.reward)
    return [r.accuracy for r in batch.results], [r.overall for r in batch.results]


def curate_batch(engine: Any, frames: Any, samples: list[Sample], cfg: Config
                 ) -> list[dict[str, Any]]:
    """Records for one batch, in the order of ``samples``."""
    import torch

    from evr1.rollout.base import Prompt, SamplingParams, generate_isolating_failures

    records: dict[str, dict[str, Any]] = {}
    ready: list[tuple[Sample, Prompt]] = []
    for sample in samples:
        if sample.data_type == "text":
            ready.append((sample, Prompt(sample.id, sample.problem, "text")))
            continue
        try:
            got = frames.get(sample)
        except Exception as exc:  # an unreadable shard file costs this sample only
            got = f"cannot read frames: {type(exc).__name__}: {exc}"
        if isinstance(got, str):
            records[sample.id] = failed_record(sample, MEDIA_FAILED, got)
        else:
            ready.append((sample, Prompt(sample.id, sample.problem, sample.data_type, got[0],
                                         fps=got[1])))
    if ready:
        c = cfg.curate
        seed = batch_seed(c.seed, [s.id for s, _ in ready])
        torch.manual_seed(seed)  # hf engine; vLLM takes the seed per request
        params = SamplingParams(n=c.k, temperature=c.temperature, top_p=c.top_p,
                                max_new_tokens=c.max_new_tokens, seed=seed)
        groups = generate_isolating_failures(engine, [p for _, p in ready], params)
        for (sample, _), group in zip(ready, groups, strict=True):
            if isinstance(group, str):
                records[sample.id] = failed_record(sample, ERROR, f"generation failed: {group}")
                continue
            try:
                accuracies, rewards = score_group(sample, [r[0] for r in group], cfg)
            except Exception as exc:  # e.g. InvalidSolution: a dataset error in this sample
                records[sample.id] = failed_record(
                    sample, ERROR, f"scoring failed: {type(exc).__name__}: {exc}")
                continue
            records[sample.id] = pass_record(sample, group, accuracies, rewards,
                                             c.pass_threshold)
    return [records[s.id] for s in samples]


@dataclass
class CurateTaskResult:
    index: int
    skipped: bool = False
    samples: int = 0
    resumed_batches: int = 0
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)


def shard_samples(cfg: Config, shard: int) -> list[Sample]:
    return load_input(cfg)[shard::cfg.curate.num_shards]


def _read_partial(files: CurateFiles, expected: dict[str, Any]) -> dict[int, list[dict]]:
    """Whole batches a killed earlier attempt finished (a torn last line is ignored)."""
    if not files.partial.is_file():
        return {}
    lines = files.partial.read_text().splitlines()
    try:
        if not lines or json.loads(lines[0]).get("fingerprint") != expected:
            return {}
    except json.JSONDecodeError:
        return {}
    done: dict[int, list[dict]] = {}
    for line in lines[1:]:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            break  # the write the kill interrupted
        done[int(entry["batch"])] = entry["records"]
    return done


def _append_line(handle: Any, obj: dict[str, Any]) -> None:
    handle.write(json.dumps(obj, sort_keys=True) + "\n")
    handle.flush()
    os.fsync(handle.fileno())


def curate_shard(cfg: Config, index: int) -> CurateTaskResult:
    """Array task ``index`` of ``curate.num_shards``: pass rates of its share; safe to re-run."""
    n = cfg.curate.num_shards
    if not 0 <= index < n:
        raise ValueError(f"curate task index {index} is outside 0..{n - 1}")
    files = CurateFiles.of(cfg, index, n)
    expected = fingerprint(cfg)
    if _marker_matches(files, expected) is None:
        log.info("curate shard %d/%d: already complete, skipped", index, n)
        return CurateTaskResult(index, skipped=True)
    files.marker.unlink(missing_ok=True)
    samples = shard_samples(cfg, index)
    size = cfg.curate.batch_size
    batches = [samples[i:i + size] for i in range(0, len(samples), size)]
    done = {b: r for b, r in _read_partial(files, expected).items() if b < len(batches)}
    start = time.perf_counter()
    records: list[dict[str, Any]] = []
    todo = [b for b in range(len(batches)) if b not in done]
    if todo:
        import torch
        from tqdm import tqdm

        from evr1.eval.runner import ShardFrames, cpu_threads

        torch.set_num_threads(cpu_threads(cfg, n))
        needs_frames = any(s.data_type != "text" for b in todo for s in batches[b])
        frames = ShardFrames(frames_dir(cfg), cfg.data.video.fps) if needs_frames else None
        engine = make_engine(cfg, model_dir(cfg))
        # Start the progress file again from what is kept (drops a torn last line), then
        # append one line per finished batch.
        atomic_write_jsonl(files.partial, [{"fingerprint": expected},
                                           *({"batch": b, "records": done[b]} for b in done)])
        with open(files.partial, "a") as handle:
            bar = tqdm(total=len(samples), initial=sum(len(batches[b]) for b in done),
                       desc=f"curate {index}/{n}", unit="sample", mininterval=2.0)
            for b in todo:
                done[b] = curate_batch(engine, frames, batches[b], cfg)
                _append_line(handle, {"batch": b, "records": done[b]})
                bar.update(len(batches[b]))
            bar.close()
    for b in range(len(batches)):
        records.extend(done[b])
    counts = Counter(r["status"] for r in records)
    result = CurateTaskResult(index, samples=len(records),
                              resumed_batches=len(batches) - len(todo),
                              seconds=time.perf_counter() - start, counts=dict(counts))
    atomic_write_jsonl(files.records, records)
    atomic_write_json(files.marker, {"fingerprint": expected, "shard": index, "num_shards": n,
                                     "result": asdict(result)})
    files.partial.unlink(missing_ok=True)
    log.info("curate shard %d/%d: %d samples in %.1f s (%s)", index, n, len(records),
             result.seconds, dict(counts))
    return result


# --------------------------------------------------------------------------- the filter


def in_range(pass_rate: float, cfg: Config) -> bool:
    """Whether a pass rate is in the kept range (``curate.inclusive`` names closed bounds)."""
    c = cfg.curate
    low_ok = pass_rate >= c.min_pass_rate if c.inclusive in ("min", "both") \
        else pass_rate > c.min_pass_rate
    high_ok = pass_rate <= c.max_pass_rate if c.inclusive in ("max", "both") \
        else pass_rate < c.max_pass_rate
    return low_ok and high_ok


def _draw_key(seed: int, sample_id: str) -> str:
    return hashlib.sha256(f"{seed}:{sample_id}".encode()).hexdigest()


def decide(samples: list[Sample], records: dict[str, dict[str, Any]], cfg: Config
           ) -> dict[str, str]:
    """Each sample id -> ``kept``, ``below_range``, ``above_range``, ``capped`` or its failed
    status. Caps keep a seeded draw of each over-full problem type (independent of order)."""
    from evr1.rewards import canonical_type

    c = cfg.curate
    decision: dict[str, str] = {}
    kept_by_type: dict[str, list[str]] = {}
    for sample in samples:
        rec = records[sample.id]
        if rec["status"] != OK:
            decision[sample.id] = rec["status"]
        elif in_range(rec["pass_rate"], cfg):
            decision[sample.id] = "kept"
            ptype = canonical_type(sample.problem_type, cfg.reward.fallback_type or None)
            kept_by_type.setdefault(ptype, []).append(sample.id)
        else:
            below = rec["pass_rate"] < c.min_pass_rate or (
                rec["pass_rate"] == c.min_pass_rate and c.inclusive not in ("min", "both"))
            decision[sample.id] = "below_range" if below else "above_range"
    for ptype, cap in canonical_caps(cfg).items():
        ids = kept_by_type.get(ptype, [])
        if len(ids) > cap:
            for sample_id in sorted(ids, key=lambda i: _draw_key(c.seed, i))[cap:]:
                decision[sample_id] = "capped"
    return decision


def curated_sample(sample: Sample, rec: dict[str, Any], cfg: Config) -> tuple[Sample, str]:
    """The kept sample (pass rate in ``meta.pass_rate``) and what happened to offline_output:
    ``attached``, ``existing`` or ``none``."""
    threshold = cfg.curate.attach_offline_below
    meta = {**sample.meta, "pass_rate": rec["pass_rate"]}
    out = dataclasses.replace(sample, meta=meta)
    if threshold is None or not 0 < rec["pass_rate"] < threshold:
        return out, "none"
    if sample.offline_output is not None:
        return out, "existing"
    if rec.get("correct_response") is None:  # cannot happen with pass rate > 0
        return out, "none"
    return dataclasses.replace(out, offline_output=rec["correct_response"]), "attached"


# --------------------------------------------------------------------------- the collector


@dataclass
class CurateReport:
    missing: list[dict[str, Any]]
    report: dict[str, Any]
    files: dict[str, str]


def gather(cfg: Config) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(every shard's records, the shards that are missing or stale)."""
    expected = fingerprint(cfg)
    n = cfg.curate.num_shards
    records: list[dict[str, Any]] = []
    missing: list[dict[str, Any]] = []
    for shard in range(n):
        files = CurateFiles.of(cfg, shard, n)
        problem = _marker_matches(files, expected)
        if problem:
            missing.append({"shard": shard, "num_shards": n, "file": str(files.records),
                            "reason": problem})
        else:
            records.extend(read_jsonl(files.records))
    return records, missing


def collect_curation(cfg: Config) -> CurateReport:
    """Merge, filter, attach, report. Writes nothing but the report while a shard is missing."""
    samples = load_input(cfg)
    records, missing = gather(cfg)
    out = curate_dir(cfg)
    if missing:
        report = {"complete": False, "missing": missing}
        atomic_write_json(out / "report.json", report)
        return CurateReport(missing, report, {"json": str(out / "report.json")})
    by_id = {r["id"]: r for r in records}
    absent = [s.id for s in samples if s.id not in by_id]
    if absent:  # the fingerprint covers the input file, so this means a damaged record file
        raise RuntimeError(f"curate: {len(absent)} samples have no record (e.g. {absent[0]}); "
                           "delete the records folder and run the array again")
    decision = decide(samples, by_id, cfg)
    kept: list[Sample] = []
    offline: Counter[str] = Counter()
    for sample in samples:
        if decision[sample.id] == "kept":
            curated, what = curated_sample(sample, by_id[sample.id], cfg)
            kept.append(curated)
            offline[what] += 1
    files = {"records": str(out / "pass_rates.jsonl"), "curated": str(output_jsonl(cfg)),
             "json": str(out / "report.json"), "markdown": str(out / "report.md"),
             "png": str(out / "pass_rates.png")}
    atomic_write_jsonl(out / "pass_rates.jsonl", [by_id[s.id] for s in samples])
    write_samples(output_jsonl(cfg), kept, fallback_type=cfg.reward.fallback_type)
    report = build_report(cfg, samples, by_id, decision, offline, files)
    atomic_write_json(out / "report.json", report)
    atomic_write_bytes(out / "report.md", markdown(report).encode())
    histogram(report, out / "pass_rates.png")
    return CurateReport([], report, files)


def build_report(cfg: Config, samples: list[Sample], records: dict[str, dict[str, Any]],
                 decision: dict[str, str], offline: Counter[str], files: dict[str, str]
                 ) -> dict[str, Any]:
    c = cfg.curate
    outcomes = ("kept", "below_range", "above_range", "capped", MEDIA_FAILED, ERROR)

    def empty() -> dict[str, Any]:
        return {"samples": 0, **{o: 0 for o in outcomes}, "buckets": {b: 0 for b in BUCKETS},
                "passes_hist": [0] * (c.k + 1)}

    from evr1.rewards import canonical_type

    total = empty()
    by_type: dict[str, dict[str, Any]] = {}  # by canonical type, as the caps are
    for sample in samples:
        rec = records[sample.id]
        ptype = canonical_type(sample.problem_type, cfg.reward.fallback_type or None)
        for entry in (total, by_type.setdefault(ptype, empty())):
            entry["samples"] += 1
            entry[decision[sample.id]] += 1
            if rec["status"] == OK:
                entry["buckets"][bucket(rec["pass_rate"])] += 1
                entry["passes_hist"][rec["passes"]] += 1
    low = "[" if c.inclusive in ("min", "both") else "("
    high = "]" if c.inclusive in ("max", "both") else ")"
    return {
        "complete": True,
        "keep": f"{low}{c.min_pass_rate:g}, {c.max_pass_rate:g}{high}",
        "settings": {**sampling_settings(cfg), "model": str(model_dir(cfg)),
                     "input": str(input_jsonl(cfg)), "caps": canonical_caps(cfg),
                     "attach_offline_below": c.attach_offline_below},
        "totals": total, "by_problem_type": dict(sorted(by_type.items())),
        "offline_output": {"attached": offline["attached"], "existing": offline["existing"]},
        "failures": [{"id": s.id, "status": records[s.id]["status"],
                      "reason": records[s.id]["reason"]}
                     for s in samples if records[s.id]["status"] != OK],
        "files": files,
    }


def markdown(report: dict[str, Any]) -> str:
    head = ["problem type", "samples", "failed", *BUCKETS, "kept", "capped"]
    lines = [f"# Curation by pass rate (k = {report['settings']['k']}, keep "
             f"{report['keep']})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = [*report["by_problem_type"].items(), ("**all**", report["totals"])]
    for name, e in rows:
        cells = [name, e["samples"], e[MEDIA_FAILED] + e[ERROR],
                 *(e["buckets"][b] for b in BUCKETS), e["kept"], e["capped"]]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    t = report["totals"]
    offline = report["offline_output"]
    lines += ["", f"Kept {t['kept']} of {t['samples']} samples ({t['below_range']} below the "
              f"range, {t['above_range']} above it, {t['capped']} over a cap, "
              f"{t[MEDIA_FAILED]} without frames, {t[ERROR]} errors). offline_output attached "
              f"to {offline['attached']} (kept {offline['existing']} existing).", ""]
    for f in report["failures"]:
        lines.append(f"- {f['id']}: {f['status']}: {f['reason']}")
    return "\n".join(lines).rstrip() + "\n"


def histogram(report: dict[str, Any], path: Path) -> None:
    """Samples per number of passes (0..k), stacked by problem type; the kept range shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = report["settings"]["k"]
    xs = [j / k for j in range(k + 1)]
    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = [0] * (k + 1)
    for name, entry in report["by_problem_type"].items():
        ax.bar(xs, entry["passes_hist"], width=0.8 / k, bottom=bottom, label=name)
        bottom = [b + h for b, h in zip(bottom, entry["passes_hist"], strict=True)]
    low, high = (float(v) for v in report["keep"][1:-1].split(","))
    ax.axvspan(low, high, color="green", alpha=0.08, label=f"kept {report['keep']}")
    ax.set_xlabel(f"pass rate (passes of k = {k})")
    ax.set_ylabel("samples")
    ax.set_title(f"Pass rates: kept {report['totals']['kept']} of "
                 f"{report['totals']['samples']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write_figure(path, fig, dpi=100)
