"""The cost guard: a step runs through the cache only when the saving its plan promises covers what the engine
adds on this machine; otherwise the model runs untouched, and planning backs off for a while.

A `CostModel` says what a step costs on one backbone, device and thread count, measured once (`calibrate`) and
cached on disk (`VLACACHE_CACHE_DIR`, default ~/.cache/vlacache). The guard (`CostGuard`) predicts a planned step
as the untouched step, plus the engine's fixed costs (hooks and bookkeeping; reuse's gathers and splice; the
attention probe when the policy reads statistics), minus the visual token-layers the plan does not compute. When
that is not faster, the step runs untouched (nothing reused, so nothing recorded for reuse either) and the guard
skips planning for the next `wait` steps (1, 2, 4, ... up to `max_backoff`, reset by a plan that pays). After a
back-off the next step records again (through the engine, with nothing reused) and the one after plans. So a
policy that never pays costs about (record + plan) / (max_backoff + 2) per step over an untouched model.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from .config import ConfigError, check_keys
from .messages import note

CACHE_ENV = "VLACACHE_CACHE_DIR"


@dataclass
class GuardConfig:
    """The policy's `guard:` setting: true / false, or {enabled, margin, max_backoff}. margin: the share of the
    untouched step a plan must save beyond the engine's costs (0.02: 2%); max_backoff: the longest run of steps
    planned away after plans that did not pay."""

    enabled: bool = False
    margin: float = 0.02
    max_backoff: int = 16

    @classmethod
    def from_spec(cls, spec: Any) -> "GuardConfig":
        if spec is None or isinstance(spec, bool):
            return cls(enabled=bool(spec))
        if isinstance(spec, GuardConfig):
            return spec
        if not isinstance(spec, Mapping):
            raise ConfigError(f"guard must be true, false or a mapping {{enabled, margin, max_backoff}}, got {spec!r}")
        spec = dict(spec)
        check_keys(spec, ["enabled", "margin", "max_backoff"], "the policy's guard")
        config = cls(**{"enabled": True, **spec})
        if not isinstance(config.enabled, bool):
            raise ConfigError(f"guard.enabled must be true or false, got {config.enabled!r}")
        if isinstance(config.margin, bool) or not isinstance(config.margin, (int, float)) or not 0 <= config.margin < 1:
            raise ConfigError(f"guard.margin must be a share in [0, 1) of the untouched step, got {config.margin!r}")
        if isinstance(config.max_backoff, bool) or not isinstance(config.max_backoff, int) or config.max_backoff < 1:
            raise ConfigError(f"guard.max_backoff must be a whole number of steps >= 1, got {config.max_backoff!r}")
        return config


@dataclass
class CostModel:
    """What one control step costs on one backbone, device and thread count (ms), from `calibrate`."""

    key: str  # the backbone, input shapes, device and threads it was measured for
    untouched_ms: float  # a step with no engine
    engine_ms: float  # what running a step through the engine adds, nothing reused and no probe
    probe_ms: float  # what recording the attention statistics adds
    reuse_ms: float  # the fixed cost of a plan that reuses (row gathers, the splice)
    token_layer_ms: float  # saved per visual token not computed at one decoder layer
    plan_ms: dict[str, float] = field(default_factory=dict)  # per policy label: its planning
    info: dict = field(default_factory=dict)

    def planned_ms(self, skipped_token_layers: float, probe: bool) -> float:
        """The predicted step through the engine that skips this many visual token-layers (reused or dropped)."""
        fixed = self.engine_ms + (self.probe_ms if probe else 0.0) + (self.reuse_ms if skipped_token_layers else 0.0)
        return self.untouched_ms + fixed - self.token_layer_ms * skipped_token_layers

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "CostModel":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


class CostGuard:
    """Decides per step whether a plan runs (see the module doc); holds the back-off state of one CachedVLA."""

    def __init__(self, config: GuardConfig, model: CostModel | None = None) -> None:
        self.config = config
        self.model = model
        self.wait = 0  # steps still planned away
        self.backoff = 1  # the next back-off's length
        self.dropped: float | None = None  # visual token-layers the prune rules dropped at the last step they ran

    def backing_off(self) -> bool:
        """Whether this step runs untouched without planning (and counts it)."""
        if self.wait > 0:
            self.wait -= 1
            return True
        return False

    def decide(self, skipped_token_layers: float, probe: bool) -> tuple[bool, str]:
        """Whether a plan skipping this many visual token-layers runs through the engine, and why."""
        model = self.model
        predicted = model.planned_ms(skipped_token_layers, probe)
        limit = model.untouched_ms * (1.0 - self.config.margin)
        if skipped_token_layers > 0 and predicted <= limit:
            self.backoff = 1
            return True, f"predicted {predicted:.2f} ms <= {limit:.2f} ms untouched (less margin)"
        self.wait = self.backoff
        self.backoff = min(2 * self.backoff, self.config.max_backoff)
        return False, (f"predicted {predicted:.2f} ms > {limit:.2f} ms untouched (less margin): untouched, "
                       f"then {self.wait} step(s) without planning")


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "vlacache") / "cost_models"


def model_key(backbone, batch_key: tuple) -> str:
    """What a cost model holds for: the backbone's class and decoder config, its dtype, the input shapes, the
    device and torch's thread count."""
    decoder = backbone.decoder
    parameter = next(decoder.parameters())
    device = parameter.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    text = json.dumps([type(backbone).__name__, decoder.config.to_json_string(use_diff=False), str(parameter.dtype),
                       repr(batch_key), name, torch.get_num_threads()], sort_keys=True, default=str)
    return f"{type(backbone).__name__}-{device.type}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def load_model(key: str) -> CostModel | None:
    path = cache_dir() / f"{key}.json"
    if not path.exists():
        return None
    try:
        return CostModel.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError):
        note(f"cost guard: {path} is unreadable; measuring the cost model again")
        return None


