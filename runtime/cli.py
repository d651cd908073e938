"""scops command line: run, chat, demo, info, export.

Every user-facing failure is one line on stderr and a non-zero exit (2 for bad input or
bundle, 1 for an internal error; SCOPS_DEBUG=1 shows its traceback).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .errors import ScopsError

EXIT_USER, EXIT_INTERNAL = 2, 1
GIBBERISH_NOTE = "(the demo model has random weights: its answer is gibberish by design; the timings are real)"


def _session(args):
    from .session import Session
    return Session.open(args.bundle, n_ctx=args.n_ctx, threads=args.threads, verify=not args.no_verify,
                        kv_type=args.kv_type, device=args.device, n_gpu_layers=args.n_gpu_layers,
                        low_memory=args.low_memory,
                        grounding=not getattr(args, "no_grounding", False), matcher=getattr(args, "matcher", "llm"))


def _sampling(args) -> dict:
    return {"max_tokens": args.max_tokens, "temperature": args.temperature, "seed": args.seed,
            "top_k": args.top_k, "top_p": args.top_p, "repeat_penalty": args.repeat_penalty}


# CLI flag -> send() argument
MEDIA_FLAGS = {"image": "images", "audio": "audios", "video": "videos", "thermal": "thermals",
               "depth": "depths", "imu": "imus"}


def _media(args) -> dict:
    return {arg: getattr(args, flag) for flag, arg in MEDIA_FLAGS.items() if getattr(args, flag, None)}


def format_grounding(entities) -> list[str]:
    """One line per entity: its number, phrase and where it points (pixels / seconds)."""
    lines = []
    for i, e in enumerate(entities, 1):
        where = []
        for r in e.regions:
            if r.box is not None:
                where.append("box [" + ", ".join(f"{v:.0f}" for v in r.box) + f"] px of input {r.media}")
            if r.time is not None:
                where.append(f"{r.time[0]:.2f}-{r.time[1]:.2f} s of input {r.media}")
            if r.mask is not None:
                where.append(f"mask of input {r.media}")
        lines.append(f"  {i}. {e.phrase!r}: " + "; ".join(where))
    return lines


def format_timings(t: dict) -> str:
    keys = ("preprocess_ms", "encode_ms", "prefill_ms", "ttft_ms")
    parts = [f"{k[:-3]} {t[k]:.1f} ms" for k in keys if k in t]
    if "decode_tok_s" in t:
        parts.append(f"decode {t['decode_tok_s']:.1f} tok/s")
    return ", ".join(parts)


def cmd_run(args) -> int:
    session = _session(args)
    reply = session.chat().send(args.prompt, **_media(args), **_sampling(args))
    if args.json:
        from .grounding import grounding_json
        reply.result()
        keys = ["preprocess_ms", "encode_ms", "prefill_ms", "ttft_ms", "decode_tok_s"]
        keys += sorted(k for k in reply.timings if k.startswith("encode_") and k != "encode_ms")
        out = {"text": reply.text, "token_ids": reply.token_ids, "finish_reason": reply.finish_reason,
               "timings": {k: reply.timings.get(k) for k in keys}}
        if session.bundle.manifest.get("grounding"):
            out["grounding"] = grounding_json(reply.grounding)
            out["media"] = [{k: v for k, v in m.items() if k != "key"} for m in reply.conv.media()]
        if session.grounder is not None:
            out["grounding_facts"] = reply.grounding_facts
        print(json.dumps(out))
    else:
        for piece in reply:
            print(piece, end="", flush=True)
        print()
        for line in format_grounding(reply.grounding):
            print(line, file=sys.stderr)
        print(f"[{format_timings(reply.timings)}]", file=sys.stderr)
    if args.draw:
        _write_drawing(args.draw, reply)
    session.close()
    return 0


def _write_drawing(path: Path, reply) -> None:
    """The answer's grounding drawn on its inputs (pictures: boxes and masks; videos: the
    frames at each span) as one PNG, written atomically."""
    import tempfile

    from . import draw
    from .preprocess import decode_image
    from .video import read_frames_at

    panels = []
    for i, m in enumerate(reply.conv.media()):
        src = m.get("source")
        if src is None:
            continue
        if m["modality"] == "image":
            panels.append(draw.draw_picture(decode_image(src), reply.grounding, i))
        elif m["modality"] == "video":
            times = draw.timeline_times(reply.grounding, i)
            if times:
                frames, _ = read_frames_at(src, times)
                sheet = draw.draw_timeline(dict(zip(times, frames)), reply.grounding, i, float(m.get("duration", 0)))
                panels.append(sheet)
    if not panels:
        print("scops: --draw: no picture or video to draw on", file=sys.stderr)
        return
    if not reply.grounding:
        print("scops: --draw: the answer points at nothing; the input is drawn as it is", file=sys.stderr)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(draw.png_bytes(draw.vstack(panels)))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    print(f"scops: drew {len(reply.grounding)} entities -> {path}", file=sys.stderr)


def cmd_chat(args) -> int:
    session = _session(args)
    conv = session.chat()
    pending = _media(args)
    commands = " ".join(f"/{flag} PATH" for flag in MEDIA_FLAGS)
    print(f"scops chat: {commands} attach inputs, /reset starts over, /quit leaves", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            conv.reset()
            pending = {}
            print("(new conversation)", file=sys.stderr)
            continue
        word, _, path = line.partition(" ")
        if word[1:] in MEDIA_FLAGS and word.startswith("/"):
            if path.strip():
                pending.setdefault(MEDIA_FLAGS[word[1:]], []).append(path.strip())
                print(f"(attached {path.strip()})", file=sys.stderr)
            continue
        try:
            reply = conv.send(line, **pending, **_sampling(args))
            pending = {}
            try:
                for piece in reply:
                    print(piece, end="", flush=True)
            except KeyboardInterrupt:
                reply.close()
                print(" [cancelled]", end="")
            print()
            for line in format_grounding(reply.grounding):
                print(line, file=sys.stderr)
            print(f"[{format_timings(reply.timings)}]", file=sys.stderr)
        except ScopsError as e:
            print(f"scops: error: {e}", file=sys.stderr)
    session.close()
    return 0


def cmd_info(args) -> int:
    from .bundle import open_bundle
    from .families import BY_NAME
    b = open_bundle(args.bundle, verify=not args.no_verify)
    m = b.manifest
    fam = BY_NAME.get(m["family"])
    print(f"bundle   {b.path}")
    print(f"family   {m['family']}: {fam.title if fam else 'not known to this scops'}   "
          f"(schema {m['schema']}, from {m.get('source', '?')})")
    llm = m["llm"]
    print(f"llm      {llm['file']}  {llm['quant']}  n_embd {llm['n_embd']}  n_vocab {llm['n_vocab']}")
    for mod, spec in m["modalities"].items():
        chain = " -> ".join(s.get("file", s["op"]) for s in spec["stages"])
        print(f"{mod:<8} {chain}  ({spec['rows']} rows)")
    gen = m.get("generation")
    if gen:                                            # Emu: `scops imagine` serves this bundle
        d = gen["defaults"]
        print(f"imagine  {gen['boi']} -> {gen['n_embeds']} regressed rows ({gen['regress_head']['file']}) -> "
              f"{gen['unet']['file']} x PNDM -> {gen['vae_decoder']['file']}  ({d['width']}x{d['height']}, "
              f"{d['steps']} steps, guidance {d['guidance']})")
    print("files")
    for name, e in m["files"].items():
        print(f"  {name:<28} {e['bytes'] / 2**20:9.2f} MiB  sha256 {e['sha256'][:12]}…")
    for name, v in m.get("validation", {}).items():
        print(f"parity   {name}: onnxruntime vs PyTorch max abs diff {v['max_abs_diff']:.2e} at batch {v['batch']}")
    for key in ("unet", "vae_decoder"):
        v = (gen or {}).get(key, {}).get("validation")
        if v:
            print(f"parity   {gen[key]['file']}: onnxruntime vs PyTorch max abs diff {v['max_abs_diff']:.2e} at "
                  f"batch {v['batch']}, latent {v['latent']}")
    print(f"verified {'sha256 of every file' if not args.no_verify else 'sizes only (--no-verify)'}")
    return 0


def cmd_families(args) -> int:
    from .families import FAMILIES
    for f in FAMILIES:
        print(f"{f.name:<14} {f.title}")
        print(f"{'':<14} inputs: {', '.join('--' + m for m in f.inputs)}")
        print(f"{'':<14} scops export --family {f.name} --from FOLDER, where FOLDER holds:")
        for r in f.release:
            print(f"{'':<16}- {r.describe()}")
        if f.hub_ids:
            print(f"{'':<14} or a hub id: {', '.join(f.hub_ids)}")
        print(f"{'':<14} tiny fixtures: {', '.join(name for name, _ in f.fixtures)}")
    return 0


def cmd_export(args) -> int:
    from scops.export.cli import run_export
    return run_export(args)


def cmd_demo(args) -> int:
    from .demo import run_demo
    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="scops", description="Edge runtime for Q-Former-family multimodal chat")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)

    def session_args(p):
        p.add_argument("bundle", type=Path)
        p.add_argument("--n-ctx", type=int, default=2048)
        p.add_argument("--threads", type=int, default=0)
        p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the bundle's files")
        add_memory_args(p)
        add_device_args(p)

    def sampling_args(p, max_tokens=256, temperature=0.8):
        p.add_argument("--max-tokens", type=int, default=max_tokens)
        p.add_argument("--temperature", type=float, default=temperature)
        p.add_argument("--top-k", type=int, default=40)
        p.add_argument("--top-p", type=float, default=0.95)
        p.add_argument("--repeat-penalty", type=float, default=1.0)
        p.add_argument("--seed", type=int, default=None)

    def media_args(p):
        for flag in MEDIA_FLAGS:
            p.add_argument(f"--{flag}", action="append", metavar="PATH",
                           help=f"{flag} input (repeatable; the bundle must serve it)")

    p = sub.add_parser("run", help="one turn: media + prompt -> answer")
    session_args(p)
    media_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (text, token_ids, timings; grounding for grounding families)")
    p.add_argument("--draw", type=Path, metavar="OUT.png",
                   help="draw what the answer points at (boxes, masks, video frames at its time spans)")
    p.add_argument("--no-grounding", action="store_true", help="skip a bundle's grounding stages (BuboGPT)")
    p.add_argument("--matcher", choices=["llm", "rules"], default="llm",
                   help="BuboGPT: link answer phrases to detections with the bundle's LLM (BuboGPT's prompt; "
                        "rules when its output is unusable) or with the rules alone")
    sampling_args(p)
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("chat", help="interactive chat with streaming")
    session_args(p)
    media_args(p)
    sampling_args(p)
    p.set_defaults(fn=cmd_chat)

    p = sub.add_parser("info", help="what a bundle holds")
    p.add_argument("bundle", type=Path)
    p.add_argument("--no-verify", action="store_true")
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("demo", help="build the tiny bundle (once) and answer one question about a photo")
    p.add_argument("--cache", type=Path, default=None, help="where the demo bundle lives")
    p.set_defaults(fn=cmd_demo)

    _add_optional_commands(sub)

    p = sub.add_parser("families", help="the model families, and the published files each export reads")
    p.set_defaults(fn=cmd_families)

    from .families import BY_NAME
    p = sub.add_parser("export", help="checkpoint -> bundle (see `scops families` for what --from holds)")
    p.add_argument("--from", dest="src", required=True,
                   help="a folder holding the published release files, an HF folder, or a hub id")
    p.add_argument("--family", required=True, choices=list(BY_NAME))
    p.add_argument("--llm", type=Path, default=None,
                   help="the LLM's HF folder, when it is not the one LLaMA folder inside --from")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--quant", default="Q4_K_M", choices=["Q4_K_M", "Q8_0", "F16", "F32"])
    p.add_argument("--encoder-precision", default="fp32", metavar="fp32|fp16|int8[,VARIANT...]",
                   help="precision of the ONNX encoders (accuracy vs fp32 measured into the manifest); "
                        "more after a comma are kept as variants, e.g. fp32,int8: int8 for --low-memory")
    p.add_argument("--grounding", metavar="DIR", default=None,
                   help="bubogpt: folder with RAM, GroundingDINO (+ bert-base-uncased/) and SAM as released; "
                        "adds the grounding stages")
    p.add_argument("--sam", metavar="FILE", default=None,
                   help="bubogpt: the SAM checkpoint to use (default: ViT-H, else ViT-B, found in --grounding)")
    p.set_defaults(fn=cmd_export)
    return ap


def add_device_args(p) -> None:
    """--device and --n-gpu-layers: where every command that opens a bundle runs it."""
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: the NVIDIA GPU when one is there (onnxruntime-gpu, llama.cpp built with CUDA)")
    p.add_argument("--n-gpu-layers", type=int, default=None,
                   help="LLM layers on the GPU (default: all of them when there is a GPU; 0: none)")


def add_memory_args(p) -> None:
    """--low-memory and --kv-type: the memory options of every command that opens a bundle."""
    p.add_argument("--low-memory", action="store_true",
                   help="8 GB boards: ONNX arena off, encoders loaded on use and dropped after 30 s idle, "
                        "int8 encoders where the bundle has them, q8_0 KV cache sized to the conversation, "
                        "llama.cpp's weight repacking off (no second copy of the weights)")
    p.add_argument("--kv-type", choices=["auto", "f16", "f32", "q8_0"], default="auto",
                   help="KV cache precision; auto: f32 (and flash attention off) for an F32 bundle, "
                        "whose greedy tokens then match PyTorch's exactly, q8_0 with --low-memory, else f16")


def _add_optional_commands(sub) -> None:
    """`scops serve` and `scops bench` declare their own arguments where they live."""
    from scops.bench.cli import add_bench_parser
    from .cli_imagine import add_imagine_parser
    from .server import add_serve_parser
    add_serve_parser(sub)
    add_bench_parser(sub)
    add_imagine_parser(sub)


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes. A handler bound to the stream at
    setup writes on into it after it was replaced and closed (a test harness capturing output:
    the server's threads then logged "I/O operation on closed file")."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:      # StreamHandler.__init__ sets it: sys.stderr is looked up instead
        pass


def install_log_handler() -> logging.Logger:
    logger = logging.getLogger("scops")
    if not logger.handlers:
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("scops: %(message)s"))
        logger.addHandler(handler)
    return logger


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logger = install_log_handler()
    logger.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return args.fn(args)
    except ScopsError as e:
        print(f"scops: error: {e}", file=sys.stderr)
        return EXIT_USER
    except KeyboardInterrupt:
        print("scops: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("SCOPS_DEBUG"):
            raise
        print(f"scops: internal error: {type(e).__name__}: {e} (SCOPS_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
