"""Tests of the GRPO math against hand-computed values (numbers worked out in comments)."""

from __future__ import annotations

import math

import pytest
import torch

from evr1.config import ConfigError, from_dict
from evr1.train.grpo import (
    K3_CLAMP,
    SUMMED_METRICS,
    GRPOConfig,
    LossMetrics,
    aggregate_loss,
    clip_coefficient,
    compute_advantages,
    group_has_signal,
    importance_weights,
    kl_penalty,
    loss_normaliser,
    masked_mean,
    overlong_reward,
    policy_loss,
    rollout_correction,
    sample_weights,
    token_entropy,
    token_logprobs,
)

MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
LN = math.log


def close(actual: torch.Tensor, expected, tol: float = 1e-5) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)


# --------------------------------------------------------------------------- advantages

# Group A = [1, 0, 0, 1]: mean 0.5, deviations +-0.5, unbiased var = 4 * 0.25 / 3 = 1/3,
#   std = 0.57735 -> grpo = +-0.5 / 0.57735 = +-0.866025.
# Group B = [0, 0, 0, 3]: mean 0.75, deviations -0.75 (x3), 2.25; var = (3 * 0.5625 + 5.0625) / 3
#   = 2.25, std = 1.5 -> grpo = [-0.5, -0.5, -0.5, 1.5].
REWARDS = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 3.0]])


def test_grpo_advantages():
    s = 0.5 / math.sqrt(1 / 3)
    close(compute_advantages(REWARDS, estimator="grpo"),
          [[s, -s, -s, s], [-0.5, -0.5, -0.5, 1.5]])


def test_drgrpo_advantages_are_mean_centred_only():
    close(compute_advantages(REWARDS, estimator="drgrpo"),
          [[0.5, -0.5, -0.5, 0.5], [-0.75, -0.75, -0.75, 2.25]])


def test_rloo_advantages_use_leave_one_out_baseline():
    # A: r=1, others mean (0+0+1)/3 = 1/3 -> 2/3; r=0, others mean 2/3 -> -2/3.
    # B: r=3, others mean 0 -> 3; r=0, others mean (0+0+3)/3 = 1 -> -1.
    close(compute_advantages(REWARDS, estimator="rloo"),
          [[2 / 3, -2 / 3, -2 / 3, 2 / 3], [-1.0, -1.0, -1.0, 3.0]])


@pytest.mark.parametrize("estimator", ["grpo", "drgrpo", "rloo"])
def test_flat_rewards_match_grouped_and_uniform_group_is_zero(estimator):
    flat = compute_advantages(REWARDS.flatten(), group_size=4, estimator=estimator)
    assert flat.shape == (8,)
    close(flat, compute_advantages(REWARDS, estimator=estimator).flatten())
    uniform = compute_advantages(torch.full((1, 4), 2.0), estimator=estimator)
    close(uniform, torch.zeros(1, 4))  # no nan from std = 0


@pytest.mark.parametrize("estimator", ["grpo", "drgrpo", "rloo"])
@pytest.mark.parametrize("value", [0.1, 0.95, 0.3, 1.0 / 3.0])
def test_uniform_group_has_exactly_zero_advantages_in_float32(estimator, value):
    # 8 x 0.1 in float32: the mean is 0.10000001 (not 0.1); grpo divided that rounding error by
    # std + eps = eps and gave every row -0.0074 (0.95: +0.056), all of the same sign.
    rewards = torch.full((3, 8), value, dtype=torch.float32)
    rewards[1] = 0.0  # another uniform group, and one with signal below
    rewards[2, :4] = 1.0
    adv = compute_advantages(rewards, estimator=estimator)
    assert torch.equal(adv[:2], torch.zeros(2, 8)), adv[:2]
    # The group with signal is untouched: the naive formulas, in float64.
    g = rewards[2].double()
    centred = g - g.mean()
    expected = {"grpo": centred / (g.std() + 1e-6), "drgrpo": centred,
                "rloo": centred * 8 / 7}[estimator]
    # float32 arithmetic: the mean's rounding (~6e-8) over a std as small as 0.027 (the 0.95
    # case) is a relative error of a few 1e-6; a wrong formula is off by far more.
    torch.testing.assert_close(adv[2].double(), expected, rtol=2e-5, atol=1e-6)


