"""The bundle contract: the one definition of manifest.json that export/ writes and runtime/ reads.

A JSON Schema (checked with the `jsonschema` library) fixes the keys, their types and
sane bounds; `check_manifest` runs it when an export commits a bundle and when the
runtime opens one, and names the key at fault. Stage ops and their fields are declared
here; runtime/encode.py serves exactly these ops.
"""
from __future__ import annotations

import re

from .errors import BundleError

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
# A manifest is a few KB; anything larger is not one (and is not read into memory).
MAX_MANIFEST_BYTES = 16 << 20

# Bounds that no model of this family comes near, so a crafted manifest cannot ask the
# runtime for absurd allocations: rows of one medium (LEGO's image: 576; 4096 leaves room),
# a width (LLaMA-65B: 8192; ViT-g: 1408), a vocabulary (2^20 ids), a context (2^20 positions),
# a file (1 TiB).
MAX_ROWS = 4096
MAX_WIDTH = 65536
MAX_VOCAB = 1 << 20
MAX_CTX = 1 << 20
MAX_FILE_BYTES = 1 << 40
# Bundle file names: one plain component (no '/', no leading '.', no '..'), as the exporter writes them.
FILE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"

_INT = {"type": "integer"}
_WIDTH = {"type": "integer", "minimum": 1, "maximum": MAX_WIDTH}
_NAME = {"type": "string", "pattern": FILE_NAME}
_KEY = {"type": "string", "minLength": 1, "maxLength": 128}

# Precisions an onnx stage's graph may come in (export/encoder_precision.py writes them).
ENCODER_PRECISIONS = ("fp32", "fp16", "int8")

# op -> (required fields, optional fields) besides "op"; each is a JSON Schema.
STAGE_OPS: dict[str, tuple[dict, dict]] = {
    # an onnxruntime graph: {graph input: context key}, its first output stored under `output`
    "onnx": ({"file": _NAME, "output": _KEY},
             {"inputs": {"type": "object", "additionalProperties": _KEY, "maxProperties": 16},
              # run at most this many rows of the first axis per call (LEGO: 16 video frames of EVA-g)
              "max_batch": {"type": "integer", "minimum": 1, "maximum": MAX_ROWS},
              # the same graph at other precisions, e.g. {"int8": "vision.int8.onnx"}: the
              # low-memory profile runs int8 where there is one (export --encoder-precision fp32,int8)
              "variants": {"type": "object", "propertyNames": {"enum": list(ENCODER_PRECISIONS)},
                           "additionalProperties": _NAME}}),
    # x / max(||x||, eps) * scale over the last axis
    "l2norm": ({"input": _KEY, "output": _KEY}, {"scale": {"type": "number"}}),
    # [clips, ...] -> [1, ...]: the mean over the first axis
    "mean_over_clips": ({"input": _KEY, "output": _KEY}, {}),
    # one index along one axis (the axis is dropped)
    "select": ({"input": _KEY, "output": _KEY},
               {"index": {"type": "integer", "minimum": 0, "maximum": MAX_ROWS},
                "axis": {"type": "integer", "minimum": 0, "maximum": 4}}),
    # [B, N, D] -> drop `skip` leading tokens -> concatenate each `group` adjacent tokens
    # -> [B, (N - skip) / group, D * group] (MiniGPT-4 LLaMA-2: 1 CLS + 256 -> 64 x 5632)
    "group_tokens": ({"input": _KEY, "output": _KEY, "skip": {"type": "integer", "minimum": 0, "maximum": 64},
                      "group": {"type": "integer", "minimum": 1, "maximum": 64}}, {}),
    # the fused projector (kernels/): [rows, in_dim] -> [rows, out_dim]
    "projector": ({"file": _NAME, "in_dim": _WIDTH, "out_dim": _WIDTH},
                  {"hidden_dim": {"type": "integer", "minimum": 0, "maximum": MAX_WIDTH},
                   "layernorm": {"type": "boolean"}, "ln_eps": {"type": "number", "exclusiveMinimum": 0},
                   "gelu": {"enum": ["none", "erf", "tanh"]}, "bias": {"type": "boolean"},
                   "l2norm": {"type": "boolean"}, "scale": {"type": "number"}}),
}


