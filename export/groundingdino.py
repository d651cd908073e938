"""GroundingDINO (Swin-T OGC) as BuboGPT's detector: picture + caption -> 900 boxes and their token scores.

The release `groundingdino_swint_ogc.pth` is `{'model': state_dict}`; keys may carry DDP's
`module.` prefix, which the original loader strips (util/utils.py clean_state_dict). Names:
  backbone.0.*                      Swin-T, detection variant (pads to the window, no window shrink),
                                    out norms norm1..norm3 for return_interm_indices [1, 2, 3]
  bert.*                            bert-base-uncased (BertModelWarper; pooler unused)
  feat_map, input_proj.N.{0,1}      768 -> 256 text projection; 1x1 / 3x3-s2 conv + GroupNorm
  transformer.{level_embed, tgt_embed, enc_output, enc_output_norm, enc_out_bbox_embed,
               encoder.{layers,text_layers,fusion_layers}.N, decoder.{layers.N, norm,
               ref_point_head, bbox_embed}}, bbox_embed.N (shared across decoder layers)
The transformer maps onto HF's GroundingDino layers (their conversion's renames; the fused
nn.MultiheadAttention in_proj split into query/key/value). HF's model-level forward bakes the
picture size into a traced graph (Python loops over feature shapes, a data-dependent mask
builder), so the forward here is written again with every shape taken from the tensors, and
calls HF's encoder/decoder layers, text backbone and heads. Two facts follow the original,
not HF: reference refinement uses GroundingDINO's inverse_sigmoid (clamp at 1e-3; HF's logit
clamps at 1e-5), and the text self-attention mask and position ids are inputs (computed by
the runtime from the caption, as generate_masks_with_special_tokens_and_transfer_map does).

Graph: groundingdino.onnx
  pixel_values [1, 3, H, W]  input_ids / token_type_ids / attention_mask [1, T]
  text_self_attention_masks [1, T, T] (bool)  position_ids [1, T]
  -> probs [1, Q, 256] (sigmoid of the token logits, 0 past the caption), boxes [1, Q, 4] (cx, cy, w, h in 0-1)
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from .onnx_stages import OnnxStageSpec, TensorSpec

# eval_configs/GroundingDINO_SwinT_OGC.yaml (BuboGPT) = the release's config
NHEADS = 8                      # nheads (text enhancer and fusion use nheads // 2, as HF does)
MAX_TEXT_LEN = 256
PE_TEMPERATURE = 20             # pe_temperatureH / pe_temperatureW
SWIN_WINDOW = 7
SWIN_PATCH = 4
OUT_INDICES = (1, 2, 3)         # return_interm_indices
BERT_HEADS = 12                 # bert-base-uncased, when the BERT folder has no config.json
# grounding_model.py prompt2mask2 + groundingdino.datasets.transforms: RandomResize([800], max_size=1333)
MIN_SIZE, MAX_SIZE = 800, 1333
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
BOX_THRESHOLD, TEXT_THRESHOLD = 0.25, 0.2        # prompt2mask2 defaults
INVERSE_SIGMOID_EPS = 1e-3                        # util/misc.py inverse_sigmoid
SPECIAL_TOKENS = ("[CLS]", "[SEP]", ".", "?")     # groundingdino.py specical_tokens

# (original, HF) name templates; {i} is a layer index. Used in both directions.
_NAMES = (
    ("bert.", "model.text_backbone."),
    ("feat_map.", "model.text_projection."),
    ("input_proj.", "model.input_proj_vision."),
    ("transformer.level_embed", "model.level_embed"),
    ("transformer.tgt_embed.", "model.query_position_embeddings."),
    ("transformer.enc_output_norm.", "model.enc_output_norm."),
    ("transformer.enc_output.", "model.enc_output."),
    ("transformer.enc_out_bbox_embed.", "model.encoder_output_bbox_embed."),
    ("transformer.decoder.ref_point_head.", "model.decoder.reference_points_head."),
    ("transformer.decoder.bbox_embed.", "model.decoder.bbox_embed."),
    ("transformer.decoder.norm.", "model.decoder.layer_norm."),
    ("bbox_embed.", "bbox_embed."),
    ("transformer.encoder.layers.{i}.self_attn.", "model.encoder.layers.{i}.deformable_layer.self_attn."),
    ("transformer.encoder.layers.{i}.norm1.", "model.encoder.layers.{i}.deformable_layer.self_attn_layer_norm."),
    ("transformer.encoder.layers.{i}.linear1.", "model.encoder.layers.{i}.deformable_layer.fc1."),
    ("transformer.encoder.layers.{i}.linear2.", "model.encoder.layers.{i}.deformable_layer.fc2."),
    ("transformer.encoder.layers.{i}.norm2.", "model.encoder.layers.{i}.deformable_layer.final_layer_norm."),
    ("transformer.encoder.text_layers.{i}.self_attn.", "model.encoder.layers.{i}.text_enhancer_layer.self_attn."),
    ("transformer.encoder.text_layers.{i}.linear1.", "model.encoder.layers.{i}.text_enhancer_layer.fc1."),
    ("transformer.encoder.text_layers.{i}.linear2.", "model.encoder.layers.{i}.text_enhancer_layer.fc2."),
    ("transformer.encoder.text_layers.{i}.norm1.", "model.encoder.layers.{i}.text_enhancer_layer.layer_norm_before."),
    ("transformer.encoder.text_layers.{i}.norm2.", "model.encoder.layers.{i}.text_enhancer_layer.layer_norm_after."),
    ("transformer.encoder.fusion_layers.{i}.gamma_v", "model.encoder.layers.{i}.fusion_layer.vision_param"),
    ("transformer.encoder.fusion_layers.{i}.gamma_l", "model.encoder.layers.{i}.fusion_layer.text_param"),
    ("transformer.encoder.fusion_layers.{i}.layer_norm_v.", "model.encoder.layers.{i}.fusion_layer.layer_norm_vision."),
    ("transformer.encoder.fusion_layers.{i}.layer_norm_l.", "model.encoder.layers.{i}.fusion_layer.layer_norm_text."),
    ("transformer.encoder.fusion_layers.{i}.attn.v_proj.", "model.encoder.layers.{i}.fusion_layer.attn.vision_proj."),
    ("transformer.encoder.fusion_layers.{i}.attn.l_proj.", "model.encoder.layers.{i}.fusion_layer.attn.text_proj."),
    ("transformer.encoder.fusion_layers.{i}.attn.values_v_proj.",
     "model.encoder.layers.{i}.fusion_layer.attn.values_vision_proj."),
    ("transformer.encoder.fusion_layers.{i}.attn.values_l_proj.",
     "model.encoder.layers.{i}.fusion_layer.attn.values_text_proj."),
    ("transformer.encoder.fusion_layers.{i}.attn.out_v_proj.",
     "model.encoder.layers.{i}.fusion_layer.attn.out_vision_proj."),
    ("transformer.encoder.fusion_layers.{i}.attn.out_l_proj.",
     "model.encoder.layers.{i}.fusion_layer.attn.out_text_proj."),
    ("transformer.decoder.layers.{i}.cross_attn.", "model.decoder.layers.{i}.encoder_attn."),
    ("transformer.decoder.layers.{i}.norm1.", "model.decoder.layers.{i}.encoder_attn_layer_norm."),
    ("transformer.decoder.layers.{i}.ca_text.", "model.decoder.layers.{i}.encoder_attn_text."),
    ("transformer.decoder.layers.{i}.catext_norm.", "model.decoder.layers.{i}.encoder_attn_text_layer_norm."),
    ("transformer.decoder.layers.{i}.self_attn.", "model.decoder.layers.{i}.self_attn."),
    ("transformer.decoder.layers.{i}.norm2.", "model.decoder.layers.{i}.self_attn_layer_norm."),
    ("transformer.decoder.layers.{i}.linear1.", "model.decoder.layers.{i}.fc1."),
    ("transformer.decoder.layers.{i}.linear2.", "model.decoder.layers.{i}.fc2."),
    ("transformer.decoder.layers.{i}.norm3.", "model.decoder.layers.{i}.final_layer_norm."),
)
# Tensors of the release the detector never reads.
_UNUSED = re.compile(r"^bert\.(pooler\..*|embeddings\.position_ids)$")
_IN_PROJ = re.compile(r"(.*)\.in_proj_(weight|bias)$")
# HF's split projections of what the original holds as nn.MultiheadAttention (fused in_proj)
_QKV = re.compile(r"^(model\.encoder\.layers\.\d+\.text_enhancer_layer\.self_attn"
                  r"|model\.decoder\.layers\.\d+\.(?:self_attn|encoder_attn_text))\.(query|key|value)\.(weight|bias)$")


def _compile(direction: int):
    rules = []
    for pair in _NAMES:
        src, dst = pair[direction], pair[1 - direction]
        pattern = "^" + re.escape(src).replace(r"\{i\}", r"(\d+)")
        rules.append((re.compile(pattern), dst.replace("{i}", r"\1")))
    return rules


_TO_HF, _FROM_HF = _compile(0), _compile(1)


def rename(key: str, rules) -> str | None:
    for pattern, repl in rules:
        if pattern.match(key):
            return pattern.sub(repl, key, count=1)
    return None


def clean_state_dict(state: dict) -> dict:
    """util/utils.py clean_state_dict: drop a leading 'module.'."""
    return {(k[7:] if k[:7] == "module." else k): v for k, v in state.items()}


def load_groundingdino_checkpoint(path: Path) -> dict:
    import torch

    ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise ValueError(f"{path}: not a GroundingDINO checkpoint (no 'model' state dict)")
    state = clean_state_dict(ckpt["model"])
    if "transformer.tgt_embed.weight" not in state:
        raise ValueError(f"{path}: not a GroundingDINO checkpoint (no transformer.tgt_embed.weight)")
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def groundingdino_to_hf(state: dict) -> tuple[dict, dict]:
    """-> (HF GroundingDino state without the backbone, the Swin's own state under backbone.0)."""
    hf, swin, unknown = {}, {}, []
    for k, v in state.items():
        if k.startswith("backbone.0."):
            swin[k[len("backbone.0."):]] = v
        elif _UNUSED.match(k):
            continue
        elif (m := _IN_PROJ.match(k)):
            base = rename(m.group(1) + ".out_proj." + m.group(2), _TO_HF)
            if base is None:
                unknown.append(k)
                continue
            for part, t in zip(("query", "key", "value"), v.chunk(3, dim=0)):   # [3D, ...] -> 3 x [D, ...]
                hf[base.replace(".out_proj.", f".{part}.")] = t
        elif (new := rename(k, _TO_HF)) is not None and not _QKV.match(new):
            hf[new] = v
        else:
            unknown.append(k)
    if unknown:
        raise KeyError(f"GroundingDINO: tensors this exporter does not know: {unknown[:6]}")
    return hf, swin


def hf_to_groundingdino(hf: dict, swin: dict) -> dict:
    """The inverse (fixtures): HF names + Swin -> the release's names (fused in_proj)."""
    import torch

    out = {"backbone.0." + k: v for k, v in swin.items()}
    for k, v in hf.items():
        if (m := _QKV.match(k)):
            if m.group(2) == "query":
                parts = [hf[f"{m.group(1)}.{p}.{m.group(3)}"] for p in ("query", "key", "value")]
                orig = rename(f"{m.group(1)}.out_proj.{m.group(3)}", _FROM_HF)
                out[orig.replace(".out_proj.", ".in_proj_")] = torch.cat(parts)     # 3 x [D, ...] -> [3D, ...]
        else:
            new = rename(k, _FROM_HF)
            if new is None:
                raise KeyError(f"no release name for {k}")
            out[new] = v
    return out


def groundingdino_config(state: dict, bert_heads: int = BERT_HEADS) -> dict:
    """Sizes read off the tensors; heads and the Swin window are the release's config facts."""
    def count(pattern: str) -> int:
        return 1 + max(int(m.group(1)) for k in state if (m := re.match(pattern, k)))

    d_model = int(state["transformer.level_embed"].shape[1])
    levels = int(state["transformer.level_embed"].shape[0])
    swin_layers = count(r"backbone\.0\.layers\.(\d+)\.")
    depths = [count(rf"backbone\.0\.layers\.{i}\.blocks\.(\d+)\.") for i in range(swin_layers)]
    heads = [int(state[f"backbone.0.layers.{i}.blocks.0.attn.relative_position_bias_table"].shape[1])
             for i in range(swin_layers)]
    enc_points = int(state["transformer.encoder.layers.0.self_attn.attention_weights.weight"].shape[0]) \
        // (NHEADS * levels)
    dec_points = int(state["transformer.decoder.layers.0.cross_attn.attention_weights.weight"].shape[0]) \
        // (NHEADS * levels)
    word = state["bert.embeddings.word_embeddings.weight"]
    return {
        "swin": {"embed_dim": int(state["backbone.0.patch_embed.proj.weight"].shape[0]), "depths": depths,
                 "num_heads": heads, "window_size": SWIN_WINDOW, "out_indices": list(OUT_INDICES)},
        "text": {"vocab_size": int(word.shape[0]), "hidden_size": int(word.shape[1]),
                 "num_hidden_layers": count(r"bert\.encoder\.layer\.(\d+)\."), "num_attention_heads": bert_heads,
                 "intermediate_size": int(state["bert.encoder.layer.0.intermediate.dense.weight"].shape[0]),
                 "max_position_embeddings": int(state["bert.embeddings.position_embeddings.weight"].shape[0]),
                 "type_vocab_size": int(state["bert.embeddings.token_type_embeddings.weight"].shape[0])},
        "d_model": d_model, "num_feature_levels": levels,
        "num_queries": int(state["transformer.tgt_embed.weight"].shape[0]),
        "encoder_layers": count(r"transformer\.encoder\.layers\.(\d+)\."),
        "decoder_layers": count(r"transformer\.decoder\.layers\.(\d+)\."),
        "encoder_ffn_dim": int(state["transformer.encoder.layers.0.linear1.weight"].shape[0]),
        "decoder_ffn_dim": int(state["transformer.decoder.layers.0.linear1.weight"].shape[0]),
        "encoder_n_points": enc_points, "decoder_n_points": dec_points,
    }


def hf_config(cfg: dict):
    """HF GroundingDinoConfig for the transformer; its own Swin backbone is a 1-block stand-in
    with the real channel widths (input_proj reads them), replaced by SwinDetection here."""
    from transformers import BertConfig, GroundingDinoConfig, SwinConfig

    sw = cfg["swin"]
    backbone = SwinConfig(embed_dim=sw["embed_dim"], depths=[1] * len(sw["depths"]), num_heads=sw["num_heads"],
                          window_size=sw["window_size"], out_indices=[i + 1 for i in OUT_INDICES],
                          out_features=[f"stage{i + 1}" for i in OUT_INDICES])
    text = BertConfig(**cfg["text"])
    conf = GroundingDinoConfig(
        backbone_config=backbone, text_config=text, d_model=cfg["d_model"], num_queries=cfg["num_queries"],
        encoder_layers=cfg["encoder_layers"], decoder_layers=cfg["decoder_layers"],
        encoder_ffn_dim=cfg["encoder_ffn_dim"], decoder_ffn_dim=cfg["decoder_ffn_dim"],
        encoder_attention_heads=NHEADS, decoder_attention_heads=NHEADS,
        num_feature_levels=cfg["num_feature_levels"], encoder_n_points=cfg["encoder_n_points"],
        decoder_n_points=cfg["decoder_n_points"], max_text_len=MAX_TEXT_LEN,
        positional_embedding_temperature=PE_TEMPERATURE, two_stage=True, embedding_init_target=True,
        decoder_bbox_embed_share=True, two_stage_bbox_embed_share=False, disable_custom_kernels=True)
    conf._attn_implementation = "eager"
    return conf


def build_groundingdino(path: Path, bert_dir: Path | None = None):
    """The release as a traceable torch module (see module doc) and its sizes."""
    from transformers import GroundingDinoForObjectDetection

    from .groundingdino_modules import GroundingDinoTraceable, SwinDetection

    heads = BERT_HEADS
    if bert_dir is not None and (bert_dir / "config.json").is_file():
        heads = int(json.loads((bert_dir / "config.json").read_text()).get("num_attention_heads", BERT_HEADS))
    state = load_groundingdino_checkpoint(path)
    cfg = groundingdino_config(state, heads)
    hf_state, swin_state = groundingdino_to_hf(state)
    hf = GroundingDinoForObjectDetection(hf_config(cfg))
    missing, unexpected = hf.load_state_dict(hf_state, strict=False)
    missing = [k for k in missing if not k.startswith("model.backbone.")]
    if missing or unexpected:
        raise KeyError(f"GroundingDINO weights do not match: missing {missing[:4]}, unexpected {unexpected[:4]}")
    sw = cfg["swin"]
    swin = SwinDetection(sw["embed_dim"], sw["depths"], sw["num_heads"], sw["window_size"], OUT_INDICES)
    swin.load_state_dict(swin_state, strict=True)
    return GroundingDinoTraceable(hf, swin).eval(), cfg


TEXT_INPUTS = ("input_ids", "token_type_ids", "attention_mask", "text_self_attention_masks", "position_ids")


def stage_spec(cfg: dict, special_ids: list[int]) -> OnnxStageSpec:
    """Traced at 800 x 1066 with 9 caption tokens; checked at 800 x 1201 (odd sizes at every
    Swin stage) with 17 tokens: the graph must not have kept the traced shapes. Random caption
    words are drawn past the special ids (BERT's vocabulary), or from 0 in a tiny vocabulary."""
    q = cfg["num_queries"]
    vocab = cfg["text"]["vocab_size"]
    first_word = max(special_ids) + 1 if max(special_ids) + 1 < vocab else 0
    facts = {"special_ids": list(special_ids), "first_word": first_word, "vocab": vocab}
    return OnnxStageSpec(
        "groundingdino", "groundingdino.onnx",
        (TensorSpec("pixel_values", (1, 3, "height", "width")),
         TensorSpec("input_ids", (1, "text"), "int64", high=vocab),
         TensorSpec("token_type_ids", (1, "text"), "int64", high=1),
         TensorSpec("attention_mask", (1, "text"), "int64", high=1),
         TensorSpec("text_self_attention_masks", (1, "text", "text"), "bool"),
         TensorSpec("position_ids", (1, "text"), "int64", high=1)),
        (TensorSpec("probs", (1, q, MAX_TEXT_LEN)), TensorSpec("boxes", (1, q, 4)),
         TensorSpec("query_index", (1, q), "int64")),
        trace_batch=1, check_batch=1, sizes={"height": 800, "width": 1066, "text": 9, **facts},
        check_sizes={"height": 800, "width": 1201, "text": 17}, make=_check_inputs, compare=check_stage)


# onnxruntime's fused kernels sum in other orders than PyTorch: at 800 x 1201 with random
# weights PyTorch fp32 itself is 9.5e-4 off float64 on probs (12 text, 6 fusion and 6 decoder
# layers) and onnxruntime 2.1e-3, 2.2x; an export defect is orders of magnitude above that
FLOAT32_ERROR_FACTOR = 4.0


def check_stage(module, spec: OnnxStageSpec, path: Path, inputs: list, ref: list, log=print) -> tuple:
    """onnxruntime vs PyTorch for a graph with a top-k inside, -> (max abs diff, facts).

    Seeds: the decoder's 900 queries are seeded by the top-900 of ~20k encoder-cell scores, and
    query i's content is learned embedding i, so two cells whose scores differ by float rounding
    (3 of the top-900 gaps are under 1e-5 at 800 x 1201 with random weights) may swap slots,
    which changes every output. onnxruntime's seeds must then be a top-k of PyTorch's own scores
    (each within atol of PyTorch's k-th best, relative to its size), and PyTorch decodes from them.
    Tolerance: within atol as any stage; past it (deep stacks of large random activations), the
    outputs are also computed in float64 from the same seeds, and onnxruntime's error against
    them must stay within FLOAT32_ERROR_FACTOR x PyTorch fp32's own."""
    import numpy as np
    import onnxruntime as ort

    from .onnx_stages import max_abs_diff

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {t.name: a for t, a in zip(spec.inputs, inputs)})
    seeds, facts = got[2], {}
    moved = int(np.sum(seeds != ref[2]))
    if moved:
        scores = module.last_scores[0].numpy().astype(np.float64)             # PyTorch's [N] scores
        best = np.sort(scores)[::-1][:seeds.shape[1]]
        gap = float(np.max(np.abs(scores[seeds[0]] - best) / np.maximum(1.0, np.abs(best))))
        if gap > spec.atol:
            raise RuntimeError(f"{spec.file}: onnxruntime's top-{len(best)} seeds are not PyTorch's top-"
                               f"{len(best)} (relative score gap {gap:.3g} > {spec.atol:g})")
        ref = _decode_from(module, inputs, seeds)
        facts["reseeded_queries"] = moved
        log(f"  {spec.file}: {moved} of {len(best)} queries seeded in another order by near-tied encoder "
            f"scores (relative gap <= {gap:.2g}); PyTorch decodes from onnxruntime's seeds")
    diff = max_abs_diff(spec, ref[:2], got[:2])
    if diff <= spec.atol:
        return diff, facts
    exact = _decode_from(module, inputs, seeds, float64=True)
    own, ours = max_abs_diff(spec, exact, ref[:2]), max_abs_diff(spec, exact, got[:2])
    facts["float64"] = {"pytorch_fp32": own, "onnxruntime": ours}
    log(f"  {spec.file}: max abs diff {diff:.2e} > {spec.atol:g}; against float64: PyTorch fp32 {own:.2e}, "
        f"onnxruntime {ours:.2e} ({ours / max(own, 1e-30):.2f}x, bound {FLOAT32_ERROR_FACTOR:g}x)")
    if not np.isfinite(ours) or ours > max(spec.atol, FLOAT32_ERROR_FACTOR * own):
        raise RuntimeError(f"{spec.file}: ONNX vs PyTorch max abs diff {diff:.3g} > {spec.atol:g}, and "
                           f"{ours:.3g} against float64, over {FLOAT32_ERROR_FACTOR:g}x PyTorch fp32's {own:.3g}")
    return diff, facts