def test_drgrpo_pairs_are_unchanged_by_the_uniform_group_fix():
    # The learning check runs Dr.GRPO on groups of 2: there (a + a) / 2 == a exactly, so the
    # plain r - mean already gave exact zeros; the fix must not change a single bit there.
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(64, 2, generator=g)
    rewards[::3, 1] = rewards[::3, 0]  # every third pair uniform
    rewards[1::3] = torch.tensor([0.05, 1.05])  # format-only and full-reward pairs
    naive = rewards - rewards.mean(dim=1, keepdim=True)
    assert torch.equal(compute_advantages(rewards, estimator="drgrpo"), naive)


def test_advantage_input_errors():
    with pytest.raises(ValueError, match="group_size"):
        compute_advantages(torch.ones(6))
    with pytest.raises(ValueError, match="groups of 4"):
        compute_advantages(torch.ones(6), group_size=4)
    with pytest.raises(ValueError, match="does not match"):
        compute_advantages(REWARDS, group_size=3)
    with pytest.raises(ValueError, match="at least 2"):
        compute_advantages(torch.ones(3, 1), estimator="grpo")
    with pytest.raises(ValueError, match="unknown"):
        compute_advantages(REWARDS, estimator="ppo")  # type: ignore[arg-type]


def test_integer_rewards_are_accepted():
    close(compute_advantages(torch.tensor([[1, 0]]), estimator="drgrpo"), [[0.5, -0.5]])


def test_group_has_signal():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5, 0.5])
    assert group_has_signal(rewards, 2).tolist() == [True, False, False]
    assert group_has_signal(rewards.view(3, 2)).tolist() == [True, False, False]


# --------------------------------------------------------------------------- clipping

CFG = GRPOConfig()  # clip_low 0.2 -> lower bound 0.8; clip_high 0.28 -> upper bound 1.28


def _clip_case():
    """Five tokens of one sequence, each a clipping case; old_logp = 0, so ratio = exp(logp)."""
    ratios = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.0], dtype=torch.float64)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0, 2.0]], dtype=torch.float64)
    logp = ratios.log()[None].clone().requires_grad_(True)
    return logp, torch.zeros_like(logp), adv, torch.ones_like(logp, dtype=torch.bool)


def test_clipping_both_sides_values_and_gradients():
    logp, old, adv, mask = _clip_case()
    loss, m = policy_loss(logp, old, adv, mask, CFG)
    # per-token l = -min(r A, clip(r, 0.8, 1.28) A):
    #  r=1.5, A=+1: min(1.5, 1.28) = 1.28  -> l = -1.28, clipped high, grad 0
    #  r=1.5, A=-1: min(-1.5, -1.28) = -1.5 -> l = 1.5, unclipped, dl/dlogp = -A r = 1.5
    #  r=0.5, A=+1: min(0.5, 0.8) = 0.5    -> l = -0.5, unclipped, grad = -0.5
    #  r=0.5, A=-1: min(-0.5, -0.8) = -0.8 -> l = 0.8, clipped low, grad 0
    #  r=1.0, A=+2: l = -2, grad -2
    # token-mean: (-1.28 + 1.5 - 0.5 + 0.8 - 2) / 5 = -1.48 / 5 = -0.296
    close(loss, -0.296)
    loss.backward()
    close(logp.grad, [[0.0, 1.5 / 5, -0.5 / 5, 0.0, -2.0 / 5]])
    close(m.clip_frac_low, 0.2)
    close(m.clip_frac_high, 0.2)
    close(m.ratio_mean, (1.5 + 1.5 + 0.5 + 0.5 + 1.0) / 5)
    close(m.pg_loss, -0.296)


def test_clip_high_is_asymmetric():
    # r = 1.25 sits inside the DAPO bound 1.28 but outside a symmetric 1.2.
    logp = torch.tensor([[LN(1.25)]], requires_grad=True)
    args = (torch.zeros(1, 1), torch.ones(1), torch.ones(1, 1, dtype=torch.bool))
    loss, m = policy_loss(logp, *args, CFG)
    close(loss, -1.25)
    assert m.clip_frac_high.item() == 0.0
    loss_sym, m_sym = policy_loss(logp, *args, GRPOConfig(clip_high=0.2))
    close(loss_sym, -1.2)
    assert m_sym.clip_frac_high.item() == 1.0


