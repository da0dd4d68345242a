"""MIL image_resizing family: upsample / resize (bilinear, nearest), crop, crop_resize, affine,
resample, and iOS17's generic ``resize``.

Sampling grids (``sampling_mode``) follow the Core ML spec's ``SamplingMode``: for an input
extent ``X`` (pixel centres ``0 .. X-1``) and ``N`` output points

* ``STRICT_ALIGN_CORNERS``: ``linspace(0, X-1, N)`` (``N == 1`` -> ``0``)
* ``ALIGN_CORNERS``: the same, but ``N == 1`` -> ``(X-1)/2``
* ``DEFAULT``: ``i * X/N``
* ``OFFSET_CORNERS``: ``(i + 0.5) * max(1, X-1)/N``
* ``UNALIGN_CORNERS``: ``(i + 0.5) * X/N - 0.5`` (PyTorch ``align_corners=False``)

every point clamped into ``[0, X-1]``.  ``crop_resize`` uses the same rules over each box
``[start, end]`` (``X-1 = end - start``).  Grids of static-shape ops are computed in NumPy
before tracing; only the gathers and the lerp run in JAX, in ``x``'s dtype.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mljax.errors import OpError
from mljax.ops._registry import register

__all__ = [
    "upsample_nearest_neighbor", "resize_nearest_neighbor", "upsample_bilinear",
    "upsample_bilinear_ios16", "resize_bilinear", "crop_resize", "crop_resize_ios16",
    "crop_resize_ios17", "crop", "affine", "resample", "resize",
]

SAMPLING_MODES = ("STRICT_ALIGN_CORNERS", "ALIGN_CORNERS", "UNALIGN_CORNERS", "DEFAULT",
                  "OFFSET_CORNERS")
BOX_MODES = ("CORNERS_HEIGHT_FIRST", "CORNERS_WIDTH_FIRST", "CENTER_SIZE_HEIGHT_FIRST",
             "CENTER_SIZE_WIDTH_FIRST")


# --------------------------------------------------------------------------------------------
# Sampling grids and 1-D interpolation
# --------------------------------------------------------------------------------------------

def _box_grid(start, end, n: int, mode: str, xp=np):
    """``n`` sample positions over ``[start, end]`` (arrays ``[...]`` -> ``[..., n]``)."""
    if mode not in SAMPLING_MODES:
        raise OpError(f"sampling_mode must be one of {SAMPLING_MODES}, found {mode!r}")
    start, end = xp.asarray(start)[..., None], xp.asarray(end)[..., None]
    length = end - start  # "X - 1"
    i = xp.arange(n, dtype=np.float32)
    if mode in ("STRICT_ALIGN_CORNERS", "ALIGN_CORNERS"):
        if n == 1:
            pos = start + (length / 2 if mode == "ALIGN_CORNERS" else 0 * length)
        else:
            pos = start + i * (length / (n - 1))
    elif mode == "DEFAULT":
        pos = start + i * ((length + 1) / n)
    elif mode == "OFFSET_CORNERS":
        delta = xp.maximum(1, length) / n
        pos = start + (i + 0.5) * delta
    else:  # UNALIGN_CORNERS
        pos = start + (i + 0.5) * ((length + 1) / n) - 0.5
    return xp.clip(pos, xp.minimum(start, end), xp.maximum(start, end))


def _grid(size: int, n: int, mode: str) -> np.ndarray:
    """Static grid over a whole axis of ``size`` pixels."""
    return _box_grid(np.float32(0), np.float32(size - 1), n, mode).astype(np.float32)


def _lerp_axis(x, pos, axis: int):
    """Linear interpolation of ``x`` along ``axis`` at positions ``pos`` (inside ``[0, L-1]``)."""
    size = x.shape[axis]
    lo = jnp.clip(jnp.floor(pos), 0, size - 1).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, size - 1)
    frac = (pos - lo).astype(x.dtype)
    shape = [1] * x.ndim
    shape[axis] = -1
    frac = frac.reshape(shape)
    a, b = jnp.take(x, lo, axis=axis), jnp.take(x, hi, axis=axis)
    return a + (b - a) * frac


def _float(x):
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32)


def _check_rank(x, op: str, rank: int = 3):
    if x.ndim < rank:
        raise OpError(f"{op}: x must have rank >= {rank}, found rank {x.ndim}")


def _scaled(size: int, scale) -> int:
    # coremltools infers floor(scale * size) with the scale held as fp32.
    return int(np.floor(np.float32(scale) * np.float32(size)))


# --------------------------------------------------------------------------------------------
# Nearest neighbour
# --------------------------------------------------------------------------------------------

def _nearest_resize(x, out_h: int, out_w: int):
    """Nearest neighbour with source index ``floor(i * in / out)`` (PyTorch's ``nearest``)."""
    for axis, n in ((-2, out_h), (-1, out_w)):
        size = x.shape[axis]
        if n <= 0:
            raise OpError(f"output size must be positive, found {n}")
        idx = np.minimum(np.arange(n) * size // n, size - 1)
        x = jnp.take(x, idx, axis=axis)
    return x


@register("upsample_nearest_neighbor")
def upsample_nearest_neighbor(x, *, scale_factor_height=1, scale_factor_width=1):
    """Nearest-neighbour upsample of the last two axes by (possibly fractional) scale factors.

    The output size is ``floor(scale * in)`` and the scale is recomputed from it, so source
    index = ``floor(i * in / out)``.
    """
    x = jnp.asarray(x)
    _check_rank(x, "upsample_nearest_neighbor")
    h, w = x.shape[-2:]
    return _nearest_resize(x, _scaled(h, scale_factor_height), _scaled(w, scale_factor_width))


@register("resize_nearest_neighbor")
def resize_nearest_neighbor(x, *, target_size_height, target_size_width):
    """Nearest-neighbour resize of the last two axes; source index ``floor(i * in / out)``."""
    x = jnp.asarray(x)
    _check_rank(x, "resize_nearest_neighbor")
    return _nearest_resize(x, int(target_size_height), int(target_size_width))


# --------------------------------------------------------------------------------------------
# Bilinear
# --------------------------------------------------------------------------------------------

def _bilinear_resize(x, out_h: int, out_w: int, mode: str):
    for axis, n in ((-2, out_h), (-1, out_w)):
        if n <= 0:
            raise OpError(f"output size must be positive, found {n}")
        x = _lerp_axis(x, _grid(x.shape[axis], n, mode), x.ndim + axis)
    return x


def _upsample_mode(align_corners: bool, half_pixel_centers: bool) -> str:
    if align_corners and half_pixel_centers:
        raise OpError("upsample_bilinear: align_corners and half_pixel_centers cannot both be True")
    if align_corners:
        return "STRICT_ALIGN_CORNERS"
    return "UNALIGN_CORNERS" if half_pixel_centers else "DEFAULT"


@register("upsample_bilinear")
def upsample_bilinear(x, *, scale_factor_height=1, scale_factor_width=1, align_corners=True):
    """Bilinear upsample of the last two axes; output size ``floor(scale * in)``.

    The scale is recomputed from the sizes (PyTorch's ``recompute_scale_factor=True``).
    ``align_corners=True``: grid ``i*(in-1)/(out-1)``; ``False``: half-pixel centres
    ``(i+0.5)*in/out - 0.5`` (clamped).
    """
    return upsample_bilinear_ios16(x, scale_factor_height=scale_factor_height,
                                   scale_factor_width=scale_factor_width,
                                   align_corners=align_corners, half_pixel_centers=None)


@register("upsample_bilinear", "iOS16")
def upsample_bilinear_ios16(x, *, scale_factor_height=1, scale_factor_width=1,
                            align_corners=True, half_pixel_centers=None):
    """Bilinear upsample; iOS16 adds ``half_pixel_centers`` (default ``not align_corners``).

    With both flags False the grid is TF's legacy ``i * in/out``.
    """
    x = jnp.asarray(x)
    _check_rank(x, "upsample_bilinear")
    if half_pixel_centers is None:
        half_pixel_centers = not align_corners
    mode = _upsample_mode(bool(align_corners), bool(half_pixel_centers))
    h, w = x.shape[-2:]
    return _bilinear_resize(x, _scaled(h, scale_factor_height), _scaled(w, scale_factor_width),
                            mode)


@register("resize_bilinear")
def resize_bilinear(x, *, target_size_height=1, target_size_width=1, sampling_mode="DEFAULT"):
    """Bilinear resize of the last two axes to a target size, on the ``sampling_mode`` grid."""
    x = jnp.asarray(x)
    _check_rank(x, "resize_bilinear")
    return _bilinear_resize(x, int(target_size_height), int(target_size_width),
                            str(sampling_mode).upper())


@register("resize", "iOS17")
def resize(x, *, shape, resized_dims, interpolation_mode="LINEAR", sampling_mode="DEFAULT"):
    """Resize the last ``resized_dims`` axes to the trailing values of ``shape`` (iOS17).

    A 0 in ``shape`` keeps that axis' size.  ``LINEAR`` interpolates separably on the
    ``sampling_mode`` grid; ``NEAREST_NEIGHBOR`` rounds the same grid to the nearest pixel
    (halves round up).  ``shape`` must be known before execution (the output shape is static).
    """
    x = jnp.asarray(x)
    shape = [int(v) for v in np.asarray(shape).reshape(-1)]
    dims, mode = int(resized_dims), str(sampling_mode).upper()
    interpolation_mode = str(interpolation_mode).upper()
    if not 0 <= dims <= len(shape) <= x.ndim:
        raise OpError(f"resize needs resized_dims ({dims}) <= len(shape) ({len(shape)}) <= "
                      f"rank of x ({x.ndim})")
    if interpolation_mode not in ("LINEAR", "NEAREST_NEIGHBOR"):
        raise OpError(f"interpolation_mode must be LINEAR or NEAREST_NEIGHBOR, found "
                      f"{interpolation_mode!r}")
    targets = shape[len(shape) - dims:]
    out = x if interpolation_mode == "NEAREST_NEIGHBOR" else _float(x)
    for k, n in enumerate(targets):
        axis = x.ndim - dims + k
        size = x.shape[axis]
        n = size if n == 0 else n
        pos = _grid(size, n, mode)
        if interpolation_mode == "LINEAR":
            out = _lerp_axis(out, pos, axis)
        else:
            out = jnp.take(out, np.clip(np.floor(pos + 0.5), 0, size - 1).astype(np.int32), axis)
    return out.astype(x.dtype)


@register("crop")
def crop(x, *, crop_height, crop_width):
    """Crop ``[top, bottom]`` (``crop_height``) and ``[left, right]`` (``crop_width``) off H, W."""
    x = jnp.asarray(x)
    _check_rank(x, "crop")
    (top, bottom), (left, right) = (np.asarray(c, int).reshape(-1)
                                    for c in (crop_height, crop_width))
    h, w = x.shape[-2:]
    if top + bottom >= h + 1 or left + right >= w + 1 or min(top, bottom, left, right) < 0:
        raise OpError(f"crop amounts {[top, bottom]}, {[left, right]} do not fit spatial size "
                      f"{(h, w)}")
    return x[..., top:h - bottom, left:w - right]


# --------------------------------------------------------------------------------------------
# crop_resize
# --------------------------------------------------------------------------------------------

def _box_corners(boxes, mode: str):
    """``[N, 4]`` boxes -> ``(h_start, w_start, h_end, w_end)``, each ``[N]``."""
    a, b, c, d = (boxes[:, k] for k in range(4))
    if mode == "CORNERS_HEIGHT_FIRST":
        return a, b, c, d
    if mode == "CORNERS_WIDTH_FIRST":
        return b, a, d, c
    if mode == "CENTER_SIZE_HEIGHT_FIRST":
        return a - c / 2, b - d / 2, a + c / 2, b + d / 2
    if mode == "CENTER_SIZE_WIDTH_FIRST":
        return b - d / 2, a - c / 2, b + d / 2, a + c / 2
    raise OpError(f"box_coordinate_mode must be one of {BOX_MODES}, found {mode!r}")


def _bilinear_at(img, ys, xs, pad_value):
    """Sample ``img [..., H, W]`` on the grid ``ys [h] x xs [w]``; outside points: ``pad_value``
    (``None``: mirrored back into the image at its edges)."""
    h, w = img.shape[-2:]
    if pad_value is None:
        ys, xs = _mirror(ys, h), _mirror(xs, w)
    out = _lerp_axis(_lerp_axis(img, ys, img.ndim - 2), xs, img.ndim - 1)
    if pad_value is None:
        return out
    inside = (((ys >= 0) & (ys <= h - 1))[:, None]) & (((xs >= 0) & (xs <= w - 1))[None, :])
    return jnp.where(inside, out, jnp.asarray(pad_value, img.dtype))


def _mirror(pos, size: int):
    """Pixel-centre positions reflected at the image's edges (``-0.5`` and ``size - 0.5``)."""
    edge = jnp.mod(pos + 0.5, 2 * size)
    return jnp.clip(jnp.where(edge > size, 2 * size - edge, edge) - 0.5, 0, size - 1)


def _crop_resize_boxes(x, boxes, target_height, target_width, normalized_coordinates,
                       spatial_scale, box_coordinate_mode, sampling_mode):
    """Per-box sample grids ``ys [N, th]`` and ``xs [N, tw]`` in input pixel coordinates."""
    x = jnp.asarray(x)
    if x.ndim != 4:
        raise OpError(f"crop_resize: x must have rank 4 [B, C, H, W], found rank {x.ndim}")
    h, w = x.shape[-2:]
    boxes = _float(boxes).astype(jnp.float32)
    h0, w0, h1, w1 = _box_corners(boxes, str(box_coordinate_mode).upper())
    mode = str(sampling_mode).upper()
    scale = np.float32(spatial_scale)
    if normalized_coordinates and mode == "UNALIGN_CORNERS":
        # half-pixel sampling: a normalized box spans pixel edges ([0, 1] is the whole image,
        # pixel centres 0 .. H-1), so it scales by H and its end is one pixel before that edge
        ys = _box_grid(h0 * scale * h, h1 * scale * h - 1, int(target_height), mode, jnp)
        xs = _box_grid(w0 * scale * w, w1 * scale * w - 1, int(target_width), mode, jnp)
        return ys, xs
    sh = scale * (np.float32(h - 1) if normalized_coordinates else 1)
    sw = scale * (np.float32(w - 1) if normalized_coordinates else 1)
    ys = _box_grid(h0 * sh, h1 * sh, int(target_height), mode, jnp)
    xs = _box_grid(w0 * sw, w1 * sw, int(target_width), mode, jnp)
    return ys, xs


@register("crop_resize")
def crop_resize(x, roi, *, target_height=1, target_width=1, normalized_coordinates=False,
                spatial_scale=1.0, box_coordinate_mode="CORNERS_HEIGHT_FIRST",
                sampling_mode="DEFAULT"):
    """Bilinear crop-and-resize of boxes ``roi [N, 1, 4|5, 1, 1]`` (iOS15).

    With 4 coordinates every box is cut from every image: ``[N, B, C, th, tw]``; with 5 the
    first is the image index: ``[N, 1, C, th, tw]``.  Normalized boxes are scaled by
    ``(H-1, W-1)`` (by ``(H, W)`` as pixel edges under ``UNALIGN_CORNERS``).  Sample points
    outside the image read 0, except under ``UNALIGN_CORNERS``, where they are mirrored back
    at the image's edges (what Core ML returns for coremltools' iOS15 test of a box outside the
    image; iOS16 replaced out-of-image behaviour by ``pad_value``).
    """
    mirror = str(sampling_mode).upper() == "UNALIGN_CORNERS"
    return _crop_resize_roi(x, roi, target_height, target_width, normalized_coordinates,
                            spatial_scale, box_coordinate_mode, sampling_mode,
                            None if mirror else 0.0)


@register("crop_resize", "iOS16")
def crop_resize_ios16(x, roi, *, target_height=1, target_width=1, normalized_coordinates=False,
                      spatial_scale=1.0, box_coordinate_mode="CORNERS_HEIGHT_FIRST",
                      sampling_mode="DEFAULT", pad_value=0.0):
    """iOS16 ``crop_resize``: as iOS15, plus ``pad_value`` for sample points outside the image
    (every sampling mode)."""
    return _crop_resize_roi(x, roi, target_height, target_width, normalized_coordinates,
                            spatial_scale, box_coordinate_mode, sampling_mode, pad_value)


def _crop_resize_roi(x, roi, target_height, target_width, normalized_coordinates, spatial_scale,
                     box_coordinate_mode, sampling_mode, pad_value):
    x, roi = jnp.asarray(x), _float(roi)
    if roi.ndim != 5 or roi.shape[2] not in (4, 5):
        raise OpError(f"crop_resize: roi must have shape [N, 1, 4|5, 1, 1], found {roi.shape}")
    roi = roi.reshape(roi.shape[0], roi.shape[2])
    ys, xs = _crop_resize_boxes(x, roi[:, -4:], target_height, target_width,
                                normalized_coordinates, spatial_scale, box_coordinate_mode,
                                sampling_mode)
    if roi.shape[1] == 5:
        index = jnp.clip(roi[:, 0].astype(jnp.int32), 0, x.shape[0] - 1)
        sample = jax.vmap(lambda img, y, x_: _bilinear_at(img, y, x_, pad_value))
        return sample(x[index], ys, xs)[:, None]
    sample_all = jax.vmap(lambda y, x_: _bilinear_at(x, y, x_, pad_value))
    return sample_all(ys, xs)


@register("crop_resize", "iOS17")
def crop_resize_ios17(x, boxes, box_indices=None, *, target_height=1, target_width=1,
                      normalized_coordinates=False, spatial_scale=1.0,
                      box_coordinate_mode="CORNERS_HEIGHT_FIRST", sampling_mode="DEFAULT",
                      pad_value=0.0):
    """iOS17 ``crop_resize``: ``boxes [N, 4]`` and ``box_indices [N]`` (default ``arange(N)``)
    replace ``roi``; the output is ``[N, C, th, tw]``."""
    x, boxes = jnp.asarray(x), jnp.asarray(boxes)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise OpError(f"crop_resize: boxes must have shape [N, 4], found {boxes.shape}")
    if box_indices is None:
        box_indices = np.arange(boxes.shape[0])
    index = jnp.clip(jnp.asarray(box_indices).astype(jnp.int32).reshape(-1), 0, x.shape[0] - 1)
    ys, xs = _crop_resize_boxes(x, boxes, target_height, target_width, normalized_coordinates,
                                spatial_scale, box_coordinate_mode, sampling_mode)
    return jax.vmap(_bilinear_at, in_axes=(0, 0, 0, None))(x[index], ys, xs, pad_value)


# --------------------------------------------------------------------------------------------
# resample / affine
# --------------------------------------------------------------------------------------------

def _to_pixels(c, size: int, coordinates_mode: str, align_corners: bool):
    """Coordinates along one axis in ``coordinates_mode`` -> pixel positions."""
    if coordinates_mode == "unnormalized":
        return c
    if coordinates_mode == "normalized_minus_one_to_one":
        c = (c + 1) / 2
    elif coordinates_mode != "normalized_zero_to_one":
        raise OpError("coordinates_mode must be unnormalized, normalized_minus_one_to_one or "
                      f"normalized_zero_to_one, found {coordinates_mode!r}")
    return c * (size - 1) if align_corners else c * size - 0.5


def _pad_index(i, size: int, padding_mode: str):
    """Integer indices (any range) -> in-range indices per ``padding_mode``, and a validity mask."""
    if padding_mode == "constant":
        return jnp.clip(i, 0, size - 1), (i >= 0) & (i < size)
    if padding_mode == "border":
        j = jnp.clip(i, 0, size - 1)
    elif padding_mode == "reflection":  # |1 2 3| -> 2 3 2 |1 2 3| 2 1 2
        period = max(2 * (size - 1), 1)
        j = jnp.mod(i, period)
        j = jnp.where(j >= size, period - j, j)
    elif padding_mode == "symmetric":  # |1 2 3| -> 3 2 1 |1 2 3| 3 2 1
        j = jnp.mod(i, 2 * size)
        j = jnp.where(j >= size, 2 * size - 1 - j, j)
    else:
        raise OpError("padding_mode must be constant, border, reflection or symmetric, found "
                      f"{padding_mode!r}")
    return j, jnp.ones_like(i, dtype=bool)


def _gather(x, iy, ix, w: int):
    """``x [B, C, H, W]`` at integer points ``iy, ix [B, P]`` -> ``[B, C, P]``."""
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    return jax.vmap(lambda img, idx: jnp.take(img, idx, axis=1))(flat, iy * w + ix)


def _sample_points(x, py, px, sampling_mode, padding_mode, padding_value):
    """Sample ``x [B, C, H, W]`` at pixel positions ``py, px [B, P]`` -> ``[B, C, P]``."""
    h, w = x.shape[-2:]
    pad = jnp.asarray(padding_value, x.dtype)

    def read(iy, ix):
        jy, vy = _pad_index(iy, h, padding_mode)
        jx, vx = _pad_index(ix, w, padding_mode)
        return jnp.where((vy & vx)[:, None, :], _gather(x, jy, jx, w), pad)

    if sampling_mode == "nearest":
        return read(jnp.floor(py + 0.5).astype(jnp.int32), jnp.floor(px + 0.5).astype(jnp.int32))
    if sampling_mode != "bilinear":
        raise OpError(f"sampling_mode must be bilinear or nearest, found {sampling_mode!r}")
    y0, x0 = jnp.floor(py), jnp.floor(px)
    fy, fx = (py - y0)[:, None, :].astype(x.dtype), (px - x0)[:, None, :].astype(x.dtype)
    y0, x0 = y0.astype(jnp.int32), x0.astype(jnp.int32)
    top = read(y0, x0) * (1 - fx) + read(y0, x0 + 1) * fx
    bottom = read(y0 + 1, x0) * (1 - fx) + read(y0 + 1, x0 + 1) * fx
    return top * (1 - fy) + bottom * fy


def _resample(x, cx, cy, sampling_mode, padding_mode, padding_value, coordinates_mode,
              align_corners):
    """Shared core: ``cx, cy [B, Ho, Wo]`` in ``coordinates_mode`` -> ``[B, C, Ho, Wo]``."""
    x = jnp.asarray(x)
    if x.ndim != 4:
        raise OpError(f"x must have rank 4 [B, C, H, W], found rank {x.ndim}")
    h, w = x.shape[-2:]
    b, ho, wo = cx.shape
    mode = str(coordinates_mode).lower()
    px = _to_pixels(cx, w, mode, bool(align_corners)).reshape(b, -1)
    py = _to_pixels(cy, h, mode, bool(align_corners)).reshape(b, -1)
    out = _sample_points(x, py, px, str(sampling_mode).lower(), str(padding_mode).lower(),
                         padding_value)
    return out.reshape(b, x.shape[1], ho, wo)


@register("resample")
def resample(x, coordinates, *, sampling_mode, padding_mode, padding_value, coordinates_mode,
             align_corners):
    """Sample ``x [B, C, H, W]`` at ``coordinates [B, Ho, Wo, 2]`` given as ``(x, y)`` = ``(w, h)``.

    Padding modes extend the image by whole pixels (``constant``: ``padding_value``;
    ``border``: edge; ``reflection``: mirror excluding the edge; ``symmetric``: including it)
    before interpolating; ``nearest`` rounds halves up.  iOS16/iOS17 only widen the
    coordinates' dtypes (fp16, small ints), which are read as fp32 here.
    """
    c = _float(coordinates).astype(jnp.float32)
    if c.ndim != 4 or c.shape[-1] != 2:
        raise OpError(f"resample: coordinates must have shape [B, Ho, Wo, 2], found {c.shape}")
    return _resample(x, c[..., 0], c[..., 1], sampling_mode, padding_mode, padding_value,
                     coordinates_mode, align_corners)


def _output_axis(n: int, coordinates_mode: str, align_corners: bool) -> np.ndarray:
    """The output grid of ``affine`` along one axis, in ``coordinates_mode`` units."""
    i = np.arange(n, dtype=np.float32)
    if coordinates_mode == "unnormalized":
        return i
    if align_corners:
        unit = i / max(n - 1, 1)
    else:
        unit = (i + 0.5) / n
    return unit * 2 - 1 if coordinates_mode == "normalized_minus_one_to_one" else unit


@register("affine")
def affine(x, transform_matrix, *, output_height, output_width, sampling_mode, padding_mode,
           padding_value, coordinates_mode, align_corners):
    """Warp ``x [B, C, H, W]`` by ``transform_matrix [B|1, 6] = [a0, a1, a2, b0, b1, b2]``.

    Output point ``(x, y)`` (in ``coordinates_mode`` units of the output grid) reads the input
    at ``(a0*x + a1*y + a2, b0*x + b1*y + b2)``, sampled as :func:`resample` does.
    """
    x = jnp.asarray(x)
    m = _float(transform_matrix).astype(jnp.float32)
    if m.ndim != 2 or m.shape[-1] != 6:
        raise OpError(f"affine: transform_matrix must have shape [B or 1, 6], found {m.shape}")
    mode = str(coordinates_mode).lower()
    gy = _output_axis(int(output_height), mode, bool(align_corners))[:, None]
    gx = _output_axis(int(output_width), mode, bool(align_corners))[None, :]
    m = jnp.broadcast_to(m, (x.shape[0], 6))[:, :, None, None]
    cx = m[:, 0] * gx + m[:, 1] * gy + m[:, 2]
    cy = m[:, 3] * gx + m[:, 4] * gy + m[:, 5]
    return _resample(x, cx, cy, sampling_mode, padding_mode, padding_value, mode, align_corners)
