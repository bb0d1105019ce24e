"""π0 / π0.5 on transformers' own classes: exact against `sample_actions`, and VLA-Cache on the prefix against an
independent reference (the stock prefix pass with last query's K/V written over the reused positions)."""

import json

import numpy as np
import pytest
import torch
from transformers import DynamicCache

import vlacache
from vlacache import ReusePlan
from vlacache.backbones.common.prismatic import cache_keyword
from vlacache.backbones.pi0 import PI0Backbone, PI05Backbone, build_preset
from vlacache.errors import CheckpointError

FAMILIES = [PI0Backbone, PI05Backbone]


def observation(seed=0, change=None):
    rng = np.random.default_rng(seed)
    images = {name: rng.integers(0, 255, (56, 56, 3), dtype=np.uint8) for name in ("primary", "wrist")}
    if change is not None:  # a moved patch grid cell of the primary camera
        images["primary"][change[0]:change[0] + 14, change[1]:change[1] + 14] = 0
    return vlacache.Observation(images=images, instruction="pick up the black bowl",
                                proprio=np.linspace(-0.5, 0.5, 8).astype(np.float32))


@pytest.fixture(scope="module", params=FAMILIES, ids=["pi0", "pi05"])
def backbone(request):
    return build_preset(request.param, "tiny", noise="fixed")


def stock_actions(backbone, obs):
    """The model's own `sample_actions` on the backbone's prepared inputs and its noise."""
    m = backbone.prepare(obs).model_inputs
    state = {} if backbone.state_in_prompt else {"state": m["state"]}
    return backbone.model.sample_actions(input_ids=m["input_ids"], pixel_values=m["pixel_values"],
                                         pixel_attention_mask=m["pixel_attention_mask"],
                                         attention_mask=m["attention_mask"], noise=backbone.initial_noise(1),
                                         **state)[..., : backbone.action_dim].numpy()


def test_zero_reuse_is_bit_identical_to_sample_actions(backbone):
    obs = observation()
    expected = stock_actions(backbone, obs)
    with vlacache.attach(backbone, "no_cache") as vla:
        assert np.array_equal(vla.predict(obs).actions, expected)
    with vlacache.attach(backbone, "vla_cache") as vla:  # hooks and probe on; the first query reuses nothing
        first = vla.predict(obs)
    assert first.stats.reuse_ratio == 0.0 and np.array_equal(first.actions, expected)


def test_identical_frame_fully_reused_matches(backbone):
    obs = observation()
    expected = stock_actions(backbone, obs)
    with vlacache.attach(backbone, "static_reuse") as vla:
        vla.predict(obs)
        second = vla.predict(obs)
    assert second.stats.reuse_ratio == 1.0
    np.testing.assert_allclose(second.actions, expected, atol=1e-5, rtol=0)


