"""CachedVLA: a backbone with a cache policy attached, predicting actions step by step."""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .backbone import Backbone
from .config import ConfigError
from .engine import CacheEngine, CompiledSteps, EpisodeState, ReuseBuckets, StatsRequest
from .flops import decode_flops, prefill_flops
from .guard import CostGuard, calibrate, load_model, model_key, save_model
from .messages import note
from .policy import CachePolicy, PolicyConfig
from .timing import StepTimer
from .types import InputError, NonFiniteOutputError, Observation, ReusePlan, StepStats, TokenLayout

# The sections of a control step, in order; their sum plus bookkeeping is the step's wall time ("total").
LATENCY_PARTS = ("prepare", "vision", "select", "prefill", "decode")


@dataclass
class StepResult:
    """One control step: actions [B, chunk, dim], last-position prefill logits, the plan used and its numbers."""

    actions: np.ndarray
    logits: torch.Tensor
    plan: ReusePlan
    stats: StepStats
    tokens: torch.Tensor | None = None


@dataclass
class EpisodeSnapshot:
    """The state one episode carries between control steps: the engine's (`EpisodeState`) and the backbone's."""

    engine: Any
    backbone: Any = None


class CachedVLA:
    """Runs a backbone step by step with VLA-Cache; `policy=None` (or the no-cache policy) runs it untouched.

    The engine's per-episode state resets on `reset()` and automatically when the instruction, batch size or
    image size changes. Use as a context manager to detach the hooks at the end. `buckets` (None, a count n or a
    list of fractions; `ReuseBuckets`) rounds the policy's reused counts per layer down to a few fixed shapes.
    `compile=True` runs the decoder through torch.compile (`vlacache.engine.compiled`; `compile_mode` is
    torch.compile's mode, e.g. 'reduce-overhead' for CUDA graphs); the first step of a new shape compiles.
    `env_steps_per_query`: the env steps between two queries (the executed part of each chunk, the cadence):
    reused K/V's age is reported in queries and in env steps, and strategies see it (`PlanContext`).
    """

    def __init__(
        self,
        backbone: Backbone,
        policy: CachePolicy | None = None,
        sync_timing: bool = True,
        buckets: ReuseBuckets | int | Sequence[float] | None = None,
        compile: bool = False,
        compile_mode: str | None = None,
        env_steps_per_query: int = 1,
    ) -> None:
        if not isinstance(backbone, Backbone):
            raise InputError(
                f"vlacache needs a vlacache Backbone, got {type(backbone).__name__}; load one with e.g. "
                "OpenVLABackbone.from_pretrained(path) or build_backbone({'name': 'openvla', 'checkpoint': path})"
            )
        if policy is not None and not isinstance(policy, CachePolicy):
            raise InputError(f"policy must be a CachePolicy (or use vlacache.attach with a name/YAML/dict), "
                             f"got {type(policy).__name__}")
        if isinstance(env_steps_per_query, bool) or not isinstance(env_steps_per_query, int) or env_steps_per_query < 1:
            raise InputError(f"env_steps_per_query must be an int >= 1 (the actions executed per query), "
                             f"got {env_steps_per_query!r}")
        for name, flag in (("compile", compile), ("sync_timing", sync_timing)):
            if not isinstance(flag, bool):
                raise InputError(f"{name} must be True or False, got {flag!r}")
        if compile_mode is not None and not isinstance(compile_mode, str):
            raise InputError(f"compile_mode must be a torch.compile mode name (e.g. 'reduce-overhead') or None, "
                             f"got {compile_mode!r}")
        self.env_steps_per_query = env_steps_per_query
        self.closed = False
        self.backbone = backbone
        self.policy = policy
        self.sync_timing = sync_timing
        self.buckets = buckets if isinstance(buckets, ReuseBuckets) or buckets is None else ReuseBuckets.from_spec(buckets)
        self.engine = CacheEngine(backbone.decoder, readers=backbone.cache_readers())
        if policy is not None:
            policy.check(self.engine.num_layers)
            policy.check_cameras(backbone.cameras)
            if policy.gate.needs_action_token_logits and not backbone.action_token_logits:
                raise ConfigError(
                    f"policy '{policy.label}': gate '{type(policy.gate).registry_name}' reads the confidence of decoded "
                    f"action tokens, and {type(backbone).__name__} predicts its actions without them (its logits carry "
                    "no confidence, so the gate would veto every step); use it with an OpenVLA backbone, or choose "
                    "another gate (action-aware, full-first-step)")
            if compile and policy.pruner.recycles and backbone.decode_passes():
                raise ConfigError(f"policy '{policy.label}': its pruner recycles tokens and renumbers positions, "
                                  "which the compiled decode passes cannot follow; run it with compile=False")
        self.guard = CostGuard(policy.guard) if policy is not None and policy.guard.enabled else None
        self.compiled = None
        if compile:
            self.compiled = CompiledSteps(backbone.decoder, backbone.causal_lm() if backbone.decode_passes() else None,
                                          compile_mode, backbone.vision_towers())
        if self.caching:
            self.engine.attach()

    @property
    def caching(self) -> bool:
        return self.policy is not None and self.policy.enabled

    def reset(self, rows: Sequence[int] | None = None) -> None:
        """Start a new episode: the engine forgets its cache, the backbone its own episode state. `rows`: only
        in these rows of a batch of episodes (e.g. the envs that just reset); the other rows keep their caches."""
        if rows is None:
            self.engine.reset()
            self.backbone.reset()
            return  # (the cost guard's back-off carries over: it is about the policy on this machine, not the episode)
        self.backbone.reset_rows(list(rows))
        if self.engine.episode.key is not None:
            self.engine.reset_rows(list(rows))

    def save_episode(self, row: int | None = None) -> "EpisodeSnapshot":
        """This CachedVLA's episode state (the engine's cache and the backbone's own), to continue later with
        `load_episode`: one model serving several independent episodes in turn (e.g. one per client session).
        `row`: only that row of a batch of episodes (a backbone with its own episode state cannot split it)."""
        if row is None:
            return EpisodeSnapshot(self.engine.episode, self.backbone.episode_state())
        self._check_rows_separable()
        return EpisodeSnapshot(self.engine.episode.rows([row]))

    def load_episode(self, snapshot: "EpisodeSnapshot | Sequence[EpisodeSnapshot | None] | None") -> None:
        """Continue the episode `save_episode` returned (its K/V, previous frame, statistics, step count), or
        start a new one with None. The snapshot's tensors are used in place, not copied. A list of single-row
        snapshots (None: a new episode) becomes one batch of episodes, row i continuing snapshot i; they must
        share image sizes and prompt length."""
        self.reset()  # also clears a step that raised mid-way
        if snapshot is None:
            return
        if isinstance(snapshot, EpisodeSnapshot):
            self.engine.episode = snapshot.engine
            self.backbone.load_episode_state(snapshot.backbone)
            return
        self._check_rows_separable()
        self.engine.episode = EpisodeState.stack([s.engine if s is not None else None for s in snapshot])

    def episode_steps(self) -> list[int]:
        """Per batch row, the steps of its episode so far (after a predict(): including that step)."""
        return list(self.engine.episode.steps)

    def _check_rows_separable(self) -> None:
        if self.backbone.episode_state() is not None:
            raise InputError(f"{type(self.backbone).__name__} keeps episode state of its own for the whole batch, so "
                             "its batch rows cannot be saved or loaded one by one; run one episode at a time")

    def keep_rows(self, rows: Sequence[int]) -> None:
        """Go on with these batch rows only (in this order), e.g. when the other envs' episodes ended: the kept
        rows keep their caches, and the next predict() takes len(rows) observations."""
        self.backbone.keep_rows(list(rows))
        self.engine.keep_rows(list(rows))

    def detach(self) -> None:
        """Remove the hooks; this CachedVLA cannot predict afterwards (attach a new one)."""
        self.engine.detach()
        self.closed = True

    def __enter__(self) -> "CachedVLA":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    @torch.inference_mode()
    def predict(self, obs: Observation, plan: ReusePlan | None = None, request: StatsRequest | None = None) -> StepResult:
        """Predict actions for one observation. `plan` and `request` (the attention statistics to record) override
        the policy's (for tests, benchmarks and the cost guard's calibration)."""
        if self.closed:
            raise InputError(
                "this CachedVLA is detached (detach() or the end of its `with` block); attach a new one: "
                "vla = vlacache.attach(backbone, policy)"
            )
        backbone, engine, guard = self.backbone, self.engine, self.guard
        if guard is not None and guard.model is None and plan is None:
            self._calibrate_guard(obs)
        timer = StepTimer(backbone.device, sync=self.sync_timing)
        timer.start()
        with timer.section("prepare"):
            inputs = backbone.prepare(obs)
        layout, batch = inputs.layout, inputs.batch_size
        check_fits_positions(backbone, layout)
        num_layers = engine.num_layers
        engine.recover_unfinished_step()  # the last predict() may have raised mid-step
        fresh = engine.sync_episode(inputs.batch_key(), inputs.instructions)
        compiled = self.compiled
        with timer.section("vision"):
            if compiled is None:
                embeds = backbone.embed(inputs)
            else:
                with compiled.active(backbone):
                    embeds = compiled.first_time(("vision", batch), f"the vision towers (batch {batch})",
                                                 lambda: backbone.embed(inputs))
        untouched = None  # why the cost guard runs this step untouched, if it does
        with timer.section("select"):
            if self.caching or plan is not None or engine.attached:
                if not engine.attached:
                    engine.attach()
                guarded = guard is not None and plan is None
                if guarded and guard.backing_off():
                    untouched = "cost guard: backing off, not planned"
                elif plan is None and self.policy is None:
                    plan = ReusePlan.empty(batch, num_layers)
                elif plan is None:
                    plan = ReusePlan.combine([self._row_plan(row, inputs) for row in range(batch)], layout.length)
                if request is None and self.policy is not None:
                    request = self.policy.stats_request(num_layers)
                # a step without a previous one reuses nothing: through the engine all the same (it records what the
                # next plan reads) unless the policy never reuses; the guard decides only on what it would prune
                recording = engine.episode.starts_over(batch) and self.policy is not None and self.policy.reuses
                if guarded and untouched is None and (plan.prune or not recording):
                    runs, why = guard.decide(self._skipped_token_layers(plan, layout.num_visual), request is not None)
                    if not runs and recording:
                        plan = dataclasses.replace(plan, prune=())
                        plan.info["guard"] = f"cost guard: not pruned ({why})"
                    elif not runs:
                        untouched = f"cost guard: {why}"
                if untouched is None:
                    cache = engine.begin_step(plan, layout, batch, request)
                else:
                    plan = ReusePlan.empty(batch, num_layers)
                    plan.info["guard"] = untouched
                    cache = backbone.new_cache()
            else:
                plan = ReusePlan.empty(batch, num_layers)
                cache = backbone.new_cache()
        with compiled.active(backbone) if compiled is not None else nullcontext():
            with timer.section("prefill"):
                if compiled is None:
                    prefill = backbone.prefill(embeds, inputs, cache)
                else:
                    prefill = compiled.first_time(("prefill", batch), f"the layers' norms and MLPs (batch {batch})",
                                                  lambda: backbone.prefill(embeds, inputs, cache))
            with timer.section("decode"):
                passes = backbone.decode_passes()
                if compiled is None or not passes:
                    decoded = backbone.decode(prefill, inputs, cache)
                else:
                    static = compiled.decode_cache(cache, layout.length, passes)
                    dropped = engine.keys_dropped(layout.length + passes)
                    with engine.hooks_lifted(), compiled.keys_dropped(dropped):
                        decoded = compiled.first_time(
                            ("decode", batch, layout.length, dropped is not None),
                            f"the {passes} decode passes (batch {batch}, {layout.length} tokens)",
                            lambda: backbone.decode(prefill, inputs, static))
        check_finite(prefill.logits, decoded.actions, engine.episode.step)
        signals = step_signals(prefill.logits, decoded.actions)
        step_index = engine.episode.step
        staleness = dropped = None
        if engine.in_step:
            record = engine.end_step(inputs.query_images, plan, signals)
            staleness, dropped = record.staleness, record.dropped_per_layer
            if guard is not None and dropped is not None:
                guard.dropped = float(sum(dropped))
        else:
            engine.advance(signals, untouched=untouched is not None)  # untouched: the next plan starts over
        wall, device_ms = timer.stop()
        return StepResult(
            actions=decoded.actions,
            logits=prefill.logits,
            plan=plan,
            tokens=decoded.tokens,
            stats=self._stats(step_index, plan, layout.length, layout.num_visual, timer.ms, wall, device_ms, fresh,
                              staleness, dropped),
        )

    def _calibrate_guard(self, obs: Observation) -> None:
        """The cost guard's model for this backbone, input shape, device and threads: from the cache on disk, or
        measured now on this observation and cached."""
        key = model_key(self.backbone, self.backbone.prepare(obs).batch_key())
        model = load_model(key)
        if model is None:
            note(f"cost guard: measuring what a step costs on this machine (once per backbone and device; "
                 f"cached as {key})")
            model = calibrate(self.backbone, obs, self.policy)
            save_model(model)
        self.guard.model = model

    def _skipped_token_layers(self, plan: ReusePlan, num_visual: int) -> float:
        """The visual token-layers a plan does not compute: reused, and dropped by its prune rules (as many as
        they dropped at the last step that ran them; half the visual tokens before any)."""
        skipped = float(sum(plan.counts))
        if plan.prune:
            dropped = self.guard.dropped
            skipped += dropped if dropped is not None else \
                0.5 * num_visual * (self.engine.num_layers - min(rule.layer for rule in plan.prune))
        return skipped

    def _row_plan(self, row: int, inputs) -> ReusePlan:
        """The policy's plan for one batch row, exactly as if its episode ran alone."""
        ctx = self.engine.plan_context(row, inputs.query_images, inputs.layout, self.env_steps_per_query)
        plan = self.policy.plan(ctx)
        return plan if self.buckets is None else self.buckets.apply(plan, inputs.layout.num_visual)

    def _stats(self, step, plan, length, num_visual, ms, wall, device_ms, fresh, staleness=None, dropped=None) -> StepStats:
        dims = self.backbone.decoder_dims()
        reused = plan.counts
        tokens = [length - c - d for c, d in zip(reused, dropped or [0] * len(reused))]
        flops = {
            "vision": self.backbone.vision_flops(),
            "prefill": prefill_flops(dims, tokens, length),
            "decode": decode_flops(dims, self.backbone.decode_passes(), length),
            "head": self.backbone.head_flops(),
        }
        flops["total"] = sum(flops.values())
        latency = {k: ms.get(k, 0.0) for k in LATENCY_PARTS}
        latency["total"] = wall
        ratio = sum(reused) / (len(reused) * num_visual) if num_visual and reused else 0.0
        return StepStats(
            step=step,
            reused_per_layer=reused,
            tokens_per_layer=tokens,
            num_visual=num_visual,
            reuse_ratio=ratio,
            flops=flops,
            latency_ms=latency,
            device_ms=device_ms,
            episode_reset=any(fresh),
            staleness=None if staleness is None else {
                **staleness, **{k.replace("_age_", "_age_env_steps_"): v * self.env_steps_per_query
                                for k, v in staleness.items() if "_age_" in k}},
            dropped_per_layer=dropped,
        )


