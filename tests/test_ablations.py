"""tools/ablations.py --smoke: every run of both ablations, two seeds, a step or two each."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_tool():
    spec = importlib.util.spec_from_file_location("ablations", ROOT / "tools/ablations.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["ablations"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_ablation_smoke_writes_every_curve_table_and_plot(tmp_path):
    tool = load_tool()
    md = tmp_path / "report/results.md"
    assert tool.main(["--smoke", "--out", str(tmp_path / "abl"), "--results", str(md)]) == 0
    result = json.loads((tmp_path / "abl/ablations.json").read_text())
    assert set(result) == {"a", "b"}
    assert result["a"]["arms"] == list(tool.ARMS_A) and result["b"]["arms"] == list(tool.ARMS_B)
    for key, task in (("a", "direction"), ("b", "colour")):
        for arm in result[key]["arms"]:
            seeds = result[key]["curves"][arm][task]
            assert set(seeds) == {"0", "1"}
            for points in seeds.values():
                # evaluated at the start, after the warm start and after the last step
                assert [p[0] for p in points] == [0, 1, 2], (key, arm)
                assert all(0.0 <= p[1] <= 1.0 for p in points)
    # the GRPO arms start from the warm start's model: their own step-0 evaluation is the
    # SFT run's at the warm-start step, question by question the same greedy answers
    for seed in ("0", "1"):
        sft = tool.read_metrics(tmp_path / f"abl/a/seed{seed}/sft", "heldout")
        warm = [r for r in sft if r["step"] == 1]
        for mode in ("always", "never"):
            start = tool.read_metrics(tmp_path / f"abl/a/seed{seed}/{mode}", "heldout")[0]
            assert start["step"] == 0 and start["accuracy"] == warm[0]["accuracy"]
    text = md.read_text()
    assert "python tools/ablations.py --smoke" in text
    for arm in (*tool.ARMS_A, *tool.ARMS_B):
        assert f"| {arm} |" in text
    for key in ("a", "b"):
        assert (md.parent / f"ablation_{key}.png").stat().st_size > 1000
    # the video-only training file holds no image question; the held-out file of (b) neither
    for split in ("train", "heldout"):
        rows = [json.loads(x) for x in
                (tmp_path / f"abl/data/{split}_video.jsonl").read_text().splitlines()]
        assert rows and {r["data_type"] for r in rows} == {"video"}
