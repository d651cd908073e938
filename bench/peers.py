"""One system per process: scops, HF transformers (fp32 / fp16 eager, bitsandbytes NF4) or
raw llama-cpp-python.

    python -m scops.bench.peers SYSTEM --bundle B --ckpt C --reps N --tokens T --threads K \
        [--device cuda] --out F.json

SYSTEM: scops | hf (fp32) | hf-fp16 | hf-nf4 | llama-cpp. --device cuda puts every system on
the GPU (scops: onnxruntime CUDA EP, CUDA projector, all LLM layers offloaded; llama-cpp:
n_gpu_layers=-1); --device cpu with a GPU system name is the CPU rehearsal of the GPU run.

Each run does one warm-up repetition and then `reps` timed ones on the same prompt and
images, with a fixed decode length (EOS ignored, greedy), and writes per-repetition
stage times (ms), decode tokens/s and the process's peak RSS (its own, since each
system runs in a fresh process) to F.json. Progress goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

from .hf import HfPipeline

QUESTION = "Describe this image in detail."
FOLLOW_UP = "What colours stand out?"
N_CTX = 1024          # system (~40) + 32 rows + 2 turns of (question + answer <= 128): fits with room


def say(msg: str) -> None:
    print(f"  [{os.environ.get('SCOPS_BENCH_SYSTEM', '?')}] {msg}", file=sys.stderr, flush=True)


def bench_images(n: int) -> list[np.ndarray]:
    """n distinct photos (a sample photo with one pixel changed per repetition), so that every
    repetition's image is new to scops' media cache and the encoders really run."""
    from scops.export.encoder_precision import sample_photos
    _, photos = sample_photos()
    out = []
    for i in range(n):
        img = photos[i % len(photos)].copy()
        img[0, 0, 0] = (int(img[0, 0, 0]) + 1 + i) % 256
        out.append(img)
    return out


def peak_rss() -> int:
    """This process's peak resident set (bytes). VmHWM belongs to the address space made at
    exec; getrusage's ru_maxrss would also count the parent's RSS at fork time."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024                             # "VmHWM: 123 kB"
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024      # KiB on Linux


class StageTimer:
    """Wraps a callable and adds its wall time (ms) into timer.ms[key]."""

    def __init__(self):
        self.ms: dict[str, float] = {}

    def wrap(self, key: str, fn):
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.ms[key] = self.ms.get(key, 0.0) + (time.perf_counter() - t0) * 1e3
        return timed


def run_scops(args, images) -> list[dict]:
    from scops.runtime.session import Session

    s = Session.open(args.bundle, n_ctx=N_CTX, threads=args.threads, device=args.device)
    say(f"backends: {s.describe_backends()}")
    timer = StageTimer()
    enc = s.encoders["image"]
    for stage, key in zip(enc.base + enc.rest, ("encoder", "qformer")):     # vision, Q-Former
        stage.run = timer.wrap(key, stage.run)
    proj = s.projectors["image"]
    proj.forward = timer.wrap("projection", proj.forward)
    samples = []
    for i, img in enumerate(images):
        timer.ms.clear()
        conv = s.chat()
        r1 = conv.send(QUESTION, images=[img], temperature=0, max_tokens=args.tokens, ignore_stop=True).result()
        turn1 = dict(timer.ms)
        r2 = conv.send(FOLLOW_UP, temperature=0, max_tokens=args.tokens, ignore_stop=True).result()
        t1, t2 = r1.timings, r2.timings
        samples.append({
            "preprocess": t1["preprocess_ms"], "encoder": turn1.get("encoder", 0.0),
            "qformer": turn1.get("qformer", 0.0), "projection": turn1.get("projection", 0.0),
            "prefill": t1["prefill_ms"] - turn1.get("projection", 0.0), "ttft": t1["ttft_ms"],
            "decode_tok_s": t1.get("decode_tok_s", 0.0), "n_tokens": t1.get("n_tokens", 0),
            "answer": answer_ms(t1["ttft_ms"], t1.get("n_tokens", 0), t1.get("decode_tok_s", 0.0)),
            "reused_cells": t1["reused_cells"], "decoded_cells": t1["decoded_cells"],
            "turn2_ttft": t2["ttft_ms"], "turn2_reused_cells": t2["reused_cells"],
            "turn2_decoded_cells": t2["decoded_cells"], "prompt_cells": len(r1.cells)})
        say(f"rep {i}: ttft {t1['ttft_ms']:.0f} ms, decode {t1.get('decode_tok_s', 0):.1f} tok/s, "
            f"turn-2 ttft {t2['ttft_ms']:.0f} ms")
    s.close()
    return samples