def _decode_from(module, inputs: list, seeds, float64: bool = False) -> list:
    """PyTorch's (probs, boxes) decoded from the given seed cells (the module is left as it was)."""
    import torch

    x = [torch.from_numpy(a) for a in inputs]
    if float64:
        module.double()
        x[0] = x[0].double()                                                   # the picture; ids stay int
    module.seed_cells = torch.from_numpy(seeds)
    try:
        with torch.no_grad():
            out = module(*x)
    finally:
        module.seed_cells = None
        module.float()
    return [t.numpy() for t in out[:2]]


def manifest_record(tokenizer_file: str, special_ids: list[int]) -> dict:
    return {"op": "groundingdino", "file": "groundingdino.onnx", "tokenizer": tokenizer_file,
            "min_size": MIN_SIZE, "max_size": MAX_SIZE, "mean": list(MEAN), "std": list(STD),
            "box_threshold": BOX_THRESHOLD, "text_threshold": TEXT_THRESHOLD, "max_text_len": MAX_TEXT_LEN,
            "special_ids": special_ids}


def _check_inputs(spec: OnnxStageSpec, batch: int, seed: int, sizes: dict) -> list:
    """Valid random inputs: a picture, and a caption of `text` ids with phrase-closing '.'s
    between [CLS] and [SEP] and the masks the runtime computes for it."""
    import numpy as np

    from scops.runtime.detector import text_inputs

    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((1, 3, sizes["height"], sizes["width"]), dtype=np.float32)
    n = sizes["text"]
    cls_, sep, dot = sizes["special_ids"][0], sizes["special_ids"][1], sizes["special_ids"][2]
    body = rng.integers(sizes["first_word"], sizes["vocab"], size=n - 2).tolist()
    for i in range(2, n - 2, 3):
        body[i] = dot
    feeds = text_inputs([cls_, *body, sep], sizes["special_ids"], MAX_TEXT_LEN)
    return [pixels] + [feeds[name] for name in TEXT_INPUTS]
