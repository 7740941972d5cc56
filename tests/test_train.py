"""The GRPO trainer end to end on the tiny model: offline mixing, checkpoints, exact resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import assert_equal_up_to_rounding, rounding_bound, small_config

from evr1.config import ConfigError, OfflineConfig, load_config
from evr1.data.synthetic import make_synthetic
from evr1.pipeline import stages
from evr1.train import checkpoint as ckpt
from evr1.train.build import trainer_from_config
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
    trainer = trainer_from_config(cfg)
    metrics = trainer.train_step().metrics
    assert metrics["offline_groups"] == cfg.train.prompts_per_step
    # The expert answers are correct, so their reward is the maximum.
    assert metrics["offline_reward"] == pytest.approx(1.0)
    tokens = offline_response_ids(trainer.processor.tokenizer, "<answer>B</answer>",
                                  trainer.stop_id)
    assert tokens[-1] == trainer.stop_id and len(tokens) <= 5
    assert trainer.processor.tokenizer.decode(tokens[:-1]) == "<answer>B</answer>"

    never = trainer_from_config(small_config(prepared, f"run_dir={tmp_path / 'never'}",
                                             "train.offline.mode=never", "train.resume=never"))
    assert never.train_step().metrics["offline_groups"] == 0


@pytest.mark.parametrize("frozen", [True, False])
def test_freeze_vision_tower_updates_the_language_model_only(prepared, tmp_path, frozen):
    cfg = small_config(prepared, f"run_dir={tmp_path}", "train.offline.mode=always",
                       "train.resume=never", f"train.freeze_vision_tower={str(frozen).lower()}")
    trainer = trainer_from_config(cfg)
    before = weights(trainer)
    trainer.train_step()
    after = weights(trainer)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    visual = {k for k in before if ".visual." in f".{k}"}
    assert visual and changed - visual  # the language model always trains
    assert (changed & visual == set()) == frozen


def test_resumed_run_matches_uninterrupted_run_exactly(prepared, tmp_path):
    common = ["train.steps=4", "train.save_every=2", "train.offline.mode=always"]
    straight = trainer_from_config(small_config(prepared, f"run_dir={tmp_path / 'a'}", *common))
    straight.run()
    first = trainer_from_config(small_config(prepared, f"run_dir={tmp_path / 'b'}", *common))
    first.run(stop_after=2)  # the job ends (time limit, preemption) after step 2
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "b/checkpoints")] == \
        ["step-00000002"]
    resumed = trainer_from_config(small_config(prepared, f"run_dir={tmp_path / 'b'}", *common))
    result = resumed.run()
    assert result.steps == 4
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"
    # The weights did move: the comparison is not trivially true.
    start = trainer_from_config(small_config(prepared, f"run_dir={tmp_path / 'c'}",
                                             "train.resume=never"))
    assert any(not torch.equal(a[k], v) for k, v in weights(start).items())
    steps = [json.loads(x)["step"] for x in (tmp_path / "b/metrics.jsonl").read_text().splitlines()
             if '"kind": "train"' in x]
    assert steps == [1, 2, 3, 4]


def test_completions_log_shows_the_groups_behind_the_metrics(prepared, tmp_path):
    cfg = small_config(prepared, f"run_dir={tmp_path}", "train.steps=2",
                       "train.offline.mode=always", "train.log_completions=2",
                       "train.save_every=2")
    trainer_from_config(cfg).run()
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
    trainer_from_config(cfg).run()
    root = cfg.checkpoint_dir
    # A crash inside save leaves a temporary folder; a folder without meta.json is incomplete.
    (root / ".step-00000003.abc.tmp").mkdir()
    (root / "step-00000004").mkdir()
    assert ckpt.latest_checkpoint(root).name == "step-00000002"
    trainer = trainer_from_config(small_config(prepared, f"run_dir={tmp_path}", "train.steps=2"))
    trainer.resume()
    assert trainer.state.step == 2
    assert not (root / ".step-00000003.abc.tmp").exists()


def test_checkpoint_model_loads_with_transformers(prepared, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    cfg = small_config(prepared, f"run_dir={tmp_path}", "train.steps=1")
    result = trainer_from_config(cfg).run()
    model_dir = Path(result.checkpoint) / "model"
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    AutoProcessor.from_pretrained(model_dir)
    saved = torch.load(Path(result.checkpoint) / "trainer_state.pt", weights_only=True)
    assert saved["trainer"]["step"] == 1
    assert sum(p.numel() for p in model.parameters()) > 0


# --------------------------------------------------------------------------- replacing a step


def _save(root: Path, step: int, marker: str) -> Path:
    """A checkpoint of ``step`` whose model/ holds ``marker`` (no model: the file moves are
    what is tested)."""
    def write(folder: Path) -> None:
        (folder / "model").mkdir()
        (folder / "model" / "weights.txt").write_text(marker)

    return ckpt.save_checkpoint(root, ckpt.TrainerState(step=step, data_position=step), write)


def _complete(folder: Path) -> str:
    """The marker of a complete checkpoint folder; fails on a half one."""
    assert {p.name for p in folder.iterdir()} >= {"model", "trainer_state.pt", "meta.json"}
    assert ckpt.load_trainer_state(folder).step == ckpt.checkpoint_step(folder)
    return (folder / "model" / "weights.txt").read_text()


def _fail_at(k: int, how):
    """Replacements for the renames and deletes of the checkpoint module: the ``k``-th call
    (1-based) runs ``how(kind, args)`` instead, kind "rename" or "delete"."""
    import shutil as shutil_module

    calls = [0]

    def wrap(real, kind):
        def op(*args, **kwargs):
            calls[0] += 1
            if calls[0] == k:
                return how(kind, args)
            return real(*args, **kwargs)
        return op

    return wrap(os.replace, "rename"), wrap(shutil_module.rmtree, "delete")


def _die(kind, args) -> None:
    # A kill: no exception handler, no finally. A delete dies half way through.
    if kind == "delete":
        (Path(args[0]) / "trainer_state.pt").unlink(missing_ok=True)
    os._exit(9)


def _killed_save(root: Path, k: int) -> bool:
    """Save step 2 again ("new") in a forked child killed at its ``k``-th rename or delete;
    True when the kill happened (False: the save finished first)."""
    import multiprocessing

    def child() -> None:
        replace, rmtree = _fail_at(k, _die)
        ckpt.os.replace, ckpt.shutil.rmtree = replace, rmtree  # this child only
        _save(root, 2, "new")
        os._exit(0)

    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    proc.join(60)
    return proc.exitcode == 9


def test_checkpoint_replaced_under_a_kill_at_every_point_is_old_or_new(tmp_path):
    # Issue #24: re-saving a step deleted the old folder before renaming the new one in; a
    # kill in between left no step-2, and one mid-delete a step-2 without trainer_state.pt.
    outcomes = []
    for k in range(1, 20):
        root = tmp_path / f"kill-{k}" / "checkpoints"
        _save(root, 1, "older")
        _save(root, 2, "old")
        if not _killed_save(root, k):
            assert _complete(ckpt.latest_checkpoint(root)) == "new"  # no kill: replaced
            break
        ckpt.recover_interrupted_saves(root)  # what the trainer runs before resuming
        latest = ckpt.latest_checkpoint(root)
        assert latest is not None and latest.name == "step-00000002", k
        outcomes.append(_complete(latest))
        assert sorted(p.name for p in root.iterdir()) == ["step-00000001", "step-00000002"]
    # Kill points: the stale temporary's delete, the leftover aside's delete, old -> aside
    # (the old one stays), new -> step-2 (the new one was complete: it is put in), the
    # aside's delete, half done (the new one is in).
    assert outcomes == ["old", "old", "old", "new", "new"]


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_checkpoint_replace_that_raises_leaves_a_complete_checkpoint(tmp_path, monkeypatch, k):
    # An exception (disk full, a quota) at any rename or delete: the handler already leaves
    # step 2 complete, old or new, without waiting for a resume.
    root = tmp_path / "checkpoints"
    _save(root, 2, "old")

    def fail(kind, args):
        raise OSError(28, "No space left on device")

    replace, rmtree = _fail_at(k, fail)
    monkeypatch.setattr(ckpt.os, "replace", replace)
    monkeypatch.setattr(ckpt.shutil, "rmtree", rmtree)
    try:
        _save(root, 2, "new")
    except OSError:
        pass
    monkeypatch.undo()
    assert _complete(ckpt.step_dir(root, 2)) in ("old", "new")
    ckpt.recover_interrupted_saves(root)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002"]


def test_rewind_logs_moves_rows_past_the_resume_step(tmp_path):
    from evr1.train.metrics import rewind_logs

    rows = [{"step": 0, "kind": "heldout"}, {"step": 1, "kind": "train"},
            {"step": 2, "kind": "train"},
            {"step": 2, "kind": "checkpoint_eval", "logged_at_step": 3},
            {"step": 3, "kind": "train"}, {"step": 3, "kind": "checkpoint_eval"}]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "metrics.jsonl").write_text(text + '{"step": 4, "ki')  # a torn last line
    (tmp_path / "completions.jsonl").write_text('{"step": 1}\n{"step": 3}\n')
    assert rewind_logs(tmp_path, 2, tmp_path / "archive") == 3
    read = lambda p: [json.loads(x) for x in p.read_text().splitlines()]  # noqa: E731
    assert read(tmp_path / "metrics.jsonl") == rows[:4]
    assert read(tmp_path / "archive/metrics.jsonl") == rows[4:]
    assert read(tmp_path / "completions.jsonl") == [{"step": 1}]
    assert read(tmp_path / "archive/completions.jsonl") == [{"step": 3}]
    assert rewind_logs(tmp_path, 2, tmp_path / "again") == 0 and not (tmp_path / "again").exists()
    # A fresh start (step 0) redoes the step-0 evaluation too: nothing is kept.
    assert rewind_logs(tmp_path, 0, tmp_path / "fresh") == 5
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_resume_from_an_older_checkpoint_leaves_the_later_branch(prepared, tmp_path):
    common = ["train.steps=4", "train.save_every=1", "train.keep_last=0",
              "train.offline.mode=always"]
    trainer_from_config(small_config(prepared, f"run_dir={tmp_path}", *common)).run()
    root = tmp_path / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(root)] == [f"step-0000000{i}" for i in
                                                            range(1, 5)]
    older = ckpt.step_dir(root, 2)
    trainer_from_config(small_config(prepared, f"run_dir={tmp_path}", *common, "train.steps=3",
                                     f"train.resume={older}")).run()
    # Step 3 was written anew; the old step 3 and step 4 are kept, out of resume's way.
    assert [p.name for p in ckpt.list_checkpoints(root)] == [
        "step-00000001", "step-00000002", "step-00000003"]
    (archive,) = root.glob("abandoned-*")
    assert sorted(p.name for p in archive.iterdir()) == [
        "completions.jsonl", "metrics.jsonl", "step-00000003", "step-00000004"]
    train_steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text()
                   .splitlines() if '"kind": "train"' in x]
    assert train_steps == [1, 2, 3]  # step 3 once, from the new branch
    assert [json.loads(x)["step"] for x in (archive / "metrics.jsonl").read_text().splitlines()
            if '"kind": "train"' in x] == [3, 4]
    # resume: auto continues the new branch, never the abandoned step 4.
    auto = trainer_from_config(small_config(prepared, f"run_dir={tmp_path}", *common,
                                            "train.steps=3"))
    auto.resume()
    assert auto.state.step == 3 and len(list(root.glob("abandoned-*"))) == 1


def test_requeued_job_resumes_its_own_progress(prepared, tmp_path, monkeypatch):
    # A job started with train.resume=never (or a folder) and requeued by Slurm must not go
    # back to step 0 and set its own checkpoints aside.
    cfg = small_config(prepared, f"run_dir={tmp_path}", "train.steps=2", "train.save_every=2",
                       "train.resume=never")
    trainer_from_config(cfg).run()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    again = trainer_from_config(cfg)
    again.resume()
    assert again.state.step == 2 and not list((tmp_path / "checkpoints").glob("abandoned-*"))
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")  # the first run of a job: as configured
    fresh = trainer_from_config(cfg)
    fresh.resume()
    assert fresh.state.step == 0 and len(list((tmp_path / "checkpoints").glob("abandoned-*"))) == 1


def test_resume_after_a_crash_logs_each_redone_step_once(prepared, tmp_path):
    # Killed after step 4 was logged but before it was saved: auto-resume redoes 3 and 4.
    import shutil

    common = ["train.steps=4", "train.save_every=2", "train.keep_last=0",
              "train.offline.mode=always"]
    trainer_from_config(small_config(prepared, f"run_dir={tmp_path}", *common)).run()
    shutil.rmtree(tmp_path / "checkpoints/step-00000004")
    trainer_from_config(small_config(prepared, f"run_dir={tmp_path}", *common)).run()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if r["kind"] == "heldout"] == [0, 4]
    # Started again, complete: no new row, and the summary reports the logged figures.
    result = trainer_from_config(small_config(prepared, f"run_dir={tmp_path}", *common)).run()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    heldout = [r for r in rows if r["kind"] == "heldout"]
    assert [r["step"] for r in heldout] == [0, 4]
    logged = [{k: v for k, v in r.items() if k not in ("step", "kind", "time")} for r in heldout]
    assert result.before and (result.before, result.after) == (logged[0], logged[1])


@pytest.mark.parametrize("override, message", [
    ("train.lr=-1", "train.lr must be > 0"),
    ("rollout.n=0", "rollout.n must be >= 2"),
    ("rollout.n=1", "rollout.n must be >= 2"),
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
    trainer = trainer_from_config(small_config(
        prepared, f"run_dir={tmp_path}", "data.include_tasks=[]",
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
    trainer = trainer_from_config(small_config(
        prepared, f"run_dir={tmp_path}", "data.include_tasks=[]",
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
        trainer = trainer_from_config(small_config(
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
        metrics = trainer.train_step().metrics
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


@pytest.mark.slow
def test_hf_backend_trains_under_torchrun_with_fsdp(prepared, tmp_path):
    """train.backend=hf across 2 local processes (FSDP2, gloo), through the real launcher:
    the checkpoint holds the gathered HF model and the distributed checkpoint."""
    import subprocess
    import sys

    from transformers import AutoModelForImageTextToText

    run_dir = tmp_path / "fsdp"
    args = [f"{k}={v}" for k, v in {
        "run_dir": run_dir, "preprocess.out_dir": prepared / "shards",
        "model.path": prepared / "tiny_model", "synthetic.out_dir": prepared / "data",
        "data.train_jsonl": prepared / "data/train.jsonl",
        "data.eval_jsonl": prepared / "data/heldout.jsonl", "train.backend": "hf",
        "train.steps": 2, "train.save_every": 2, "rollout.n": 4, "rollout.max_new_tokens": 8,
        "train.prompts_per_step": 2, "train.micro_batch_size": 3, "train.eval_samples": 2,
        "train.wandb_mode": "disabled"}.items()]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          str(ROOT / "launchers/train.py"), "--config",
                          str(ROOT / "configs/demo_cpu.yaml"), *args],
                         capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("training: 2 steps") == 1, "only rank 0 reports"
    final = ckpt.latest_checkpoint(run_dir / "checkpoints")
    assert final is not None and final.name == "step-00000002"
    assert (final / "dcp" / ".metadata").is_file()  # the distributed checkpoint
    trained = AutoModelForImageTextToText.from_pretrained(final / "model").state_dict()
    start = AutoModelForImageTextToText.from_pretrained(prepared / "tiny_model").state_dict()
    assert trained.keys() == start.keys()
    assert any(not torch.equal(trained[k], start[k]) for k in start), "weights did not move"
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["kind"] == "train"] == [1, 2]


# --------------------------------------------------------------------------- issue #17


def test_grad_clip_zero_turns_clipping_off(prepared, tmp_path):
    """train.grad_clip=0 used to scale every gradient by 0 / norm: no weight ever moved."""
    trainer = trainer_from_config(small_config(prepared, f"run_dir={tmp_path}",
                                               "train.resume=never", "train.grad_clip=0"))
    before = weights(trainer)
    metrics = trainer.train_step().metrics
    assert metrics["grad_norm"] > 0
    moved = max(float((weights(trainer)[k] - v).abs().max()) for k, v in before.items())
    # Adam's first step moves a weight with a non-zero gradient by about lr
    assert moved > 0.5 * trainer.cfg.train.lr
    with pytest.raises(ConfigError, match="train.grad_clip must be >= 0"):
        small_config(prepared, "train.grad_clip=-1")


def test_logged_pg_loss_and_tokens_do_not_depend_on_micro_batches(prepared, tmp_path):
    """pg_loss is each micro-batch's share of the step total and num_tokens a count: they
    add up over micro-batches (they were token-averaged, about 1/K of the true value)."""
    out = {}
    for size in (64, 3):
        trainer = trainer_from_config(small_config(
            prepared, f"run_dir={tmp_path / str(size)}", "train.resume=never",
            f"train.micro_batch_size={size}"))
        out[size] = trainer.train_step().metrics
    one, several = out[64], out[3]
    assert several["train_tokens"] == one["train_tokens"] == one["num_tokens"] == \
        several["num_tokens"]
    assert one["pg_loss"] != 0
    # float32 sums in another order: ~1e-7 relative
    assert several["pg_loss"] == pytest.approx(one["pg_loss"], rel=1e-4, abs=1e-7)
    assert several["loss"] == pytest.approx(one["loss"], rel=1e-4, abs=1e-7)


def _uniform_scores(samples, texts, cfg):
    from evr1.train.groups import Scores

    zeros = torch.zeros(len(texts))
    return Scores(zeros, zeros.clone(), zeros.clone())


def test_step_without_signal_still_advances_the_lr_schedule(prepared, tmp_path, monkeypatch):
    """Every group dropped: no optimiser step, but the scheduler follows the step counter."""
    from evr1.train import trainer as trainer_module
    from evr1.train.backends.base import lr_lambda

    monkeypatch.setattr(trainer_module, "score_responses", _uniform_scores)
    cfg = small_config(prepared, f"run_dir={tmp_path}", "train.resume=never",
                       "train.filter_no_signal=true", "train.lr_schedule=linear",
                       "train.steps=4", "train.save_every=4")
    trainer = trainer_from_config(cfg)
    before = weights(trainer)
    for _ in range(2):
        metrics = trainer.train_step().metrics
        trainer.state.step += 1
        assert metrics["trained_rows"] == 0 and metrics["skipped_update"] == 1
        assert metrics["groups_with_signal"] == 0
    assert all(torch.equal(v, weights(trainer)[k]) for k, v in before.items())
    assert trainer.backend.scheduler.last_epoch == trainer.state.step == 2
    assert trainer.backend.scheduler.get_last_lr()[0] == \
        pytest.approx(cfg.train.lr * lr_lambda(cfg.train)(2))


def _group(n: int, signal: list[bool], tag: int):
    """A Groups of len(signal) groups; a group has signal iff its flag is set."""
    from evr1.data.schema import Sample
    from evr1.rollout.base import Prompt
    from evr1.train.groups import Groups, Scores

    rewards = torch.tensor([[1.0] + [0.0] * (n - 1) if s else [0.5] * n for s in signal])
    rows = len(signal) * n
    return Groups(
        n, [Sample(id=f"{tag}-{g}", problem_type="numerical", problem="?", solution=1,
                   data_type="text") for g in range(len(signal))],
        [Prompt(f"{tag}-{g}", "?", "text") for g in range(len(signal))],
        [[1]] * rows, ["x"] * rows, Scores(rewards.flatten(), rewards.flatten(), rewards.flatten()),
        torch.zeros(rows, dtype=torch.bool), torch.zeros(rows, dtype=torch.bool), None,
        {"time_rollout": 1.0})


def test_dynamic_sampling_draws_until_enough_groups_have_signal():
    from evr1.train.groups import collect_groups

    def drawer(rounds):
        it = iter(rounds)
        return lambda: _group(2, next(it), tag=len(calls.append(0) or calls))

    rounds = [[True, False, False], [False, True, False], [True, True, True], [True] * 3]
    calls: list[int] = []
    got = collect_groups(drawer(rounds), 3, filter_no_signal=False, dynamic=True, max_rounds=8)
    assert got.rounds == 3 and got.drawn.num_groups == 9
    # the first three groups with signal, in draw order; the surplus of round 3 left out
    assert [s.id for s in got.train.samples] == ["1-0", "2-1", "3-0"]
    assert got.train.has_signal().all() and len(got.train.responses) == 6
    assert got.metrics() == {"sampling_rounds": 3, "groups_drawn": 9, "groups_with_signal": 5,
                             "groups_trained": 3}
    assert got.drawn.times == {"time_rollout": 3.0}
    calls.clear()  # bounded: two rounds, two groups with signal, trained on those
    got = collect_groups(drawer(rounds), 3, filter_no_signal=False, dynamic=True, max_rounds=2)
    assert got.rounds == 2 and [s.id for s in got.train.samples] == ["1-0", "2-1"]
    calls.clear()  # filter_no_signal: one draw, no refill
    got = collect_groups(drawer(rounds), 3, filter_no_signal=True, dynamic=False, max_rounds=8)
    assert got.rounds == 1 and [s.id for s in got.train.samples] == ["1-0"]
    calls.clear()  # neither: the draw as it is
    got = collect_groups(drawer(rounds), 3, filter_no_signal=False, dynamic=False, max_rounds=8)
    assert got.rounds == 1 and got.train.num_groups == 3


def test_dynamic_sampling_in_the_trainer(prepared, tmp_path):
    cfg = small_config(prepared, f"run_dir={tmp_path}", "train.resume=never",
                       "train.dynamic_sampling=true", "train.max_sampling_rounds=3")
    trainer = trainer_from_config(cfg)
    metrics = trainer.train_step().metrics
    rounds = metrics["sampling_rounds"]
    assert 1 <= rounds <= 3
    assert metrics["data_position"] == rounds * cfg.train.prompts_per_step
    assert metrics["groups_drawn"] == rounds * cfg.train.prompts_per_step
    assert metrics["groups_trained"] == min(metrics["groups_with_signal"],
                                            cfg.train.prompts_per_step)
    assert metrics["trained_rows"] == metrics["groups_trained"] * cfg.rollout.n


def test_overlong_mask_leaves_truncated_responses_out_of_the_loss(prepared, tmp_path):
    common = ["train.resume=never", "rollout.max_new_tokens=4", "train.offline.mode=always"]
    masked = trainer_from_config(small_config(prepared, f"run_dir={tmp_path / 'm'}", *common,
                                              "train.overlong=mask"))
    group = masked._draw_groups()
    truncated = int(group.truncated.sum())
    assert truncated > 0 and not group.truncated[group.offline].any()
    kept = len(group.responses) - truncated
    masked2 = trainer_from_config(small_config(prepared, f"run_dir={tmp_path / 'm2'}", *common,
                                               "train.overlong=mask"))
    metrics = masked2.train_step().metrics  # the same draw (same seed)
    assert metrics["trained_rows"] == kept
    assert metrics["truncated"] == pytest.approx(truncated / len(group.responses))
    plain = trainer_from_config(small_config(prepared, f"run_dir={tmp_path / 'p'}", *common))
    assert plain.train_step().metrics["trained_rows"] == len(group.responses)


def test_overlong_shaping_adds_the_dapo_penalty_to_the_reward(prepared, tmp_path):
    from evr1.train.groups import score_responses
    from evr1.train.grpo import overlong_reward

    cfg = small_config(prepared, f"run_dir={tmp_path}", "train.resume=never",
                       "rollout.max_new_tokens=6", "train.overlong=shaping",
                       "train.overlong_buffer=3", "train.overlong_penalty=0.5")
    group = trainer_from_config(cfg)._draw_groups()
    lengths = torch.tensor([len(r) for r in group.responses])
    base = score_responses([s for s in group.samples for _ in range(cfg.rollout.n)],
                           group.texts, cfg.reward).overall
    penalty = overlong_reward(lengths, 6, 3, 0.5)
    assert (penalty < 0).any()
    torch.testing.assert_close(group.scores.overall, base + penalty)
    with pytest.raises(ConfigError, match="train.overlong_buffer"):
        small_config(prepared, "train.overlong=shaping", "train.overlong_buffer=0")


def test_rollout_correction_uses_the_engine_logprobs(prepared, tmp_path):
    """hf engine, same model: pi_trainer / pi_engine is the mass the placeholder ban keeps
    (top_p = 1), so every ratio is a little under 1 and the weights apply it."""
    out = {}
    for level in ("none", "token", "sequence"):
        trainer = trainer_from_config(small_config(
            prepared, f"run_dir={tmp_path / level}", "train.resume=never",
            f"train.grpo.rollout_is={level}"))
        out[level] = trainer.train_step().metrics
    for level, m in out.items():
        assert 0.5 < m["rollout_ratio_mean"] <= 1 + 1e-5, (level, m["rollout_ratio_mean"])
        assert m["rollout_trunc_frac"] == 0.0 and m["rollout_kl"] >= 0
    assert out["none"]["is_weight_mean"] == 1.0
    # the offline rows keep weight 1; sampled rows get their ratio
    assert out["token"]["is_weight_mean"] < 1.0 and out["sequence"]["is_weight_mean"] < 1.0
    assert out["token"]["pg_loss"] != out["none"]["pg_loss"]


def test_luffy_shaping_of_offline_rows_changes_the_update(prepared, tmp_path):
    out = {}
    for mode in ("clip", "shaping"):
        trainer = trainer_from_config(small_config(
            prepared, f"run_dir={tmp_path / mode}", "train.resume=never",
            "train.offline.mode=always", f"train.grpo.offline_loss={mode}"))
        start = weights(trainer)
        metrics = trainer.train_step().metrics
        out[mode] = metrics, {k: weights(trainer)[k] - v for k, v in start.items()}
    assert out["clip"][0]["offline_groups"] > 0
    assert out["clip"][0]["pg_loss"] != out["shaping"][0]["pg_loss"]
    assert any(not torch.equal(out["clip"][1][k], out["shaping"][1][k]) for k in out["clip"][1])


def test_offline_importance_weight_reaches_the_loss(prepared, tmp_path):
    """min(pi_old, c) on the expert tokens: the untrained model gives them little
    probability, so the weight is below 1 and the mean weight drops (it was min(pi_old, c)
    with c >= 1 allowed, which never changed anything)."""
    out = {}
    for clip in ("null", "0.5"):
        trainer = trainer_from_config(small_config(
            prepared, f"run_dir={tmp_path / clip}", "train.resume=never",
            "train.offline.mode=always", f"train.grpo.offline_is_clip={clip}"))
        out[clip] = trainer.train_step().metrics
    assert out["null"]["is_weight_mean"] == 1.0
    assert out["0.5"]["is_weight_mean"] < 1.0
    assert out["0.5"]["pg_loss"] != out["null"]["pg_loss"]


def _draws() -> tuple:
    import random

    import numpy as np

    return torch.rand(3).tolist(), random.random(), np.random.rand(2).tolist()


def test_rng_state_round_trip_through_weights_only_load(tmp_path):
    state = ckpt.rng_state()
    assert {"torch", "python", "cuda", "numpy"} <= state.keys()
    torch.save(state, tmp_path / "rng.pt")
    expected = _draws()
    _draws()  # the generators move on
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert _draws() == expected


class _FakeCuda:
    """Per-device generator states, standing in for torch.cuda on a machine without a GPU."""

    def __init__(self, count: int) -> None:
        self.states = {d: torch.full((16,), d + 1, dtype=torch.uint8) for d in range(count)}

    def get_rng_state(self, device=0):
        return self.states[device].clone()

    def set_rng_state(self, state, device=0):
        self.states[device] = state.clone()


def test_cuda_rng_states_of_every_device_are_saved_and_restored(tmp_path, monkeypatch):
    """On a GPU a rollout's sampling draws from the CUDA generator; resume must restore it on
    every device (checked here through torch.cuda's interface; the GPU run is the real test)."""
    fake = _FakeCuda(2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state", fake.get_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", fake.set_rng_state)
    saved = ckpt.rng_state()
    assert [s[0].item() for s in saved["cuda"]] == [1, 2]
    torch.save(saved, tmp_path / "rng.pt")
    fake.states = {0: torch.zeros(16, dtype=torch.uint8), 1: torch.zeros(16, dtype=torch.uint8)}
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert [fake.states[d][0].item() for d in (0, 1)] == [1, 2]
    # an explicit device list (e.g. this rank's device) maps the states in order
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), cuda_devices=[1])
    assert fake.states[1][0].item() == 1


