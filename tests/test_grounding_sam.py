"""SAM as BuboGPT's segmenter: the published key layout, ONNX parity of both graphs, and the
numpy runtime (resize, box transform, mask upsampling, hole filling) against a PyTorch
reference written from segment_anything's predictor."""
from __future__ import annotations

import numpy as np
import pytest

from scops.runtime import segmenter as seg

import torch


@pytest.fixture(scope="module")
def sam_files(grounding_ckpt, grounding_bundle):
    """The tiny SAM, its sizes, and the bundle its two graphs were exported into (and validated)."""
    import json

    from scops.export import sam
    from scops.export.fixtures_grounding import SAM_FILE

    model, cfg = sam.build_sam(grounding_ckpt / SAM_FILE)
    manifest = json.loads((grounding_bundle / "manifest.json").read_text())
    checks = {name: manifest["validation"][f"{name}.onnx"] for name in ("sam_encoder", "sam_decoder")}
    return {"ckpt": grounding_ckpt / SAM_FILE, "model": model, "cfg": cfg, "out": grounding_bundle, "checks": checks}


def test_fixture_has_segment_anything_names(sam_files):
    """The tiny checkpoint is a flat dict under the published names (build_sam's modules)."""
    state = torch.load(str(sam_files["ckpt"]), map_location="cpu", weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert shapes["image_encoder.pos_embed"] == (1, 16, 16, 32)
    assert shapes["image_encoder.blocks.1.attn.rel_pos_h"] == (2 * 16 - 1, 16)     # global block
    assert shapes["image_encoder.blocks.0.attn.rel_pos_h"] == (2 * 7 - 1, 16)      # window 7
    assert shapes["image_encoder.neck.0.weight"] == (32, 32, 1, 1)
    assert shapes["image_encoder.neck.2.weight"] == (32, 32, 3, 3)
    assert shapes["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] == (2, 16)
    assert shapes["prompt_encoder.mask_downscaling.6.weight"] == (32, 16, 1, 1)
    assert shapes["mask_decoder.iou_prediction_head.layers.2.weight"] == (4, 32)   # 3 + 1 masks
    assert shapes["mask_decoder.output_hypernetworks_mlps.3.layers.2.weight"] == (4, 32)
    assert shapes["mask_decoder.output_upscaling.3.weight"] == (8, 4, 2, 2)        # ConvTranspose2d
    assert "mask_decoder.transformer.layers.1.cross_attn_image_to_token.out_proj.weight" in shapes
    assert "mask_decoder.transformer.norm_final_attn.weight" in shapes
    assert not any(k.startswith(("vision_encoder", "shared_image_embedding")) for k in shapes)


def test_sizes_read_off_the_checkpoint(sam_files):
    v = sam_files["cfg"]["vision"]
    assert (v["image_size"], v["global_attn_indexes"], v["window_size"], v["num_attention_heads"]) == \
        (256, [1, 3], 7, 2)


def test_both_graphs_match_pytorch(sam_files):
    """The export re-ran each graph against PyTorch, the decoder at 3 boxes (traced with 1)."""
    for name, check in sam_files["checks"].items():
        assert check["max_abs_diff"] <= 1e-4, name
    assert sam_files["checks"]["sam_decoder"]["batch"] == 3


def _reference_masks(model, rgb, boxes):
    """SamPredictor.set_image + predict_torch(boxes, multimask_output=False) + postprocess_masks."""
    import torch.nn.functional as F
    from PIL import Image

    size = model.config.vision_config.image_size
    h, w = rgb.shape[:2]
    scale = size / max(h, w)
    nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
    small = torch.from_numpy(np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.BILINEAR))).float()
    x = small.permute(2, 0, 1)[None]
    mean = torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(-1, 1, 1)
    x = F.pad((x - mean) / std, (0, size - nw, 0, size - nh))
    b = torch.as_tensor(boxes, dtype=torch.float32).clone()
    b[:, 0::2] *= nw / w
    b[:, 1::2] *= nh / h
    with torch.no_grad():
        emb = model.get_image_embeddings(x)
        low = model(image_embeddings=emb, input_boxes=b[None], multimask_output=False).pred_masks[0]
        up = F.interpolate(low, (size, size), mode="bilinear", align_corners=False)[..., :nh, :nw]
        return F.interpolate(up, (h, w), mode="bilinear", align_corners=False)[:, 0].numpy(), (nh, nw)