def answer_ms(ttft_ms: float, n_tokens: int, tok_s: float) -> float:
    """Image in -> last token out: the first token, then n - 1 more at the decode rate."""
    return ttft_ms + ((n_tokens - 1) / tok_s * 1e3 if n_tokens > 1 and tok_s > 0 else 0.0)


def run_hf(args, images) -> list[dict]:
    import torch
    torch.set_num_threads(args.threads)
    mode = {"hf": "fp32", "hf-fp16": "fp16", "hf-nf4": "nf4"}[args.system]
    pipe = HfPipeline(Path(args.ckpt), mode, args.device)
    samples = []
    for i, img in enumerate(images):
        t = pipe.run(img, QUESTION, args.tokens)
        samples.append(t)
        say(f"rep {i}: ttft {t['ttft']:.0f} ms, decode {t['decode_tok_s']:.1f} tok/s")
    return samples


def run_llama_cpp(args, images) -> list[dict]:
    """The same GGUF through llama-cpp-python's own Llama.generate: prompt of the same
    length as scops' (the 32 image rows stood in for by 32 text tokens), greedy."""
    if args.device == "cuda":
        from scops.runtime.gpu import preload_cuda_libraries
        preload_cuda_libraries()
    import llama_cpp
    from scops.runtime.templates import MINIGPT4 as MINIGPT4_TEMPLATE

    manifest = json.loads((Path(args.bundle) / "manifest.json").read_text())
    llm = llama_cpp.Llama(model_path=str(Path(args.bundle) / manifest["llm"]["file"]), n_ctx=N_CTX,
                          n_batch=512, n_ubatch=512, n_threads=args.threads, n_threads_batch=args.threads,
                          n_gpu_layers=-1 if args.device == "cuda" else 0,
                          flash_attn=True, verbose=False)    # scops' "auto" picks flash attention
    tpl = MINIGPT4_TEMPLATE
    head = tpl["system"] + tpl["user"].format(content="<Img>")
    tail = "</Img> " + QUESTION + tpl["assistant"]
    rows = manifest["modalities"]["image"]["rows"]
    ids = llm.tokenize(head.encode(), add_bos=True) + llm.tokenize(b" x", add_bos=False)[-1:] * rows \
        + llm.tokenize(tail.encode(), add_bos=False)
    samples = []
    for i, _ in enumerate(images):
        llm.reset()
        times = []
        t0 = time.perf_counter()
        for tok in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            times.append(time.perf_counter())
            if len(times) >= args.tokens:
                break
        n = len(times)
        tok_s = (n - 1) / (times[-1] - times[0]) if n > 1 else 0.0
        samples.append({"prefill": (times[0] - t0) * 1e3, "ttft": (times[0] - t0) * 1e3,
                        "decode_tok_s": tok_s, "n_tokens": n, "prompt_cells": len(ids),
                        "answer": (times[-1] - t0) * 1e3})
        say(f"rep {i}: prefill {samples[-1]['prefill']:.0f} ms, decode {tok_s:.1f} tok/s")
    llm.close()
    return samples


RUNNERS = {"scops": run_scops, "hf": run_hf, "hf-fp16": run_hf, "hf-nf4": run_hf, "llama-cpp": run_llama_cpp}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scops.bench.peers")
    ap.add_argument("system", choices=sorted(RUNNERS))
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    os.environ["SCOPS_BENCH_SYSTEM"] = args.system
    t0 = time.perf_counter()
    samples = RUNNERS[args.system](args, bench_images(args.reps + 1))
    result = {"system": args.system, "warmup": samples[0], "samples": samples[1:],
              "peak_rss_bytes": peak_rss(), "wall_s": time.perf_counter() - t0, "threads": args.threads}
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
