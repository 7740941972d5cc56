"""tools/ablations.py --smoke: every run of both ablations, two seeds, a step or two each."""

from __future__ import annotations

import json

import pytest
from conftest import script_module


def load_tool():
    return script_module("tools/ablations.py")


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
    # the reference row: one fixed answer for every question, the training questions' most
    # frequent letter (ties: the first letter), counted here by hand on the JSONL files
    rows = {split: [json.loads(x) for x in (tmp_path / f"abl/data/{split}.jsonl").read_text()
                    .splitlines()] for split in ("train", "heldout")}
    letters = [r["solution"] for r in rows["train"] if r["meta"].get("task") == "direction"]
    top = min(set(letters), key=lambda x: (-letters.count(x), x))
    held = [r["solution"] for r in rows["heldout"] if r["meta"].get("task") == "direction"]
    assert result["a"]["constant"] == {"direction": held.count(top) / len(held)}
    assert set(result["a"]["grpo_runs"]) == set(tool.ARMS_A[1:])
    assert set(result["b"]["grpo_runs"]) == set(tool.ARMS_B)
    text = md.read_text()
    assert "| GRPO arm | sampled-answer accuracy, first 10 steps |" in text
    assert f"| one fixed answer (best on the training questions) | " \
        f"{held.count(top) / len(held):.2f} | |" in text
    assert "python tools/ablations.py --smoke" in text
    for arm in (*tool.ARMS_A, *tool.ARMS_B):
        assert f"| {arm} |" in text
    for key in ("a", "b"):
        assert (md.parent / f"ablation_{key}.png").stat().st_size > 1000
    # A second call reuses every complete run: it trains and evaluates nothing more (before,
    # each complete run was resumed at its last step and evaluated again: a second held-out
    # row for that step, a duplicate point in every curve).
    logs = sorted((tmp_path / "abl").glob("[ab]/**/metrics.jsonl"))
    assert len(logs) == 2 * 3 + 2 * 2 * 2  # (a): SFT + 2 GRPO arms; (b): 2 arms x SFT + GRPO
    before = [p.read_bytes() for p in logs]
    assert tool.main(["--smoke", "--out", str(tmp_path / "abl"), "--results", str(md)]) == 0
    assert [p.read_bytes() for p in logs] == before
    assert json.loads((tmp_path / "abl/ablations.json").read_text()) == result
    # every seed starts from a model built from the full train + held-out texts, whichever
    # ablation comes first: an (b)-only call in a fresh folder builds the same tokenizer
    assert tool.main(["--smoke", "--only", "b", "--seeds", "0", "--out", str(tmp_path / "b"),
                      "--results", str(tmp_path / "b/results.md")]) == 0
    for name in ("tokenizer.json", "config.json"):
        assert (tmp_path / f"b/models/seed0/{name}").read_bytes() == \
            (tmp_path / f"abl/models/seed0/{name}").read_bytes(), name
    # the generated block replaces only itself: a write-up around it stays
    md.write_text(f"# Title\n\nintro\n\n{tool.BEGIN}\nold table\n{tool.END}\n\nwrite-up\n")
    assert tool.main(["--smoke", "--out", str(tmp_path / "abl"), "--results", str(md)]) == 0
    text = md.read_text()
    assert text.startswith("# Title\n\nintro\n\n" + tool.BEGIN) and \
        text.endswith(tool.END + "\n\nwrite-up\n")
    assert "old table" not in text and "| SFT only |" in text
    # the video-only training file holds no image question; the held-out file of (b) neither
    for split in ("train", "heldout"):
        rows = [json.loads(x) for x in
                (tmp_path / f"abl/data/{split}_video.jsonl").read_text().splitlines()]
        assert rows and {r["data_type"] for r in rows} == {"video"}
