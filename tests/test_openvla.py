"""The OpenVLA backbone: released checkpoint layout round trip, prompt, action decoding, bad checkpoints."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vlacache import CachedVLA, InputError
from vlacache.backbones.openvla import OpenVLABackbone, build_preset
from vlacache.backbones.openvla.action_tokens import tokens_to_normalized
from vlacache.backbones.common.checkpoint import CheckpointError


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("openvla-tiny")
    tiny.save_pretrained(path, max_shard_bytes=400_000)
    return path


def test_saved_in_the_released_layout(saved):
    config = json.loads((saved / "config.json").read_text())
    assert config["model_type"] == "openvla" and config["arch_specifier"] == "no-align+fused-gelu-mlp"
    assert set(config) >= {"timm_model_ids", "image_sizes", "norm_stats", "text_config", "n_action_bins", "pad_to_multiple_of"}
    index = json.loads((saved / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    keys = set(index["weight_map"])
    for key in ("vision_backbone.featurizer.blocks.0.attn.qkv.weight", "vision_backbone.featurizer.reg_token",
                "vision_backbone.featurizer.blocks.0.ls1.scale_factor", "vision_backbone.fused_featurizer.attn_pool.latent",
                "projector.fc1.weight", "projector.fc3.weight", "language_model.model.embed_tokens.weight",
                "language_model.model.layers.0.self_attn.q_proj.weight", "language_model.lm_head.weight"):
        assert key in keys
    assert not any("rotary" in k for k in keys)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        assert (saved / name).exists()


def test_round_trip_gives_identical_actions(tiny, saved, frames):
    loaded = OpenVLABackbone.from_pretrained(saved)
    for obs in frames[:2]:
        a, b = CachedVLA(tiny, None).predict(obs), CachedVLA(loaded, None).predict(obs)
        assert torch.equal(a.logits, b.logits)
        np.testing.assert_array_equal(a.actions, b.actions)


def test_prompt_and_layout(tiny, frames):
    inputs = tiny.prepare(frames[0])
    ids = inputs.model_inputs["input_ids"][0].tolist()
    text = tiny.tokenizer.decode(ids)
    assert ids[0] == tiny.tokenizer.bos_token_id and ids[-1] == tiny.space_token
    assert "What action should the robot take to pick up the black bowl" in text
    layout = inputs.layout
    assert layout.vision["primary"].start == 1 and len(layout.vision["primary"]) == 256
    assert layout.length == 256 + len(ids) and layout.text.stop == layout.length
    assert inputs.model_inputs["pixel_values"].shape == (1, 6, 224, 224)
    assert inputs.query_images["primary"].shape == (1, 224, 224, 3)


def test_action_detokenisation_matches_openvla_formula(tiny):
    vocab = tiny.config.text_vocab_size
    assert vocab == 512
    tokens = np.array([[vocab - 1, vocab - 128, vocab - 256, 0, vocab - 1, vocab - 1, vocab - 256]])
    normalized = tokens_to_normalized(tokens, vocab)
    centres = (np.linspace(-1, 1, 256)[:-1] + np.linspace(-1, 1, 256)[1:]) / 2
    assert normalized[0, 0] == centres[0] and normalized[0, 1] == centres[127] and normalized[0, 2] == centres[254]
    actions = tiny.tokens_to_actions(tokens)
    q01, q99 = (np.array(tiny.config.norm_stats["libero_spatial_no_noops"]["action"][k]) for k in ("q01", "q99"))
    assert actions[0, 0] == pytest.approx(0.5 * (centres[0] + 1) * (q99[0] - q01[0]) + q01[0], abs=1e-6)
    assert actions[0, 6] == pytest.approx(centres[254], abs=1e-6)  # gripper is not normalised (mask false)


def test_unnorm_key_errors(saved):
    with pytest.raises(InputError, match="libero_spatial_no_noops"):
        OpenVLABackbone.from_pretrained(saved, unnorm_key="bridge_orig")


@pytest.mark.parametrize("remove,message", [
    ("config.json", "config.json"),
    ("tokenizer_config.json", "tokenizer_config.json"),
    ("model-00002-of-", "model-00002-of-"),
])
def test_checkpoint_with_missing_file_fails_clearly(saved, tmp_path, remove, message):
    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    victim = next(p for p in broken.iterdir() if p.name.startswith(remove))
    victim.unlink()
    with pytest.raises(CheckpointError, match=message):
        OpenVLABackbone.from_pretrained(broken)


def test_checkpoint_with_bad_keys_names_them(saved, tmp_path):
    from safetensors.torch import save_file

    broken = tmp_path / "badkeys"
    shutil.copytree(saved, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["projector.fc1.weight"]
    tensors = load_file(broken / shard)
    tensors["projector.fc9.weight"] = tensors.pop("projector.fc1.weight")
    save_file(tensors, broken / shard)
    index["weight_map"]["projector.fc9.weight"] = index["weight_map"].pop("projector.fc1.weight")
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"(?s)missing keys.*projector\.fc1\.weight"
                                              r".*unexpected keys.*projector\.fc9\.weight"):
        OpenVLABackbone.from_pretrained(broken)
    config = json.loads((saved / "config.json").read_text())
    config["text_config"]["hidden_size"] = 32
    shutil.copytree(saved, tmp_path / "badshape")
    (tmp_path / "badshape" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="shape mismatches"):
        OpenVLABackbone.from_pretrained(tmp_path / "badshape")


def test_presets_and_backbone_config_errors():
    with pytest.raises(InputError, match="presets: tiny, cpu-25m"):
        build_preset("huge")
    with pytest.raises(InputError, match="exactly one of"):
        OpenVLABackbone.from_config(OpenVLABackbone.Config())


def test_prompt_ids_from_a_saved_checkpoint_match_sentencepiece(saved):
    """The tokenizer loaded next to config.json (model_type 'openvla') must be the Llama one, not a guess."""
    import sentencepiece

    from vlacache.backbones.common.prismatic import PROMPT

    loaded = OpenVLABackbone.from_pretrained(saved)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(saved / "tokenizer.model"))
    prompt = PROMPT.format(instruction="put the bowl on the plate")
    expected = [sp.bos_id(), *sp.encode(prompt)]
    if expected[-1] != loaded.space_token:
        expected.append(loaded.space_token)
    assert loaded.prompt_ids("Put the bowl on the plate") == expected


def test_prompt_keeps_the_instructions_spaces_as_the_official_prompt_does(saved):
    """No .strip(): the official prompt is f"...take to {instruction.lower()}?" whatever spaces it has."""
    import sentencepiece

    from vlacache.backbones.common.prismatic import PROMPT

    loaded = OpenVLABackbone.from_pretrained(saved)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(saved / "tokenizer.model"))
    instruction = "  Put the bowl  on the plate "
    expected = [sp.bos_id(), *sp.encode(PROMPT.format(instruction=instruction.lower()))]
    if expected[-1] != loaded.space_token:
        expected.append(loaded.space_token)
    assert loaded.prompt_ids(instruction) == expected


def test_center_crop_option_changes_the_model_input(frames):
    from vlacache.images import center_crop

    plain = OpenVLABackbone.from_config(OpenVLABackbone.Config(preset="tiny", device="cpu"))
    cropped = OpenVLABackbone.from_config(OpenVLABackbone.Config(preset="tiny", device="cpu", center_crop=True))
    a, b = plain.prepare(frames[0]), cropped.prepare(frames[0])
    assert torch.equal(b.query_images["primary"], center_crop(a.query_images["primary"]))
    assert not torch.equal(a.query_images["primary"], b.query_images["primary"])
    assert b.query_images["primary"].shape == (1, 224, 224, 3)
