"""Cold-start SFT: supervised training on the samples' expert answers (``offline_output``).

The usual recipe of video R1 work: a short SFT on expert answers, then GRPO from there. It
runs on the GRPO trainer's own machinery (data, backend, rollout engine for the held-out
evaluation, checkpoints, resume, metrics) in ``<run_dir>/sft/``; only the step differs.

The step reuses the backend's policy-gradient update: every expert response gets advantage 1,
its "old" log-probs are the current ones (the backend's one-update-per-batch design), no KL, no
entropy, no clipping in effect (ratio = 1) and token-mean aggregation. Per token the loss is
then -exp(logp - sg(logp)) * 1, whose gradient is -grad logp, and token-mean over the step's
tokens makes it exactly the gradient of the mean token negative log-likelihood
(tests/test_sft.py checks it against a plain cross-entropy). The log-probs use temperature 1.

GRPO then starts from the last SFT checkpoint's model folder (:func:`grpo_config_after_sft`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from evr1.config import Config, GRPOConfig
from evr1.data.dataset import PromptSampler
from evr1.data.schema import DatasetError
from evr1.train import checkpoint as ckpt
from evr1.train.batch import make_policy_batches
from evr1.train.build import trainer_from_config
from evr1.train.groups import offline_response_ids
from evr1.train.hooks import NoStopSignals, StopSignals
from evr1.train.trainer import StepResult, Trainer, TrainerParts, TrainResult

log = logging.getLogger("evr1.train.sft")


def sft_grpo_config(base: GRPOConfig) -> GRPOConfig:
    """The policy-loss settings under which one update is one SFT step (see the module
    docstring): token-mean, no KL, no entropy bonus, no importance weights or shaping."""
    return dataclasses.replace(base, loss_agg="token-mean", kl_coef=0.0, entropy_coef=0.0,
                               offline_is_clip=None, offline_loss="clip", rollout_is="none")


def sft_run_dir(cfg: Config) -> Path:
    return Path(cfg.run_dir) / "sft"


def sft_config(cfg: Config) -> Config:
    """The config the SFT run trains under: ``<run_dir>/sft``, the ``train.sft`` settings,
    the same model, shards and data as the GRPO run."""
    sft = cfg.train.sft
    train = dataclasses.replace(
        cfg.train, steps=sft.steps, lr=sft.lr or cfg.train.lr,
        prompts_per_step=sft.prompts_per_step or cfg.train.prompts_per_step,
        save_every=sft.save_every or cfg.train.save_every,
        grpo=sft_grpo_config(cfg.train.grpo),
        # the benchmark eval of checkpoints is GRPO's (the eval stage can name SFT's folder)
        async_eval=dataclasses.replace(cfg.train.async_eval, enabled=False),
        sft=dataclasses.replace(cfg.train.sft, enabled=False))
    return dataclasses.replace(
        cfg, run_dir=str(sft_run_dir(cfg)), train=train,
        model=dataclasses.replace(cfg.model, path=str(cfg.model_path)),
        preprocess=dataclasses.replace(cfg.preprocess, out_dir=str(cfg.shard_dir)),
        # log-probs of the untempered model: the NLL, whatever GRPO samples at
        rollout=dataclasses.replace(cfg.rollout, temperature=1.0))


def final_sft_model(cfg: Config) -> Path:
    """The model folder GRPO starts from: the SFT run's checkpoint at ``train.sft.steps``."""
    folder = ckpt.step_dir(sft_config(cfg).checkpoint_dir, cfg.train.sft.steps)
    if not (folder / "meta.json").exists():
        raise FileNotFoundError(f"train.sft: {folder} is not a complete checkpoint; run the "
                                "SFT stage first")
    return folder / "model"


def grpo_config_after_sft(cfg: Config) -> Config:
    """The GRPO run's config when ``train.sft.enabled``: it starts from the SFT model."""
    if not cfg.train.sft.enabled:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, path=str(final_sft_model(cfg)), tiny=False))


class SFTTrainer(Trainer):
    """The GRPO trainer with a supervised step; build it with :func:`sft_config`'s config
    (``evr1.train.build.trainer_from_config(sft_config(cfg), SFTTrainer)``)."""

    def __init__(self, cfg: Config, parts: TrainerParts, **kwargs: Any) -> None:
        super().__init__(cfg, parts, **kwargs)
        # Only samples with an expert answer are trained on; the sampler runs over those.
        self.expert = [i for i, s in enumerate(self.train_set.samples) if s.offline_output]
        if not self.expert:
            raise DatasetError(f"{cfg.data.train_jsonl}: no sample has an offline_output "
                               f"(include_tasks={cfg.data.include_tasks}); train.sft needs "
                               "expert answers")
        self.sampler = PromptSampler(len(self.expert), cfg.seed,
                                     replicas=self.replicas.count, replica=self.replicas.index)

    def train_step(self) -> StepResult:
        cfg = self.cfg
        t0 = time.perf_counter()
        # This data-parallel replica's share of the step's prompts (the backend sums the
        # gradients over replicas, as for GRPO).
        indices = [self.expert[i] for i in self.sampler.next(self._share())]
        self.state.data_position = self.sampler.position
        samples = [self.train_set.samples[i] for i in indices]
        prompts = [self.train_set.prompt(i) for i in indices]
        responses = [offline_response_ids(self.processor.tokenizer, s.offline_output,
                                          self.stop_id) for s in samples]
        batches = make_policy_batches(self.processor, prompts, 1, responses,
                                      list(range(len(responses))),
                                      cfg.train.micro_batch_size, self.pad_id)
        # The NLL is one more forward pass (about a third of the step on CPU): only for the
        # steps whose metrics are logged (train.log_every).
        logged = (self.state.step + 1) % cfg.train.log_every == 0
        nll_sum, tokens = 0.0, 0
        for b in batches:
            if logged:
                logp = self.backend.logprobs(b)  # before the update: the loss this step sees
                nll_sum -= float(logp[b.mask.to(logp.device)].sum())
                tokens += b.num_tokens
            b.advantages = torch.ones(len(b.rows))
            b.extras["offline"] = torch.zeros(len(b.rows), dtype=torch.bool)
        update = self.backend.train_step(batches, cfg.train.grpo)
        self.sync_engine()
        update = {k: v for k, v in update.items()
                  if k in ("grad_norm", "lr", "train_tokens", "time_update")}
        nll = {"nll": nll_sum / max(tokens, 1)} if logged else {}
        return StepResult({**nll, "data_position": self.state.data_position,
                           "time_step": time.perf_counter() - t0, **update}, completions=[])


def run_sft(cfg: Config, stop_signals: Callable[[], StopSignals] = NoStopSignals
            ) -> TrainResult:
    """Train (or resume, or find complete) the SFT stage of ``cfg``; its result's
    ``checkpoint`` is the final checkpoint folder, or, when a stop signal ended the stage
    early (``result.steps < train.sft.steps``), the checkpoint it saved on stopping."""
    sft_cfg = sft_config(cfg)
    result = trainer_from_config(sft_cfg, SFTTrainer, stop_signals=stop_signals).run()
    if result.steps >= cfg.train.sft.steps:
        result.checkpoint = str(final_sft_model(cfg).parent)
    return result
