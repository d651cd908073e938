"""BuboGPT's grounding stages in a bundle: the published files -> four ONNX graphs + tables.

    scops export --family bubogpt --from SRC --out OUT --grounding CHECKPOINTS_DIR [--sam FILE]

CHECKPOINTS_DIR is laid out as BuboGPT's app.py expects its checkpoints/ folder, plus the
two files that come with the code rather than a checkpoint:
  ram_swin_large_14m.pth                      RAM (tagging_model.py)
  ram_tag_list.txt, ram_tag_list_threshold.txt  RAM's ram/data/ (tag names, per-class thresholds)
  groundingdino_swint_ogc.pth                 GroundingDINO Swin-T OGC (grounding_model.py)
  bert-base-uncased/                          its text encoder's tokenizer (vocab.txt or tokenizer.json)
  sam_vit_h_4b8939.pth or sam_vit_b_01ec64.pth  SAM (ViT-H as BuboGPT; ViT-B as the lighter choice)
A missing file is named in one error listing all of them.

Manifest: "grounding": {"stages": [ram, groundingdino, sam], "matcher": {...}} (the ops and
their fields are declared in runtime/contract.py's GROUNDING_OPS).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

RAM_CKPT = "ram_swin_large_14m.pth"
GD_CKPT = "groundingdino_swint_ogc.pth"
BERT_DIR = "bert-base-uncased"
SAM_CKPTS = ("sam_vit_h_4b8939.pth", "sam_vit_b_01ec64.pth", "sam_vit_l_0b3195.pth")   # preference order
TAG_TABLE = "ram_tags.json"
GD_TOKENIZER = "groundingdino_tokenizer.json"
# The matcher's record: the bundle's own LLM with BuboGPT's few-shot prompt (runtime/matcher.py).
MATCHER = {"op": "match", "prompt": "bubogpt-match", "max_tokens": 160}


@dataclass(frozen=True)
class GroundingSources:
    ram: Path
    tags_dir: Path
    groundingdino: Path
    bert_dir: Path
    sam: Path


def find_sources(folder: str | Path, sam: str | Path | None = None) -> GroundingSources:
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"--grounding {root}: not a folder")
    sam_path = Path(sam).expanduser() if sam else next((root / n for n in SAM_CKPTS if (root / n).is_file()), None)
    wanted = {RAM_CKPT: root / RAM_CKPT, "ram_tag_list.txt": root / "ram_tag_list.txt",
              "ram_tag_list_threshold.txt": root / "ram_tag_list_threshold.txt", GD_CKPT: root / GD_CKPT,
              f"{BERT_DIR}/vocab.txt or tokenizer.json": root / BERT_DIR,
              "SAM (" + " or ".join(SAM_CKPTS) + ")": sam_path}
    missing = [name for name, p in wanted.items() if p is None or not p.exists()
               or (p.name == BERT_DIR and not ((p / "vocab.txt").is_file() or (p / "tokenizer.json").is_file()))]
    if missing:
        raise FileNotFoundError(f"{root}: grounding files missing: {', '.join(missing)}")
    return GroundingSources(root / RAM_CKPT, root, root / GD_CKPT, root / BERT_DIR, sam_path)


def write_bert_tokenizer(bert_dir: Path, out: Path) -> list[int]:
    """The text encoder's WordPiece tokenizer as one tokenizer.json; returns the ids of
    GroundingDINO's phrase-closing tokens ([CLS], [SEP], '.', '?')."""
    from tokenizers import Tokenizer
    from tokenizers.implementations import BertWordPieceTokenizer

    from .groundingdino import SPECIAL_TOKENS

    if (bert_dir / "tokenizer.json").is_file():
        shutil.copyfile(bert_dir / "tokenizer.json", out)
    else:
        conf = bert_dir / "tokenizer_config.json"
        lower = json.loads(conf.read_text()).get("do_lower_case", True) if conf.is_file() else True
        BertWordPieceTokenizer(str(bert_dir / "vocab.txt"), lowercase=lower).save(str(out))
    tok = Tokenizer.from_file(str(out))
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if any(i is None for i in ids):
        raise ValueError(f"{bert_dir}: the vocabulary lacks one of {SPECIAL_TOKENS}")
    return ids


def export_grounding(src: GroundingSources, b, log: Callable[[str], None] = print) -> tuple[dict, dict]:
    """Export, validate and record the three graphs' stages into the bundle being built.
    Returns (the manifest's grounding record, validation records by file)."""
    from . import groundingdino, ram, sam
    from .onnx_stages import export_and_validate

    validation = {}
    log("  grounding: RAM tagger")
    model, cfg = ram.build_ram(src.ram)
    table = ram.read_tag_files(src.tags_dir, cfg["num_class"])
    spec = ram.stage_spec(cfg)
    validation[spec.file] = export_and_validate(model, spec, b.dir, log)
    b.add_file(spec.file, "onnx", **spec.describe())
    del model
    (b.dir / TAG_TABLE).write_text(json.dumps(table, ensure_ascii=False))
    b.add_file(TAG_TABLE, "data", count=len(table["tags"]))
    tagger = ram.manifest_record(TAG_TABLE)

    log("  grounding: GroundingDINO detector")
    special = write_bert_tokenizer(src.bert_dir, b.dir / GD_TOKENIZER)
    b.add_file(GD_TOKENIZER, "tokenizer")
    model, cfg = groundingdino.build_groundingdino(src.groundingdino, src.bert_dir)
    spec = groundingdino.stage_spec(cfg, special)
    validation[spec.file] = export_and_validate(model, spec, b.dir, log)
    b.add_file(spec.file, "onnx", **spec.describe())
    del model
    detector = groundingdino.manifest_record(GD_TOKENIZER, special)

    log(f"  grounding: SAM segmenter ({src.sam.name})")
    model, cfg = sam.build_sam(src.sam)
    specs = sam.stage_specs(cfg)
    for name, build in (("sam_encoder", sam.build_encoder), ("sam_decoder", sam.build_decoder)):
        validation[specs[name].file] = export_and_validate(build(src.sam), specs[name], b.dir, log)
        b.add_file(specs[name].file, "onnx", **specs[name].describe())
    segmenter = sam.manifest_record(cfg)
    return {"stages": [tagger, detector, segmenter], "matcher": dict(MATCHER)}, validation
