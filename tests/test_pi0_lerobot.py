"""LeRobot's π0 / π0.5 policy folders, read by `from_pretrained` without LeRobot.

The key names are pinned by a manifest of LeRobot 0.6.1's modules (tests/fixtures/lerobot_*_keys.tsv). A tiny
model is written in that layout (LeRobot's config.json, model.safetensors under LeRobot's names, the processor
pipelines and their normalizer files) and loaded through transformers' own key conversion; its actions must
equal the same weights' raw actions with the state normalised and the actions un-normalised by LeRobot's
formulas, computed here. Only the model's size is shrunk (`released_config`): LeRobot knows one shape.
"""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from safetensors.torch import save_file as save_torch

import vlacache
from vlacache.backbones.common.tokenizer import tiny_tokenizer_dir
from vlacache.backbones.pi0 import PI0Backbone, PI05Backbone, build_preset, lerobot
from vlacache.backbones.pi0.tiny import preset_config
from vlacache.errors import CheckpointError

FIXTURES = Path(__file__).parent / "fixtures"
P, E = "model.paligemma_with_expert.paligemma.", "model.paligemma_with_expert.gemma_expert."
STATE_MEAN, STATE_STD = np.linspace(-0.2, 0.3, 8), np.linspace(0.5, 1.5, 8)
STATE_Q01, STATE_Q99 = np.full(8, -0.8), np.linspace(0.4, 1.2, 8)
ACTION_MEAN, ACTION_STD = np.linspace(0.1, 0.7, 7), np.linspace(0.2, 2.0, 7)
ACTION_Q01, ACTION_Q99 = np.linspace(-2.0, -1.0, 7), np.linspace(1.0, 3.0, 7)


def lerobot_names(key: str) -> list[str]:
    """Where LeRobot's policy keeps a transformers PI0 parameter (its language embedding: in embed_tokens and the
    tied lm_head both; the expert's: in its lm_head only)."""
    if key == "model.vlm.language_model.embed_tokens.weight":
        return [P + "model.language_model.embed_tokens.weight", P + "lm_head.weight"]
    if key == "model.dit.embed_tokens.weight":
        return [E + "lm_head.weight"]
    for ours, theirs in (("model.vlm.", P + "model."), ("model.dit.", E + "model."), ("embed_action_time.", "model."),
                         ("action_out_proj.", "model.action_out_proj.")):
        if key.startswith(ours):
            return [theirs + key[len(ours):]]
    raise AssertionError(f"no LeRobot name for {key}")


def manifest(family: str) -> set[str]:
    lines = (FIXTURES / f"lerobot_{family}_keys.tsv").read_text().splitlines()
    return {line.split("\t")[0] for line in lines if line and not line.startswith("#")}


def lerobot_state_dict(backbone) -> dict[str, torch.Tensor]:
    out = {name: tensor for key, tensor in backbone.model.state_dict().items() for name in lerobot_names(key)}
    if E + "lm_head.weight" not in out:  # π0.5's expert has no embedding in transformers; LeRobot saves its lm_head
        out[E + "lm_head.weight"] = torch.randn(backbone.model.config.vlm_config.text_config.vocab_size,
                                                backbone.model.config.dit_config.hidden_size)
    return {name: tensor.contiguous().clone() for name, tensor in out.items()}


@pytest.mark.parametrize("cls", [PI0Backbone, PI05Backbone], ids=["pi0", "pi05"])
def test_lerobot_names_cover_the_released_key_manifest(cls):
    names = {re.sub(r"\.\d+\.", ".{i}.", key) for key in lerobot_state_dict(build_preset(cls, "tiny"))}
    assert names == manifest(cls.registry_name)


def write_lerobot_folder(backbone, folder: Path, cameras=("image", "image2"), stats=True) -> Path:
    family = backbone.registry_name
    folder.mkdir(parents=True, exist_ok=True)
    save_torch(lerobot_state_dict(backbone), str(folder / "model.safetensors"))
    features = {f"observation.images.{name}": {"type": "VISUAL", "shape": [3, 224, 224]} for name in cameras}
    features["observation.state"] = {"type": "STATE", "shape": [8]}
    mode = "MEAN_STD" if family == "pi0" else "QUANTILES"
    config = backbone.model.config
    fields = {"type": family, "paligemma_variant": "gemma_2b", "action_expert_variant": "gemma_300m",
              "chunk_size": config.chunk_size, "n_action_steps": config.chunk_size, "max_action_dim": config.max_action_dim,
              "num_inference_steps": config.num_inference_steps, "input_features": features,
              "output_features": {"action": {"type": "ACTION", "shape": [7]}},
              "normalization_mapping": {"VISUAL": "IDENTITY", "STATE": mode, "ACTION": mode}}
    if family == "pi0":
        fields["max_state_dim"] = config.max_state_dim
    (folder / "config.json").write_text(json.dumps(fields))
    for file in tiny_tokenizer_dir().iterdir():  # LeRobot reads google/paligemma-3b-pt-224's; a folder brings its own
        shutil.copy(file, folder / file.name)
    if stats:
        values = {"observation.state.mean": STATE_MEAN, "observation.state.std": STATE_STD,
                  "observation.state.q01": STATE_Q01, "observation.state.q99": STATE_Q99,
                  "action.mean": ACTION_MEAN, "action.std": ACTION_STD, "action.q01": ACTION_Q01, "action.q99": ACTION_Q99,
                  "observation.images.image.mean": np.full((3, 1, 1), 0.5)}  # every feature's stats are in the file
        pre = "policy_preprocessor_step_6_normalizer_processor.safetensors"
        post = "policy_postprocessor_step_0_unnormalizer_processor.safetensors"
        save_file({k: np.asarray(v, dtype=np.float32) for k, v in values.items()}, str(folder / pre))
        save_file({k: np.asarray(v, dtype=np.float32) for k, v in values.items() if k.startswith("action")}, str(folder / post))
        steps = [{"registry_name": "rename_observations_processor", "config": {}},
                 {"registry_name": "normalizer_processor", "config": {"eps": 1e-8}, "state_file": pre}]
        (folder / "policy_preprocessor.json").write_text(json.dumps({"name": "policy_preprocessor", "steps": steps}))
        (folder / "policy_postprocessor.json").write_text(json.dumps(
            {"name": "policy_postprocessor", "steps": [{"registry_name": "unnormalizer_processor", "state_file": post}]}))
    return folder


