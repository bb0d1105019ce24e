"""vlacache.images against real TensorFlow output (tests/fixtures/tf_images.npz, written by
scripts/make_tf_image_fixtures.py from LIBERO frames): the image pipeline of the official OpenVLA / OFT LIBERO
evaluations. On x86-64 Linux everything is bit-identical; the tolerances leave room for another platform's
libjpeg-turbo or C library (one grey level on a few pixels)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlacache.images import center_crop, jpeg_roundtrip, resize_for_policy, tf_resize_lanczos3

FIXTURE = Path(__file__).parent / "fixtures" / "tf_images.npz"
MIN_IDENTICAL = 0.999  # measured: 1.0 for every stage


@pytest.fixture(scope="module")
def tf_images() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as data:
        return {key: data[key] for key in data.files}


def agreement(ours: np.ndarray, theirs: np.ndarray) -> tuple[int, float]:
    """Largest absolute difference in grey levels and the share of bit-identical values."""
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == np.uint8
    diff = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
    return int(diff.max()), float((diff == 0).mean())


def assert_close(ours: np.ndarray, theirs: np.ndarray, stage: str) -> None:
    worst, identical = agreement(ours, theirs)
    print(f"{stage}: max abs diff {worst}, {100 * identical:.4f}% bit-identical")
    assert worst <= 1 and identical >= MIN_IDENTICAL, (stage, worst, identical)


def test_fixture_holds_256px_libero_frames(tf_images):
    assert tf_images["frames"].shape == (4, 256, 256, 3)
    assert tf_images["resized"].shape == tf_images["cropped"].shape == (4, 224, 224, 3)


def test_jpeg_roundtrip_matches_tensorflow(tf_images):
    ours = np.stack([jpeg_roundtrip(frame) for frame in tf_images["frames"]])
    assert_close(ours, tf_images["jpeg"], "jpeg")


def test_lanczos3_resize_matches_tensorflow(tf_images):
    assert_close(tf_resize_lanczos3(tf_images["jpeg"], 224), tf_images["resized"], "resize")


def test_resize_for_policy_matches_tensorflow(tf_images):
    batch = resize_for_policy(tf_images["frames"], 224)
    assert_close(batch, tf_images["resized"], "jpeg + resize")
    assert np.array_equal(resize_for_policy(tf_images["frames"][0], 224), batch[0])  # one frame or a batch


def test_center_crop_is_bit_identical_to_tensorflow(tf_images):
    assert np.array_equal(center_crop(tf_images["resized"]), tf_images["cropped"])
    crop = center_crop(torch.from_numpy(tf_images["resized"]))
    assert isinstance(crop, torch.Tensor) and torch.equal(crop, torch.from_numpy(tf_images["cropped"]))
    assert np.array_equal(center_crop(tf_images["resized"], scale=1.0), tf_images["resized"])
    with pytest.raises(ValueError):
        center_crop(tf_images["resized"], scale=1.5)


def test_whole_pipeline_matches_tensorflow(tf_images):
    assert_close(center_crop(resize_for_policy(tf_images["frames"], 224)), tf_images["cropped"], "jpeg + resize + crop")


def test_pillow_stand_in_fails_these_tests(tf_images):
    """The previous Pillow pipeline (Pillow's accurate-IDCT JPEG decoder, Pillow's Lanczos) is several grey
    levels off: the tolerances above do tell the pipelines apart."""

    def pillow_jpeg(frame: np.ndarray) -> Image.Image:
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG", quality=95)
        return Image.open(buffer).convert("RGB")

    decoded = [pillow_jpeg(frame) for frame in tf_images["frames"]]
    assert agreement(np.stack([np.asarray(image) for image in decoded]), tf_images["jpeg"])[0] > 1
    resized = np.stack([np.asarray(image.resize((224, 224), Image.LANCZOS)) for image in decoded])
    assert agreement(resized, tf_images["resized"])[0] > 1
