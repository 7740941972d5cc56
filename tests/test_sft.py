"""Cold-start SFT (evr1.train.sft): its update is the NLL gradient, it resumes exactly, and
the training stage runs it before GRPO, which starts from its model."""

from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import assert_equal_up_to_rounding, script_module, small_config

from evr1.config import ConfigError
from evr1.data.dataset import PromptSampler
from evr1.data.synthetic import make_synthetic
from evr1.pipeline import stages, training
from evr1.train import checkpoint as ckpt
from evr1.train.batch import make_policy_batches
from evr1.train.build import trainer_from_config
from evr1.train.groups import offline_response_ids
from evr1.train.sft import SFTTrainer, final_sft_model, grpo_config_after_sft, sft_config
from evr1.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sft")
    cfg = small_config(root)
    make_synthetic(cfg.synthetic, progress=False)
    assert stages.preprocess_sequential(cfg) == 0
    return root


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def naive_nll(model: torch.nn.Module, inputs: dict, responses: torch.Tensor,
              mask: torch.Tensor) -> torch.Tensor:
    """Mean over response tokens of -log p(token): the whole sequence through the model, the
    logit at position t predicting token t + 1, a plain log_softmax."""
    logits = model(**inputs, use_cache=False).logits.float()
    width = responses.shape[1]
    predicting = logits[:, -width - 1:-1]  # the positions that predict the response tokens
    logp = torch.log_softmax(predicting, dim=-1).gather(-1, responses[..., None])[..., 0]
    return -(logp * mask).sum() / mask.sum()


def test_sft_update_is_the_gradient_of_the_mean_token_nll(prepared, tmp_path):
    """One SFT step (three prompts in micro-batches of 2) accumulates exactly the gradient of
    the mean token NLL of the three expert answers, computed naively in one batch."""
    cfg = sft_config(small_config(prepared, f"run_dir={tmp_path}", "train.sft.enabled=true",
                                  "train.sft.prompts_per_step=3", "train.micro_batch_size=2",
                                  "train.grad_clip=0", "train.freeze_vision_tower=false",
                                  "data.include_tasks=[]", "train.resume=never"))
    trainer = trainer_from_config(cfg, SFTTrainer)
    drawn = PromptSampler(len(trainer.expert), cfg.seed).next(3)  # what the step will draw
    samples = [trainer.train_set.samples[trainer.expert[i]] for i in drawn]
    prompts = [trainer.train_set.prompt(trainer.expert[i]) for i in drawn]
    assert {p.data_type for p in prompts} != {"text"}
    responses = [offline_response_ids(trainer.processor.tokenizer, s.offline_output,
                                      trainer.stop_id) for s in samples]
    (batch,) = make_policy_batches(trainer.processor, prompts, 1, responses, [0, 1, 2], 3,
                                   trainer.pad_id)
    params = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    loss = naive_nll(trainer.model, batch.model_inputs, batch.responses, batch.mask.float())
    want = dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True),
                    strict=True))
    metrics = trainer.train_step().metrics
    # the logged NLL is the loss before the update
    assert metrics["nll"] == pytest.approx(float(loss.detach()), rel=1e-5)
    # After Adam's first step its first moment is (1 - beta1) * the gradient (no clipping).
    beta1 = cfg.train.betas[0]
    got = {n: trainer.backend.optimizer.state[p]["exp_avg"] / (1 - beta1)
           for n, p in params.items() if p in trainer.backend.optimizer.state}
    terms = batch.model_inputs["input_ids"].numel()  # token positions summed into a gradient
    checked = 0
    for name, grad in want.items():
        if grad is None or not grad.any():
            continue
        assert_equal_up_to_rounding(got[name], grad, terms, name)
        checked += 1
    assert checked > 10
    # the vision tower's weights were trained too (not frozen here): the image/video rows'
    # gradient went through the frames
    assert any(n.startswith("model.visual") for n, g in want.items() if g is not None and g.any())


