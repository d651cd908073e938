"""RAM and GroundingDINO as BuboGPT's tagger and detector: the published layouts, the export's
parity records, the traceable detector against HF's own forward, and the numpy runtime
(preprocessing, caption masks, phrase extraction, tag thresholds)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from scops.runtime import detector as det
from scops.runtime import tagger as tag


@pytest.fixture(scope="module")
def manifest(grounding_bundle):
    return json.loads((grounding_bundle / "manifest.json").read_text())


def test_ram_release_layout(grounding_ckpt):
    from scops.export.fixtures_grounding import RAM_FILE, TAGS

    ckpt = torch.load(str(grounding_ckpt / RAM_FILE), map_location="cpu", weights_only=True)
    assert set(ckpt) == {"model"}
    sd = ckpt["model"]
    assert sd["label_embed"].shape == (len(TAGS), 16)
    assert sd["visual_encoder.layers.0.blocks.0.attn.qkv.weight"].shape == (24, 8)            # fused qkv
    assert sd["visual_encoder.layers.0.blocks.1.attn_mask"].shape == (64, 144, 144)           # shifted block
    assert "visual_encoder.layers.0.blocks.0.attn.relative_position_index" in sd
    assert sd["tagging_head.encoder.layer.1.crossattention.self.key.weight"].shape == (32, 16)  # K/V from 512-wide
    assert not any(".attention." in k for k in sd if k.startswith("tagging_head."))           # del_selfattention
    assert "text_decoder.cls.predictions.bias" in sd and "fc.weight" in sd


def test_groundingdino_release_layout(grounding_ckpt):
    from scops.export.fixtures_grounding import GD_FILE

    sd = torch.load(str(grounding_ckpt / GD_FILE), map_location="cpu", weights_only=True)["model"]
    assert all(k.startswith("module.") for k in sd)                                          # DDP's prefix
    assert sd["module.transformer.encoder.text_layers.0.self_attn.in_proj_weight"].shape == (96, 32)
    assert sd["module.transformer.decoder.layers.1.ca_text.in_proj_weight"].shape == (96, 32)
    assert sd["module.transformer.tgt_embed.weight"].shape == (30, 32)
    assert "module.transformer.encoder.fusion_layers.1.gamma_v" in sd
    assert "module.backbone.0.norm3.weight" in sd and "module.backbone.0.norm0.weight" not in sd
    assert torch.equal(sd["module.bbox_embed.1.layers.0.weight"],
                       sd["module.transformer.decoder.bbox_embed.1.layers.0.weight"])          # shared head, twice
    assert "module.bert.pooler.dense.weight" in sd


def test_export_validated_every_graph_off_the_traced_shape(manifest):
    v = manifest["validation"]
    for f in ("ram.onnx", "groundingdino.onnx", "sam_encoder.onnx", "sam_decoder.onnx"):
        assert v[f]["max_abs_diff"] <= 1e-4, f
    assert v["ram.onnx"]["batch"] == 2
    assert v["groundingdino.onnx"]["sizes"] == {"height": 800, "width": 1201, "text": 17}   # traced 1066 x 9
    stages = manifest["grounding"]["stages"]
    assert [s["op"] for s in stages] == ["ram", "groundingdino", "sam"]
    assert stages[1]["special_ids"] == [101, 102, 1012, 1029]
    assert (stages[1]["box_threshold"], stages[1]["text_threshold"]) == (0.25, 0.2)
    assert stages[2]["hole_area"] == 400 and stages[0]["size"] == 384


def test_detector_check_follows_onnxruntimes_seeds_only_when_they_are_a_top_k(grounding_ckpt, grounding_bundle,
                                                                                manifest):
    """GroundingDINO's queries are seeded by a top-k of encoder scores: near-tied scores may be
    ranked differently by onnxruntime and PyTorch (it happened at 800 x 1201 with random weights).
    The export check then decodes in PyTorch from onnxruntime's seeds, and refuses seeds that
    are not a top-k of PyTorch's scores."""
    import onnxruntime as ort

    from scops.export import groundingdino as gd
    from scops.export.fixtures_grounding import BERT_DIR, GD_FILE
    from scops.export.onnx_stages import reference_outputs

    model, cfg = gd.build_groundingdino(grounding_ckpt / GD_FILE, grounding_ckpt / BERT_DIR)
    record = manifest["grounding"]["stages"][1]
    spec = gd.stage_spec(cfg, record["special_ids"])
    path = grounding_bundle / record["file"]
    inputs, ref = reference_outputs(model, spec)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    seeds = sess.run(["query_index"], {t.name: a for t, a in zip(spec.inputs, inputs)})[0]
    assert np.array_equal(seeds, ref[2]) and seeds.shape == (1, cfg["num_queries"])
    logs = []
    assert gd.check_stage(model, spec, path, inputs, ref, logs.append) == (pytest.approx(0, abs=1e-4), {})
    assert logs == []

    swapped = ref[2].copy()                                   # PyTorch ranked two seeds the other way
    swapped[0, [3, 4]] = swapped[0, [4, 3]]
    stale = [r.copy() for r in ref[:2]]
    stale[0][0, [3, 4]] = stale[0][0, [4, 3]]
    diff, facts = gd.check_stage(model, spec, path, inputs, [*stale, swapped], logs.append)
    assert diff <= 1e-4 and facts == {"reseeded_queries": 2}
    assert logs and logs[-1].split(":")[1].strip().startswith(f"2 of {cfg['num_queries']} queries")

    model.last_scores = model.last_scores.clone()             # onnxruntime's 1st seed is not a top-k cell
    model.last_scores[0, int(seeds[0, 0])] -= 10.0
    with pytest.raises(RuntimeError, match="not PyTorch's top"):
        gd.check_stage(model, spec, path, inputs, [*stale, swapped], logs.append)


