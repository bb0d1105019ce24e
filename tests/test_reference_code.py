"""The `reference_code_oft` policy against a transcription of the public VLA-Cache code's selection.

The transcription below is written from the formulas in docs/REFERENCE_CODE.md, in numpy, on attention maps
recorded by the independent reference forward (tests/reference.py): every row a layer computed, every head.
The policy plans from the engine's probe instead (recomputed rows, fused attention). Three steps on a 32-layer
decoder (the 7B depth, so the apply layers 2/6/9/11 and the relevance layer 15 are the reference's own): the
first is full, the second reuses what the transcription says from the first's attention, the third plans from
the second's attention, whose rows differ per layer because tokens were removed.
"""

import numpy as np
import pytest
import torch
from conftest import tiny_llama
from reference import reference_forward

from vlacache import CacheEngine
from vlacache.backbones.common.prismatic import cache_keyword
from vlacache.config import load_yaml, resolve_config_path
from vlacache.policy import CachePolicy
from vlacache.strategy import PlanContext
from vlacache.types import Span, TokenLayout, VisionSpan

LAYERS, L, PATCH = 32, 48, 14
CAMERAS = {"primary": VisionSpan(1, 17, rows=4, cols=4, patch_size=PATCH),
           "wrist": VisionSpan(17, 33, rows=4, cols=4, patch_size=PATCH)}
LAYOUT = TokenLayout(length=L, vision=CAMERAS, text=Span(34, L), extra={"proprio": Span(33, 34)})
WINDOW = 6  # query rows after the images (the reference's 34 on OFT-7B; 6 here, so the window cuts the prompt)
APPLY = (2, 6, 9, 11)


# -- the transcription ------------------------------------------------------------------------------------
def static_patches(current: np.ndarray, previous: np.ndarray, top_k: int) -> list[int]:
    """Raster patches whose raw-RGB cosine (float32, +1e-8) is >= 0.996, best first (ties in raster order)."""
    grid = current.shape[0] // PATCH

    def patches(image):
        blocks = image.reshape(grid, PATCH, grid, PATCH, 3).transpose(0, 2, 1, 3, 4)
        return blocks.reshape(grid * grid, -1).astype(np.float32)

    a, b = patches(current), patches(previous)
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + np.float32(1e-8))
    scored = [(i, cosine[i]) for i in range(grid * grid) if cosine[i] >= 0.996]
    scored.sort(key=lambda item: item[1], reverse=True)
    return [i for i, _ in scored[:top_k]]


def relevant_patches(attention: np.ndarray, row_positions: np.ndarray, span: VisionSpan, top_k: int) -> list[int]:
    """Layer 15's head mean, the rows at the window's positions averaged, over one camera's keys: the top_k."""
    mean = attention.mean(axis=0)
    start = max(s.stop for s in CAMERAS.values())
    rows = (row_positions >= start) & (row_positions < start + WINDOW)
    score = mean[rows][:, span.start:span.stop].mean(axis=0)
    order = sorted(range(len(score)), key=lambda i: score[i], reverse=True)
    return order[:top_k]


def entropies(maps: list[np.ndarray]) -> np.ndarray:
    """Per layer: the entropy of the head-mean attention (rows re-normalised), averaged over its rows."""
    out = []
    for attention in maps:
        p = attention.mean(axis=0)
        p = p / (p.sum(axis=-1, keepdims=True) + 1e-10)
        out.append(float((-(p * np.log(p + 1e-10)).sum(axis=-1)).mean()))
    return np.array(out, dtype=np.float32)


def schedule(maps: list[np.ndarray], damping: float = 0.55) -> list[float]:
    """r per layer: the layers' entropies min-max normalised and inverted, rises damped."""
    e = entropies(maps)
    s = 1.0 - (e - e.min()) / (e.max() - e.min() + np.float32(1e-10))
    r = [float(s[0])]
    for value in s[1:]:
        r.append(r[-1] + damping * (float(value) - r[-1]) if value > r[-1] else float(value))
    return r


