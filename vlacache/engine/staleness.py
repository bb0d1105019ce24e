"""How stale reused K/V are. Reuse is chained: a token reused now takes last step's K/V, which may themselves be
older, so what its deepest layers hold was computed from some earlier frame, its anchor. Per camera and visual
token the engine keeps that anchor patch and the steps since then (`Staleness`); a token counts as recomputed
only when no layer reused it (the reused sets are nested, so a reused token is always stale at the last layer).
Selectors read it (`PlanContext.anchors` / `ages`: drift-aware reuse), steps report it (`StepStats.staleness`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..patches import known_patch_vectors, patch_cosine, remember_patch_vectors, where_patches
from ..types import TokenLayout


@dataclass
class Staleness:
    """Per camera: the anchor image (each patch as it was when that token's K/V were last computed) [B, H, W, 3]
    and the steps since then [B, P] (0: computed at the last step)."""

    anchors: dict[str, torch.Tensor]
    ages: dict[str, torch.Tensor]

    def rows(self, rows: torch.Tensor | slice) -> "Staleness":
        """These batch rows only (a slice, or an index tensor in the new order)."""
        def pick(t: torch.Tensor) -> torch.Tensor:
            return t[rows] if isinstance(rows, slice) else t.index_select(0, rows.to(t.device))

        return Staleness({c: pick(a) for c, a in self.anchors.items()}, {c: pick(a) for c, a in self.ages.items()})


def advance(previous: Staleness | None, images: dict[str, torch.Tensor], stale: torch.Tensor | None,
            layout: TokenLayout) -> tuple[Staleness, dict[str, float] | None]:
    """The staleness after a step that computed `images` with the positions `stale` [B, L] (None: none) taking
    K/V from an earlier step, and what the reused tokens were like: their steps since computed and their pixel
    drift (1 - cosine) from the current frame's patch to their anchor's."""
    if previous is None or stale is None or not bool(stale.any()):
        fresh = Staleness({c: images[c].clone() for c in layout.vision},
                          {c: torch.zeros(images[c].shape[0], span.rows * span.cols, dtype=torch.long)
                           for c, span in layout.vision.items()})
        return fresh, None
    anchors, ages, totals = {}, {}, []
    for camera, span in layout.vision.items():
        image, anchor, age = images[camera], previous.anchors[camera], previous.ages[camera]
        mask = stale[:, span.start:span.stop].to(age.device)
        drift = (1.0 - patch_cosine(image, anchor, span.rows, span.cols)).clamp_min(0.0) * mask.to(image.device)
        reused_age = (age + 1) * mask
        totals.append(torch.stack([mask.sum().float(), reused_age.sum().float(), reused_age.max().float(),
                                   drift.sum(), drift.max()]))
        anchors[camera] = where_patches(mask.to(image.device), anchor, image, span.rows, span.cols)
        seen = known_patch_vectors(image, span.rows, span.cols), known_patch_vectors(anchor, span.rows, span.cols)
        if None not in seen:  # the new anchor's patches are the old anchor's or the image's: so are their vectors
            (now, now_norm), (old, old_norm) = seen
            keep = mask.to(now.device)
            remember_patch_vectors(anchors[camera], span.rows, span.cols, torch.where(keep[..., None], old, now),
                                   torch.where(keep, old_norm, now_norm))
        ages[camera] = reused_age
    totals = torch.stack(totals)
    count, age_sum, age_max, drift_sum, drift_max = torch.cat([totals[:, :2].sum(0), totals[:, 2:3].max(0).values,
                                                               totals[:, 3:4].sum(0), totals[:, 4:].max(0).values]).tolist()
    report = {"reused_age_mean": age_sum / count, "reused_age_max": age_max,
              "reused_drift_mean": drift_sum / count, "reused_drift_max": drift_max}
    return Staleness(anchors, ages), report
