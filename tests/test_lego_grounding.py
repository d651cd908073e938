"""Grounding read from LEGO's answers and drawn: boxes mapped from the padded square back to
the picture exactly as the original's postprocess_output, time spans to seconds, phrases,
malformed markup, and a drawn PNG whose pixels sit where the numbers say."""
from __future__ import annotations

import re

import numpy as np
import pytest

from scops.runtime.draw import box_width, draw_picture, draw_timeline, png_bytes, timeline_times
from scops.runtime.grounding import DARKER, LIGHTER, Entity, Region, rle_encode
from scops.runtime.grounding_text import MediaGeometry, map_box, parse_answer, strip_markup, unmap_box


def original_postprocess_output(outputs: str, ori_width: int, ori_height: int) -> str:
    """lego/mm_utils.py postprocess_output + postprocess_box, line for line (picture size given)."""
    max_ori = max(ori_width, ori_height)
    for match in re.findall(re.compile(r"\[[0-9.]+, [0-9.]+, [0-9.]+, [0-9.]+\]"), outputs):
        try:
            x1, y1, x2, y2 = [float(part.strip()) for part in match.strip("[]").split(",")]
            box = round(x1 * max_ori), round(y1 * max_ori), round(x2 * max_ori), round(y2 * max_ori)
            if ori_width > ori_height:
                box = box[0], box[1] - (ori_width - ori_height) // 2, box[2], box[3] - (ori_width - ori_height) // 2
            elif ori_height > ori_width:
                box = box[0] - (ori_height - ori_width) // 2, box[1], box[2] - (ori_height - ori_width) // 2, box[3]
            new = [round(box[0] / ori_width, 3), round(box[1] / ori_height, 3), round(box[2] / ori_width, 3),
                   round(box[3] / ori_height, 3)]
            new = [np.clip(v, 0, 1) for v in new]
            outputs = outputs.replace(match, f"[{new[0]}, {new[1]}, {new[2]}, {new[3]}]")
        except Exception:
            pass
    return outputs


@pytest.mark.parametrize("size", [(640, 427), (427, 640), (301, 500), (500, 301), (333, 333), (1, 7)])
def test_box_mapping_is_the_originals(size):
    w, h = size
    rng = np.random.default_rng(w * h)
    for _ in range(200):
        a, b = np.sort(rng.uniform(0, 1, 2)), np.sort(rng.uniform(0, 1, 2))
        box = [round(float(v), 2) for v in (a[0], b[0], a[1], b[1])]
        text = f"[{box[0]}, {box[1]}, {box[2]}, {box[3]}]"
        want = [float(v) for v in original_postprocess_output(text, w, h).strip("[]").split(",")]
        assert list(map_box(tuple(box), w, h)) == want, (size, box)


@pytest.mark.parametrize("size", [(640, 427), (427, 640)])
def test_box_lands_on_the_object_in_pixels(size):
    """A box drawn around a region of the original picture, expressed in the padded square the
    model sees, comes back to that region's pixels (within the 3-decimal rounding)."""
    w, h = size
    frac = (0.25, 0.5, 0.75, 0.9)
    square = unmap_box(frac, w, h)
    text = "A red ball " + "[{:.4f}, {:.4f}, {:.4f}, {:.4f}]".format(*square) + " lies on the grass."
    (ent,) = parse_answer(text, [MediaGeometry("image", w, h)])
    assert ent.phrase == "A red ball" and text[slice(*ent.span)] == "A red ball"
    px = ent.regions[0].box
    want = (frac[0] * w, frac[1] * h, frac[2] * w, frac[3] * h)
    assert max(abs(a - b) for a, b in zip(px, want)) <= 0.0005 * max(w, h) + 1.0


def test_phrases_groups_and_media():
    text = ("In the picture, a brown dog [0.1, 0.3, 0.5, 0.9] is chasing a ball [0.6, 0.6, 0.7, 0.7]; "
            "two cats [0.0, 0.0, 0.1, 0.1] [0.2, 0.2, 0.3, 0.3] watch.")
    media = [MediaGeometry("audio", duration=6.0), MediaGeometry("image", 400, 400)]
    ents = parse_answer(text, media)
    assert [e.phrase for e in ents] == ["a brown dog", "a ball", "two cats"]
    assert [len(e.regions) for e in ents] == [1, 1, 2]
    assert all(r.media == 1 for e in ents for r in e.regions)                   # the picture, not the audio
    assert [e.color for e in ents] == ["red", "pink", "orange"]
    assert ents[0].regions[0].box == pytest.approx((40.0, 120.0, 200.0, 360.0))
    assert strip_markup(text) == "In the picture, a brown dog is chasing a ball; two cats watch."


def test_time_spans_round_trip_to_seconds():
    duration = 37.4
    for t0, t1 in ((0.0, 0.1), (0.09, 0.15), (0.5, 1.0), (0.33, 0.34)):
        text = f"A person opens the door {{{t0:.2f},{t1:.2f}}}."
        (ent,) = parse_answer(text, [MediaGeometry("video", duration=duration)])
        assert ent.phrase == "A person opens the door"
        assert ent.regions[0].time == pytest.approx((t0 * duration, t1 * duration), abs=1e-3)
        back = tuple(round(s / duration, 2) for s in ent.regions[0].time)          # seconds -> the model's text
        assert back == (t0, t1)
    (ent,) = parse_answer("Then {0.2, 0.5} the man walks away.", [MediaGeometry("video", duration=10.0)])
    assert ent.phrase == "the man walks away" and ent.regions[0].time == (2.0, 5.0)


