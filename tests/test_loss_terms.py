"""The SFT term, weighted sums, length-normalised DPO, DPO-Positive, APO-zero and ORPO against
hand-derived float64 values (plain ``math`` on Python floats, not the library's code) and
float64 ``gradcheck``, including the extremes (ORPO's odds with log-probs near 0, a row
without tokens in the SFT term)."""

from __future__ import annotations

import math

import pytest
import torch

from torchtune_prefopt.errors import PrefOptUserError
from torchtune_prefopt.losses import (
    APOZeroLoss,
    DPOLoss,
    DPONormLoss,
    DPOPLoss,
    ORPOLoss,
    SFTLoss,
    WeightedSum,
    build_loss,
    chosen_nll,
    pair_rewards,
)
from torchtune_prefopt.losses.orpo import log1mexp
from torchtune_prefopt.modules import SequenceLogProbs

# three pairs: summed log-probs and token counts (chosen / rejected, policy / reference)
PC, PR = [-12.0, -20.5, -7.25], [-15.0, -18.0, -9.5]
RC, RR = [-13.0, -19.0, -8.0], [-14.0, -18.5, -9.0]
NC, NR = [4, 10, 3], [5, 6, 2]


def seq(sums, counts, dtype=torch.float64, grad=False):
    s = torch.tensor(sums, dtype=dtype, requires_grad=grad)
    n = torch.tensor(counts, dtype=torch.int64)
    return SequenceLogProbs(sum=s, mean=s / n, num_tokens=n)


def logsig(x):
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def inputs(grad=False):
    return seq(PC, NC, grad=grad), seq(PR, NR, grad=grad), seq(RC, NC), seq(RR, NR)


# ----------------------------------------------------------------------------- hand values
def test_sft_term_is_the_global_token_mean_nll():
    pc = seq(PC, NC)
    tokens = sum(NC)
    # averaged over the pairs it is the token-mean NLL of all chosen tokens
    assert chosen_nll(pc).mean().item() == pytest.approx(-sum(PC) / tokens, rel=1e-15)
    # given the step's global mean (here: these 3 pairs plus 3 others with 20 tokens), each
    # row is -sum / T̄ and the rows of this micro-batch are a share of the global mean
    t_bar = (tokens + 20) / 6
    assert chosen_nll(pc, t_bar).tolist() == pytest.approx([-x / t_bar for x in PC], rel=1e-15)
    # a row without tokens contributes nothing
    empty = SequenceLogProbs(
        sum=torch.tensor([0.0, -6.0], dtype=torch.float64),
        mean=torch.tensor([0.0, -2.0], dtype=torch.float64),
        num_tokens=torch.tensor([0, 3]),
    )
    assert chosen_nll(empty, 1.5).tolist() == [0.0, 4.0]
    with pytest.raises(ValueError, match="token counts"):
        chosen_nll(torch.tensor(PC))


def test_sft_weight_on_every_paired_loss_adds_the_term():
    pc, pr, rc, rr = inputs()
    for cls, kw in ((DPOLoss, {}), (DPONormLoss, {}), (DPOPLoss, {}), (APOZeroLoss, {})):
        base = cls(**kw)(pc, pr, rc, rr)[0]
        with_sft = cls(**kw, sft_weight=0.3)(pc, pr, rc, rr, chosen_tokens_per_pair=5.0)[0]
        expected = [b - 0.3 * x / 5.0 for b, x in zip(base.tolist(), PC)]
        assert with_sft.tolist() == pytest.approx(expected, rel=1e-13), cls.__name__
    simpo = build_loss({"_component_": "simpo", "beta": 2.0, "gamma": 0.5, "sft_weight": 1.0})
    got = simpo(pc, pr, None, None)[0]
    tb = sum(NC) / 3
    for i in range(3):  # CPO-SimPO: SimPO + NLL (reference-free)
        z = 2.0 * (PC[i] / NC[i] - PR[i] / NR[i]) - 0.5
        assert got[i].item() == pytest.approx(-logsig(z) - PC[i] / tb, rel=1e-13)
    with pytest.raises(PrefOptUserError, match="loss.sft_weight must be >= 0"):
        DPOLoss(sft_weight=-1.0)


