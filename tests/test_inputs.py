"""Bad input gets a clear error that names the problem (issue 3, item 9)."""

import numpy as np
import pytest
import torch

from vlacache import CachedVLA, InputError, Observation

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
])
def test_bad_observations(tiny, obs, message):
    with pytest.raises(InputError, match=message):
        CachedVLA(tiny, None).predict(obs)


def test_batch_with_different_prompt_lengths(tiny):
    obs = Observation({"primary": np.stack([GOOD] * 2)}, ["pick up the bowl", "open the top drawer of the cabinet slowly"])
    with pytest.raises(InputError, match="different lengths"):
        CachedVLA(tiny, None).predict(obs)


def test_float_images_and_batches_work(tiny):
    vla = CachedVLA(tiny, None)
    as_uint8 = vla.predict(Observation({"primary": GOOD + 128}, INSTRUCTION))
    as_float = vla.predict(Observation({"primary": torch.full((256, 256, 3), 128 / 255)}, INSTRUCTION))
    assert torch.equal(as_uint8.logits, as_float.logits)
    batch = vla.predict(Observation({"primary": np.stack([GOOD, GOOD + 128])}, INSTRUCTION))
    assert batch.actions.shape == (2, 1, 7)
    np.testing.assert_allclose(batch.actions[1], as_uint8.actions[0], atol=1e-5)
