"""MiniGPT-4-shaped exporter: HF `Blip2ForConditionalGeneration` (LLaMA text model) -> bundle.

Stages of the image modality (manifest order):
  vision.onnx     pixel_values [B,3,224,224] -> image_embeds [B,257,Dv]  (ViT + ln_vision)
  qformer.onnx    image_embeds [B,257,Dv]    -> query_output [B,32,Dq]   (32 learned queries)
  projector       query_output [B,32,Dq]     -> rows [B,32,n_embd]       (Linear with bias)
The LLM goes to GGUF (streamed tensor by tensor), then to the requested quantization.
Only the parts each step needs are loaded: a 7B checkpoint never sits in RAM whole.
"""
from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

import numpy as np

from .bundle import BundleBuilder
from .llm_gguf import list_safetensors, quantize_gguf, write_llama_gguf
from .onnx_stages import OnnxStageSpec, TensorSpec, export_and_validate

FAMILY = "minigpt4"
QUANTS = ("Q4_K_M", "Q8_0", "F16", "F32")

# MiniGPT-4's conversation (CONV_VISION, sep "###", roles Human/Assistant): the prompt is
# system + "###Human: <Img><ImageHere></Img> {q}###Assistant:"; the 32 rows replace
# <ImageHere>; BOS only before the first segment; generation stops at "###".
MINIGPT4_TEMPLATE = {
    "system": "Give the following image: <Img>ImageContent</Img>. You will be able to see the "
              "image once I provide it to you. Please answer my questions.",
    "user": "###Human: {content}",
    "assistant": "###Assistant:",
    "answer": " {answer}",
    "media": {"image": "<Img><ImageHere></Img>"},
    "media_sep": " ",                 # "<Img><ImageHere></Img> {question}"
    "placeholder": "<ImageHere>",
    "bos": True,
    "stop": ["###"],
}
# BLIP-2 preprocessing: squash-resize to 224x224 (bicubic), CLIP mean/std.
BLIP2_IMAGE = {
    "kind": "image", "size": 224, "resize": "squash", "interpolation": "bicubic",
    "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
}


