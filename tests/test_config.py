"""The typed config: YAML + dotted overrides, and errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from evr1.config import Config, ConfigError, dump_config, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_every_shipped_config_loads():
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert configs, "configs/ must ship at least the CPU demo"
    for path in configs:
        assert isinstance(load_config(path), Config)


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = load_config(ROOT / "configs/demo_cpu.yaml",
                      ["data.video.fps=1", "preprocess.num_tasks=3", "launch.setup=[a, b]",
                       "data.video.total_pixels=null", "run_dir=/scratch/x"])
    assert cfg.data.video.fps == 1.0 and isinstance(cfg.data.video.fps, float)
    assert cfg.preprocess.num_tasks == 3
    assert cfg.launch.setup == ["a", "b"]
    assert cfg.data.video.total_pixels is None
    assert cfg.shard_dir == Path("/scratch/x/shards")
    # The demo's own values survive where not overridden.
    assert cfg.data.video.max_pixels == 3136


def test_exponent_floats_without_a_dot_are_floats(tmp_path):
    # YAML 1.1 (PyYAML) reads 3e-4 as the string "3e-4"; that is how people write a lr.
    (tmp_path / "c.yaml").write_text("train: {lr: 1e-6}\n")
    assert load_config(tmp_path / "c.yaml").train.lr == 1e-6
    cfg = load_config(None, ["train.lr=3e-4", "train.grpo.eps=1E-8"])
    assert (cfg.train.lr, cfg.train.grpo.eps) == (3e-4, 1e-8)
    with pytest.raises(ConfigError, match="train.lr must be float"):
        load_config(None, ["train.lr=3e-4x"])


def test_roundtrip_through_yaml(tmp_path):
    cfg = load_config(ROOT / "configs/demo_cpu.yaml", ["seed=7"])
    dump_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("override, message", [
    ("data.vidoe.fps=1", "unknown config key data.vidoe"),
    ("data.video.fps=fast", "data.video.fps must be float"),
    ("preprocess.num_tasks=2.5", "preprocess.num_tasks must be int"),
    ("preprocess.num_tasks=0", "preprocess.num_tasks must be >= 1"),
    ("preprocess.backend=ffmpeg", "preprocess.backend='ffmpeg' is not one of"),
    ("data.video.max_pixels=10", "data.video: need 0 < min_pixels <= max_pixels"),
    ("reward.accuracy_weight=0.5", "must sum to 1"),
    ("launch.setup=notalist", "launch.setup must be a list"),
    ("nokey", "not of the form key.sub=value"),
    # a group of one has no baseline: grpo / rloo fail, drgrpo gives it advantage 0
    ("rollout.n=1", "rollout.n must be >= 2"),
    ("train.grad_clip=-1", "train.grad_clip must be >= 0"),
    ("train.grpo.offline_is_clip=1.0", "train.grpo.offline_is_clip must be in \\(0, 1\\)"),
    ("train.grpo.offline_loss=luffy", "train.grpo.offline_loss='luffy' is not one of"),
    ("train.grpo.rollout_is=seq", "train.grpo.rollout_is='seq' is not one of"),
    ("train.grpo.rollout_is_cap=0.5", "train.grpo.rollout_is_cap must be >= 1"),
    ("train.max_sampling_rounds=0", "train.max_sampling_rounds must be >= 1"),
    ("train.overlong=cut", "train.overlong='cut' is not one of"),
    # Sampling at temperature 0 is greedy: n identical responses and a division by zero in the
    # trainer's log-probs; eval.temperature=0 is where greedy decoding belongs.
    ("rollout.temperature=0", "rollout.temperature must be > 0"),
    ("rollout.temperature=-0.5", "rollout.temperature must be > 0"),
    ("rollout.temperature=.nan", "rollout.temperature must be > 0"),
    ("rollout.top_p=0", "rollout.top_p must be in"),
    # a removed knob: an old config is told it did nothing and what to do
    ("rollout.offload_trainer=true", "rollout.offload_trainer was removed: it never did"),
    ("reward.timeout_s=0", "reward.timeout_s must be a positive number"),
    ("reward.timeout_s=-1", "reward.timeout_s must be a positive number"),
    ("reward.timeout_s=.inf", "reward.timeout_s must be a positive number"),
    ("reward.num_workers=-1", "reward.num_workers must be >= 0"),
    ("train.keep_last=-1", "train.keep_last must be >= 0"),
    ("data.max_source_pixels=0", "data.max_source_pixels must be >= 1"),
])
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(None, [override])


def test_new_training_options_default_off():
    """Every option of issue #17 is off by default: the recipes' behaviour is unchanged."""
    cfg = load_config(None, [])
    assert (cfg.train.dynamic_sampling, cfg.train.filter_no_signal, cfg.train.overlong) == \
        (False, False, "none")
    g = cfg.train.grpo
    assert (g.rollout_is, g.offline_loss, g.offline_is_clip) == ("none", "clip", None)
    assert load_config(None, ["train.grad_clip=0"]).train.grad_clip == 0.0  # 0: no clipping


def test_unknown_key_in_yaml_lists_valid_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  video:\n    fsp: 2\n")
    with pytest.raises(ConfigError, match=r"data.video.fsp; valid keys here: .*fps"):
        load_config(path)


def test_limits_at_their_edge_are_accepted():
    # keep_last 0 keeps every checkpoint; tiny positive temperature and timeout are legal.
    cfg = load_config(None, ["train.keep_last=0", "rollout.temperature=1e-3",
                             "reward.timeout_s=0.05", "eval.temperature=0"])
    assert (cfg.train.keep_last, cfg.rollout.temperature, cfg.reward.timeout_s) == \
        (0, 1e-3, 0.05)


def test_launcher_reports_a_config_error_without_a_traceback():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(ROOT / "launchers/train.py"),
                          "rollout.temperature=0"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0
    assert "config error: rollout.temperature must be > 0" in out.stderr
    assert "Traceback" not in out.stderr


def test_patch_size_must_be_the_model_familys():
    # Qwen3-VL's patch is 16: its config with the default 14 failed at the first training
    # encode, after a whole preprocess array had run on the wrong grid.
    with pytest.raises(ConfigError, match=r"data.patch_size=14 is not the patch size of "
                                          r"model.family=qwen3_vl \(16\).*data.patch_size=16"):
        load_config(None, ["model.family=qwen3_vl"])
    assert load_config(None, ["model.family=qwen3_vl", "data.patch_size=16"]).data.patch_size \
        == 16
    with pytest.raises(ConfigError, match="data.patch_size=16 is not the patch size of "
                                          "model.family=qwen2_5_vl"):
        load_config(None, ["data.patch_size=16"])