def test_tagger_runtime_matches_pytorch(grounding_ckpt, grounding_bundle, photos):
    import onnxruntime as ort
    from PIL import Image

    from scops.export.fixtures_grounding import ALWAYS, RAM_FILE, TAGS
    from scops.export.ram import build_ram

    model, _ = build_ram(grounding_ckpt / RAM_FILE)
    rgb = photos["coffee"]
    x = torch.from_numpy(np.asarray(Image.fromarray(rgb).resize((384, 384), Image.BILINEAR), np.float32) / 255)
    x = ((x - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])).permute(2, 0, 1)[None]
    with torch.no_grad():
        ref = model(x)[0].numpy()
    spec = json.loads((grounding_bundle / "manifest.json").read_text())["grounding"]["stages"][0]
    tags, thr = tag.load_tag_table(grounding_bundle / spec["tags"])
    sess = ort.InferenceSession(str(grounding_bundle / spec["file"]), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"pixel_values": tag.prepare_image(rgb, spec)})[0][0]
    assert np.abs(got - ref).max() < 1e-4
    assert tag.Tagger(sess, spec, tags, thr)(rgb) == list(TAGS[:ALWAYS])    # thresholds 0 / 1 in the fixture


def test_tag_thresholds_are_per_class_and_ordered():
    tags = ["dog", "grass", "field"]
    assert tag.select_tags(np.array([0.7, 0.66, 0.2]), tags, np.array([0.68, 0.65, 0.1])) == tags
    assert tag.select_tags(np.array([0.68, 0.6, 0.2]), tags, np.array([0.68, 0.65, 0.9])) == []   # strictly above
    with pytest.raises(ValueError):
        tag.select_tags(np.zeros(2), tags, np.zeros(3))


def test_resize_and_caption_follow_groundingdino():
    assert det.resize_shape(480, 640, 800, 1333) == (800, 1066)
    assert det.resize_shape(800, 600, 800, 1333) == (1066, 800)
    assert det.resize_shape(1000, 200, 800, 1333) == (1335, 267)        # long side capped: short side 267
    assert det.resize_shape(800, 900, 800, 1333) == (800, 900)          # already there: untouched
    assert det.caption_of(["Dog", "passenger train", "grass"]) == "dog,passenger train,grass."
    assert det.caption_of([]) == "."


