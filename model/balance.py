"""Head balancing: importance, coefficient of variation and the auxiliary loss (docs/math.md).

    Imp[l, h] = mean of G[l, :, h, t] over the batch and query positions t >= 1
    CV[l]     = std_h(Imp[l]) / mean_h(Imp[l])                        (population std)
    L_aux     = lambda * sum_l N_h * CV[l]^2                           (pretraining)
    L_aux     = lambda * sum_l (N_h - m) * CV(routed heads of l)^2     (fine-tuning, Eq. 8; m shared heads)

Everything here is differentiable, so the aux loss moves the gates.
"""

import torch


def importance(gates: torch.Tensor) -> torch.Tensor:
    """gates (L, B, H, T) -> Imp (L, H). Position 0 is left out: in vanilla attention it has no choice."""
    return gates[..., 1:].mean(dim=(1, 3))


def squared_cv(imp: torch.Tensor, routed: torch.Tensor | None = None) -> torch.Tensor:
    """CV² over the heads of each layer: imp (L, H) -> (L,). routed (L, H) bool restricts it to those heads.

    The loss uses CV² = var / mean² directly: the square root has an infinite gradient at perfect balance.
    """
    weight = torch.ones_like(imp) if routed is None else routed.to(imp.dtype)
    count = weight.sum(-1)
    mean = (weight * imp).sum(-1) / count
    var = (weight * (imp - mean.unsqueeze(-1)).square()).sum(-1) / count
    return var / mean.square()


def coefficient_of_variation(imp: torch.Tensor, routed: torch.Tensor | None = None) -> torch.Tensor:
    """CV per layer, (L, H) -> (L,): population std over mean."""
    return squared_cv(imp, routed).sqrt()


def aux_loss(imp: torch.Tensor, weight: float, shared: torch.Tensor | None = None) -> torch.Tensor:
    """lambda · Σ_l N_routed · CV_l² ; shared (L, H) bool marks heads exempt from balancing (Eq. 8)."""
    routed = None if shared is None else ~shared
    n_routed = imp.new_full(imp.shape[:1], imp.shape[-1]) if routed is None else routed.sum(-1).to(imp.dtype)
    return weight * (n_routed * squared_cv(imp, routed)).sum()


def sink_ratio(imp: torch.Tensor, threshold: float = 0.3) -> torch.Tensor:
    """Per layer, the share of heads whose mean attention on the sink exceeds `threshold` (Gu et al., ICLR 2025):
    imp (L, H) -> (L,). The attention a head puts on the sink is 1 - G (vanilla: on the first token; sink: on the
    sink logit), so a head sinks when its importance is below 1 - threshold; for gated attention this is the share
    of heads whose mean gate is below 0.7 at the default threshold."""
    return (imp < 1 - threshold).to(imp.dtype).mean(dim=-1)


def top_heads(imp: torch.Tensor, m: int) -> torch.Tensor:
    """The m most important heads of each layer as a (L, H) bool mask: the shared heads of Eq. 8."""
    shared = torch.zeros_like(imp, dtype=torch.bool)
    if m > 0:
        shared.scatter_(-1, imp.topk(m, dim=-1).indices, True)
    return shared
