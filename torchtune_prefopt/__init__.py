"""torchtune-prefopt: DPO, IPO, KTO and SimPO for torchtune.

This ``__init__`` is deliberately light (no torch import): the package's ``.pth`` hook
imports :mod:`torchtune_prefopt._tune_registry` at every interpreter start-up.
"""

__version__ = "0.1.0"
