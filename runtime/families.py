"""The family registry: every model family scops serves, declared once.

`scops export --family` choices, `scops info`, `python -m scops.export.fixtures` and the
README's family table all read this. Pure data (no torch): the exporter and fixture
builders are named as "module:function" and imported only when used.

    python -m scops.runtime.families      # prints the README table
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from . import templates

LAVIS = "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/"
IMAGEBIND = "https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth"


@dataclass(frozen=True)
class ReleaseFile:
    """One file (or folder) of a published release, under the name its authors give it."""
    names: tuple[str, ...]           # the published name(s); a folder ends with "/"
    what: str                        # what it holds
    where: str                       # where the authors publish it
    optional: bool = False

    def describe(self) -> str:
        names = " | ".join(f"`{n}`" for n in self.names)
        return f"{names}{' (optional)' if self.optional else ''}: {self.what} — {self.where}"


@dataclass(frozen=True)
class Family:
    name: str                        # `--family NAME`
    title: str
    exporter: str                    # "module:function" (scops.export, needs torch)
    fixtures: tuple[tuple[str, str], ...]   # (fixture name, "module:function")
    inputs: tuple[str, ...]          # modalities, in the order the CLI offers them
    templates: tuple[str, ...]       # names in runtime/templates.py
    release: tuple[ReleaseFile, ...] # what `--from FOLDER` holds (the published files)
    sequence: str                    # what the LLM sees (README)
    hub_ids: tuple[str, ...] = ()    # hub repos that hold a release in this layout

    def export_fn(self):
        return _resolve(self.exporter)

    def template(self, name: str | None = None) -> dict:
        return getattr(templates, (name or self.templates[0]).upper())


def _resolve(target: str):
    module, _, fn = target.partition(":")
    return getattr(importlib.import_module(module), fn)


EVA_VIT_G = ReleaseFile(("eva_vit_g.pth",), "EVA ViT-g/14 (LAVIS; 40 blocks stored, 39 used)", LAVIS + "eva_vit_g.pth")
BLIP2_QFORMER = ReleaseFile(("blip2_pretrained_flant5xxl.pth",), "BLIP-2 Q-Former, query tokens, ln_vision",
                            LAVIS + "blip2_pretrained_flant5xxl.pth")
IMAGEBIND_HUGE = ReleaseFile(("imagebind_huge.pth",), "ImageBind-huge (all modality trunks and heads)", IMAGEBIND)

FAMILIES: tuple[Family, ...] = (
    Family(
        name="minigpt4", title="MiniGPT-4 (EVA ViT-g + BLIP-2 Q-Former + Vicuna v0, or LLaMA-2-chat without Q-Former)",
        exporter="scops.export.minigpt4:export_minigpt4",
        fixtures=(("minigpt4-tiny", "scops.export.fixtures:build_minigpt4_tiny"),
                  ("minigpt4-release-tiny", "scops.export.fixtures_minigpt4:build_minigpt4_release_tiny"),
                  ("minigpt4-llama2-tiny", "scops.export.fixtures_minigpt4:build_minigpt4_llama2_tiny")),
        inputs=("image",), templates=("minigpt4", "minigpt4_llama2"),
        release=(EVA_VIT_G,
                 ReleaseFile(("blip2_pretrained_flant5xxl.pth",), "BLIP-2 Q-Former, query tokens, ln_vision "
                             "(Vicuna variants only)", LAVIS + "blip2_pretrained_flant5xxl.pth", optional=True),
                 ReleaseFile(("prerained_minigpt4_7b.pth", "pretrained_minigpt4.pth",
                              "pretrained_minigpt4_llama2_7b.pth"),
                             "MiniGPT-4 stage-2 checkpoint: `{'model': {llama_proj.*}}` (Vicuna v0 7B, 13B, LLaMA-2)",
                             "Vision-CAIR/MiniGPT-4 README (Google Drive)"),
                 ReleaseFile(("<llm folder>/",), "Vicuna v0 7B/13B or Llama-2-7b-chat as an HF LLaMA folder "
                             "(safetensors or .bin, sharded or not)", "lmsys (Vicuna v0: LLaMA + delta), meta-llama")),
        sequence="`system###Human: <Img>[32 rows]</Img> q###Assistant: `; LLaMA-2: "
                 "`system<s>[INST] <Img>[64 rows]</Img> q [/INST] `",
    ),
    Family(
        name="instructblip", title="InstructBLIP (Vicuna v1.1 7B/13B)",
        exporter="scops.export.instructblip:export_instructblip",
        fixtures=(("instructblip-tiny", "scops.export.fixtures:build_instructblip_tiny"),),
        inputs=("image",), templates=("instructblip",),
        release=(ReleaseFile(("<hf folder>/",), "HF `InstructBlipForConditionalGeneration` folder with "
                             "`qformer_tokenizer/`", "Salesforce/instructblip-vicuna-7b, -13b"),),
        sequence="`[32 rows][BOS]q`; the Q-Former also reads q (BERT WordPiece, left-truncated to 128)",
        hub_ids=("Salesforce/instructblip-vicuna-7b", "Salesforce/instructblip-vicuna-13b"),
    ),
    Family(
        name="pandagpt", title="PandaGPT (ImageBind-huge, six modalities, Vicuna v0 + LoRA)",
        exporter="scops.export.pandagpt:export_pandagpt",
        fixtures=(("pandagpt-tiny", "scops.export.fixtures:build_pandagpt_tiny"),),
        inputs=("image", "audio", "video", "thermal", "depth", "imu"), templates=("pandagpt",),
        release=(IMAGEBIND_HUGE,
                 ReleaseFile(("vicuna/",), "Vicuna v0 7B/13B, HF LLaMA folder", "lmsys (LLaMA + delta)"),
                 ReleaseFile(("pytorch_model.pt",), "PandaGPT delta: llama_proj + LoRA r32 on q,k,v,o",
                             "openllmplayground/pandagpt_7b_max_len_1024 (HF)")),
        sequence="`### Human: <Img>[1 row]</Img> q\\n### Assistant:`; a turn's inputs summed into one row; "
                 "LoRA merged at export",
    ),
    Family(
        name="bubogpt", title="BuboGPT (image + audio: EVA ViT-g / ImageBind audio, two Q-Formers, Vicuna)",
        exporter="scops.export.bubogpt:export_bubogpt",
        fixtures=(("bubogpt-tiny", "scops.export.fixtures:build_bubogpt_tiny"),
                  ("bubogpt-release-tiny", "scops.export.fixtures_bubogpt:build_bubogpt_release_tiny"),
                  # the --grounding folder: RAM, GroundingDINO (+ its BERT vocab), SAM, published names
                  ("grounding-tiny", "scops.export.fixtures_grounding:build_grounding_tiny")),
        inputs=("image", "audio"), templates=("bubogpt",),
        release=(ReleaseFile(("bubogpt_7b.pth",), "`{'model': ...}`: audio Q-Former, both post-projectors",
                             "magicr/BuboGPT-ckpt (HF)"),
                 IMAGEBIND_HUGE, EVA_VIT_G, BLIP2_QFORMER,
                 ReleaseFile(("prerained_minigpt4_7b.pth",), "MiniGPT-4's llama_proj, the vision projector's "
                             "starting point (bubogpt_7b.pth overrides it)", "Vision-CAIR/MiniGPT-4", optional=True),
                 ReleaseFile(("<llm folder>/",), "Vicuna 7B, HF LLaMA folder", "lmsys")),
        sequence="`###Human: <Vision>[32]</Vision>` / `<Audio>[32]</Audio>`, either order, over turns",
        hub_ids=("magicr/BuboGPT-ckpt",),
    ),
    Family(
        name="lego", title="LEGO / GroundingGPT (CLIP-L/14-336 image, EVA + Q-Formers video, ImageBind audio; "
                           "answers that point)",
        exporter="scops.export.lego:export_lego",
        fixtures=(("lego-tiny", "scops.export.fixtures_lego:build_lego_tiny"),),
        inputs=("image", "video", "audio"), templates=("lego",),
        release=(ReleaseFile(("GroundingGPT/",), "LEGOLlamaForCausalLM.save_pretrained: config.json, "
                             "pytorch_model-*.bin, tokenizer with the 9 added tokens", "zwli/GroundingGPT (HF)"),
                 ReleaseFile(("clip-vit-large-patch14-336/",), "CLIP ViT-L/14-336, HF CLIPModel folder",
                             "openai/clip-vit-large-patch14-336 (HF)"),
                 EVA_VIT_G,
                 ReleaseFile(("imagebind_huge.pth", "imagebind/imagebind_huge.pth"),
                             "ImageBind-huge (the audio trunk and head are used)", IMAGEBIND)),
        sequence="`###Human: <so_start>[8]<so_end>\\n<vi_start>[64]<vi_end>\\n<im_start>[576]<im_end>\\nq"
                 "###Assistant:`; the answer's boxes and time spans become `grounding`",
        hub_ids=("zwli/GroundingGPT",),
    ),
)

FAMILIES += (
    Family(
        name="emu", title="Emu (EVA-CLIP-g + Causal Transformer + LLaMA-13B): image chat (Emu-I) and image "
                          "generation (pretrained Emu + SD UNet/VAE)",
        exporter="scops.export.emu:export_emu",
        fixtures=(("emu-tiny", "scops.export.fixtures_emu:build_emu_tiny"),),
        inputs=("image", "video"), templates=("emu_i", "emu"),
        release=(ReleaseFile(("Emu-instruct.pt",), "Emu-I: the whole model's state dict (optionally under 'module'), "
                             "LoRA r16 under peft's names (chat bundle)", "BAAI/Emu (HF)"),
                 ReleaseFile(("pretrain/",), "pretrained Emu: `multimodal_encoder/pytorch_model.bin` (flat), "
                             "`unet/`, `vae/`, `scheduler/` (diffusers) (generation bundle)", "BAAI/Emu (HF)"),
                 ReleaseFile(("llama_config/", "Emu-14B.json"), "LLaMA's tokenizer.model + config.json, the model "
                             "config (beside the checkpoint)", "baaivision/Emu: Emu1/models/")),
        sequence="`{system} [USER]: [IMG][32 rows][/IMG]q [ASSISTANT]:`; video: 8 frames, one `[IMG][32 rows][/IMG]` "
                 "each, the video system message; generation: `prompt[IMG]` + 32 regressed rows",
        hub_ids=("BAAI/Emu",),
    ),
)

BY_NAME = {f.name: f for f in FAMILIES}
FIXTURES = {name: target for f in FAMILIES for name, target in f.fixtures}


def family(name: str) -> Family:
    from .errors import OptionError
    if name not in BY_NAME:
        raise OptionError(f"unknown family {name!r} (have: {', '.join(BY_NAME)})")
    return BY_NAME[name]


def fixture_builder(name: str):
    return _resolve(FIXTURES[name])


def markdown_table() -> str:
    """The README's family table, rendered from the declarations."""
    rows = ["| family | `--from` folder holds (published names) | inputs | LLM sequence |", "|---|---|---|---|"]
    for f in FAMILIES:
        files = "<br>".join(" \\| ".join(f"`{n}`" for n in r.names) + (" (optional)" if r.optional else "")
                            for r in f.release)
        inputs = " ".join(f"`--{m}`" for m in f.inputs)
        rows.append(f"| `{f.name}` | {files} | {inputs} | {f.sequence} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
