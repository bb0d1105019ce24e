"""The CogACT backbone: released .pt layout round trip, key-mapping errors, DDIM/CFG, the adaptive ensemble,
and VLA-Cache exactness on the cognition feature (no reuse, everything reused, realistic nested reuse)."""

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
from reference import fastv_dropped, reference_forward

from vlacache import CachedVLA, InputError, Observation, ReusePlan, attach
from vlacache.backbones.cogact import AdaptiveEnsembler, CogACTBackbone, build_preset
from vlacache.backbones.cogact.action_model import DDIMSampler, cosine_betas, ddim_timesteps, sample_actions
from vlacache.backbones.common.checkpoint import CheckpointError
from vlacache.config import packaged_configs
from vlacache.experiment import build_backbone
from vlacache.registry import BACKBONES


@pytest.fixture(scope="module")
def cog():
    return build_preset("tiny", seed=0, noise="fixed")  # the same noise at every call: single calls compare exactly


@pytest.fixture(scope="module")
def saved(cog, tmp_path_factory):
    root = tmp_path_factory.mktemp("cogact") / "CogACT-Tiny"
    cog.save_pretrained(root)
    return root


def copy_of(saved, tmp_path):
    root = tmp_path / "CogACT-Tiny"
    shutil.copytree(saved, root)
    return root, root / "checkpoints" / "CogACT-Tiny.pt"


def edit_weights(pt, edit):
    data = torch.load(pt, weights_only=True)
    edit(data["model"])
    torch.save(data, pt)


def predict(backbone, obs, plan=None, vla=None):
    vla = vla or CachedVLA(backbone, None)
    result = vla.predict(obs, plan=plan)
    return result, backbone.last_cognition.clone(), backbone.last_normalized.copy()


# -- layout and loading -------------------------------------------------------------------------------------


def test_registered_and_yaml_builds():
    assert BACKBONES.get("cogact") is CogACTBackbone
    from vlacache.experiment import load_yaml

    spec = load_yaml(packaged_configs() / "backbone" / "cogact_tiny.yaml")
    backbone = build_backbone(spec)
    assert isinstance(backbone, CogACTBackbone) and backbone.decode_passes() == 0
    base = load_yaml(packaged_configs() / "backbone" / "cogact_base.yaml")
    from vlacache.config import resolve_component

    _, config = resolve_component(BACKBONES, base, "backbone")
    assert config.action_ensemble and config.cfg_scale == 1.5 and config.ddim_steps == 10


def test_saved_in_the_released_layout(saved):
    assert {p.name for p in saved.iterdir()} >= {"config.json", "dataset_statistics.json", "checkpoints",
                                                 "tokenizer.model", "tokenizer_config.json"}
    config = json.loads((saved / "config.json").read_text())
    assert config["future_action_window_size"] == 15 and config["past_action_window_size"] == 0
    assert config["arch_specifier"] == "no-align+fused-gelu-mlp"
    stats = json.loads((saved / "dataset_statistics.json").read_text())
    assert set(stats["bridge_orig"]["action"]) >= {"q01", "q99", "mask"}
    data = torch.load(saved / "checkpoints" / "CogACT-Tiny.pt", weights_only=True)
    model = data["model"]
    assert set(model) == {"vision_backbone", "projector", "llm_backbone", "action_model"}
    for section, key in [
        ("vision_backbone", "dino_featurizer.blocks.0.ls1.gamma"), ("vision_backbone", "dino_featurizer.reg_token"),
        ("vision_backbone", "siglip_featurizer.attn_pool.latent"),
        ("vision_backbone", "siglip_featurizer.blocks.0.attn.qkv.weight"),
        ("projector", "projector.0.weight"), ("projector", "projector.2.bias"), ("projector", "projector.4.weight"),
        ("llm_backbone", "llm.model.embed_tokens.weight"), ("llm_backbone", "llm.model.layers.0.self_attn.q_proj.weight"),
        ("llm_backbone", "llm.lm_head.weight"), ("action_model", "net.x_embedder.linear.weight"),
        ("action_model", "net.t_embedder.mlp.2.weight"), ("action_model", "net.blocks.1.attn.qkv.weight"),
        ("action_model", "net.blocks.0.mlp.fc2.bias"), ("action_model", "net.final_layer.linear.weight"),
    ]:
        assert key in model[section], key
    net = model["action_model"]
    assert all(k.startswith("net.") for k in net)
    assert not any("norm" in k for k in net)  # the DiT LayerNorms carry no parameters
    assert tuple(net["net.positional_embedding"].shape) == (17, 32)
    assert tuple(net["net.z_embedder.uncondition"].shape) == (1, 64)
    assert tuple(net["net.t_embedder.mlp.0.weight"].shape) == (32, 256)
    assert not any("scale_factor" in k or "rotary" in k for s in model.values() for k in s)
    assert all(t.dtype == torch.float32 for s in model.values() for t in s.values())