def test_dpo_norm_is_dpo_on_mean_log_ratios():
    pc, pr, rc, rr = inputs()
    loss, cr, _ = DPONormLoss(beta=5.0)(pc, pr, rc, rr)
    for i in range(3):
        h = (PC[i] - RC[i]) / NC[i] - (PR[i] - RR[i]) / NR[i]
        assert loss[i].item() == pytest.approx(-logsig(5.0 * h), rel=1e-13)
        assert cr[i].item() == pytest.approx(5.0 * (PC[i] - RC[i]) / NC[i], rel=1e-13)
    assert DPONormLoss().beta == 5.0 and DPONormLoss.average_logps


def test_dpop_penalises_a_falling_chosen_likelihood():
    pc, pr, rc, rr = inputs()
    loss = DPOPLoss(beta=0.1, lambda_=50.0)(pc, pr, rc, rr)[0]
    for i in range(3):
        rw, rl = PC[i] - RC[i], PR[i] - RR[i]
        penalty = max(0.0, RC[i] - PC[i])
        assert loss[i].item() == pytest.approx(-logsig(0.1 * (rw - rl - 50.0 * penalty)), rel=1e-13)
    # pair 1 has log pi(y_w) < log pi_ref(y_w): the penalty is on; with lambda 0 it is DPO
    assert RC[1] > PC[1]
    dpo = DPOLoss(beta=0.1)(pc, pr, rc, rr)[0]
    assert DPOPLoss(lambda_=0.0)(pc, pr, rc, rr)[0].tolist() == pytest.approx(
        dpo.tolist(), rel=1e-15
    )
    assert loss[1].item() > dpo[1].item() + 1.0


def test_apo_zero():
    pc, pr, rc, rr = inputs()
    loss = APOZeroLoss(beta=0.2)(pc, pr, rc, rr)[0]
    for i in range(3):
        rw, rl = PC[i] - RC[i], PR[i] - RR[i]
        assert loss[i].item() == pytest.approx(1 - sig(0.2 * rw) + sig(0.2 * rl), rel=1e-13)


def test_orpo_odds_ratio_and_nll():
    pc, pr, _, _ = inputs()
    loss, cr, rr_ = ORPOLoss(lambda_=0.25)(pc, pr, None, None)
    tb = sum(NC) / 3
    for i in range(3):
        mw, ml = PC[i] / NC[i], PR[i] / NR[i]
        log_or = (mw - ml) - (math.log(1 - math.exp(mw)) - math.log(1 - math.exp(ml)))
        expected = -PC[i] / tb - 0.25 * logsig(log_or)
        assert loss[i].item() == pytest.approx(expected, rel=1e-12)
        assert cr[i].item() == pytest.approx(0.25 * mw, rel=1e-13)
    assert ORPOLoss.reference_free and ORPOLoss().sft_weight == 1.0


def test_log1mexp_and_orpo_near_zero_log_probs():
    # against math's own expm1/log1p on Python floats, over the whole range
    for x in (-1e-12, -1e-8, -1e-4, -0.1, -0.6931, -0.6932, -1.0, -5.0, -30.0, -80.0):
        exact = math.log(-math.expm1(x))
        got = log1mexp(torch.tensor(x, dtype=torch.float64)).item()
        assert got == pytest.approx(exact, rel=1e-14), x
    # mean log-probs at 0 and just below (probability ~1): finite loss and gradients (guard)
    for dtype in (torch.float32, torch.float64):
        mw = torch.tensor([0.0, -1e-9, -1e-3], dtype=dtype, requires_grad=True)
        ml = torch.tensor([-0.5, -1e-7, -2.0], dtype=dtype, requires_grad=True)
        out = ORPOLoss().pair_losses(mw, ml)
        out.sum().backward()
        assert (
            torch.isfinite(out).all()
            and torch.isfinite(mw.grad).all()
            and torch.isfinite(ml.grad).all()
        )
    # the value is the paper's equation for every m < 0, however close to 0: a near-certain
    # rejected answer (m_l = -1e-9, -1e-20) is not clamped to a smaller odds ratio
    for m_w, m_l in ((-1e-3, -2.0), (-2.0, -1e-9), (-0.5, -1e-20)):
        lo = ORPOLoss.log_odds_ratio(
            torch.tensor([m_w], dtype=torch.float64), torch.tensor([m_l], dtype=torch.float64)
        )
        expected = (m_w - m_l) - (math.log(-math.expm1(m_w)) - math.log(-math.expm1(m_l)))
        assert lo.item() == pytest.approx(expected, rel=1e-13), (m_w, m_l)
    # and its gradient too (the old clamp at -1e-6 gave 0 there)
    ml = torch.tensor([-1e-9], dtype=torch.float64, requires_grad=True)
    ORPOLoss.log_odds_ratio(torch.tensor([-2.0], dtype=torch.float64), ml).sum().backward()
    assert ml.grad.item() == pytest.approx(-1 / -math.expm1(-1e-9), rel=1e-9)


