"""Built-in environments; importing this package registers them."""

from . import replay

__all__ = ["replay"]