def test_round_trip_gives_identical_actions(cog, saved, frames):
    for source in (saved, saved / "checkpoints" / "CogACT-Tiny.pt"):
        loaded = CogACTBackbone.from_pretrained(source, noise="fixed")
        for obs in frames[:2]:
            (a, fa, na), (b, fb, nb) = predict(cog, obs), predict(loaded, obs)
            assert torch.equal(a.logits, b.logits) and torch.equal(fa, fb)
            np.testing.assert_array_equal(na, nb)
            np.testing.assert_array_equal(a.actions, b.actions)


def test_nested_config_without_action_fields_reads_them_off_the_weights(cog, saved, tmp_path, frames):
    """CogACT's loader takes the DiT size and window as arguments; a training-dump config.json nests the rest."""
    root, _ = copy_of(saved, tmp_path)
    flat = json.loads((root / "config.json").read_text())
    for name in ("action_model_type", "future_action_window_size", "action_dim"):
        flat.pop(name)
    (root / "config.json").write_text(json.dumps({"seed": 42, "vla": flat}))
    loaded = CogACTBackbone.from_pretrained(root, noise="fixed")
    assert loaded.config.action_model_type == "vlacache-tiny-DiT" and loaded.chunk_size == 16
    np.testing.assert_array_equal(predict(loaded, frames[0])[0].actions, predict(cog, frames[0])[0].actions)


def test_prompt_and_layout(cog, frames):
    inputs = cog.prepare(frames[0])
    ids = inputs.model_inputs["input_ids"][0].tolist()
    tok = cog.tokenizer
    assert ids[0] == tok.bos_token_id and ids[-2:] == [tok.convert_tokens_to_ids("\u2581"), tok.eos_token_id]
    assert "What action should the robot take to pick up the black bowl" in tok.decode(ids)
    layout = inputs.layout
    assert layout.vision["primary"].start == 1 and len(layout.vision["primary"]) == 256
    assert layout.length == 256 + len(ids) and layout.text.stop == layout.length


