"""Built-in backbones; importing this package registers them."""

from . import cogact, openvla, openvla_oft, pi0

__all__ = ["cogact", "openvla", "openvla_oft", "pi0"]
