"""OpenVLA (HF checkpoint layout) on stock transformers."""

from .backbone import OpenVLABackbone
from .tiny import PRESETS, build_preset

__all__ = ["OpenVLABackbone", "PRESETS", "build_preset"]
