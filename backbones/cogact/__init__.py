"""CogACT (released .pt layout) on stock transformers: Prismatic VLM + DiT diffusion action head."""

from .backbone import CogACTBackbone
from .ensemble import AdaptiveEnsembler
from .tiny import PRESETS, build_preset

__all__ = ["AdaptiveEnsembler", "CogACTBackbone", "PRESETS", "build_preset"]
