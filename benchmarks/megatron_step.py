"""Training-step throughput: the ``megatron`` backend vs the ``hf`` backend, same model + batch.

    python benchmarks/megatron_step.py                  # CPU: hf, megatron TP=1, TP=2
    python benchmarks/megatron_step.py --steps 5 --hidden 256 --layers 4
    python benchmarks/megatron_step.py --gpu            # CUDA only: ~1B Qwen2.5-shaped model

CPU part: a random-init tiny Qwen2.5-VL (``evr1.models.tiny``) and one optimiser batch of
video prompts with sampled-length responses, split into micro-batches. Every configuration
runs the same ``train_step`` on the same batches: one warm-up step, then ``--steps`` timed
steps. ``hf`` runs in this process, megatron on ``tp`` local processes (gloo); every process
uses ``--threads`` threads (default 1: on a shared machine OpenMP threads that wait for busy
cores make small ops many times slower, which would measure the neighbours, not the code).
Printed: seconds per step, sequence tokens/s (prompt + response tokens through the forward
and backward), response tokens/s (the tokens the loss is taken over) and the ratio to ``hf``.

GPU part (``--gpu``, needs CUDA; TP=1 on one GPU): a random ~1B model of Qwen2.5 shape
(text only, bf16, Transformer Engine when installed), and model FLOPs utilisation
MFU = 6 * parameters * tokens/s / peak, with the peak given by ``--peak-tflops`` (H100 SXM
dense bf16: 989).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evr1.config import MegatronConfig, TrainConfig

CORPUS = ["What colour is the moving shape?", "How many shapes appear in the video?",
          "Which direction does the shape move? A. left B. right C. up D. down",
          "<answer>B</answer>"]


# --------------------------------------------------------------------------- CPU


def make_batches(model_dir: Path, prompts: int, group: int, micro: int, seed: int) -> list[Any]:
    from evr1.models import load_processor
    from evr1.rollout.base import Prompt
    from evr1.train.batch import make_policy_batches

    processor = load_processor(model_dir)
    rng = np.random.default_rng(seed)
    items = [Prompt(str(i), CORPUS[i % 3], "video",
                    rng.integers(0, 256, (4, 56, 56, 3), dtype=np.uint8))
             for i in range(prompts)]
    vocab = len(processor.tokenizer) - 16  # plain tokens, no special / vision ones
    responses = [rng.integers(5, vocab, int(rng.integers(16, 65))).tolist()
                 for _ in range(prompts * group)]
    pad = processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    batches = make_policy_batches(processor, items, group, responses,
                                  list(range(prompts * group)), micro, pad)
    for b in batches:
        b.advantages = torch.from_numpy(rng.standard_normal(len(b.rows))).float()
    return batches


def count_tokens(batches: list[Any]) -> tuple[int, int]:
    sequence = sum(int(b.model_inputs["attention_mask"].sum()) for b in batches)
    return sequence, sum(b.num_tokens for b in batches)


def time_steps(backend: Any, batches: list[Any], cfg: TrainConfig, steps: int) -> float:
    backend.train_step(batches, cfg.grpo)  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        backend.train_step(batches, cfg.grpo)
    return (time.perf_counter() - start) / steps


def run_hf(model_dir: Path, args: argparse.Namespace) -> float:
    from evr1.models import load_model
    from evr1.train.backends.hf import HFBackend

    cfg = TrainConfig(lr=1e-5)
    backend = HFBackend(load_model(model_dir, torch.float32, "cpu"), cfg)
    return time_steps(backend, make_batches(model_dir, *_batch_args(args)), cfg, args.steps)


def run_megatron(model_dir: Path, args: argparse.Namespace, tp: int, packing: bool) -> float:
    from evr1.train.backends.megatron import MegatronBackend

    cfg = TrainConfig(lr=1e-5, megatron=MegatronConfig(tensor_parallel=tp,
                                                       sequence_packing=packing))
    backend = MegatronBackend(model_dir, cfg)
    return time_steps(backend, make_batches(model_dir, *_batch_args(args)), cfg, args.steps)


def _batch_args(args: argparse.Namespace) -> tuple[int, int, int, int]:
    return args.prompts, args.group, args.micro, args.seed


def cpu_section(args: argparse.Namespace) -> None:
    from evr1.models.tiny import build_tiny_model
    from evr1.train.backends.megatron import spawn

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp) / "model", CORPUS, hidden_size=args.hidden,
                                     num_layers=args.layers, num_heads=args.hidden // 64,
                                     num_kv_heads=args.hidden // 64,
                                     intermediate_size=4 * args.hidden)
        sequence, response = count_tokens(make_batches(model_dir, *_batch_args(args)))
        print(f"model: hidden {args.hidden}, {args.layers} layers; batch: {args.prompts} video "
              f"prompts x {args.group} responses, micro-batch {args.micro}; {sequence} sequence "
              f"tokens, {response} response tokens per step; {cores} cores, "
              f"{args.threads} thread(s) per process\n")
        rows = []
        torch.set_num_threads(args.threads)
        rows.append(("hf", run_hf(model_dir, args)))
        for tp, packing in ((1, True), (1, False), (2, True)):
            if tp > cores:
                continue
            seconds = spawn.run(run_megatron, tp, model_dir, args, tp, packing,
                                threads=args.threads)[0]
            rows.append((f"megatron tp={tp} {'packed' if packing else 'padded'}", seconds))
    base = rows[0][1]
    print("| backend | s / step | sequence tokens/s | response tokens/s | vs hf |")
    print("|---|---:|---:|---:|---:|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.3f} | {sequence / seconds:,.0f} | {response / seconds:,.0f} "
              f"| {base / seconds:.2f}x |")


# --------------------------------------------------------------------------- GPU


def make_random_folder(folder: Path, hidden: int, layers: int, heads: int, kv: int, ffn: int,
                       vocab: int) -> Path:
    """A random Qwen2.5-VL folder (config + safetensors; no tokenizer needed for text)."""
    import transformers

    config = transformers.Qwen2_5_VLConfig(
        text_config=dict(hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv,
                         intermediate_size=ffn, vocab_size=vocab,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                          "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=2, hidden_size=256, num_heads=4, out_hidden_size=hidden))
    with torch.device("cuda"):
        model = transformers.Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    return folder


def text_batches(num: int, rows: int, prompt: int, response: int, vocab: int) -> list[Any]:
    from evr1.train.batch import PolicyBatch

    out = []
    for _ in range(num):
        ids = torch.randint(0, vocab - 1000, (rows, prompt + response))
        out.append(PolicyBatch(
            model_inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)},
            responses=ids[:, prompt:].clone(), mask=torch.ones(rows, response, dtype=torch.bool),
            rows=list(range(rows)), advantages=torch.randn(rows)))
    return out


def gpu_section(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        print("GPU section skipped: no CUDA")
        return
    from evr1.train.backends.megatron import MegatronBackend

    hidden, layers, heads, kv, ffn, vocab = 2048, 16, 16, 2, 11008, 151_936
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_random_folder(Path(tmp), hidden, layers, heads, kv, ffn, vocab)
        cfg = TrainConfig(lr=1e-6, megatron=MegatronConfig(tensor_parallel=1))
        backend = MegatronBackend(folder, cfg, dtype="bfloat16")
        params = sum(p.numel() for p in backend.gpt.parameters())
        batches = text_batches(4, 4, 1024, 1024, vocab)
        seconds = time_steps(backend, batches, cfg, args.steps)
        torch.cuda.synchronize()
    tokens = sum(int(b.model_inputs["attention_mask"].sum()) for b in batches)
    mfu = 6 * params * tokens / seconds / (args.peak_tflops * 1e12)
    print(f"GPU ({torch.cuda.get_device_name()}): {params / 1e9:.2f}B decoder parameters, "
          f"{tokens} tokens/step, {seconds:.3f} s/step, {tokens / seconds:,.0f} tokens/s, "
          f"MFU {100 * mfu:.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--gpu", action="store_true", help="run only the CUDA section")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    args = parser.parse_args()
    if args.gpu:
        gpu_section(args)
    else:
        cpu_section(args)


if __name__ == "__main__":
    main()
