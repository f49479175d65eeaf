"""Preference-optimisation losses (DPO, IPO, SimPO, KTO, hinge/RSO, robust DPO) and their registry.

See ``docs/ARCHITECTURE.md`` ("Losses") for the interface every loss follows.
"""

from ._base import PairwiseLoss, PreferenceLoss
from .dpo import DPOLoss, RobustDPOLoss
from .hinge import HingeLoss
from .ipo import IPOLoss
from .kto import KTOLoss
from .registry import ENTRY_POINT_GROUP, available_losses, build_loss, get_loss_class
from .rewards import pair_accuracy, pair_rewards
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
    "build_loss",
    "available_losses",
    "get_loss_class",
    "ENTRY_POINT_GROUP",
    "pair_accuracy",
    "pair_rewards",
]
