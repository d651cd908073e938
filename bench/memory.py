"""`scops bench --shape NAME --memory`: peak RSS through image turns, by stage, per profile.

    scops bench --shape minigpt4-7b --memory [--tokens 128] [--reps 3] [--out bench-out]

Each profile (PROFILES: default, default with int8 encoders, low-memory with llama.cpp's weight
repacking on, low-memory) runs in its own process
(`python -m scops.bench.memory --bundle B --profile P ...`): open the session, then `reps`
image turns, each a new picture and a `tokens`-long answer (greedy, EOS ignored), then, for
the low-memory profile, one more after its encoders were dropped as if idle. Around every
stage the process's peak RSS is reset (/proc/self/clear_refs "5") and read back (VmHWM),
so each stage reports the RSS after it and the peak during it. At the end the resident
memory is attributed: the GGUF's mapped pages (smaps), the KV cache (llama.cpp's size for
the context in use), the ONNX sessions (RSS they added when built), the ONNX arena (what an
encoder run added at its peak), the media cache (bytes of the cached rows). TTFT of each
turn is recorded, so the profile's cost in latency is measured in the same run.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

GIB = 2**30
# default: SessionOptions as they are (the bundle's main encoders); default-int8: the same with
# the int8 encoder variant, so that the low-memory profile's own cost (arena off, lazy
# encoders, q8_0 KV, growing context) is told apart from what int8 encoders change.
# low-memory-repack: the profile with llama.cpp's CPU weight repacking left on (as it was before
# weight_repack=False joined it), so that what the repacked copy costs in memory, and saves in
# time, is measured in the same run.
PROFILES = ("default", "default-int8", "low-memory-repack", "low-memory")
PROFILE_OPTIONS = {"default": {}, "default-int8": {"encoder_precision": "int8"},
                   "low-memory-repack": {"low_memory": True, "weight_repack": True}, "low-memory": {"low_memory": True}}
TARGET_BYTES = 6 * 10**9      # the bar for minigpt4-7b: <= 6 GB, room for the OS on an 8 GB board


# ---- process memory -------------------------------------------------------------------------
def status() -> dict:
    """VmRSS, VmHWM, RssAnon, RssFile of this process (bytes)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":", 1)[0]
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(line.split()[1]) * 1024
    return out


def reset_peak() -> bool:
    """Restart VmHWM from the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def mapped_rss(paths: set[str]) -> int:
    """Resident bytes of this process's mappings of the given files (from /proc/self/smaps)."""
    total, current = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" in head[3]:        # a mapping's header line
            current = len(head) >= 6 and head[5] in paths
        elif current and line.startswith("Rss:"):
            total += int(head[1]) * 1024
    return total


class Probe:
    """Records, for each stage, RSS before / after and the peak during (VmHWM after a reset).
    Stages may nest (a lazy encoder built inside an encode): an inner stage's reset would hide
    the outer stage's earlier peak, so each stage's peak also takes its inner stages' peaks."""

    def __init__(self):
        self.stages: list[dict] = []
        self.stack: list[dict] = []
        self.can_reset = reset_peak()
        self.peak = status()["VmHWM"]

    def begin(self) -> dict:
        if self.stack:               # the enclosing stage's peak so far, before the reset hides it
            hwm = status()["VmHWM"]
            self.stack[-1]["inner_peak"] = max(self.stack[-1]["inner_peak"], hwm)
        reset_peak()
        token = {"status": status(), "inner_peak": 0}
        self.stack.append(token)
        return token

    def end(self, name: str, token: dict, **extra) -> dict:
        self.stack.remove(token)
        before, after = token["status"], status()
        rec = {"stage": name, "rss_before": before["VmRSS"], "rss_after": after["VmRSS"], "anon_before": before["RssAnon"],
               "peak": max(after["VmHWM"], after["VmRSS"], token["inner_peak"]), "anon_after": after["RssAnon"],
               "file_after": after["RssFile"], "depth": len(self.stack), **extra}
        if self.stack:
            self.stack[-1]["inner_peak"] = max(self.stack[-1]["inner_peak"], rec["peak"])
        self.peak = max(self.peak, rec["peak"])
        self.stages.append(rec)
        return rec

    def wrap(self, name, fn):
        @functools.wraps(fn)
        def measured(*a, **kw):
            token = self.begin()
            try:
                return fn(*a, **kw)
            finally:
                self.end(name(*a, **kw) if callable(name) else name, token)
        return measured


def encode_runs(stages: list[dict]) -> list[tuple[int, int]]:
    """(peak, kept) bytes above the RSS before each encode stage, less the ONNX sessions a lazy
    profile built inside it (its nested "... (ONNX sessions)" stages, listed just before it):
    what running the graphs took, apart from loading them."""
    out = []
    for i, s in enumerate(stages):
        if not s["stage"].endswith("encode (turn)"):
            continue
        built, j = 0, i - 1
        while j >= 0 and stages[j]["depth"] > s["depth"]:
            if stages[j]["stage"].endswith("(ONNX sessions)"):
                built += stages[j]["rss_after"] - stages[j]["rss_before"]
            j -= 1
        out.append((s["peak"] - s["rss_before"] - built, s["rss_after"] - s["rss_before"] - built))
    return out