def test_heldout_split_over_replicas_gives_the_one_process_figures(prepared, tmp_path):
    """Replicas answer alternate batches of the held-out set (evr1.train.heldout): together
    they score every sample once, with the answers one process gives (the same batches), and
    the summary of their gathered scores is the one-process summary, exactly."""
    from evr1.train.heldout import score_heldout, summarize_heldout

    trainer = trainer_from_config(small_config(prepared, f"run_dir={tmp_path}",
                                               "train.eval_samples=0"))
    # The training set stands in for a held-out set large enough for several batches.
    args = (trainer.engine, trainer.train_set, trainer.cfg.reward,
            trainer.cfg.rollout.max_new_tokens, 7)
    assert len(trainer.train_set) >= 7
    one = score_heldout(*args, batch_size=2)
    assert [s.index for s in one] == list(range(7))
    parts = [score_heldout(*args, batch_size=2, replica=r, replicas=3) for r in range(3)]
    # batches of 2: replica 0 answers samples 0-1 and 6, replica 1 2-3, replica 2 4-5
    assert [[s.index for s in part] for part in parts] == [[0, 1, 6], [2, 3], [4, 5]]
    gathered = [s for part in parts for s in part]
    assert sorted(gathered, key=lambda s: s.index) == one
    assert summarize_heldout(gathered) == summarize_heldout(one)
    # the trainer's own evaluation (one replica, the default batches) of its held-out set
    held = score_heldout(trainer.engine, trainer.heldout, trainer.cfg.reward,
                         trainer.cfg.rollout.max_new_tokens)
    assert trainer.evaluate() == summarize_heldout(held)