@pytest.fixture
def shrunk(monkeypatch):
    """LeRobot's one shape, shrunk to the tiny preset so the folder fits in a test."""
    vocab = len(build_preset(PI0Backbone, "tiny").tokenizer)
    classes = {"pi0": PI0Backbone, "pi05": PI05Backbone}
    monkeypatch.setattr(lerobot, "released_config", lambda family: preset_config(classes[family], "tiny", vocab))


def observation():
    rng = np.random.default_rng(5)
    return vlacache.Observation(images={n: rng.integers(0, 255, (56, 56, 3), dtype=np.uint8) for n in ("primary", "wrist")},
                                instruction="put the bowl on the plate", proprio=np.linspace(-1.0, 1.0, 8).astype(np.float32))


@pytest.mark.parametrize("cls", [PI0Backbone, PI05Backbone], ids=["pi0", "pi05"])
def test_a_lerobot_folder_loads_and_normalises_as_lerobot_does(cls, shrunk, tmp_path):
    original = build_preset(cls, "tiny", noise="fixed")
    folder = write_lerobot_folder(original, tmp_path / "policy")
    loaded = cls.from_pretrained(folder, noise="fixed")
    obs = observation()
    if cls is PI0Backbone:  # MEAN_STD, as LeRobot's normalizer: (x - mean) / (std + eps), inverse x std + mean
        state = (obs.proprio - STATE_MEAN) / (STATE_STD + 1e-8)
        unnormalize = lambda a: a * ACTION_STD + ACTION_MEAN  # noqa: E731
    else:  # QUANTILES: 2 (x - q01) / (q99 - q01) - 1, inverse (x + 1)(q99 - q01) / 2 + q01
        state = 2.0 * (obs.proprio - STATE_Q01) / (STATE_Q99 - STATE_Q01) - 1.0
        unnormalize = lambda a: (a + 1.0) * (ACTION_Q99 - ACTION_Q01) / 2.0 + ACTION_Q01  # noqa: E731
    raw = vlacache.attach(original, None).predict(vlacache.Observation(
        images=obs.images, instruction=obs.instruction, proprio=state.astype(np.float32))).actions
    actions = vlacache.attach(loaded, None).predict(obs).actions
    np.testing.assert_allclose(actions, unnormalize(raw.astype(np.float64)), rtol=1e-5, atol=1e-5)
    assert not np.allclose(actions, raw, atol=1e-2)  # the statistics did apply


def test_lerobot_folders_that_cannot_run_are_refused_with_the_reason(shrunk, tmp_path):
    original = build_preset(PI0Backbone, "tiny")
    folder = write_lerobot_folder(original, tmp_path / "pi0")
    with pytest.raises(CheckpointError, match="LeRobot 'pi0' policy, not 'pi05'; load it with backbone name 'pi0'"):
        PI05Backbone.from_pretrained(folder)
    base = write_lerobot_folder(original, tmp_path / "base", stats=False)
    with pytest.raises(CheckpointError, match="name no normalizer statistics"):
        PI0Backbone.from_pretrained(base)
    three = write_lerobot_folder(original, tmp_path / "three", cameras=("base", "left_wrist", "right_wrist"))
    with pytest.raises(CheckpointError, match="trained with 3 camera"):
        PI0Backbone.from_pretrained(three)
    fields = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**fields, "use_relative_actions": True}))
    with pytest.raises(CheckpointError, match="relative to the state"):
        PI0Backbone.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**fields, "paligemma_variant": "gemma_300m"}))
    with pytest.raises(CheckpointError, match="released shape"):
        PI0Backbone.from_pretrained(folder)


def test_a_saved_backbone_remembers_its_cameras(tmp_path):
    build_preset(PI0Backbone, "tiny").save_pretrained(tmp_path / "saved")
    with pytest.raises(CheckpointError, match="trained with 2 camera"):
        PI0Backbone.from_pretrained(tmp_path / "saved", cameras=("primary",))
