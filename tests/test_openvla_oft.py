"""The OpenVLA-OFT backbone: layout, bidirectional attention, released-layout checkpoints, and the cache engine's
exactness under the bidirectional mask (against the independent plain-torch reference)."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from reference import reference_forward

import vlacache
from vlacache import CachedVLA, InputError, Observation, ReusePlan
from vlacache.backbones.common.checkpoint import CheckpointError
from vlacache.backbones.openvla_oft import OpenVLAOFTBackbone, build_preset
from vlacache.backbones.openvla_oft.backbone import META_KEY, STOP_TOKEN
from vlacache.backbones.common.statistics import normalize_q99
from vlacache.backbones.openvla_oft.heads import unnormalize_actions
from vlacache.images import center_crop
from vlacache.backbones.openvla_oft.tiny import LIBERO_PROPRIO_Q01, LIBERO_PROPRIO_Q99
from vlacache.registry import BACKBONES

PROPRIO = np.array([-0.05, 0.02, 1.05, 3.1, -0.1, -0.05, 0.02, -0.02], dtype=np.float32)


@pytest.fixture(scope="module")
def oft():
    return build_preset("tiny", seed=0)


@pytest.fixture(scope="module")
def scenes(frames):
    """224 x 224 frames (no resize: patch indices are exact): primary from the replay, wrist a different view."""
    def square(image):
        return np.array(Image.fromarray(image).resize((224, 224), Image.BICUBIC))

    primary = [square(f.images["primary"]) for f in frames]
    wrist = [np.ascontiguousarray(square(f.images["primary"])[::-1, ::-1].transpose(1, 0, 2)) for f in frames]
    return primary, wrist, frames[0].instruction


def observe(scenes, i, wrist=None, proprio=None, j=None):
    primary, wrists, instruction = scenes
    image = wrists[i if j is None else j] if wrist is None else wrist
    state = PROPRIO + 0.01 * i if proprio is None else proprio
    return Observation({"primary": primary[i], "wrist": image}, instruction, proprio=state)


def full_hidden(oft, obs, causal=False):
    inputs = oft.prepare(obs)
    with torch.no_grad():
        embeds = oft.embed(inputs)
        return inputs, embeds, oft.run_decoder(embeds, oft.new_cache(), causal=causal)


def head_actions(oft, inputs, hidden):
    readout = inputs.layout.extra["readout"]
    with torch.no_grad():
        return oft.unnormalize(oft.normalized_actions(hidden[:, readout.start:readout.stop]).detach().numpy())


# -- layout and inputs --------------------------------------------------------------------------------------------
def test_registered_and_layout(oft, scenes):
    assert BACKBONES.get("openvla-oft") is OpenVLAOFTBackbone
    obs = observe(scenes, 0)
    inputs = oft.prepare(obs)
    layout = inputs.layout
    ids = inputs.model_inputs["input_ids"][0].tolist()
    assert ids == oft.prompt_ids(scenes[2]) and ids[0] == oft.tokenizer.bos_token_id and ids[-1] == oft.space_token
    text = len(ids) - 1
    assert layout.length == 1 + 512 + 1 + text + 56 + 1
    assert (layout.vision["primary"].start, layout.vision["primary"].stop) == (1, 257)
    assert (layout.vision["wrist"].start, layout.vision["wrist"].stop) == (257, 513)
    assert layout.vision["wrist"].rows == 16 and layout.num_visual == 512
    extra = layout.extra
    assert (extra["bos"].start, extra["proprio"].start, extra["proprio"].stop) == (0, 513, 514)
    assert (layout.text.start, layout.text.stop) == (514, 514 + text)
    assert (extra["actions"].start, len(extra["actions"])) == (514 + text, 56)
    assert (extra["stop"].start, extra["stop"].stop) == (514 + text + 56, layout.length)
    # OFT's head reads the next-token-aligned rows: the last prompt token and the first 55 placeholders
    assert (extra["readout"].start, extra["readout"].stop) == (extra["actions"].start - 1, extra["actions"].stop - 1)
    assert inputs.model_inputs["pixel_values"].shape == (1, 12, 224, 224)
    assert {k: tuple(v.shape) for k, v in inputs.query_images.items()} == {"primary": (1, 224, 224, 3), "wrist": (1, 224, 224, 3)}


def test_embeddings_zero_placeholders_stop_proprio_and_per_camera_towers(oft, scenes):
    obs = observe(scenes, 1)
    inputs, embeds, _ = full_hidden(oft, obs)
    layout = inputs.layout
    table = oft.model.language_model.get_input_embeddings().weight
    actions = layout.extra["actions"]
    assert embeds.shape == (1, layout.length, table.shape[1])
    assert torch.count_nonzero(embeds[:, actions.start:actions.stop]) == 0
    assert torch.count_nonzero(embeds[:, layout.text.stop - 1]) > 0
    assert torch.equal(embeds[0, -1], table[STOP_TOKEN]) and torch.equal(embeds[0, 0], table[oft.tokenizer.bos_token_id])
    assert torch.equal(embeds[0, layout.text.start:layout.text.stop], table[inputs.model_inputs["input_ids"][0, 1:]])
    proprio = torch.from_numpy(normalize_q99(obs.proprio[None], oft.config.norm_stats[oft.unnorm_key]["proprio"])).float()
    with torch.no_grad():
        torch.testing.assert_close(embeds[0, 513], oft.proprio_projector(proprio)[0], atol=1e-6, rtol=0)
        pixels = inputs.model_inputs["pixel_values"]
        for camera, channels in (("primary", slice(0, 6)), ("wrist", slice(6, 12))):
            span = layout.vision[camera]
            alone = oft.model.projector(oft.model.vision_backbone(pixels[:, channels]))  # OFT: each image separately
            torch.testing.assert_close(embeds[:, span.start:span.stop], alone, atol=1e-6, rtol=0)


def test_bidirectional_mask_reaches_the_stock_decoder(oft, scenes):
    """The 4-D mask arrives as-is at every layer; sdpa honours it (= the plain-torch bidirectional reference),
    and stock causal attention gives different hidden states and actions."""
    seen = []
    handle = oft.decoder.layers[0].self_attn.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw.get("attention_mask")), with_kwargs=True)
    try:
        inputs, embeds, hidden = full_hidden(oft, observe(scenes, 0))
    finally:
        handle.remove()
    length = inputs.layout.length
    assert seen[0].shape == (1, 1, length, length) and seen[0].dtype == torch.bool and bool(seen[0].all())
    lm = oft.model.language_model
    positions = torch.arange(length)
    with torch.no_grad():
        bidirectional = reference_forward(lm, embeds, positions, causal=False)[2]
        causal = reference_forward(lm, embeds, positions, causal=True)[2]
        _, _, stock_causal = full_hidden(oft, observe(scenes, 0), causal=True)
    torch.testing.assert_close(hidden, bidirectional, atol=1e-5, rtol=0)
    torch.testing.assert_close(stock_causal, causal, atol=1e-5, rtol=0)
    readout = inputs.layout.extra["readout"]
    assert (hidden[:, readout.start:readout.stop] - stock_causal[:, readout.start:readout.stop]).abs().max() > 1e-2
    assert np.abs(head_actions(oft, inputs, hidden) - head_actions(oft, inputs, stock_causal)).max() > 1e-3
    # even the visual rows differ: under bidirectional attention they see the text, proprio and action rows
    assert (hidden[:, 1:513] - stock_causal[:, 1:513]).abs().max() > 1e-3


def test_eager_attention_gets_an_additive_mask_and_agrees(scenes):
    sdpa, eager = build_preset("tiny", seed=3), build_preset("tiny", seed=3, attn_implementation="eager")
    obs = observe(scenes, 2)
    a, b = CachedVLA(sdpa, None).predict(obs), CachedVLA(eager, None).predict(obs)
    np.testing.assert_allclose(a.actions, b.actions, atol=1e-5, rtol=0)
    mask = eager.attention_mask(1, 5, torch.device("cpu"), torch.float32)
    assert mask.dtype == torch.float32 and not mask.any()


def test_predict_returns_a_chunk_of_unnormalised_actions(oft, scenes):
    step = CachedVLA(oft, None).predict(observe(scenes, 0))
    assert step.actions.shape == (1, 8, 7) and step.actions.dtype == np.float32
    assert step.logits.shape == (1, oft.model.language_model.config.vocab_size)
    assert step.stats.flops["decode"] == 0 and oft.decode_passes() == 0
    assert oft.vision_flops() > 2 * vlacache.backbones.openvla.build_preset("tiny").vision_flops() > 0


def test_batch_of_two_matches_single_observations(oft, scenes):
    single = [CachedVLA(oft, None).predict(observe(scenes, i)) for i in (0, 1)]
    primary, wrist, instruction = scenes
    batch = Observation({"primary": np.stack(primary[:2]), "wrist": np.stack(wrist[:2])}, instruction,
                        proprio=np.stack([PROPRIO, PROPRIO + 0.01]))
    both = CachedVLA(oft, None).predict(batch)
    assert both.actions.shape == (2, 8, 7)
    np.testing.assert_allclose(both.actions, np.concatenate([s.actions for s in single]), atol=1e-5, rtol=0)


# -- proprio, actions, preprocessing ---------------------------------------------------------------------------------
def test_proprio_normalisation_and_errors(oft, scenes):
    stats = oft.config.norm_stats[oft.unnorm_key]["proprio"]
    q01, q99 = np.array(LIBERO_PROPRIO_Q01), np.array(LIBERO_PROPRIO_Q99)
    p = np.array(PROPRIO, dtype=np.float64)
    expected = 2 * (p - q01) / (q99 - q01 + 1e-8) - 1
    np.testing.assert_allclose(normalize_q99(p, stats), np.clip(expected, -1, 1), atol=1e-12)
    assert normalize_q99(q99 + 5, stats).max() == 1.0 and normalize_q99(q01 - 5, stats).min() == -1.0
    np.testing.assert_allclose(normalize_q99(q01, stats), -1.0, atol=1e-6)
    masked = dict(stats, mask=[True] * 7 + [False])
    assert normalize_q99(np.full(8, 0.5), masked)[-1] == 0.5
    inputs = oft.prepare(observe(scenes, 0))
    np.testing.assert_allclose(inputs.model_inputs["proprio"][0].numpy(), np.clip(expected, -1, 1), atol=1e-6)
    with pytest.raises(InputError, match="proprio=np.float32\\[8\\]"):
        oft.prepare(Observation({"primary": scenes[0][0], "wrist": scenes[1][0]}, scenes[2]))
    with pytest.raises(InputError, match="shape"):
        oft.prepare(observe(scenes, 0, proprio=np.zeros(7, np.float32)))
    with pytest.raises(InputError, match="NaN"):
        oft.prepare(observe(scenes, 0, proprio=np.full(8, np.nan, np.float32)))
    with pytest.raises(InputError, match="wrist"):
        oft.prepare(Observation({"primary": scenes[0][0]}, scenes[2], proprio=PROPRIO))


def test_action_unnormalisation_is_bounds_q99():
    stats = {"q01": [-1.0, 0.0, 2.0], "q99": [1.0, 4.0, 3.0], "mask": [True, True, False]}
    out = unnormalize_actions(np.array([[0.0, 1.0, 0.25]]), stats)
    np.testing.assert_allclose(out, [[0.0, 4.0, 0.25]], atol=1e-7)


def test_center_crop_matches_crop_and_resize_geometry():
    image = torch.arange(224, dtype=torch.float32).view(1, 1, 224, 1).expand(1, 224, 224, 3).round().to(torch.uint8)
    out = center_crop(image)
    assert out.shape == image.shape and out.dtype == torch.uint8
    lo = (1 - 0.9**0.5) / 2 * 223
    assert abs(int(out[0, 0, 0, 0]) - lo) <= 1 and abs(int(out[0, 0, 223, 0]) - (223 - lo)) <= 1
    assert torch.equal(center_crop(image, scale=1.0), image)


# -- checkpoints in the released layout ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(oft, tmp_path_factory):
    path = tmp_path_factory.mktemp("oft-tiny")
    oft.save_pretrained(path, max_shard_bytes=400_000, step=150000)
    return path


def test_saved_in_the_released_layout(saved):
    names = {p.name for p in saved.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.model", "tokenizer_config.json",
            "action_head--150000_checkpoint.pt", "proprio_projector--150000_checkpoint.pt"} <= names
    head = torch.load(saved / "action_head--150000_checkpoint.pt", weights_only=True)
    projector = torch.load(saved / "proprio_projector--150000_checkpoint.pt", weights_only=True)
    assert all(k.startswith("module.") for k in (*head, *projector))
    assert {v.dtype for v in head.values()} == {torch.bfloat16} and {v.dtype for v in projector.values()} == {torch.float32}
    for key in ("module.model.layer_norm1.weight", "module.model.fc1.weight", "module.model.mlp_resnet_blocks.1.ffn.0.weight",
                "module.model.mlp_resnet_blocks.1.ffn.1.weight", "module.model.layer_norm2.bias", "module.model.fc2.weight"):
        assert key in head
    assert head["module.model.fc1.weight"].shape == (64, 7 * 64) and head["module.model.fc2.weight"].shape == (7, 64)
    assert projector["module.fc1.weight"].shape == (64, 8) and projector["module.fc2.weight"].shape == (64, 64)


def test_round_trip_gives_identical_actions(oft, saved, scenes):
    loaded = OpenVLAOFTBackbone.from_pretrained(saved)
    for i in (0, 3):
        a, b = CachedVLA(oft, None).predict(observe(scenes, i)), CachedVLA(loaded, None).predict(observe(scenes, i))
        assert torch.equal(a.logits, b.logits)
        np.testing.assert_array_equal(a.actions, b.actions)
    config = OpenVLAOFTBackbone.Config(checkpoint=str(saved), device="cpu", step="150000")
    np.testing.assert_array_equal(OpenVLAOFTBackbone.from_config(config).decode(*_prefill(loaded, observe(scenes, 0))).actions,
                                  CachedVLA(oft, None).predict(observe(scenes, 0)).actions)


def _prefill(backbone, obs):
    inputs = backbone.prepare(obs)
    cache = backbone.new_cache()
    with torch.no_grad():
        return backbone.prefill(backbone.embed(inputs), inputs, cache), inputs, cache


def _copy(saved, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    return broken


@pytest.mark.parametrize("part", ["action_head", "proprio_projector"])
def test_missing_part_file_fails_naming_it(saved, tmp_path, part):
    broken = _copy(saved, tmp_path)
    (broken / f"{part}--150000_checkpoint.pt").unlink()
    with pytest.raises(CheckpointError, match=f"missing .*{part}--\\*_checkpoint.pt"):
        OpenVLAOFTBackbone.from_pretrained(broken)


def test_mismatched_head_key_and_width_fail_naming_them(saved, tmp_path):
    broken = _copy(saved, tmp_path)
    path = broken / "action_head--150000_checkpoint.pt"
    head = torch.load(path, weights_only=True)
    head["module.model.fc3.weight"] = head.pop("module.model.layer_norm2.weight")
    torch.save(head, path)
    with pytest.raises(CheckpointError, match=r"(?s)action_head--150000.*missing keys.*model\.layer_norm2\.weight"
                                              r".*unexpected keys.*model\.fc3\.weight"):
        OpenVLAOFTBackbone.from_pretrained(broken)
    head = torch.load(saved / "action_head--150000_checkpoint.pt", weights_only=True)
    head["module.model.fc1.weight"] = head["module.model.fc1.weight"][:, :6 * 64]
    head["module.model.layer_norm1.weight"] = head["module.model.layer_norm1.weight"][: 6 * 64]
    torch.save(head, path)
    with pytest.raises(CheckpointError, match=r"model\.fc1\.weight takes 384 inputs.*7 x decoder width 64 = 448"):
        OpenVLAOFTBackbone.from_pretrained(broken)


def test_wrong_chunk_film_and_ambiguous_parts_fail(saved, tmp_path):
    with pytest.raises(CheckpointError, match="chunks of 8 actions.*chunk=5"):
        OpenVLAOFTBackbone.from_pretrained(saved, chunk=5)
    film = OpenVLAOFTBackbone.from_config(OpenVLAOFTBackbone.Config(preset="tiny", use_film=True))
    assert film.film is not None  # a random-weight FiLM preset; checkpoints switch FiLM on by their file
    broken = _copy(saved, tmp_path)
    shutil.copy(broken / "action_head--150000_checkpoint.pt", broken / "action_head--latest_checkpoint.pt")
    with pytest.raises(CheckpointError, match="several action head files"):
        OpenVLAOFTBackbone.from_pretrained(broken)
    assert OpenVLAOFTBackbone.from_pretrained(broken, step=150000).chunk == 8
    shutil.copy(broken / "proprio_projector--150000_checkpoint.pt", broken / "vision_backbone--150000_checkpoint.pt")
    with pytest.raises(CheckpointError, match="FiLM"):
        OpenVLAOFTBackbone.from_pretrained(broken, step=150000)


def test_without_proprio_projector(scenes):
    plain = build_preset("tiny", use_proprio=False)
    inputs = plain.prepare(Observation({"primary": scenes[0][0], "wrist": scenes[1][0]}, scenes[2]))
    assert "proprio" not in inputs.layout.extra and inputs.layout.text.start == 513
    assert CachedVLA(plain, None).predict(Observation({"primary": scenes[0][0], "wrist": scenes[1][0]},
                                                      scenes[2])).actions.shape == (1, 8, 7)


# -- the cache engine under the bidirectional mask ---------------------------------------------------------------
def test_zero_reuse_is_bit_identical_to_detached(oft, scenes):
    with CachedVLA(oft, None) as vla:
        vla.engine.attach()
        for i in range(3):
            obs = observe(scenes, i)
            baseline = CachedVLA(oft, None).predict(obs)
            step = vla.predict(obs, plan=ReusePlan.empty(1, len(oft.decoder.layers)))
            _, _, hidden = full_hidden(oft, obs)
            assert torch.equal(step.logits, baseline.logits)
            np.testing.assert_array_equal(step.actions, baseline.actions)
            assert torch.equal(vla.engine.episode.final_hidden, hidden)


def test_identical_frames_and_proprio_everything_visual_reused_matches_full(oft, scenes):
    layers = len(oft.decoder.layers)
    obs = observe(scenes, 2)
    baseline = CachedVLA(oft, None).predict(obs)
    _, _, full = full_hidden(oft, obs)
    with CachedVLA(oft, None) as vla:
        vla.engine.attach()
        vla.predict(obs)
        layout = oft.prepare(obs).layout
        everything = torch.cat([layout.vision[c].positions() for c in oft.cameras])[None]
        second = vla.predict(obs, plan=ReusePlan([everything] * layers))
        hidden = vla.engine.episode.final_hidden
    assert second.stats.reused_per_layer == [512] * layers and second.stats.reuse_ratio == 1.0
    torch.testing.assert_close(hidden, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(second.logits, baseline.logits, atol=1e-5, rtol=0)
    np.testing.assert_allclose(second.actions, baseline.actions, atol=1e-5, rtol=0)
    # bidirectional caveat: visual K/V depend on the later rows too, so identical frames with a DIFFERENT proprio
    # reuse K/V that full compute would not reproduce (an approximation, not an engine error)
    moved = observe(scenes, 2, proprio=obs.proprio + 0.05)
    with CachedVLA(oft, None) as vla:
        vla.engine.attach()
        vla.predict(obs)
        stale = vla.predict(moved, plan=ReusePlan([everything] * layers))
    assert np.abs(stale.actions - CachedVLA(oft, None).predict(moved).actions).max() > 1e-5


def nested_plan(layout, layers):
    """Nested reuse sets growing with depth, in both camera spans (none at layer 0)."""
    p, w = layout.vision["primary"].start, layout.vision["wrist"].start
    sets = [[], [p + 3, p + 4, w + 10], [p + 3, p + 4, p + 40, p + 41, w + 10, w + 11, w + 200],
            [p + 3, p + 4, p + 40, p + 41, p + 255, w + 0, w + 10, w + 11, w + 200, w + 201]]
    sets += [sets[-1]] * (layers - len(sets))
    return ReusePlan([torch.tensor([s], dtype=torch.long).view(1, -1) for s in sets[:layers]])


def test_realistic_reuse_matches_bidirectional_reference(oft, scenes):
    lm = oft.model.language_model
    first, second = observe(scenes, 0), observe(scenes, 1)
    layout = oft.prepare(first).layout
    plan = nested_plan(layout, len(oft.decoder.layers))
    with CachedVLA(oft, None) as vla:
        vla.engine.attach()
        vla.predict(first)
        step = vla.predict(second, plan=plan)
        hidden = vla.engine.episode.final_hidden
    inputs = oft.prepare(second)
    positions = torch.arange(layout.length)
    with torch.no_grad():
        _, kv1, _ = reference_forward(lm, oft.embed(oft.prepare(first)), positions, causal=False)
        embeds = oft.embed(inputs)
        _, _, ref = reference_forward(lm, embeds, positions, reused=plan.reused, previous_kv=kv1, causal=False)
        _, _, plain = reference_forward(lm, embeds, positions, causal=False)
    kept = torch.ones(layout.length, dtype=torch.bool)
    kept[plan.reused[-1][0]] = False
    torch.testing.assert_close(hidden[:, kept], ref[:, kept], atol=1e-5, rtol=0)
    readout = layout.extra["readout"]
    np.testing.assert_allclose(step.actions, head_actions(oft, inputs, ref), atol=1e-5, rtol=0)
    # the reference is sensitive: without the overwrite the action rows clearly differ
    assert (plain[:, readout.start:readout.stop] - ref[:, readout.start:readout.stop]).abs().max() > 1e-4


def test_static_reuse_policy_compares_each_camera_with_its_own_previous_image(oft, scenes):
    """Only the wrist image changes (in a known block of patches): no primary patch loses reuse, the changed wrist
    patches are not reused, and the cached step equals the bidirectional reference for the plan it used."""
    primary, wrists, _ = scenes
    changed_wrist = wrists[0].copy()
    rng = np.random.default_rng(0)
    changed_wrist[0:28, 0:42] = rng.integers(0, 256, size=(28, 42, 3), dtype=np.uint8)  # patch rows 0-1, cols 0-2
    changed = {0, 1, 2, 16, 17, 18}
    first = observe(scenes, 0, proprio=PROPRIO)
    second = observe(scenes, 0, wrist=changed_wrist, proprio=PROPRIO)
    layout = oft.prepare(first).layout
    p, w = layout.vision["primary"], layout.vision["wrist"]
    all_static = {"label": "static-all", "selector": {"name": "pixel-cosine", "tau": 0.996, "top_k": None},
                  "scheduler": {"name": "constant", "fraction": 1.0, "start_layer": 0}}
    for policy, primary_reused in (("static_reuse", 100), (all_static, 256)):
        with vlacache.attach(oft, policy) as vla:
            assert sum(vla.predict(first).stats.reused_per_layer) == 0
            step = vla.predict(second)
        reused = set(step.plan.reused[-1][0].tolist())
        assert len([i for i in reused if p.start <= i < p.stop]) == primary_reused
        wrist_reused = {i - w.start for i in reused if w.start <= i < w.stop}
        assert wrist_reused and not wrist_reused & changed
        assert not step.plan.info["static"]["wrist"][0, sorted(changed)].any()
    assert len(wrist_reused) == 256 - len(changed)
    # the last step (everything static reused): equal to the reference with that plan
    positions = torch.arange(layout.length)
    lm = oft.model.language_model
    inputs = oft.prepare(second)
    with torch.no_grad():
        _, kv1, _ = reference_forward(lm, oft.embed(oft.prepare(first)), positions, causal=False)
        _, _, ref = reference_forward(lm, oft.embed(inputs), positions, reused=step.plan.reused, previous_kv=kv1, causal=False)
    np.testing.assert_allclose(step.actions, head_actions(oft, inputs, ref), atol=1e-5, rtol=0)


def test_policy_steps_with_both_cameras_and_a_moving_scene(oft, scenes):
    with vlacache.attach(oft, "static_reuse") as vla:
        steps = [vla.predict(observe(scenes, i)) for i in range(4)]
    assert steps[0].stats.episode_reset and sum(steps[0].stats.reused_per_layer) == 0
    assert all(0 < s.stats.reuse_ratio <= 1 for s in steps[1:])
    assert all(s.actions.shape == (1, 8, 7) and np.isfinite(s.actions).all() for s in steps)


def test_other_sizes_go_through_the_official_resize_for_policy(oft, frames):
    """OFT's get_vla_action resizes any frame that is not 224 x 224 with resize_image_for_policy (TF JPEG round
    trip + Lanczos-3), not with the processor's bicubic."""
    from vlacache.images import resize_for_policy

    frame = frames[0].images["primary"]
    assert frame.shape == (256, 256, 3)
    inputs = oft.prepare(Observation({"primary": frame, "wrist": frame[::-1].copy()}, frames[0].instruction, proprio=PROPRIO))
    assert torch.equal(inputs.query_images["primary"][0], torch.from_numpy(resize_for_policy(frame, 224)))
    assert torch.equal(inputs.query_images["wrist"][0], torch.from_numpy(resize_for_policy(frame[::-1].copy(), 224)))


