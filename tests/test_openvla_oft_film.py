"""OpenVLA-OFT with FiLM: language-modulated towers, the released vision_backbone--*_checkpoint.pt layout, and the
cache engine's exactness with FiLM on."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from vlacache import CachedVLA, Observation, ReusePlan
from vlacache.backbones.common.checkpoint import CheckpointError
from vlacache.backbones.openvla_oft import OpenVLAOFTBackbone, build_preset
from vlacache.backbones.openvla_oft.backbone import STOP_TOKEN

PROPRIO = np.array([-0.05, 0.02, 1.05, 3.1, -0.1, -0.05, 0.02, -0.02], dtype=np.float32)
FILE = "vision_backbone--150000_checkpoint.pt"


@pytest.fixture(scope="module")
def plain():
    return build_preset("tiny", seed=0)


@pytest.fixture(scope="module")
def filmed():
    return build_preset("tiny", seed=0, film=True)


@pytest.fixture(scope="module")
def scenes(frames):
    def square(image):
        return np.array(Image.fromarray(image).resize((224, 224), Image.BICUBIC))

    primary = [square(f.images["primary"]) for f in frames]
    wrist = [np.ascontiguousarray(p[::-1, ::-1].transpose(1, 0, 2)) for p in primary]
    return primary, wrist, frames[0].instruction


def observe(scenes, i, instruction=None):
    primary, wrist, default = scenes
    return Observation({"primary": primary[i], "wrist": wrist[i]}, instruction or default, proprio=PROPRIO + 0.01 * i)


def embeds_of(backbone, obs):
    inputs = backbone.prepare(obs)
    with torch.no_grad():
        return inputs, backbone.embed(inputs)


def test_zero_film_projections_equal_the_plain_model_exactly(plain, scenes):
    zero = build_preset("tiny", seed=0, film=True)
    with torch.no_grad():
        for param in zero.film.parameters():
            param.zero_()
    for i in (0, 2):
        obs = observe(scenes, i)
        assert torch.equal(embeds_of(zero, obs)[1], embeds_of(plain, obs)[1])
        a, b = CachedVLA(zero, None).predict(obs), CachedVLA(plain, None).predict(obs)
        assert torch.equal(a.logits, b.logits)
        np.testing.assert_array_equal(a.actions, b.actions)


def test_film_changes_visual_features_and_depends_on_the_instruction(plain, filmed, scenes):
    obs = observe(scenes, 0)
    inputs, film_embeds = embeds_of(filmed, obs)
    _, plain_embeds = embeds_of(plain, obs)
    visual = slice(1, 1 + inputs.layout.num_visual)
    assert (film_embeds[:, visual] - plain_embeds[:, visual]).abs().max() > 1e-3
    # text, proprio, placeholders and stop rows are untouched by FiLM
    assert torch.equal(film_embeds[:, inputs.layout.text.start:], plain_embeds[:, inputs.layout.text.start:])
    other = observe(scenes, 0, instruction="put the bowl on the plate")
    _, film_other = embeds_of(filmed, other)
    _, plain_other = embeds_of(plain, other)
    assert torch.equal(plain_other[:, visual], plain_embeds[:, visual])  # without FiLM: instruction-independent
    assert (film_other[:, visual] - film_embeds[:, visual]).abs().max() > 1e-4
    assert not np.array_equal(CachedVLA(filmed, None).predict(obs).actions, CachedVLA(plain, None).predict(obs).actions)


def test_film_input_is_the_mean_of_bos_prompt_and_stop_embeddings_for_both_cameras_and_towers(filmed, scenes):
    seen = {}
    hooks = [getattr(filmed.film, tower).blocks[0].scale.register_forward_hook(
        lambda module, args, out, tower=tower: seen.__setitem__(tower, args[0].clone()))
        for tower in ("featurizer", "fused_featurizer")]
    try:
        inputs, embeds = embeds_of(filmed, observe(scenes, 1))
    finally:
        for hook in hooks:
            hook.remove()
    table = filmed.model.language_model.get_input_embeddings().weight
    ids = inputs.model_inputs["input_ids"][0].tolist()  # BOS + prompt (incl. the trailing space token)
    expected = table[ids + [STOP_TOKEN]].mean(dim=0)
    for tower in ("featurizer", "fused_featurizer"):
        assert seen[tower].shape == (2, table.shape[1])  # camera-major rows: primary, wrist
        torch.testing.assert_close(seen[tower], expected.expand(2, -1), atol=1e-7, rtol=0)
    # each camera equals its image alone through the FiLM towers
    pixels = inputs.model_inputs["pixel_values"]
    with torch.no_grad():
        for camera, channels in (("primary", slice(0, 6)), ("wrist", slice(6, 12))):
            span = inputs.layout.vision[camera]
            alone = filmed.model.projector(filmed.film(filmed.model.vision_backbone, pixels[:, channels], expected[None]))
            torch.testing.assert_close(embeds[:, span.start:span.stop], alone, atol=1e-6, rtol=0)


def test_film_block_math_is_attention_then_modulation_then_mlp(filmed):
    tower, film = filmed.model.vision_backbone.featurizer, filmed.film.featurizer
    pixels = torch.randn(1, 3, 224, 224)
    language = torch.randn(1, filmed.film.llm_dim)
    with torch.no_grad():
        x = tower.patch_embed(pixels) + tower.pos_embed
        x = torch.cat([tower.cls_token, tower.reg_token, x], dim=1)
        for block, proj in list(zip(tower.blocks, film.blocks))[: tower.spec.depth - 1]:
            x = x + block.ls1(block.attn(block.norm1(x)))
            x = (1 + proj.scale(language)[:, None]) * x + proj.shift(language)[:, None]
            x = x + block.ls2(block.mlp(block.norm2(x)))
        torch.testing.assert_close(film(tower, pixels, language), x[:, 5:], atol=1e-6, rtol=0)


# -- the released layout ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(filmed, tmp_path_factory):
    path = tmp_path_factory.mktemp("oft-film")
    filmed.save_pretrained(path, max_shard_bytes=400_000, step=150000)
    return path


def test_saved_film_file_is_in_the_released_layout(saved):
    state = torch.load(saved / FILE, weights_only=True)
    assert not any(k.startswith("module.") for k in state)
    assert all(k.startswith("vision_backbone.featurizer.") or k.startswith("vision_backbone.fused_featurizer.") for k in state)
    for tower, width, depth in (("featurizer", 32, 3), ("fused_featurizer", 48, 3)):
        for i in range(depth):
            prefix = f"vision_backbone.{tower}.blocks.{i}."
            assert state[prefix + "scale.weight"].shape == (width, 64) and state[prefix + "shift.bias"].shape == (width,)
            assert state[prefix + "block.attn.qkv.base_layer.weight"].shape == (3 * width, width)
            assert state[prefix + "block.attn.qkv.lora_A.default.weight"].shape == (32, width)
            assert prefix + "block.norm1.weight" in state and prefix + "block.mlp.fc2.base_layer.bias" in state
    assert "vision_backbone.featurizer.blocks.0.block.ls1.scale_factor" in state
    assert "vision_backbone.fused_featurizer.attn_pool.q.base_layer.weight" in state
    assert "vision_backbone.featurizer.patch_embed.proj.weight" in state


def test_round_trip_with_film_gives_identical_actions(filmed, saved, scenes):
    loaded = OpenVLAOFTBackbone.from_pretrained(saved)  # FiLM switched on by the vision_backbone file
    assert loaded.film is not None
    for i in (0, 3):
        a, b = CachedVLA(filmed, None).predict(observe(scenes, i)), CachedVLA(loaded, None).predict(observe(scenes, i))
        assert torch.equal(a.logits, b.logits)
        np.testing.assert_array_equal(a.actions, b.actions)
    config = OpenVLAOFTBackbone.Config(checkpoint=str(saved), device="cpu", use_film=True, step="150000")
    np.testing.assert_array_equal(CachedVLA(OpenVLAOFTBackbone.from_config(config), None).predict(observe(scenes, 1)).actions,
                                  CachedVLA(filmed, None).predict(observe(scenes, 1)).actions)


def test_ddp_prefix_and_lora_factors_are_merged(filmed, saved, tmp_path, scenes):
    copy = tmp_path / "lora"
    shutil.copytree(saved, copy)
    state = torch.load(copy / FILE, weights_only=True)
    generator = torch.Generator().manual_seed(0)
    key = "vision_backbone.fused_featurizer.blocks.1.block.mlp.fc1"
    weight = state[key + ".base_layer.weight"]
    a = torch.randn(state[key + ".lora_A.default.weight"].shape, generator=generator) * 0.05
    b = torch.randn(state[key + ".lora_B.default.weight"].shape, generator=generator) * 0.05
    state[key + ".lora_A.default.weight"], state[key + ".lora_B.default.weight"] = a, b
    state[key + ".base_layer.weight"] = weight - (16 / 32) * (b @ a)  # peft scaling lora_alpha / r, alpha = min(r, 16)
    torch.save({"module." + k: v for k, v in state.items()}, copy / FILE)
    loaded = OpenVLAOFTBackbone.from_pretrained(copy)
    torch.testing.assert_close(loaded.model.vision_backbone.fused_featurizer.blocks[1].mlp.fc1.weight, weight, atol=1e-6, rtol=0)
    np.testing.assert_allclose(CachedVLA(loaded, None).predict(observe(scenes, 0)).actions,
                               CachedVLA(filmed, None).predict(observe(scenes, 0)).actions, atol=1e-4)


def test_mismatched_or_missing_film_file_fails_naming_it(saved, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    state = torch.load(broken / FILE, weights_only=True)
    state["vision_backbone.fused_featurizer.blocks.1.shiftt.weight"] = state.pop(
        "vision_backbone.fused_featurizer.blocks.1.shift.weight")
    torch.save(state, broken / FILE)
    with pytest.raises(CheckpointError, match=r"(?s)vision_backbone--150000.*FiLM.*missing keys"
                                              r".*fused_featurizer\.blocks\.1\.shift\.weight"
                                              r".*unexpected keys.*fused_featurizer\.blocks\.1\.shiftt\.weight"):
        OpenVLAOFTBackbone.from_pretrained(broken)
    state["vision_backbone.fused_featurizer.blocks.1.shift.weight"] = state.pop(
        "vision_backbone.fused_featurizer.blocks.1.shiftt.weight")
    state["vision_backbone.featurizer.blocks.0.scale.weight"] = state["vision_backbone.featurizer.blocks.0.scale.weight"][:, :32]
    torch.save(state, broken / FILE)
    with pytest.raises(CheckpointError, match=r"shape mismatches.*featurizer\.blocks\.0\.scale\.weight: "
                                              r"checkpoint \(32, 32\) vs model \(32, 64\)"):
        OpenVLAOFTBackbone.from_pretrained(broken)
    (broken / FILE).unlink()
    assert OpenVLAOFTBackbone.from_pretrained(broken).film is None
    with pytest.raises(CheckpointError, match=r"missing FiLM vision backbone file .*vision_backbone--\*_checkpoint\.pt"):
        OpenVLAOFTBackbone.from_pretrained(broken, use_film=True)


# -- the cache engine with FiLM on ---------------------------------------------------------------------------------
def test_zero_reuse_is_bit_identical_to_detached_with_film(filmed, scenes):
    with CachedVLA(filmed, None) as vla:
        vla.engine.attach()
        for i in range(3):
            obs = observe(scenes, i)
            baseline = CachedVLA(filmed, None).predict(obs)
            step = vla.predict(obs, plan=ReusePlan.empty(1, len(filmed.decoder.layers)))
            assert torch.equal(step.logits, baseline.logits)
            np.testing.assert_array_equal(step.actions, baseline.actions)
            inputs, embeds = embeds_of(filmed, obs)
            with torch.no_grad():
                hidden = filmed.run_decoder(embeds, filmed.new_cache())
            assert torch.equal(vla.engine.episode.final_hidden, hidden)
