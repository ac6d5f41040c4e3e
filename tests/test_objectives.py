"""rndpo.objectives against brute force, known answers, and the RN gradient bound."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings

from rndpo.objectives import mask_logps, mask_logratio, preference_loss


def brute_force_logp(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ_i log p(y_i|x) over every pixel, the definition (no identity used)."""
    if logits.shape[1] == 1:
        z = logits[:, 0]
        y = labels.to(logits.dtype)
        per_pixel = y * F.logsigmoid(z) + (1 - y) * F.logsigmoid(-z)
    else:
        per_pixel = torch.log_softmax(logits, dim=1).gather(1, labels.long().unsqueeze(1)).squeeze(1)
    return per_pixel.flatten(1).sum(1)


@st.composite
def problems(draw):
    spatial_dims = draw(st.sampled_from([1, 2, 3]))
    spatial = tuple(draw(st.integers(1, 6)) for _ in range(spatial_dims))
    batch = draw(st.integers(1, 3))
    channels = draw(st.sampled_from([1, 2, 3, 5]))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0]))
    return batch, channels, spatial, seed, scale


def make_problem(batch, channels, spatial, seed, scale, dtype):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn((batch, channels, *spatial), generator=gen) * scale).to(dtype)
    high = 2 if channels == 1 else channels
    chosen = torch.randint(0, high, (batch, *spatial), generator=gen)
    rejected = chosen.clone()
    flip = torch.rand((batch, *spatial), generator=gen) < 0.5
    rejected[flip] = torch.randint(0, high, (batch, *spatial), generator=gen)[flip]
    return logits, chosen, rejected