def test_sft_resumes_to_the_uninterrupted_run(prepared, tmp_path):
    common = ["train.sft.enabled=true", "train.sft.steps=4", "train.sft.save_every=2"]
    straight = trainer_from_config(sft_config(small_config(prepared, f"run_dir={tmp_path / 'a'}",
                                                           *common)), SFTTrainer)
    straight.run()
    first = trainer_from_config(sft_config(small_config(prepared, f"run_dir={tmp_path / 'b'}",
                                                        *common)), SFTTrainer)
    first.run(stop_after=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "b/sft/checkpoints")] == \
        ["step-00000002"]
    resumed = trainer_from_config(sft_config(small_config(prepared, f"run_dir={tmp_path / 'b'}",
                                                          *common)), SFTTrainer)
    assert resumed.run().steps == 4
    a, b = weights(straight), weights(resumed)
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"
    start = trainer_from_config(sft_config(small_config(prepared, f"run_dir={tmp_path / 'c'}",
                                                        *common, "train.resume=never")),
                                SFTTrainer)
    assert any(not torch.equal(a[k], v) for k, v in weights(start).items())


def test_sft_skips_the_nll_forward_on_unlogged_steps_and_trains_the_same(prepared, tmp_path):
    """With train.log_every=3 the NLL (one more forward pass) is computed on the logged steps
    only; the weights after three steps are those of the run that computes it every step, and
    step 3's NLL is the same."""
    common = ["train.sft.enabled=true", "train.sft.steps=3", "train.resume=never"]
    runs = {}
    for every in (1, 3):
        trainer = trainer_from_config(sft_config(small_config(
            prepared, f"run_dir={tmp_path / str(every)}", *common,
            f"train.log_every={every}")), SFTTrainer)
        metrics = []
        for _ in range(3):  # run()'s loop, without its evaluations and checkpoints
            metrics.append(trainer.train_step().metrics)
            trainer.state.step += 1
        runs[every] = (trainer, metrics)
    (each, each_metrics), (third, third_metrics) = runs[1], runs[3]
    assert all("nll" in m for m in each_metrics)
    assert ["nll" in m for m in third_metrics] == [False, False, True]
    assert third_metrics[2]["nll"] == each_metrics[2]["nll"]
    a, b = weights(each), weights(third)
    assert all(torch.equal(a[k], b[k]) for k in a), "the skipped forward changed training"


def test_training_stage_runs_sft_then_grpo_from_its_model(prepared, tmp_path):
    cfg = small_config(prepared, f"run_dir={tmp_path}", "train.sft.enabled=true",
                       "train.sft.steps=2", "train.steps=1")
    result = training.train_on_this_rank(cfg)
    assert result["sft"]["steps"] == 2 and result["steps"] == 1
    assert set(result["sft"]["before"]) == set(result["sft"]["after"]) and \
        "accuracy" in result["sft"]["after"]
    # GRPO's starting model is the SFT's final checkpoint, its own checkpoints are apart
    assert final_sft_model(cfg) == tmp_path / "sft/checkpoints/step-00000002/model"
    grpo = trainer_from_config(dataclasses.replace(grpo_config_after_sft(cfg),
                                                   run_dir=str(tmp_path / "fresh")))
    # resumes the finished SFT run's last checkpoint
    sft_end = trainer_from_config(sft_config(cfg), SFTTrainer)
    sft_end.resume()
    a, b = weights(grpo), weights(sft_end)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == \
        ["step-00000001"]
    # a second run finds both stages complete and trains nothing more
    again = training.train_on_this_rank(cfg)
    assert again["sft"]["steps"] == 2 and again["steps"] == 1


def signal_after_first_step(monkeypatch, cls: type[Trainer]) -> None:
    """``cls``'s first training step ends with a SIGTERM to this process, as a ``kill`` of a
    local pipeline would (only ``cls``'s own step: SFTTrainer overrides GRPO's)."""
    plain = cls.train_step

    def step_then_signal(self):
        result = plain(self)
        if self.state.step == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(cls, "train_step", step_then_signal)


def test_a_stop_signal_stops_the_local_pipeline_before_eval(prepared, tmp_path, monkeypatch,
                                                            capsys):
    """SIGTERM during a local pipeline's training: the step ends, a checkpoint is saved, and the
    pipeline stops with status STOPPED rather than evaluating that checkpoint as the result.
    A stopped SFT stage does not start GRPO. The same command then resumes and finishes."""
    cfg = small_config(prepared, f"run_dir={tmp_path}", "train.sft.enabled=true",
                       "train.sft.steps=2", "train.steps=2", "train.save_every=5")
    run_stages = script_module("launchers/pipeline.py").run_stages

    for cls, stage, folder in ((SFTTrainer, "SFT", "sft/checkpoints"),
                               (Trainer, "GRPO", "checkpoints")):
        signal_after_first_step(monkeypatch, cls)
        assert run_stages(cfg, ["train", "eval"]) == training.STOPPED
        out = capsys.readouterr().out
        assert f"stopped by a signal after {stage} step 1 of 2" in out
        assert "== eval ==" not in out
        assert [p.name for p in ckpt.list_checkpoints(tmp_path / folder)] == ["step-00000001"]
        if cls is SFTTrainer:
            assert not (tmp_path / "checkpoints").exists(), "GRPO started from an unfinished SFT"
        monkeypatch.undo()

    assert training.train_and_wait(cfg) == 0  # resumes both stages' progress
    assert "training: 2 steps" in capsys.readouterr().out
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")][-1] == \
        "step-00000002"