def test_approx_kl_old_to_new_is_k3_of_ratio():
    # r = pi / pi_old = 2 and 0.5: k3 = r - 1 - log r = (1 - log 2) + (-0.5 + log 2) = 0.5,
    # mean 0.25 (the k1 mean, -log r, would be 0 here).
    logp = torch.tensor([[LN(2.0), LN(0.5)]])
    _, m = policy_loss(logp, torch.zeros(1, 2), torch.ones(1), torch.ones(1, 2), CFG)
    close(m.approx_kl, 0.25)


# --------------------------------------------------------------------------- aggregation


def _agg_case(dtype=torch.float64):
    """logp = old_logp, so ratio = 1 and the per-token loss is -A_t.

    A = [[1, 2, 3], [4, 5, 6]], mask = [[1, 1, 1], [1, 0, 0]] -> losses -1, -2, -3 | -4.
    Masked positions of logp hold nan and inf: they must not leak into loss or gradients.
    """
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.7, float("nan"), float("inf")]], dtype=dtype)
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.7, float("-inf"), float("nan")]], dtype=dtype)
    adv = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=dtype)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    return logp.requires_grad_(True), old, adv, mask


@pytest.mark.parametrize("mode, expected, grad", [
    # token-mean: (-1 - 2 - 3 - 4) / 4 tokens; dl/dlogp = -A r / 4
    ("token-mean", -2.5, [[-1 / 4, -2 / 4, -3 / 4], [-4 / 4, 0, 0]]),
    # seq-mean-token-mean: mean(-6/3, -4/1) = mean(-2, -4); dl/dlogp = -A / len / 2
    ("seq-mean-token-mean", -3.0, [[-1 / 6, -2 / 6, -3 / 6], [-4 / 2, 0, 0]]),
    # seq-mean-token-sum: mean(-6, -4); dl/dlogp = -A / 2
    ("seq-mean-token-sum", -5.0, [[-1 / 2, -2 / 2, -3 / 2], [-4 / 2, 0, 0]]),
])
def test_loss_modes_and_mask(mode, expected, grad):
    logp, old, adv, mask = _agg_case()
    loss, m = policy_loss(logp, old, adv, mask, GRPOConfig(loss_agg=mode))
    close(loss, expected)
    loss.backward()
    close(logp.grad, grad)
    assert m.num_tokens.item() == 4
    close(m.ratio_mean, 1.0)
    assert all(math.isfinite(v) for v in m.as_floats().values())


@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
def test_garbage_at_masked_positions_changes_nothing(est):
    # Same batch twice: padding holds zeros, or nan / inf everywhere (logp, old, ref, entropy).
    cfg = GRPOConfig(kl_coef=0.1, kl_estimator=est, entropy_coef=0.01)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    grads, losses = [], []
    for pad in (0.0, float("nan"), float("inf")):
        def fill(values, pad=pad):
            return torch.where(mask, torch.tensor(values, dtype=torch.float64), pad)
        logp = fill([[-1.0, -0.2, 0], [-0.7, 0, 0]]).requires_grad_(True)
        entropy = fill([[1.0, 2.0, 0], [0.5, 0, 0]]).requires_grad_(True)
        loss, m = policy_loss(logp, fill([[-0.9, -0.5, 0], [-0.7, 0, 0]]), torch.tensor([1., -1.]),
                              mask, cfg, ref_logp=fill([[-1.2, -0.1, 0], [-1.0, 0, 0]]),
                              entropy=entropy)
        loss.backward()
        losses.append(loss.detach())
        grads += [torch.cat([logp.grad, entropy.grad])]
        assert all(math.isfinite(v) for v in m.as_floats().values())
    for loss, grad in zip(losses[1:], grads[1:], strict=True):
        close(loss, losses[0], tol=1e-12)
        torch.testing.assert_close(grad, grads[0], rtol=0, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_fully_masked_row_does_not_count(mode):
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    padded_values = torch.cat([values, torch.full((1, 3), 9.0)])
    padded_mask = torch.cat([mask, torch.zeros(1, 3, dtype=torch.bool)])
    close(aggregate_loss(padded_values, padded_mask, mode), aggregate_loss(values, mask, mode))
    assert loss_normaliser(padded_mask, mode) == loss_normaliser(mask, mode)


def test_loss_normaliser_counts():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]])
    assert loss_normaliser(mask, "token-mean").item() == 3
    assert loss_normaliser(mask, "seq-mean-token-mean").item() == 2
    assert loss_normaliser(mask, "seq-mean-token-sum").item() == 2