def step_signals(logits: torch.Tensor, actions: np.ndarray) -> dict[str, torch.Tensor]:
    """What a step gives the next step's gates: its actions and its confidence (top-1 minus top-2 probability of
    the last-position logits: for OpenVLA the first action token's distribution)."""
    top = torch.softmax(logits.detach().float(), dim=-1).topk(2, dim=-1).values
    return {"actions": torch.as_tensor(actions, dtype=torch.float32).cpu(), "logit_margin": (top[:, 0] - top[:, 1]).cpu()}


def check_finite(logits: torch.Tensor, actions: np.ndarray, step: int) -> None:
    """Raise instead of returning actions computed from NaN / inf."""
    bad = [name for name, ok in (("logits", bool(torch.isfinite(logits).all())), ("actions", bool(np.isfinite(actions).all())))
           if not ok]
    if bad:
        raise NonFiniteOutputError(
            f"the model produced NaN or inf {' and '.join(bad)} at step {step} of the episode; no actions are returned. "
            "Check the checkpoint's weights and statistics (dataset_statistics.json), or load in bfloat16/float32 "
            "instead of float16"
        )


def attach(
    backbone: Backbone,
    policy: CachePolicy | PolicyConfig | Mapping[str, Any] | str | Path | None = "vla_cache",
    buckets: ReuseBuckets | int | Sequence[float] | None = None,
    compile: bool = False,
    compile_mode: str | None = None,
) -> CachedVLA:
    """Attach VLA-Cache to a backbone in one call; `policy` is a CachePolicy, a config, a YAML path or the
    name of a shipped policy ('no_cache', 'static_reuse', 'static_reuse_filter', 'vla_cache', 'reference_code').
    `buckets`, `compile` and `compile_mode` as for CachedVLA."""
    if policy is not None and not isinstance(policy, CachePolicy):
        policy = CachePolicy.from_config(policy)
    return CachedVLA(backbone, policy, buckets=buckets, compile=compile, compile_mode=compile_mode)


def check_fits_positions(backbone: Backbone, layout: TokenLayout) -> None:
    """Refuse, before any compute, a sequence longer than the decoder's positions (an over-long instruction)."""
    limit = backbone.max_positions()
    needed = layout.length + backbone.decode_passes()
    if limit is not None and needed > limit:
        text = layout.text.stop - layout.text.start
        raise InputError(
            f"the instruction is too long: with the image tokens the sequence needs {needed} positions ({text} of them "
            f"the prompt's text), but the model has {limit}; shorten the instruction by at least {needed - limit} tokens"
        )
