"""Compressed colour images (``sensor_msgs/CompressedImage``, image_transport's ``compressed``).

One small decoder the live node uses for ``color_transport: compressed``; swap it for the
project's general compressed-image codec when that lands (it would also read
``compressedDepth``). Duck-typed: any object with ``format`` (str) and ``data`` (bytes-like)
works (rclpy or rosbags messages). Decoding is OpenCV's ``imdecode`` (jpeg, png, ...), so the
payload is never parsed by hand.

image_transport's ``format`` strings look like ``"jpeg"`` (old drivers), ``"rgb8; jpeg
compressed bgr8"`` or ``"bgr8; png compressed bgr8"``: ``<original encoding>; <codec> compressed
<encoding of the compressed pixels>``; colour JPEGs always hold BGR pixels for OpenCV, so the
result is converted to RGB whatever the original encoding was.
"""

from __future__ import annotations

import numpy as np

__all__ = ["compressed_to_rgb", "rgb_to_compressed"]


def _payload(msg) -> np.ndarray:
    data = getattr(msg, "data", None)
    if data is None:
        raise ValueError("compressed image has no data")
    try:
        buf = np.frombuffer(data, np.uint8)  # bytes, array.array (rclpy), ndarray (rosbags)
    except (TypeError, ValueError):
        buf = np.frombuffer(bytes(data), np.uint8)  # a list of ints
    if buf.size == 0:
        raise ValueError("compressed image has no data")
    return buf


def compressed_to_rgb(msg) -> np.ndarray:
    """``sensor_msgs/CompressedImage`` (jpeg / png colour or grey) -> (H, W, 3) uint8 RGB.

    Raises:
        ValueError: no data, an undecodable payload (a corrupt JPEG), or a compressedDepth
            message (not a colour image).
    """
    import cv2

    fmt = str(getattr(msg, "format", "") or "").lower()
    if "compresseddepth" in fmt.replace(" ", ""):
        raise ValueError(f"format {fmt!r} is a compressedDepth image, not a colour image")
    img = cv2.imdecode(_payload(msg), cv2.IMREAD_COLOR)  # BGR, grey expanded to 3 channels
    if img is None:
        raise ValueError(f"compressed image (format {fmt!r}) could not be decoded")
    return np.ascontiguousarray(img[:, :, ::-1])


def rgb_to_compressed(rgb: np.ndarray, codec: str = "jpeg", quality: int = 95) -> tuple[str, bytes]:
    """(format, data) of a CompressedImage holding (H, W, 3) uint8 RGB ``rgb`` (image_transport's
    ``"rgb8; jpeg compressed bgr8"`` layout); codec ``jpeg`` or ``png``."""
    import cv2

    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    if codec not in ("jpeg", "png"):
        raise ValueError(f"codec must be jpeg or png, got {codec!r}")
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if codec == "jpeg" else []
    ok, buf = cv2.imencode(".jpg" if codec == "jpeg" else ".png", np.ascontiguousarray(rgb[:, :, ::-1]), params)
    if not ok:
        raise ValueError(f"{codec} encoding failed")
    return f"rgb8; {codec} compressed bgr8", buf.tobytes()
