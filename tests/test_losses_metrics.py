import math

import numpy as np
import pytest
import torch

from pipeline.fewshot.losses import circle_loss, episode_loss
from pipeline.fewshot.metrics import mean_ci, paired, summarize


def by_hand(sp, sn, g, m):
    """Eq. 12 with O_p = 1+m, O_n = -m, D_p = 1-m, D_n = m, written out literally."""
    neg = sum(math.exp(g * max(s + m, 0) * (s - m)) for s in sn)
    pos = sum(math.exp(-g * max(1 + m - s, 0) * (s - 1 + m)) for s in sp)
    return math.log(1 + neg * pos)


def test_circle_loss_value_matches_the_formula():
    sp, sn, g, m = [0.7], [0.3, -0.1, 0.5], 2.0, 0.25
    got = circle_loss(torch.tensor([sp]), torch.tensor([sn]), g, m).item()
    assert got == pytest.approx(by_hand(sp, sn, g, m), rel=1e-6)
    # a worked number: g=1, m=0, s_p=0.5, s_n=0 -> log(1 + exp(0) * exp(-0.5*(0.5-1))) = log(1 + e^0.25)
    assert circle_loss(torch.tensor([[0.5]]), torch.tensor([[0.0]]), 1.0, 0.0).item() == pytest.approx(
        math.log(1 + math.exp(0.25)), rel=1e-6)


def test_circle_loss_gradients_match_eq_14_and_15():
    g, m = 4.0, 0.25
    s_p = torch.tensor([[0.6, 0.8]], requires_grad=True)
    s_n = torch.tensor([[0.2, 0.4, 0.1]], requires_grad=True)
    loss = circle_loss(s_p, s_n, g, m)
    loss.backward()
    z = 1 - math.exp(-loss.item())
    sn, sp = s_n.detach()[0].tolist(), s_p.detach()[0].tolist()
    wn = [math.exp(g * (s ** 2 - m ** 2)) for s in sn]
    # The positive logit is -g (1+m-s)(s-1+m) = g((s-1)^2 - m^2). Eq. 15 prints the softmax exponent
    # as g(m^2 - (s-1)^2), the opposite sign; with one positive per row (a class prototype, the
    # episode case) the softmax weight is 1 and both agree (checked below).
    wp = [math.exp(g * ((s - 1) ** 2 - m ** 2)) for s in sp]
    for j, s in enumerate(sn):
        assert s_n.grad[0, j].item() == pytest.approx(z * wn[j] / sum(wn) * g * (s + m), rel=1e-5)
    for i, s in enumerate(sp):
        assert s_p.grad[0, i].item() == pytest.approx(z * wp[i] / sum(wp) * g * (s - 1 - m), rel=1e-5)
    one = torch.tensor([[0.7]], requires_grad=True)
    loss1 = circle_loss(one, s_n.detach(), g, m)
    loss1.backward()
    w15 = math.exp(g * (m ** 2 - (0.7 - 1) ** 2))
    assert one.grad.item() == pytest.approx((1 - math.exp(-loss1.item())) * w15 / w15 * g * (0.7 - 1 - m), rel=1e-5)


def test_negative_below_minus_m_gets_no_weight_and_no_gradient():
    m = 0.4
    s_n = torch.tensor([[-0.6, 0.3]], requires_grad=True)   # -0.6 < -m: alpha_n = 0
    s_p = torch.tensor([[0.5]], requires_grad=True)
    loss = circle_loss(s_p, s_n, 8.0, m)
    loss.backward()
    assert s_n.grad[0, 0].item() == 0.0 and s_n.grad[0, 1].item() > 0
    assert loss.item() == pytest.approx(by_hand([0.5], [-0.6, 0.3], 8.0, m), rel=1e-6)


def test_large_gamma_does_not_overflow():
    loss = circle_loss(torch.tensor([[-1.0]]), torch.tensor([[1.0, 0.9]]), 1e4, 0.25)
    assert torch.isfinite(loss) and loss.item() > 1e3
    assert circle_loss(torch.tensor([[1.0]]), torch.tensor([[-1.0]]), 1e4, 0.25).item() == pytest.approx(0, abs=1e-6)


def test_episode_loss_rows_and_ce_scale():
    sims = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.8]])
    target = torch.tensor([0, 2])
    expected = (circle_loss(torch.tensor([[0.9]]), torch.tensor([[0.1, 0.0]])) +
                circle_loss(torch.tensor([[0.8]]), torch.tensor([[0.2, 0.3]]))) / 2
    assert episode_loss("circle", sims, target, 128, 0.4, 10).item() == pytest.approx(expected.item(), rel=1e-6)
    ce = -math.log(math.exp(9) / (math.exp(9) + math.exp(1) + 1))
    ce2 = -math.log(math.exp(8) / (math.exp(2) + math.exp(3) + math.exp(8)))
    assert episode_loss("ce", sims, target, 0, 0, 10).item() == pytest.approx((ce + ce2) / 2, rel=1e-5)
    with pytest.raises(ValueError, match="unknown loss"):
        episode_loss("triplet", sims, target, 0, 0, 0)