def test_center_crop_defaults_to_the_checkpoints_own_choice(tmp_path):
    """A released OFT directory (no vlacache record) is evaluated center-cropped, as OFT's LIBERO evaluation does;
    one saved by vlacache records its own choice; an explicit setting wins; a config resolves the same way."""
    from vlacache.eval.fingerprint import component
    from vlacache.experiment import resolve_backbone_spec

    cropped = build_preset("tiny", center_crop=True)
    cropped.save_pretrained(tmp_path / "cropped")
    build_preset("tiny").save_pretrained(tmp_path / "plain")
    assert OpenVLAOFTBackbone.from_pretrained(tmp_path / "cropped").center_crop is True
    assert OpenVLAOFTBackbone.from_pretrained(tmp_path / "plain").center_crop is False
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    del config[META_KEY]
    (tmp_path / "plain" / "config.json").write_text(json.dumps(config))  # now laid out like a released checkpoint
    assert OpenVLAOFTBackbone.from_pretrained(tmp_path / "plain").center_crop is True
    assert OpenVLAOFTBackbone.from_pretrained(tmp_path / "plain", center_crop=False).center_crop is False
    spec = {"name": "openvla-oft", "checkpoint": str(tmp_path / "plain")}
    assert component(BACKBONES, spec, "backbone")[1]["center_crop"] is True  # what a run's fingerprint records
    assert component(BACKBONES, resolve_backbone_spec("micro_oft_libero_spatial"), "backbone")[1]["center_crop"] is False