# ---- the worker: one profile in this process ---------------------------------------------------
def run_profile(args) -> dict:
    probe = Probe()
    before = probe.begin()
    import llama_cpp

    import scops.runtime.llm as llm_mod
    import scops.runtime.session as session_mod
    from scops.bench.peers import QUESTION, bench_images
    from scops.runtime.memory import kv_bytes, llm_shape
    probe.end("python + numpy + onnxruntime + llama.cpp imported", before)

    # Stage hooks at class / module level: they see every build, lazy ones included.
    load = llama_cpp.llama_model_load_from_file
    llama_cpp.llama_model_load_from_file = probe.wrap(
        lambda path, params: "GGUF metadata (memory check)" if params.vocab_only else "LLM weights (GGUF load)", load)
    llm_mod.Llm._new_context = probe.wrap("LLM context (KV cache + compute buffers)", llm_mod.Llm._new_context)
    session_mod.ModalityEncoder = type("MeasuredEncoder", (session_mod.ModalityEncoder,), {
        "__init__": probe.wrap(lambda self, bundle, m, *a: f"{m} encoder built (ONNX sessions)",
                               session_mod.ModalityEncoder.__init__)})
    session_mod.load_projector = probe.wrap("projector", session_mod.load_projector)
    session_mod.Session._warmup = probe.wrap("warm-up (system prompt decoded)", session_mod.Session._warmup)
    encode = session_mod.Session.encode_media_rows              # what Conversation.send encodes with
    session_mod.Session.encode_media_rows = probe.wrap(lambda self, m, *a, **k: f"{m} encode (turn)", encode)
    llm_mod.Llm.sync = probe.wrap("decode (warm-up)", llm_mod.Llm.sync)     # a turn's prompt: the scheduler

    options = {"n_ctx": args.n_ctx, "threads": args.threads, **PROFILE_OPTIONS[args.profile]}
    t0 = time.perf_counter()
    session = session_mod.Session.open(args.bundle, **options)
    open_s = time.perf_counter() - t0
    turns = []
    images = bench_images(args.reps + 1)
    for i, img in enumerate(images):
        if i == args.reps:
            if not session.opts.lazy_encoders:
                break
            before = probe.begin()
            dropped = session.encoders.drop_idle(0.0)            # what the idle timer does after encoder_idle_s
            probe.end(f"encoders dropped as idle ({', '.join(dropped) or 'none'})", before)
        conv = session.chat()
        reply = conv.send(QUESTION, images=[img], temperature=0, max_tokens=args.tokens, ignore_stop=True)
        pieces = iter(reply)
        before = probe.begin()
        next(pieces, None)                                          # prefill + first token
        probe.end("prefill (turn)", before)
        before = probe.begin()
        for _ in pieces:
            pass
        probe.end("decode (turn)", before)
        t = reply.timings
        turns.append({"ttft_ms": t["ttft_ms"], "encode_ms": t["encode_ms"], "prefill_ms": t["prefill_ms"],
                      "decode_tok_s": t.get("decode_tok_s", 0.0), "n_tokens": t.get("n_tokens", 0),
                      "after_drop": i == args.reps, "cells": len(session.llm.cells)})
        print(f"  [{args.profile}] turn {i + 1}: ttft {t['ttft_ms']:.0f} ms, decode {t.get('decode_tok_s', 0):.1f} "
              f"tok/s, RSS {status()['VmRSS'] / GIB:.2f} GiB", file=sys.stderr, flush=True)
    llama_cpp.llama_model_load_from_file = load                    # the hooks' stages end here
    shape = llm_shape(session.bundle.llm_path)
    llm = session.llm
    enc_built = [s for s in probe.stages if s["stage"].endswith("(ONNX sessions)")]
    arena = encode_runs(probe.stages)
    media = sum(r.nbytes for _, r in session._media.values() if isinstance(r, np.ndarray)) + \
        sum(v.nbytes for base in session._base.values() for v in base.values() if isinstance(v, np.ndarray))
    onnx_files = {str(session.bundle.file(f)) for f in session.bundle.manifest["files"] if ".onnx" in f}
    loads = [s for s in probe.stages if s["stage"] == "LLM weights (GGUF load)"]
    parts = {
        "gguf_mapped_resident": mapped_rss({str(session.bundle.llm_path.resolve()), str(session.bundle.llm_path)}),
        # llama.cpp's repacked copy of the weights (and its host buffers): anonymous memory the load added
        "llm_weights_anon": max((s["anon_after"] - s["anon_before"] for s in loads), default=0),
        "kv_cache": kv_bytes(shape, llm.n_ctx, llm.kv_type),
        "onnx_sessions": max((s["rss_after"] - s["rss_before"] for s in enc_built), default=0),
        "onnx_files_mapped_resident": mapped_rss(onnx_files),
        "onnx_arena_peak": max((peak for peak, _ in arena), default=0),
        "onnx_arena_retained": max((kept for _, kept in arena), default=0),
        "media_cache": int(media),
    }
    end = status()
    result = {"profile": args.profile, "options": {k: v for k, v in vars(session.opts).items()
                                                   if isinstance(v, (int, float, str, bool, type(None)))},
              "kv_type": llm.kv_type, "n_ctx_final": llm.n_ctx, "n_ctx_max": llm.n_ctx_max,
              "estimate": session.memory_need, "open_s": open_s, "stages": probe.stages, "turns": turns,
              "parts": parts, "rss_end": end["VmRSS"], "anon_end": end["RssAnon"], "file_end": end["RssFile"],
              "peak_rss": probe.peak, "peak_reset_supported": probe.can_reset}
    session.close()
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scops.bench.memory")
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--profile", choices=PROFILES, default="default")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    args.out.write_text(json.dumps(run_profile(args), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
