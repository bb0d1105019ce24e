"""Built-in backbones; importing this package registers them."""

from . import openvla, openvla_oft

__all__ = ["openvla", "openvla_oft"]
