"""The one palette (sas_core.viz): label colours, relevance colours, PNG writing."""

import numpy as np
import pytest

from sas_core.viz import IGNORE_COLOR, SCANNET_20_COLORS, label_colors, label_palette, relevance_colors, save_png


def test_label_colors_scannet_first_then_distinct_and_grey_for_ignored():
    labels = np.array([0, 19, 20, 159, 255, -1, 400])
    c = label_colors(labels)
    assert c.dtype == np.uint8 and c.shape == (7, 3)
    np.testing.assert_array_equal(c[0], SCANNET_20_COLORS[0])
    np.testing.assert_array_equal(c[1], SCANNET_20_COLORS[19])
    for i in (4, 5, 6):
        np.testing.assert_array_equal(c[i], IGNORE_COLOR)
    table = label_palette()
    assert len({tuple(v) for v in table[:160]}) > 150  # 160-class vocabularies stay distinguishable
    np.testing.assert_array_equal(label_colors(np.arange(40)), label_colors(np.arange(40)))  # deterministic


def test_relevance_colors_stretch_between_percentiles():
    from matplotlib import colormaps

    rel = np.linspace(-1, 1, 201)
    c = relevance_colors(rel, "viridis")
    assert c.shape == (201, 3) and c.dtype == np.uint8
    np.testing.assert_array_equal(c[0], (np.asarray(colormaps["viridis"](0.0)[:3]) * 255).astype(np.uint8))
    np.testing.assert_array_equal(c[-1], (np.asarray(colormaps["viridis"](1.0)[:3]) * 255).astype(np.uint8))
    assert not np.array_equal(c[50], c[150])
    with pytest.raises(ValueError, match="unknown colormap"):
        relevance_colors(rel, "no-such-map")


def test_save_png_roundtrip(tmp_path):
    from PIL import Image

    img = (np.arange(4 * 5 * 3) % 255).astype(np.uint8).reshape(4, 5, 3)
    save_png(tmp_path / "sub" / "a.png", img)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "sub" / "a.png")), img)
    with pytest.raises(ValueError, match="uint8"):
        save_png(tmp_path / "b.png", img.astype(np.float32))


def test_legend_lists_the_present_labels_with_their_colours():
    import numpy as np

    from sas_core.viz import label_colors, with_legend

    image = np.zeros((30, 40, 3), np.uint8)
    names = ["wall", "floor", "chair"]
    out = with_legend(image, np.array([2, 0, 2, 255]), names)
    assert out.shape[1] > 40 and out.shape[0] >= 30 and np.array_equal(out[:30, :40], image)
    # swatches in label order (0, 2, 255), 14 px apart from y=4, at x = 40 + 6 .. + 14
    for i, label in enumerate((0, 2, 255)):
        swatch = out[4 + i * 14 + 6, 40 + 6 + 7]
        assert np.array_equal(swatch, label_colors(np.array([label]))[0]), (label, swatch)
    # a label that does not occur ("floor") gets no swatch: three rows only
    assert out.shape[0] == max(30, 4 + 14 * 3 + 4)
