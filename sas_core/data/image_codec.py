"""Colour and depth from any image message a robot records: raw ``sensor_msgs/Image`` and the
``image_transport`` plugins' ``sensor_msgs/CompressedImage`` (duck-typed, no ROS import).

Raw images go through :func:`sas_core.data.msg_codec.image_to_numpy` (row padding and byte order
honoured). Compressed payloads are decoded by OpenCV (``cv2.imdecode``, ``cv2.cvtColor``) after the
transports' framing is checked here, so a bad message gives a clear :class:`ImageDecodeError`.
(``rosbags-image``'s ``compressed_image_to_cvimage`` is the same ``cv2.imdecode`` call, but it
asserts on undecodable data, always assumes BGR whatever ``format`` says, and has no
compressedDepth support; its ``image_to_cvimage`` ignores ``step`` padding.)

Formats (ros-perception/image_transport_plugins):

* ``<topic>/compressed`` (compressed_image_transport): ``format`` is ``"<encoding>; <jpeg|png>
  compressed <target>"`` (e.g. ``"rgb8; jpeg compressed bgr8"``); the payload is a JPEG or PNG of
  ``<target>`` channel order. An old publisher writes just ``"jpeg"``/``"png"``: three channels are
  then BGR (OpenCV's order).
* ``<topic>/compressedDepth`` (compressed_depth_image_transport): ``format`` is ``"<encoding>;
  compressedDepth [png|rvl]"``; the payload starts with a 12-byte ``ConfigHeader`` (int32 format,
  INV_DEPTH = 0; float32 ``depthParam[2]``, little-endian as written by x86/ARM) followed by a
  PNG. For ``16UC1`` the PNG holds the millimetres themselves; for ``32FC1`` it holds quantised
  inverse depth ``q = A / d + B`` (0 = no measurement), so ``d = A / (q - B)`` with ``A, B`` from
  the header. RVL payloads are not supported (a clear error says so).

Outputs follow msg_codec: colour (H, W, 3) uint8 RGB; depth (H, W) float32 metres, 0 = invalid.
"""

from __future__ import annotations

import struct
from typing import NamedTuple, Optional

import numpy as np

from sas_core.data import msg_codec

COLOR_ENCODINGS = ("rgb8", "bgr8", "rgba8", "bgra8", "mono8", "8UC1")
DEPTH_ENCODINGS = ("16UC1", "mono16", "32FC1")
#: sizeof(compressed_depth_image_transport::ConfigHeader): int32 format + float32 depthParam[2]
DEPTH_HEADER = struct.Struct("<iff")
INV_DEPTH = 0
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8"


