"""Colour and depth from raw and image_transport-compressed messages (sas_core.data.image_codec)."""

from types import SimpleNamespace as Msg

import numpy as np
import pytest

from sas_core.data import image_codec as ic
from sas_core.data.msg_codec import image_fields


@pytest.fixture(scope="module")
def frame():
    from sas_core.data.synthetic import SynthConfig, generate_scene

    f = generate_scene(SynthConfig(seed=4, n_frames=1, width=64, height=48, with_lidar=False,
                                   points_per_m2=20)).frames[0]
    return f.color, f.depth


def _raw(array, encoding):
    return Msg(**image_fields(array, encoding))


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8"])
def test_raw_colour_encodings_decode_to_rgb(frame, encoding):
    rgb = frame[0]
    arr = rgb if encoding in ("rgb8", "bgr8") else np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 7, np.uint8)], 2)
    out = ic.decode_color(_raw(arr, encoding))
    np.testing.assert_array_equal(out, rgb)
    assert ic.message_encoding(_raw(arr, encoding)) == encoding and not ic.is_depth_message(_raw(arr, encoding))


def test_mono_colour_is_grey_rgb(frame):
    grey = frame[0][:, :, 1].copy()
    out = ic.decode_color(_raw(grey, "mono8"))
    assert out.shape == grey.shape + (3,) and (out == grey[:, :, None]).all()


def test_raw_depth_encodings(frame):
    depth = frame[1]
    mm = ic.decode_depth(_raw(depth, "16UC1"))
    np.testing.assert_allclose(mm, depth, atol=5.1e-4)
    m16 = ic.decode_depth(_raw(np.round(depth * 1000).astype(np.uint16), "mono16"))
    np.testing.assert_array_equal(m16, mm)
    holes = depth.copy()
    holes[::7, ::5] = np.nan
    out = ic.decode_depth(_raw(holes, "32FC1"))
    assert (out[::7, ::5] == 0).all()  # NaN holes become 0 (no measurement)
    keep = np.isfinite(holes)
    np.testing.assert_array_equal(out[keep], np.where(depth[keep] > 0, depth[keep], 0))
    assert ic.is_depth_message(_raw(holes, "32FC1"))
    with pytest.raises(ic.ImageDecodeError, match="depth image has encoding 'rgb8'"):
        ic.decode_depth(_raw(frame[0], "rgb8"))
    with pytest.raises(ic.ImageDecodeError, match="colour image has encoding '16UC1'"):
        ic.decode_color(_raw(depth, "16UC1"))


@pytest.mark.parametrize("fmt,expect", [
    ("rgb8; jpeg compressed bgr8", ("rgb8", "compressed", "jpeg", True)),
    ("bgr8; png compressed bgr8", ("bgr8", "compressed", "png", True)),
    ("rgb8; png compressed rgb8", ("rgb8", "compressed", "png", False)),
    ("jpeg", ("", "compressed", "jpeg", True)),
    ("16UC1; compressedDepth png", ("16UC1", "compressedDepth", "png", False)),
    ("32FC1; compressedDepth", ("32FC1", "compressedDepth", "png", False)),
    ("16UC1; compressedDepth rvl", ("16UC1", "compressedDepth", "rvl", False)),
])
def test_compressed_format_strings(fmt, expect):
    assert tuple(ic.parse_compressed_format(fmt)) == expect


def test_compressed_colour_round_trips(frame):
    rgb = frame[0]
    png = ic.compress_color(rgb, "png", encoding="bgr8")
    assert png["format"] == "bgr8; png compressed bgr8"
    np.testing.assert_array_equal(ic.decode_color(Msg(**png)), rgb)  # lossless
    jpg = ic.compress_color(rgb, "jpeg", quality=95)
    assert jpg["format"] == "rgb8; jpeg compressed bgr8" and bytes(jpg["data"][:2]) == b"\xff\xd8"
    out = ic.decode_color(Msg(**jpg))
    assert out.shape == rgb.shape and np.abs(out.astype(int) - rgb).mean() < 4  # channel order kept
    # a payload in RGB order (format says "compressed rgb8") is not swapped
    import cv2

    data = cv2.imencode(".png", rgb)[1]  # cv2 writes the array's channels as B, G, R
    np.testing.assert_array_equal(ic.decode_color(Msg(format="rgb8; png compressed rgb8", data=data)), rgb)


@pytest.mark.parametrize("encoding", ["16UC1", "32FC1"])
def test_compressed_depth_round_trips(frame, encoding):
    depth = frame[1].copy()
    depth[::9, ::4] = 0
    fields = ic.compress_depth(depth, encoding)
    assert fields["format"] == f"{encoding}; compressedDepth png"
    data = bytes(fields["data"])
    fmt_code, a, b = ic.DEPTH_HEADER.unpack_from(data)  # the 12-byte ConfigHeader, then a PNG
    assert fmt_code == ic.INV_DEPTH and data[12:20] == b"\x89PNG\r\n\x1a\n"
    if encoding == "32FC1":
        assert a == pytest.approx(100 * 101) and b == pytest.approx(1 - 100 * 101 / 10.0)
    out = ic.decode_depth(Msg(**fields))
    assert (out[depth == 0] == 0).all()
    d = depth[depth > 0]
    # 16UC1: millimetres; 32FC1: one step of the inverse-depth quantisation, d^2 / A
    tol = 5.1e-4 if encoding == "16UC1" else d ** 2 / a * 1.001 + 1e-5
    assert (np.abs(out[depth > 0] - d) <= tol).all()
    assert ic.is_depth_message(Msg(**fields))


def test_bad_payloads_are_clear_errors(frame):
    jpg = ic.compress_color(frame[0], "jpeg")
    truncated = Msg(format=jpg["format"], data=jpg["data"][:40])
    with pytest.raises(ic.ImageDecodeError, match="cannot decode") as e:
        ic.decode_color(truncated)
    assert e.value.reason == "corrupt_image"
    with pytest.raises(ic.ImageDecodeError) as e:
        ic.decode_color(Msg(format=jpg["format"], data=np.zeros(0, np.uint8)))
    assert e.value.reason == "corrupt_image"
    fields = ic.compress_depth(frame[1], "16UC1")
    bare = Msg(format=fields["format"], data=fields["data"][12:])  # a PNG without its ConfigHeader
    with pytest.raises(ic.ImageDecodeError, match="ConfigHeader") as e:
        ic.decode_depth(bare)
    assert e.value.reason == "no_depth_header"
    with pytest.raises(ic.ImageDecodeError, match="ConfigHeader"):
        ic.decode_depth(Msg(format=fields["format"], data=fields["data"][:8]))
    with pytest.raises(ic.ImageDecodeError, match="rvl"):
        ic.decode_depth(Msg(format="16UC1; compressedDepth rvl", data=fields["data"]))
    with pytest.raises(ic.ImageDecodeError, match="unsupported compressed image format"):
        ic.decode_color(Msg(format="rgb8; theora", data=jpg["data"]))
    with pytest.raises(ic.ImageDecodeError, match="depth, not colour"):
        ic.decode_color(Msg(**fields))
