"""Official-protocol presets and the gap to the official scores in the collected results.

The presets are checked against the figures of issue 20 (model cards / tech reports, cited in
docs/eval_benchmarks.md), typed here again by hand; the collector runs on prediction shards written
by hand, whose scores are worked out below.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from evr1.config import ConfigError, load_config
from evr1.eval.collect import collect
from evr1.eval.plan import ShardFiles, resolve_benchmarks

ROOT = Path(__file__).resolve().parents[1]

# Issue 20's figures: Qwen2.5-VL-7B (Video-MME without subtitles; Charades-STA mIoU) and
# Qwen3-VL-8B. Typed from the issue, not from the presets.
OFFICIAL = {
    "eval_qwen2_5_vl_7b.yaml": {"videomme": 65.1, "mvbench": 69.6, "tempcompass": 71.7,
                                "longvideobench": 54.7, "mlvu": 70.2, "lvbench": 45.3,
                                "charades_sta": 43.6},
    "eval_qwen3_vl_8b.yaml": {"videomme": 71.4, "mvbench": 68.7, "mlvu": 78.1, "lvbench": 58.0,
                              "videommmu": 65.3, "charades_sta": 56.0},
}
# Frame geometry of each family: Qwen2.5-VL patch 14, Qwen3-VL patch 16, both merge 2.
FAMILY = {"eval_qwen2_5_vl_7b.yaml": ("qwen2_5_vl", 14), "eval_qwen3_vl_8b.yaml": ("qwen3_vl", 16)}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_preset_loads_validates_and_carries_the_official_scores(name):
    cfg = load_config(ROOT / "configs" / name)
    runs = resolve_benchmarks(cfg)  # every name is a registered benchmark
    assert {r.bench.name: r.official_score for r in runs} == OFFICIAL[name]
    family, patch = FAMILY[name]
    assert (cfg.model.family, cfg.data.patch_size, cfg.data.merge_size) == (family, patch, 2)
    assert cfg.eval.prompt_style == "official"
    assert cfg.eval.official_gap_bound == 1.0
    video = cfg.data.video
    assert video.fps == 2.0 and (video.min_frames, video.max_frames) == (4, 768)
    factor = patch * 2  # qwen-vl-utils: 128..768 tokens of factor x factor pixels per frame
    assert (video.min_pixels, video.max_pixels) == (128 * factor ** 2, 768 * factor ** 2)


@pytest.mark.parametrize("override, field", [
    ("eval.official_gap_bound=-1", "eval.official_gap_bound"),
    ("eval.official_gap_bound=.nan", "eval.official_gap_bound"),
])
def test_gap_bound_errors_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(ROOT / "configs" / "eval_qwen3_vl_8b.yaml", [override])


def test_official_score_out_of_range_names_the_entry(tmp_path):
    raw = yaml.safe_load((ROOT / "configs" / "eval_qwen3_vl_8b.yaml").read_text())
    raw["eval"]["benchmarks"][2]["official_score"] = 781  # a typo for 78.1
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"eval\.benchmarks\[2\]\.official_score"):
        load_config(path)


# --------------------------------------------------------------------------- the collector


def _write_shard(cfg, model: str, alias: str, scores: list[float]) -> None:
    files = ShardFiles.of(cfg, model, alias, 0, 1)
    files.predictions.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"{alias}-{i}", "benchmark": alias, "problem_type": "multiple_choice",
             "status": "ok", "score": s, "method": "tag", "meta": {}}
            for i, s in enumerate(scores)]
    files.predictions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    files.marker.write_text(json.dumps({"sampling": {"temperature": 0.0}}))


def _config(tmp_path: Path, bound: float | None = None):
    model = tmp_path / "Qwen-test"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    raw = {"run_dir": str(tmp_path / "run"),
           "eval": {"models": [str(model)],
                    "benchmarks": [
                        {"name": "videomme", "annotation": "unused.parquet",
                         "official_score": 65.1},
                        {"name": "lvbench", "annotation": "unused.jsonl", "official_score": 45.3},
                        {"name": "longvideobench", "annotation": "unused.json"}]}}
    if bound is not None:
        raw["eval"]["official_gap_bound"] = bound
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


def _collect(tmp_path: Path, bound: float | None):
    cfg = _config(tmp_path, bound)
    _write_shard(cfg, "Qwen-test", "videomme", [1, 1, 1, 0])  # 75.0: 75.0 - 65.1 = +9.9
    _write_shard(cfg, "Qwen-test", "lvbench", [1] * 9 + [0] * 11)  # 45.0: 45.0 - 45.3 = -0.3
    _write_shard(cfg, "Qwen-test", "longvideobench", [1, 0])  # 50.0, no official score
    report = collect(cfg)
    rows = {r["benchmark"]: r for r in report.results["results"]}
    return rows, Path(report.files["markdown"]).read_text(), report


def test_collector_writes_official_score_gap_and_flags_beyond_the_default_bound(tmp_path):
    rows, md, report = _collect(tmp_path, None)
    assert report.results["official_gap_bound"] == 1.0
    assert rows["videomme"]["score"] == 75.0
    assert rows["videomme"]["official_gap"] == pytest.approx(9.9, abs=1e-9)  # rounded to 1e-4
    assert rows["videomme"]["official_gap_flagged"] is True
    assert rows["lvbench"]["official_gap"] == pytest.approx(-0.3, abs=1e-9)
    assert rows["lvbench"]["official_gap_flagged"] is False
    assert rows["longvideobench"]["official_gap"] is None
    assert rows["longvideobench"]["official_gap_flagged"] is False
    assert "| benchmark | metric | Qwen-test | official | gap |" in md
    assert "| videomme | accuracy | 75.0 | 65.1 | **+9.9** ⚠ |" in md
    assert "| lvbench | accuracy | 45.0 | 45.3 | -0.3 |" in md
    assert "| longvideobench | accuracy | 50.0 |  |  |" in md
    assert "## Beyond ±1 points of the official score" in md
    assert "- videomme / Qwen-test: 75.0 vs 65.1 official (+9.9)" in md
    assert "lvbench / Qwen-test:" not in md


@pytest.mark.parametrize("bound, flagged", [(10.0, set()), (0.2, {"videomme", "lvbench"})])
def test_gap_bound_is_configurable(tmp_path, bound, flagged):
    rows, md, _ = _collect(tmp_path, bound)
    assert {k for k, r in rows.items() if r["official_gap_flagged"]} == flagged
    assert ("## Beyond" in md) == bool(flagged)
    assert f"⚠ beyond ±{bound:g} (eval.official_gap_bound)" in md
