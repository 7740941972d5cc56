"""Training-step throughput: the ``megatron`` backend vs the ``hf`` backend, same model + batch.

    python benchmarks/megatron_step.py                  # CPU: hf, megatron TP=1, TP=2
    python benchmarks/megatron_step.py --steps 5 --hidden 256 --layers 4
    python benchmarks/megatron_step.py --gpu            # CUDA only: ~1B Qwen2.5-shaped model
    python benchmarks/megatron_step.py --gpu --tiny     # the same steps, tiny, on the CPU

CPU part: a random-init tiny Qwen2.5-VL (``evr1.models.tiny``) and one optimiser batch of
video prompts with sampled-length responses, split into micro-batches. Every configuration
runs the same ``train_step`` on the same batches: one warm-up step, then ``--steps`` timed
steps. ``hf`` runs in this process, megatron on ``tp`` local processes (gloo); every process
uses ``--threads`` threads (default 1: on a shared machine OpenMP threads that wait for busy
cores make small ops many times slower, which would measure the neighbours, not the code).
Printed: seconds per step, sequence tokens/s (prompt + response tokens through the forward
and backward), response tokens/s (the tokens the loss is taken over) and the ratio to ``hf``.

GPU part (``--gpu``, needs CUDA; TP=1 on one GPU): a random ~1B Qwen2.5-VL
(``qwen2_5_vl_1b`` shape, text only, bf16, Transformer Engine when installed), 4 micro-batches
of 2,048 tokens, the megatron and the hf backend in the same run; model FLOPs utilisation
MFU = model FLOPs per step (:func:`train_flops`) / seconds / peak, the peak given by
``--peak-tflops`` (default 790: the H200's dense bf16, as measured on such a machine).
``--gpu --tiny`` runs the same steps with the tiny shape on the CPU.
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


def text_batches(num: int, rows: int, prompt: int, response: int, vocab: int,
                 seed: int = 0) -> list[Any]:
    """``num`` micro-batches of ``rows`` random text rows (``prompt + response`` tokens, all
    valid), random advantages: the same for every backend."""
    from evr1.train.batch import PolicyBatch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        ids = torch.randint(100, vocab, (rows, prompt + response), generator=gen)
        out.append(PolicyBatch(
            model_inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)},
            responses=ids[:, prompt:].clone(), mask=torch.ones(rows, response, dtype=torch.bool),
            rows=list(range(rows)), advantages=torch.randn(rows, generator=gen)))
    return out


def train_flops(spec: Any, batches: list[Any]) -> float:
    """Model FLOPs of one training step (forward + backward = 3 x forward), counted as the
    backends compute them: every decoder matmul on every token (2 x weights per token), the
    causal attention scores and weighted sums (2 x 2 x head_dim x heads x (s + 1) / 2 per
    token of a length-s row, per layer), and the output layer on the response tokens only
    (both backends compute logits there only)."""
    h, heads, kv, d = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim
    per_layer = h * (heads + 2 * kv) * d + heads * d * h + 3 * h * spec.ffn_hidden_size
    flops = 0.0
    for b in batches:
        rows, seq = b.model_inputs["input_ids"].shape
        flops += 2 * spec.num_layers * per_layer * rows * seq
        flops += 2 * spec.num_layers * 2 * heads * d * rows * seq * (seq + 1) / 2
        flops += 2 * spec.vocab_size * h * b.num_tokens
    return 3 * flops


def device_section(args: argparse.Namespace) -> None:
    """``--gpu``: the ~1B Qwen2.5-VL shape (``qwen2_5_vl_1b``: the 0.5B decoder + the real
    vision tower) in bf16 on one GPU, 4 micro-batches of one 2,048-token row (1,536 prompt
    + 512 response tokens), megatron then hf on the same folder and batches. ``--tiny``: the
    same steps with the tiny shape and 4 x 256 tokens on the CPU (a check of the script)."""
    from evr1.models import load_model
    from evr1.models.tiny import build_tiny_model
    from evr1.train.backends.hf import HFBackend
    from evr1.train.backends.megatron import MegatronBackend

    if args.tiny:
        device, dtype, shape, prompt, response = "cpu", "float32", "tiny", 192, 64
    elif torch.cuda.is_available():
        device, dtype, shape, prompt, response = "cuda", "bfloat16", "qwen2_5_vl_1b", 1536, 512
    else:
        print("GPU section skipped: no CUDA (--tiny runs its steps on the CPU)")
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_model(Path(tmp) / "model", CORPUS, shape=shape, dtype=dtype,
                                  device=device)
        cfg = TrainConfig(lr=1e-6, megatron=MegatronConfig(tensor_parallel=1))
        megatron = MegatronBackend(folder, cfg, dtype=dtype)
        spec = megatron.model.spec
        batches = text_batches(4, 1, prompt, response, spec.vocab_size, args.seed)
        flops = train_flops(spec, batches)
        rows.append(("megatron", time_steps(megatron, batches, cfg, args.steps)))
        del megatron
        if device == "cuda":
            torch.cuda.empty_cache()
        hf = HFBackend(load_model(folder, getattr(torch, dtype), device), cfg)
        rows.append(("hf", time_steps(hf, batches, cfg, args.steps)))
    tokens = sum(b.model_inputs["input_ids"].numel() for b in batches)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"{name}: shape {shape} ({spec.num_layers} layers, hidden {spec.hidden_size}), "
          f"{dtype}; {len(batches)} micro-batches x {prompt + response} tokens; "
          f"{flops / 1e12:.3g} TFLOP per step; peak {args.peak_tflops:.0f} TFLOP/s\n")
    print("| backend | s / step | tokens/s | TFLOP/s | MFU | vs hf |")
    print("|---|---:|---:|---:|---:|---:|")
    base = rows[-1][1]
    for backend, seconds in rows:
        mfu = f"{100 * flops / seconds / (args.peak_tflops * 1e12):.1f}%" \
            if device == "cuda" else "n/a (CPU)"
        print(f"| {backend} | {seconds:.3f} | {tokens / seconds:,.0f} | "
              f"{flops / seconds / 1e12:.3g} | {mfu} | {base / seconds:.2f}x |")


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
    parser.add_argument("--gpu", action="store_true",
                        help="the ~1B shape on CUDA, megatron and hf (see device_section)")
    parser.add_argument("--tiny", action="store_true",
                        help="with --gpu: the same steps, tiny shape, on the CPU")
    # H200 dense bf16 peak, as measured on this kind of machine (issue 22)
    parser.add_argument("--peak-tflops", type=float, default=790.0)
    args = parser.parse_args()
    if args.gpu:
        device_section(args)
    else:
        cpu_section(args)


if __name__ == "__main__":
    main()