def save_model(model: CostModel) -> Path:
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{model.key}.json"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(model.to_json(), indent=1) + "\n")
    os.replace(tmp, path)
    return path


def calibrate(backbone, observation, policy=None, repeats: int = 7) -> CostModel:
    """Measure a CostModel on this machine from one real observation: interleaved, `repeats` times each, an
    untouched step; a step through the engine with nothing reused, without and with the attention probe; steps
    reusing a quarter and three quarters of the visual tokens at every layer (their difference: the saving per
    token-layer); and, given a policy, its planning on a step whose frame did not change. The backbone's own
    episode state is put back afterwards."""
    from .runtime import CachedVLA
    from .engine import StatsRequest
    from .types import ReusePlan

    saved = backbone.episode_state()
    inputs = backbone.prepare(observation)
    layout, batch = inputs.layout, inputs.batch_size
    layers = len(backbone.decoder.layers)
    visual = torch.cat([span.positions() for span in layout.vision.values()])
    nothing = ReusePlan.empty(batch, layers)
    shares = (0.25, 0.75)
    plans = {share: ReusePlan([visual[: int(share * len(visual))].sort().values.expand(batch, -1).contiguous()] * layers)
             for share in shares}
    untouched = CachedVLA(backbone, None)
    engine = CachedVLA(backbone, None)
    engine.engine.attach()
    probe = StatsRequest(layers=None, query="text", entropy="query")
    times: dict[str, list[float]] = {name: [] for name in ("untouched", "engine", "probe", *map(str, shares), "plan")}
    planner = CachedVLA(backbone, policy) if policy is not None else None
    if planner is not None:
        planner.guard = None  # the policy's planning as it is, unguarded

    def total(vla, plan, request=None) -> float:
        return vla.predict(observation, plan=plan, request=request).stats.latency_ms["total"]

    try:
        for _ in range(2):  # warm-up, and a previous step for reuse
            untouched.predict(observation)
            engine.predict(observation, plan=nothing)
            if planner is not None:
                planner.predict(observation)
        for _ in range(repeats):
            times["untouched"].append(total(untouched, None))
            times["engine"].append(total(engine, nothing))
            times["probe"].append(total(engine, nothing, probe))
            for share in shares:
                times[str(share)].append(total(engine, plans[share]))
            if planner is not None:
                times["plan"].append(planner.predict(observation).stats.latency_ms["select"])
    finally:
        engine.detach()
        if planner is not None:
            planner.detach()
        backbone.reset()
        backbone.load_episode_state(saved)
    ms = {name: float(statistics.median(values)) for name, values in times.items() if values}
    skipped = {share: int(share * len(visual)) * layers for share in shares}
    slope = max((ms["0.25"] - ms["0.75"]) / (skipped[0.75] - skipped[0.25]), 0.0)
    reuse_fixed = max(ms["0.25"] + slope * skipped[0.25] - ms["engine"], 0.0)
    return CostModel(
        key=model_key(backbone, inputs.batch_key()),
        untouched_ms=ms["untouched"],
        engine_ms=max(ms["engine"] - ms["untouched"], 0.0),
        probe_ms=max(ms["probe"] - ms["engine"], 0.0),
        reuse_ms=reuse_fixed,
        token_layer_ms=slope,
        plan_ms={} if policy is None else {policy.label: ms["plan"]},
        info={"measured_ms": ms, "repeats": repeats, "visual_tokens": len(visual), "layers": layers,
              "tokens": layout.length},
    )
