"""The export driver shared by families: ONNX stages -> projector -> GGUF -> manifest.

A family supplies a `FamilyExport`: its ONNX stages (a PyTorch module builder and an
`OnnxStageSpec` each), the checkpoint prefix of its projection, the LLM prefix, the chat
template and the modality records of the manifest. The driver streams the LLM, runs
every check, shows progress and commits the bundle atomically.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .bundle import BundleBuilder
from scops.runtime.errors import ExportError

from .checkpoints import TensorIndex, read_added_tokens
from .llm_gguf import quantize_gguf, write_llama_gguf
from .onnx_stages import export_and_validate

QUANTS = ("Q4_K_M", "Q8_0", "F16", "F32")


@dataclass(frozen=True)
class FamilyExport:
    family: str
    stages: tuple                        # ((builder() -> torch module, OnnxStageSpec), ...)
    projection_prefix: str               # e.g. "language_projection."
    llm_prefix: str                      # e.g. "language_model."
    text_config: dict                    # LLaMA config of the text model
    template: dict
    modalities: dict                     # manifest "modalities" (stage files must exist)
    extra_files: tuple = ()              # ((name, writer(path)), ...) e.g. a Q-Former tokenizer
    facts: dict = field(default_factory=dict)
    # ((checkpoint prefix, bundle file[, "linear" | "mlp"]), ...) when a family has several
    # projections (BuboGPT: image + audio); empty -> `projection_prefix` -> projector.safetensors
    projectors: tuple = ()
    llm_dir: Path | None = None          # where the LLM (+ tokenizer.model) lives; default: the source
    llm_adjust: Callable | None = None   # (hf_name, w) -> w while streaming, e.g. a LoRA merge
    load: Callable | None = None         # (prefix) -> {name: tensor}; default: the source's safetensors
    llm_tensors: TensorIndex | None = None   # the LLM's tensors (names/shape/load); default: llm_dir's
    added_tokens: dict | None = None     # {text: id} for the GGUF vocabulary; default: llm_dir's files
    # ((title, step(bundle_builder, log) -> manifest entries), ...) run after the LLM, e.g. Emu's
    # regression head and image decoder
    extra_steps: tuple = ()
    # (builder, log) -> (manifest entries, validation records): stages beside the chat, e.g.
    # BuboGPT's grounding graphs under the manifest's "grounding" key
    extras: Callable | None = None
    # (gguf path, log) -> facts: writes the bundle's LLM GGUF itself, in place of the checkpoint
    # -> GGUF -> quantize steps (the benchmarks' random Q4_K_M LLaMA-7B: bench/random_gguf.py)
    llm_writer: Callable | None = None

    def projector_files(self) -> tuple:
        return self.projectors or ((self.projection_prefix, "projector.safetensors"),)


def load_state(src: Path, prefix: str) -> dict:
    """Tensors of an HF folder (any saved form) whose key starts with `prefix`, prefix
    stripped, as fp32 (only those are read)."""
    return TensorIndex.open(src).load_prefix(prefix)


def resolve_special(template: dict, llm_dir: Path, tok_model: Path) -> dict:
    """A template's "special" strings -> {text: id}: the LLM folder's added tokens, else
    pieces of its sentencepiece model (LLaMA's "<s>" is piece 1)."""
    names = template.get("special")
    if not names or isinstance(names, dict):
        return template
    import sentencepiece as spm

    added = read_added_tokens(llm_dir)
    sp = spm.SentencePieceProcessor(model_file=str(tok_model))
    ids = {}
    for text in names:
        i = added.get(text, sp.piece_to_id(text))
        if text not in added and (i == sp.unk_id() and text != sp.id_to_piece(sp.unk_id())):
            raise ExportError(f"{llm_dir}: the template's token {text!r} is not in the tokenizer")
        ids[text] = int(i)
    return dict(template, special=ids)


def assemble_bundle(fam: FamilyExport, src_dir: Path, out: Path, quant: str,
                    log: Callable[[str], None] = print, encoder_precision: str = "fp32") -> Path:
    from safetensors.numpy import save_file

    if quant not in QUANTS:
        raise ValueError(f"--quant must be one of {', '.join(QUANTS)}")
    llm_dir = fam.llm_dir or src_dir
    tok_model = llm_dir / "tokenizer.model"
    if not tok_model.exists():
        raise ExportError(f"{llm_dir}: tokenizer.model (sentencepiece) not found")
    template = resolve_special(fam.template, llm_dir, tok_model)
    t_start = time.perf_counter()
    quantized = quant not in ("F32", "F16") and fam.llm_writer is None
    n_steps = len(fam.stages) + 3 + quantized + len(fam.extra_steps) + (fam.extras is not None)
    step = iter(range(1, n_steps + 1))
    validation = {}
    with BundleBuilder(out, log=log) as b:
        for build, spec in fam.stages:
            log(f"[{next(step)}/{n_steps}] {spec.name}: export to ONNX (opset {spec.opset})")
            validation[spec.file] = export_and_validate(build(), spec, b.dir, log)
            b.add_file(spec.file, "onnx", **spec.describe())
        for name, write in fam.extra_files:
            write(b.dir / name)
            b.add_file(name, "tokenizer")
        extra_manifest = {}
        if fam.extras is not None:
            log(f"[{next(step)}/{n_steps}] stages beside the chat")
            extra_manifest, checks = fam.extras(b, log)
            validation.update(checks)

        step_no, saved = next(step), []
        for prefix, file, *kind in fam.projector_files():
            log(f"[{step_no}/{n_steps}] projector: {prefix.rstrip('.')} -> {file}")
            proj = fam.load(prefix) if fam.load else load_state(src_dir, prefix)
            w = projector_weights(proj, kind[0] if kind else "linear")
            save_file(w, str(b.dir / file))
            b.add_file(file, "safetensors", tensors={k: list(v.shape) for k, v in w.items()})
            saved.append(w)
        weights = saved[0]                                           # the encoder-precision check's
        widths = {w.get("fc2.weight", w["fc1.weight"]).shape[0] for w in saved}   # [out, in] -> out
        if len(widths) != 1:
            raise ValueError(f"projections disagree on the LLM width: {sorted(widths)}")
        (n_embd,) = widths
        precision = _convert_encoders(b, fam, encoder_precision, weights, log)

        src_name = f"llm.{quant}.gguf" if not quantized else ".llm.src.gguf"
        # The quantizer reads an f16 intermediate (as llama.cpp's own convert -> quantize
        # does): half the disk and I/O of f32 (7B: 13.5 instead of 27 GB), exact for the fp16
        # checkpoints these families publish; F32 bundles (exact parity) stay f32 throughout.
        dtype = "f32" if quant == "F32" else "f16"
        if fam.llm_writer is not None:
            log(f"[{next(step)}/{n_steps}] LLM: {quant} GGUF written directly "
                f"({getattr(fam.llm_writer, '__name__', 'llm_writer')})")
            facts = fam.llm_writer(b.dir / src_name, log)
        else:
            log(f"[{next(step)}/{n_steps}] LLM: GGUF ({dtype}) from {llm_dir.name}")
            facts = write_llama_gguf(llm_dir, tok_model, b.dir / src_name, dtype=dtype, prefix=fam.llm_prefix,
                                     config=fam.text_config, progress=_tensor_progress(log),
                                     name=f"scops-{fam.family}", adjust=fam.llm_adjust, tensors=fam.llm_tensors,
                                     added_tokens=fam.added_tokens)
        llm_file = src_name
        if quantized:
            llm_file = f"llm.{quant}.gguf"
            log(f"[{next(step)}/{n_steps}] LLM: quantize to {quant}")
            quantize_gguf(b.dir / src_name, b.dir / llm_file, quant)
            (b.dir / src_name).unlink()
        b.add_file(llm_file, "gguf", quant=quant, n_embd=facts["n_embd"], n_vocab=facts["n_vocab"])
        if n_embd != facts["n_embd"]:
            raise ValueError(f"projection width {n_embd} != LLM width {facts['n_embd']}")

        extra = {}
        for title, run in fam.extra_steps:
            log(f"[{next(step)}/{n_steps}] {title}")
            extra.update(run(b, log))
        log(f"[{next(step)}/{n_steps}] manifest + atomic rename -> {out}")
        path = b.commit({
            "family": fam.family,
            "source": str(src_dir),
            "llm": {"file": llm_file, "quant": quant, "n_embd": facts["n_embd"], "n_vocab": facts["n_vocab"],
                    "n_ctx_train": int(fam.text_config.get("max_position_embeddings", 2048))},
            "template": template,
            "modalities": fam.modalities,
            "validation": validation,
            "encoder_precision": precision,
            **fam.facts,
            **extra,
            **extra_manifest,
        })
    log(f"done in {time.perf_counter() - t_start:.1f}s: {path}")
    return path


def projector_weights(proj: dict, kind: str) -> dict:
    """Checkpoint tensors of a projection -> the fused projector's names. "linear": one
    nn.Linear (weight, bias); "mlp": nn.Sequential(Linear, GELU, Linear) (0.*, 2.*)."""
    if kind == "mlp":
        names = {"fc1.weight": "0.weight", "fc1.bias": "0.bias", "fc2.weight": "2.weight", "fc2.bias": "2.bias"}
    else:
        names = {"fc1.weight": "weight", "fc1.bias": "bias"}
    return {ours: proj[theirs].float().numpy() for ours, theirs in names.items()}


def _convert_encoders(b: BundleBuilder, fam: FamilyExport, precision: str, projector: dict, log) -> dict:
    """fp16 / int8 encoder stages replace the fp32 ones in the bundle, accuracy recorded.

    `precision` may list variants after the main one, e.g. "fp32,int8": the stages keep the
    main graphs and record the others as `variants` (the low-memory profile runs int8).
    """
    from .encoder_precision import PRECISIONS, convert_stages, remove_stage

    main, *variants = precision.split(",")
    if any(p not in PRECISIONS for p in [main, *variants]) or len({main, *variants}) != 1 + len(variants):
        raise ValueError(f"encoder precision {precision!r}: one of {', '.join(PRECISIONS)}, optionally "
                         "followed by other ones as variants (e.g. fp32,int8)")
    files = [spec.file for _, spec in fam.stages]
    if precision == "fp32":
        return {"precision": "fp32"}
    from scops.runtime.encode import ArrayOp

    # one encoder chain per bundle: every modality names the same stage files (Emu: image, video)
    first = next(iter(fam.modalities.values()))
    stages = [st for spec in fam.modalities.values() for st in spec["stages"]]
    prep = first["preprocess"]
    ops = [ArrayOp(st) for st in first["stages"] if st["op"] not in ("onnx", "projector")]

    def post(x):                                       # the numpy stages between the graphs and the projector
        for op in ops:
            x = op.run({op.input: x})
        return x
    out: dict = {"precision": main}
    for v in variants:                                 # converted from the fp32 graphs, still there
        log(f"  encoders: {v} variant")
        res = convert_stages(b.dir, files, v, projector, prep, log, post)
        for st in stages:
            if st.get("file") in res["files"]:
                new = res["files"][st["file"]]
                st.setdefault("variants", {})[v] = new
                if new not in b.files:
                    b.add_file(new, "onnx", **{k: b.files[st["file"]][k] for k in ("inputs", "outputs", "opset")})
        out.setdefault("variants", {})[v] = {k: val for k, val in res.items() if k not in ("files", "precision")}
    if main == "fp32":
        return out
    log(f"  encoders to {main}")
    result = convert_stages(b.dir, files, main, projector, prep, log, post)
    for st in stages:
        if st.get("file") in result["files"]:
            st["file"] = result["files"][st["file"]]
    for old, new in result["files"].items():
        entry = b.files[old] if "fp32" in variants else b.files.pop(old)
        if "fp32" not in variants:
            b.files.pop(old + ".data", None)
            remove_stage(b.dir / old)
        b.add_file(new, "onnx", **{k: entry[k] for k in ("inputs", "outputs", "opset")})
    return {**out, **{k: v for k, v in result.items() if k != "files"}}


def _tensor_progress(log):
    last = [0.0]

    def progress(i, n, name):
        now = time.perf_counter()
        if i + 1 == n or now - last[0] > 2.0:
            last[0] = now
            log(f"  tensor {i + 1}/{n} {name}")
    return progress
