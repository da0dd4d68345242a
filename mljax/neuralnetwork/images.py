"""Image features of NeuralNetwork models: PIL images / HxWxC arrays in, images out, scale and bias."""
from __future__ import annotations

import numpy as np

from mljax.errors import InputError, ModelFormatError

__all__ = ["image_to_array", "array_to_image", "image_preprocessing", "apply_preprocessing"]


def _pil():
    try:
        from PIL import Image
    except ImportError:  # PIL is optional: arrays work without it
        return None
    return Image


def image_to_array(value, spec) -> np.ndarray:
    """A PIL image or an ``H x W x C`` (``H x W`` for grayscale) array -> float32 ``[C, H, W]``.

    Arrays are read in RGB order, as PIL gives them; BGR models get their channels reversed.
    """
    gray = spec.color_space.startswith("GRAYSCALE")
    Image = _pil()
    if Image is not None and isinstance(value, Image.Image):
        arr = np.asarray(value.convert("L" if gray else "RGB"), np.float32)
    else:
        try:
            arr = np.asarray(value, np.float32)
        except (TypeError, ValueError):
            raise InputError(f"input {spec.name!r}: expected a PIL image or an H x W x C array; "
                             f"found {type(value).__name__}") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise InputError(f"input {spec.name!r}: expected an H x W x C image array; found shape {arr.shape}")
    want = 1 if gray else 3
    if arr.shape[2] == 4 and want == 3:
        arr = arr[:, :, :3]
    if arr.shape[2] != want:
        raise InputError(f"input {spec.name!r}: expected {want} channel(s) ({spec.color_space}); "
                         f"found {arr.shape[2]}")
    _check_size(spec, arr.shape[:2])
    if spec.color_space == "BGR":
        arr = arr[:, :, ::-1]
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def _check_size(spec, hw) -> None:
    im = spec.proto.type.imageType if spec.proto is not None else None
    flexible = im is not None and im.WhichOneof("SizeFlexibility") is not None
    if im is not None and flexible:
        if im.HasField("enumeratedSizes"):
            sizes = [(s.height, s.width) for s in im.enumeratedSizes.sizes]
            if tuple(hw) not in sizes:
                raise InputError(f"input {spec.name!r}: expected an image size (H, W) in {sizes}; found {tuple(hw)}")
        return
    if spec.shape and all(spec.shape) and tuple(hw) != tuple(spec.shape):
        raise InputError(f"input {spec.name!r}: expected an image of H x W = {spec.shape[0]} x "
                         f"{spec.shape[1]}; found {hw[0]} x {hw[1]}")


def array_to_image(arr, color_space: str):
    """A ``[.., C, H, W]`` blob -> a PIL image (RGB or L), or an ``H x W x C`` uint8 array without PIL."""
    arr = np.asarray(arr)
    if arr.ndim < 3 or arr.shape[-3] not in (1, 3, 4) or int(np.prod(arr.shape[:-3])) != 1:
        raise ModelFormatError(f"an image output: expected a [.., C, H, W] blob of one image with C in "
                               f"(1, 3, 4); found shape {arr.shape}")
    arr = arr.reshape(arr.shape[-3:])
    hwc = np.clip(np.rint(arr.transpose(1, 2, 0)), 0, 255).astype(np.uint8)
    if color_space == "BGR":
        hwc = hwc[:, :, ::-1]
    Image = _pil()
    if Image is None:
        return hwc
    return Image.fromarray(hwc[:, :, 0], "L") if hwc.shape[2] == 1 else Image.fromarray(hwc[:, :, :3], "RGB")


def image_preprocessing(nn, name: str, color_space: str, n_image_inputs: int):
    """``(scale, bias[C], mean[C*H*W] | None)`` of one image input from ``nn.preprocessing``.

    An entry with an empty featureName applies to the only image input.
    """
    scale, bias, mean = 1.0, None, None
    for entry in nn.preprocessing:
        if entry.featureName != name and not (entry.featureName == "" and n_image_inputs == 1):
            continue
        kind = entry.WhichOneof("preprocessor")
        if kind == "scaler":
            s = entry.scaler
            scale = s.channelScale
            if color_space.startswith("GRAYSCALE"):
                bias = np.array([s.grayBias], np.float32)
            elif color_space == "BGR":
                bias = np.array([s.blueBias, s.greenBias, s.redBias], np.float32)
            else:
                bias = np.array([s.redBias, s.greenBias, s.blueBias], np.float32)
        elif kind == "meanImage":
            mean = np.asarray(entry.meanImage.meanImage, np.float32)
    return scale, bias, mean


def apply_preprocessing(x, params):
    """``x * scale + bias`` per channel, then minus the mean image (``x`` is ``[C, H, W]``)."""
    scale, bias, mean = params
    y = x * scale
    if bias is not None:
        y = y + bias.reshape(-1, 1, 1)
    if mean is not None:
        y = y - mean.reshape(x.shape)
    return y
