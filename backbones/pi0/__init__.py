"""π0 and π0.5 on transformers' own PI0 / PI05 classes, with VLA-Cache on the PaliGemma prefix."""

from .backbone import PI0Backbone, PI05Backbone, PI0FamilyBackbone
from .tiny import build_preset

__all__ = ["PI0Backbone", "PI05Backbone", "PI0FamilyBackbone", "build_preset"]