def test_confidence_interval_by_hand():
    acc = np.array([0.6, 0.8, 1.0, 0.6])           # mean 0.75, sample std sqrt(0.0366..) = 0.19149
    mean, ci = mean_ci(acc)
    assert mean == pytest.approx(0.75)
    assert ci == pytest.approx(1.96 * 0.191485 / 2, rel=1e-4)
    s = summarize(np.array([0.5, 0.7, 0.9, 1.0]), runs=2)
    assert s["run_means"] == pytest.approx([0.6, 0.95]) and s["episodes"] == 4
    p = paired(np.array([1.0, 1.0, 0.8, 0.9]), np.array([0.8, 0.9, 0.8, 0.7]))
    assert p["diff"] == pytest.approx(0.125) and 0 < p["p_value"] < 0.05


def test_seed_aware_interval_and_paired_test_by_hand():
    from pipeline.fewshot.metrics import format_p, over_seeds
    acc = np.array([[0.6, 0.8, 1.0, 0.6], [0.8, 1.0, 0.8, 0.6]])     # 2 seeds x 4 shared episodes
    m = over_seeds(acc)
    # seed means 0.75, 0.8: std 0.0353553, t(1) 12.7062 -> 12.7062 * 0.0353553 / sqrt(2) = 0.317655
    # seed-averaged episodes 0.7, 0.9, 0.9, 0.6: std 0.15 -> 1.96 * 0.15 / 2 = 0.147
    assert m["accuracy"] == pytest.approx(0.775) and m["seed_std"] == pytest.approx(0.0353553, rel=1e-5)
    assert m["seed_ci95"] == pytest.approx(0.317655, rel=1e-4) and m["episode_ci95"] == pytest.approx(0.147)
    assert m["ci95"] == pytest.approx(math.hypot(0.317655, 0.147), rel=1e-4)
    assert (m["seed_min"], m["seed_max"], m["seeds"]) == (0.75, 0.8, 2) and "seeds" in m["noise"]
    one = over_seeds(acc[:1])
    assert one["ci95"] == pytest.approx(1.96 * 0.191485 / 2, rel=1e-4) and one["noise"].startswith("test episodes only")
    d = np.array([[0.1, 0.1, 0.2, 0.0], [0.2, 0.0, 0.1, 0.1]])       # a - b; each seed's mean difference is 0.1
    p = paired(acc, acc - d)
    # seed term 0; episode term std(0.15, 0.05, 0.15, 0.05) / 2 = 0.0288675; t = 3.4641 with 1 degree of
    # freedom (a Cauchy law): p = 1 - 2 atan(3.4641) / pi = 0.17889
    assert p["diff"] == pytest.approx(0.1) and p["p_value"] == pytest.approx(0.17889, rel=1e-3)
    assert p["ci95"] == pytest.approx(12.7062 * 0.0288675, rel=1e-4) and p["seeds"] == 2
    assert format_p(3e-9) == "p < 1e-4" and format_p(0.01234) == "p = 0.012" and format_p(0.0) == "p < 1e-4"


def test_circle_per_video_is_the_papers_equation_12():
    g = torch.Generator().manual_seed(0)
    sims = torch.rand(4, 3, 2, generator=g) * 2 - 1          # 4 queries, 3-way 2-shot: one score per support video
    target = torch.tensor([0, 2, 1, 1])
    gamma, m = 2.0, 0.25
    expected = []
    for q in range(4):                                         # eq. 12, transcribed: sums over j (negatives), i (positives)
        pos = [sims[q, target[q], i] for i in range(2)]
        neg = [sims[q, c, i] for c in range(3) if c != target[q] for i in range(2)]
        total = 0.0
        for sn in neg:
            for sp in pos:
                a_n, a_p = max(sn + m, 0.0), max(1 + m - sp, 0.0)
                total += math.exp(gamma * a_n * (sn - m)) * math.exp(-gamma * a_p * (sp - (1 - m)))
        expected.append(math.log(1 + total))
    got = episode_loss("circle_per_video", sims, target, gamma, m, 0)
    assert got.item() == pytest.approx(sum(expected) / 4, rel=1e-5)
    one_shot = sims[:, :, :1]
    assert episode_loss("circle_per_video", one_shot, target, gamma, m, 0).item() == pytest.approx(
        episode_loss("circle", one_shot[:, :, 0], target, gamma, m, 0).item(), rel=1e-6)
