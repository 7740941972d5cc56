"""The GRPO objective in plain PyTorch: advantages, clipped policy loss, KL, entropy.

No model code lives here. The loss functions take per-token tensors of shape ``[B, T]``:
B responses, T response positions, and a ``mask`` that is true on the response tokens that
count (prompt and padding positions are false). Values at masked positions are never read, so
padding may hold anything, even ``inf`` or ``nan``.

Gradient accumulation
---------------------
Every aggregation mode is a sum of terms divided by a count:

* ``token-mean``:           L = (1/N) * sum over all valid tokens of l_t
* ``seq-mean-token-mean``:  L = (1/S) * sum over sequences of mean_t(l_st)
* ``seq-mean-token-sum``:   L = (1/S) * sum over sequences of sum_t(l_st)

where N is the number of valid tokens and S the number of sequences (with at least one valid
token) in the *whole* optimiser batch. A sequence's own mean or sum involves only its tokens, so
as long as no sequence is split across micro-batches, the full-batch loss is the plain sum of
the micro-batch losses when every micro-batch divides by the global N (or S) instead of its own
count. Dividing by the local count is wrong as soon as micro-batches differ in size (token-mean
weights tokens of short micro-batches up; averaging K micro-batch means is a mean of means).

So: compute ``loss_normaliser(mask, loss_agg)`` for every micro-batch of the optimiser step,
sum them (``all_reduce`` across data-parallel ranks too), pass the total as ``normaliser`` to
every micro-batch's ``policy_loss`` and call ``backward()`` on each loss unscaled. Under
DDP/FSDP, which *average* gradients over W ranks, pass ``total / W`` so that the average of
the rank gradients is the full-batch gradient. ``normaliser=None`` divides by the local count:
right for a single micro-batch holding the whole batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from evr1.config import Estimator, GRPOConfig, KLEstimator, LossAgg, RolloutIS

# exp() of a log-ratio beyond this overflows float32 long before it means anything; tokens that
# far off-policy are clipped (or hopeless) anyway, so the clamp only buys finite numbers.
_MAX_LOG_RATIO = 20.0
# The k3 estimator is unbounded above when the reference gives a token almost no mass; one such
# token would dominate the KL term, so its per-token value is capped (the usual choice).
K3_CLAMP = 10.0


# --------------------------------------------------------------------------- advantages


def _as_groups(rewards: Tensor, group_size: int | None) -> Tensor:
    """View rewards as ``[num_groups, n]`` (one row per prompt)."""
    if rewards.dim() == 2:
        if group_size is not None and group_size != rewards.shape[1]:
            raise ValueError(f"group_size={group_size} does not match rewards of shape "
                             f"{tuple(rewards.shape)}")
        groups = rewards
    elif rewards.dim() == 1:
        if group_size is None:
            raise ValueError("flat rewards need a group_size")
        if group_size < 1 or rewards.numel() % group_size:
            raise ValueError(f"{rewards.numel()} rewards do not split into groups of "
                             f"{group_size}")
        groups = rewards.view(-1, group_size)
    else:
        raise ValueError(f"rewards must be [num_groups, n] or flat, got {tuple(rewards.shape)}")
    return groups if groups.is_floating_point() else groups.float()


@torch.no_grad()
def compute_advantages(rewards: Tensor, group_size: int | None = None,
                       estimator: Estimator = "grpo", eps: float = 1e-6) -> Tensor:
    """One scalar advantage per response, from rewards grouped by prompt.

    ``rewards`` is ``[num_groups, n]``, or flat ``[num_groups * n]`` with consecutive runs of
    ``group_size`` sharing a prompt; the result has the shape of ``rewards``.

    * ``grpo``:   (r - mean) / (std + eps), std the unbiased (n - 1) sample std of the group
    * ``drgrpo``: r - mean (Dr. GRPO: dividing by the std up-weights near-uniform groups)
    * ``rloo``:   r_i - mean_{j != i} r_j = n / (n - 1) * (r_i - mean)

    A group whose rewards are all equal gets exactly zero advantages under every estimator:
    in float32 its mean need not equal the rewards (8 x 0.1 sums to 0.8000001), and ``grpo``
    would divide that rounding error by std + eps = eps into a same-sign push of ~0.01-0.1.
    """
    groups = _as_groups(rewards, group_size)
    n = groups.shape[1]
    if estimator in ("grpo", "rloo") and n < 2:
        raise ValueError(f"the {estimator} estimator needs at least 2 responses per group")
    if groups.shape[0] == 0:  # a step whose groups were all filtered out
        return torch.zeros_like(rewards, dtype=groups.dtype)
    signal = groups.amax(dim=1, keepdim=True) > groups.amin(dim=1, keepdim=True)
    centred = torch.where(signal, groups - groups.mean(dim=1, keepdim=True), 0.0)
    if estimator == "grpo":
        adv = centred / (groups.std(dim=1, keepdim=True) + eps)
    elif estimator == "drgrpo":
        adv = centred
    elif estimator == "rloo":
        adv = centred * (n / (n - 1))
    else:
        raise ValueError(f"unknown advantage estimator {estimator!r}")
    return adv.reshape(rewards.shape)


@torch.no_grad()
def group_has_signal(rewards: Tensor, group_size: int | None = None) -> Tensor:
    """``[num_groups]`` bool: False where every reward of the group is equal.

    Such a group has zero advantages and so contributes no policy gradient (only KL and
    entropy terms): ``train.filter_no_signal`` drops it (no refill), ``train.dynamic_sampling``
    drops it and draws more prompts (``evr1.train.groups.collect_groups``).
    """
    groups = _as_groups(rewards, group_size)
    return groups.amax(dim=1) > groups.amin(dim=1)


# --------------------------------------------------------------------------- per-token terms


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: KLEstimator = "k3") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled by pi.

    With log r = ref_logp - logp:
    * ``k1``: -log r               (unbiased, high variance, can be negative)
    * ``k2``: (log r)^2 / 2        (biased, low variance, >= 0)
    * ``k3``: r - 1 - log r        (unbiased, low variance, >= 0; capped at ``K3_CLAMP``)
    """
    log_r = ref_logp - logp
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r.square()
    if estimator == "k3":
        log_r = log_r.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        return (torch.exp(log_r) - 1.0 - log_r).clamp(max=K3_CLAMP)
    raise ValueError(f"unknown KL estimator {estimator!r}")


