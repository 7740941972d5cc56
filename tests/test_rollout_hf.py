"""The hf rollout engine samples from exactly the distribution the trainer scores.

References written here: the raw logits of one plain forward over prompt + sampled response
(no generate, no cache), processed naively (placeholder ban, temperature, top-p).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from evr1.config import TrainConfig
from evr1.models.inputs import vision_token_ids
from evr1.models.loading import load_model, load_processor
from evr1.rollout.base import Prompt, SamplingParams
from evr1.rollout.hf import HFRolloutEngine
from evr1.train.backends.hf import HFBackend
from evr1.train.batch import make_policy_batches


def _prompts() -> list[Prompt]:
    rng = np.random.default_rng(0)
    return [Prompt("t", "What colour is the moving shape?", "text"),
            Prompt("i", "How many shapes appear in the video?", "image",
                   rng.integers(0, 256, (1, 56, 56, 3), dtype=np.uint8))]


def _top_p_kept(probs: torch.Tensor, top_p: float) -> list[int]:
    """The most probable ids whose mass first reaches top_p, one at a time."""
    keep, mass = [], 0.0
    for j in torch.argsort(probs, descending=True).tolist():
        keep.append(j)
        mass += float(probs[j])
        if mass >= top_p:
            break
    return keep


def _naive_logprobs(raw: torch.Tensor, tokens: torch.Tensor, temperature: float, top_p: float,
                    banned: list[int]) -> torch.Tensor:
    """log-prob of ``tokens`` under softmax(raw / T) with the banned ids removed and only the
    most probable tokens whose mass first reaches top_p kept, renormalised; one row at a time."""
    out = []
    for x, token in zip(raw.double(), tokens.tolist(), strict=True):
        x = x / temperature
        x[banned] = float("-inf")
        probs = torch.softmax(x, -1)
        keep = _top_p_kept(probs, top_p)
        kept = torch.full_like(x, float("-inf"))
        kept[keep] = x[keep]
        out.append(torch.log_softmax(kept, -1)[token])
    return torch.stack(out)


def _raw_logits(model, processor, prompts, n, responses, pad_id):
    """[rows, R, V] raw logits that predict each response token: one plain forward."""
    batch = make_policy_batches(processor, prompts, n, responses, list(range(len(responses))),
                                len(responses), pad_id)[0]
    with torch.no_grad():
        logits = model(**batch.model_inputs, use_cache=False).logits
    width = batch.responses.shape[1]
    return logits[:, -width - 1:-1].float(), batch


@pytest.mark.parametrize("generation_config", [None, {"repetition_penalty": 1.7, "min_p": 0.99,
                                                      "top_k": 3}])
def test_engine_logprobs_and_trainer_logprobs_match_the_sampling_distribution(
        tiny_model_dir, tmp_path, generation_config):
    folder = tiny_model_dir
    if generation_config:
        # An instruct checkpoint's generation_config.json: none of it may reach the sampler.
        folder = tmp_path / "model"
        shutil.copytree(tiny_model_dir, folder)
        path = folder / "generation_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **generation_config}))
    processor, model = load_processor(folder), load_model(folder, "float32", "cpu")
    if generation_config:
        assert model.generation_config.min_p == 0.99
    engine = HFRolloutEngine(model, processor)
    params = SamplingParams(n=6, temperature=0.7, top_p=0.9, max_new_tokens=6)
    prompts = _prompts()
    torch.manual_seed(0)
    rollouts = engine.generate(prompts, params)
    if generation_config:
        assert model.generation_config.min_p == 0.99  # the model's own config is restored
    # Sampled, not greedy: min_p 0.99 (were it inherited) would make all six answers the same.
    for g in range(len(prompts)):
        assert len({tuple(r) for r in rollouts.response_ids[g * 6:(g + 1) * 6]}) > 1

    pad_id = processor.tokenizer.pad_token_id
    raw, batch = _raw_logits(model, processor, prompts, params.n, rollouts.response_ids, pad_id)
    banned = vision_token_ids(processor.tokenizer)
    assert banned
    backend = HFBackend(model, TrainConfig(), params.temperature)
    trainer = backend.logprobs(batch)
    for row, ids in enumerate(rollouts.response_ids):
        tokens = torch.tensor(ids)
        logits = raw[row, :len(ids)]
        behaviour = _naive_logprobs(logits, tokens, params.temperature, params.top_p, banned)
        # The float32 forwards (generate's incremental KV cache, the plain forward, the
        # trainer's shared-prefix forward) differ by summation order, ~1e-6 here; a missing or
        # extra processing step (ban, temperature, top-p, an inherited penalty) moves these
        # log-probs by 1e-2 or more.
        torch.testing.assert_close(torch.tensor(rollouts.logprobs[row], dtype=torch.float64),
                                   behaviour, rtol=0, atol=1e-4)
        # The trainer scores the tempered full distribution (no ban, no top-p): exactly the
        # behaviour log-prob plus log of the mass the ban and top-p kept (docs/architecture.md).
        full = torch.log_softmax(logits.double() / params.temperature, -1)
        torch.testing.assert_close(trainer[row, :len(ids)].double(),
                                   full.gather(-1, tokens[:, None]).squeeze(-1),
                                   rtol=0, atol=1e-4)
        kept_mass = torch.stack([_kept_log_mass(x, params.temperature, params.top_p, banned)
                                 for x in logits])
        torch.testing.assert_close(trainer[row, :len(ids)].double() - kept_mass, behaviour,
                                   rtol=0, atol=1e-4)


def _kept_log_mass(raw: torch.Tensor, temperature: float, top_p: float,
                   banned: list[int]) -> torch.Tensor:
    """log of the tempered probability mass that survives the ban and top-p."""
    x = raw.double() / temperature
    full = torch.log_softmax(x, -1)
    x[banned] = float("-inf")
    probs = torch.softmax(x, -1)
    keep = _top_p_kept(probs, top_p)
    return torch.logsumexp(full[keep], -1)


def test_greedy_generation_ignores_the_folder_generation_config(tiny_model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    path = folder / "generation_config.json"
    # no_repeat_ngram_size 1 would forbid any token from repeating in a greedy answer
    path.write_text(json.dumps({**json.loads(path.read_text()), "no_repeat_ngram_size": 1,
                                "repetition_penalty": 5.0}))
    processor = load_processor(folder)
    plain = HFRolloutEngine(load_model(tiny_model_dir, "float32", "cpu"), processor)
    instruct = HFRolloutEngine(load_model(folder, "float32", "cpu"), processor)
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=12)
    prompts = _prompts()
    expected = plain.generate(prompts, params).response_ids
    # The random-init model repeats itself, so the penalties would change its answers.
    assert any(len(set(ids)) < len(ids) for ids in expected)
    assert instruct.generate(prompts, params).response_ids == expected