@pytest.mark.parametrize(
    "damage, message",
    [
        ("config", r"config\.json"),
        ("stats", r"dataset_statistics\.json"),
        ("tokenizer", r"tokenizer"),
        ("weights", r"checkpoints/<name>\.pt"),
        ("section", r"lacks the section\(s\) \['action_model'\]"),
        ("chunk", r"positional_embedding has 17 rows.*future_action_window_size=7"),
    ],
)
def test_damaged_checkpoints_are_named(saved, tmp_path, damage, message):
    root, pt = copy_of(saved, tmp_path)
    if damage == "config":
        (root / "config.json").unlink()
    elif damage == "stats":
        (root / "dataset_statistics.json").unlink()
    elif damage == "tokenizer":
        (root / "tokenizer.model").unlink()
        (root / "tokenizer.json").unlink()
    elif damage == "weights":
        pt.unlink()
    elif damage == "section":
        edit_weights(pt, lambda m: m.pop("action_model"))
    else:
        config = json.loads((root / "config.json").read_text())
        config["future_action_window_size"] = 7
        (root / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        CogACTBackbone.from_pretrained(root)


def test_key_mapping_errors_list_expected_and_found(saved, tmp_path):
    root, pt = copy_of(saved, tmp_path)

    def rename(model):
        net = model["action_model"]
        net["net.x_embedder.weight"] = net.pop("net.x_embedder.linear.weight")
        vision = model["vision_backbone"]
        vision["dino_featurizer.blocks.0.ls1.scale_factor"] = vision.pop("dino_featurizer.blocks.0.ls1.gamma")
        model["projector"]["projector.1.weight"] = model["projector"].pop("projector.2.weight")
        model["llm_backbone"]["llm.lm_head.weight"] = model["llm_backbone"]["llm.lm_head.weight"][:, :10].clone()

    edit_weights(pt, rename)
    with pytest.raises(CheckpointError) as err:
        CogACTBackbone.from_pretrained(root)
    text = str(err.value)
    for part in [
        r"\[action_model\] expected but not found \(1\): net.x_embedder.linear.weight",
        r"\[action_model\] found but not expected \(1\): net.x_embedder.weight",
        r"\[vision_backbone\] expected but not found \(1\): dino_featurizer.blocks.0.ls1.gamma",
        r"\[vision_backbone\] found but not expected \(1\): dino_featurizer.blocks.0.ls1.scale_factor",
        r"\[projector\] expected but not found \(1\): projector.2.weight",
        r"\[llm_backbone\] shape mismatch \(1\): llm.lm_head.weight: file \(576, 10\) vs model \(576, 64\)",
    ]:
        assert re.search(part, text), (part, text)


def test_wrong_action_dim_is_a_shape_mismatch(saved, tmp_path):
    root, _ = copy_of(saved, tmp_path)
    config = json.loads((root / "config.json").read_text())
    config["action_dim"] = 6
    (root / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"net.x_embedder.linear.weight: file \(32, 7\) vs model \(32, 6\)"):
        CogACTBackbone.from_pretrained(root)


def test_unnorm_key_and_config_errors(saved):
    with pytest.raises(InputError, match="bridge_orig"):
        CogACTBackbone.from_pretrained(saved, unnorm_key="fractal20220817_data")
    with pytest.raises(InputError, match="exactly one"):
        CogACTBackbone.from_config(CogACTBackbone.Config())


# -- diffusion ----------------------------------------------------------------------------------------------


def _abar(t):  # alpha-bar of the cosine schedule at training step t (telescoped product), from the formula
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return f((t + 1) / 100) / f(0)


def test_cosine_schedule_and_ddim_steps():
    betas = cosine_betas(100)
    assert betas.shape == (100,) and betas.max() <= 0.999 and np.all(np.diff(betas) > 0)
    np.testing.assert_allclose(np.cumprod(1 - betas)[[0, 50, 90]], [_abar(0), _abar(50), _abar(90)], rtol=1e-12)
    assert ddim_timesteps(100, 10) == list(range(0, 100, 10))


def test_ddim_recovers_x0_with_an_oracle_and_visits_steps_in_order():
    sampler = DDIMSampler(100, 10)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 16, 7, generator=g), torch.randn(2, 16, 7, generator=g)
    seen = []

    def oracle(x, t):  # the exact noise that maps x0 to x at step t
        seen.append(int(t[0]))
        a = _abar(int(t[0]))
        return (x - math.sqrt(a) * x0) / math.sqrt(1 - a)

    out = sampler.sample(oracle, noise)
    assert seen == list(range(90, -1, -10))
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)
    # with zero predicted noise DDIM only rescales: x_T / sqrt(abar(90))
    torch.testing.assert_close(sampler.sample(lambda x, t: torch.zeros_like(x), noise), noise / math.sqrt(_abar(90)))