def test_empty_micro_batch_gives_zero_not_nan():
    loss = aggregate_loss(torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.bool), "token-mean")
    assert loss.item() == 0.0


def test_explicit_normaliser_divides_the_sum():
    logp, old, adv, mask = _agg_case()
    loss, _ = policy_loss(logp, old, adv, mask, GRPOConfig(), normaliser=10.0)
    close(loss, -10.0 / 10.0)


# --------------------------------------------------------------------------- KL


def test_kl_estimators_per_token_closed_forms():
    # pi = 0.5, ref = 0.25: log r = log(ref / pi) = log 0.5 = -0.693147
    logp, ref = torch.tensor([LN(0.5)]), torch.tensor([LN(0.25)])
    close(kl_penalty(logp, ref, "k1"), [LN(2)])  # -log r = 0.693147
    close(kl_penalty(logp, ref, "k2"), [0.5 * LN(2) ** 2])  # 0.240227
    close(kl_penalty(logp, ref, "k3"), [0.5 - 1 + LN(2)])  # r - 1 - log r = 0.193147


def test_kl_estimators_expectations_match_exact_kl():
    # Over the tokens of a categorical pi, E_pi[k1] and E_pi[k3] equal KL(pi || ref) exactly;
    # E_pi[k2] agrees to second order when the distributions are close.
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    exact = (p * (p / q).log()).sum()
    for est in ("k1", "k3"):
        close((p * kl_penalty(p.log(), q.log(), est)).sum(), exact, tol=1e-12)
    q_near = torch.tensor([0.49, 0.305, 0.205], dtype=torch.float64)
    exact_near = (p * (p / q_near).log()).sum()
    k2 = (p * kl_penalty(p.log(), q_near.log(), "k2")).sum()
    assert abs(k2 - exact_near) / exact_near < 0.02
    assert abs((p * kl_penalty(p.log(), q.log(), "k2")).sum() - exact) / exact > 0.05


def test_k3_is_clamped_and_non_negative():
    logp = torch.tensor([0.0, LN(0.5), -30.0, -2.0])
    ref = torch.tensor([-25.0, LN(0.5), 0.0, -1.0])
    k3 = kl_penalty(logp, ref, "k3")
    # log r = -25: r - 1 - log r = e^-25 + 24 -> over the cap; log r = 0 -> 0;
    # log r = 30 -> e^30 - 31, capped; log r = 1 -> e - 2 = 0.718282, below the cap.
    close(k3, [K3_CLAMP, 0.0, K3_CLAMP, math.e - 2])
    assert (k3 >= 0).all()


@pytest.mark.parametrize("est, grad_per_token", [
    # pi = 0.5, ref = 0.25; d/dlogp of the estimate:
    ("k1", 1.0),  # d(logp - ref)/dlogp
    ("k2", LN(2)),  # (logp - ref) = log 2
    ("k3", 1 - 0.5),  # d(e^(ref-logp) - 1 - (ref-logp)) = 1 - ref/pi = 0.5
])
def test_kl_term_in_loss(est, grad_per_token):
    logp = torch.full((1, 2), LN(0.5), requires_grad=True)
    ref = torch.full((1, 2), LN(0.25))
    cfg = GRPOConfig(kl_coef=0.1, kl_estimator=est)
    # zero advantages: the loss is 0.1 * mean KL estimate
    loss, m = policy_loss(logp, logp.detach(), torch.zeros(1), torch.ones(1, 2), cfg,
                          ref_logp=ref)
    expected_kl = kl_penalty(logp[0, :1].detach(), ref[0, :1], est).item()
    close(loss, 0.1 * expected_kl)
    close(m.kl_mean, expected_kl)
    loss.backward()
    close(logp.grad, torch.full((1, 2), 0.1 * grad_per_token / 2))


def test_kl_metric_reported_even_without_kl_loss():
    logp = torch.full((1, 2), LN(0.5))
    loss, m = policy_loss(logp, logp, torch.zeros(1), torch.ones(1, 2), GRPOConfig(),
                          ref_logp=torch.full((1, 2), LN(0.25)))
    assert loss.item() == 0.0
    close(m.kl_mean, 0.5 - 1 + LN(2))