# Stages beside the chat, under the manifest's "grounding" key: BuboGPT's tagger -> detector ->
# segmenter (each its own graphs and tables) and the matcher (runtime/grounding_pipeline.py).
# A family that grounds through its answer's own text (LEGO) writes a string there instead.
_RGB = {"type": "array", "items": {"type": "number"}, "minItems": 3, "maxItems": 3}
_SIDE = {"type": "integer", "minimum": 16, "maximum": 8192}
_PROB = {"type": "number", "minimum": 0, "maximum": 1}
GROUNDING_OPS: dict[str, tuple[dict, dict]] = {
    # RAM: picture -> tag probabilities; `tags` names {"tags": [...], "thresholds": [...]}
    "ram": ({"file": _NAME, "size": _SIDE, "mean": _RGB, "std": _RGB, "tags": _NAME},
            {"interpolation": {"enum": ["bilinear"]}}),
    # GroundingDINO: picture + caption -> token probabilities and boxes
    "groundingdino": ({"file": _NAME, "tokenizer": _NAME, "min_size": _SIDE, "max_size": _SIDE, "mean": _RGB,
                       "std": _RGB, "box_threshold": _PROB, "text_threshold": _PROB,
                       "max_text_len": {"type": "integer", "minimum": 2, "maximum": 4096},
                       "special_ids": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                   "maximum": MAX_VOCAB}, "maxItems": 8}}, {}),
    # SAM: picture -> embeddings (encoder); embeddings + boxes -> low-res mask logits (decoder)
    "sam": ({"encoder": _NAME, "decoder": _NAME, "size": _SIDE, "mean": _RGB, "std": _RGB,
             "mask_threshold": {"type": "number"}, "hole_area": {"type": "integer", "minimum": 0, "maximum": 1 << 20}},
            {"variant": {"type": "string", "maxLength": 32}}),
    # phrases of the answer -> detector labels: the bundle's LLM with BuboGPT's few-shot prompt
    "match": ({"prompt": {"enum": ["bubogpt-match"]}, "max_tokens": {"type": "integer", "minimum": 1,
                                                                       "maximum": 4096}}, {}),
}
GROUNDING_FILE_FIELDS = ("file", "tags", "tokenizer", "encoder", "decoder")


def _stage_schema(op: str, required: dict, optional: dict) -> dict:
    return {"type": "object", "required": ["op", *required],
            "properties": {"op": {"const": op}, **required, **optional}, "additionalProperties": False}


STAGE = {"oneOf": [_stage_schema(op, req, opt) for op, (req, opt) in STAGE_OPS.items()]}
GROUNDING = {"oneOf": [
    {"enum": ["answer_text"]},
    {"type": "object", "required": ["stages"], "additionalProperties": False,
     "properties": {"stages": {"type": "array", "minItems": 3, "maxItems": 3, "items": False, "prefixItems": [
         _stage_schema(op, *GROUNDING_OPS[op]) for op in ("ram", "groundingdino", "sam")]},
         "matcher": _stage_schema("match", *GROUNDING_OPS["match"])}},
]}

TEMPLATE = {
    "type": "object",
    "required": ["system", "user", "assistant", "answer", "media", "placeholder"],
    "properties": {
        "system": {"type": "string"}, "user": {"type": "string", "pattern": "\\{content\\}"},
        "assistant": {"type": "string"}, "answer": {"type": "string", "pattern": "\\{answer\\}"},
        "media": {"type": "object", "additionalProperties": {"type": "string"}},
        "media_sep": {"type": "string"}, "media_join": {"type": "string"},
        "placeholder": {"type": "string", "minLength": 1}, "bos": {"enum": [True, False, "first"]},
        "stop": {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 16},
        "special": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0,
                                                               "maximum": MAX_VOCAB}},
        "history_drop": {"type": "integer", "minimum": 0, "maximum": 16},
        "media_order": {"type": "array", "items": {"type": "string"}, "maxItems": 16},
        "ground_prompt": {"type": "string"},
        "special_strip": {"type": "boolean"},
        "min_new_tokens": {"type": "integer", "minimum": 0, "maximum": 16},
        "system_media": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}

