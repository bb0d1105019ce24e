"""Loading released checkpoints as the official evaluations do: dataset_statistics.json, config.json field
types, damaged weight files, memory checks before reading the weights, and one dtype's copy at a time."""

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from vlacache import CachedVLA
from vlacache.backbones.cogact import CogACTBackbone
from vlacache.backbones.cogact import build_preset as build_cogact
from vlacache.backbones.openvla import OpenVLABackbone, build_preset
from vlacache.backbones.common import checkpoint as checkpoint_module
from vlacache.backbones.common.checkpoint import CheckpointError
from vlacache.backbones.openvla_oft import OpenVLAOFTBackbone
from vlacache.backbones.openvla_oft import build_preset as build_oft
from vlacache.types import InputError

STATS = "dataset_statistics.json"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny OpenVLA in the released layout, sharded."""
    path = tmp_path_factory.mktemp("openvla") / "tiny"
    build_preset("tiny").save_pretrained(path, max_shard_bytes=2**18)
    return path


@pytest.fixture(scope="module")
def saved_oft(tmp_path_factory):
    path = tmp_path_factory.mktemp("oft") / "tiny"
    build_oft("tiny").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def saved_cogact(tmp_path_factory):
    path = tmp_path_factory.mktemp("cogact") / "CogACT-Tiny"
    build_cogact("tiny", noise="fixed").save_pretrained(path)
    return path


def copy(src, tmp_path, name="copy"):
    return shutil.copytree(src, tmp_path / name)


def edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def other_stats(stats: dict) -> dict:
    """The same datasets' statistics under a new key, with different action bounds."""
    entry = json.loads(json.dumps(next(iter(stats.values()))))
    entry["action"]["q01"] = [v - 0.5 for v in entry["action"]["q01"]]
    entry["action"]["q99"] = [v + 0.5 for v in entry["action"]["q99"]]
    return {"libero_goal_no_noops": entry}


# -- dataset_statistics.json replaces config.json's norm_stats, for all three backbones -------------------------


def _load(kind, path, **kwargs):
    if kind == "openvla":
        return OpenVLABackbone.from_pretrained(path, **kwargs)
    if kind == "openvla-oft":
        return OpenVLAOFTBackbone.from_pretrained(path, **kwargs)
    return CogACTBackbone.from_pretrained(path, noise="fixed", **kwargs)


@pytest.mark.parametrize("kind", ["openvla", "openvla-oft", "cogact"])
def test_dataset_statistics_replace_config_norm_stats(kind, saved, saved_oft, saved_cogact, tmp_path):
    source = {"openvla": saved, "openvla-oft": saved_oft, "cogact": saved_cogact}[kind]
    root = copy(source, tmp_path)
    original = json.loads((root / STATS).read_text())
    new = other_stats(original)
    (root / STATS).write_text(json.dumps(new))
    backbone = _load(kind, root, unnorm_key="libero_goal")  # the _no_noops fallback of the official eval
    assert backbone.unnorm_key == "libero_goal_no_noops"
    assert backbone.config.norm_stats == new
    old_key = next(iter(original))
    with pytest.raises(InputError) as error:
        _load(kind, root, unnorm_key=old_key)
    message = str(error.value)
    assert STATS in message and "libero_goal_no_noops" in message
    if kind != "cogact":  # OpenVLA / OFT: config.json's datasets are listed too
        assert "config.json" in message and old_key in message


def test_dataset_statistics_change_the_actions(saved, tmp_path, frames):
    from vlacache.backbones.openvla.action_tokens import tokens_to_normalized

    root = copy(saved, tmp_path)
    plain = OpenVLABackbone.from_pretrained(root)
    new = other_stats(json.loads((root / STATS).read_text()))
    (root / STATS).write_text(json.dumps(new))
    replaced = OpenVLABackbone.from_pretrained(root)
    a, b = CachedVLA(plain, None).predict(frames[0]), CachedVLA(replaced, None).predict(frames[0])
    assert torch.equal(a.tokens, b.tokens)
    bounds = new["libero_goal_no_noops"]["action"]
    q01, q99, mask = (np.array(bounds[k]) for k in ("q01", "q99", "mask"))
    x = tokens_to_normalized(b.tokens.cpu().numpy(), replaced.config.text_vocab_size)[0]
    np.testing.assert_allclose(b.actions[0, 0], np.where(mask, 0.5 * (x + 1) * (q99 - q01) + q01, x), rtol=1e-6)
    assert not np.allclose(a.actions, b.actions)


@pytest.mark.parametrize("value, message", [(None, "norm_stats is None"), ({}, "norm_stats is empty")])
def test_missing_statistics_are_named_at_load_time(saved, tmp_path, value, message):
    root = copy(saved, tmp_path)
    (root / STATS).unlink()
    edit_json(root / "config.json", lambda c: c.update(norm_stats=value))
    with pytest.raises(CheckpointError, match=f"{message}.*{STATS}"):
        OpenVLABackbone.from_pretrained(root)
    (root / STATS).write_text(json.dumps(json.loads((saved / STATS).read_text())))
    assert OpenVLABackbone.from_pretrained(root).unnorm_key  # the statistics file alone is enough


def test_statistics_without_action_bounds_are_named(saved, tmp_path):
    root = copy(saved, tmp_path)
    edit_json(root / STATS, lambda s: next(iter(s.values()))["action"].pop("q99"))
    with pytest.raises(CheckpointError, match=f"{STATS}.*lack action q01/q99"):
        OpenVLABackbone.from_pretrained(root)


