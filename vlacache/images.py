"""The image pipeline of the official OpenVLA / OpenVLA-OFT LIBERO evaluations, without TensorFlow.

Those evaluations feed camera frames through TensorFlow: a JPEG round trip and an antialiased Lanczos-3 resize
(`resize_image` / `resize_image_for_policy`), then, for the fine-tunes trained with random crops, a bilinear
crop-and-resize of the central 90% of the area (`center_crop_image`). This module reproduces those float32 C++
kernels operation for operation in numpy, and is bit-identical to TensorFlow 2.21 (x86-64, glibc) on LIBERO frames
(tests/test_images.py, fixtures from scripts/make_tf_image_fixtures.py). TensorFlow's x86 wheels are compiled
without FMA, so every `a + b * c` below rounds the product and the sum separately, as numpy does; emulating
FMA contraction (via float64 products) was tried and moves about 1 in 80,000 resized pixels by one grey level.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import io

import numpy as np
import simplejpeg
import torch
from PIL import Image

__all__ = ["jpeg_roundtrip", "tf_resize_lanczos3", "resize_for_policy", "center_crop"]

f32 = np.float32
_PI = f32(3.14159265359)  # sampling_kernels.h: constexpr float kPI
_RADIUS = f32(3)


def jpeg_roundtrip(image: np.ndarray) -> np.ndarray:
    """`tf.io.decode_image(tf.image.encode_jpeg(image))`: uint8 [H, W, 3] -> uint8 [H, W, 3].

    TF encodes with libjpeg-turbo's defaults (integer DCT, quality 95, 4:2:0), as Pillow does, and decodes
    with the fast integer IDCT (TF's default dct_method) and fancy upsampling, which Pillow cannot (its accurate
    IDCT is up to 16 grey levels away); libjpeg-turbo through simplejpeg decodes as TF does."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buffer, format="JPEG", quality=95,
                                                                       subsampling="4:2:0")
    return simplejpeg.decode_jpeg(buffer.getvalue(), colorspace="RGB", fastdct=True, fastupsample=False)


@functools.cache
def _sinf():
    """The C library's float sine, which TF's Lanczos kernel calls (std::sin on a float). glibc's sinf is not
    always the correctly rounded sine (1.4% of arguments differ by an ulp): rounding np.sin(float64) instead
    changes 5% of the weights and ~2 pixels per million. That is the fallback without a C library (Windows)."""
    try:
        libm = ctypes.CDLL(ctypes.util.find_library("m"))
        sinf = libm.sinf
    except (OSError, AttributeError, TypeError):
        return lambda x: np.sin(x.astype(np.float64)).astype(f32)
    sinf.restype, sinf.argtypes = ctypes.c_float, [ctypes.c_float]
    ufunc = np.frompyfunc(sinf, 1, 1)
    return lambda x: ufunc(x).astype(f32)


def _lanczos3(x: np.ndarray) -> np.ndarray:
    """TF's LanczosKernelFunc(3) on float32 arguments."""
    x = np.abs(x)
    sin = _sinf()
    with np.errstate(divide="ignore", invalid="ignore"):
        value = _RADIUS * sin(_PI * x) * sin(_PI * x / _RADIUS) / (_PI * _PI * x * x)
    value = np.where(x.astype(np.float64) <= 1e-3, f32(1), value)
    return np.where(x > _RADIUS, f32(0), value)


@functools.lru_cache(maxsize=32)
def _spans(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray]:
    """ComputeSpansCore of TF's scale_and_translate (antialias, no translation): for each output position the
    input indices [out, span] (clamped; weights past the span are 0) and their float32 weights."""
    inv_scale = f32(1.0 / float(f32(out_size) / f32(in_size)))
    kernel_scale = max(inv_scale, f32(1))
    span = min(2 * int(np.ceil(_RADIUS * kernel_scale)) + 1, in_size)
    sample = (np.arange(out_size, dtype=f32) + f32(0.5)) * inv_scale
    start = np.clip(np.ceil(sample - _RADIUS * kernel_scale - f32(0.5)).astype(np.int64), 0, in_size - 1)
    end = np.clip(np.floor(sample + _RADIUS * kernel_scale - f32(0.5)).astype(np.int64), 0, in_size - 1) + 1
    source = start[:, None] + np.arange(span)
    position = (source.astype(f32) + f32(0.5)) - sample[:, None]
    weights = np.where(source < end[:, None], _lanczos3(position * (f32(1) / kernel_scale)), f32(0))
    total = np.zeros(out_size, f32)
    for k in range(span):  # TF sums sequentially
        total = total + weights[:, k]
    weights = weights * (f32(1) / total)[:, None]
    index = np.minimum(source, in_size - 1)
    index.flags.writeable = weights.flags.writeable = False
    return index, weights