def test_kl_and_entropy_require_inputs():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(x, x, torch.zeros(1), torch.ones(1, 2), GRPOConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(x, x, torch.zeros(1), torch.ones(1, 2), GRPOConfig(entropy_coef=0.1))


# --------------------------------------------------------------------------- entropy, IS


def test_entropy_bonus():
    logp = torch.zeros(1, 3)
    entropy = torch.tensor([[1.0, 2.0, 9.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    loss, m = policy_loss(logp, logp, torch.zeros(1), mask, GRPOConfig(entropy_coef=0.01),
                          entropy=entropy)
    # -0.01 * mean(1, 2) = -0.015; masked 9 ignored
    close(loss, -0.015)
    close(m.entropy_mean, 1.5)
    loss.backward()
    close(entropy.grad, [[-0.005, -0.005, 0.0]])


def test_importance_weights_truncate():
    old = torch.tensor([LN(0.5), LN(0.1), LN(0.3)])
    behaviour = torch.tensor([LN(0.1), LN(0.5), LN(0.3)])
    # pi_old / mu = 5 (-> clip 2), 0.2, 1
    close(importance_weights(old, behaviour, clip=2.0), [2.0, 0.2, 1.0])


def test_importance_weights_scale_policy_term_only():
    logp = torch.zeros(2, 2, requires_grad=True)
    ref = torch.full((2, 2), LN(0.5))  # k1 = logp - ref = log 2 per token
    weights = torch.tensor([2.0, 0.5])  # one per sequence
    cfg = GRPOConfig(kl_coef=0.1, kl_estimator="k1")
    loss, m = policy_loss(logp, logp.detach(), torch.ones(2), torch.ones(2, 2), cfg,
                          ref_logp=ref, is_weights=weights)
    # ratio 1, A = 1 -> policy term -w: (-2 -2 -0.5 -0.5) / 4 = -1.25; KL 0.1 log 2 unweighted
    close(loss, -1.25 + 0.1 * LN(2))
    close(m.pg_loss, -1.25)
    close(m.is_weight_mean, 1.25)
    loss.backward()
    # d/dlogp = (-w * A * r + 0.1) / 4
    close(logp.grad, [[(-2 + 0.1) / 4] * 2, [(-0.5 + 0.1) / 4] * 2])
    # per-token weights [B, T] work the same way
    loss_tok, _ = policy_loss(logp, logp.detach(), torch.ones(2), torch.ones(2, 2), cfg,
                              ref_logp=ref, is_weights=weights[:, None].expand(2, 2))
    close(loss_tok, loss.detach())


# --------------------------------------------------------------------------- accumulation


def _random_batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    B, T = 7, 6
    lengths = torch.tensor([6, 1, 3, 0, 5, 2, 4])  # uneven, and one empty row
    mask = torch.arange(T)[None] < lengths[:, None]
    logp = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    old = logp.detach() + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = logp.detach() + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    entropy = torch.rand(B, T, generator=g, dtype=torch.float64).requires_grad_(True)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    weights = torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5
    return logp, old, adv, mask, ref, entropy, weights


SPLITS = [(0, 1), (1, 4), (4, 5), (5, 7)]  # micro-batches of 1, 3, 1 and 2 sequences


def _grads(mode: str, micro_norm: str):
    """Gradients of the full batch (micro_norm='full') or summed over micro-batches.

    micro_norm='global': each micro-batch divides by the global count (the documented recipe);
    'local': each divides by its own count and the losses are averaged (the common mistake).
    """
    logp, old, adv, mask, ref, entropy, weights = _random_batch(0)
    cfg = GRPOConfig(loss_agg=mode, kl_coef=0.05, entropy_coef=0.01, clip_low=0.1,
                     clip_high=0.1)  # tight clips so some tokens are clipped
    if micro_norm == "full":
        loss, _ = policy_loss(logp, old, adv, mask, cfg, ref_logp=ref, entropy=entropy,
                              is_weights=weights)
        loss.backward()
        return logp.grad, entropy.grad
    total = sum(loss_normaliser(mask[a:b], mode) for a, b in SPLITS)
    for a, b in SPLITS:
        norm = total if micro_norm == "global" else None
        loss, _ = policy_loss(logp[a:b], old[a:b], adv[a:b], mask[a:b], cfg,
                              ref_logp=ref[a:b], entropy=entropy[a:b], is_weights=weights[a:b],
                              normaliser=norm)
        (loss if micro_norm == "global" else loss / len(SPLITS)).backward()
    return logp.grad, entropy.grad


@pytest.mark.parametrize("mode", MODES)
def test_gradient_accumulation_matches_full_batch(mode):
    full = _grads(mode, "full")
    accumulated = _grads(mode, "global")
    assert full[0].abs().sum() > 0
    for f, a in zip(full, accumulated, strict=True):
        torch.testing.assert_close(a, f, rtol=1e-10, atol=1e-12)
    # Averaging locally-normalised micro-batch losses is *not* equivalent (so this can fail).
    naive = _grads(mode, "local")
    assert not torch.allclose(naive[0], full[0])


@pytest.mark.parametrize("mode", MODES)
def test_data_parallel_average_with_normaliser_over_world(mode):
    # Two "ranks" of two micro-batches each; DDP averages the rank gradients, so each rank
    # passes normaliser = global count / world size.
    logp, old, adv, mask, *_ = _random_batch(1)
    cfg = GRPOConfig(loss_agg=mode)
    full, _ = policy_loss(logp, old, adv, mask, cfg)
    full_grad = torch.autograd.grad(full, logp)[0]
    ranks = [SPLITS[:2], SPLITS[2:]]
    world = len(ranks)
    total = sum(loss_normaliser(mask[a:b], mode) for a, b in SPLITS)
    rank_grads = []
    for micro in ranks:
        grad = torch.zeros_like(logp)
        for a, b in micro:
            loss, _ = policy_loss(logp[a:b], old[a:b], adv[a:b], mask[a:b], cfg,
                                  normaliser=total / world)
            grad += torch.autograd.grad(loss, logp)[0]
        rank_grads.append(grad)
    torch.testing.assert_close(sum(rank_grads) / world, full_grad, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- logits helpers


def _naive_logprobs(logits, targets):
    return torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)


def _naive_entropy(logits):
    logp = torch.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1)


def test_token_logprobs_and_entropy_match_naive_values_and_grads():
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 5, 11, generator=g, dtype=torch.float64)).requires_grad_(True)
    targets = torch.randint(0, 11, (2, 5), generator=g)
    w1 = torch.randn(2, 5, generator=g, dtype=torch.float64)
    w2 = torch.randn(2, 5, generator=g, dtype=torch.float64)

    ours = (token_logprobs(logits, targets, chunk_size=2) * w1).sum() + \
        (token_entropy(logits, chunk_size=3) * w2).sum()
    ref = (_naive_logprobs(logits, targets) * w1).sum() + (_naive_entropy(logits) * w2).sum()
    close(ours, ref.detach(), tol=1e-10)
    (g_ours,) = torch.autograd.grad(ours, logits)
    (g_ref,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-12)


def test_logits_helpers_pass_gradcheck():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 4, (2, 3), generator=g)
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, targets, chunk_size=2),
                                    (logits,))
    assert torch.autograd.gradcheck(lambda x: token_entropy(x, chunk_size=2), (logits,))


