"""Benchmark-only "loss" that turns a preference step into a plain SFT step (the floor).

``SFTFloorLoss`` is reference-free (the recipe loads no reference model and runs no
reference forward) and takes per-token mean log-probs, so a step with it is exactly one
policy forward + backward over the same chosen and rejected rows, through the recipe's own
lean log-prob path: the negative mean token log-likelihood of both rows, i.e. SFT on the same
tokens. It is what any preference step on this model and batch costs at least.

Selected with ``loss._component_=_floor_loss.SFTFloorLoss`` (``benchmarks/`` on the path).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from torchtune_prefopt.losses import PreferenceLoss


class SFTFloorLoss(PreferenceLoss):
    """``-(mean_logp(chosen) + mean_logp(rejected)) / 2`` per pair; rewards are the log-probs."""

    reference_free = True
    average_logps = True
    paired = True

    def forward(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        reference_chosen_logps: Optional[torch.Tensor] = None,
        reference_rejected_logps: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self._check_pair_inputs(policy_chosen_logps, policy_rejected_logps, None, None)
        losses = -(policy_chosen_logps + policy_rejected_logps) / 2
        return losses, policy_chosen_logps.detach(), policy_rejected_logps.detach()