def expected_reuse(maps, positions_per_layer, current, previous) -> tuple[list[list[int]], list[float]]:
    """The reused positions per layer the reference code would choose for this step."""
    remaining = []
    for name, span in CAMERAS.items():
        static = static_patches(current[name], previous[name], top_k=150 * 16 // 256)
        relevant = relevant_patches(maps[15], positions_per_layer[15], span, top_k=100 * 16 // 256)
        remaining += sorted(span.start + i for i in set(static) - set(relevant))
    r = schedule(maps)
    out, k = [], 0
    for layer in range(LAYERS):
        if layer in APPLY:
            k = max(k, max(1, int(r[layer] * len(remaining))))
        out.append(sorted(remaining[:k]))
    return out, r, len(remaining)


# -- the run ----------------------------------------------------------------------------------------------
def frames(seed: int) -> list[dict[str, np.ndarray]]:
    """Three query frames per camera. Pixel values stay below 16, so every float32 sum of the cosine is exact
    and the comparison does not hang on summation order; one patch per camera is black in all frames (static
    for pixel-cosine, never for the reference's +1e-8)."""
    rng = np.random.default_rng(seed)
    base = {name: rng.integers(1, 16, size=(56, 56, 3), dtype=np.uint8) for name in CAMERAS}
    for image in base.values():
        image[:PATCH, :PATCH] = 0
    out = [base]
    for step in range(2):
        nxt = {name: image.copy() for name, image in out[-1].items()}
        for name in CAMERAS:
            for patch in rng.choice(np.arange(1, 16), size=4 + step, replace=False):
                r, c = divmod(int(patch), 4)
                nxt[name][r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH] = rng.integers(1, 16, size=(PATCH, PATCH, 3))
        out.append(nxt)
    return out


def as_batch(frame):
    return {name: torch.from_numpy(image)[None] for name, image in frame.items()}


@pytest.fixture(scope="module")
def policy():
    config = load_yaml(resolve_config_path("reference_code_oft", "policy"))
    config["relevance"]["query_rows"] = WINDOW
    return CachePolicy.from_config(config)


def test_reference_code_oft_plans_what_the_reference_code_selects(policy):
    lm = tiny_llama(layers=LAYERS, seed=3)
    g = torch.Generator().manual_seed(5)
    embeds = [torch.randn(1, L, 64, generator=g)]
    for _ in range(2):
        nxt = embeds[-1].clone()
        nxt[:, 5:9] += 0.5 * torch.randn(1, 4, 64, generator=g)
        nxt[:, 33:] += 0.1 * torch.randn(1, L - 33, 64, generator=g)
        embeds.append(nxt)
    images = frames(seed=7)
    positions = torch.arange(L)
    request = policy.stats_request(LAYERS)
    assert (request.query, request.query_rows, request.entropy) == ("after-vision", WINDOW, "computed")
    plan, previous_kv = None, None
    checked = 0
    with torch.no_grad(), CacheEngine(lm.model) as engine:
        for step, e in enumerate(embeds):
            cache = engine.begin_step(plan, LAYOUT, 1, request)
            lm(inputs_embeds=e, position_ids=positions[None], use_cache=True, **{cache_keyword(lm.forward): cache})
            stats = engine.end_step().stats
            maps = []
            reused = None if plan is None else plan.reused
            _, kv, _ = reference_forward(lm, e, positions, reused=reused, previous_kv=previous_kv, attentions=maps)
            previous_kv = kv
            computed = [np.setdiff1d(np.arange(L), [] if reused is None else reused[layer][0].numpy())
                        for layer in range(LAYERS)]
            recorded = [m[0][:, rows].numpy() for m, rows in zip(maps, computed)]
            probe = np.array([float(stats.entropy[layer][0]) for layer in range(LAYERS)])
            np.testing.assert_allclose(probe, entropies(recorded), atol=1e-5, rtol=0)
            if step + 1 == len(embeds):
                break
            ctx = PlanContext(step=step + 1, batch_size=1, num_layers=LAYERS, layout=LAYOUT,
                              current=as_batch(images[step + 1]), previous=as_batch(images[step]), stats=stats)
            plan = policy.plan(ctx)
            expected, r, n = expected_reuse(recorded, computed, images[step + 1], images[step])
            assert [sorted(x[0].tolist()) for x in plan.reused] == expected
            fractions = plan.info["fractions"]
            running = np.maximum.accumulate([r[i] if i in APPLY else 0.0 for i in range(LAYERS)])
            np.testing.assert_allclose(fractions, running, atol=1e-5)
            checked += 1
            assert 0 < len(expected[1 + APPLY[0]]) < n  # reuse starts at layer 2, and not the whole list
    assert checked == 2
    # the step-2 plan removed tokens, so the third plan's entropy came from fewer rows at the deeper layers
    assert len(computed[-1]) < L


def test_reference_selector_never_calls_a_black_patch_static():
    images = frames(seed=7)
    ctx = PlanContext(step=1, batch_size=1, num_layers=LAYERS, layout=LAYOUT, current=as_batch(images[0]),
                      previous=as_batch(images[0]), stats=None)
    ours = CachePolicy.from_config({"selector": {"name": "pixel-cosine", "tau": 0.996, "top_k": None}})
    reference = CachePolicy.from_config({"selector": {"name": "reference-cosine", "tau": 0.996, "top_k": None}})
    assert bool(ours.selector.select(ctx)["primary"].mask[0, 0])
    assert not bool(reference.selector.select(ctx)["primary"].mask[0, 0])
    assert sorted(static_patches(images[0]["primary"], images[0]["primary"], 16)) == \
        reference.selector.select(ctx)["primary"].mask[0].nonzero().flatten().tolist()