class OverwriteCache(DynamicCache):
    """The reference: every row computed in full, then last query's K/V written over the reused positions."""

    def __init__(self, reused=None, previous=None, **kwargs):
        super().__init__(**kwargs)
        self.reused, self.previous, self.prefix = reused, previous, {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.reused is not None and layer_idx not in self.prefix:
            rows = self.reused[layer_idx][0]
            key_states, value_states = key_states.clone(), value_states.clone()
            key_states[:, :, rows] = self.previous[layer_idx][0][:, :, rows]
            value_states[:, :, rows] = self.previous[layer_idx][1][:, :, rows]
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        self.prefix.setdefault(layer_idx, (keys, values))
        return keys, values


def reference_actions(backbone, obs, cache):
    """The stock prefix pass and expert loop (as `sample_actions` runs them) on a given cache."""
    inputs = backbone.prepare(obs)
    m = inputs.model_inputs
    vlm = backbone.model.model.vlm
    with torch.no_grad():
        embeds = backbone.model.model.embed_prefix(m["input_ids"], m["pixel_values"], m["pixel_attention_mask"])
        vlm(inputs_embeds=embeds, attention_mask=m["attention_mask"], position_ids=m["attention_mask"].cumsum(-1) - 1,
            token_type_ids=torch.zeros(embeds.shape[:2], dtype=torch.long), use_cache=True,
            **{cache_keyword(vlm.forward): cache})
        actions = backbone.denoise(cache, inputs, cache.get_seq_length(), backbone.initial_noise(1))
    return actions[..., : backbone.action_dim].numpy()


def test_partial_reuse_matches_the_overwrite_reference(backbone):
    first, moved = observation(), observation(change=(14, 28))
    layout = backbone.prepare(first).layout
    primary, wrist = layout.vision["primary"], layout.vision["wrist"]
    # nested per layer, both cameras, never the moved patch (primary index 6)
    sets = [[], [0, 1, 2], [0, 1, 2, 3, 9, 17], [0, 1, 2, 3, 9, 10, 17, 20]]
    reused = [torch.tensor([sorted(primary.start + i if i < 16 else wrist.start + i - 16 for i in s)], dtype=torch.long)
              for s in sets]
    with vlacache.attach(backbone, "vla_cache") as vla:
        vla.predict(first)
        cached = vla.predict(moved, plan=ReusePlan([r.clone() for r in reused]))
    assert cached.stats.reuse_ratio > 0
    full = OverwriteCache()
    reference_actions(backbone, first, full)
    expected = reference_actions(backbone, moved, OverwriteCache(reused, full.prefix))
    np.testing.assert_allclose(cached.actions, expected, atol=1e-5, rtol=0)
    # sensitive: without the overwrite the actions differ clearly
    assert np.abs(reference_actions(backbone, moved, OverwriteCache()) - expected).max() > 1e-4


def test_checkpoint_round_trip_and_wrong_family(backbone, tmp_path):
    backbone.save_pretrained(tmp_path)
    cls = type(backbone)
    loaded = cls.from_pretrained(tmp_path, noise="fixed")
    saved, read = backbone.model.state_dict(), loaded.model.state_dict()
    assert saved.keys() == read.keys() and all(torch.equal(saved[k], read[k]) for k in saved)
    obs = observation()
    with vlacache.attach(loaded, "no_cache") as vla:
        assert np.array_equal(vla.predict(obs).actions, stock_actions(backbone, obs))
    other = PI05Backbone if cls is PI0Backbone else PI0Backbone
    with pytest.raises(CheckpointError, match=f"backbone name '{cls.registry_name}'"):
        other.from_pretrained(tmp_path)
    # a checkpoint that does not say it works unnormalised needs its statistics
    config = json.loads((tmp_path / "config.json").read_text())
    assert config.pop("vlacache_unnormalized") is True
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="no dataset_statistics.json"):
        cls.from_pretrained(tmp_path)


def test_episode_noise_is_fresh_per_query_and_replays_after_reset():
    backbone = build_preset(PI0Backbone, "tiny")  # noise: episode
    obs = observation()
    with vlacache.attach(backbone, "no_cache") as vla:
        a, b = vla.predict(obs).actions, vla.predict(obs).actions
        vla.reset()
        assert not np.array_equal(a, b) and np.array_equal(vla.predict(obs).actions, a)


@pytest.mark.parametrize("cls", FAMILIES, ids=["pi0", "pi05"])
def test_vlacache_train_runs_the_flow_matching_loss_and_exports_a_loadable_policy(cls, demo_folder, tmp_path):
    from vlacache.train.bc import TrainConfig, train
    from vlacache.train.demos import load_demos

    out = tmp_path / cls.registry_name
    policy = train(TrainConfig(backbone={"name": cls.registry_name, "preset": "micro", "device": "cpu"},
                               demos=str(demo_folder), chunk=8, epochs=1, batch_size=4, warmup_steps=2,
                               val_fraction=0.25, output_dir=str(out), threads=1), progress=False)
    loaded = cls.from_pretrained(policy)
    assert loaded.unnorm_key == "libero_spatial" and (policy / "SHA256SUMS").is_file()
    rows = (out / "loss_curves.csv").read_text().splitlines()
    assert len(rows) == 2 and all(float(v) > 0 for v in rows[1].split(",")[1:])
    initial = build_preset(cls, "micro")
    assert not torch.equal(initial.model.action_out_proj.weight, loaded.model.action_out_proj.weight.float())
    demo = load_demos(demo_folder)[0]
    obs = vlacache.Observation({"primary": demo["primary"][0], "wrist": demo["wrist"][0]}, demo["instruction"],
                               demo["proprio"][0])
    with vlacache.attach(loaded, "vla_cache") as vla:
        actions = vla.predict(obs).actions
    stats = loaded.statistics["action"]
    low, high = np.array(stats["q01"]), np.array(stats["q99"])
    assert actions.shape == (1, 8, 7) and np.isfinite(actions).all()
    # un-normalised into the demonstrations' range (BOUNDS_Q99 maps [-1, 1] onto [q01, q99] where masked)
    masked = np.array(stats["mask"], dtype=bool)
    assert (actions[0][:, masked] >= low[masked] - 3 * (high - low)[masked]).all()


