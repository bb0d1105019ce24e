"""The trained micro-policy shipped in the package: its files, loading it by name key for key, and a closed-loop
LIBERO episode whose outcome matches the one recorded for it (tests/micro_smoke.py)."""

import json

import pytest
import torch
from micro_smoke import EXPECTATION, run_smoke
from safetensors import safe_open

from vlacache import InputError
from vlacache.errors import CheckpointError
from vlacache.backbone import resolve_checkpoint, shipped_policies
from vlacache.backbones.openvla import OpenVLABackbone
from vlacache.backbones.openvla_oft import OpenVLAOFTBackbone
from vlacache.backbones.pi0 import PI0Backbone
from vlacache.experiment import build_backbone

from test_libero import LIBERO_MISSING, libero_installed

SHIPPED = "micro_oft_libero_spatial"
BACKBONE_CLASS = {"micro_oft_libero_spatial": OpenVLAOFTBackbone, "micro_openvla_libero_spatial": OpenVLABackbone,
                  "micro_pi0_libero_spatial": PI0Backbone}


@pytest.mark.parametrize("name", sorted(BACKBONE_CLASS))
def test_the_shipped_policy_is_small_bf16_and_loads_by_name(tmp_path, name):
    assert name in shipped_policies()
    folder = resolve_checkpoint(name)
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert size <= 10 * 2**20, f"{name} is {size / 2**20:.1f} MiB; the package ships at most 10 MiB per policy"
    weights = sorted(folder.glob("*.safetensors"))
    with safe_open(str(weights[0]), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    stats = json.loads((folder / "dataset_statistics.json").read_text())
    assert list(stats) == ["libero_spatial"] and stats["libero_spatial"]["num_trajectories"] >= 100

    backbone = build_backbone(name)  # the shipped backbone config (configs/backbone/) names it
    cls = BACKBONE_CLASS[name]
    assert isinstance(backbone, cls) and backbone.unnorm_key == "libero_spatial"
    backbone.save_pretrained(tmp_path / "again")  # the released layout, key for key
    again = cls.from_pretrained(tmp_path / "again")
    for (name, a), (_, b) in zip(backbone.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_an_unknown_checkpoint_name_lists_the_shipped_ones():
    with pytest.raises(InputError, match=f"neither a directory here nor a policy shipped.*{SHIPPED}"):
        resolve_checkpoint("micro_oft_libero_spatail")


@pytest.mark.sim
def test_closed_loop_smoke_episode_matches_its_recorded_outcome(tmp_path):
    if not libero_installed():
        pytest.fail(LIBERO_MISSING)
    expected = json.loads(EXPECTATION.read_text())
    outcome = run_smoke(tmp_path / "smoke")
    assert set(outcome) == set(expected) == {"no-cache", "vla-cache"}
    for label, record in outcome.items():
        assert record["error"] is None, record["error"]
        assert record["success"] == expected[label]["success"], (label, record, expected[label])
        # the same machine class replays it step for step; a different CPU may round differently: one chunk of slack
        assert abs(record["env_steps"] - expected[label]["env_steps"]) <= 8, (label, record, expected[label])
    assert outcome["vla-cache"]["reuse_ratio"] > 0 and outcome["no-cache"]["reuse_ratio"] == 0


@pytest.mark.parametrize("name", sorted(BACKBONE_CLASS))
def test_a_changed_byte_in_a_shipped_policy_is_caught_by_its_manifest(tmp_path, name):
    """100 flipped bytes inside the tensor data of model.safetensors (values still finite, shapes intact) load
    without a manifest; the shipped policies carry one (SHA256SUMS), which names the file."""
    import shutil

    from vlacache.manifest import MANIFEST_FILE, verify_manifest

    source = resolve_checkpoint(name)
    assert verify_manifest(source)  # the shipped files are the listed ones
    copy = shutil.copytree(source, tmp_path / name)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    for i in range(len(data) - 1000, len(data) - 900):  # deep inside the last tensor, never the header
        data[i] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"model.safetensors differs from its {MANIFEST_FILE} entry"):
        BACKBONE_CLASS[name].from_pretrained(copy)
    (copy / MANIFEST_FILE).unlink()
    BACKBONE_CLASS[name].from_pretrained(copy)  # without the list: structurally fine, so it loads (as documented)
