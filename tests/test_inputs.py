"""Bad input gets a clear error that names the problem."""

import numpy as np
import pytest
import torch

import vlacache
from vlacache import CachedVLA, InputError, Observation
from vlacache.backbone import LoadConfig, resolve_device
from vlacache.types import NonFiniteOutputError

GOOD = np.zeros((256, 256, 3), dtype=np.uint8)
INSTRUCTION = "pick up the bowl"


@pytest.mark.parametrize("obs,message", [
    (Observation({"primary": np.zeros((256, 256), np.uint8)}, INSTRUCTION), "expected an image"),
    (Observation({"primary": np.zeros((3, 256, 256), np.uint8)}, INSTRUCTION), "channels-first"),
    (Observation({"primary": np.zeros((256, 256, 4), np.uint8)}, INSTRUCTION), "3 colour channels"),
    (Observation({"primary": np.zeros((256, 256, 3), np.int32)}, INSTRUCTION), "dtype"),
    (Observation({"primary": np.full((256, 256, 3), np.nan, np.float32)}, INSTRUCTION), "NaN or inf"),
    (Observation({"primary": np.full((256, 256, 3), np.inf, np.float32)}, INSTRUCTION), "NaN or inf"),
    (Observation({"primary": np.full((256, 256, 3), 200.0, np.float32)}, INSTRUCTION), r"\[0, 1\]"),
    (Observation({"wrist": GOOD}, INSTRUCTION), r"lacks camera\(s\) \['primary'\]"),
    (Observation({"primary": GOOD}, "   "), "instruction is empty"),
    (Observation({"primary": np.stack([GOOD] * 2)}, [INSTRUCTION] * 3), "3 instructions for a batch of 2"),
    (Observation({"primary": [[1, 2, 3]]}, INSTRUCTION), "numpy array or torch tensor"),
    (Observation({"primary": GOOD}, None), "instruction is None"),
    (Observation({"primary": GOOD}, 42), "string or a list of strings, got int"),
    (Observation({"primary": np.zeros((0, 256, 256, 3), np.uint8)}, INSTRUCTION), "batch is empty"),
    (Observation(GOOD, INSTRUCTION), r"images must map camera names to images, got ndarray.*'primary'"),
    (Observation([GOOD], INSTRUCTION), "images must map camera names to images, got list"),
])
def test_bad_observations(tiny, obs, message):
    with pytest.raises(InputError, match=message):
        CachedVLA(tiny, None).predict(obs)


def test_batch_with_different_prompt_lengths(tiny):
    obs = Observation({"primary": np.stack([GOOD] * 2)}, ["pick up the bowl", "open the top drawer of the cabinet slowly"])
    with pytest.raises(InputError, match="different lengths"):
        CachedVLA(tiny, None).predict(obs)


def test_an_instruction_longer_than_the_models_positions_is_refused_at_once(tiny):
    """Refused after tokenising, before the towers or the decoder run; the next query is served."""
    from vlacache.backbones.openvla_oft import build_preset as oft_preset

    for backbone, images in ((tiny, {"primary": GOOD}), (oft_preset("tiny"), {"primary": GOOD, "wrist": GOOD})):
        proprio = np.zeros(8, np.float32) if backbone.uses_proprio else None
        with vlacache.attach(backbone, "vla_cache") as vla:  # the shared tiny backbone gets its hooks back off
            with pytest.raises(InputError, match=r"the instruction is too long: .* but the model has 2048; shorten the"):
                vla.predict(Observation(images, "pick up the bowl " * 5000, proprio=proprio))
            assert vla.predict(Observation(images, INSTRUCTION, proprio=proprio)).stats.step == 0


def test_attach_refuses_a_switch_that_is_not_a_bool(tiny):
    for bad in ("yes", 1, None):
        with pytest.raises(InputError, match=f"compile must be True or False, got {bad!r}"):
            vlacache.attach(tiny, "no_cache", compile=bad)


def test_float_images_and_batches_work(tiny):
    vla = CachedVLA(tiny, None)
    as_uint8 = vla.predict(Observation({"primary": GOOD + 128}, INSTRUCTION))
    as_float = vla.predict(Observation({"primary": torch.full((256, 256, 3), 128 / 255)}, INSTRUCTION))
    assert torch.equal(as_uint8.logits, as_float.logits)
    batch = vla.predict(Observation({"primary": np.stack([GOOD, GOOD + 128])}, INSTRUCTION))
    assert batch.actions.shape == (2, 1, 7)
    np.testing.assert_allclose(batch.actions[1], as_uint8.actions[0], atol=1e-5)


def test_attach_needs_a_backbone(tiny):
    for thing in (tiny.model, "openvla", None):
        with pytest.raises(InputError, match=f"needs a vlacache Backbone, got {type(thing).__name__}"):
            vlacache.attach(thing, "static_reuse")
    with pytest.raises(InputError, match="policy must be a CachePolicy"):
        CachedVLA(tiny, "static_reuse")


@pytest.mark.parametrize("how", ["detach", "with"])
def test_predict_after_detach_raises_instead_of_reattaching(tiny, frames, how):
    vla = vlacache.attach(tiny, "static_reuse")
    if how == "detach":
        vla.predict(frames[0])
        vla.detach()
    else:
        with vla:
            vla.predict(frames[0])
    with pytest.raises(InputError, match="detached.*attach a new one"):
        vla.predict(frames[1])
    assert not any(layer._forward_pre_hooks for layer in tiny.decoder.layers)  # nothing re-attached
    with vlacache.attach(tiny, "static_reuse") as fresh:
        assert fresh.predict(frames[0]).actions.shape == (1, 1, 7)


@pytest.mark.parametrize("where", ["logits", "actions"])
def test_non_finite_outputs_raise(frames, where):
    from vlacache.backbones.openvla import build_preset

    broken = build_preset("tiny", seed=0)
    if where == "logits":
        with torch.no_grad():
            broken.model.language_model.lm_head.weight[:5] = float("nan")
    else:
        broken.config.norm_stats[broken.unnorm_key]["action"]["q99"][0] = float("nan")
    vla = CachedVLA(broken, None)
    with pytest.raises(NonFiniteOutputError, match=f"NaN or inf {where} at step 0"):
        vla.predict(frames[0])


@pytest.mark.parametrize("device, message", [
    ("cuda:64", "not available|does not exist: this machine has"),
    ("gpu", "is not a device name"),
])
def test_unavailable_device_is_named(device, message):
    with pytest.raises(InputError, match=message):
        resolve_device(device)
    with pytest.raises(InputError, match=message):
        LoadConfig(preset="tiny", device=device).placement()


def test_cuda_on_a_cpu_only_torch_is_named():
    if torch.cuda.is_available():
        assert resolve_device("cuda") == torch.device("cuda")
        return
    with pytest.raises(InputError, match=r"'cuda' is not available: .*; use device=cpu \(or auto\)"):
        LoadConfig(preset="tiny", device="cuda").placement()
    assert resolve_device("auto") == torch.device("cpu")
