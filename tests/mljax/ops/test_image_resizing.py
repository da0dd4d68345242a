"""image_resizing ops against NumPy hand references, torch (interpolate / grid_sample) and the
expected values of the Core ML spec / coremltools op tests, plus end-to-end models."""
from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mljax.errors import OpError
from mljax.ops import _registry
from mljax.ops import image_resizing as R

RNG = np.random.default_rng(2)
TOL = {np.float32: 1e-5, np.float16: 1e-2}
MODES = ["STRICT_ALIGN_CORNERS", "ALIGN_CORNERS", "UNALIGN_CORNERS", "DEFAULT", "OFFSET_CORNERS"]


def rand(shape, dtype=np.float32, lo=-3, hi=3):
    return RNG.uniform(lo, hi, size=shape).astype(dtype)


def check(actual, expected, dtype=np.float32, tol=None):
    actual = np.asarray(actual)
    expected = np.asarray(expected, np.float64)
    assert actual.dtype == np.dtype(dtype), (actual.dtype, dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    tol = TOL[dtype] if tol is None else tol
    np.testing.assert_allclose(actual.astype(np.float64), expected, rtol=tol, atol=tol)


def call(fn, *tensors, **static):
    """Run an op as the runtime does: jitted, with the static inputs bound before tracing."""
    return jax.jit(functools.partial(fn, **static))(*tensors)


def torch_interp(x, size=None, scale=None, mode="bilinear", align_corners=None):
    kw = {} if mode == "nearest" else {"align_corners": align_corners}
    t = torch.tensor(np.asarray(x, np.float64))
    if scale is not None:
        kw["recompute_scale_factor"] = True
    return F.interpolate(t, size=size, scale_factor=scale, mode=mode, **kw).numpy()


# ------------------------------------------------------------- hand references (NumPy loops)
def ref_grid(x_in, x_out, mode):
    """The SamplingMode formulas, point by point, as the spec writes them."""
    pts = []
    for i in range(x_out):
        if mode in ("STRICT_ALIGN_CORNERS", "ALIGN_CORNERS"):
            if x_out == 1:
                p = (x_in - 1) / 2 if mode == "ALIGN_CORNERS" else 0.0
            else:
                p = i * (x_in - 1) / (x_out - 1)
        elif mode == "DEFAULT":
            p = i * (x_in - x_in / x_out) / (x_out - 1) if x_out > 1 else 0.0
        elif mode == "OFFSET_CORNERS":
            delta = max(1, x_in - 1) / x_out
            p = 0.5 * delta + i * delta
        else:
            p = i * x_in / x_out + 0.5 * x_in / x_out - 0.5
        pts.append(min(x_in - 1, max(0.0, p)))
    return np.array(pts)


def ref_lerp_1d(v, p):
    lo = int(np.floor(p))
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (p - lo)


def ref_bilinear(x, gy, gx):
    x = np.asarray(x, np.float64)
    out = np.zeros(x.shape[:-2] + (len(gy), len(gx)))
    for idx in np.ndindex(x.shape[:-2]):
        img = x[idx]
        rows = np.stack([[ref_lerp_1d(img[:, c], p) for c in range(img.shape[1])] for p in gy])
        out[idx] = np.stack([[ref_lerp_1d(r, q) for q in gx] for r in rows])
    return out


def test_registered_opsets():
    reg = _registry.registry()
    expect = {"upsample_nearest_neighbor": [15], "resize_nearest_neighbor": [15],
              "upsample_bilinear": [15, 16], "resize_bilinear": [15], "crop": [15],
              "crop_resize": [15, 16, 17], "affine": [15], "resample": [15], "resize": [17]}
    for op, versions in expect.items():
        assert sorted(reg[op]) == versions, op


# ------------------------------------------------------------------------ resize_bilinear
# Grid points from the Core ML spec / coremltools docstring for Xin = 2.
SPEC_GRIDS = {
    ("UNALIGN_CORNERS", 5): [0., 0.1, 0.5, 0.9, 1.],
    ("ALIGN_CORNERS", 5): [0., 0.25, 0.5, 0.75, 1.],
    ("DEFAULT", 5): [0., 0.4, 0.8, 1., 1.],
    ("OFFSET_CORNERS", 5): [0.1, 0.3, 0.5, 0.7, 0.9],
    ("UNALIGN_CORNERS", 6): [0., 0., 1 / 3, 2 / 3, 1., 1.],
    ("STRICT_ALIGN_CORNERS", 6): [0., 0.2, 0.4, 0.6, 0.8, 1.],
    ("DEFAULT", 6): [0., 1 / 3, 2 / 3, 1., 1., 1.],
    ("OFFSET_CORNERS", 6): [1 / 12, 0.25, 5 / 12, 7 / 12, 0.75, 11 / 12],
}


@pytest.mark.parametrize("mode,n", sorted(SPEC_GRIDS))
def test_resize_bilinear_spec_examples(mode, n):
    x = np.array([0, 1], np.float32).reshape(1, 1, 2)
    y = call(R.resize_bilinear, x, target_size_height=1, target_size_width=n, sampling_mode=mode)
    check(y, np.reshape(SPEC_GRIDS[mode, n], (1, 1, n)))


SIZES = [((4, 5), (7, 3)), ((3, 6), (1, 12)), ((5, 5), (2, 1))]


@pytest.mark.parametrize("in_hw,out_hw,mode,dtype",
                         [(i, o, m, np.float32) for i, o in SIZES for m in MODES]
                         + [(*SIZES[0], m, np.float16) for m in MODES])
def test_resize_bilinear_vs_hand_reference(in_hw, out_hw, mode, dtype):
    x = rand((2, 3) + in_hw, dtype)
    y = call(R.resize_bilinear, x, target_size_height=out_hw[0], target_size_width=out_hw[1],
                          sampling_mode=mode)
    ref = ref_bilinear(x, ref_grid(in_hw[0], out_hw[0], mode), ref_grid(in_hw[1], out_hw[1], mode))
    check(y, ref, dtype)


@pytest.mark.parametrize("mode,align", [("UNALIGN_CORNERS", False), ("STRICT_ALIGN_CORNERS", True)])
@pytest.mark.parametrize("out_hw", [(13, 7), (3, 20), (6, 6)])
def test_resize_bilinear_vs_torch(mode, align, out_hw):
    x = rand((1, 2, 6, 9))
    y = call(R.resize_bilinear, x, target_size_height=out_hw[0], target_size_width=out_hw[1],
                          sampling_mode=mode)
    check(y, torch_interp(x, size=out_hw, align_corners=align))


# ------------------------------------------------------------------------ upsample_bilinear
@pytest.mark.parametrize("align", [True, False])
@pytest.mark.parametrize("scale", [(3, 4), (2.5, 2.0), (0.5, 0.75)])
def test_upsample_bilinear_vs_torch(scale, align):
    """MIL recomputes the scale from the output size (torch recompute_scale_factor=True)."""
    x = rand((2, 3, 10, 12))
    y = call(R.upsample_bilinear, x, scale_factor_height=scale[0], scale_factor_width=scale[1],
                            align_corners=align)
    check(y, torch_interp(x, scale=scale, align_corners=align))


@pytest.mark.parametrize("align,half,expected", [
    # coremltools iOS16 op test values for x = [1, 2], scales (2, 3)
    (True, False, [1.0, 1.2, 1.4, 1.6, 1.8, 2.0]),
    (False, True, [1.0, 1.0, 4 / 3, 5 / 3, 2.0, 2.0]),
    (False, None, [1.0, 1.0, 4 / 3, 5 / 3, 2.0, 2.0]),
    (False, False, [1.0, 4 / 3, 5 / 3, 2.0, 2.0, 2.0]),
])
def test_upsample_bilinear_ios16_half_pixel_centers(align, half, expected):
    x = np.array([1, 2], np.float32).reshape(1, 1, 1, 2)
    y = call(R.upsample_bilinear_ios16, x, scale_factor_height=2, scale_factor_width=3,
                                  align_corners=align, half_pixel_centers=half)
    check(y, np.tile(expected, 2).reshape(1, 1, 2, 6), tol=1e-5)


def test_upsample_bilinear_rejects_both_flags():
    with pytest.raises(OpError, match="cannot both"):
        call(R.upsample_bilinear_ios16, rand((1, 1, 2, 2)), align_corners=True,
             half_pixel_centers=True)


def test_upsample_bilinear_fractional_fp16():
    x = np.array([0, 1], np.float16).reshape(1, 1, 2)
    y = call(R.upsample_bilinear, x, scale_factor_height=1.0, scale_factor_width=2.6,
                            align_corners=False)
    check(y, np.reshape([0, 0.1, 0.5, 0.9, 1], (1, 1, 5)), np.float16)


# ------------------------------------------------------------------------ nearest neighbour
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("scale", [(2, 3), (1, 1), (3, 1)])
def test_upsample_nearest_vs_torch(scale, dtype):
    x = rand((2, 3, 4, 5), dtype)
    y = call(R.upsample_nearest_neighbor, x, scale_factor_height=scale[0],
             scale_factor_width=scale[1])
    check(y, torch_interp(x, scale=scale, mode="nearest"), dtype)


def test_upsample_nearest_fractional_scales():
    """coremltools iOS15 op test values: the scale is recomputed from floor(scale * in)."""
    x = np.array([1.5, -2.5, 3.5], np.float32).reshape(1, 1, 1, 3)
    check(call(R.upsample_nearest_neighbor, x, scale_factor_height=3.17, scale_factor_width=0.67),
          np.reshape([1.5, -2.5] * 3, (1, 1, 3, 2)))
    check(call(R.upsample_nearest_neighbor, x, scale_factor_height=2.0, scale_factor_width=1.12),
          np.reshape([1.5, -2.5, 3.5] * 2, (1, 1, 2, 3)))


@pytest.mark.parametrize("out_hw", [(7, 3), (2, 10), (4, 5)])
def test_resize_nearest_neighbor_vs_torch(out_hw):
    x = rand((1, 2, 4, 5))
    y = call(R.resize_nearest_neighbor, x, target_size_height=out_hw[0],
             target_size_width=out_hw[1])
    check(y, torch_interp(x, size=out_hw, mode="nearest"))


# ------------------------------------------------------------------------ resize (iOS17)
@pytest.mark.parametrize("mode", MODES)
def test_resize_linear_matches_resize_bilinear_reference(mode):
    x = rand((2, 3, 4, 6))
    y = call(R.resize, x, shape=np.array([5, 9]), resized_dims=2, interpolation_mode="LINEAR",
                 sampling_mode=mode)
    check(y, ref_bilinear(x, ref_grid(4, 5, mode), ref_grid(6, 9, mode)))


@pytest.mark.parametrize("mode", MODES)
def test_resize_nearest_rounds_the_grid(mode):
    x = rand((1, 2, 5, 3))
    y = call(R.resize, x, shape=[1, 2, 8, 7], resized_dims=2, interpolation_mode="NEAREST_NEIGHBOR",
                 sampling_mode=mode)
    iy = np.floor(ref_grid(5, 8, mode) + 0.5).astype(int)
    ix = np.floor(ref_grid(3, 7, mode) + 0.5).astype(int)
    check(y, x[:, :, iy][:, :, :, ix])


def test_resize_examples_and_shapes():
    # coremltools iOS17 op test: [1,1,1,2,1] -> shape [1,1,3,2], resized_dims 2
    x = np.array([-6.174, 9.371], np.float32).reshape(1, 1, 1, 2, 1)
    y = call(R.resize, x, shape=[1, 1, 3, 2], resized_dims=2, interpolation_mode="NEAREST_NEIGHBOR")
    check(y, np.reshape([-6.174, -6.174, 9.371, 9.371, 9.371, 9.371], (1, 1, 1, 3, 2)))
    x = np.array([0, 1], np.float32).reshape(1, 1, 2)
    check(call(R.resize, x, shape=[1, 1, 5], resized_dims=2),
          np.reshape([0, .4, .8, 1, 1], (1, 1, 5)))
    # 0 keeps the axis; only the trailing resized_dims axes change.
    x = rand((2, 3, 4, 5))
    assert call(R.resize, x, shape=[7, 0, 6], resized_dims=2).shape == (2, 3, 4, 6)
    y = call(R.resize, x, shape=[9], resized_dims=1, sampling_mode="ALIGN_CORNERS")
    check(y, ref_bilinear(x[..., None, :], [0.0], ref_grid(5, 9, "ALIGN_CORNERS"))[..., 0, :])
    xi = np.arange(12, dtype=np.int32).reshape(1, 3, 4)
    out = np.asarray(call(R.resize, xi, shape=[6, 8], resized_dims=2,
                          interpolation_mode="NEAREST_NEIGHBOR"))
    assert out.dtype == np.int32 and out.shape == (1, 6, 8)
    with pytest.raises(OpError, match="resized_dims"):
        call(R.resize, x, shape=[1, 2, 3, 4, 5], resized_dims=2)
    with pytest.raises(OpError, match="interpolation_mode"):
        call(R.resize, x, shape=[2, 2], resized_dims=2, interpolation_mode="CUBIC")


# ------------------------------------------------------------------------ crop
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_crop(dtype):
    x = rand((2, 3, 6, 7), dtype)
    check(call(R.crop, x, crop_height=np.array([1, 2]), crop_width=[0, 3]), x[:, :, 1:4, 0:4],
          dtype)
    check(call(R.crop, x, crop_height=[0, 0], crop_width=[0, 0]), x, dtype)
    with pytest.raises(OpError, match="do not fit"):
        call(R.crop, x, crop_height=[4, 4], crop_width=[0, 0])


# ------------------------------------------------------------------------ crop_resize
X44 = np.arange(1, 17, dtype=np.float32).reshape(1, 1, 4, 4)


def _roi(*coords):
    return np.array(coords, np.float32).reshape(len(coords), 1, len(coords[0]), 1, 1)


@pytest.mark.parametrize("roi,th,tw,normalized,expected", [
    # coremltools iOS14 op test values (ALIGN_CORNERS)
    (_roi([1, 1, 2, 2]), 2, 2, False, [6, 7, 10, 11]),
    (_roi([1, 1, 2, 2]), 4, 4, False, np.add.outer([0, 4 / 3, 8 / 3, 4], [6, 19 / 3, 20 / 3, 7])),
    (_roi([1, 1, 2, 2]), 1, 1, False, [8.5]),
    (_roi([0, 0, 0, 1 / 3, 1 / 3]), 2, 2, True, [1, 2, 5, 6]),
    (_roi([2, 2, 1, 1]), 2, 2, False, [11, 10, 7, 6]),
])
def test_crop_resize_coremltools_examples(roi, th, tw, normalized, expected):
    y = call(R.crop_resize, X44, roi, target_height=th, target_width=tw,
                      normalized_coordinates=normalized, sampling_mode="ALIGN_CORNERS")
    check(y, np.reshape(expected, (1, 1, 1, th, tw)), tol=1e-5)


@pytest.mark.parametrize("pad_value", [0.0, 10.0])
def test_crop_resize_pad_value_ios16_ios17(pad_value):
    """coremltools iOS16/iOS17 op test values: points outside the image read pad_value."""
    boxes = [[0.1, 0.3, 1.3, 1.0], [0.5, 1.8, 1.0, 0.3], [0.0, 0.4, 0.6, 0.7]]
    p = pad_value
    expected = np.array([3.1, 5.2, p, p, p, 7.899, p, 13.9, 2.2, 3.1, 9.4, 10.3])
    kw = dict(target_height=2, target_width=2, normalized_coordinates=True,
              sampling_mode="ALIGN_CORNERS", pad_value=pad_value)
    y16 = call(R.crop_resize_ios16, X44, _roi(*[[0] + b for b in boxes]), **kw)
    check(y16, expected.reshape(3, 1, 1, 2, 2), tol=1e-3)
    y17 = call(R.crop_resize_ios17, X44, np.array(boxes, np.float32), np.zeros(3, np.int32), **kw)
    check(y17, expected.reshape(3, 1, 2, 2), tol=1e-3)


def ref_crop_resize(img, box, th, tw, mode, pad=0.0):
    """NumPy: grid over [start, end] per the sampling rules, bilinear, pad outside the image."""
    h0, w0, h1, w1 = box
    h, w = img.shape[-2:]

    def grid(s, e, n):
        return s + ref_grid(e - s + 1, n, mode) if e >= s else None

    gy, gx = grid(h0, h1, th), grid(w0, w1, tw)
    out = np.full(img.shape[:-2] + (th, tw), pad, np.float64)
    for i, py in enumerate(gy):
        for j, px in enumerate(gx):
            if 0 <= py <= h - 1 and 0 <= px <= w - 1:
                out[..., i, j] = ref_bilinear(img, [py], [px])[..., 0, 0]
    return out


@pytest.mark.parametrize("mode", MODES)
def test_crop_resize_modes_vs_reference(mode):
    x = rand((2, 3, 7, 8))
    boxes = np.array([[0.5, 1.0, 5.5, 6.0], [2.0, 0.0, 3.0, 7.5], [1.0, 2.0, 6.5, 4.0]], np.float32)
    y = call(R.crop_resize_ios17, x, boxes, np.array([1, 0, 1], np.int32), target_height=3,
                            target_width=4, sampling_mode=mode)
    ref = np.stack([ref_crop_resize(x[b], box, 3, 4, mode)
                    for b, box in zip([1, 0, 1], boxes.astype(np.float64))])
    check(y, ref, tol=1e-4)


def test_crop_resize_box_modes_scale_and_batch_layout():
    x = rand((2, 2, 6, 6))
    corners = np.array([[1.0, 0.5, 4.0, 3.5]], np.float32)  # h0, w0, h1, w1
    ref = call(R.crop_resize_ios17, x, corners, np.array([1]), target_height=3, target_width=2,
                              sampling_mode="ALIGN_CORNERS")
    h0, w0, h1, w1 = corners[0]
    variants = {
        "CORNERS_WIDTH_FIRST": [w0, h0, w1, h1],
        "CENTER_SIZE_HEIGHT_FIRST": [(h0 + h1) / 2, (w0 + w1) / 2, h1 - h0, w1 - w0],
        "CENTER_SIZE_WIDTH_FIRST": [(w0 + w1) / 2, (h0 + h1) / 2, w1 - w0, h1 - h0],
    }
    for mode, box in variants.items():
        y = call(R.crop_resize_ios17, x, np.array([box], np.float32), np.array([1]),
                 target_height=3,
                                target_width=2, box_coordinate_mode=mode,
                                sampling_mode="ALIGN_CORNERS")
        check(y, np.asarray(ref), tol=1e-5)
    # spatial_scale multiplies the box; normalized boxes are scaled by (H-1, W-1)
    y = call(R.crop_resize_ios17, x, corners * 2, np.array([1]), target_height=3, target_width=2,
                            spatial_scale=0.5, sampling_mode="ALIGN_CORNERS")
    check(y, np.asarray(ref), tol=1e-5)
    y = call(R.crop_resize_ios17, x, corners / 5, np.array([1]), target_height=3, target_width=2,
                            normalized_coordinates=True, sampling_mode="ALIGN_CORNERS")
    check(y, np.asarray(ref), tol=1e-5)
    # iOS15 4-coordinate roi: every box on every image -> [N, B, C, th, tw]
    y = call(R.crop_resize, x, _roi(list(corners[0])), target_height=3, target_width=2,
                      sampling_mode="ALIGN_CORNERS")
    other = call(R.crop_resize_ios17, x, corners, np.array([0]), target_height=3, target_width=2,
                                sampling_mode="ALIGN_CORNERS")
    check(y, np.stack([np.asarray(other), np.asarray(ref)], axis=1), tol=1e-5)



def test_crop_resize_unalign_normalized_box_spans_pixel_edges():
    """UNALIGN_CORNERS (half-pixel) with normalized boxes: [0, 1] is the whole image, so the crop
    equals torch's align_corners=False resize; a partial box samples a*H + (i+0.5)*(b-a)*H/n - 0.5."""
    x = rand((1, 2, 6, 8))
    kw = dict(normalized_coordinates=True, sampling_mode="UNALIGN_CORNERS")
    y = call(R.crop_resize_ios17, x, np.array([[0, 0, 1, 1]], np.float32), target_height=4,
             target_width=3, **kw)
    check(y, torch_interp(x, size=(4, 3), align_corners=False), tol=1e-5)
    box = (0.25, 0.125, 0.75, 0.875)
    y = call(R.crop_resize_ios17, x, np.array([box], np.float32), target_height=3,
             target_width=5, **kw)
    gy = [box[0] * 6 + (i + 0.5) * (box[2] - box[0]) * 6 / 3 - 0.5 for i in range(3)]
    gx = [box[1] * 8 + (j + 0.5) * (box[3] - box[1]) * 8 / 5 - 0.5 for j in range(5)]
    check(y, ref_bilinear(x[0], gy, gx)[None], tol=1e-5)


def test_crop_resize_ios15_unalign_outside_image_mirrors():
    """coremltools' iOS15 op test: a normalized box beyond the image under UNALIGN_CORNERS reads
    the points mirrored back at the image's edges; iOS16 reads pad_value there instead."""
    roi = _roi([2, 2, 1, 1])
    kw = dict(target_height=2, target_width=2, normalized_coordinates=True,
              sampling_mode="UNALIGN_CORNERS")
    check(call(R.crop_resize, X44, roi, **kw), np.reshape([3.5, 5.5, 11.5, 13.5], (1, 1, 1, 2, 2)))
    check(call(R.crop_resize_ios16, X44, roi, pad_value=-1.0, **kw), np.full((1, 1, 1, 2, 2), -1.0))
    # rows 6.5, 4.5 mirror to 0.5, 2.5 about the edge at 3.5; columns likewise
    x = rand((1, 1, 4, 4))
    ref = ref_bilinear(x[0], [0.5, 2.5], [0.5, 2.5])
    check(call(R.crop_resize, x, roi, **kw), ref[None, None], tol=1e-5)

def test_crop_resize_fp16():
    x = rand((1, 2, 5, 5), np.float16)
    boxes = np.array([[0.5, 0.5, 3.5, 4.0]], np.float16)
    y = call(R.crop_resize_ios17, x, boxes, target_height=4, target_width=3,
                            sampling_mode="UNALIGN_CORNERS")
    ref = ref_crop_resize(x[0], boxes[0].astype(np.float64), 4, 3, "UNALIGN_CORNERS")
    check(y, ref[None], np.float16)


# ------------------------------------------------------------------------ resample / affine
RESAMPLE_X = np.array([11.0, 22.0, 33.0, 44.0], np.float32).reshape(1, 1, 2, 2)
RESAMPLE_C = np.array([-1.0, -2.0, -3.7, -1.0, 0.0, 0.0, 3.5, 1.2], np.float32).reshape(1, 2, 2, 2)


RESAMPLE_CASES = [
    # coremltools iOS15 op test values (float coordinates, then int coordinates [0,0,1,1,...])
    (("bilinear", "constant", 6.17, "normalized_minus_one_to_one", True),
     [8.585, 6.17, 27.5, 6.17], [27.5, 44.0, 27.5, 44.0]),
    (("nearest", "border", -1.0, "unnormalized", False),
     [11.0, 11.0, 11.0, 44.0], [11.0, 44.0, 11.0, 44.0]),
    (("bilinear", "reflection", -1.0, "normalized_zero_to_one", True),
     [22.0, 36.3, 11.0, 34.1], [11.0, 44.0, 11.0, 44.0]),
    (("nearest", "symmetric", -1.0, "normalized_zero_to_one", False),
     [22.0, 33.0, 11.0, 33.0], [11.0, 44.0, 11.0, 44.0]),
]


@pytest.mark.parametrize("args,expected,expected_int,cdtype",
                         [(*c, t) for c in RESAMPLE_CASES for t in (np.float32, np.int32)]
                         + [(*RESAMPLE_CASES[k], t) for k, t in ((0, np.float16), (2, np.uint8))])
def test_resample_coremltools_examples(args, expected, expected_int, cdtype):
    keys = ["sampling_mode", "padding_mode", "padding_value", "coordinates_mode", "align_corners"]
    kw = dict(zip(keys, args))
    if np.issubdtype(cdtype, np.integer):
        coords = np.array([0, 0, 1, 1] * 2).reshape(1, 2, 2, 2).astype(cdtype)
        expected = expected_int
    else:
        coords = RESAMPLE_C.astype(cdtype)
    check(call(R.resample, RESAMPLE_X, coords, **kw), np.reshape(expected, (1, 1, 2, 2)), tol=1e-3)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("padding", [("constant", "zeros"), ("border", "border")])
@pytest.mark.parametrize("align", [True, False])
def test_resample_bilinear_vs_grid_sample(align, padding, dtype):
    x = rand((2, 3, 5, 6), dtype)
    grid = rand((2, 4, 7, 2), lo=-1.3, hi=1.3)
    y = call(R.resample, x, grid, sampling_mode="bilinear", padding_mode=padding[0],
             padding_value=0.0, coordinates_mode="normalized_minus_one_to_one", align_corners=align)
    ref = F.grid_sample(torch.tensor(x, dtype=torch.float64),
                        torch.tensor(grid, dtype=torch.float64), mode="bilinear",
                        padding_mode=padding[1], align_corners=align).numpy()
    check(y, ref, dtype)


def test_resample_reflection_and_nearest_vs_grid_sample():
    x = rand((1, 2, 4, 5))
    grid = rand((1, 6, 6, 2), lo=-2.5, hi=2.5)
    t = dict(input=torch.tensor(x, dtype=torch.float64),
             grid=torch.tensor(grid, dtype=torch.float64))
    y = call(R.resample, x, grid, sampling_mode="bilinear", padding_mode="reflection",
             padding_value=0.0, coordinates_mode="normalized_minus_one_to_one", align_corners=True)
    check(y, F.grid_sample(**t, mode="bilinear", padding_mode="reflection",
                           align_corners=True).numpy())
    y = call(R.resample, x, grid, sampling_mode="nearest", padding_mode="constant",
             padding_value=0.0, coordinates_mode="normalized_minus_one_to_one", align_corners=False)
    check(y, F.grid_sample(**t, mode="nearest", padding_mode="zeros", align_corners=False).numpy())


def test_resample_unnormalized_constant_padding_value():
    x = rand((1, 1, 3, 4))
    coords = np.array([[[[1.5, 0.25], [-1.0, 0.0], [3.0, 2.0], [0.0, 2.5]]]], np.float32)
    y = np.asarray(call(R.resample, x, coords, sampling_mode="bilinear", padding_mode="constant",
                              padding_value=-7.0, coordinates_mode="unnormalized",
                              align_corners=False))
    padded = np.pad(x[0, 0].astype(np.float64), 1, constant_values=-7.0)
    ref = [ref_bilinear(padded, [cy + 1], [cx + 1])[0, 0] for cx, cy in coords[0, 0]]
    check(y, np.reshape(ref, (1, 1, 1, 4)))


def test_affine_coremltools_examples():
    tm = np.array([-1.0, -2.0, -3.7, -1.0, 3.5, 1.2], np.float32).reshape(1, 6)
    kw = dict(sampling_mode="bilinear", padding_mode="constant", padding_value=0.0,
              coordinates_mode="normalized_minus_one_to_one", align_corners=True)
    check(call(R.affine, RESAMPLE_X, tm, output_height=3, output_width=3, **kw),
          np.reshape([10.752501, 2.5025, 0, 1.98, 0, 0, 0, 0, 0], (1, 1, 3, 3)), tol=1e-4)
    check(call(R.affine, RESAMPLE_X, tm, output_height=2, output_width=5, **kw),
          np.reshape([10.752501, 5.94, 2.5025, 0.44, 0, 0, 0, 0, 0, 0], (1, 1, 2, 5)), tol=1e-4)


@pytest.mark.parametrize("per_batch", [True, False])
def test_affine_vs_torch_affine_grid(per_batch):
    x = rand((2, 3, 6, 7))
    theta = rand((2 if per_batch else 1, 6), lo=-1.2, hi=1.2)
    y = call(R.affine, x, theta, output_height=5, output_width=8, sampling_mode="bilinear",
                 padding_mode="constant", padding_value=0.0,
                 coordinates_mode="normalized_minus_one_to_one", align_corners=True)
    th = torch.tensor(np.broadcast_to(theta, (2, 6)).reshape(2, 2, 3), dtype=torch.float64)
    grid = F.affine_grid(th, (2, 3, 5, 8), align_corners=True)
    ref = F.grid_sample(torch.tensor(x, dtype=torch.float64), grid, mode="bilinear",
                        padding_mode="zeros", align_corners=True).numpy()
    check(y, ref)


# -------------------------------------------------------------------------- end to end
def _mb():
    import coremltools as ct
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil import types
    return ct, mb, types


def test_e2e_ios15_resizes():
    helpers = pytest.importorskip("helpers")
    ct, mb, types = _mb()
    x = rand((1, 2, 4, 5))

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape, dtype=types.fp32)],
                opset_version=ct.target.iOS15)
    def prog(x):
        return (mb.resize_bilinear(x=x, target_size_height=7, target_size_width=3,
                                   sampling_mode="OFFSET_CORNERS", name="rb"),
                mb.upsample_nearest_neighbor(x=x, scale_factor_height=2, scale_factor_width=3,
                                             name="un"),
                mb.upsample_bilinear(x=x, scale_factor_height=2.5, scale_factor_width=2.0,
                                     align_corners=False, name="ub"),
                mb.crop(x=x, crop_height=[1, 0], crop_width=[1, 2], name="cr"))

    out = helpers.run_mil(prog, {"x": x}, opset="iOS15")
    check(out["rb"], ref_bilinear(x, ref_grid(4, 7, "OFFSET_CORNERS"),
                                  ref_grid(5, 3, "OFFSET_CORNERS")))
    check(out["un"], torch_interp(x, scale=(2, 3), mode="nearest"))
    check(out["ub"], torch_interp(x, scale=(2.5, 2.0), align_corners=False))
    check(out["cr"], x[:, :, 1:, 1:3])


