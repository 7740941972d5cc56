"""The GRPO trainer end to end on the tiny model: offline mixing, checkpoints, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_equal_up_to_rounding, rounding_bound, small_config

from evr1.config import ConfigError, OfflineConfig, load_config
from evr1.data.synthetic import make_synthetic
from evr1.launch import stages
from evr1.train import checkpoint as ckpt
from evr1.train.groups import groups_to_mix, offline_response_ids
from evr1.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """Synthetic data preprocessed into shards, and a tiny model, shared by the tests here."""
    root = tmp_path_factory.mktemp("train")
    cfg = small_config(root)
    make_synthetic(cfg.synthetic, progress=False)
    assert stages.preprocess_sequential(cfg) == 0
    return root


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_groups_to_mix_modes():
    acc = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    has = torch.tensor([True, True, False])
    assert groups_to_mix(acc, has, OfflineConfig("never")).tolist() == [False, False, False]
    assert groups_to_mix(acc, has, OfflineConfig("always")).tolist() == [True, True, False]
    # Group accuracies 0.5, 0.0, 0.75; threshold 0.5 mixes only the strictly worse group.
    assert groups_to_mix(acc, has, OfflineConfig("below_threshold", 0.5)).tolist() == \
        [False, True, False]


def test_offline_slot_holds_the_expert_answer(prepared, tmp_path):
    cfg = small_config(prepared, f"run_dir={tmp_path}", "train.steps=1",
                       "train.offline.mode=always", "train.resume=never")
    trainer = Trainer(cfg)
    metrics = trainer.train_step()
    assert metrics["offline_groups"] == cfg.train.prompts_per_step
    # The expert answers are correct, so their reward is the maximum.
    assert metrics["offline_reward"] == pytest.approx(1.0)
    tokens = offline_response_ids(trainer.processor.tokenizer, "<answer>B</answer>",
                                  trainer.stop_id)
    assert tokens[-1] == trainer.stop_id and len(tokens) <= 5
    assert trainer.processor.tokenizer.decode(tokens[:-1]) == "<answer>B</answer>"

    never = Trainer(small_config(prepared, f"run_dir={tmp_path / 'never'}",
                                 "train.offline.mode=never", "train.resume=never"))
    assert never.train_step()["offline_groups"] == 0


@pytest.mark.parametrize("frozen", [True, False])
def test_freeze_vision_tower_updates_the_language_model_only(prepared, tmp_path, frozen):
    cfg = small_config(prepared, f"run_dir={tmp_path}", "train.offline.mode=always",
                       "train.resume=never", f"train.freeze_vision_tower={str(frozen).lower()}")
    trainer = Trainer(cfg)
    before = weights(trainer)
    trainer.train_step()
    after = weights(trainer)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    visual = {k for k in before if ".visual." in f".{k}"}
    assert visual and changed - visual  # the language model always trains
    assert (changed & visual == set()) == frozen


def test_resumed_run_matches_uninterrupted_run_exactly(prepared, tmp_path):
    common = ["train.steps=4", "train.save_every=2", "train.offline.mode=always"]
    straight = Trainer(small_config(prepared, f"run_dir={tmp_path / 'a'}", *common))
    straight.run()
    first = Trainer(small_config(prepared, f"run_dir={tmp_path / 'b'}", *common))
    first.run(stop_after=2)  # the job ends (time limit, preemption) after step 2
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "b/checkpoints")] == \
        ["step-00000002"]
    resumed = Trainer(small_config(prepared, f"run_dir={tmp_path / 'b'}", *common))
    result = resumed.run()
    assert result.steps == 4
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"
    # The weights did move: the comparison is not trivially true.
    start = Trainer(small_config(prepared, f"run_dir={tmp_path / 'c'}", "train.resume=never"))
    assert any(not torch.equal(a[k], v) for k, v in weights(start).items())
    steps = [json.loads(x)["step"] for x in (tmp_path / "b/metrics.jsonl").read_text().splitlines()
             if '"kind": "train"' in x]
    assert steps == [1, 2, 3, 4]


def test_completions_log_shows_the_groups_behind_the_metrics(prepared, tmp_path):
    cfg = small_config(prepared, f"run_dir={tmp_path}", "train.steps=2",
                       "train.offline.mode=always", "train.log_completions=2",
                       "train.save_every=2")
    Trainer(cfg).run()
    records = [json.loads(x) for x in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 1, 2, 2]
    n = cfg.rollout.n
    for r in records:
        assert len(r["responses"]) == len(r["reward"]) == len(r["advantage"]) == n
        # The expert answer sits in the last slot, scores the maximum and is the only one.
        assert r["offline"] == [False] * (n - 1) + [True]
        assert r["responses"][-1].startswith("<answer>") and r["reward"][-1] == 1.0
        assert sum(r["advantage"]) == pytest.approx(0.0, abs=1e-3)  # group-normalised


def test_half_written_checkpoint_is_never_resumed(prepared, tmp_path):
    cfg = small_config(prepared, f"run_dir={tmp_path}", "train.steps=2", "train.save_every=1")
    Trainer(cfg).run()
    root = cfg.checkpoint_dir
    # A crash inside save leaves a temporary folder; a folder without meta.json is incomplete.
    (root / ".step-00000003.abc.tmp").mkdir()
    (root / "step-00000004").mkdir()
    assert ckpt.latest_checkpoint(root).name == "step-00000002"
    trainer = Trainer(small_config(prepared, f"run_dir={tmp_path}", "train.steps=2"))
    trainer.resume()
    assert trainer.state.step == 2
    assert not (root / ".step-00000003.abc.tmp").exists()


def test_checkpoint_model_loads_with_transformers(prepared, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    cfg = small_config(prepared, f"run_dir={tmp_path}", "train.steps=1")
    result = Trainer(cfg).run()
    model_dir = Path(result.checkpoint) / "model"
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    AutoProcessor.from_pretrained(model_dir)
    saved = torch.load(Path(result.checkpoint) / "trainer_state.pt", weights_only=True)
    assert saved["trainer"]["step"] == 1
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("override, message", [
    ("train.lr=-1", "train.lr must be > 0"),
    ("rollout.n=0", "rollout.n must be >= 1"),
    ("train.grpo.clip_low=1.5", "train.grpo.clip_low must be in"),
    ("train.grpo.loss_agg=mean", "train.grpo.loss_agg='mean' is not one of"),
    ("train.offline.mode=sometimes", "train.offline.mode='sometimes' is not one of"),
    ("train.betas=[0.9]", "train.betas must be two numbers"),
])
def test_bad_training_config_names_the_field(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(ROOT / "configs/demo_cpu.yaml", [override])


def test_shared_vision_matches_per_response_vision(prepared, tmp_path):
    """Vision once per prompt gives the same log-probs and gradients as once per response."""
    from dataclasses import replace

    from evr1.train.batch import make_policy_batches
    from evr1.train.grpo import token_logprobs

    # The demo config freezes the vision tower; its gradients are part of the comparison. The
    # shared-prefix path would run each prompt's vision once anyway: this tests the other one.
    trainer = Trainer(small_config(prepared, f"run_dir={tmp_path}", "data.include_tasks=[]",
                                   "train.freeze_vision_tower=false", "train.shared_prefix=false"))
    types = [s.data_type for s in trainer.train_set.samples]
    prompts = [trainer.train_set.prompt(types.index(t)) for t in ("video", "image", "text")]
    responses = [[5, 6, 7, trainer.stop_id]] * 12
    batch = make_policy_batches(trainer.processor, prompts, 4, responses, list(range(12)), 12,
                                trainer.pad_id)[0]

    def logp_and_grads(b):
        trainer.model.zero_grad()
        logp = token_logprobs(trainer.backend._logits(trainer.model, b), b.responses)
        logp.sum().backward()
        return logp.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters()
                               if p.grad is not None}

    shared, shared_grads = logp_and_grads(batch)
    plain, plain_grads = logp_and_grads(replace(batch, owners=[]))  # no sharing: the reference
    # Equal up to float32 rounding of sums over the batch's token positions (see conftest).
    terms = batch.model_inputs["input_ids"].numel()
    assert_equal_up_to_rounding(shared, plain, terms, "log-probs")
    assert shared_grads.keys() == plain_grads.keys()
    assert any("visual" in k for k in shared_grads)
    for name in plain_grads:
        assert_equal_up_to_rounding(shared_grads[name], plain_grads[name], terms, name)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_shared_prefix_matches_plain_forward(prepared, tmp_path):
    """The prompt once per micro-batch, its KV cache shared by its responses, gives the
    log-probs and gradients of running prompt + response for every row."""
    trainer = Trainer(small_config(prepared, f"run_dir={tmp_path}", "data.include_tasks=[]",
                                   "train.freeze_vision_tower=false"))
    types = [s.data_type for s in trainer.train_set.samples]
    prompts = [trainer.train_set.prompt(types.index(t)) for t in ("video", "image", "text")]
    _check_shared_prefix(trainer.backend, trainer.processor, prompts, trainer.stop_id,
                         trainer.pad_id)


def test_shared_prefix_matches_plain_forward_qwen3_vl(tmp_path):
    """The same for Qwen3-VL (deepstack visual features, timestamped video frames)."""
    import numpy as np

    from evr1.config import TrainConfig
    from evr1.models.inputs import stop_token_ids
    from evr1.models.loading import load_model, load_processor
    from evr1.models.tiny import build_tiny_model
    from evr1.rollout.base import Prompt
    from evr1.train.backends.hf import HFBackend

    folder = build_tiny_model(tmp_path / "qwen3", ["Which way does the shape move?"],
                              family="qwen3_vl")
    processor, model = load_processor(folder), load_model(folder, "float32", "cpu")
    assert model.config.model_type == "qwen3_vl"
    rng = np.random.default_rng(0)
    prompts = [  # Qwen3-VL: frames in multiples of patch 16 x merge 2
        Prompt("v", "Which way does it move?", "video",
               rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8), 2.0),
        Prompt("i", "What colour is the big shape in this picture?", "image",
               rng.integers(0, 256, (1, 64, 96, 3), dtype=np.uint8)),
        Prompt("t", "Is it?", "text")]
    _check_shared_prefix(HFBackend(model, TrainConfig()), processor, prompts,
                         stop_token_ids(processor.tokenizer)[0], processor.tokenizer.pad_token_id)


def _check_shared_prefix(backend, processor, prompts, stop, pad_id):
    from evr1.train.batch import make_policy_batches
    from evr1.train.grpo import token_logprobs

    # Responses of different lengths (right padding); the prompts differ in length (left
    # padding); micro-batches of 5 split the groups of 4: [v v v v i] [i i i t t] [t t].
    responses = [[5, 6, 7, stop], [8, stop], [9, 10, 11, 12, 13, stop], [14]] * 3
    batches = make_policy_batches(processor, prompts, 4, responses, list(range(12)), 5, pad_id)
    assert [b.owners for b in batches] == [[0, 0, 0, 0, 1], [1, 1, 1, 2, 2], [2, 2]]
    assert not bool(batches[0].model_inputs["attention_mask"][:, 0].all())  # left padding
    model = backend.model
    model.train()

    def logp_and_grads(batch, shared):
        backend.cfg.shared_prefix = shared
        model.zero_grad()
        logits = backend._logits(model, batch)
        logp = token_logprobs(logits, batch.responses)
        (logp * batch.mask).sum().backward()
        return logp.detach(), _grads(model)

    for batch in batches:
        model.model.rope_deltas = sentinel = torch.full((1, 1), 123)
        shared, shared_grads = logp_and_grads(batch, True)
        # Positions are computed, not taken from (or left in) the model's generation state.
        assert model.model.rope_deltas is sentinel
        model.model.rope_deltas = None
        plain, plain_grads = logp_and_grads(batch, False)
        mask = batch.mask
        assert shared.shape == plain.shape == mask.shape
        # The two paths sum in another order (a KV cache shared by rows, gradients summed over
        # rows before the prompt's backward): equal up to float32 rounding of the sums over the
        # batch's token positions. In float64 they agree to 2e-14 on the Qwen3-VL model.
        terms = batch.model_inputs["input_ids"].numel()
        assert_equal_up_to_rounding(shared[mask], plain[mask], terms, "log-probs")
        assert shared_grads.keys() == plain_grads.keys()
        for name, grad in plain_grads.items():
            assert_equal_up_to_rounding(shared_grads[name], grad, terms, name)
        if batch is batches[0]:  # video and image rows: the vision tower is compared too
            assert any("visual" in k for k in shared_grads)


def test_shared_prefix_train_step_matches_plain(prepared, tmp_path):
    """One optimiser step of both paths (with the KL term's reference forward and the
    entropy term) computes the same gradient and moves the weights alike."""
    result = {}
    for shared in (True, False):
        trainer = Trainer(small_config(
            prepared, f"run_dir={tmp_path / str(shared)}", "train.resume=never",
            "train.offline.mode=always", "train.micro_batch_size=3",
            "train.freeze_vision_tower=false",
            "train.grpo.entropy_coef=0.01", "train.grpo.kl_coef=0.01",
            f"train.shared_prefix={str(shared).lower()}"))
        backend, start = trainer.backend, weights(trainer)
        positions = []  # token positions of the step's micro-batches: the terms of a gradient
        update = backend.train_step

        def counting(batches, grpo, update=update, positions=positions):
            positions.append(sum(b.model_inputs["input_ids"].numel() for b in batches))
            return update(batches, grpo)

        backend.train_step = counting
        metrics = trainer.train_step()
        # After Adam's first step its first moment is (1 - beta1) * the (clipped) gradient.
        beta1 = trainer.cfg.train.betas[0]
        grads = {n: backend.optimizer.state[p]["exp_avg"] / (1 - beta1)
                 for n, p in trainer.model.named_parameters() if p in backend.optimizer.state}
        result[shared] = start, weights(trainer), metrics, grads, positions[0]
    (start, fast, fast_metrics, fast_grads, terms), (_, plain, plain_metrics, plain_grads, _) = \
        result[True], result[False]
    lr = plain_metrics["lr"]
    assert fast_metrics["train_tokens"] == plain_metrics["train_tokens"]
    # Loss and entropy are means of per-token terms of size ~1 (unit-std advantages, clipped
    # ratios, entropies of a small vocabulary); the KL term is exactly 0 at the first step
    # (the reference model is the policy).
    for key in ("loss", "entropy_mean", "kl_mean"):
        assert abs(fast_metrics[key] - plain_metrics[key]) <= rounding_bound(
            terms, max(1.0, abs(plain_metrics[key]))), key
    assert fast_metrics["grad_norm"] == pytest.approx(
        plain_metrics["grad_norm"], rel=rounding_bound(terms, 1.0))
    assert fast_grads.keys() == plain_grads.keys() and len(plain_grads) > 0
    for name, grad in plain_grads.items():
        assert_equal_up_to_rounding(fast_grads[name], grad, terms, name)
    assert max(float((fast[k] - start[k]).abs().max()) for k in start) > 0.5 * lr
    # Adam's first step moves a weight by lr * g / (|g| + eps) (plus the same weight decay):
    # about lr * sign(g). Where rounding may flip g's sign (|g| within the rounding bound of
    # the gradients) the two updates can differ by up to 2 lr; everywhere else by
    # lr * eps / |g|, far below 1% of lr, plus a rounding of the weight itself.
    for name, grad in plain_grads.items():
        resolved = grad.abs() > 2 * rounding_bound(terms, float(grad.abs().max()))
        diff = (fast[name] - plain[name]).abs()
        assert float(torch.where(resolved, diff, 0).max()) <= 0.01 * lr, name
        assert float(diff.max()) <= 2.01 * lr, name


@pytest.mark.slow
def test_megatron_backend_trains_under_torchrun_tp2(prepared, tmp_path):
    """train.backend=megatron with TP=2 across 2 local processes, through the real launcher."""
    import subprocess
    import sys

    from transformers import AutoModelForImageTextToText

    pytest.importorskip("megatron.core")
    run_dir = tmp_path / "megatron"
    args = [f"{k}={v}" for k, v in {
        "run_dir": run_dir, "preprocess.out_dir": prepared / "shards",
        "model.path": prepared / "tiny_model", "synthetic.out_dir": prepared / "data",
        "data.train_jsonl": prepared / "data/train.jsonl",
        "data.eval_jsonl": prepared / "data/heldout.jsonl", "train.backend": "megatron",
        "train.megatron.tensor_parallel": 2, "train.steps": 2, "train.save_every": 2,
        "rollout.n": 4, "rollout.max_new_tokens": 8, "train.prompts_per_step": 2,
        "train.eval_samples": 2, "train.wandb_mode": "disabled"}.items()]
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          str(ROOT / "launchers/train.py"), "--config",
                          str(ROOT / "configs/demo_cpu.yaml"), *args],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("training: 2 steps") == 1, "only rank 0 reports"
    final = ckpt.latest_checkpoint(run_dir / "checkpoints")
    assert final is not None and final.name == "step-00000002"
    assert (final / "megatron" / "metadata.json").is_file()  # the distributed checkpoint
    trained = AutoModelForImageTextToText.from_pretrained(final / "model").state_dict()
    start = AutoModelForImageTextToText.from_pretrained(prepared / "tiny_model").state_dict()
    assert trained.keys() == start.keys()
    assert any(not torch.equal(trained[k], start[k]) for k in start), "weights did not move"
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["kind"] == "train"] == [1, 2]