@settings(max_examples=60, deadline=None)
@given(problems(), st.sampled_from([torch.float64, torch.float32]))
def test_logratio_equals_brute_force_in_value_and_gradient(problem, dtype):
    logits, chosen, rejected = make_problem(*problem, dtype=dtype)
    rtol = 1e-5 if dtype == torch.float64 else 1e-3

    fast = logits.clone().requires_grad_(True)
    logratio, region = mask_logratio(fast, chosen, rejected)
    slow = logits.clone().requires_grad_(True)
    expected = brute_force_logp(slow, chosen) - brute_force_logp(slow, rejected)

    torch.testing.assert_close(logratio, expected, rtol=rtol, atol=rtol)
    assert region.dtype == torch.int64
    assert region.tolist() == (chosen != rejected).flatten(1).sum(1).tolist()

    weights = torch.randn(logratio.shape, dtype=dtype)  # a random linear functional of the B outputs
    (logratio * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(fast.grad, slow.grad, rtol=rtol, atol=rtol)
    # exactly zero outside D, in every channel
    outside = (chosen == rejected).unsqueeze(1).expand_as(fast.grad)
    assert torch.count_nonzero(fast.grad[outside]) == 0


@settings(max_examples=30, deadline=None)
@given(problems())
def test_mask_logps_are_region_restricted_logps(problem):
    logits, chosen, rejected = make_problem(*problem, dtype=torch.float64)
    chosen_logp, rejected_logp, region = mask_logps(logits, chosen, rejected)
    logratio, region2 = mask_logratio(logits, chosen, rejected)
    torch.testing.assert_close(chosen_logp - rejected_logp, logratio)
    assert torch.equal(region, region2)
    # brute force restricted to D: zero the logits' contribution outside D by masking per-pixel terms
    disagree = chosen != rejected
    if logits.shape[1] == 1:
        z, y = logits[:, 0], chosen.double()
        per_pixel = y * F.logsigmoid(z) + (1 - y) * F.logsigmoid(-z)
    else:
        per_pixel = torch.log_softmax(logits, 1).gather(1, chosen.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(chosen_logp, (per_pixel * disagree).flatten(1).sum(1))
    assert bool((chosen_logp <= 0).all()) and bool((rejected_logp <= 0).all())


def test_logratio_known_answer_binary():
    logits = torch.tensor([[[[2.0, -1.0], [0.5, 3.0]]]])  # (1, 1, 2, 2)
    chosen = torch.tensor([[[1, 0], [1, 1]]])
    rejected = torch.tensor([[[0, 0], [0, 1]]])  # differs at (0,0) and (1,0), both chosen = 1 → +z
    logratio, region = mask_logratio(logits, chosen, rejected)
    assert logratio.item() == pytest.approx(2.0 + 0.5)
    assert region.item() == 2
    logratio, _ = mask_logratio(logits, rejected, chosen)
    assert logratio.item() == pytest.approx(-2.5)


def test_logratio_known_answer_multiclass_3d():
    logits = torch.zeros(1, 3, 2, 1, 1)
    logits[0, :, 0, 0, 0] = torch.tensor([1.0, 4.0, -2.0])
    chosen = torch.tensor([[[[1]], [[2]]]])
    rejected = torch.tensor([[[[2]], [[2]]]])
    logratio, region = mask_logratio(logits, chosen, rejected)
    assert logratio.item() == pytest.approx(4.0 - (-2.0))
    assert region.item() == 1


def test_identical_masks_give_zero_region_and_ratio():
    logits = torch.randn(2, 1, 5, 5)
    masks = torch.randint(0, 2, (2, 5, 5))
    logratio, region = mask_logratio(logits, masks, masks)
    assert region.tolist() == [0, 0] and logratio.abs().max().item() == 0.0


def test_half_precision_is_computed_in_float32():
    logits, chosen, rejected = make_problem(2, 3, (8, 8), 0, 1.0, dtype=torch.float64)
    logratio16, _ = mask_logratio(logits.half(), chosen, rejected)
    assert logratio16.dtype == torch.float32
    expected = brute_force_logp(logits.half().double(), chosen) - brute_force_logp(logits.half().double(), rejected)
    torch.testing.assert_close(logratio16.double(), expected, rtol=1e-4, atol=1e-3)
    bf, _ = mask_logratio(logits.bfloat16(), chosen, rejected)
    assert bf.dtype == torch.float32


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
@pytest.mark.parametrize("normalize", ["none", "region"])
def test_extreme_logits_stay_finite(channels, loss_type, normalize):
    logits, chosen, rejected = make_problem(2, channels, (16, 16), 1, 1.0, dtype=torch.float32)
    logits = (torch.sign(logits) * 1e4).requires_grad_(True)
    logratio, region = mask_logratio(logits, chosen, rejected)
    loss, stats = preference_loss(logratio, -logratio.detach(), region, beta=0.5, loss_type=loss_type,
                                  normalize=normalize, label_smoothing=0.1 if loss_type == "robust" else 0.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert math.isfinite(stats["rewards/margins"])


# --- each loss type against its formula at hand-picked values ---------------------------------

def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


@pytest.mark.parametrize(
    "loss_type,eps,formula",
    [
        ("sigmoid", 0.0, lambda bh, h, b, e: -math.log(_sig(bh))),
        ("sigmoid", 0.2, lambda bh, h, b, e: -(1 - e) * math.log(_sig(bh)) - e * math.log(_sig(-bh))),
        ("robust", 0.2, lambda bh, h, b, e: ((1 - e) * -math.log(_sig(bh)) - e * -math.log(_sig(-bh))) / (1 - 2 * e)),
        ("ipo", 0.0, lambda bh, h, b, e: (h - 1 / (2 * b)) ** 2),
        ("hinge", 0.0, lambda bh, h, b, e: max(0.0, 1 - bh)),
    ],
)
@pytest.mark.parametrize("normalize", ["none", "region"])
def test_loss_types_match_formulas(loss_type, eps, formula, normalize):
    policy = torch.tensor([3.0, -2.0, 10.0, 1.0], dtype=torch.float64)
    ref = torch.tensor([1.0, 1.0, 4.0, 1.0], dtype=torch.float64)
    region = torch.tensor([4, 1, 12, 0])  # the last pair is empty and must be ignored
    beta = 0.7
    loss, stats = preference_loss(policy, ref, region, beta=beta, loss_type=loss_type, normalize=normalize,
                                  label_smoothing=eps)
    hs = [(p - r) / (d if normalize == "region" else 1) for p, r, d in zip(policy.tolist()[:3], ref.tolist()[:3], [4, 1, 12])]
    expected = sum(formula(beta * h, h, beta, eps) for h in hs) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert stats["pairs/empty"] == 1.0 and stats["pairs/count"] == 3.0
    assert stats["rewards/margins"] == pytest.approx(beta * sum(hs) / 3)
    assert stats["rewards/accuracies"] == pytest.approx(sum(h > 0 for h in hs) / 3)
    assert stats["region/mean"] == pytest.approx((4 + 1 + 12) / 3)


def test_rewards_chosen_rejected_follow_trl_definition():
    policy_logps = (torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0]))
    ref_logps = (torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0]))
    policy = policy_logps[0] - policy_logps[1]
    ref = ref_logps[0] - ref_logps[1]
    _, stats = preference_loss(policy, ref, torch.tensor([2, 5]), beta=0.5, normalize="none",
                               policy_logps=policy_logps, ref_logps=ref_logps)
    assert stats["rewards/chosen"] == pytest.approx(0.5 * ((1.0 + 0.0) / 2))
    assert stats["rewards/rejected"] == pytest.approx(0.5 * ((-1.0 + 1.0) / 2))
    assert stats["rewards/margins"] == pytest.approx(stats["rewards/chosen"] - stats["rewards/rejected"])


def test_all_empty_pairs_give_zero_loss_that_backpropagates():
    policy = torch.tensor([1.0, 2.0], requires_grad=True)
    loss, stats = preference_loss(policy, torch.zeros(2), torch.zeros(2, dtype=torch.long), beta=0.1)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(policy.grad, torch.zeros(2))
    assert stats["pairs/empty"] == 2.0 and math.isnan(stats["rewards/margins"])


# --- the RN property -------------------------------------------------------------------------

