"""LEGO / GroundingGPT exporter (lzw-lzw/GroundingGPT, model class LEGOLlamaForCausalLM): the
published release -> bundle. Files: see lego_release.py; modules: lego_modules.py.

Modalities (manifest order of stages):
  image  clip_patches.onnx  [B,3,336,336] -> [B,576,1024]  -> mm_projector  Linear-GELU(erf)-Linear -> 576 rows
  video  video_frames.onnx  [T,3,224,224] -> [T,32,768]
         video_qformer.onnx [T,32,768]    -> [1,64,768]    -> video_projector (llama_proj)       -> 64 rows
  audio  audio_embed.onnx   [3,1,128,204] -> [3,1024]
         audio_qformer.onnx [3,1024]      -> [1,8,768]     -> audio_projector (audio_llama_proj) -> 8 rows

Sequence (lego/serve/gradio_web_server.py, train.py preprocess_multimodal): the user turn is
  <so_start>{8 rows}<so_end>\\n<vi_start>{64 rows}<vi_end>\\n<im_start>{576 rows}<im_end>\\n{question}
(each present block prepended in the order image, video, sound, so sound comes first); the
rows take the places of the <*_patch> tokens, the start/end tokens stay tokens.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from scops.runtime.errors import ExportError

from .assemble import FamilyExport, assemble_bundle
from .lego_release import PREFIX, open_release
from .onnx_stages import OnnxStageSpec, TensorSpec

FAMILY = "lego"
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# The added tokens (LEGOLlamaForCausalLM.initialize_vision_tokenizer / _video_sound_tokenizer)
# in the order they were added: ids 32000-32008 after Vicuna's 32000 pieces.
ADDED_TOKENS = ("<im_patch>", "<im_start>", "<im_end>", "<vi_patch>", "<vi_start>", "<vi_end>",
                "<so_patch>", "<so_start>", "<so_end>")
# train.py / builder.py: expand2square with tuple(int(x * 255) for x in image_mean) =
# (122, 116, 104), then CLIPImageProcessor (shortest edge 336 bicubic, centre crop 336).
LEGO_IMAGE = {"kind": "image", "size": 336, "resize": "pad_square", "pad_color": [122, 116, 104],
              "interpolation": "bicubic", "mean": CLIP_MEAN, "std": CLIP_STD}
# load_video(n_frms=64, 224 x 224, "uniform") + AlproVideoTrainProcessor (RandomResizedCropVideo
# scale 0.5-1, bicubic): scops crops deterministically, the centre `crop_area` of the frame
# (1.0: the whole frame, as Video-LLaMA's eval processor), see runtime/video.py.
LEGO_VIDEO = {"kind": "video", "recipe": "lego", "frames": 64, "size": 224, "crop_area": 1.0,
              "interpolation": "bicubic", "mean": CLIP_MEAN, "std": CLIP_STD}
# ImageBind data.py load_and_transform_audio_data defaults: 3 clips x 2 s, 128 mel x 204.
LEGO_AUDIO = {"kind": "audio", "recipe": "imagebind", "sample_rate": 16000, "clip_seconds": 2, "clips": 3,
              "mel_bins": 128, "target_frames": 204, "mean": -4.268, "std": 9.138}
# Frames per onnxruntime call of the EVA stage: 64 frames of EVA ViT-g at once hold ~1.5 GB
# of activations; 16 keep it near 0.4 GB at the same speed.
VIDEO_FRAMES_PER_RUN = 16


def _state(weights, prefix: str) -> dict:
    return weights.load_prefix(PREFIX + prefix)


def stage_builders(release, weights) -> dict:
    """name -> builder() of the PyTorch module each ONNX stage is exported from. `weights`:
    the release folder's TensorIndex (its tensors are read one at a time, as needed)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from . import lego_modules as lm
    from .checkpoints import TensorIndex, load_pickle, unwrap
    from .releases import read_eva_vit_g

    def clip():
        conf = CLIPVisionConfig.from_pretrained(release.clip)
        conf._attn_implementation = "eager"
        model = CLIPVisionModel(conf)
        state = TensorIndex.open(release.clip).load_prefix("vision_model.")
        missing = set(model.vision_model.state_dict()) - set(state)
        if missing:
            raise ExportError(f"{release.clip}: the CLIP weights lack {sorted(missing)[:4]}")
        model.vision_model.load_state_dict(state, strict=False)     # position_ids: a buffer of older saves
        return lm.ClipPatches(model.eval(), int(release.config.get("mm_vision_select_layer", -2))).eval()

    def eva_and_qformer():
        from_release = release.eva is None
        eva = _state(weights, "visual_encoder.") if from_release else read_eva_vit_g(release.eva)
        vit = lm.build_eva(eva, _state(weights, "ln_vision."), from_release, release.eva or release.folder)
        return lm.VideoFrames(vit, *qformer("Qformer", "query_tokens")).eval()

    def qformer(name: str, query_key: str):
        q = {"Qformer." + k: v for k, v in _state(weights, name + ".").items()}
        return lm.build_qformer({**q, "query_tokens": _state(weights, query_key)[""]}, f"{release.folder} ({name})")

    def temporal(qformer_key: str, query_key: str, pos_key: str):
        def build():
            pos = _state(weights, pos_key + ".")["weight"]
            return lm.TemporalQFormer(*qformer(qformer_key, query_key), pos).eval()
        return build

    def audio():
        def is_audio(name: str) -> bool:                      # modality_<part>.audio.*: a full
            return name.split(".")[1:2] == ["audio"]          # imagebind_huge.pth is 4.8 GB in fp32
        if release.imagebind is None:
            p = PREFIX + "audio_encoder."
            state = {k[len(p):]: torch.from_numpy(weights.load(k)) for k in weights.names()
                     if k.startswith(p) and is_audio(k[len(p):])}
        else:
            raw = unwrap(load_pickle(release.imagebind, "ImageBind-huge"), release.imagebind, "ImageBind-huge")
            state = {k: v.float() for k, v in raw.items() if is_audio(k)}
        with torch.no_grad():
            return lm.build_audio_embed(state)

    return {"clip_patches": clip, "video_frames": eva_and_qformer,
            "video_qformer": temporal("video_Qformer", "video_query_tokens", "video_frame_position_embedding"),
            "audio_embed": audio,
            "audio_qformer": temporal("audio_Qformer", "audio_query_tokens", "audio_position_embedding")}