def test_e2e_ios17_crop_resize_resample_resize():
    helpers = pytest.importorskip("helpers")
    ct, mb, types = _mb()
    x = rand((2, 3, 6, 6))
    grid = rand((2, 3, 4, 2), lo=-1, hi=1)
    boxes = np.array([[0.5, 1.0, 4.0, 5.0], [1.0, 0.0, 5.0, 2.0]], np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape, dtype=types.fp32),
                             mb.TensorSpec(shape=grid.shape, dtype=types.fp32)],
                opset_version=ct.target.iOS17)
    def prog(x, g):
        return (mb.crop_resize(x=x, boxes=boxes, box_indices=np.array([1, 0], np.int32),
                               target_height=3, target_width=4, sampling_mode="ALIGN_CORNERS",
                               name="crp"),
                mb.resample(x=x, coordinates=g, sampling_mode="bilinear", padding_mode="border",
                            padding_value=0.0, coordinates_mode="normalized_minus_one_to_one",
                            align_corners=False, name="rs"),
                mb.resize(x=x, shape=np.array([5, 9], np.int32), resized_dims=np.uint32(2),
                          sampling_mode="UNALIGN_CORNERS", name="rz"))

    out = helpers.run_mil(prog, {"x": x, "g": grid}, opset="iOS17")
    ref = np.stack([ref_crop_resize(x[b], box, 3, 4, "ALIGN_CORNERS")
                    for b, box in zip([1, 0], boxes.astype(np.float64))])
    check(out["crp"], ref, tol=1e-4)
    check(out["rs"], F.grid_sample(torch.tensor(x, dtype=torch.float64),
                                   torch.tensor(grid, dtype=torch.float64), mode="bilinear",
                                   padding_mode="border", align_corners=False).numpy())
    check(out["rz"], torch_interp(x, size=(5, 9), align_corners=False))
