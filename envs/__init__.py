"""Built-in environments and perturbations; importing this package registers them.

Simulator adapters import their simulator only when an env is built, so `vlacache list` works without
LIBERO or ManiSkill installed.
"""

from . import libero, perturb, replay, simpler

__all__ = ["libero", "perturb", "replay", "simpler"]
