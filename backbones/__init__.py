"""Built-in backbones; importing this package registers them."""

from . import openvla

__all__ = ["openvla"]
