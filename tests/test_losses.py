"""Numerical tests of the loss components.

Expected numbers are derived by hand from each paper's equation and evaluated with the
``math`` module on plain Python floats (the derivation is in the comments), so they do not
share any code path with the torch implementations under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from torchtune_prefopt.losses import (
    DPOLoss,
    HingeLoss,
    IPOLoss,
    KTOLoss,
    PreferenceLoss,
    RobustDPOLoss,
    SimPOLoss,
)


def log_sigmoid(x: float) -> float:
    # log σ(x) = -log(1 + e^{-x}), written in the overflow-safe form for either sign.
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def t(*values, dtype=torch.float64, requires_grad=False):
    return torch.tensor(values, dtype=dtype, requires_grad=requires_grad)


# One shared pair batch (summed log-probs), used by the reference-based pairwise losses.
#   example 0: π_c=-10, π_r=-12, ref_c=-11, ref_r=-11.5
#              chosen log-ratio  = -10 - (-11)   =  1.0
#              rejected log-ratio = -12 - (-11.5) = -0.5
#              h = 1.0 - (-0.5) = 1.5
#   example 1: π_c=-20, π_r=-18, ref_c=-19, ref_r=-18.5
#              chosen log-ratio  = -20 - (-19)   = -1.0
#              rejected log-ratio = -18 - (-18.5) =  0.5
#              h = -1.0 - 0.5 = -1.5
POLICY_CHOSEN = (-10.0, -20.0)
POLICY_REJECTED = (-12.0, -18.0)
REF_CHOSEN = (-11.0, -19.0)
REF_REJECTED = (-11.5, -18.5)
CHOSEN_LOGRATIO = (1.0, -1.0)
REJECTED_LOGRATIO = (-0.5, 0.5)
H = (1.5, -1.5)


def pair_batch(requires_grad=False):
    return (
        t(*POLICY_CHOSEN, requires_grad=requires_grad),
        t(*POLICY_REJECTED, requires_grad=requires_grad),
        t(*REF_CHOSEN, requires_grad=requires_grad),
        t(*REF_REJECTED, requires_grad=requires_grad),
    )


def assert_close(actual: torch.Tensor, expected, rtol=1e-12, atol=1e-12):
    torch.testing.assert_close(
        actual, torch.tensor(expected, dtype=actual.dtype), rtol=rtol, atol=atol
    )


# --------------------------------------------------------------------------- attributes
@pytest.mark.parametrize(
    "loss, reference_free, average_logps, paired",
    [
        (DPOLoss(), False, False, True),
        (RobustDPOLoss(), False, False, True),
        (IPOLoss(), False, True, True),
        (IPOLoss(average_logps=False), False, False, True),
        (SimPOLoss(), True, True, True),
        (HingeLoss(), False, False, True),
        (KTOLoss(), False, False, False),
    ],
)
def test_declared_attributes(loss, reference_free, average_logps, paired):
    assert isinstance(loss, PreferenceLoss)
    assert loss.reference_free is reference_free
    assert loss.average_logps is average_logps
    assert loss.paired is paired


def test_ipo_average_logps_is_per_instance():
    assert IPOLoss(average_logps=False).average_logps is False
    assert IPOLoss().average_logps is True
    assert IPOLoss.average_logps is True  # the class default is untouched


def test_defaults():
    assert (DPOLoss().beta, DPOLoss().label_smoothing) == (0.1, 0.0)
    assert IPOLoss().tau == 0.1
    s = SimPOLoss()
    assert (s.beta, s.gamma, s.label_smoothing) == (2.0, 1.0, 0.0)
    k = KTOLoss()
    assert (k.beta, k.desirable_weight, k.undesirable_weight) == (0.1, 1.0, 1.0)
    assert repr(DPOLoss(beta=0.2)) == "DPOLoss(beta=0.2, label_smoothing=0.0, sft_weight=0.0)"


# --------------------------------------------------------------------------------- DPO
def test_dpo_hand_values():
    # β = 0.1, ε = 0:  ℓ = -log σ(β h)
    #   ex 0: β h =  0.15 -> ℓ = log(1 + e^{-0.15}) ≈ 0.62096
    #   ex 1: β h = -0.15 -> ℓ = log(1 + e^{+0.15}) ≈ 0.77096
    # rewards: β · (π - ref)  -> chosen (0.1, -0.1), rejected (-0.05, 0.05)
    losses, chosen_r, rejected_r = DPOLoss(beta=0.1)(*pair_batch())
    assert_close(losses, [math.log1p(math.exp(-0.15)), math.log1p(math.exp(0.15))])
    assert_close(chosen_r, [0.1 * 1.0, 0.1 * -1.0])
    assert_close(rejected_r, [0.1 * -0.5, 0.1 * 0.5])
    assert losses.shape == (2,)


def test_dpo_label_smoothing_hand_values():
    # cDPO, β = 0.1, ε = 0.2:  ℓ = -(1-ε) log σ(βh) - ε log σ(-βh)
    #   ex 0 (βh = 0.15):  0.8·log(1+e^{-0.15}) + 0.2·log(1+e^{0.15})
    #   ex 1 (βh = -0.15): 0.8·log(1+e^{0.15})  + 0.2·log(1+e^{-0.15})
    a, b = math.log1p(math.exp(-0.15)), math.log1p(math.exp(0.15))
    losses, _, _ = DPOLoss(beta=0.1, label_smoothing=0.2)(*pair_batch())
    assert_close(losses, [0.8 * a + 0.2 * b, 0.8 * b + 0.2 * a])
    # At h = 0 the smoothed loss is log 2 for every ε ((1-ε)+ε = 1 times log 2).
    zero = t(0.0)
    for eps in (0.0, 0.1, 0.4):
        assert_close(DPOLoss(label_smoothing=eps)(zero, zero, zero, zero)[0], [math.log(2)])


def test_dpo_gradient_hand_value():
    # d/dπ_c [-log σ(β h)] = -β·σ(-β h)  (since d/dx log σ(x) = σ(-x), dh/dπ_c = 1)
    # d/dπ_r = +β·σ(-β h), d/dref_c = +β·σ(-β h), d/dref_r = -β·σ(-β h)
    pc, pr, rc, rr = pair_batch(requires_grad=True)
    losses, _, _ = DPOLoss(beta=0.1)(pc, pr, rc, rr)
    losses.sum().backward()
    g = [0.1 * sigmoid(-0.1 * h) for h in H]
    assert_close(pc.grad, [-x for x in g])
    assert_close(pr.grad, g)
    assert_close(rc.grad, g)
    assert_close(rr.grad, [-x for x in g])


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_dpo_matches_torchtune(label_smoothing):
    # torchtune 0.6.1's DPOLoss is an independent implementation of the same equation.
    from torchtune.rlhf.loss import DPOLoss as TorchtuneDPOLoss

    gen = torch.Generator().manual_seed(0)
    inputs = [-50 * torch.rand(16, generator=gen) for _ in range(4)]
    ours = DPOLoss(beta=0.3, label_smoothing=label_smoothing)(*inputs)
    theirs = TorchtuneDPOLoss(beta=0.3, label_smoothing=label_smoothing)(*inputs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


def test_dpo_requires_reference():
    pc, pr, rc, _ = pair_batch()
    with pytest.raises(ValueError, match="reference_rejected_logps"):
        DPOLoss()(pc, pr, rc, None)
    with pytest.raises(ValueError, match="reference_chosen_logps, reference_rejected_logps"):
        DPOLoss()(pc, pr)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes must match"):
        DPOLoss()(t(1.0, 2.0), t(1.0), t(1.0, 2.0), t(1.0, 2.0))
    with pytest.raises(ValueError, match="1-D"):
        DPOLoss()(*(torch.zeros(2, 3) for _ in range(4)))


# -------------------------------------------------------------------------- robust DPO
def test_robust_dpo_hand_values():
    # rDPO, β = 0.1, ε = 0.2:  ℓ = [-(1-ε) log σ(βh) + ε log σ(-βh)] / (1 - 2ε)
    #   ex 0 (βh = 0.15):  [0.8·log(1+e^{-0.15}) - 0.2·log(1+e^{0.15})] / 0.6
    a, b = math.log1p(math.exp(-0.15)), math.log1p(math.exp(0.15))
    losses, chosen_r, rejected_r = RobustDPOLoss(beta=0.1, label_smoothing=0.2)(*pair_batch())
    assert_close(losses, [(0.8 * a - 0.2 * b) / 0.6, (0.8 * b - 0.2 * a) / 0.6])
    assert_close(chosen_r, [0.1, -0.1])
    assert_close(rejected_r, [-0.05, 0.05])
    # ε = 0 is plain DPO.
    torch.testing.assert_close(
        RobustDPOLoss(beta=0.1)(*pair_batch())[0], DPOLoss(beta=0.1)(*pair_batch())[0]
    )


def test_robust_dpo_is_unbiased_under_label_flips():
    # Chowdhury et al.'s defining property: if the label is flipped with probability ε, the
    # expected rDPO loss equals the clean DPO loss:
    #   (1-ε)·ℓ_ε(h) + ε·ℓ_ε(-h) = -log σ(βh)
    # (Expand: [((1-ε)² - ε²)·A + (ε(1-ε) - ε(1-ε))·B]/(1-2ε) = A with A = -log σ(βh).)
    loss = RobustDPOLoss(beta=0.5, label_smoothing=0.3)
    h = torch.linspace(-6, 6, 25, dtype=torch.float64)
    zeros = torch.zeros_like(h)
    forward = loss(h, zeros, zeros, zeros)[0]
    flipped = loss(zeros, h, zeros, zeros)[0]  # chosen/rejected swapped: margin -h
    expected = [-log_sigmoid(0.5 * x) for x in h.tolist()]
    assert_close(0.7 * forward + 0.3 * flipped, expected, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------- IPO
def test_ipo_hand_values():
    # τ = 0.25: target 1/(2τ) = 2.
    #   ex 0: h =  1.5 -> (1.5 - 2)² = 0.25
    #   ex 1: h = -1.5 -> (-1.5 - 2)² = 12.25
    # rewards τ·(π - ref): chosen (0.25, -0.25), rejected (-0.125, 0.125)
    for average_logps in (True, False):
        losses, chosen_r, rejected_r = IPOLoss(tau=0.25, average_logps=average_logps)(*pair_batch())
        assert_close(losses, [0.25, 12.25])
        assert_close(chosen_r, [0.25, -0.25])
        assert_close(rejected_r, [-0.125, 0.125])


@pytest.mark.parametrize("average_logps", [True, False])
@pytest.mark.parametrize("tau", [0.05, 0.1, 1.0])
def test_ipo_optimum_is_half_inverse_tau(tau, average_logps):
    # ∂ℓ/∂h = 2 (h - 1/(2τ)) vanishes exactly at h* = 1/(2τ), where ℓ = 0; on either side
    # the gradient pushes h back toward h* (IPO's bounded target, unlike DPO).
    loss = IPOLoss(tau=tau, average_logps=average_logps)
    target = 1.0 / (2.0 * tau)
    for h, sign in ((target, 0), (target - 0.5, -1), (target + 0.5, 1)):
        pc = t(h, requires_grad=True)
        zero = t(0.0)
        value = loss(pc, zero, zero, zero)[0]
        value.sum().backward()
        assert_close(value, [(h - target) ** 2])
        assert_close(pc.grad, [2.0 * (h - target)])
        if sign == 0:
            assert value.item() == 0.0 and pc.grad.item() == 0.0
        else:
            assert math.copysign(1.0, pc.grad.item()) == sign


def test_ipo_requires_reference():
    pc, pr, _, _ = pair_batch()
    with pytest.raises(ValueError, match="needs reference log-probs"):
        IPOLoss()(pc, pr)


# ------------------------------------------------------------------------------- SimPO
def test_simpo_hand_values():
    # β = 2, γ = 1 on per-token mean log-probs:  z = β·avg_c - β·avg_r - γ,  ℓ = -log σ(z)
    #   ex 0: avg_c = -1.0, avg_r = -1.5 -> z = -2 + 3 - 1 = 0 -> ℓ = log 2
    #   ex 1: avg_c = -0.5, avg_r = -2.0 -> z = -1 + 4 - 1 = 2 -> ℓ = log(1 + e^{-2})
    # rewards β·avg: chosen (-2, -1), rejected (-3, -4)
    losses, chosen_r, rejected_r = SimPOLoss(beta=2.0, gamma=1.0)(t(-1.0, -0.5), t(-1.5, -2.0))
    assert_close(losses, [math.log(2.0), math.log1p(math.exp(-2.0))])
    assert_close(chosen_r, [-2.0, -1.0])
    assert_close(rejected_r, [-3.0, -4.0])


def test_simpo_label_smoothing_hand_value():
    # ε = 0.1, z = 2 (ex 1 above): 0.9·log(1+e^{-2}) + 0.1·log(1+e^{2})
    losses, _, _ = SimPOLoss(beta=2.0, gamma=1.0, label_smoothing=0.1)(t(-0.5), t(-2.0))
    assert_close(losses, [0.9 * math.log1p(math.exp(-2.0)) + 0.1 * math.log1p(math.exp(2.0))])


@pytest.mark.parametrize("beta, gamma", [(2.0, 1.0), (2.5, 0.3), (10.0, 5.0), (1.0, 0.0)])
def test_simpo_gamma_is_absolute_margin(beta, gamma):
    # γ is the paper's absolute margin: at β·(avg_c - avg_r) = γ, z = 0 and ℓ = log 2
    # (the authors' code's gamma_beta_ratio = γ/β would put it at β·Δ = γ·β instead).
    avg_r = t(-1.25)
    avg_c = avg_r + gamma / beta
    losses, chosen_r, rejected_r = SimPOLoss(beta=beta, gamma=gamma)(avg_c, avg_r)
    assert_close(losses, [math.log(2.0)], rtol=1e-12, atol=1e-12)
    assert_close(chosen_r - rejected_r, [gamma])


def test_simpo_is_reference_free():
    pc, pr = t(-1.0, -0.5), t(-1.5, -2.0)
    no_ref = SimPOLoss()(pc, pr)
    none_ref = SimPOLoss()(pc, pr, None, None)
    # Garbage references (even a different shape) are ignored, not used.
    with_ref = SimPOLoss()(pc, pr, t(100.0), t(-100.0))
    for a, b, c in zip(no_ref, none_ref, with_ref):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)


# ----------------------------------------------------------------------------- hinge
def test_hinge_hand_values():
    # β = 0.5: ℓ = max(0, 1 - β h)
    #   ex 0: h =  1.5 -> 1 - 0.75 = 0.25
    #   ex 1: h = -1.5 -> 1 + 0.75 = 1.75
    #   (h = 3 -> 1 - 1.5 < 0 -> 0)
    losses, chosen_r, rejected_r = HingeLoss(beta=0.5)(*pair_batch())
    assert_close(losses, [0.25, 1.75])
    assert_close(chosen_r, [0.5, -0.5])
    assert_close(rejected_r, [-0.25, 0.25])
    zero = t(0.0)
    assert_close(HingeLoss(beta=0.5)(t(3.0), zero, zero, zero)[0], [0.0])


def test_hinge_matches_torchtune_rso():
    from torchtune.rlhf.loss import RSOLoss

    gen = torch.Generator().manual_seed(1)
    inputs = [-20 * torch.rand(32, generator=gen) for _ in range(4)]
    for a, b in zip(HingeLoss(beta=0.2)(*inputs), RSOLoss(gamma=0.2)(*inputs)):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------- KTO
def kto_batch(requires_grad=False):
    # r = π - ref = (-5+6, -6+5, -4+4.5) = (1, -1, 0.5); labels (D, U, D)
    # KL pairs: π_kl - ref_kl = (0.5, 0.2, 0.7) -> mean = 1.4/3, positive so z0 = 1.4/3
    return dict(
        policy_logps=t(-5.0, -6.0, -4.0, requires_grad=requires_grad),
        reference_logps=t(-6.0, -5.0, -4.5, requires_grad=requires_grad),
        is_desirable=torch.tensor([True, False, True]),
        policy_kl_logps=t(-7.0, -8.0, -9.0, requires_grad=requires_grad),
        reference_kl_logps=t(-7.5, -8.2, -9.7, requires_grad=requires_grad),
    )


def test_kto_hand_values():
    # β = 0.5, λ_D = 2, λ_U = 0.5, z0 = (0.5 + 0.2 + 0.7)/3 = 1.4/3
    #   ex 0 (D, r = 1):    2   · (1 - σ(0.5·(1 - z0)))
    #   ex 1 (U, r = -1):   0.5 · (1 - σ(0.5·(z0 + 1)))
    #   ex 2 (D, r = 0.5):  2   · (1 - σ(0.5·(0.5 - z0)))
    # rewards β·r = (0.5, -0.5, 0.25); kl = z0
    z0 = 1.4 / 3
    losses, rewards, kl = KTOLoss(beta=0.5, desirable_weight=2.0, undesirable_weight=0.5)(
        **kto_batch()
    )
    assert_close(
        losses,
        [
            2.0 * (1 - sigmoid(0.5 * (1.0 - z0))),
            0.5 * (1 - sigmoid(0.5 * (z0 + 1.0))),
            2.0 * (1 - sigmoid(0.5 * (0.5 - z0))),
        ],
    )
    assert_close(rewards, [0.5, -0.5, 0.25])
    assert kl.shape == ()
    assert_close(kl, z0)
    assert not rewards.requires_grad and not kl.requires_grad


def test_kto_z0_clamped_at_zero():
    # KL diffs (-1, -2, 0.5): mean = -2.5/3 < 0 -> z0 = max(0, ·) = 0
    #   ex 0 (D, r = 1):  1 - σ(0.1·1) ; ex 1 (U, r = -1): 1 - σ(0.1·(0 + 1))
    batch = kto_batch()
    batch["policy_kl_logps"] = t(-8.0, -9.0, -4.0)
    batch["reference_kl_logps"] = t(-7.0, -7.0, -4.5)
    losses, _, kl = KTOLoss(beta=0.1)(**batch)
    assert kl.item() == 0.0
    assert_close(losses, [1 - sigmoid(0.1), 1 - sigmoid(0.1), 1 - sigmoid(0.1 * 0.5)])


def test_kto_z0_is_detached():
    batch = kto_batch(requires_grad=True)
    losses, rewards, kl = KTOLoss(beta=0.5)(**batch)
    losses.sum().backward()
    # No gradient flows into the KL inputs ...
    assert batch["policy_kl_logps"].grad is None
    assert batch["reference_kl_logps"].grad is None
    # ... while the policy gets the analytic one: desirable d/dr λ_D(1-σ(β(r-z0)))
    # = -λ_D β σ'(β(r-z0)), undesirable d/dr λ_U(1-σ(β(z0-r))) = +λ_U β σ'(β(z0-r)),
    # with σ'(x) = σ(x)(1-σ(x)).
    z0 = 1.4 / 3
    dsig = lambda x: sigmoid(x) * (1 - sigmoid(x))  # noqa: E731
    expected = [
        -0.5 * dsig(0.5 * (1.0 - z0)),
        0.5 * dsig(0.5 * (z0 + 1.0)),
        -0.5 * dsig(0.5 * (0.5 - z0)),
    ]
    assert_close(batch["policy_logps"].grad, expected)
    assert_close(batch["reference_logps"].grad, [-g for g in expected])


def test_kto_empty_kl_and_int_labels():
    batch = kto_batch()
    batch["policy_kl_logps"] = t()
    batch["reference_kl_logps"] = t()
    batch["is_desirable"] = torch.tensor([1, 0, 1])
    losses, _, kl = KTOLoss(beta=0.1)(**batch)
    assert kl.item() == 0.0
    assert_close(losses, [1 - sigmoid(0.1), 1 - sigmoid(0.1), 1 - sigmoid(0.05)])
    batch["is_desirable"] = torch.tensor([1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="is_desirable must be a bool"):
        KTOLoss()(**batch)


def test_kto_requires_reference_and_matching_shapes():
    batch = kto_batch()
    with pytest.raises(ValueError, match="not reference-free"):
        KTOLoss()(**{**batch, "reference_logps": None})
    with pytest.raises(ValueError, match="shapes must match"):
        KTOLoss()(**{**batch, "is_desirable": torch.tensor([True, False])})


def test_kto_keeps_dtype():
    batch = {k: (v.float() if v.is_floating_point() else v) for k, v in kto_batch().items()}
    losses, rewards, kl = KTOLoss()(**batch)
    assert losses.dtype == rewards.dtype == kl.dtype == torch.float32


# ------------------------------------------------------------------------- gradcheck
PAIRWISE = [
    DPOLoss(beta=0.1),
    DPOLoss(beta=0.5, label_smoothing=0.2),
    RobustDPOLoss(beta=0.3, label_smoothing=0.25),
    IPOLoss(tau=0.1),
    IPOLoss(tau=0.5, average_logps=False),
    SimPOLoss(beta=2.0, gamma=1.0),
    SimPOLoss(beta=2.5, gamma=0.5, label_smoothing=0.1),
    HingeLoss(beta=0.05),
]


@pytest.mark.parametrize("loss", PAIRWISE, ids=repr)
def test_pairwise_gradcheck(loss):
    gen = torch.Generator().manual_seed(123)
    # Log-probs in [-5, 0], so |h| ≤ 10; for the hinge (β = 0.05) that keeps
    # 1 - βh ∈ [0.5, 1.5], well away from its kink at 0.
    inputs = tuple(
        (-5 * torch.rand(6, generator=gen, dtype=torch.float64)).requires_grad_() for _ in range(4)
    )
    if loss.reference_free:
        # Only the policy inputs reach the loss.
        assert torch.autograd.gradcheck(lambda a, b: loss(a, b)[0], inputs[:2])
    else:
        assert torch.autograd.gradcheck(lambda *x: loss(*x)[0], inputs)


def test_kto_gradcheck():
    gen = torch.Generator().manual_seed(7)
    policy = (-5 * torch.rand(6, generator=gen, dtype=torch.float64)).requires_grad_()
    reference = (-5 * torch.rand(6, generator=gen, dtype=torch.float64)).requires_grad_()
    is_desirable = torch.tensor([True, False, True, True, False, False])
    kl_policy = -5 * torch.rand(6, generator=gen, dtype=torch.float64)
    kl_reference = kl_policy - 0.3  # mean KL 0.3 > 0: the clamp is inactive
    loss = KTOLoss(beta=0.7, desirable_weight=1.3, undesirable_weight=0.8)
    assert torch.autograd.gradcheck(
        lambda p, r: loss(p, r, is_desirable, kl_policy, kl_reference)[0], (policy, reference)
    )


# --------------------------------------------------------------- rewards are detached
@pytest.mark.parametrize("loss", PAIRWISE, ids=repr)
def test_pairwise_rewards_are_detached_scaled_logratios(loss):
    pc, pr, rc, rr = pair_batch(requires_grad=True)
    _, chosen_r, rejected_r = loss(pc, pr, rc, rr)
    assert not chosen_r.requires_grad and not rejected_r.requires_grad
    scale = loss.tau if isinstance(loss, IPOLoss) else loss.beta
    if loss.reference_free:
        # SimPO: β · (per-token mean) log-prob, no reference.
        assert_close(chosen_r, [scale * x for x in POLICY_CHOSEN])
        assert_close(rejected_r, [scale * x for x in POLICY_REJECTED])
    else:
        assert_close(chosen_r, [scale * x for x in CHOSEN_LOGRATIO])
        assert_close(rejected_r, [scale * x for x in REJECTED_LOGRATIO])


# ------------------------------------------------------------------- hyper-parameters
@pytest.mark.parametrize(
    "factory, message",
    [
        (lambda: DPOLoss(beta=-1.0), "loss.beta must be > 0, got -1.0"),
        (lambda: DPOLoss(beta=0), "loss.beta must be > 0, got 0.0"),
        (lambda: DPOLoss(label_smoothing=0.5), "loss.label_smoothing must be in [0, 0.5), got 0.5"),
        (lambda: DPOLoss(label_smoothing=-0.1), "loss.label_smoothing must be in [0, 0.5)"),
        (lambda: RobustDPOLoss(label_smoothing=0.5), "loss.label_smoothing must be in [0, 0.5)"),
        (lambda: IPOLoss(tau=0.0), "loss.tau must be > 0, got 0.0"),
        (lambda: IPOLoss(average_logps="yes"), "loss.average_logps must be true or false"),
        (lambda: SimPOLoss(gamma=-0.5), "loss.gamma must be >= 0, got -0.5"),
        (lambda: SimPOLoss(beta=-2.0), "loss.beta must be > 0, got -2.0"),
        (lambda: SimPOLoss(label_smoothing=0.7), "loss.label_smoothing must be in [0, 0.5)"),
        (lambda: HingeLoss(beta=0.0), "loss.beta must be > 0"),
        (lambda: KTOLoss(desirable_weight=0.0), "loss.desirable_weight must be > 0, got 0.0"),
        (lambda: KTOLoss(undesirable_weight=-1), "loss.undesirable_weight must be > 0, got -1.0"),
        (lambda: KTOLoss(beta=float("nan")), "loss.beta must be finite, got nan"),
        (lambda: DPOLoss(beta="0.1"), "loss.beta must be a number, got '0.1'"),
        (lambda: DPOLoss(beta=True), "loss.beta must be a number, got True"),
    ],
)
def test_hyperparameter_validation(factory, message):
    with pytest.raises(ValueError) as info:
        factory()
    assert str(info.value).startswith(message), str(info.value)


def test_integer_hyperparameters_become_floats():
    assert SimPOLoss(beta=2, gamma=0).beta == 2.0
    assert isinstance(SimPOLoss(beta=2, gamma=0).gamma, float)