def overlong_reward(lengths: Tensor, max_len: int, buffer: int, penalty: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment, added to the reward of each response.

    0 for ``len <= max_len - buffer``; then ``((max_len - buffer) - len) / buffer * penalty``,
    falling linearly to ``-penalty`` at ``max_len`` (and below it for anything longer).
    """
    if not 0 < buffer < max_len:
        raise ValueError(f"need 0 < buffer < max_len, got buffer={buffer}, max_len={max_len}")
    excess = (lengths.float() - (max_len - buffer)).clamp(min=0.0)
    return -penalty * excess / buffer


@torch.no_grad()
def importance_weights(old_logp: Tensor, behaviour_logp: Tensor, clip: float) -> Tensor:
    """Truncated per-token importance weights min(pi_old / pi_behaviour, clip).

    For a trajectory sampled by a behaviour policy mu other than the rollout policy pi_old
    (the offline slot of a mixed group), the clipped-ratio objective assumes tokens drawn from
    pi_old; weighting each token by pi_old / mu corrects the expectation, and truncating at
    ``clip`` bounds the variance (at the price of some bias). Rows with no recorded behaviour
    log-probs should simply get weight 1 (no correction), which is what the paper does.
    """
    log_w = (old_logp - behaviour_logp).clamp(max=_MAX_LOG_RATIO)
    return torch.exp(log_w).clamp(max=clip)


@dataclass
class RolloutCorrection:
    """Truncated importance weights for the rollout/trainer mismatch, and their statistics
    (token means over the tokens that have engine log-probs; 0 where none do)."""

    weights: Tensor  # [B, T], 1 on rows without engine log-probs
    ratio_mean: Tensor  # pi_trainer / pi_engine before truncation (sequence-level: per sequence)
    trunc_frac: Tensor  # share of those tokens whose weight was truncated at the cap
    kl: Tensor  # KL(pi_engine || pi_trainer) by the k3 estimator: how far the engines disagree


@torch.no_grad()
def rollout_correction(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, has_rollout: Tensor,
                       level: RolloutIS, cap: float) -> RolloutCorrection:
    """Truncated importance sampling (TIS) with the rollout engine's own log-probs.

    The engine (vLLM: other kernels, bf16) samples from mu, slightly different from the
    trainer's pi_old, which the clipped objective assumes. With log r_t = old_logp - rollout_logp:

    * ``token``:    w_t = min(r_t, cap)                     (verl ``token``, slime ``--use-tis``)
    * ``sequence``: w_t = min(prod_t' r_t', cap) for every token of the sequence
    * ``none``:     w_t = 1 (the statistics are still computed)

    ``has_rollout [B]`` marks rows whose tokens the engine sampled (offline rows: weight 1).
    """
    mask = mask.bool() & has_rollout.bool()[:, None]
    log_r = torch.where(mask, old_logp - rollout_logp, 0.0).clamp(-_MAX_LOG_RATIO,
                                                                 _MAX_LOG_RATIO)
    ratio = torch.exp(log_r)
    if level == "sequence":
        seq = torch.exp(log_r.sum(dim=-1).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
        per_token = seq[:, None].expand_as(ratio)
    else:
        per_token = ratio
    truncated = (per_token > cap) & mask
    weights = torch.ones_like(ratio)
    if level != "none":
        weights = torch.where(mask, per_token.clamp(max=cap), 1.0)
    return RolloutCorrection(weights=weights, ratio_mean=masked_mean(per_token, mask),
                             trunc_frac=masked_mean(truncated.float(), mask),
                             kl=masked_mean(ratio - 1.0 - log_r, mask))


def sample_weights(old_logp: Tensor, mask: Tensor, cfg: GRPOConfig, *,
                   offline: Tensor | None = None, rollout_logp: Tensor | None = None,
                   has_rollout: Tensor | None = None,
                   ) -> tuple[Tensor | None, RolloutCorrection | None]:
    """The per-token weights of a micro-batch's policy term: offline rows' weight
    min(pi_old, offline_is_clip) (when set) times the rollout correction of sampled rows
    (when the engine returned log-probs); ``None`` where neither applies."""
    weights = None
    if cfg.offline_is_clip is not None and offline is not None and bool(offline.any()):
        # The expert is a deterministic behaviour policy: pi_old / 1, truncated at c < 1.
        w = importance_weights(old_logp, torch.zeros_like(old_logp), cfg.offline_is_clip)
        weights = torch.where(offline.bool()[:, None] & mask.bool(), w, 1.0)
    correction = None
    if rollout_logp is not None and has_rollout is not None and bool(has_rollout.any()):
        correction = rollout_correction(old_logp, rollout_logp, mask, has_rollout,
                                        cfg.rollout_is, cfg.rollout_is_cap)
        if cfg.rollout_is != "none":
            weights = correction.weights if weights is None else weights * correction.weights
    return weights, correction


def shaped_offline_term(logp: Tensor, gamma: float) -> Tensor:
    """LUFFY's policy shaping f(pi) = pi / (pi + gamma) of a token's probability (with grad).

    Its gradient, gamma / (pi + gamma)^2 * grad pi = gamma * pi / (pi + gamma)^2 * grad log pi,
    is largest for tokens the policy finds unlikely, so rare expert tokens are not drowned by
    the policy's own confident ones (LUFFY, Yan et al. 2025, eq. 6; gamma = 0.1 there).
    """
    p = torch.exp(logp)
    return p / (p + gamma)


def clip_coefficient(norm: float, max_norm: float) -> float:
    """The factor that brings a gradient of global ``norm`` within ``max_norm`` (as
    ``torch.nn.utils.clip_grad_norm_``); ``max_norm <= 0`` means no clipping (factor 1)."""
    if max_norm <= 0:
        return 1.0
    return min(1.0, max_norm / (norm + 1e-6))


# --------------------------------------------------------------------------- aggregation


def loss_normaliser(mask: Tensor, loss_agg: LossAgg) -> Tensor:
    """The count a micro-batch adds to the gradient-accumulation normaliser.

    Valid tokens for ``token-mean``; sequences with at least one valid token for the
    ``seq-mean-*`` modes. Sum over the micro-batches (and ranks) of one optimiser step.
    """
    mask = mask.bool()
    if loss_agg == "token-mean":
        return mask.sum().float()
    if loss_agg in ("seq-mean-token-mean", "seq-mean-token-sum"):
        return mask.any(dim=-1).sum().float()
    raise ValueError(f"unknown loss aggregation {loss_agg!r}")


def aggregate_loss(values: Tensor, mask: Tensor, loss_agg: LossAgg,
                   normaliser: float | Tensor | None = None) -> Tensor:
    """Reduce per-token ``values [B, T]`` to a scalar (see the module docstring)."""
    mask = mask.bool()
    values = torch.where(mask, values, 0.0)
    if loss_agg == "token-mean":
        total = values.sum()
    elif loss_agg == "seq-mean-token-mean":
        lengths = mask.sum(dim=-1).clamp(min=1)
        total = (values.sum(dim=-1) / lengths).sum()
    elif loss_agg == "seq-mean-token-sum":
        total = values.sum()  # sum over sequences of per-sequence sums
    else:
        raise ValueError(f"unknown loss aggregation {loss_agg!r}")
    if normaliser is None:
        normaliser = loss_normaliser(mask, loss_agg).clamp(min=1.0)
    return total / normaliser


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask`` is true; 0 when nothing is (never NaN: values at
    masked-out positions, padding that may hold inf or NaN, do not reach the sum)."""
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp(min=1)


# --------------------------------------------------------------------------- policy loss


@dataclass
class LossMetrics:
    """Detached scalars of one micro-batch (token means over its valid tokens).

    Kept as tensors so that logging does not force a device sync on every micro-batch;
    ``as_floats`` converts once.
    """

    pg_loss: Tensor  # the clipped policy term alone, aggregated like the loss
    clip_frac_low: Tensor  # tokens with A < 0 and ratio < 1 - clip_low (gradient cut)
    clip_frac_high: Tensor  # tokens with A > 0 and ratio > 1 + clip_high (gradient cut)
    ratio_mean: Tensor
    kl_mean: Tensor  # KL(pi || ref) with the configured estimator; 0 without ref_logp
    entropy_mean: Tensor  # 0 without entropy
    approx_kl: Tensor  # KL(pi_old || pi) by the k3 estimator: how far this update has moved
    is_weight_mean: Tensor  # 1 without importance weights
    num_tokens: Tensor
    # Rollout/trainer mismatch (see RolloutCorrection); 0 when the engine gives no log-probs.
    rollout_ratio_mean: Tensor = field(default_factory=lambda: torch.zeros(()))
    rollout_trunc_frac: Tensor = field(default_factory=lambda: torch.zeros(()))
    rollout_kl: Tensor = field(default_factory=lambda: torch.zeros(()))

    def as_floats(self) -> dict[str, float]:
        return {name: float(value) for name, value in vars(self).items()}

    def add_correction(self, correction: RolloutCorrection | None) -> None:
        if correction is not None:
            self.rollout_ratio_mean = correction.ratio_mean
            self.rollout_trunc_frac = correction.trunc_frac
            self.rollout_kl = correction.kl


# Metrics that are a micro-batch's share of a step total (pg_loss is divided by the step's
# normaliser, num_tokens is a count): a step sums them over micro-batches. The other metrics are
# means over a micro-batch's tokens: a step weights them by its token count.
SUMMED_METRICS = ("pg_loss", "num_tokens")


def _check_shapes(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor) -> None:
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got {tuple(logp.shape)}")
    for name, t in (("old_logp", old_logp), ("mask", mask)):
        if t.shape != logp.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, logp {tuple(logp.shape)}")
    if advantages.shape not in (logp.shape[:1], logp.shape):
        raise ValueError(f"advantages must be [B] or [B, T], got {tuple(advantages.shape)}")


def _per_token(t: Tensor, like: Tensor, mask: Tensor) -> Tensor:
    """Broadcast ``[B]``/``[B, 1]``/``[B, T]`` to ``like`` and zero masked positions.

    Zeroing *before* any arithmetic matters: ``nan * 0`` is nan, and a garbage value at a
    padding position would otherwise leak into the loss or, through exp(), into gradients.
    """
    if t.dim() == 1:
        t = t[:, None]
    return torch.where(mask, t.expand_as(like), 0.0)


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                cfg: GRPOConfig, *, ref_logp: Tensor | None = None,
                entropy: Tensor | None = None, is_weights: Tensor | None = None,
                normaliser: float | Tensor | None = None,
                shaped: Tensor | None = None) -> tuple[Tensor, LossMetrics]:
    """GRPO loss of one micro-batch and its metrics.

    Per token, with ratio = exp(logp - old_logp) and A the advantage:

        l = -w * min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A)
            + kl_coef * KL_est(logp, ref_logp) - entropy_coef * entropy

    aggregated by ``cfg.loss_agg`` and divided by ``normaliser`` (see the module docstring).
    Rows flagged in ``shaped [B]`` (offline rows under ``offline_loss: shaping``) use
    LUFFY's unclipped ``-w * A * f(pi)`` instead, f(p) = p / (p + offline_shaping_gamma).
    ``logp`` (and ``entropy``) carry the gradient; ``old_logp``, ``ref_logp``, ``advantages``
    and the importance weights ``w`` (``[B]`` or ``[B, T]``, default 1) are treated as
    constants. The weights multiply the policy term only: they correct which tokens were
    sampled, while the KL and entropy terms are regularisers evaluated on whatever tokens the
    batch holds.
    """
    _check_shapes(logp, old_logp, advantages, mask)
    mask = mask.bool()
    logp = torch.where(mask, logp, 0.0)
    old_logp = torch.where(mask, old_logp.detach(), 0.0)
    adv = _per_token(advantages.detach().to(logp.dtype), logp, mask)

    log_ratio = (logp - old_logp).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    clipped = ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    pg = -torch.minimum(ratio * adv, clipped * adv)
    can_clip = mask
    if shaped is not None:
        rows = shaped.bool()[:, None].expand_as(pg)
        pg = torch.where(rows, -adv * shaped_offline_term(logp, cfg.offline_shaping_gamma), pg)
        can_clip = mask & ~rows
    weights = torch.ones_like(pg)
    if is_weights is not None:
        weights = _per_token(is_weights.detach().to(logp.dtype), logp, mask)
        pg = pg * weights
    per_token = pg

    kl = torch.zeros_like(pg)
    if cfg.kl_coef > 0.0 and ref_logp is None:
        raise ValueError("kl_coef > 0 needs ref_logp")
    if ref_logp is not None:
        kl = kl_penalty(logp, torch.where(mask, ref_logp.detach(), 0.0), cfg.kl_estimator)
        if cfg.kl_coef > 0.0:
            per_token = per_token + cfg.kl_coef * kl

    ent = torch.zeros_like(pg)
    if cfg.entropy_coef > 0.0 and entropy is None:
        raise ValueError("entropy_coef > 0 needs entropy")
    if entropy is not None:
        ent = torch.where(mask, entropy, 0.0)
        if cfg.entropy_coef > 0.0:
            per_token = per_token - cfg.entropy_coef * ent

    loss = aggregate_loss(per_token, mask, cfg.loss_agg, normaliser)
    with torch.no_grad():
        metrics = LossMetrics(
            pg_loss=aggregate_loss(pg, mask, cfg.loss_agg, normaliser),
            clip_frac_low=masked_mean(
                ((adv < 0) & (ratio < 1.0 - cfg.clip_low) & can_clip).float(), mask),
            clip_frac_high=masked_mean(
                ((adv > 0) & (ratio > 1.0 + cfg.clip_high) & can_clip).float(), mask),
            ratio_mean=masked_mean(ratio, mask),
            kl_mean=masked_mean(kl, mask),
            entropy_mean=masked_mean(ent, mask),
            approx_kl=masked_mean(ratio - 1.0 - log_ratio, mask),
            is_weight_mean=masked_mean(weights, mask),
            num_tokens=mask.sum(),
        )
    return loss, metrics