def test_logits_helpers_shapes_dtypes_and_views():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 6, 9, generator=g).to(torch.bfloat16)
    targets = torch.randint(0, 9, (3, 6), generator=g)
    # the usual shifted, non-contiguous slice; bf16 in, float32 out
    lp = token_logprobs(logits[:, :-1], targets[:, 1:])
    assert lp.dtype == torch.float32 and lp.shape == (3, 5)
    close(lp, _naive_logprobs(logits[:, :-1].float(), targets[:, 1:]), tol=1e-5)
    # 2-D [T, V] and 4-D leading dims
    close(token_entropy(logits[0].float()), _naive_entropy(logits[0].float()))
    four = logits.float().view(3, 2, 3, 9)
    close(token_logprobs(four, targets.view(3, 2, 3)), _naive_logprobs(four, targets.view(3, 2, 3)))
    with pytest.raises(ValueError, match="do not match"):
        token_logprobs(logits, targets[:, :-1])


def test_entropy_with_minus_inf_logits():
    logits = torch.tensor([[0.0, 0.0, float("-inf")]], requires_grad=True)
    ent = token_entropy(logits)
    close(ent, [LN(2)])  # uniform over two tokens
    ent.sum().backward()
    assert torch.isfinite(logits.grad).all()
    close(token_logprobs(logits.detach(), torch.tensor([2])), [float("-inf")])


# --------------------------------------------------------------------------- config