def _one_pair_grad_l1(region_size: int, normalize: str, beta: float, side: int = 64) -> float:
    gen = torch.Generator().manual_seed(region_size)
    logits = torch.randn(1, 1, side, side, generator=gen, dtype=torch.float64).requires_grad_(True)
    chosen = torch.zeros(1, side, side, dtype=torch.long)
    chosen.view(-1)[:region_size] = 1  # D = the first region_size pixels
    rejected = torch.zeros_like(chosen)
    logratio, region = mask_logratio(logits, chosen, rejected)
    loss, _ = preference_loss(logratio, torch.zeros(1, dtype=torch.float64), region, beta=beta, normalize=normalize)
    loss.backward()
    return logits.grad.abs().sum().item()


@pytest.mark.parametrize("beta", [0.1, 1.0, 5.0])
def test_region_normalised_gradient_is_bounded_by_beta(beta):
    for size in (1, 10, 100, 1000, 4096):
        assert _one_pair_grad_l1(size, "region", beta) <= beta * (1 + 1e-12)


def test_unnormalised_gradient_grows_linearly_with_region():
    beta = 1e-4  # keep βh near 0 so σ(−βh) ≈ 1/2 and the growth is visibly linear
    sizes = [10, 100, 1000]
    norms = [_one_pair_grad_l1(s, "none", beta) for s in sizes]
    for size, norm in zip(sizes, norms):
        assert norm == pytest.approx(beta * size * 0.5, rel=0.05)
    assert norms[2] / norms[0] == pytest.approx(100, rel=0.1)
    # and RN is flat across the same sizes
    rn = [_one_pair_grad_l1(s, "region", 1.0) for s in sizes]
    assert max(rn) / min(rn) < 1.5


# --- validation ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(chosen=torch.zeros(2, 4, 5, dtype=torch.long)), "chosen has shape"),
        (dict(chosen=torch.zeros(2, 4, 4)), "integer"),
        (dict(rejected=torch.full((2, 4, 4), 2)), r"rejected holds labels in \[2, 2\], expected binary"),
        (dict(logits=torch.zeros(2, 3, 4, 4), chosen=torch.full((2, 4, 4), 3)), r"labels in \[0, 2\]"),
        (dict(chosen=torch.full((2, 4, 4), -1)), "chosen holds labels"),
        (dict(logits=torch.zeros(2, 1, 4, 4, dtype=torch.long)), "floating-point"),
        (dict(logits=torch.zeros(2, 4)), "at least one spatial dim"),
    ],
)
def test_mask_logratio_rejects_bad_input(kwargs, match):
    args = dict(logits=torch.zeros(2, 1, 4, 4), chosen=torch.zeros(2, 4, 4, dtype=torch.long),
                rejected=torch.zeros(2, 4, 4, dtype=torch.long))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        mask_logratio(args["logits"], args["chosen"], args["rejected"])


def test_bool_masks_are_accepted():
    logits = torch.randn(1, 1, 3, 3)
    chosen = torch.rand(1, 3, 3) > 0.5
    logratio, _ = mask_logratio(logits, chosen, ~chosen)
    assert logratio.item() == pytest.approx((logits[0, 0] * (chosen[0].float() * 2 - 1)).sum().item(), rel=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(beta=0.0), "beta must be > 0"),
        (dict(beta=-1.0), "beta must be > 0"),
        (dict(label_smoothing=0.5), "label_smoothing"),
        (dict(label_smoothing=-0.1), "label_smoothing"),
        (dict(loss_type="kto"), "loss_type must be one of"),
        (dict(normalize="mean"), "normalize must be one of"),
    ],
)
def test_preference_loss_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        preference_loss(torch.zeros(3), torch.zeros(3), torch.ones(3, dtype=torch.long), **kwargs)


def test_preference_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        preference_loss(torch.zeros(3), torch.zeros(2), torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(P,\)"):
        preference_loss(torch.zeros(3, 1), torch.zeros(3, 1), torch.ones(3, 1))


@pytest.mark.parametrize("channels", [1, 4])
def test_image_index_scores_many_pairs_from_one_forward(channels):
    """P pairs over B images: same values and gradients as copying each pair's logits row."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, channels, 7, 5, generator=gen, dtype=torch.float64)
    image_index = torch.tensor([0, 0, 2, 1, 2, 2])
    high = 2 if channels == 1 else channels
    chosen = torch.randint(0, high, (6, 7, 5), generator=gen)
    rejected = torch.randint(0, high, (6, 7, 5), generator=gen)

    shared = logits.clone().requires_grad_(True)
    logratio, region = mask_logratio(shared, chosen, rejected, image_index=image_index)
    chosen_logp, rejected_logp, _ = mask_logps(shared, chosen, rejected, image_index=image_index)
    copied = logits.clone().requires_grad_(True)
    expected = brute_force_logp(copied[image_index], chosen) - brute_force_logp(copied[image_index], rejected)
    torch.testing.assert_close(logratio, expected)
    torch.testing.assert_close(chosen_logp - rejected_logp, expected)
    assert region.shape == (6,)
    logratio.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(shared.grad, copied.grad)

    with pytest.raises(ValueError, match="image_index must index"):
        mask_logratio(logits, chosen, rejected, image_index=torch.tensor([0, 0, 3, 1, 2, 2]))
    with pytest.raises(ValueError, match="chosen has shape"):
        mask_logratio(logits, chosen[:4], rejected[:4], image_index=image_index)