class ImageDecodeError(ValueError):
    """An image message that cannot be decoded; ``reason`` is a short code
    (``corrupt_image``, ``no_depth_header``, ``unsupported_format``, ``bad_image``)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class CompressedFormat(NamedTuple):
    """A parsed ``CompressedImage.format``."""

    encoding: str  # the original image's encoding ("" when the publisher did not say)
    transport: str  # "compressed" or "compressedDepth"
    codec: str  # "jpeg", "png" or "rvl"
    bgr: bool  # the payload's three channels are in BGR order


def is_compressed(msg) -> bool:
    """True for a ``CompressedImage``-like message (``format`` + ``data``, no ``encoding``)."""
    return hasattr(msg, "format") and not hasattr(msg, "encoding")


def parse_compressed_format(fmt: str) -> CompressedFormat:
    """Parse ``CompressedImage.format`` as the image_transport plugins write and read it."""
    fmt = str(fmt or "").strip()
    if ";" not in fmt:
        low = fmt.lower()
        if "compresseddepth" in low:  # oldest compressedDepth publishers: png only
            return CompressedFormat("", "compressedDepth", "png", False)
        codec = "png" if "png" in low else "jpeg"
        return CompressedFormat("", "compressed", codec, True)
    encoding, rest = fmt.split(";", 1)
    encoding, rest = encoding.strip(), rest.strip()
    if rest.startswith("compressedDepth"):
        tail = rest[len("compressedDepth"):].strip().lower()
        codec = tail or "png"
        if codec not in ("png", "rvl"):
            raise ImageDecodeError("unsupported_format", f"unsupported compressedDepth format {fmt!r}")
        return CompressedFormat(encoding, "compressedDepth", codec, False)
    low = rest.lower()
    codec = "png" if low.startswith("png") else "jpeg" if low.startswith(("jpeg", "jpg")) else ""
    if not codec:
        raise ImageDecodeError("unsupported_format", f"unsupported compressed image format {fmt!r} "
                                                     "(expected jpeg or png)")
    return CompressedFormat(encoding, "compressed", codec, "compressed bgr" in low)


def message_encoding(msg) -> str:
    """The pixel encoding a message carries: ``Image.encoding``, or the original encoding named in
    a ``CompressedImage.format`` ('' when unnamed)."""
    if is_compressed(msg):
        try:
            return parse_compressed_format(msg.format).encoding
        except ImageDecodeError:
            return ""
    return str(getattr(msg, "encoding", ""))


def is_depth_message(msg) -> bool:
    """Whether a message holds depth (a depth encoding, or the compressedDepth transport)."""
    if is_compressed(msg):
        try:
            f = parse_compressed_format(msg.format)
        except ImageDecodeError:
            return False
        return f.transport == "compressedDepth" or f.encoding in DEPTH_ENCODINGS
    return str(getattr(msg, "encoding", "")) in DEPTH_ENCODINGS


def _imdecode(data: bytes, what: str) -> np.ndarray:
    import cv2

    buf = np.frombuffer(data, np.uint8)
    if buf.size == 0:
        raise ImageDecodeError("corrupt_image", f"{what}: empty payload")
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:  # pragma: no cover - OpenCV returns None for bad data in practice
        raise ImageDecodeError("corrupt_image", f"{what}: cannot decode ({exc})") from None
    if img is None or img.size == 0:
        raise ImageDecodeError("corrupt_image", f"{what}: {len(data)} bytes that OpenCV cannot decode "
                                                "(corrupt or truncated)")
    return img


def _to_rgb(img: np.ndarray, bgr: bool) -> np.ndarray:
    import cv2

    if img.ndim == 2:
        return np.repeat(img[:, :, None], 3, axis=2)
    if img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGB if bgr else cv2.COLOR_RGBA2RGB)
    elif img.shape[2] == 3 and bgr:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(img[:, :, :3])


def decode_color(msg) -> np.ndarray:
    """A colour image message (raw or ``/compressed``) -> (H, W, 3) uint8 RGB (mono repeated).

    Raises:
        ImageDecodeError: a corrupt payload, an unsupported format or a depth image.
    """
    if is_compressed(msg):
        f = parse_compressed_format(msg.format)
        if f.transport == "compressedDepth":
            raise ImageDecodeError("bad_image", "a compressedDepth message is depth, not colour")
        img = _imdecode(bytes(msg_codec._as_bytes(msg.data)), f"{f.codec} colour image")
        if img.dtype != np.uint8:
            img = (img.astype(np.float32) * (255.0 / 65535.0)).round().astype(np.uint8)
        return _to_rgb(img, f.bgr)
    encoding = str(getattr(msg, "encoding", ""))
    if encoding not in COLOR_ENCODINGS:
        raise ImageDecodeError("unsupported_format", f"colour image has encoding {encoding!r}; supported: "
                                                     "rgb8, bgr8, rgba8, bgra8, mono8")
    try:
        img = msg_codec.image_to_numpy(msg)
    except ValueError as exc:
        raise ImageDecodeError("bad_image", str(exc)) from None
    return np.repeat(img[:, :, None], 3, axis=2) if img.ndim == 2 else img


def decode_depth(msg) -> np.ndarray:
    """A depth image message (raw ``16UC1``/``mono16`` mm or ``32FC1`` m, ``/compressedDepth``, or
    a 16-bit PNG on ``/compressed``) -> (H, W) float32 metres, 0 where there is no measurement.

    Raises:
        ImageDecodeError: ``no_depth_header`` (a compressedDepth payload without its ConfigHeader,
        e.g. a bare PNG), ``corrupt_image``, ``unsupported_format``.
    """
    from sas_core.geometry.camera import depth_image_to_metres

    if not is_compressed(msg):
        encoding = str(getattr(msg, "encoding", ""))
        if encoding not in DEPTH_ENCODINGS:
            raise ImageDecodeError("unsupported_format", f"depth image has encoding {encoding!r}; "
                                                         "supported: 16UC1 / mono16 (mm), 32FC1 (m)")
        try:
            return msg_codec.depth_to_metres(msg)
        except ValueError as exc:
            raise ImageDecodeError("bad_image", str(exc)) from None
    f = parse_compressed_format(msg.format)
    data = bytes(msg_codec._as_bytes(msg.data))
    if f.transport == "compressed":  # a plain 16-bit PNG of millimetres
        img = _imdecode(data, f"{f.codec} depth image")
        if img.ndim != 2 or img.dtype != np.uint16:
            raise ImageDecodeError("unsupported_format", f"depth on the compressed transport must be a 16-bit "
                                                         f"one-channel PNG, got {img.dtype} {img.shape}")
        return depth_image_to_metres(img, "16UC1")
    if f.codec == "rvl":
        raise ImageDecodeError("unsupported_format", "compressedDepth rvl is not supported (use png)")
    if len(data) <= DEPTH_HEADER.size or data.startswith(_PNG_MAGIC):
        raise ImageDecodeError("no_depth_header", f"compressedDepth payload of {len(data)} bytes has no "
                                                  f"{DEPTH_HEADER.size}-byte ConfigHeader before its PNG")
    fmt_code, quant_a, quant_b = DEPTH_HEADER.unpack_from(data)
    png = data[DEPTH_HEADER.size:]
    if fmt_code != INV_DEPTH or not png.startswith(_PNG_MAGIC):
        raise ImageDecodeError("no_depth_header", f"compressedDepth payload does not start with a ConfigHeader "
                                                  f"(format {fmt_code}) followed by a PNG")
    img = _imdecode(png, "compressedDepth PNG")
    if img.ndim != 2 or img.dtype != np.uint16:
        raise ImageDecodeError("corrupt_image", f"compressedDepth PNG must be 16-bit one channel, got "
                                                f"{img.dtype} {img.shape}")
    bits32 = f.encoding == "32FC1"
    if not bits32:
        return depth_image_to_metres(img, "16UC1")
    q = img.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        depth = np.where(q > 0, np.float32(quant_a) / (q - np.float32(quant_b)), np.nan).astype(np.float32)
    return depth_image_to_metres(depth, "32FC1")


# --------------------------------------------------------------------------------------------
# Encoders (the test corpus and anyone re-publishing): the inverse of the decoders

def _imencode(ext: str, img: np.ndarray, params=()) -> bytes:
    import cv2

    ok, buf = cv2.imencode(ext, img, list(params))
    if not ok:  # pragma: no cover
        raise ValueError(f"OpenCV cannot encode a {img.dtype} {img.shape} image as {ext}")
    return buf.tobytes()


def compress_color(rgb: np.ndarray, codec: str = "jpeg", encoding: str = "rgb8", quality: int = 95) -> dict:
    """Fields ``format``, ``data`` of the ``CompressedImage`` compressed_image_transport publishes
    for an (H, W, 3) uint8 RGB image whose raw encoding is ``encoding``."""
    import cv2

    rgb = np.asarray(rgb, np.uint8)
    if codec not in ("jpeg", "png"):
        raise ValueError(f"codec must be jpeg or png, got {codec!r}")
    mono = encoding in ("mono8", "8UC1")
    img = rgb if rgb.ndim == 2 else (cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY) if mono
                                     else cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    params = (cv2.IMWRITE_JPEG_QUALITY, int(quality)) if codec == "jpeg" else (cv2.IMWRITE_PNG_COMPRESSION, 3)
    target = "mono8" if mono else "bgr8"
    return {"format": f"{encoding}; {codec} compressed {target}",
            "data": np.frombuffer(_imencode("." + ("jpg" if codec == "jpeg" else "png"), img, params), np.uint8)}


def compress_depth(depth_m: np.ndarray, encoding: str = "16UC1", depth_max: float = 10.0,
                   depth_quantization: float = 100.0) -> dict:
    """Fields ``format``, ``data`` of the ``CompressedImage`` compressed_depth_image_transport
    publishes (png) for a (H, W) depth in metres (0 / NaN = none) sent as ``encoding``."""
    d = np.asarray(depth_m, np.float32)
    valid = np.isfinite(d) & (d > 0)
    if encoding in ("16UC1", "mono16"):
        mm = np.where(valid & (d < depth_max), np.round(d * 1000.0), 0).clip(0, 65535).astype(np.uint16)
        header = DEPTH_HEADER.pack(INV_DEPTH, 0.0, 0.0)
        png = _imencode(".png", mm)
    elif encoding == "32FC1":
        quant_a = np.float32(depth_quantization * (depth_quantization + 1.0))
        quant_b = np.float32(1.0 - quant_a / np.float32(depth_max))
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(valid & (d < depth_max), quant_a / d + quant_b, 0)
        header = DEPTH_HEADER.pack(INV_DEPTH, float(quant_a), float(quant_b))
        png = _imencode(".png", np.clip(q, 0, 65535).astype(np.uint16))
    else:
        raise ValueError(f"compressedDepth needs 16UC1 or 32FC1, got {encoding!r}")
    return {"format": f"{encoding}; compressedDepth png", "data": np.frombuffer(header + png, np.uint8)}