def test_runtime_masks_match_the_predictor(sam_files):
    import onnxruntime as ort

    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (150, 331, 3), dtype=np.uint8)       # wide, odd sizes: padding + crop
    boxes = np.array([[10, 20, 120, 140], [200.5, 5, 330, 90], [0, 0, 331, 150]], np.float32)
    ref, resized = _reference_masks(sam_files["model"], rgb, boxes)
    out = sam_files["out"]
    enc = ort.InferenceSession(str(out / "sam_encoder.onnx"), providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(str(out / "sam_decoder.onnx"), providers=["CPUExecutionProvider"])
    from scops.export.sam import manifest_record
    spec = manifest_record(sam_files["cfg"])
    s = seg.Segmenter(enc, dec, dict(spec, hole_area=0))
    emb, got_resized = s.embed(rgb)
    assert got_resized == resized
    low, _ = dec.run(None, {"image_embeddings": emb,
                            "boxes": seg.boxes_to_frame(boxes, rgb.shape[:2], resized)})
    logits = np.stack([seg.upsample_logits(m, s.size, resized, rgb.shape[:2]) for m in low])
    assert np.abs(logits - ref).max() < 1e-4
    masks, iou = s.masks(rgb, boxes, (emb, resized))
    masks = list(masks)
    assert len(masks) == 3 and iou.shape == (3,)
    for m, r in zip(masks, ref):
        sure = np.abs(r) > 1e-4                  # pixels whose sign float rounding cannot flip
        assert m.shape == rgb.shape[:2] and np.array_equal(m[sure], r[sure] > 0)


def test_bilinear_matches_torch_interpolate():
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    low = rng.standard_normal((64, 64)).astype(np.float32)
    for size, resized, original in ((256, (117, 256), (150, 331)), (1024, (1024, 683), (4000, 2667)),
                                    (256, (256, 256), (7, 5))):
        t = torch.from_numpy(low)[None, None]
        up = F.interpolate(t, (size, size), mode="bilinear", align_corners=False)[..., :resized[0], :resized[1]]
        ref = F.interpolate(up, original, mode="bilinear", align_corners=False)[0, 0].numpy()
        got = seg.upsample_logits(low, size, resized, original)
        assert np.abs(got - ref).max() < 1e-4
        striped = seg.upsample_mask(low, size, resized, original)
        sure = np.abs(ref) > 1e-4
        assert np.array_equal(striped[sure], ref[sure] > 0)


def test_hole_filling_follows_remove_small_regions():
    """Background regions under 400 px (8-connected, border ones too) become foreground."""
    m = np.ones((100, 100), bool)
    m[10:29, 10:31] = False              # 19 x 21 = 399 px: filled
    m[50:70, 10:30] = False              # 20 x 20 = 400 px: kept
    m[0:5, 90:100] = False               # 50 px touching the border: filled (cv2 counts it too)
    m[60:75, 60:80] = False              # 300 px ...
    m[75:90, 80:100] = False             # ... + 300 px touching it only at a corner: one 600 px
    #                                      region with 8-connectivity (kept), two small ones with 4
    out = seg.fill_small_holes(m, 400)
    assert out[10:29, 10:31].all() and out[0:5, 90:100].all()
    assert not out[50:70, 10:30].any() and not out[60:75, 60:80].any() and not out[75:90, 80:100].any()
    assert out.sum() == m.sum() + 399 + 50
    big = np.zeros((30, 30), bool)       # all background: one 900 px region, nothing to fill
    assert not seg.fill_small_holes(big, 400).any()
    assert seg.fill_small_holes(np.ones((5, 5), bool), 400).all()


@pytest.mark.parametrize("n_low, size, resized, original", [
    (64, 256, (117, 256), (150, 331)),          # wide, odd: padding cropped, upscaled
    (64, 256, (256, 171), (7, 5)),              # downscaled to a few pixels
    (64, 256, (256, 256), (1, 1)),
    (64, 256, (3, 256), (2, 600)),              # a sliver
    (256, 1024, (768, 1024), (800, 1066)),      # the bench's 4:3 photo
    (256, 1024, (1024, 683), (3001, 2001)),     # more rows than one stripe, prime-ish sizes
    (16, 64, (64, 37), (129, 75)),
])
def test_tapped_upsampling_equals_the_dense_reference(n_low, size, resized, original):
    """upsample_mask (taps, stripes) against upsample_logits (dense matrices, the plain twin):
    the taps are the dense weights (to float rounding), and the masks agree wherever rounding
    of the sum cannot flip the sign."""
    for n_out, kept in zip(original, resized):
        index, weight = seg._axis_taps(n_low, size, kept, n_out)
        dense = np.zeros((n_out, n_low), np.float32)
        np.add.at(dense, (np.arange(n_out)[:, None], index), weight)
        assert np.abs(dense - seg._axis_map(n_low, size, kept, n_out)).max() < 1e-6 and index.shape[1] == 3
    rng = np.random.default_rng(n_low + original[0])
    yy, xx = np.mgrid[:n_low, :n_low]
    low = (n_low / 4 - np.hypot(yy - n_low / 2, xx - n_low / 3)) + rng.standard_normal((n_low, n_low)) * 3
    for thr in (0.0, 0.7):
        ref = seg.upsample_logits(low.astype(np.float32), size, resized, original)
        got = seg.upsample_mask(low, size, resized, original, thr)
        sure = np.abs(ref - thr) > 1e-4
        assert got.shape == original and got.dtype == bool and sure.mean() > 0.99
        assert np.array_equal(got[sure], ref[sure] > thr)


def _blob_masks(rng, h, w, count):
    """Masks with holes of every size, placed anywhere (touching sides and corners too)."""
    for _ in range(count):
        m = np.zeros((h, w), bool)
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        y1, x1 = rng.integers(y0, h + 1), rng.integers(x0, w + 1)
        m[y0:y1, x0:x1] = rng.random((y1 - y0, x1 - x0)) > rng.choice([0.0, 0.05, 0.5])
        for _ in range(rng.integers(0, 6)):                      # holes of 1 to ~600 px
            hy, hx = rng.integers(0, h), rng.integers(0, w)
            m[hy:hy + rng.integers(1, 30), hx:hx + rng.integers(1, 30)] = False
        yield m


def test_cropped_hole_filling_equals_the_plain_one(monkeypatch):
    """fill_small_holes (labels the mask's box + a ring) against fill_small_holes_plain (the
    whole picture) on awkward sizes; both of its paths (crop, fallback) are taken."""
    plain = seg.fill_small_holes_plain
    fallbacks = []
    monkeypatch.setattr(seg, "fill_small_holes_plain", lambda m, a: fallbacks.append(1) or plain(m, a))
    rng = np.random.default_rng(0)
    cases = 0
    for h, w in ((1, 1), (1, 500), (7, 5), (30, 30), (97, 331), (400, 3), (203, 211)):
        for m in list(_blob_masks(rng, h, w, 25)) + [np.zeros((h, w), bool), np.ones((h, w), bool)]:
            for area in (1, 50, 400):
                assert np.array_equal(seg.fill_small_holes(m, area), plain(m, area)), (h, w, area)
                cases += 1
    frame = np.zeros((200, 200), bool)                          # a 2 px frame: small inside the box,
    frame[:198, :198] = True                                    # 796 px in the picture: kept
    assert np.array_equal(seg.fill_small_holes(frame, 400), frame)
    assert 0 < len(fallbacks) < cases