def test_text_masks_match_groundingdino():
    from transformers.models.grounding_dino.modeling_grounding_dino import (
        generate_masks_with_special_tokens_and_transfer_map)

    rng = np.random.default_rng(0)
    for n in (5, 17, 300):
        ids = rng.integers(2000, 3000, n)
        ids[0], ids[-1] = 101, 102
        ids[rng.choice(np.arange(1, n - 1), size=max(1, n // 6), replace=False)] = 1012
        ids[n // 2] = 1029
        mask, pos = det.text_masks(ids, [101, 102, 1012, 1029])
        ref_mask, ref_pos = generate_masks_with_special_tokens_and_transfer_map(torch.from_numpy(ids)[None])
        assert np.array_equal(mask, ref_mask[0].numpy()) and np.array_equal(pos, ref_pos[0].numpy())
    feeds = det.text_inputs(list(ids), [101, 102, 1012, 1029], 256)
    assert feeds["input_ids"].shape == (1, 256) and feeds["text_self_attention_masks"].shape == (1, 256, 256)


def test_phrases_and_boxes_follow_predict():
    """Kept: best token > 0.25; phrase: tokens > 0.2 at positions 1..254, '.' removed; boxes to pixels."""
    ids = [101, 7, 8, 9, 1012, 102]
    words = {7: "brown", 8: "dog", 9: ",", 1012: ".", 101: "[CLS]", 102: "[SEP]"}
    probs = np.zeros((3, 256), np.float32)
    probs[0, [0, 1, 2]] = [0.9, 0.3, 0.5]       # [CLS] is never part of a phrase
    probs[1, [2, 4]] = [0.24, 0.21]             # best 0.24: below the box threshold
    probs[2, [2, 4, 5]] = [0.6, 0.3, 0.25]
    boxes = np.array([[0.5, 0.5, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1], [0.25, 0.75, 0.5, 0.5]], np.float32)
    out = det.select(probs, boxes, ids, lambda t: " ".join(words[i] for i in t), 0.25, 0.2, (100, 200))
    assert [d.phrase for d in out] == ["brown dog", "dog  [SEP]"]
    assert out[0].box == pytest.approx((80.0, 30.0, 120.0, 70.0))
    assert out[1].box == pytest.approx((0.0, 50.0, 100.0, 100.0)) and out[0].score == pytest.approx(0.9)


def test_traceable_detector_equals_hf_forward(grounding_ckpt):
    """The re-stated forward (shapes from tensors, masks as inputs) gives what HF's own
    GroundingDinoForObjectDetection gives, at a window-aligned size where HF's Swin and the
    detection Swin agree, with HF's logit clamp set to the original's for the comparison."""
    import transformers.models.grounding_dino.modeling_grounding_dino as hfm
    from transformers import GroundingDinoForObjectDetection

    from scops.export import groundingdino as gd
    from scops.export.fixtures_grounding import BERT_DIR, GD_FILE
    from scops.export.groundingdino_modules import inverse_sigmoid
    from scops.export.ram import swin_to_hf

    model, cfg = gd.build_groundingdino(grounding_ckpt / GD_FILE, grounding_ckpt / BERT_DIR)
    state = gd.load_groundingdino_checkpoint(grounding_ckpt / GD_FILE)
    hf_state, swin = gd.groundingdino_to_hf(state)
    conf = gd.hf_config(cfg)
    conf.backbone_config.depths = cfg["swin"]["depths"]
    hf = GroundingDinoForObjectDetection(conf).eval()
    pre = "model.backbone.conv_encoder.model."
    for i in gd.OUT_INDICES:
        for kind in ("weight", "bias"):
            hf_state[f"{pre}hidden_states_norms.stage{i + 1}.{kind}"] = swin.pop(f"norm{i}.{kind}")
    hf_state.update({pre + k: v for k, v in swin_to_hf({"visual_encoder." + k: v for k, v in swin.items()}).items()})
    missing, unexpected = hf.load_state_dict(hf_state, strict=False)
    assert not unexpected and all(k.endswith("relative_position_index") for k in missing)

    ids = [101, *range(104, 110), 1012, 110, 111, 1012, 102]
    feeds = det.text_inputs(ids, [101, 102, 1012, 1029], 256)
    x = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(0))
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    logit = torch.special.logit
    try:
        torch.special.logit = lambda v, eps=None: inverse_sigmoid(v)
        with torch.no_grad():
            ref = hf(pixel_values=x, input_ids=t["input_ids"], token_type_ids=t["token_type_ids"],
                     attention_mask=t["attention_mask"])
    finally:
        torch.special.logit = logit
    with torch.no_grad():
        probs, boxes, _ = model(x, *(t[k] for k in gd.TEXT_INPUTS))
    assert hfm.SPECIAL_TOKENS == [101, 102, 1012, 1029]
    assert torch.allclose(probs, ref.logits.sigmoid(), atol=1e-4)
    assert torch.allclose(boxes, ref.pred_boxes, atol=1e-4)
