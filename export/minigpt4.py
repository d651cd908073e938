"""MiniGPT-4 exporter: the published release (or an HF BLIP-2 folder) -> bundle.

`--from FOLDER` holding the files as MiniGPT-4's authors publish them:
  eva_vit_g.pth                      EVA ViT-g (LAVIS), 39 of its 40 blocks used
  blip2_pretrained_flant5xxl.pth     Q-Former, query tokens, ln_vision (Vicuna variants)
  prerained_minigpt4_7b.pth          stage-2 checkpoint {'model': {llama_proj.*}} (sic: the
   | pretrained_minigpt4.pth          7B file's published name), 13B, or LLaMA-2
   | pretrained_minigpt4_llama2_7b.pth
  <LLaMA folder>/                    Vicuna v0 7B/13B or Llama-2-7b-chat (HF; --llm to name it)

Vicuna v0 (models/minigpt4.py, has_qformer=True):
  vision.onnx   pixel_values [B,3,224,224] -> image_embeds [B,257,1408]  (ViT + ln_vision)
  qformer.onnx  image_embeds -> query_output [B,32,768]
  projector     llama_proj 768 -> 4096 (7B) / 5120 (13B): 32 rows
LLaMA-2-chat (has_qformer=False): no Q-Former; ln_vision is a fresh LayerNorm(1408) (weight
1, bias 0: nothing loads it); the 256 patch tokens are grouped 4 by 4:
  vision.onnx   -> image_embeds [B,257,1408]
  group_tokens  drop CLS, concatenate 4 adjacent tokens: [B,256,1408] -> [B,64,5632]
  projector     llama_proj 5632 -> 4096: 64 rows, template `<s>[INST] ... [/INST] `
The variant is read off llama_proj's input width (768: Q-Former; 4 x 1408: LLaMA-2).

Also accepted: an HF `Blip2ForConditionalGeneration` folder with a LLaMA text model (what
the tiny test fixture and the benchmark shapes use).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from scops.runtime.errors import ExportError
from scops.runtime.families import family

from .assemble import FamilyExport, assemble_bundle, load_state
from .blip2 import BLIP2_IMAGE, image_stages, qformer_module, qformer_spec, vision_module, vision_spec
from .releases import (BLIP2_QFORMER_NAMES, LN_VISION_EPS, eva_config, eva_to_hf, find_llm_folder,
                       find_release_file, lavis_qformer_to_hf, llama_config, qformer_config, read_blip2,
                       read_eva_vit_g, read_llama_proj, resolve_source)

FAMILY = "minigpt4"
STAGE2_NAMES = ("prerained_minigpt4_7b.pth", "pretrained_minigpt4.pth", "pretrained_minigpt4_llama2_7b.pth")
GROUP = 4            # models/minigpt4.py encode_img: view(bs, pn / 4, hs * 4)


def projector_record(in_dim: int, n_embd: int) -> dict:
    return {"op": "projector", "file": "projector.safetensors", "in_dim": int(in_dim), "out_dim": int(n_embd),
            "bias": True}


def load_config(config_cls, src: str, model_type: str) -> tuple[Path, object]:
    """An HF folder and its config, which must be `model_type` with a LLaMA text model."""
    src_dir = resolve_source(src, family(FAMILY if model_type == "blip-2" else "instructblip"))
    config = config_cls.from_pretrained(src_dir)
    if config.model_type != model_type:
        raise ExportError(f"{src}: a {config.model_type} checkpoint, not {model_type}")
    if config.text_config.model_type != "llama":
        raise ExportError(f"{src}: text model is {config.text_config.model_type}; scops serves LLaMA/Vicuna")
    return src_dir, config


def _is_hf_blip2(folder: Path) -> bool:
    import json
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type") == "blip-2"
    except (OSError, ValueError):
        return False


def export_minigpt4(src: str, out: Path, quant: str = "Q4_K_M", log: Callable[[str], None] = print,
                    encoder_precision: str = "fp32", llm: str | None = None) -> Path:
    src_dir = resolve_source(src, family(FAMILY))
    if _is_hf_blip2(src_dir):
        return export_hf_blip2(str(src_dir), out, quant, log, encoder_precision)
    return export_release(src_dir, out, quant, log, encoder_precision, llm)


def export_release(src_dir: Path, out: Path, quant: str, log, encoder_precision: str, llm: str | None) -> Path:
    import torch

    from scops.runtime.templates import MINIGPT4, MINIGPT4_LLAMA2

    stage2 = find_release_file(src_dir, STAGE2_NAMES)
    eva_path = find_release_file(src_dir, ("eva_vit_g.pth",))
    llm_dir = find_llm_folder(src_dir, llm)
    text_cfg = llama_config(llm_dir)
    log(f"release: {stage2.name}, {eva_path.name}, LLM {llm_dir.name}")
    proj = read_llama_proj(stage2)
    eva = read_eva_vit_g(eva_path)
    vcfg = eva_config(eva, eva_path)
    width, in_dim = vcfg["hidden_size"], int(proj["weight"].shape[1])
    vspec = vision_spec(vcfg["image_size"], vcfg["patch_size"], width)
    if in_dim == GROUP * width:                                        # LLaMA-2: no Q-Former
        ln = {"weight": torch.ones(width), "bias": torch.zeros(width)}   # a fresh LayerNorm: never loaded
        n_patches = vspec.outputs[0].shape[1] - 1
        rows = n_patches // GROUP                                      # 256 / 4 = 64
        stages = ((lambda: vision_module(vcfg, eva_to_hf(eva, ln, vcfg["num_hidden_layers"]), LN_VISION_EPS),
                   vspec),)
        chain = image_stages(queries=False) + [
            {"op": "group_tokens", "input": "image_embeds", "output": "grouped", "skip": 1, "group": GROUP}]
        template = MINIGPT4_LLAMA2
    else:
        blip2_path = find_release_file(src_dir, BLIP2_QFORMER_NAMES)
        blip2 = read_blip2(blip2_path)
        qcfg = qformer_config(blip2, blip2_path)
        if qcfg["encoder_hidden_size"] != width or qcfg["hidden_size"] != in_dim:
            raise ExportError(f"{blip2_path}: Q-Former reads {qcfg['encoder_hidden_size']}-wide tokens and writes "
                              f"{qcfg['hidden_size']}; the ViT is {width} wide and llama_proj reads {in_dim}")
        ln = {"weight": blip2["ln_vision.weight"], "bias": blip2["ln_vision.bias"]}
        qstate, query = lavis_qformer_to_hf(blip2)
        rows = int(query.shape[1])
        stages = ((lambda: vision_module(vcfg, eva_to_hf(eva, ln, vcfg["num_hidden_layers"]), LN_VISION_EPS), vspec),
                  (lambda: qformer_module(qcfg, qstate, query), qformer_spec(vspec.outputs[0], rows, in_dim)))
        chain = image_stages(queries=True)
        template = MINIGPT4
    if proj["weight"].shape[0] != text_cfg["hidden_size"]:
        raise ExportError(f"{stage2}: llama_proj writes {proj['weight'].shape[0]} wide rows; "
                          f"{llm_dir.name} is {text_cfg['hidden_size']} wide")
    fam = FamilyExport(
        family=FAMILY, stages=stages, projection_prefix="llama_proj.", llm_prefix="", text_config=text_cfg,
        template=template,
        modalities={"image": {"preprocess": BLIP2_IMAGE, "rows": rows,
                              "stages": chain + [projector_record(in_dim, text_cfg["hidden_size"])]}},
        llm_dir=llm_dir, load=lambda prefix: proj,
    )
    return assemble_bundle(fam, src_dir, out, quant, log, encoder_precision)


def export_hf_blip2(src: str, out: Path, quant: str = "Q4_K_M", log: Callable[[str], None] = print,
                    encoder_precision: str = "fp32", llm_writer: Callable | None = None) -> Path:
    """`llm_writer(gguf path, log) -> facts` writes the LLM GGUF in place of converting the
    folder's text model (the benchmarks' random Q4_K_M LLaMA-7B, bench/random_gguf.py)."""
    from transformers import Blip2Config

    from scops.runtime.templates import MINIGPT4

    src_dir, config = load_config(Blip2Config, src, "blip-2")
    text_cfg = config.text_config.to_dict()
    vc, qc = config.vision_config, config.qformer_config
    vspec = vision_spec(vc.image_size, vc.patch_size, vc.hidden_size)
    qspec = qformer_spec(vspec.outputs[0], config.num_query_tokens, qc.hidden_size)
    fam = FamilyExport(
        family=FAMILY,
        stages=((lambda: vision_module(vc, load_state(src_dir, "vision_model.")), vspec),
                (lambda: qformer_module(qc, load_state(src_dir, "qformer."),
                                        load_state(src_dir, "query_tokens")[""]), qspec)),
        projection_prefix="language_projection.", llm_prefix="language_model.", text_config=text_cfg,
        template=MINIGPT4,
        modalities={"image": {"preprocess": BLIP2_IMAGE, "rows": config.num_query_tokens,
                              "stages": image_stages() + [projector_record(qc.hidden_size,
                                                                           text_cfg["hidden_size"])]}},
        llm_writer=llm_writer,
    )
    return assemble_bundle(fam, src_dir, out, quant, log, encoder_precision)