def test_config_defaults_follow_the_recipe():
    cfg = GRPOConfig().validate()
    assert (cfg.clip_low, cfg.clip_high, cfg.kl_coef, cfg.offline_is_clip) == (0.2, 0.28, 0.0,
                                                                                None)


@pytest.mark.parametrize("field, value", [
    ("estimator", "ppo"), ("loss_agg", "token-sum"), ("kl_estimator", "k4"),
    ("clip_low", 0.0), ("clip_low", 1.0), ("clip_high", 0.0), ("kl_coef", -0.1),
    ("entropy_coef", float("nan")), ("offline_is_clip", 0.0), ("eps", 0.0),
    # the offline weight is min(pi_old, c) with pi_old <= 1: c >= 1 would change nothing
    ("offline_is_clip", 1.0), ("offline_is_clip", 2.0),
    ("offline_loss", "luffy"), ("offline_shaping_gamma", 0.0), ("rollout_is", "geometric"),
    ("rollout_is_cap", 0.5),
])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ConfigError, match=f"train.grpo.{field}"):
        GRPOConfig(**{field: value}).validate("train.grpo")


def test_config_loads_through_the_typed_schema():
    cfg = from_dict(GRPOConfig, {"loss_agg": "seq-mean-token-sum", "offline_is_clip": 0.5,
                                 "kl_coef": 0}, "grpo").validate()
    assert cfg.offline_is_clip == 0.5 and isinstance(cfg.offline_is_clip, float)
    with pytest.raises(ConfigError, match="grpo.loss_agg"):
        from_dict(GRPOConfig, {"loss_agg": "mean"}, "grpo")


def test_shape_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(x, x, torch.zeros(3), torch.ones(2, 3), CFG)
    with pytest.raises(ValueError, match="mask"):
        policy_loss(x, x, torch.zeros(2), torch.ones(2, 4), CFG)


# --------------------------------------------------------------------------- options


def test_overlong_reward_is_dapo_soft_punishment():
    # L_max = 20, L_cache = 5: no penalty up to 15 tokens, then (15 - len) / 5, -1 at 20.
    lengths = torch.tensor([3, 15, 16, 18, 20])
    close(overlong_reward(lengths, 20, 5), [0.0, 0.0, -0.2, -0.6, -1.0])
    close(overlong_reward(lengths, 20, 5, penalty=0.5), [0.0, 0.0, -0.1, -0.3, -0.5])
    with pytest.raises(ValueError, match="buffer"):
        overlong_reward(lengths, 20, 20)


def _mismatch_case():
    # Row 0: trainer 0.5, 0.2, (pad); engine 0.25, 0.4 -> ratios 2, 0.5. Row 1: trainer 0.9 vs
    # engine 0.3 -> ratio 3. Row 2: an offline row (no engine log-probs).
    old = torch.tensor([[LN(0.5), LN(0.2), 0.0], [LN(0.9), 0.0, 0.0], [LN(0.1), LN(0.1), 0.0]],
                       dtype=torch.float64)
    engine = torch.tensor([[LN(0.25), LN(0.4), 7.0], [LN(0.3), 7.0, 7.0], [0.0, 0.0, 0.0]],
                          dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 0]], dtype=torch.bool)
    return old, engine, mask, torch.tensor([True, True, False])


def test_rollout_correction_token_level():
    old, engine, mask, has = _mismatch_case()
    c = rollout_correction(old, engine, mask, has, "token", cap=2.5)
    close(c.weights, [[2.0, 0.5, 1.0], [2.5, 1.0, 1.0], [1.0, 1.0, 1.0]])
    close(c.ratio_mean, (2 + 0.5 + 3) / 3)
    close(c.trunc_frac, 1 / 3)
    # k3 of r: r - 1 - log r over the three engine tokens
    close(c.kl, sum(r - 1 - LN(r) for r in (2.0, 0.5, 3.0)) / 3)


def test_rollout_correction_sequence_level_and_none():
    old, engine, mask, has = _mismatch_case()
    c = rollout_correction(old, engine, mask, has, "sequence", cap=2.5)
    # row 0: 2 * 0.5 = 1 for both tokens; row 1: 3 -> truncated to 2.5
    close(c.weights, [[1.0, 1.0, 1.0], [2.5, 1.0, 1.0], [1.0, 1.0, 1.0]])
    close(c.ratio_mean, (1 + 1 + 3) / 3)
    close(c.trunc_frac, 1 / 3)
    off = rollout_correction(old, engine, mask, has, "none", cap=2.5)
    close(off.weights, torch.ones(3, 3))
    close(off.ratio_mean, (2 + 0.5 + 3) / 3)  # logged even when not applied