def stage_specs(release, weights) -> dict[str, OnnxStageSpec]:
    """The graphs as data. The first axis of every input is "batch" (images, frames or clips),
    so export traces at one count and validates at another."""
    import json

    clip = json.loads((release.clip / "config.json").read_text())
    vc = clip.get("vision_config", clip)
    size, patch = int(vc["image_size"]), int(vc["patch_size"])
    d_clip = int(vc["hidden_size"])
    d_q = weights.shape(PREFIX + "query_tokens")[-1]
    n_q = weights.shape(PREFIX + "query_tokens")[1]
    n_video = weights.shape(PREFIX + "video_query_tokens")[1]
    n_audio = weights.shape(PREFIX + "audio_query_tokens")[1]
    d_audio = weights.shape(PREFIX + "audio_position_embedding.weight")[1]
    eva_size = 224                                   # init_vision_encoder(img_size=224)
    frame_q = TensorSpec("frame_queries", ("batch", n_q, d_q))
    audio_e = TensorSpec("audio_embeds", ("batch", d_audio))
    return {
        "clip_patches": OnnxStageSpec(
            "clip_patches", "clip_patches.onnx", (TensorSpec("pixel_values", ("batch", 3, size, size)),),
            (TensorSpec("image_features", ("batch", (size // patch) ** 2, d_clip)),)),
        "video_frames": OnnxStageSpec(
            "video_frames", "video_frames.onnx", (TensorSpec("frames", ("batch", 3, eva_size, eva_size)),),
            (frame_q,)),
        "video_qformer": OnnxStageSpec(
            "video_qformer", "video_qformer.onnx", (frame_q,),
            (TensorSpec("video_queries", (1, n_video, d_q)),), trace_batch=2, check_batch=5),
        "audio_embed": OnnxStageSpec(
            "audio_embed", "audio_embed.onnx", (TensorSpec("fbank", ("batch", 1, 128, 204)),), (audio_e,),
            check_batch=3),
        "audio_qformer": OnnxStageSpec(
            "audio_qformer", "audio_qformer.onnx", (audio_e,), (TensorSpec("audio_queries", (1, n_audio, d_q)),),
            trace_batch=2, check_batch=3),
    }


def modality_records(specs: dict, n_embd: int, cfg: dict) -> dict:
    def onnx(name: str, feeds: dict, **extra) -> dict:
        spec = specs[name]
        return {"op": "onnx", "file": spec.file, "inputs": feeds, "output": spec.outputs[0].name, **extra}

    d_clip = specs["clip_patches"].outputs[0].shape[-1]
    d_q = specs["video_qformer"].outputs[0].shape[-1]
    return {
        "image": {"preprocess": LEGO_IMAGE, "rows": specs["clip_patches"].outputs[0].shape[1], "stages": [
            onnx("clip_patches", {"pixel_values": "pixel_values"}),
            {"op": "projector", "file": "mm_projector.safetensors", "in_dim": d_clip, "hidden_dim": n_embd,
             "out_dim": n_embd, "gelu": "erf", "bias": True}]},
        "video": {"preprocess": dict(LEGO_VIDEO, frames=int(cfg.get("max_frame", 64))),
                  "rows": specs["video_qformer"].outputs[0].shape[1], "stages": [
            onnx("video_frames", {"frames": "frames"}, max_batch=VIDEO_FRAMES_PER_RUN),
            onnx("video_qformer", {"frame_queries": "frame_queries"}),
            {"op": "projector", "file": "video_projector.safetensors", "in_dim": d_q, "out_dim": n_embd,
             "bias": True}]},
        "audio": {"preprocess": LEGO_AUDIO, "rows": specs["audio_qformer"].outputs[0].shape[1], "stages": [
            onnx("audio_embed", {"fbank": "fbank"}),
            onnx("audio_qformer", {"audio_embeds": "audio_embeds"}),
            {"op": "projector", "file": "audio_projector.safetensors", "in_dim": d_q, "out_dim": n_embd,
             "bias": True}]},
    }


# (checkpoint prefix, bundle file, kind): "mlp" reads nn.Sequential(Linear, GELU, Linear) keys 0.* / 2.*
PROJECTORS = ((PREFIX + "mm_vision_projector.", "mm_projector.safetensors", "mlp"),
              (PREFIX + "llama_proj.", "video_projector.safetensors", "linear"),
              (PREFIX + "audio_llama_proj.", "audio_projector.safetensors", "linear"))


def export_lego(src: str, out: Path, quant: str = "Q4_K_M", log: Callable[[str], None] = print,
                encoder_precision: str = "fp32", llm: str | None = None) -> Path:
    """`src`: the GroundingGPT HF folder, or a folder holding it (and the other files)."""
    from scops.runtime.templates import LEGO

    from .checkpoints import TensorIndex

    if encoder_precision != "fp32":
        raise ExportError("lego: --encoder-precision other than fp32 is not supported yet")
    folder = find_release_folder(Path(src).expanduser())
    weights = TensorIndex.open(folder)
    release = open_release(folder, weights.names())
    specs = stage_specs(release, weights)
    builders = stage_builders(release, weights)
    fam = FamilyExport(
        family=FAMILY,
        stages=tuple((builders[name], spec) for name, spec in specs.items()),
        projection_prefix=PROJECTORS[0][0], projectors=PROJECTORS,
        llm_prefix="", text_config=release.llm_config(), template=LEGO,
        modalities=modality_records(specs, int(release.config["hidden_size"]), release.config),
        load=weights.load_prefix, facts={"grounding": "answer_text"},
        llm_dir=Path(llm) if llm else None,
    )
    return assemble_bundle(fam, release.folder, out, quant, log, encoder_precision)


def find_release_folder(src: Path) -> Path:
    """The HF folder itself, or the one sub-folder of `src` whose config.json says "LEGO"."""
    import json

    if (src / "config.json").is_file() or not src.is_dir():
        return src
    found = []
    for cfg in sorted(src.glob("*/config.json")):
        try:
            if json.loads(cfg.read_text()).get("model_type") == "LEGO":
                found.append(cfg.parent)
        except (ValueError, UnicodeDecodeError):
            continue
    if len(found) == 1:
        return found[0]
    raise ExportError(f"{src}: expected the GroundingGPT folder (config.json with model_type \"LEGO\") "
                      f"{'here or in one sub-folder' if not found else 'in one sub-folder, found ' + str(len(found))}")
