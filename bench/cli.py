"""`scops bench`: shape-faithful benchmarks of scops side by side with its peers.

    scops bench --shape minigpt4-small --vs hf,llama-cpp --reps 5 --out bench-out

Builds (once, cached) a random-weight checkpoint at the shape's real widths and its
bundle, runs scops, HF transformers fp32 and raw llama-cpp-python each in its own
process, prints a markdown table and writes report.md, report.json and latency.png.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from .shapes import SHAPES


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _peers(text: str) -> tuple:
    from .run import PEERS
    names = tuple(p for p in (s.strip() for s in text.split(",")) if p)
    bad = [p for p in names if p not in PEERS]
    if bad:
        import argparse
        raise argparse.ArgumentTypeError(f"unknown peer(s) {', '.join(bad)} (have: {', '.join(PEERS)})")
    return names


def reproduce_command(args) -> str:
    parts = ["scops bench", f"--shape {args.shape}"]
    if args.vs:
        parts.append(f"--vs {','.join(args.vs)}")
    parts += [f"--reps {args.reps}", f"--tokens {args.tokens}", f"--threads {args.threads}",
              f"--encoder-precision {args.encoder_precision}", f"--out {args.out}"]
    return " ".join(parts)


def cmd_bench(args) -> int:
    if args.shape == "lego-small":
        from .lego import run_lego_bench
        return run_lego_bench(args, _log)
    from .report import write_report
    from .run import BenchOptions, run_bench

    opts = BenchOptions(args.shape, tuple(args.vs), args.reps, args.tokens, args.threads,
                        args.encoder_precision, Path(args.out)).resolved()
    args.reps, args.tokens, args.threads = opts.reps, opts.tokens, opts.threads
    command = reproduce_command(args)
    _log(f"{command}")
    result = run_bench(opts, _log)
    md = write_report(result, opts.out, command)
    print(md)
    m = result["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM")
    print(f"reproduce: {command}")
    print(f"wrote {opts.out / 'report.md'}, report.json, latency.png ({result['wall_s']:.0f}s)")
    return 0


def add_bench_parser(sub) -> None:
    """Register `scops bench --shape NAME ...` on the CLI's subparsers."""
    p = sub.add_parser("bench", help="benchmark a shape-faithful bundle against HF and llama-cpp-python")
    p.add_argument("--shape", required=True, choices=sorted(SHAPES) + ["lego-small"])
    p.add_argument("--vs", type=_peers, default=(), help="peers, comma-separated: hf,llama-cpp")
    p.add_argument("--reps", type=int, default=0, help="timed repetitions after one warm-up (0: shape default)")
    p.add_argument("--tokens", type=int, default=0, help="decode length, EOS ignored (0: shape default)")
    p.add_argument("--threads", type=int, default=0, help="threads for every system (0: one per core)")
    p.add_argument("--encoder-precision", default="int8", choices=["fp32", "fp16", "int8"])
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    p.set_defaults(fn=cmd_bench)