def test_sample_weights_offline_truncation_and_rollout_correction_multiply():
    old, engine, mask, has = _mismatch_case()
    offline = ~has
    # offline rows: min(pi_old, c) = min(0.1, 0.05); sampled rows: the token correction
    cfg = GRPOConfig(offline_is_clip=0.05, rollout_is="token", rollout_is_cap=2.5)
    w, c = sample_weights(old, mask, cfg, offline=offline, rollout_logp=engine, has_rollout=has)
    close(w, [[2.0, 0.5, 1.0], [2.5, 1.0, 1.0], [0.05, 0.05, 1.0]])
    assert c is not None
    # offline weight alone, c = 0.5 above pi_old = 0.1: the weight is pi_old itself
    w, c = sample_weights(old, mask, GRPOConfig(offline_is_clip=0.5), offline=offline)
    close(w[2, :2], [0.1, 0.1])
    close(w[:2], torch.ones(2, 3))
    assert c is None
    # nothing configured, no engine log-probs: no weights at all (the default path)
    assert sample_weights(old, mask, GRPOConfig(), offline=offline) == (None, None)


def test_offline_policy_shaping_values_and_gradient():
    # One offline token with pi = 0.5, A = 1, gamma = 0.1: l = -0.5 / 0.6 = -0.8333;
    # dl/dlogp = -A * gamma * p / (p + gamma)^2 = -0.1 * 0.5 / 0.36 = -0.138889.
    # A sampled token beside it with ratio 1.5 and A = 1 is clipped at 1.28 as before.
    logp = torch.tensor([[LN(0.5)], [LN(0.6)]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[LN(0.5)], [LN(0.4)]], dtype=torch.float64)
    cfg = GRPOConfig(offline_loss="shaping", offline_shaping_gamma=0.1)
    loss, m = policy_loss(logp, old, torch.ones(2), torch.ones(2, 1, dtype=torch.bool), cfg,
                          shaped=torch.tensor([True, False]))
    close(loss, (-0.5 / 0.6 - 1.28) / 2)
    loss.backward()
    close(logp.grad, [[-0.1 * 0.5 / 0.36 / 2], [0.0]])
    close(m.clip_frac_high, 0.5)  # only the sampled token can be clipped
    # Far from the old policy the shaped term is not clipped: pi = 0.9 vs old 0.1
    logp2 = torch.tensor([[LN(0.9)]], dtype=torch.float64, requires_grad=True)
    loss2, m2 = policy_loss(logp2, torch.tensor([[LN(0.1)]], dtype=torch.float64),
                            torch.ones(1), torch.ones(1, 1, dtype=torch.bool), cfg,
                            shaped=torch.tensor([True]))
    close(loss2, -0.9 / 1.0)
    loss2.backward()
    close(logp2.grad, [[-0.1 * 0.9 / 1.0]])
    assert float(m2.clip_frac_high) == 0.0


def test_clip_coefficient_zero_means_off():
    assert clip_coefficient(4.0, 0.0) == 1.0
    assert clip_coefficient(4.0, 1.0) == pytest.approx(0.25)
    assert clip_coefficient(0.5, 1.0) == 1.0


def test_summed_metrics_are_loss_metrics():
    names = {f for f in LossMetrics.__dataclass_fields__}
    assert set(SUMMED_METRICS) == {"pg_loss", "num_tokens"} and set(SUMMED_METRICS) <= names


def test_masked_mean_reads_only_unmasked_values_and_is_zero_when_all_are_masked():
    """Masked-out positions (padding) may hold inf or NaN logits-derived values: they must not
    reach the mean (``values * mask`` would turn NaN * 0 into NaN), and an all-masked batch
    gives 0, not 0/0."""
    values = torch.tensor([[1.0, 4.0, float("nan")], [float("nan"), float("inf"), 1.0]])
    mask = torch.tensor([[True, True, False], [False, False, True]])
    assert masked_mean(values, mask).item() == 2.0  # (1 + 4 + 1) / 3, exact in fp32
    nothing = torch.zeros_like(mask)
    assert masked_mean(values, nothing).item() == 0.0
    assert masked_mean(values[:1], mask[:1]).item() == 2.5
