"""Built-in environments and perturbations; importing this package registers them.

Simulator adapters import their simulator lazily, so `vlacache list` works without LIBERO or ManiSkill.
"""

from . import perturb, replay

__all__ = ["perturb", "replay"]
