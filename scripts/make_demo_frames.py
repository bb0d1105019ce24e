"""Regenerate vlacache/data/demo_frames.npz: a static table scene with a moving two-link arm (synthetic).

Used by the embedded default run until recorded LIBERO sequences exist. Deterministic.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlacache.envs.replay import save_recording

ROOT = Path(__file__).resolve().parents[1]

SIZE, STEPS = 256, 16


def scene(rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE
    table = np.stack([150 + 40 * x, 110 + 30 * y, 80 + 20 * x * y], -1)
    grain = 8 * np.sin(40 * y + 6 * np.sin(9 * x))[..., None]
    wall = np.where(y[..., None] < 0.3, np.array([200, 205, 215], np.float32), table + grain)
    img = wall.copy()
    for cx, cy, r, colour in [(0.7, 0.55, 0.08, (20, 20, 25)), (0.45, 0.75, 0.1, (230, 230, 225)), (0.8, 0.8, 0.06, (180, 40, 40))]:
        disc = (x - cx) ** 2 + (y - cy) ** 2 < r**2
        img[disc] = colour
    return img


def draw_arm(img: np.ndarray, t: float) -> np.ndarray:
    out = img.copy()
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    base = np.array([30.0, 120.0])
    a1, a2 = -0.3 + 0.9 * t, 0.6 - 0.5 * t
    elbow = base + 90 * np.array([np.cos(a1), np.sin(a1)])
    hand = elbow + 70 * np.array([np.cos(a1 + a2), np.sin(a1 + a2)])
    for p, q, w, shade in [(base, elbow, 9, 90), (elbow, hand, 7, 120)]:
        d = q - p
        s = np.clip(((x - p[0]) * d[0] + (y - p[1]) * d[1]) / (d @ d), 0, 1)
        dist = np.hypot(x - (p[0] + s * d[0]), y - (p[1] + s * d[1]))
        out[dist < w] = shade
    out[np.hypot(x - hand[0], y - hand[1]) < 10] = 60
    return out


def main() -> None:
    rng = np.random.default_rng(0)
    background = scene(rng)
    frames = np.stack([draw_arm(background, t / (STEPS - 1)) for t in range(STEPS)]).clip(0, 255).astype(np.uint8)
    out = ROOT / "vlacache" / "data" / "demo_frames.npz"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_recording(out, {"primary": frames}, "pick up the black bowl and place it on the plate")
    print(f"wrote {out} ({out.stat().st_size / 1e3:.0f} kB, {STEPS} frames of {SIZE}x{SIZE})")


if __name__ == "__main__":
    main()
