"""The cache engine: how a reuse plan is applied to a stock decoder.

hooks:       `CacheEngine`, the forward hooks that drop reused rows and splice last step's K/V
episode:     `EpisodeState`, what a step leaves for the next, per batch row, and the view a row's plan is made from
reuse_cache: `ReuseCache`, the DynamicCache that performs the splice
probe:       the few attention rows the next step's policy reads
staleness:   per visual token, the frame its cached K/V were computed from and the steps since
buckets:     `ReuseBuckets`, rounding a plan to a small set of shapes (for compiled and graph-captured steps)
compiled:    `CompiledSteps`, torch.compile of the decoder's layer blocks and of the decode passes (static K/V cache)
"""

from .buckets import ReuseBuckets
from .compiled import CompiledSteps, compile_counts
from .episode import EpisodeState
from .hooks import SUPPORTED_ATTENTION, CacheEngine, StatsRequest, StepRecord, decoder_layers
from .reuse_cache import ReuseCache

__all__ = [
    "SUPPORTED_ATTENTION",
    "CacheEngine",
    "CompiledSteps",
    "EpisodeState",
    "ReuseBuckets",
    "ReuseCache",
    "StatsRequest",
    "StepRecord",
    "compile_counts",
    "decoder_layers",
]