def test_frames_are_resized_keeping_their_aspect_on_black_as_openpi_sends_them():
    from PIL import Image

    backbone = build_preset(PI0Backbone, "tiny")  # 56 px SigLIP input
    rng = np.random.default_rng(3)
    wide = rng.integers(1, 255, (40, 80, 3), dtype=np.uint8)
    obs = vlacache.Observation({"primary": wide, "wrist": wide[:, :40].copy()}, "pick up the bowl",
                               np.zeros(8, np.float32))
    query = backbone.prepare(obs).query_images
    primary = query["primary"][0].numpy()
    expected = np.asarray(Image.fromarray(wide).resize((56, 28), Image.BILINEAR))  # 80 x 40 scaled by 80/56
    assert np.array_equal(primary[14:42], expected)
    assert not primary[:14].any() and not primary[42:].any()  # 14 black rows above and below
    assert tuple(query["wrist"][0].shape) == (56, 56, 3)  # a square frame is scaled, not padded
    square = np.asarray(Image.fromarray(wide[:, :40].copy()).resize((56, 56), Image.BILINEAR))
    assert np.array_equal(query["wrist"][0].numpy(), square)


def test_bench_rows_see_the_same_fresh_noise_at_every_query():
    """noise 'episode' draws anew at every query; a bench's cached and uncached rows replay the same draws, so a
    row that reuses nothing (static reuse's first step, and no cache against itself) differs by nothing."""
    from vlacache.eval.bench import BenchConfig, run_bench

    config = BenchConfig(backbone={"name": "pi0", "preset": "tiny", "noise": "episode"}, env={"name": "replay"},
                         policy=["no_cache", "static_reuse"], max_steps=3, warmup=0, repeats=1)
    none, static = run_bench(config, progress=False)["rows"]
    assert max(none["summary"]["action_abs_diff"]["max"]) == 0.0  # three queries, three different draws, same actions
    assert static["steps"][0]["action_max_abs_diff"] == 0.0 and static["steps"][1]["reuse_ratio"] > 0


def test_the_cpu_preset_runs_at_the_released_token_counts():
    """`cpu-25m`: the released prefix (2 x 256 SigLIP tokens at 224 px + the 48-token prompt) and chunk of 50."""
    backbone = build_preset(PI0Backbone, "cpu-25m")
    rng = np.random.default_rng(0)
    obs = vlacache.Observation(images={n: rng.integers(0, 255, (256, 256, 3), dtype=np.uint8) for n in ("primary", "wrist")},
                               instruction="pick up the black bowl", proprio=np.zeros(8, dtype=np.float32))
    assert backbone.prepare(obs).layout.length == 2 * 256 + 48
    assert vlacache.attach(backbone, None).predict(obs).actions.shape == (1, 50, 7)


def test_fastv_prunes_the_prefix_and_the_expert_never_reads_the_dropped_keys(backbone):
    """FastV on the PaliGemma prefix: from layer 1 half the visual tokens are dropped, and the expert's denoising
    passes over that cache must not read their keys or values: overwriting them with huge numbers after the
    prefill changes no action."""
    from vlacache import CacheEngine
    from vlacache.policy import CachePolicy
    from vlacache.strategy import PlanContext

    policy = CachePolicy.from_config({"label": "fastv", "pruner": {"name": "fastv", "layer": 1, "ratio": 0.5, "query": "last"}})
    obs = observation()

    def run(corrupt: bool):
        engine = CacheEngine(backbone.decoder, readers=backbone.cache_readers()).attach()
        try:
            inputs = backbone.prepare(obs)
            ctx = PlanContext(step=0, batch_size=1, num_layers=engine.num_layers, layout=inputs.layout, current={},
                              previous=None, stats=None)
            cache = engine.begin_step(policy.plan(ctx), inputs.layout, 1)
            with torch.no_grad():
                prefill = backbone.prefill(backbone.embed(inputs), inputs, cache)
                dropped = engine.keys_dropped(inputs.layout.length)
                if corrupt:
                    for layer in range(1, engine.num_layers):
                        keys, values = cache.prefill_kv[layer]
                        keys[:, :, dropped[layer, 0]] = 1e4
                        values[:, :, dropped[layer, 0]] = -1e4
                actions = backbone.decode(prefill, inputs, cache).actions
            engine.end_step()
            return actions, dropped
        finally:
            engine.detach()

    clean, dropped = run(corrupt=False)
    corrupted, _ = run(corrupt=True)
    assert not dropped[0].any() and int(dropped[1, 0].sum()) == 16  # half of the 2 x 16 visual tokens
    np.testing.assert_array_equal(clean, corrupted)
    assert np.abs(clean - stock_actions(backbone, obs)).max() > 0  # the pruning did change the actions
