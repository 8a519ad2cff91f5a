"""Importance, CV and the aux loss on hand-checkable numbers, and the aux loss actually balancing heads."""

import math

import pytest
import torch

from model.attention import VARIANTS
from model.balance import aux_loss, coefficient_of_variation, importance, sink_ratio, squared_cv, top_heads
from model.gpt import GPT, GPTConfig

# Layer 0 is collapsed onto head 3, layer 1 is perfectly balanced.
IMP = torch.tensor([[0.1, 0.1, 0.1, 0.7], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)


def test_cv_by_hand():
    # Layer 0: mean 0.25, deviations (-0.15, -0.15, -0.15, 0.45): population var (3*0.0225 + 0.2025)/4 = 0.0675.
    cv = coefficient_of_variation(IMP)
    assert cv[0].item() == pytest.approx(math.sqrt(0.0675) / 0.25)  # 1.03923
    assert cv[1].item() == 0.0


def test_aux_loss_by_hand():
    # lambda * sum_l N_h * CV_l^2 = 1e-4 * (4 * 1.08 + 4 * 0)
    assert aux_loss(IMP, 1e-4).item() == pytest.approx(1e-4 * 4 * 1.08)
    assert aux_loss(IMP[1:], 1.0).item() == 0.0  # all heads equal: no loss


def test_eq8_routed_heads_only_by_hand():
    imp = torch.tensor([[0.9, 0.2, 0.4, 0.6]], dtype=torch.float64)
    shared = top_heads(imp, 1)
    assert shared.tolist() == [[True, False, False, False]]
    # Routed (0.2, 0.4, 0.6): mean 0.4, var 0.08/3, CV^2 = 1/6; loss = lambda * (4 - 1) * 1/6 = 0.5 * lambda.
    assert aux_loss(imp, 2.0, shared).item() == pytest.approx(2.0 * 0.5)
    # m = 0 is the pretraining loss.
    assert aux_loss(imp, 2.0, top_heads(imp, 0)).item() == pytest.approx(aux_loss(imp, 2.0).item())


def test_sink_ratio_by_hand():
    # Attention on the sink = 1 - Imp: layer 0 (0.9, 0.9, 0.9, 0.3), layer 1 0.75 each. At 0.3 (Gu et al.'s epsilon)
    # every head sinks but head 3 of layer 0 (0.3 does not exceed 0.3); at 0.8 the three 0.9s; at 0.95 none.
    assert sink_ratio(IMP, 0.3).tolist() == [0.75, 1.0]
    assert sink_ratio(IMP, 0.8).tolist() == [0.75, 0.0]
    assert sink_ratio(IMP, 0.95).tolist() == [0.0, 0.0]
    assert sink_ratio(torch.tensor([[0.69, 0.71]])).tolist() == [0.5]  # the default threshold is 0.3: gate < 0.7


def test_top_heads_picks_the_m_largest_per_layer():
    imp = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.8, 0.2, 0.7, 0.1]])
    assert top_heads(imp, 2).tolist() == [[False, True, True, False], [True, False, True, False]]


def test_importance_leaves_out_position_zero():
    gates = torch.full((1, 2, 3, 5), 0.5)
    gates[..., 0] = 1000.0  # position 0 must not count
    gates[0, :, 1, 1:] = 0.25
    assert importance(gates).tolist() == [[0.5, 0.25, 0.5]]


def test_gradient_is_finite_at_perfect_balance():
    imp = torch.full((2, 4), 0.5, requires_grad=True)
    aux_loss(imp, 1.0).backward()
    assert torch.isfinite(imp.grad).all() and squared_cv(imp).sum() == 0


def test_aux_gradient_pushes_importance_toward_the_mean():
    imp = IMP[:1].clone().requires_grad_(True)
    aux_loss(imp, 1.0).backward()
    assert (imp.grad[0, :3] < 0).all() and imp.grad[0, 3] > 0  # raise the small heads, lower the big one


@pytest.mark.parametrize("attention", list(VARIANTS))
def test_optimizing_aux_loss_alone_lowers_cv(attention):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, n_layer=2, n_embd=64, n_head=4, seq_len=32, attention=attention))
    with torch.no_grad():  # a random, unbalanced start (the default init starts sink/gated heads equal)
        for p in model.parameters():
            p.normal_(std=2.0 / p.shape[-1] ** 0.5 if p.dim() == 2 else 2.0)
    idx = torch.randint(0, 64, (4, 32))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    cvs = []
    for _ in range(20):
        imp = importance(model(idx)[1])
        cvs.append(coefficient_of_variation(imp).mean().item())
        optimizer.zero_grad()
        aux_loss(imp, 1.0).backward()
        optimizer.step()
    assert cvs[-1] < 0.25 * cvs[0], cvs
