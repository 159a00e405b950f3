"""The algorithm test table (in the spirit of torch's OptimizerInfo and optimi's OptimizerTest):
one file per algorithm declares how to build it and what it must match; the generic tests in
tests/test_reference.py and tests/test_update.py run over every entry of CASES."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import adamw, lion, sgd


@dataclass(frozen=True)
class AlgorithmCase:
    name: str            # the fusedopt.algorithms module name
    fused: type          # the fusedopt class (corrected=False)
    corrected: type      # its schedule-corrected variant
    groups: Callable     # params -> two param groups with different hyperparameters
    truth: Callable      # groups -> the torch.optim (or plain PyTorch) optimizer it must equal
    defaults: dict       # constructor arguments besides the groups


CASES = {module.NAME: AlgorithmCase(**module.CASE) for module in (adamw, sgd, lion)}
