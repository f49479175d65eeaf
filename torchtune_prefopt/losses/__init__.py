"""Preference-optimisation losses (DPO, IPO, SimPO, KTO, hinge/RSO, robust DPO, length-normalised
DPO, DPO-Positive, APO-zero, ORPO, SFT), weighted sums of them, and their registry.

See ``docs/ARCHITECTURE.md`` ("Losses") for the interface every loss follows.
"""

from ._base import (
    LossTraits,
    PairwiseLoss,
    PreferenceLoss,
    chosen_nll,
    loss_inputs,
    loss_traits,
    takes_sequence_logps,
)
from .apo import APOZeroLoss
from .combined import WeightedSum
from .dpo import DPOLoss, DPONormLoss, DPOPLoss, RobustDPOLoss
from .hinge import HingeLoss
from .ipo import IPOLoss
from .kto import KTOLoss
from .orpo import ORPOLoss
from .registry import ENTRY_POINT_GROUP, available_losses, build_loss, get_loss_class
from .rewards import PAIR_METRICS, pair_accuracy, pair_metrics, pair_rewards
from .sft import SFTLoss
from .simpo import SimPOLoss

__all__ = [
    "PairwiseLoss",
    "PreferenceLoss",
    "DPOLoss",
    "IPOLoss",
    "SimPOLoss",
    "KTOLoss",
    "HingeLoss",
    "RobustDPOLoss",
    "DPONormLoss",
    "DPOPLoss",
    "APOZeroLoss",
    "ORPOLoss",
    "SFTLoss",
    "WeightedSum",
    "chosen_nll",
    "loss_inputs",
    "takes_sequence_logps",
    "LossTraits",
    "loss_traits",
    "PAIR_METRICS",
    "pair_metrics",
    "build_loss",
    "available_losses",
    "get_loss_class",
    "ENTRY_POINT_GROUP",
    "pair_accuracy",
    "pair_rewards",
]