def resolve_source(src: str) -> Path:
    """A local folder, or a hub id downloaded with huggingface_hub (when online)."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists() or src.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{src}: not a checkpoint folder")
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(src, allow_patterns=["*.json", "*.safetensors", "tokenizer.model"]))


def load_state(src: Path, prefix: str) -> dict:
    """Tensors whose key starts with `prefix`, prefix stripped (only those are read)."""
    import torch
    from safetensors import safe_open

    state = {}
    with ExitStack() as stack:
        for f in list_safetensors(src):
            h = stack.enter_context(safe_open(str(f), framework="pt"))
            for k in h.keys():
                if k.startswith(prefix):
                    state[k[len(prefix):]] = h.get_tensor(k).to(torch.float32)
    if not state:
        raise KeyError(f"{src}: no tensors under '{prefix}'")
    return state


class VisionStage:
    """ViT + post_layernorm (= ln_vision): pixel_values -> image_embeds."""

    @staticmethod
    def build(config, src: Path):
        import torch
        from transformers import Blip2VisionModel

        class Vision(torch.nn.Module):
            def __init__(self):
                super().__init__()
                config.vision_config._attn_implementation = "eager"
                self.vision_model = Blip2VisionModel(config.vision_config)

            def forward(self, pixel_values):
                return self.vision_model(pixel_values=pixel_values).last_hidden_state

        m = Vision()
        m.vision_model.load_state_dict(load_state(src, "vision_model."))
        return m.eval()


class QFormerStage:
    """32 learned queries cross-attending to image_embeds: -> query_output [B,32,Dq]."""

    @staticmethod
    def build(config, src: Path):
        import torch
        from transformers import Blip2QFormerModel

        class QFormer(torch.nn.Module):
            def __init__(self):
                super().__init__()
                config.qformer_config._attn_implementation = "eager"
                self.qformer = Blip2QFormerModel(config.qformer_config)
                self.query_tokens = torch.nn.Parameter(
                    torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size))

            def forward(self, image_embeds):
                # [1, Q, Dq] -> [B, Q, Dq]
                query = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
                mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long)
                return self.qformer(query_embeds=query, encoder_hidden_states=image_embeds,
                                    encoder_attention_mask=mask).last_hidden_state

        m = QFormer()
        m.qformer.load_state_dict(load_state(src, "qformer."))
        m.query_tokens.data.copy_(load_state(src, "query_tokens")[""])
        return m.eval()


def stage_specs(config) -> tuple[OnnxStageSpec, OnnxStageSpec]:
    vc, qc = config.vision_config, config.qformer_config
    n_tok = (vc.image_size // vc.patch_size) ** 2 + 1            # 256 patches + CLS = 257
    vision = OnnxStageSpec(
        name="vision", file="vision.onnx",
        inputs=(TensorSpec("pixel_values", ("batch", 3, vc.image_size, vc.image_size)),),
        outputs=(TensorSpec("image_embeds", ("batch", n_tok, vc.hidden_size)),))
    qformer = OnnxStageSpec(
        name="qformer", file="qformer.onnx",
        inputs=(TensorSpec("image_embeds", ("batch", n_tok, vc.hidden_size)),),
        outputs=(TensorSpec("query_output", ("batch", config.num_query_tokens, qc.hidden_size)),))
    return vision, qformer


def export_minigpt4(src: str, out: Path, quant: str = "Q4_K_M",
                    log: Callable[[str], None] = print) -> Path:
    from safetensors.numpy import save_file
    from transformers import Blip2Config

    if quant not in QUANTS:
        raise ValueError(f"--quant must be one of {', '.join(QUANTS)}")
    src_dir = resolve_source(src)
    config = Blip2Config.from_pretrained(src_dir)
    if config.text_config.model_type != "llama":
        raise ValueError(f"{src}: text model is {config.text_config.model_type}; scops serves LLaMA/Vicuna")
    tok_model = src_dir / "tokenizer.model"
    if not tok_model.exists():
        raise FileNotFoundError(f"{src}: tokenizer.model (sentencepiece) not found")
    t_start = time.perf_counter()
    n_steps = 5 if quant in ("F32", "F16") else 6
    step = iter(range(1, n_steps + 1))
    validation = {}
    with BundleBuilder(out) as b:
        vision_spec, qformer_spec = stage_specs(config)
        for spec, builder in ((vision_spec, VisionStage), (qformer_spec, QFormerStage)):
            log(f"[{next(step)}/{n_steps}] {spec.name}: export to ONNX (opset {spec.opset})")
            validation[spec.file] = export_and_validate(builder.build(config, src_dir), spec, b.dir, log)
            b.add_file(spec.file, "onnx", **spec.describe())

        log(f"[{next(step)}/{n_steps}] projector: language_projection -> projector.safetensors")
        proj = load_state(src_dir, "language_projection.")
        weights = {"fc1.weight": proj["weight"].numpy(), "fc1.bias": proj["bias"].numpy()}
        save_file(weights, str(b.dir / "projector.safetensors"))
        b.add_file("projector.safetensors", "safetensors",
                   tensors={k: list(v.shape) for k, v in weights.items()})
        n_embd, q_dim = weights["fc1.weight"].shape                      # [out, in]

        text_cfg = config.text_config.to_dict()
        f32_name = "llm.F32.gguf" if quant == "F32" else "llm.F16.gguf" if quant == "F16" else ".llm.src.gguf"
        log(f"[{next(step)}/{n_steps}] LLM: GGUF ({'f16' if quant == 'F16' else 'f32'}) from {src_dir.name}")
        facts = write_llama_gguf(src_dir, tok_model, b.dir / f32_name, dtype="f16" if quant == "F16" else "f32",
                                 prefix="language_model.", config=text_cfg,
                                 progress=_tensor_progress(log), name=f"scops-{FAMILY}")
        llm_file = f32_name
        if quant not in ("F32", "F16"):
            llm_file = f"llm.{quant}.gguf"
            log(f"[{next(step)}/{n_steps}] LLM: quantize to {quant}")
            quantize_gguf(b.dir / f32_name, b.dir / llm_file, quant)
            (b.dir / f32_name).unlink()
        b.add_file(llm_file, "gguf", quant=quant, n_embd=facts["n_embd"], n_vocab=facts["n_vocab"])
        if n_embd != facts["n_embd"]:
            raise ValueError(f"projection width {n_embd} != LLM width {facts['n_embd']}")

        log(f"[{next(step)}/{n_steps}] manifest + atomic rename -> {out}")
        manifest = {
            "family": FAMILY,
            "source": str(src),
            "llm": {"file": llm_file, "quant": quant, "n_embd": facts["n_embd"], "n_vocab": facts["n_vocab"],
                    "n_ctx_train": int(text_cfg.get("max_position_embeddings", 2048))},
            "template": MINIGPT4_TEMPLATE,
            "modalities": {"image": {
                "preprocess": BLIP2_IMAGE,
                "rows": config.num_query_tokens,
                "stages": [
                    {"op": "onnx", "file": "vision.onnx", "input": "pixel_values", "output": "image_embeds"},
                    {"op": "onnx", "file": "qformer.onnx", "input": "image_embeds", "output": "query_output"},
                    {"op": "projector", "file": "projector.safetensors", "in_dim": int(q_dim),
                     "out_dim": int(n_embd), "bias": True},
                ],
            }},
            "validation": validation,
        }
        path = b.commit(manifest)
    log(f"done in {time.perf_counter() - t_start:.1f}s: {path}")
    return path


def _tensor_progress(log):
    last = [0.0]

    def progress(i, n, name):
        now = time.perf_counter()
        if i + 1 == n or now - last[0] > 2.0:
            last[0] = now
            log(f"  tensor {i + 1}/{n} {name}")
    return progress