def test_sft_alone_and_reward_definitions():
    pc, pr, _, _ = inputs()
    loss, cr, _ = SFTLoss(weight=2.0)(pc, pr)
    assert loss.mean().item() == pytest.approx(-2.0 * sum(PC) / sum(NC), rel=1e-14)
    assert cr.tolist() == pytest.approx([p / n for p, n in zip(PC, NC)])
    # rewards asked of the loss (the evaluation path) never include the SFT term
    c, r = pair_rewards(DPOLoss(beta=0.1, sft_weight=1.0), *inputs())
    assert c.tolist() == pytest.approx([0.1 * (p - q) for p, q in zip(PC, RC)], rel=1e-13)


# ----------------------------------------------------------------------------- weighted sums
def test_weighted_sum_equals_the_sum_of_its_terms():
    pc, pr, rc, rr = inputs()
    ws = WeightedSum(
        [
            {"loss": "dpo", "weight": 1.0, "beta": 0.1},
            {"loss": "dpo_norm", "weight": 0.5},  # mean log-probs next to dpo's sums
            {"loss": "sft", "weight": 0.2},
        ]
    )
    total, cr, _ = ws(pc, pr, rc, rr, chosen_tokens_per_pair=6.0)
    expected = (
        DPOLoss(beta=0.1)(pc, pr, rc, rr)[0]
        + 0.5 * DPONormLoss()(pc, pr, rc, rr)[0]
        + 0.2 * SFTLoss()(pc, pr, chosen_tokens_per_pair=6.0)[0]
    )
    assert total.tolist() == pytest.approx(expected.tolist(), rel=1e-14)
    assert set(ws.term_losses) == {"dpo", "dpo_norm", "sft"}
    assert ws.term_losses["sft"].tolist() == pytest.approx([-x / 6.0 for x in PC], rel=1e-14)
    assert cr.tolist() == pytest.approx([0.1 * (p - q) for p, q in zip(PC, RC)])  # dpo's rewards
    assert not ws.reference_free and ws.needs_step_token_mean and ws.paired


def test_weighted_sum_capabilities_and_errors():
    free = WeightedSum([{"loss": "simpo"}, {"loss": "orpo", "weight": 0.5}])
    assert free.reference_free and free.needs_step_token_mean  # ORPO's NLL
    assert not WeightedSum([{"loss": "dpo"}, {"loss": "ipo"}]).needs_step_token_mean
    assert not WeightedSum([{"loss": "simpo"}, {"loss": "dpo"}]).reference_free
    built = build_loss(
        {"_component_": "torchtune_prefopt.losses.WeightedSum", "terms": [{"loss": "dpo"}]}
    )
    assert isinstance(built, WeightedSum)
    for terms, msg in (
        ([], "non-empty list"),
        ([{"weight": 1.0}], r"loss.terms\[0\] must be a mapping with a 'loss' key"),
        ([{"loss": "kto"}], "not a paired loss"),
        ([{"loss": "dpo"}, {"loss": "dpo"}], "a term named 'dpo' exists already"),
        ([{"loss": "nope"}], r"loss.terms\[0\]: loss: unknown loss 'nope'"),
        ([{"loss": "dpo", "beta": -1}], r"loss.terms\[0\]: loss.beta must be > 0"),
        # a negative weight is refused as sft_weight < 0 is (it would reward the loss)
        (
            [{"loss": "dpo"}, {"loss": "sft", "weight": -0.2}],
            r"loss.terms\[1\].weight must be >= 0",
        ),
    ):
        with pytest.raises(PrefOptUserError, match=msg):
            WeightedSum(terms)
    two = WeightedSum(
        [{"loss": "dpo", "beta": 0.1}, {"loss": "dpo", "beta": 0.5, "name": "dpo_b05"}]
    )
    assert two.names == ["dpo", "dpo_b05"]


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize(
    "make",
    [
        lambda: DPOLoss(beta=0.3, sft_weight=0.7),
        lambda: DPONormLoss(beta=5.0, sft_weight=0.1),
        lambda: DPOPLoss(beta=0.2, lambda_=5.0),
        lambda: APOZeroLoss(beta=0.4, sft_weight=0.2),
        lambda: ORPOLoss(lambda_=0.3),
        lambda: SFTLoss(weight=1.5),
        lambda: WeightedSum(
            [{"loss": "dpo"}, {"loss": "orpo", "weight": 0.5}, {"loss": "sft", "weight": 0.1}]
        ),
    ],
    ids=["dpo+sft", "dpo_norm+sft", "dpop", "apo_zero+sft", "orpo", "sft", "weighted_sum"],
)
def test_gradcheck_float64(make):
    loss = make()
    ref_c, ref_r = seq(RC, NC), seq(RR, NR)
    nc, nr = torch.tensor(NC), torch.tensor(NR)

    def f(sc, sr):
        c = SequenceLogProbs(sum=sc, mean=sc / nc, num_tokens=nc)
        r = SequenceLogProbs(sum=sr, mean=sr / nr, num_tokens=nr)
        return loss(c, r, ref_c, ref_r, chosen_tokens_per_pair=4.5)[0]

    sc = torch.tensor(PC, dtype=torch.float64, requires_grad=True)
    sr = torch.tensor(PR, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (sc, sr), eps=1e-6, atol=1e-8)


