"""InstructBLIP (Vicuna) exporter: HF `InstructBlipForConditionalGeneration` -> bundle.

The Q-Former also reads the instruction (BERT WordPiece ids beside the 32 queries in
self-attention); only the 32 query rows go on to the projection. So the image stage is
split where the instruction enters:
  vision.onnx    pixel_values [B,3,224,224] -> image_embeds [B,257,Dv]     (cached per image)
  qformer.onnx   image_embeds, input_ids [B,T], attention_mask [B,T] -> query_output [B,32,Dq]
The LLM sequence is [32 image rows][BOS][prompt], as HF/LAVIS lay it out.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from .assemble import FamilyExport, assemble_bundle, load_state
from .blip2 import BLIP2_IMAGE, qformer_module, vision_module, vision_spec
from .minigpt4 import load_config, projector_record
from .onnx_stages import OnnxStageSpec, TensorSpec

FAMILY = "instructblip"
# LAVIS blip2_vicuna_instruct: Q-Former text max_txt_len 128, tokenizer truncation_side "left".
INSTRUCTION_MAX_LEN = 128
QFORMER_TOKENIZER = "qformer_tokenizer.json"
def find_qformer_tokenizer(src: Path) -> Path:
    """HF folders keep the BERT tokenizer of the Q-Former in qformer_tokenizer/."""
    for cand in (src / "qformer_tokenizer" / "tokenizer.json", src / "qformer_tokenizer.json"):
        if cand.exists():
            return cand
    raise FileNotFoundError(f"{src}: no qformer_tokenizer/tokenizer.json (BERT WordPiece of the Q-Former)")


def export_instructblip(src: str, out: Path, quant: str = "Q4_K_M",
                        log: Callable[[str], None] = print, encoder_precision: str = "fp32") -> Path:
    if encoder_precision != "fp32":
        raise ValueError("instructblip: --encoder-precision other than fp32 is not supported yet")
    from transformers import InstructBlipConfig, InstructBlipVisionModel

    from scops.runtime.templates import INSTRUCTBLIP

    src_dir, config = load_config(InstructBlipConfig, src, "instructblip")
    tok = find_qformer_tokenizer(src_dir)
    text_cfg = config.text_config.to_dict()
    vc, qc = config.vision_config, config.qformer_config
    vspec = vision_spec(vc.image_size, vc.patch_size, vc.hidden_size)
    qspec = OnnxStageSpec(
        name="qformer", file="qformer.onnx",
        inputs=(TensorSpec("image_embeds", vspec.outputs[0].shape),
                TensorSpec("input_ids", ("batch", "text"), "int64", high=config.qformer_config.vocab_size),
                TensorSpec("attention_mask", ("batch", "text"), "int64", high=2)),
        outputs=(TensorSpec("query_output", ("batch", config.num_query_tokens, config.qformer_config.hidden_size)),),
        sizes={"text": 9})
    special = json.loads(tok.read_text())["model"]["vocab"]
    fam = FamilyExport(
        family=FAMILY,
        stages=((lambda: vision_module(vc, load_state(src_dir, "vision_model."), vision_cls=InstructBlipVisionModel),
                  vspec),
                (lambda: qformer_module(qc, load_state(src_dir, "qformer."), load_state(src_dir, "query_tokens")[""],
                                        with_text=True), qspec)),
        projection_prefix="language_projection.", llm_prefix="language_model.", text_config=text_cfg,
        template=INSTRUCTBLIP,
        extra_files=((QFORMER_TOKENIZER, lambda path: shutil.copyfile(tok, path)),),
        modalities={"image": {
            "preprocess": BLIP2_IMAGE,
            "rows": config.num_query_tokens,
            "instruction": {"tokenizer": QFORMER_TOKENIZER, "max_len": INSTRUCTION_MAX_LEN, "truncation": "left",
                            "cls_id": special["[CLS]"], "sep_id": special["[SEP]"]},
            "stages": [
                {"op": "onnx", "file": "vision.onnx", "inputs": {"pixel_values": "pixel_values"},
                 "output": "image_embeds"},
                {"op": "onnx", "file": "qformer.onnx",
                 "inputs": {"image_embeds": "image_embeds", "input_ids": "instruction_ids",
                            "attention_mask": "instruction_mask"},
                 "output": "query_output"},
                projector_record(qc.hidden_size, text_cfg["hidden_size"]),
            ],
        }},
    )
    return assemble_bundle(fam, src_dir, out, quant, log)
