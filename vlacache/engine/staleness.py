"""How stale reused K/V are. Reuse is chained: a token reused now takes last step's K/V, which may themselves be
older, so what its deepest layers hold was computed from some earlier frame, its anchor. Per camera and visual
token the engine keeps that anchor patch and the steps since then (`Staleness`); a token counts as recomputed
only when no layer reused it (the reused sets are nested, so a reused token is always stale at the last layer).
Selectors read it (`PlanContext.anchors` / `ages`: drift-aware reuse), steps report it (`StepStats.staleness`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..patches import patch_cosine, patch_mask_to_pixels
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
    anchors, ages, age_seen, drift_seen = {}, {}, [], []
    for camera, span in layout.vision.items():
        image, anchor, age = images[camera], previous.anchors[camera], previous.ages[camera]
        mask = stale[:, span.start:span.stop].to(age.device)
        if bool(mask.any()):
            drift = (1.0 - patch_cosine(image, anchor, span.rows, span.cols)).clamp_min(0.0)
            age_seen.append((age + 1)[mask].float())
            drift_seen.append(drift[mask.to(drift.device)])
        pixels = patch_mask_to_pixels(mask.to(image.device), span.rows, span.cols, image.shape[1], image.shape[2])
        anchors[camera] = torch.where(pixels, anchor, image)
        ages[camera] = torch.where(mask, age + 1, torch.zeros_like(age))
    age_all, drift_all = torch.cat(age_seen), torch.cat(drift_seen)
    report = {"reused_age_mean": float(age_all.mean()), "reused_age_max": float(age_all.max()),
              "reused_drift_mean": float(drift_all.mean()), "reused_drift_max": float(drift_all.max())}
    return Staleness(anchors, ages), report
