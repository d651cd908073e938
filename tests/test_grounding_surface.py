"""The shared grounding surface: RLE round trips (COCO layout) and the JSON shape."""
from __future__ import annotations

import numpy as np
import pytest

from scops.runtime.grounding import COLORS, Entity, Region, color_of, grounding_json, rle_decode, rle_encode


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (17, 4), (64, 48)])
def test_rle_round_trip(shape):
    rng = np.random.default_rng(sum(shape))
    for density in (0.0, 0.3, 1.0):
        m = rng.random(shape) < density
        rle = rle_encode(m)
        assert sum(rle["counts"]) == m.size
        np.testing.assert_array_equal(rle_decode(rle), m)


def test_rle_is_column_major_and_starts_with_zeros():
    m = np.array([[1, 0], [1, 1]], bool)          # column-major: 1, 1, 0, 1
    assert rle_encode(m) == {"size": [2, 2], "counts": [0, 2, 1, 1]}
    with pytest.raises(ValueError):
        rle_decode({"size": [2, 2], "counts": [1, 1]})


def test_colour_cycle_skips_grey():
    assert [color_of(i) for i in range(12)] == list(COLORS[:11]) + [COLORS[0]]


def test_entity_json():
    e = Entity("a dog", (4, 9), (Region(box=(1.234, 2, 3, 4), score=0.51234), Region(time=(0.5, 1.25))),
               tag="dog", color=color_of(1))
    (j,) = grounding_json([e])
    assert j == {"phrase": "a dog", "span": [4, 9], "tag": "dog", "color": "pink", "rgb": "#ec407a",
                 "rgb_light": "#f8bbd0",
                 "regions": [{"media": 0, "box": [1.23, 2.0, 3.0, 4.0], "score": 0.5123},
                             {"media": 0, "time": [0.5, 1.25]}]}
