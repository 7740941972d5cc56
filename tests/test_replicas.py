"""Data-parallel rollouts: the split of a step over replicas, their prompt streams, metric
reduction and gathering (``evr1.train.replicas``). Multi-rank parts run on 2 or 4 local
processes under gloo."""

from __future__ import annotations

import os

import pytest
import torch

from evr1.config import ConfigError, TrainConfig
from evr1.data.dataset import PromptSampler
from evr1.train.backends.megatron import spawn
from evr1.train.replicas import (
    Replicas,
    Tally,
    check_replicas_agree,
    gather_json,
    group_share,
    step_seed,
)


@pytest.mark.parametrize(("groups", "replicas"), [(16, 1), (16, 2), (16, 4), (6, 3), (8, 8)])
def test_every_group_goes_to_exactly_one_replica_whole_and_in_order(groups, replicas):
    shares = [group_share(groups, replicas, r) for r in range(replicas)]
    assert [g for share in shares for g in share] == list(range(groups))
    assert {len(share) for share in shares} == {groups // replicas}


def test_a_share_that_does_not_divide_is_refused():
    with pytest.raises(ValueError, match="6 groups do not split into 4"):
        group_share(6, 4, 0)
    with pytest.raises(ValueError, match="replica 2 of 2"):
        group_share(4, 2, 2)


def test_prompts_per_step_that_does_not_divide_is_a_config_error_naming_the_field():
    cfg = TrainConfig(prompts_per_step=6)
    cfg.check_replicas(1)
    cfg.check_replicas(3)
    with pytest.raises(ConfigError, match=r"train\.prompts_per_step=6 does not divide over the "
                                          r"job's 4 data-parallel replicas"):
        cfg.check_replicas(4)


def test_replicas_draw_disjoint_blocks_that_together_are_the_single_process_draw():
    """Per step, replica r of R takes block r of what one process drawing R x k takes; across
    an epoch boundary too; every replica's position is the shared one."""
    single = PromptSampler(7, seed=5)
    pair = [PromptSampler(7, seed=5, replicas=2, replica=r) for r in range(2)]
    for _ in range(6):  # 6 x 4 prompts: three epochs of 7 and a bit
        want = single.next(4)
        got = [s.next(2) for s in pair]
        assert got[0] + got[1] == want
        assert {s.position for s in pair} == {single.position}


def test_a_replicas_stream_resumes_from_the_shared_position():
    uninterrupted = PromptSampler(9, seed=1, replicas=2, replica=1)
    draws = [uninterrupted.next(3) for _ in range(5)]
    resumed = PromptSampler(9, seed=1, replicas=2, replica=1)
    for d in draws[:2]:
        assert resumed.next(3) == d
    restarted = PromptSampler(9, seed=1, replicas=2, replica=1, position=resumed.position)
    assert [restarted.next(3) for _ in range(3)] == draws[2:]


def test_step_seeds_differ_by_replica_step_and_draw_and_are_stable():
    seeds = {step_seed(0, r, s, d) for r in range(4) for s in range(50) for d in range(3)}
    assert len(seeds) == 4 * 50 * 3
    assert step_seed(3, 1, 7) == step_seed(3, 1, 7, 0)


def test_tally_combines_means_by_weight_not_as_a_mean_of_means():
    a, b = Tally(), Tally()
    a.mean("reward", torch.tensor([1.0, 1.0, 1.0]))  # 3 rows, mean 1
    b.mean("reward", torch.tensor([0.0]))  # 1 row, mean 0: mean of means would say 0.5
    a.add("rollouts", 3)
    b.add("rollouts", 1)
    a.slowest("time_rollout", 2.0)
    b.slowest("time_rollout", 5.0)
    b.mean("offline_reward", torch.tensor([0.5, 1.0]))
    a.mean("online_accuracy", torch.tensor([]))  # no rows: left out, not 0/0
    out = Tally.combine([a, b], per_replica=("rollouts", "time_rollout"))
    assert out == {"reward": 0.75, "rollouts": 4, "time_rollout": 5.0, "offline_reward": 0.75,
                   "rollouts/replica0": 3, "rollouts/replica1": 1,
                   "time_rollout/replica0": 2.0, "time_rollout/replica1": 5.0}


def test_tally_combination_is_the_mean_over_all_rows():
    """Against a naive reference: the concatenated rows' mean, any split."""
    g = torch.Generator().manual_seed(0)
    rows = torch.rand(37, generator=g)
    for cut in (1, 10, 36):
        parts = [Tally(), Tally()]
        parts[0].mean("x", rows[:cut])
        parts[1].mean("x", rows[cut:])
        assert Tally.combine(parts)["x"] == pytest.approx(float(rows.double().mean()),
                                                          rel=1e-12)


# --------------------------------------------------------------------------- 4 processes


def _gathers(tp: int) -> dict:
    """On 4 ranks: replicas of ``tp`` consecutive ranks (as megatron-core lays out TP)."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    replicas = Replicas.of_this_rank(4 // tp, rank // tp)
    tally = Tally()
    tally.mean("reward", torch.full((rank + 1,), float(rank)))
    tally.add("rollouts", 10 * (replicas.index + 1))
    records = [{"sample_id": f"r{replicas.index}-{k}", "text": "ünïcode"} for k in range(2)]
    out = {"replicas": replicas, "ranks": gather_json(rank, None),
           "records": [r for part in gather_json(records, replicas) for r in part],
           "metrics": Tally.combine(tally.gather(replicas), per_replica=("rollouts",))}
    check_replicas_agree(f"replica {replicas.index}", replicas)
    digest = "odd one out" if rank == 3 else f"replica {replicas.index}"
    try:
        check_replicas_agree(digest, replicas)
        out["error"] = ""
    except RuntimeError as exc:
        out["error"] = str(exc)
    return out


def test_gathers_take_each_replicas_leader_in_replica_order():
    """2 replicas of TP=2 (one multi-process run: starting processes is the slow part)."""
    tp = 2
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = spawn.run(_gathers, 4, tp)
    replicas = [r["replicas"] for r in results]
    assert [(r.count, r.index, r.leader) for r in replicas] == \
        [(4 // tp, k // tp, k % tp == 0) for k in range(4)]
    for r in results:  # every rank gets the same answer
        assert r["ranks"] == [0, 1, 2, 3]
        assert r["records"] == [{"sample_id": f"r{i}-{k}", "text": "ünïcode"}
                                for i in range(4 // tp) for k in range(2)]
        leaders = range(0, 4, tp)
        rows = [float(k) for k in leaders for _ in range(k + 1)]
        assert r["metrics"]["reward"] == pytest.approx(sum(rows) / len(rows))
        assert r["metrics"]["rollouts"] == sum(10 * (i + 1) for i in range(4 // tp))
        assert r["metrics"]["rollouts/replica0"] == 10
    assert all("ranks [3] drew other rollouts" in r["error"] for r in results)