# -- config.json fields of the wrong type --------------------------------------------------------------------


@pytest.mark.parametrize("field, value, expected", [
    ("image_sizes", "224", "list"),
    ("use_fused_vision_backbone", "true", "bool"),
    ("n_action_bins", 256.5, "int"),
    ("text_config", ["hidden_size", 64], "dict"),
])
def test_config_field_of_wrong_type_is_named(saved, tmp_path, field, value, expected):
    root = copy(saved, tmp_path)
    edit_json(root / "config.json", lambda c: c.update({field: value}))
    with pytest.raises(CheckpointError, match=rf"config\.json: field '{field}' is .*expected {expected}"):
        OpenVLABackbone.from_pretrained(root)


def test_text_config_field_of_wrong_type_is_named(saved, tmp_path):
    root = copy(saved, tmp_path)
    edit_json(root / "config.json", lambda c: c["text_config"].update(hidden_size="64"))
    with pytest.raises(CheckpointError, match=r"text_config is invalid.*hidden_size"):
        OpenVLABackbone.from_pretrained(root)


def test_cogact_config_field_of_wrong_type_is_named(saved_cogact, tmp_path):
    root = copy(saved_cogact, tmp_path)
    edit_json(root / "config.json", lambda c: c.update(future_action_window_size="15"))
    with pytest.raises(CheckpointError, match=r"field 'future_action_window_size' is \"15\" \(str\), expected int"):
        CogACTBackbone.from_pretrained(root)


# -- damaged weight files ------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_safetensors_name_the_file(saved, tmp_path, damage):
    root = copy(saved, tmp_path)
    shard = sorted(root.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x13" * 64 + data[64:])
    with pytest.raises(CheckpointError, match=rf"cannot read .*{shard.name}.*truncated or corrupted; re-download"):
        OpenVLABackbone.from_pretrained(root)


def test_damaged_cogact_checkpoint_names_the_file(saved_cogact, tmp_path):
    root = copy(saved_cogact, tmp_path)
    pt = next((root / "checkpoints").glob("*.pt"))
    pt.write_bytes(pt.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=rf"cannot load .*{pt.name}"):
        CogACTBackbone.from_pretrained(root)


# -- memory ---------------------------------------------------------------------------------------------------


def test_too_little_memory_is_refused_before_reading_the_weights(saved, saved_cogact, monkeypatch):
    from vlacache.backbones.cogact import backbone as cogact_module

    def never(*args, **kwargs):
        raise AssertionError("weights were read before the memory check")

    monkeypatch.setattr(checkpoint_module, "available_memory", lambda device: 2**10)
    monkeypatch.setattr(checkpoint_module, "_read_safetensors", never)
    monkeypatch.setattr(cogact_module, "materialize", never)
    with pytest.raises(CheckpointError, match=r"in float32 needs 0\.\d+ GiB on cpu, but only 0\.0 GiB is free; load in bfloat16"):
        OpenVLABackbone.from_pretrained(saved)
    with pytest.raises(CheckpointError, match=r"in bfloat16 needs .* GiB on cpu, but only 0\.0 GiB is free; free memory"):
        OpenVLABackbone.from_pretrained(saved, dtype=torch.bfloat16)
    with pytest.raises(CheckpointError, match=r"CogACT-Tiny\.pt in float32 needs"):
        CogACTBackbone.from_pretrained(saved_cogact)
    monkeypatch.undo()
    OpenVLABackbone.from_pretrained(saved)


PEAK_SCRIPT = textwrap.dedent("""
    import sys, threading, time
    import torch
    from vlacache.backbones.openvla import OpenVLABackbone
    from vlacache.backbones.common.checkpoint import load_safetensors_dir
    from vlacache.backbones.common.vlm import PrismaticVLM, place_model
    from vlacache.backbones.common.prismatic import read_openvla_config

    def anon():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024

    def peak_of(load):
        peak, done = [anon()], threading.Event()
        def poll():
            while not done.is_set():
                peak[0] = max(peak[0], anon())
                time.sleep(0.0002)
        base = anon()
        thread = threading.Thread(target=poll)
        thread.start()
        model = load()
        done.set()
        thread.join()
        size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        del model
        return (peak[0] - base) / size

    path = sys.argv[1]

    def naive():  # read the file in its dtype, keep that state dict, cast the model: both copies alive at once
        config = read_openvla_config(__import__("pathlib").Path(path))
        with torch.device("meta"):
            model = PrismaticVLM(config)
        state = load_safetensors_dir(path)
        model.load_state_dict(state, assign=True)
        return place_model(model, torch.device("cpu"), torch.float32)

    print(peak_of(naive), peak_of(lambda: OpenVLABackbone.from_pretrained(path, dtype=torch.float32).model))
""")


def test_loading_in_a_wider_dtype_never_holds_both_copies(tmp_path):
    """A bf16 checkpoint loaded in float32: peak extra memory about the float32 model, not float32 + bf16."""
    path = tmp_path / "cpu25m-bf16"
    build_preset("cpu-25m", dtype=torch.bfloat16).save_pretrained(path)
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    naive, loader = map(float, out.stdout.split())
    assert naive > 1.35, f"the measurement cannot see the second copy (naive peak {naive:.2f}x the model)"
    assert loader < 1.2, f"loading peaked at {loader:.2f}x the float32 model (naive: {naive:.2f}x)"