def test_a_checkpoint_loaded_as_the_wrong_family_is_refused_naming_the_right_backbone(tmp_path):
    from vlacache.backbones.openvla import OpenVLABackbone
    from vlacache.backbones.openvla import build_preset as openvla_preset
    from vlacache.experiment import build_backbone

    build_preset("tiny").save_pretrained(tmp_path / "oft")
    with pytest.raises(CheckpointError, match="is an OpenVLA-OFT checkpoint .* load it as backbone 'openvla-oft'"):
        OpenVLABackbone.from_pretrained(tmp_path / "oft")
    with pytest.raises(CheckpointError, match="load it as backbone 'openvla-oft'"):
        build_backbone({"name": "openvla", "checkpoint": str(tmp_path / "oft")})
    config = json.loads((tmp_path / "oft" / "config.json").read_text())
    del config[META_KEY]
    (tmp_path / "oft" / "config.json").write_text(json.dumps(config))  # a released OFT directory: no vlacache record
    with pytest.raises(CheckpointError, match="load it as backbone 'openvla-oft'"):  # the head file marks it
        OpenVLABackbone.from_pretrained(tmp_path / "oft")
    for part in (tmp_path / "oft").glob("*_checkpoint.pt"):
        part.unlink()
    OpenVLABackbone.from_pretrained(tmp_path / "oft")  # now an OpenVLA layout: it loads
    openvla_preset("tiny").save_pretrained(tmp_path / "plain")
    with pytest.raises(CheckpointError, match="a plain OpenVLA checkpoint: load it as backbone 'openvla'"):
        OpenVLAOFTBackbone.from_pretrained(tmp_path / "plain")