@pytest.mark.parametrize("text", [
    "[0.1, 0.2, 0.3]", "[0.1, 0.2, 0.3, 0.4", "[0.5.5, 0.1, 0.2, 0.3]", "[0.9, 0.1, 0.2, 0.3]", "[, , , ]",
    "{0.5}", "{0.6,0.2}", "{a,b}", "[1e5, 0, 1, 1]", "[" * 10000, "{" + "9" * 400 + ",1}", "]]][[[", "",
    "[0.1, 0.2, 0.3, 0.4]" * 3 + "{0.1,0.2}" * 2, "\x00[0.1,0.2,0.3,0.4]\ufffd",
])
def test_malformed_markup_is_ignored_never_raised(text):
    for media in ([], [MediaGeometry("image", 10, 20)], [MediaGeometry("video", duration=3.0)]):
        ents = parse_answer(text, media)
        for e in ents:
            assert 0 <= e.span[0] <= e.span[1] <= len(text)
            for r in e.regions:
                if r.box is not None:
                    x1, y1, x2, y2 = r.box
                    assert 0 <= x1 < x2 <= 10 and 0 <= y1 < y2 <= 20
                if r.time is not None:
                    assert 0 <= r.time[0] <= r.time[1] <= 3.0
    assert parse_answer("[0.9, 0.1, 0.2, 0.3] {0.6,0.2}", [MediaGeometry("image", 9, 9),
                                                          MediaGeometry("video", duration=1.0)]) == []


def test_markup_without_its_input_is_left_out():
    assert parse_answer("a dog [0.1, 0.1, 0.5, 0.5]", [MediaGeometry("video", duration=2.0)]) == []
    assert parse_answer("it barks {0.1,0.2}", [MediaGeometry("image", 5, 5)]) == []


def test_drawn_box_pixels_sit_where_the_numbers_say():
    h, w = 300, 400
    grey = np.full((h, w, 3), 128, np.uint8)
    box = (100.0, 60.0, 300.0, 240.0)
    mask = np.zeros((h, w), bool)
    mask[250:290, 20:80] = True
    ents = [Entity("a box", (0, 5), (Region(box=box),), color="blue"),
            Entity("a mask", (6, 12), (Region(mask=rle_encode(mask)),), color="green"),
            Entity("elsewhere", (13, 20), (Region(media=1, box=(0, 0, 50, 50)),), color="red")]
    out = draw_picture(grey, ents, media=0)
    assert out.shape == grey.shape and out.dtype == np.uint8
    stroke = box_width(w, h)                                   # int(min(H, W) / 512 * 10) = 5
    assert stroke == 5
    blue = np.array(DARKER["blue"])
    mid_y = 200                                                # below the label
    for x in (100, 100 + stroke - 1, 299 - stroke + 1, 299):   # left and right strokes, inside the box
        assert (out[mid_y, x] == blue).all(), x
    for y in (240 - stroke, 239):                              # bottom stroke
        assert (out[y, 200] == blue).all(), y
    for x, y in ((99, mid_y), (300, mid_y), (200, 240), (200, 150), (100 + stroke, mid_y)):
        assert (out[y, x] == 128).all(), (x, y)                # outside and inside stay as they were
    label = out[60:75, 100:140]                                # white text on the darker fill at the corner
    assert (label == blue).all(axis=-1).mean() > 0.3 and (label == 255).all(axis=-1).any()
    want = np.floor((128 + np.array(LIGHTER["green"], float)) / 2 + 0.5)
    assert (out[270, 50] == want).all() and (out[240, 50] == 128).all()   # mask blended at 50 %
    assert (out[:50, :50] == 128).all()                        # input 1's region is not drawn here
    assert png_bytes(out)[:8] == b"\x89PNG\r\n\x1a\n"


def test_timeline_sheet_has_a_row_per_span():
    ents = parse_answer("A man runs {0.1,0.3}. He falls {0.5,0.6}.", [MediaGeometry("video", duration=20.0)])
    times = timeline_times(ents, 0)
    assert times == [2.0, 4.0, 6.0, 10.0, 11.0, 12.0]
    frames = {t: np.full((90, 120, 3), int(t * 10), np.uint8) for t in times}
    sheet = draw_timeline(frames, ents, 0, 20.0)
    assert sheet is not None and sheet.shape[0] > 2 * 160 and sheet.shape[1] >= 3 * 213
    assert draw_timeline(frames, ents, 1, 20.0) is None



def test_cli_lists_entities():
    from scops.runtime.cli import format_grounding
    ents = parse_answer("A dog [0.1, 0.2, 0.5, 0.6] barks {0.1,0.2}.",
                        [MediaGeometry("image", 100, 100), MediaGeometry("video", duration=10.0)])
    assert format_grounding(ents) == ["  1. 'A dog': box [10, 20, 50, 60] px of input 0",
                                      "  2. 'barks': 1.00-2.00 s of input 1"]