def test_cfg_is_the_batched_guided_combination(cog):
    net = cog.action_model.net
    g = torch.Generator().manual_seed(1)
    cognition, noise = torch.randn(2, 64, generator=g), torch.randn(2, 16, 7, generator=g)
    with torch.no_grad():
        guided = sample_actions(net, cognition, noise, cog.sampler, cfg_scale=1.5)
        uncond_z = net.z_embedder.uncondition[None].expand(2, 1, -1)

        def manual(x, t):
            c, u = net(x, t, cognition[:, None]), net(x, t, uncond_z)
            return u + 1.5 * (c - u)

        torch.testing.assert_close(guided, cog.sampler.sample(manual, noise), atol=1e-5, rtol=1e-5)
        plain = sample_actions(net, cognition, noise, cog.sampler, cfg_scale=1.0)
        torch.testing.assert_close(plain, cog.sampler.sample(lambda x, t: net(x, t, cognition[:, None]), noise))
    assert (guided - plain).abs().max() > 1e-3


def test_actions_shape_deterministic_and_postprocessed(cog, frames):
    images = np.stack([frames[0].images["primary"], frames[3].images["primary"]])
    obs = Observation({"primary": images}, frames[0].instruction)
    first, f1, n1 = predict(cog, obs)
    again, f2, n2 = predict(cog, obs)
    assert first.actions.shape == (2, 16, 7) and first.actions.dtype == np.float32
    np.testing.assert_array_equal(first.actions, again.actions)
    assert not np.array_equal(n1[0], n1[1])  # different images -> different cognition -> different actions
    stats = cog.config.norm_stats["bridge_orig"]["action"]
    q01, q99 = np.array(stats["q01"]), np.array(stats["q99"])
    expected = 0.5 * (np.clip(n1[..., :6], -1, 1) + 1) * (q99[:6] - q01[:6]) + q01[:6]
    np.testing.assert_allclose(first.actions[..., :6], expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(first.actions[..., 6], (n1[..., 6] >= 0.5).astype(np.float32))
    other = build_preset("tiny", seed=0, cfg_scale=1.0)
    assert not np.array_equal(predict(other, obs)[2], n1)


def test_noise_is_fresh_per_call_and_reseeded_at_episode_start(frames):
    """As CogACT's SIMPLER policy: new noise at every call; here from a generator seeded at episode start, so an
    episode replays exactly. noise="fixed" gives every call the episode's first draw."""
    cog = build_preset("tiny", seed=0)
    obs, other_task = frames[0], Observation(frames[0].images, "open the top drawer")
    first = [predict(cog, obs)[2] for _ in range(3)]
    assert not np.array_equal(first[0], first[1]) and not np.array_equal(first[1], first[2])
    cog.reset()
    np.testing.assert_array_equal(np.stack([predict(cog, obs)[2] for _ in range(3)]), np.stack(first))
    new_task = predict(cog, other_task)[2]  # a new instruction starts a new episode: the first draw again
    fixed = build_preset("tiny", seed=0, noise="fixed")
    np.testing.assert_array_equal(predict(fixed, other_task)[2], new_task)
    np.testing.assert_array_equal(predict(fixed, obs)[2], first[0])
    np.testing.assert_array_equal(predict(fixed, obs)[2], first[0])
    with pytest.raises(InputError, match="noise 'random' is not one of"):
        build_preset("tiny", noise="random")


# -- adaptive ensemble --------------------------------------------------------------------------------------


def test_ensembler_by_hand():
    ens = AdaptiveEnsembler(pred_action_horizon=2, adaptive_ensemble_alpha=0.1)
    c1 = np.array([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    c2 = np.array([[2.0, 0.0], [3.0, 3.0], [5.0, 5.0]])
    c3 = np.array([[0.0, 4.0], [9.0, 9.0], [9.0, 9.0]])
    np.testing.assert_allclose(ens.ensemble_action(c1), [1.0, 0.0])
    # step 2: c1 predicted [0, 1] for it, c2 predicts [2, 0]; cos to the newest: 0 and 1
    w = np.array([1.0, math.exp(0.1)]) / (1 + math.exp(0.1))
    np.testing.assert_allclose(ens.ensemble_action(c2), w[0] * np.array([0.0, 1.0]) + w[1] * np.array([2.0, 0.0]))
    # step 3: horizon 2 drops c1; c2 predicted [3, 3], c3 predicts [0, 4]; cos = 4/(sqrt(18)*4 + 1e-7), 1
    cos = 12 / (math.sqrt(18) * 4 + 1e-7)
    w = np.array([math.exp(0.1 * cos), math.exp(0.1)])
    w = w / w.sum()
    np.testing.assert_allclose(ens.ensemble_action(c3), w[0] * np.array([3.0, 3.0]) + w[1] * np.array([0.0, 4.0]))
    ens.reset()
    np.testing.assert_allclose(ens.ensemble_action(c3), [0.0, 4.0])
    # batched chunks [B, T, D] give the per-element results; alpha 0 is a plain mean
    batch = AdaptiveEnsembler(2, 0.1)
    single = [AdaptiveEnsembler(2, 0.1), AdaptiveEnsembler(2, 0.1)]
    for a, b in [(c1, c3), (c2, c1), (c3, c2)]:
        out = batch.ensemble_action(np.stack([a, b]))
        np.testing.assert_allclose(out, [single[0].ensemble_action(a), single[1].ensemble_action(b)])
    mean = AdaptiveEnsembler(2, 0.0)
    mean.ensemble_action(c1)
    np.testing.assert_allclose(mean.ensemble_action(c2), [1.0, 0.5])


def test_backbone_ensembles_and_resets(frames):
    plain = build_preset("tiny", seed=0, noise="fixed")
    ensembled = build_preset("tiny", seed=0, action_ensemble=True, ensemble_horizon=3, ensemble_alpha=0.1, noise="fixed")
    reference = AdaptiveEnsembler(3, 0.1)
    vla = CachedVLA(ensembled, None)
    for obs in frames[:4]:
        chunk = CachedVLA(plain, None).predict(obs).actions
        out = vla.predict(obs).actions
        assert out.shape == (1, 1, 7)
        np.testing.assert_allclose(out[:, 0], reference.ensemble_action(chunk), rtol=1e-6)
    ensembled.reset()
    np.testing.assert_allclose(vla.predict(frames[4]).actions[:, 0], CachedVLA(plain, None).predict(frames[4]).actions[:, 0])
    vla.predict(frames[5])
    other_task = Observation(frames[0].images, "open the top drawer")
    np.testing.assert_allclose(vla.predict(other_task).actions[:, 0], CachedVLA(plain, None).predict(other_task).actions[:, 0])


# -- VLA-Cache exactness on the cognition feature -----------------------------------------------------------


def test_zero_reuse_is_bit_identical_to_detached(cog, frames):
    layers = len(cog.decoder.layers)
    baseline = CachedVLA(cog, None)
    with CachedVLA(cog, None) as vla:
        vla.engine.attach()
        for obs in frames[:3]:
            a, fa, na = predict(cog, obs, vla=baseline)
            b, fb, nb = predict(cog, obs, plan=ReusePlan.empty(1, layers), vla=vla)
            assert torch.equal(fa, fb) and torch.equal(a.logits, b.logits)
            np.testing.assert_array_equal(na, nb)
            np.testing.assert_array_equal(a.actions, b.actions)
    assert b.stats.flops["decode"] == 0


def test_identical_frames_everything_reused_matches_full(cog, frames):
    layers = len(cog.decoder.layers)
    obs = frames[2]
    baseline, f_base, n_base = predict(cog, obs)
    with CachedVLA(cog, None) as vla:
        vla.engine.attach()
        predict(cog, obs, vla=vla)
        everything = cog.prepare(obs).layout.vision["primary"].positions()[None]
        second, f_reused, n_reused = predict(cog, obs, plan=ReusePlan([everything] * layers), vla=vla)
    assert second.stats.reused_per_layer == [256] * layers
    torch.testing.assert_close(f_reused, f_base, atol=1e-5, rtol=0)
    np.testing.assert_allclose(n_reused, n_base, atol=1e-3, rtol=0)


@pytest.mark.parametrize("plan_kind", ["policy", "nested"])
def test_realistic_reuse_matches_reference(cog, frames, plan_kind):
    """static_reuse's plan as is (same set at every layer), and nested prefixes of it growing with depth."""
    lm = cog.model.language_model
    embeds = [cog.embed(cog.prepare(o)) for o in (frames[0], frames[3])]
    with attach(cog, "static_reuse") as vla:
        vla.predict(frames[0])
        step, feature, normalized = predict(cog, frames[3], vla=vla)
    plan = step.plan
    if plan_kind == "nested":
        static = plan.reused[-1]
        n, layers = static.shape[1], len(plan.reused)
        plan = ReusePlan([static[:, : n * (i + 1) // layers] for i in range(layers)])
        with CachedVLA(cog, None) as vla:
            vla.engine.attach()
            vla.predict(frames[0])
            step, feature, normalized = predict(cog, frames[3], plan=plan, vla=vla)
        counts = step.stats.reused_per_layer
        assert counts == sorted(counts) and counts[-1] > counts[0] > 0
    assert 0 < step.stats.reuse_ratio < 1
    positions = torch.arange(embeds[0].shape[1])
    with torch.no_grad():
        _, kv1, _ = reference_forward(lm, embeds[0], positions)
        _, _, hidden = reference_forward(lm, embeds[1], positions, reused=plan.reused, previous_kv=kv1)
        _, _, no_reuse = reference_forward(lm, embeds[1], positions)
    torch.testing.assert_close(feature, hidden[:, -1], atol=1e-5, rtol=0)
    assert (no_reuse[:, -1] - hidden[:, -1]).abs().max() > 5e-5  # ignoring the reuse would fail the tolerance
    np.testing.assert_allclose(normalized, cog.sample_normalized(hidden[:, -1]), atol=1e-3, rtol=0)


def test_bench_self_checks_compare_calls_with_the_same_noise(frames):
    """The bench's exactness checks with the default (fresh per call) noise: each compared call is an episode's
    first, so zero reuse is bit-identical."""
    from vlacache.eval.bench import self_checks

    checks = self_checks(build_preset("tiny", seed=0), frames[:2])
    assert checks["zero_reuse_max_abs_diff"] == 0.0
    assert checks["identical_frame_max_abs_diff"] < 1e-2


def test_fastv_ranks_by_the_cognition_position_and_matches_the_masked_reference(cog, frames):
    """FastV on CogACT: the last position is the cognition token, so the visual tokens it attends to least in
    layer K-1 (mean over heads, in the independent forward) are dropped from layer K on, and the cognition
    feature equals the reference forward with those keys masked from layer K on."""
    lm = cog.model.language_model
    layer, layers = 1, len(cog.decoder.layers)
    prepared = cog.prepare(frames[3])
    visual = prepared.layout.vision["primary"].positions()
    embeds = cog.embed(prepared)
    with attach(cog, {"label": "fastv", "pruner": {"name": "fastv", "layer": layer, "ratio": 0.5}}) as vla:
        step, feature, _ = predict(cog, frames[3], vla=vla)
    positions = torch.arange(embeds.shape[1])
    with torch.no_grad():
        attentions = []
        _, _, full = reference_forward(lm, embeds, positions, attentions=attentions)
        drop = fastv_dropped(attentions[layer - 1], visual, embeds.shape[1])
        _, _, hidden = reference_forward(lm, embeds, positions, dropped=[None] * layer + [drop] * (layers - layer))
    assert step.stats.dropped_per_layer == [0] * layer + [len(visual) // 2] * (layers - layer)
    torch.testing.assert_close(feature, hidden[:, -1], atol=1e-5, rtol=0)
    assert (full[:, -1] - hidden[:, -1]).abs().max() > 5e-5  # the drop changes the feature: the check can fail