@pytest.mark.parametrize("override, message", [
    ("train.sft.steps=0", "train.sft.steps must be >= 1"),
    ("train.sft.lr=-1", "train.sft.lr must be >= 0"),
    ("train.sft.prompts_per_step=-2", "train.sft.prompts_per_step must be >= 0"),
    ("train.sft.enabled=maybe", "train.sft.enabled must be bool"),
])
def test_bad_sft_config_names_the_field(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        small_config(tmp_path, override)


def test_grpo_without_sft_keeps_its_model(tmp_path):
    cfg = small_config(tmp_path)
    assert grpo_config_after_sft(cfg) is cfg


@pytest.mark.slow
def test_sft_then_grpo_on_the_megatron_backend_under_torchrun_tp2(prepared, tmp_path):
    """train.sft on train.backend=megatron (TP=2, 2 local processes) through the real launcher:
    its first step sees the NLL the hf backend sees on the same batch."""
    import json
    import subprocess
    import sys

    pytest.importorskip("megatron.core")
    common = {"preprocess.out_dir": prepared / "shards", "model.path": prepared / "tiny_model",
              "synthetic.out_dir": prepared / "data",
              "data.train_jsonl": prepared / "data/train.jsonl",
              "data.eval_jsonl": prepared / "data/heldout.jsonl", "train.sft.enabled": "true",
              "train.sft.steps": 2, "train.steps": 1, "rollout.n": 4,
              "rollout.max_new_tokens": 8, "train.prompts_per_step": 2,
              "train.eval_samples": 2, "train.wandb_mode": "disabled"}
    run_dir = tmp_path / "megatron"
    args = [f"{k}={v}" for k, v in {**common, "run_dir": run_dir, "train.backend": "megatron",
                                    "train.megatron.tensor_parallel": 2}.items()]
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          str(ROOT / "launchers/train.py"), "--config",
                          str(ROOT / "configs/demo_cpu.yaml"), *args],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("SFT: 2 steps") == 1, "only rank 0 reports"
    sft_final = ckpt.latest_checkpoint(run_dir / "sft/checkpoints")
    assert sft_final is not None and sft_final.name == "step-00000002"
    assert (sft_final / "megatron" / "metadata.json").is_file()
    assert ckpt.latest_checkpoint(run_dir / "checkpoints").name == "step-00000001"
    hf = trainer_from_config(sft_config(small_config(
        prepared, f"run_dir={tmp_path / 'hf'}", *[f"{k}={v}" for k, v in common.items()])),
        SFTTrainer)
    want = hf.train_step().metrics["nll"]
    rows = [json.loads(x) for x in (run_dir / "sft/metrics.jsonl").read_text().splitlines()]
    got = next(r["nll"] for r in rows if r["kind"] == "train" and r["step"] == 1)
    # a mean of ~20 token log-probs of size ~5 (vocabulary of a few hundred): float32 rounding
    # of two kernels is ~1e-6 of it; a wrong token or position moves it by ~0.1
    assert got == pytest.approx(want, rel=1e-4)


def test_sft_demo_config_loads():
    from evr1.config import load_config

    cfg = load_config(ROOT / "configs/demo_sft_cpu.yaml")
    assert cfg.train.sft.enabled and cfg.train.sft.save_every == cfg.train.sft.steps
    # the eval stage evaluates the SFT model the stage writes
    assert f"sft/checkpoints/step-{cfg.train.sft.steps:08d}/model" in cfg.eval.models[1]


def test_eval_labels_sft_checkpoints_apart_from_grpo_ones():
    from evr1.eval.plan import model_label

    assert model_label(Path("runs/x/sft/checkpoints/step-00000200/model")) == \
        "sft-step-00000200"
    assert model_label(Path("runs/x/checkpoints/step-00000200/model")) == "step-00000200"
