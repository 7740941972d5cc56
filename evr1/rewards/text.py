"""Free-text answers: ``open_ended`` (exact or ROUGE) and ``ocr`` (word error rate).

open_ended: a reference of at most ``SHORT_ANSWER_WORDS`` words is a short answer and needs an
exact match after normalisation (case, punctuation, articles "a/an/the", whitespace). A longer
reference is compared by the mean F1 of ROUGE-1, ROUGE-2 and ROUGE-L (``rouge-score``), on
tokens that keep non-Latin scripts (each CJK character is a token; the package's default
tokenizer would drop them) and without stemming.

ocr: 1 - WER (``jiwer``), floored at 0, on whitespace-normalised, case-sensitive text. A
reference of fewer than ``OCR_SHORT_WORDS`` words (a word, a number plate) needs an exact match:
one word has no partial WER credit to give anyway.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from .base import InvalidSolution, Verdict

SHORT_ANSWER_WORDS = 3
OCR_SHORT_WORDS = 3
# ROUGE-L is a quadratic dynamic programme in pure Python: answers are cut to this many tokens
# (or 4x the reference, if larger). Precision of a longer answer is already near zero.
MAX_ROUGE_TOKENS = 400

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af"
_TOKEN = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")
_ARTICLES = frozenset({"a", "an", "the"})


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(unicodedata.normalize("NFKC", text).lower())


def normalise_answer(text: str) -> str:
    return " ".join(t for t in tokens(text) if t not in _ARTICLES)


class _Tokenizer:
    """The tokenizer interface ``rouge_score`` accepts."""

    def tokenize(self, text: str) -> list[str]:
        return tokens(text)


_scorer: Any = None


def _rouge_scorer() -> Any:
    # Imported on first use: rouge_score pulls in nltk (about 2 s), which batch workers and
    # short-answer-only runs should not pay for.
    global _scorer
    if _scorer is None:
        # heavy import, only when a ROUGE reward is scored
        from rouge_score import rouge_scorer

        _scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"],
                                           tokenizer=_Tokenizer())
    return _scorer


def rouge_f1(prediction: str, reference: str) -> float:
    """Mean of ROUGE-1, ROUGE-2 and ROUGE-L F1."""
    ref_tokens = tokens(reference)
    cap = max(MAX_ROUGE_TOKENS, 4 * len(ref_tokens))
    pred = " ".join(tokens(prediction)[:cap])
    if not pred or not ref_tokens:
        return 0.0
    scores = _rouge_scorer().score(" ".join(ref_tokens), pred)
    return sum(s.fmeasure for s in scores.values()) / len(scores)


def _reference_text(solution: Any, type_name: str) -> str:
    if isinstance(solution, (str, int, float)) and not isinstance(solution, bool):
        text = str(solution)
        if text.strip():
            return text
    raise InvalidSolution(f"{type_name}: solution {solution!r:.200} is not a non-empty text")


def check_open_ended(solution: Any, **_: Any) -> None:
    """Raise ``InvalidSolution`` unless ``solution`` is a non-empty text (or a number)."""
    _reference_text(solution, "open_ended")


def check_ocr(solution: Any, **_: Any) -> None:
    """Raise ``InvalidSolution`` unless ``solution`` is a non-empty text (or a number)."""
    _reference_text(solution, "ocr")


def score_open_ended(answer: str, solution: Any, **_: Any) -> Verdict:
    reference = _reference_text(solution, "open_ended")
    pred = normalise_answer(answer)
    if not pred:
        return Verdict(0.0, parsed=False)
    gold = normalise_answer(reference)
    if len(gold.split()) <= SHORT_ANSWER_WORDS:
        return Verdict(float(pred == gold), parsed=True, extracted=pred[:200])
    return Verdict(rouge_f1(answer, reference), parsed=True, extracted=pred[:200])


def _ocr_words(text: str) -> list[str]:
    return unicodedata.normalize("NFKC", text).split()


def score_ocr(answer: str, solution: Any, **_: Any) -> Verdict:
    ref = _ocr_words(_reference_text(solution, "ocr"))
    hyp = _ocr_words(answer)
    if not hyp:
        return Verdict(0.0, parsed=False)
    extracted = " ".join(hyp)[:200]
    if len(ref) < OCR_SHORT_WORDS:
        return Verdict(float(hyp == ref), parsed=True, extracted=extracted)
    # Every word beyond the reference length is an insertion: from twice its length on, the
    # WER is >= 1 and the score 0, without running the alignment.
    if len(hyp) >= 2 * len(ref):
        return Verdict(0.0, parsed=True, extracted=extracted)
    import jiwer  # light, but only OCR needs it

    error = jiwer.wer(" ".join(ref), " ".join(hyp))
    return Verdict(max(0.0, 1.0 - error), parsed=True, extracted=extracted)
