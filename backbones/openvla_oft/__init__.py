"""OpenVLA-OFT (OpenVLA HF checkpoint + action head / proprio projector .pt files) on stock transformers."""

from .backbone import OpenVLAOFTBackbone
from .tiny import PRESETS, build_preset

__all__ = ["OpenVLAOFTBackbone", "PRESETS", "build_preset"]