# --------------------------------------------------------------------------- logits helpers
#
# A [B, T, V] float32 log_softmax of a Qwen vocabulary (~152k) costs 600 KB per position, and
# autograd would keep it for backward. These helpers work through the logits a few rows at a
# time in float32, keep only the logits (which the model's graph holds anyway) and one float
# per row, and recompute the softmax chunk by chunk in backward.

DEFAULT_CHUNK = 1024  # positions per chunk; 1024 x 152k x 4 B = 620 MB of float32 scratch


def _as_3d(logits: Tensor) -> Tensor:
    """``[..., T, V]`` -> ``[B, T, V]``; a 2-D ``[T, V]`` gets a batch dim of 1."""
    if logits.dim() < 2:
        raise ValueError(f"logits must be [..., V] with at least 2 dims, got "
                         f"{tuple(logits.shape)}")
    if logits.dim() == 2:
        return logits.unsqueeze(0)
    return logits.reshape(-1, *logits.shape[-2:])


def _chunks(x3: Tensor, chunk: int) -> Iterator[tuple[int, slice]]:
    # Slicing [b, t0:t1] is always a view, so non-contiguous logits (e.g. logits[:, :-1])
    # are never copied whole.
    for b in range(x3.shape[0]):
        for start in range(0, x3.shape[1], chunk):
            yield b, slice(start, start + chunk)