def _gather(image: np.ndarray, index: np.ndarray, weights: np.ndarray, axis: int) -> np.ndarray:
    """GatherRows / GatherColumns: out = sum_k w_k * x_k along `axis`, accumulated in order in float32."""
    shape = [1] * image.ndim
    shape[axis] = -1
    out = np.zeros(1, f32)
    for k in range(index.shape[1]):
        out = out + weights[:, k].reshape(shape) * np.take(image, index[:, k], axis=axis)
    return out


def tf_resize_lanczos3(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """`tf.image.resize(image, size, "lanczos3", antialias=True)`, rounded half to even and clipped to uint8,
    as the evaluations do. image: [..., H, W, C] (uint8 or float); size: side or (height, width)."""
    height, width = (size, size) if isinstance(size, int) else size
    image = np.asarray(image).astype(f32)
    rows = _gather(image, *_spans(height, image.shape[-3]), axis=image.ndim - 3)
    out = _gather(rows, *_spans(width, image.shape[-2]), axis=image.ndim - 2)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def resize_for_policy(image: np.ndarray, size: int = 224) -> np.ndarray:
    """OpenVLA's `resize_image` / OFT's `resize_image_for_policy`: JPEG round trip, then the Lanczos-3 resize
    to size x size. image: uint8 [H, W, 3] or [B, H, W, 3] -> uint8 [..., size, size, 3]."""
    image = np.asarray(image)
    if image.ndim == 4:
        return np.stack([resize_for_policy(frame, size) for frame in image])
    return tf_resize_lanczos3(jpeg_roundtrip(image), size)


def _crop_axis(n: int, side: np.float32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """tf.image.crop_and_resize along one axis for the centred box [lo, lo + side], n samples from n pixels."""
    lo = (f32(1) - side) / f32(2)
    hi = lo + side
    step = (hi - lo) * f32(n - 1) / f32(n - 1)
    position = lo * f32(n - 1) + np.arange(n, dtype=f32) * step
    first = np.floor(position)
    return first.astype(np.intp), np.ceil(position).astype(np.intp), position - first


def center_crop(images: np.ndarray | torch.Tensor, scale: float = 0.9) -> np.ndarray | torch.Tensor:
    """OFT's `center_crop_image` (OpenVLA's with center_crop=True): crop the central `scale` of the area
    (box side sqrt(scale), computed in float32 as TF does) and resize it back bilinearly to the input size.
    images: uint8 [..., H, W, 3], numpy or torch -> the same type and shape."""
    if not 0.0 < scale <= 1.0:
        raise ValueError(f"crop scale must lie in (0, 1], got {scale}")
    as_torch = isinstance(images, torch.Tensor)
    x = (images.cpu().numpy() if as_torch else np.asarray(images)).astype(f32) * f32(1 / 255)  # convert_image_dtype
    side = np.sqrt(f32(scale))
    top, bottom, y_lerp = _crop_axis(x.shape[-3], side)
    left, right, x_lerp = _crop_axis(x.shape[-2], side)

    def across(rows: np.ndarray) -> np.ndarray:
        at_left = np.take(rows, left, axis=-2)
        return at_left + (np.take(rows, right, axis=-2) - at_left) * x_lerp[:, None]

    upper, lower = across(np.take(x, top, axis=-3)), across(np.take(x, bottom, axis=-3))
    out = np.clip(upper + (lower - upper) * y_lerp[:, None, None], 0, 1) * f32(255.5)
    out = np.minimum(out, 255).astype(np.uint8)  # convert_image_dtype(saturate=True) truncates
    return torch.from_numpy(out) if as_torch else out
