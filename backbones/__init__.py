"""Built-in backbones; importing this package registers them."""

from . import cogact, openvla, openvla_oft

__all__ = ["cogact", "openvla", "openvla_oft"]