def _compute_dtype(logits: Tensor) -> torch.dtype:
    return torch.promote_types(logits.dtype, torch.float32)  # bf16 -> fp32, fp64 stays


class _TokenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, chunk: int) -> Tensor:  # type: ignore[override]
        dtype = _compute_dtype(logits)
        out = torch.empty(targets.shape, dtype=dtype, device=logits.device)
        lse = torch.empty_like(out)
        for b, ts in _chunks(logits, chunk):
            x = logits[b, ts].to(dtype)
            lse[b, ts] = torch.logsumexp(x, dim=-1)
            out[b, ts] = x.gather(-1, targets[b, ts, None]).squeeze(-1) - lse[b, ts]
        ctx.save_for_backward(logits, targets, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for b, ts in _chunks(logits, ctx.chunk):
            g = grad_out[b, ts, None].to(lse.dtype)
            # d log p_y / d x_j = 1[j = y] - softmax(x)_j
            d = torch.exp(logits[b, ts].to(lse.dtype) - lse[b, ts, None]).mul_(-g)
            d.scatter_add_(-1, targets[b, ts, None], g)
            grad[b, ts] = d.to(grad.dtype)
        return grad, None, None


class _TokenEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, chunk: int) -> Tensor:  # type: ignore[override]
        dtype = _compute_dtype(logits)
        out = torch.empty(logits.shape[:-1], dtype=dtype, device=logits.device)
        lse = torch.empty_like(out)
        for b, ts in _chunks(logits, chunk):
            x = logits[b, ts].to(dtype)
            lse[b, ts] = torch.logsumexp(x, dim=-1)
            p = torch.exp(x - lse[b, ts, None])
            # H = lse - E_p[x]; positions with p == 0 (e.g. -inf logits) contribute nothing,
            # and must not turn 0 * -inf into nan.
            out[b, ts] = lse[b, ts] - (p * torch.where(p > 0, x, 0.0)).sum(-1)
        ctx.save_for_backward(logits, lse, out)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        logits, lse, entropy = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for b, ts in _chunks(logits, ctx.chunk):
            x = logits[b, ts].to(lse.dtype)
            p = torch.exp(x - lse[b, ts, None])
            mean_x = (lse[b, ts] - entropy[b, ts])[:, None]  # E_p[x] = lse - H
            # dH / dx_j = -p_j * (x_j - E_p[x]); zero where p_j == 0
            d = -p * torch.where(p > 0, x - mean_x, 0.0) * grad_out[b, ts, None].to(lse.dtype)
            grad[b, ts] = d.to(grad.dtype)
        return grad, None


def token_logprobs(logits: Tensor, target_ids: Tensor, chunk_size: int = DEFAULT_CHUNK) -> Tensor:
    """log softmax(logits)[target] per position, without a full-vocabulary log_softmax.

    ``logits [..., T, V]`` (already divided by any sampling temperature), ``target_ids
    [..., T]``. Returns float32 (float64 for float64 logits) whatever the logits dtype: the
    ratio exp(logp - old_logp) of bf16 log-probs is too coarse for clipping at 0.2.
    """
    if target_ids.shape != logits.shape[:-1]:
        raise ValueError(f"target_ids {tuple(target_ids.shape)} do not match logits "
                         f"{tuple(logits.shape)}")
    x3 = _as_3d(logits)
    targets = target_ids.reshape(x3.shape[:-1]).long()
    out = _TokenLogProbs.apply(x3, targets, chunk_size)
    return out.reshape(target_ids.shape)


def token_entropy(logits: Tensor, chunk_size: int = DEFAULT_CHUNK) -> Tensor:
    """Entropy of softmax(logits) per position, ``[..., T, V] -> [..., T]`` (float32+)."""
    x3 = _as_3d(logits)
    out = _TokenEntropy.apply(x3, chunk_size)
    return out.reshape(logits.shape[:-1])
