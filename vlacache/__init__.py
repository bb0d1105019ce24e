"""vlacache: training-free adaptive token caching (VLA-Cache) for vision-language-action policies."""

from .backbone import Backbone
from .config import ConfigError
from .engine import CacheEngine, StatsRequest
from .env import Env
from .errors import VlacacheError
from .policy import CachePolicy, PolicyConfig
from .registry import BACKBONES, ENVS, STRATEGIES, Registry, register_backbone, register_env, register_strategy
from .runtime import CachedVLA, StepResult, attach
from .strategy import Candidates, LayerScheduler, PlanContext, RelevanceFilter, StepGate, TokenPruner, TokenSelector
from .types import AttentionStats, InputError, Observation, PruneRule, ReusePlan, StepStats, TokenLayout

# Built-ins register on import, after the core they depend on; from a checkout, its own rooms (rooms.py).
from .rooms import bind_checkout_rooms  # noqa: E402  isort: skip

bind_checkout_rooms()
from . import strategies, backbones, envs  # noqa: E402, F401  isort: skip
from .experiment import build_backbone  # noqa: E402  isort: skip
from .plugins import load_entry_points  # noqa: E402  isort: skip

load_entry_points()  # installed distributions' `vlacache.plugins` entry points register theirs

__version__ = "0.1.0"

__all__ = [
    "AttentionStats", "BACKBONES", "Backbone", "CacheEngine", "CachePolicy", "CachedVLA", "Candidates", "ConfigError",
    "ENVS", "Env", "InputError", "LayerScheduler", "Observation", "PlanContext", "PolicyConfig", "PruneRule", "Registry",
    "RelevanceFilter", "ReusePlan", "STRATEGIES", "StatsRequest", "StepGate", "StepResult", "StepStats",
    "TokenLayout", "TokenPruner", "TokenSelector", "VlacacheError", "attach", "build_backbone", "register_backbone",
    "register_env", "register_strategy",
]
