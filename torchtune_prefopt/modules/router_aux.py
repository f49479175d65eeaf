"""The Mixture-of-Experts router load-balancing term (``router_aux_loss_coef``).

Switch Transformer's auxiliary loss (Fedus et al. 2021, arXiv 2101.03961, Eqs. 4-6), as
``transformers`` computes it with ``output_router_logits=True`` (``load_balancing_loss_func``)
and TRL adds it to DPO (``loss + router_aux_loss_coef * aux_loss``). Over the ``T`` token
positions of one forward (every MoE layer's router logits ``z^l`` ``[T, E]``, token weights
``m_t``: 0 on padding)::

    p^l_t = softmax(z^l_t)                       (router probabilities, [E])
    f_e   = sum_l sum_t m_t #{e in topk(p^l_t)} / sum_l sum_t m_t     (share of routed slots)
    P_e   = sum_l sum_t m_t p^l_{t,e}            / sum_l sum_t m_t     (mean probability)
    aux   = E * sum_e f_e P_e

``f`` counts (no gradient); the gradient flows through ``P`` into the routers. It is 1 when
routing is uniform (``top_k`` aside), larger when a few experts take most tokens.

The padded layout's forward holds each pair's prompt twice (chosen and rejected rows), as
TRL's concatenated forward does; the packed + shared-prompt layout holds it once, so its
token weights count a shared prompt's positions twice (``PackedBatch.token_weights``) and
both layouts give the same value.
"""

from __future__ import annotations

from typing import List

import torch
from torch import Tensor, nn

__all__ = [
    "collect_router_logits",
    "keep_router_logits",
    "moe_layers",
    "router_load_balancing_loss",
]


def moe_layers(model: nn.Module) -> List[nn.Module]:
    """The model's Mixture-of-Experts MLPs (modules with a ``keep_router_logits`` switch)."""
    return [m for m in model.modules() if hasattr(m, "keep_router_logits")]


def keep_router_logits(model: nn.Module, on: bool = True) -> List[nn.Module]:
    """Make every MoE layer keep its last router logits; returns the layers (found once, for
    :func:`collect_router_logits` at every step)."""
    layers = moe_layers(model)
    for m in layers:
        m.keep_router_logits = on
    return layers


def collect_router_logits(layers: List[nn.Module]) -> List[Tensor]:
    """Every MoE layer's router logits of the last forward (``[T, E]`` each), in layer order;
    each is released from its layer."""
    out = []
    for m in layers:
        if m.router_logits is None:
            raise RuntimeError("an MoE layer kept no router logits (keep_router_logits is off?)")
        out.append(m.router_logits)
        m.router_logits = None
    return out


def router_load_balancing_loss(router_logits: List[Tensor], weights: Tensor, top_k: int) -> Tensor:
    """``aux`` of the module docstring: ``router_logits`` one ``[T, E]`` per MoE layer,
    ``weights`` ``[T]`` (0 on padding, 2 on a shared prompt's positions); a scalar fp32."""
    num_experts = router_logits[0].shape[-1]
    w = weights.reshape(-1).to(torch.float32)
    slot_w = w.repeat_interleave(top_k).detach()  # one weight per routed slot
    counts = torch.zeros(num_experts, dtype=torch.float32, device=w.device)
    prob = torch.zeros(num_experts, dtype=torch.float32, device=w.device)
    for z in router_logits:
        p = torch.softmax(z.float(), dim=-1)
        chosen = torch.topk(p, top_k, dim=-1).indices
        counts = counts.scatter_add(0, chosen.reshape(-1), slot_w)
        prob = prob + (p * w[:, None]).sum(dim=0)
    total = w.sum() * len(router_logits)  # token weights are small integers: exact in fp32
    return num_experts * torch.sum((counts / total) * (prob / total))
