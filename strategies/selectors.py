"""Token selectors: which patches are static since the previous policy query."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from vlacache.config import ConfigError
from vlacache.patches import patch_cosine
from vlacache.registry import register_strategy
from vlacache.strategy import Candidates, PlanContext, TokenSelector, resolve_count, top_indices
from vlacache.types import InputError


@register_strategy("selector", "none")
class NoSelector(TokenSelector):
    """Selects nothing: the policy runs the model untouched (the no-cache baseline)."""

    selects_nothing = True

    def select(self, ctx: PlanContext) -> dict[str, Candidates]:
        return {}


@register_strategy("selector", "pixel-cosine")
class PixelCosineSelector(TokenSelector):
    """The paper's static-token test: per patch of the model-input image (aligned with the ViT patch grid),
    cosine similarity of raw pixels against the same patch of the previous policy query frame of the same
    camera; patches with similarity >= tau are static, of which the top_k most similar are kept (per camera).
    cameras: the cameras whose patches may be reused (null: all), e.g. [primary] to never reuse the wrist view."""

    @dataclass
    class Config:
        tau: float = 0.996
        top_k: Any = 100  # per camera: a count, "k/n" (k of n patches, scaled to the camera's), or null
        cameras: list[str] | None = None

    eps: ClassVar[float | None] = None  # `patch_cosine`'s denominator term (None: two black patches are identical)
    stable_ties: ClassVar[bool] = False  # the top_k cut takes equal scores in raster order

    def __init__(self, config=None) -> None:
        super().__init__(config)
        resolve_count(self.config.top_k, 1 << 20, self._owner())  # the syntax, at construction

    def _owner(self) -> str:
        return f"selector '{getattr(type(self), 'registry_name', type(self).__name__)}'"

    def select(self, ctx: PlanContext) -> dict[str, Candidates]:
        self._check_cameras(ctx)
        out = {}
        for camera, span in ctx.layout.vision.items():
            similarity = patch_cosine(ctx.current[camera], ctx.previous[camera], span.rows, span.cols, eps=self.eps)
            out[camera] = self._candidates(camera, similarity >= self.config.tau, similarity)
        return out

    def _check_cameras(self, ctx: PlanContext) -> None:
        cameras = self.config.cameras
        if cameras is not None and not set(cameras) <= set(ctx.layout.vision):
            unknown = sorted(set(cameras) - set(ctx.layout.vision))
            raise InputError(
                f"selector '{getattr(type(self), 'registry_name', 'pixel-cosine')}': cameras {unknown} are not inputs "
                f"of this backbone, whose cameras are {sorted(ctx.layout.vision)}; set selector.cameras to some "
                "of those (or null for all)"
            )

    def _candidates(self, camera: str, mask: torch.Tensor, score: torch.Tensor) -> Candidates:
        """The static patches of one camera, limited to the configured cameras and to the top_k by score."""
        if self.config.cameras is not None and camera not in self.config.cameras:
            mask = torch.zeros_like(mask)
        k = resolve_count(self.config.top_k, mask.shape[1], self._owner())
        if k is not None and k < mask.shape[1]:
            keep = torch.zeros_like(mask)
            keep.scatter_(1, top_indices(score.masked_fill(~mask, float("-inf")), k, self.stable_ties), True)
            mask = mask & keep
        return Candidates(mask=mask, score=score)


@register_strategy("selector", "reference-cosine")
class ReferenceCosineSelector(PixelCosineSelector):
    """pixel-cosine with the public reference code's numerics (docs/REFERENCE_CODE.md): dot / (|a| |b| + 1e-8), so
    an all-black patch is never static, and the top_k cut taken in descending score with equal scores in raster
    order (identical patches often tie at exactly 1)."""

    eps = 1e-8
    stable_ties = True


@register_strategy("selector", "drift-aware")
class DriftAwareSelector(PixelCosineSelector):
    """Pixel-cosine reuse that also compares each patch with the frame its cached K/V were computed from (its
    anchor: reuse is chained, so a patch that changes a little at every step is never 'changed' against the
    previous frame yet drifts away from what its K/V encode), and recomputes a token reused `max_age` queries in a
    row. A patch is a candidate when its similarity to the previous query frame is >= tau, to its anchor >=
    anchor_tau, and its K/V would be at most max_age queries old once reused (null: no limit); score: the smaller
    similarity. Ages count policy queries, whatever the cadence: at 8 executed actions per query, max_age 1
    lets K/V be 8 env steps old. `max_age_env_steps` limits the age in env steps instead (queries times the
    executed chunk, `PlanContext.env_steps_per_query`); with both, both hold."""

    @dataclass
    class Config:
        tau: float = 0.996
        top_k: Any = 100  # per camera: a count, "k/n" (k of n patches, scaled to the camera's), or null
        cameras: list[str] | None = None
        anchor_tau: float = 0.99
        max_age: int | None = 4
        max_age_env_steps: int | None = None

    def check(self, num_layers: int) -> None:
        for key in ("max_age", "max_age_env_steps"):
            value = getattr(self.config, key)
            if value is not None and value < 1:
                raise ConfigError(f"selector 'drift-aware': {key} must be >= 1 or null, got {value}")

    def select(self, ctx: PlanContext) -> dict[str, Candidates]:
        self._check_cameras(ctx)
        out = {}
        for camera, span in ctx.layout.vision.items():
            similarity = patch_cosine(ctx.current[camera], ctx.previous[camera], span.rows, span.cols)
            mask = similarity >= self.config.tau
            if ctx.anchors is not None:
                anchored = patch_cosine(ctx.current[camera], ctx.anchors[camera], span.rows, span.cols)
                mask &= anchored >= self.config.anchor_tau
                similarity = torch.minimum(similarity, anchored)
                reused_age = ctx.ages[camera].to(mask.device) + 1  # in queries, once reused now
                if self.config.max_age is not None:
                    mask &= reused_age <= self.config.max_age
                if self.config.max_age_env_steps is not None:
                    mask &= reused_age * ctx.env_steps_per_query <= self.config.max_age_env_steps
            out[camera] = self._candidates(camera, mask, similarity)
        return out


@register_strategy("selector", "cross-view")
class CrossViewSelector(PixelCosineSelector):
    """Pixel-cosine reuse where one camera tells the others how much the robot moved. A camera on the arm
    (`motion_camera`, the wrist) sees most of its patches change whenever the arm moves; the other cameras' static
    patches then keep their pixels while their deeper keys and values change with the moving arm they attend to.
    So each other camera keeps only the share 1 - motion / max_motion of its static candidates (the most similar
    first; none at motion >= max_motion), where motion is the share of the motion camera's patches below tau. The
    motion camera's own static patches are reused as the paper's test says."""

    @dataclass
    class Config:
        tau: float = 0.996
        top_k: Any = 100  # per camera: a count, "k/n" (k of n patches, scaled to the camera's), or null
        cameras: list[str] | None = None
        motion_camera: str = "wrist"
        max_motion: float = 0.5

    def check(self, num_layers: int) -> None:
        if not 0 < self.config.max_motion <= 1:
            raise ConfigError(f"selector 'cross-view': max_motion must lie in (0, 1] (the share of the motion "
                              f"camera's patches that changed at which the others reuse nothing), got {self.config.max_motion}")

    def select(self, ctx: PlanContext) -> dict[str, Candidates]:
        motion_camera = self.config.motion_camera
        if motion_camera not in ctx.layout.vision or len(ctx.layout.vision) < 2:
            raise InputError(f"selector 'cross-view': motion_camera '{motion_camera}' must be one of several cameras "
                             f"of this backbone, whose cameras are {sorted(ctx.layout.vision)}; use pixel-cosine for "
                             "one camera, or set motion_camera to the one mounted on the arm")
        out = super().select(ctx)  # the paper's test per camera; score = the pixel similarity
        motion = (out[motion_camera].score < self.config.tau).float().mean(dim=1)  # [B]
        keep_share = (1.0 - motion / self.config.max_motion).clamp(0.0, 1.0)
        for camera, candidates in out.items():
            if camera != motion_camera:
                candidates.mask = keep_most_similar(candidates, keep_share)
        return out


def keep_most_similar(candidates: Candidates, share: torch.Tensor) -> torch.Tensor:
    """The floor(share[b] * count[b]) highest-scoring candidates of each row b."""
    keep = torch.floor(candidates.mask.sum(dim=1) * share.to(candidates.mask.device)).long()  # [B]
    rank = candidates.score.masked_fill(~candidates.mask, float("-inf")).argsort(dim=1, descending=True).argsort(dim=1)
    return candidates.mask & (rank < keep[:, None])
