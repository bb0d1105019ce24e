"""Built-in strategies; importing this package registers them (vlacache imports it for you)."""

from . import gates, learned, pruners, relevance, schedulers, selectors

__all__ = ["gates", "learned", "pruners", "relevance", "schedulers", "selectors"]
