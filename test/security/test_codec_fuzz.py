"""Hypothesis fuzzing of the message codec (Image, PointCloud2, CameraInfo; dict messages, the codec
is duck-typed): every message decodes or raises ValueError, and the memory it costs (tracemalloc
peak) is bounded by a small multiple of the message's own data."""

import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sas_core.data import msg_codec as mc

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SIZE = st.one_of(st.integers(0, 64), st.integers(0, 2 ** 33), st.sampled_from([2 ** 32 - 1, 2 ** 31, 2 ** 16]))
SLACK = 256 << 10  # fixed costs (dtype objects, small arrays, exceptions)

# warm up: lazy imports inside the decoders must not count as the message's memory
mc.camera_info_to_intrinsics(dict(k=[100.0, 0, 5, 0, 100.0, 5, 0, 0, 1], width=10, height=10))
mc.image_to_numpy(dict(encoding="rgb8", height=1, width=1, step=3, data=b"abc"))
mc.pointcloud2_to_array(dict(fields=[("x", 0, 7, 1)], height=1, width=1, point_step=4, data=b"\0" * 4))


def _peak(fn):
    """(result or the ValueError, tracemalloc peak bytes) of ``fn()``."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        try:
            out = fn()
        except ValueError as exc:  # the only error a hostile message may cause
            out = exc
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@SETTINGS
@given(encoding=st.sampled_from(sorted(mc.IMAGE_ENCODINGS) + ["yuv422", ""]), height=SIZE, width=SIZE,
       step=st.one_of(st.just(0), SIZE), data=st.binary(max_size=3000), big=st.booleans())
def test_image_decoding_never_allocates_beyond_its_data(encoding, height, width, step, data, big):
    msg = dict(encoding=encoding, height=height, width=width, step=step, data=data, is_bigendian=big)
    out, peak = _peak(lambda: mc.image_to_numpy(msg))
    assert peak <= 4 * len(data) + SLACK, (peak, len(data), msg["height"], msg["width"], msg["step"])
    if isinstance(out, np.ndarray):
        assert out.nbytes <= len(data) or 0 in out.shape[:2]
        assert out.shape[:2] == (height, width)


def test_image_with_a_huge_step_is_refused_or_cheap():
    """The issue's probe: 3 bytes of data claiming a 4 GiB row."""
    msg = dict(encoding="rgb8", height=2, width=1, step=2 ** 32 - 1, data=b"abc")
    out, peak = _peak(lambda: mc.image_to_numpy(msg))
    assert isinstance(out, ValueError) and "need" in str(out) and peak < SLACK
    # one row: the last row needs only its pixels, not the step's padding
    out, peak = _peak(lambda: mc.image_to_numpy(dict(msg, height=1)))
    assert out.tolist() == [[[97, 98, 99]]] and peak < SLACK


FIELD = st.tuples(st.sampled_from(["x", "y", "z", "rgb", "intensity", ""]), st.one_of(st.integers(0, 16), SIZE),
                  st.integers(0, 9), st.one_of(st.integers(0, 4), SIZE))


@SETTINGS
@given(fields=st.lists(FIELD, max_size=5), height=SIZE, width=SIZE, point_step=st.one_of(st.integers(0, 32), SIZE),
       row_step=st.one_of(st.just(0), SIZE), data=st.binary(max_size=3000), big=st.booleans())
def test_pointcloud2_decoding_is_bounded_by_its_data(fields, height, width, point_step, row_step, data, big):
    msg = dict(fields=fields, height=height, width=width, point_step=point_step, row_step=row_step, data=data,
               is_bigendian=big)
    out, peak = _peak(lambda: mc.pointcloud2_to_array(msg))
    # overlapping fields may repeat bytes: one output copy per field, plus the working copies
    assert peak <= (len(fields) + 4) * len(data) + SLACK, (peak, len(data), msg)
    if isinstance(out, np.ndarray):
        assert len(out) == height * width


def test_pointcloud2_count_zero_is_refused():
    msg = dict(fields=[("x", 0, 7, 0)], height=1, width=1, point_step=4, row_step=4, data=b"\0" * 4)
    with pytest.raises(ValueError, match="count 0"):
        mc.pointcloud2_to_array(msg)
    msg["fields"] = [("x", 0, 7, 1)]
    assert mc.pointcloud2_to_array(msg)["x"].tolist() == [0.0]


def test_pointcloud2_size_is_checked_before_the_fields():
    """A cloud claiming 2^32 points of 2^32-byte steps with 16 bytes of data: refused, nothing allocated."""
    msg = dict(fields=[("x", 0, 7, 2 ** 20)], height=2 ** 16, width=2 ** 16, point_step=2 ** 32, row_step=0,
               data=b"\0" * 16)
    out, peak = _peak(lambda: mc.pointcloud2_to_array(msg))
    assert isinstance(out, ValueError) and "bytes" in str(out) and peak < SLACK


FLOAT = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 10))


@SETTINGS
@given(k=st.one_of(st.lists(FLOAT, max_size=12), st.none(), st.text(max_size=5)), width=st.one_of(SIZE, st.integers(-5, 0)),
       height=st.one_of(SIZE, st.integers(-5, 0)), bx=st.integers(-2, 8), by=st.integers(-2, 8),
       roi=st.one_of(st.none(), st.fixed_dictionaries(dict(x_offset=st.integers(-5, 50), y_offset=st.integers(-5, 50),
                                                              width=st.integers(-5, 500), height=st.integers(-5, 500)))))
def test_camera_info_decoding_refuses_or_gives_a_valid_camera(k, width, height, bx, by, roi):
    msg = dict(k=k, width=width, height=height, binning_x=bx, binning_y=by, roi=roi)
    out, peak = _peak(lambda: mc.camera_info_to_intrinsics(msg))
    assert peak < SLACK
    if not isinstance(out, ValueError):
        assert np.isfinite([out.fx, out.fy, out.cx, out.cy]).all() and out.fx > 0 and out.fy > 0
        assert out.width >= 0 and out.height >= 0