# Audio recipes the runtime computes (runtime/audio.py RECIPES): a bundle names one.
AUDIO_RECIPES = ("imagebind", "bubogpt")
# Video recipes (runtime/modalities.py): none = ImageBind's clips, "lego", "emu".
VIDEO_RECIPES = ("lego", "emu")
PREPROCESS = {"type": "object", "required": ["kind"],
              "allOf": [{"if": {"properties": {"kind": {"const": "audio"}}},
                         "then": {"properties": {"recipe": {"enum": list(AUDIO_RECIPES)}}}},
                        {"if": {"properties": {"kind": {"const": "video"}}},
                         "then": {"properties": {"recipe": {"enum": list(VIDEO_RECIPES)}}}}]}

MODALITY = {
    "type": "object",
    "required": ["preprocess", "rows", "stages"],
    "properties": {
        "preprocess": PREPROCESS,
        "rows": {"type": "integer", "minimum": 1, "maximum": MAX_ROWS},
        # every item of the prepared batch (a video frame) is its own media slot of `rows` rows
        # (Emu: one [IMG] 32 rows [/IMG] per frame); default: the batch makes one slot
        "per_frame": {"type": "boolean"},
        "stages": {"type": "array", "minItems": 1, "maxItems": 32, "items": STAGE},
        "instruction": {"type": "object", "required": ["tokenizer", "max_len"],
                        "properties": {"tokenizer": _NAME, "max_len": {"type": "integer", "minimum": 1,
                                                                        "maximum": 4096}}},
    },
}

FILE_ENTRY = {
    "type": "object",
    "required": ["kind", "bytes", "sha256"],
    "properties": {"kind": {"enum": ["onnx", "onnx-data", "safetensors", "gguf", "tokenizer", "data"]},
                   "bytes": {"type": "integer", "minimum": 1, "maximum": MAX_FILE_BYTES},
                   "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"}},
}

# Emu's image generation: regression head (a projector without bias), the UNet and VAE decoder
# graphs, the PNDM scheduler config (runtime/pndm.py reads it), the latent geometry and defaults.
GENERATION = {
    "type": "object",
    "required": ["regress_head", "n_embeds", "boi", "special", "unet", "vae_decoder", "scheduler",
                 "latent_channels", "vae_scale_factor", "scaling_factor", "size_multiple", "defaults"],
    "properties": {
        "regress_head": _stage_schema("projector", *STAGE_OPS["projector"]),
        "n_embeds": {"type": "integer", "minimum": 1, "maximum": MAX_ROWS},
        "boi": {"type": "string", "minLength": 1},
        "special": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0, "maximum": MAX_VOCAB}},
        "unet": {"type": "object", "required": ["file"], "properties": {"file": _NAME}},
        "vae_decoder": {"type": "object", "required": ["file"], "properties": {"file": _NAME}},
        "scheduler": {"type": "object"},
        "latent_channels": {"type": "integer", "minimum": 1, "maximum": 64},
        "vae_scale_factor": {"type": "integer", "minimum": 1, "maximum": 64},
        "scaling_factor": {"type": "number", "exclusiveMinimum": 0},
        "size_multiple": {"type": "integer", "minimum": 1, "maximum": 1024},
        "defaults": {"type": "object", "properties": {
            "steps": {"type": "integer", "minimum": 1, "maximum": 1000}, "guidance": {"type": "number"},
            "height": {"type": "integer", "minimum": 1, "maximum": 8192},
            "width": {"type": "integer", "minimum": 1, "maximum": 8192}}},
    },
}

SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["schema", "family", "llm", "template", "modalities", "files"],
    "properties": {
        "schema": {"const": SCHEMA_VERSION},
        "family": {"type": "string", "pattern": "^[a-z0-9_-]{1,32}$"},
        "source": {"type": "string"},
        "llm": {"type": "object", "required": ["file", "quant", "n_embd", "n_vocab"],
                "properties": {"file": _NAME, "quant": {"type": "string"}, "n_embd": _WIDTH,
                               "n_vocab": {"type": "integer", "minimum": 1, "maximum": MAX_VOCAB},
                               "n_ctx_train": {"type": "integer", "minimum": 1, "maximum": MAX_CTX}}},
        "template": TEMPLATE,
        "modalities": {"type": "object", "minProperties": 1, "maxProperties": 16,
                       "propertyNames": {"pattern": "^[a-z0-9_]{1,32}$"}, "additionalProperties": MODALITY},
        "files": {"type": "object", "minProperties": 1, "maxProperties": 256,
                  "propertyNames": {"pattern": FILE_NAME}, "additionalProperties": FILE_ENTRY},
        "combine": {"type": "object", "properties": {"op": {"const": "sum"}}},
        # answers that carry their own grounding (LEGO: "answer_text", boxes / spans in the text ->
        # Reply.grounding), or stages beside the chat (BuboGPT: tagger -> detector -> segmenter)
        "grounding": GROUNDING,
        "generation": GENERATION,
    },
}


def _where(path) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".") or "(top level)"


def check_manifest(m, where: str = MANIFEST) -> None:
    """Raise BundleError naming the first key that breaks the contract."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    if isinstance(m, dict) and "schema" in m and m["schema"] != SCHEMA_VERSION:
        raise BundleError(f"{where}: schema {m['schema']!r} not supported (this scops reads {SCHEMA_VERSION})")
    err = best_match(Draft202012Validator(SCHEMA).iter_errors(m))
    if err is not None:
        message = err.message
        if err.validator == "pattern" and err.validator_value == FILE_NAME:
            message = f"{err.instance!r} is not a plain file name of the bundle (no path, no leading dot)"
        raise BundleError(f"{where}: {_where(err.absolute_path)}: {_short(message)}")
    files = m["files"]
    referenced = {m["llm"]["file"]}
    for name, spec in m["modalities"].items():
        for st in spec["stages"]:
            if "file" in st:
                referenced.add(st["file"])
            referenced.update(st.get("variants", {}).values())
        if "instruction" in spec:
            referenced.add(spec["instruction"]["tokenizer"])
    gen = m.get("generation")
    if gen:
        referenced |= {gen["regress_head"]["file"], gen["unet"]["file"], gen["vae_decoder"]["file"]}
    if isinstance(m.get("grounding"), dict):
        for st in m["grounding"]["stages"]:
            referenced |= {st[f] for f in GROUNDING_FILE_FIELDS if f in st}
    for name in sorted(referenced - set(files)):
        raise BundleError(f"{where}: {name} is used but not listed in 'files'")
    for mod, spec in m["modalities"].items():
        projectors = [s for s in spec["stages"] if s["op"] == "projector"]
        if len(projectors) != 1 or spec["stages"][-1]["op"] != "projector":
            raise BundleError(f"{where}: modalities.{mod}: needs exactly one projector stage, and last")
        if spec["stages"][0]["op"] != "onnx":
            raise BundleError(f"{where}: modalities.{mod}: must start with an onnx stage")
        if projectors[0]["out_dim"] != m["llm"]["n_embd"]:
            raise BundleError(f"{where}: modalities.{mod}: projector out_dim {projectors[0]['out_dim']} != "
                              f"llm.n_embd {m['llm']['n_embd']}")


def _short(message: str, limit: int = 200) -> str:
    message = re.sub(r"\s+", " ", message)
    return message if len(message) <= limit else message[:limit] + "…"
