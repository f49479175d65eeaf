"""Benchmark-only "loss" that turns a preference step into a plain SFT step (the floor).

``SFTFloorLoss`` is reference-free (the recipe loads no reference model and runs no
reference forward) and takes per-token mean log-probs, so a step with it is exactly one
policy forward + backward over the same chosen and rejected rows, through the recipe's own
lean log-prob path: the negative mean token log-likelihood of both rows, i.e. SFT on the same
tokens. It is what any preference step on this model and batch costs at least.

Selected with ``loss._component_=_floor_loss.SFTFloorLoss`` (``benchmarks/`` on the path).
"""

from __future__ import annotations

import torch

from torchtune_prefopt.losses import PairwiseLoss


class SFTFloorLoss(PairwiseLoss):
    """``-(mean_logp(chosen) + mean_logp(rejected)) / 2`` per pair; rewards are the log-probs."""

    reference_free = True
    average_logps = True
    paired = True

    def reward_scale(self) -> float:
        return 1.0

    def pair_losses(self, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        return -(chosen + rejected) / 2