def test_a_subclass_with_its_own_tensor_forward_keeps_getting_tensors():
    """A custom loss derived from DPOLoss that overrides ``forward`` (tensor maths, written
    before SequenceLogProbs inputs existed) gets tensors in its form; declaring
    ``sequence_logps = True`` itself opts in."""
    from torchtune_prefopt.losses import loss_inputs, takes_sequence_logps

    class Custom(DPOLoss):
        def forward(self, pc, pr, rc, rr):
            return super().forward(pc, pr, rc, rr)

    class OptedIn(Custom):
        sequence_logps = True

    pc, pr, _, _ = inputs()
    assert takes_sequence_logps(DPOLoss()) and not takes_sequence_logps(Custom())
    assert takes_sequence_logps(OptedIn())
    got = loss_inputs(Custom(), pc, pr)
    assert torch.equal(got[0], pc.sum) and torch.equal(got[1], pr.sum)
    assert loss_inputs(DPOLoss(), pc, pr) == (pc, pr)


def test_held_out_accuracy_does_not_count_float_noise():
    """A policy that differs from the reference only by float rounding scores 1/2 (a tie),
    not a win; a real margin counts. The rule: |r_w - r_l| <= s * 2^-20 * the |log-probs|."""
    from torchtune_prefopt.losses import pair_metrics
    from torchtune_prefopt.losses.rewards import ROUNDING
    from torchtune_prefopt.modules.sequence_logprobs import SequenceLogProbs

    def lp(sums):
        s = torch.tensor(sums, dtype=torch.float32)
        return SequenceLogProbs(s, s / 10, torch.full_like(s, 10, dtype=torch.long))

    ref = (lp([-120.0, -80.0]), lp([-121.0, -80.5]))
    noise = 3e-7  # about 2.5 fp32 ulps of the chosen sums: rounding, not learning
    moved = (lp([-120.0 * (1 - noise), -80.0 * (1 - noise)]), lp([-121.0, -80.5]))
    learned = (lp([-119.0, -79.0]), lp([-122.0, -81.5]))
    dpo = DPOLoss(beta=0.1)
    assert pair_metrics(dpo, moved, ref)["rewards/accuracies"].tolist() == [0.5, 0.5]
    assert pair_metrics(dpo, learned, ref)["rewards/accuracies"].tolist() == [1.0, 1.0]
    # the exact-tie rule alone would have called the rounding a win
    c = 0.1 * (moved[0].sum.double() - ref[0].sum.double())
    assert (c > 0).all() and (c.abs() <= 0.1 * ROUNDING * (120 + 121 + 120 + 121)).all()
    # SimPO (reference-free, means): the same rule on its own scale and form
    from torchtune_prefopt.losses import SimPOLoss

    simpo = SimPOLoss(beta=2.0, gamma=0.0)
    same = (lp([-50.0]), lp([-50.0 * (1 + 1e-7)]))
    assert pair_metrics(simpo, same, None)["rewards/accuracies"].tolist() == [0.5]
