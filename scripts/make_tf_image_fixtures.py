"""Write tests/fixtures/tf_images.npz: LIBERO frames through TensorFlow's image pipeline of the official
OpenVLA / OpenVLA-OFT LIBERO evaluations, for tests/test_images.py.

Run with a throwaway TensorFlow venv (never install TensorFlow next to vlacache):
    python -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu numpy pillow
    /tmp/tfvenv/bin/python scripts/make_tf_image_fixtures.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "vlacache" / "data" / "demo_frames.npz"  # a recorded LIBERO episode, 256 px renders
TARGET = ROOT / "tests" / "fixtures" / "tf_images.npz"
PICKS = [("image__primary", 0), ("image__primary", 15), ("image__wrist", 0), ("image__wrist", 15)]


def jpeg_roundtrip(img: np.ndarray) -> np.ndarray:
    """The first two lines of the evaluations' resize_image / resize_image_for_policy."""
    img = tf.image.encode_jpeg(img)  # defaults: quality 95, 4:2:0
    return tf.io.decode_image(img, expand_animations=False, dtype=tf.uint8).numpy()


def resize_image_for_policy(img: np.ndarray, size: int = 224) -> np.ndarray:
    """OpenVLA robot_utils.resize_image / OFT resize_image_for_policy, verbatim."""
    img = tf.image.encode_jpeg(img)
    img = tf.io.decode_image(img, expand_animations=False, dtype=tf.uint8)
    img = tf.image.resize(img, (size, size), method="lanczos3", antialias=True)
    img = tf.cast(tf.clip_by_value(tf.round(img), 0, 255), tf.uint8)
    return img.numpy()


def center_crop_image(img: np.ndarray) -> np.ndarray:
    """OFT center_crop_image (OpenVLA's with center_crop=True), verbatim for batch size 1."""
    image = tf.image.convert_image_dtype(tf.convert_to_tensor(img), tf.float32)
    crop_scale, batch_size = 0.9, 1
    new_heights = tf.reshape(tf.clip_by_value(tf.sqrt(crop_scale), 0, 1), shape=(batch_size,))
    new_widths = tf.reshape(tf.clip_by_value(tf.sqrt(crop_scale), 0, 1), shape=(batch_size,))
    height_offsets = (1 - new_heights) / 2
    width_offsets = (1 - new_widths) / 2
    boxes = tf.stack([height_offsets, width_offsets, height_offsets + new_heights, width_offsets + new_widths], axis=1)
    image = tf.image.crop_and_resize(image[None], boxes, tf.range(batch_size), (224, 224))[0]
    image = tf.clip_by_value(image, 0, 1)
    return tf.image.convert_image_dtype(image, tf.uint8, saturate=True).numpy()


def main() -> None:
    with np.load(SOURCE) as data:
        frames = np.stack([data[key][index] for key, index in PICKS])
    jpeg = np.stack([jpeg_roundtrip(f) for f in frames])
    resized = np.stack([resize_image_for_policy(f) for f in frames])
    cropped = np.stack([center_crop_image(r) for r in resized])
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(TARGET, frames=frames, jpeg=jpeg, resized=resized, cropped=cropped,
                        picks=np.array([f"{k}[{i}]" for k, i in PICKS]), tf_version=np.array(tf.__version__))
    print(f"wrote {TARGET} ({TARGET.stat().st_size / 1e6:.2f} MB) with TensorFlow {tf.__version__}")


if __name__ == "__main__":
    main()
