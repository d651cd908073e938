"""`scops bench`: shape-faithful benchmarks of scops side by side with its peers.

    scops bench --shape minigpt4-small --vs hf,llama-cpp --reps 5 --out bench-out
    scops bench --device cuda --shape minigpt4-7b --vs hf,llama-cpp --out $OUT
    scops bench --device cuda --rehearse --shape tiny --vs hf,llama-cpp    # the GPU plan, on the CPU
    scops bench --serve --shape minigpt4-small --out bench-serve     (the server under load)

Builds (once, cached) a random-weight checkpoint at the shape's real widths and its
bundle, runs scops, HF transformers and raw llama-cpp-python each in its own process,
prints a markdown table and writes report.md, report.json and latency.png. On the CPU the
HF peer is fp32 eager; with --device cuda it is two peers, fp16 eager and bitsandbytes NF4,
and every system's peak VRAM is measured (NVML).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from .shapes import SHAPES

MEMORY_TOKENS = 128          # the answer length of a memory run's image turns


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
    parts = ["scops bench"] + (["--device cuda"] if args.device == "cuda" else []) + \
        (["--rehearse"] if args.rehearse else []) + [f"--shape {args.shape}"] + (["--memory"] if args.memory else [])
    if args.vs:
        parts.append(f"--vs {','.join(args.vs)}")
    parts += [f"--reps {args.reps}", f"--tokens {args.tokens}", f"--threads {args.threads}",
              f"--encoder-precision {args.encoder_precision}", f"--out {args.out}"]
    return " ".join(parts)


GROUNDING_SHAPE = "bubogpt-grounding"     # BuboGPT's tagger -> detector -> segmenter (bench/grounding.py)


def cmd_bench(args) -> int:
    if args.serve:
        return cmd_bench_serve(args)
    if args.shape == "lego-small":
        from .lego import run_lego_bench
        return run_lego_bench(args, _log)
    from .imagine import EMU_SHAPES, cmd_bench_imagine
    from .report import write_report
    from .run import BenchOptions, run_bench

    if args.shape in EMU_SHAPES:                 # Emu's image generation: its own stages and report
        return cmd_bench_imagine(args, _log)
    if args.shape == GROUNDING_SHAPE:
        from .grounding import run_grounding_bench
        command = (f"scops bench --shape {GROUNDING_SHAPE} --reps {args.reps or 5} --threads {args.threads} "
                   f"--out {args.out}")
        _log(command)
        print(run_grounding_bench(args.reps, args.threads, Path(args.out), command, _log))
        print(f"reproduce: {command}")
        print(f"wrote {Path(args.out) / 'report.md'}, report.json, latency.png")
        return 0
    if args.rehearse and args.device != "cuda":
        raise SystemExit("scops bench: --rehearse rehearses the GPU run: give it with --device cuda")
    device = "cpu" if args.rehearse else args.device
    if args.memory:       # image turns with a 128-token answer; the default profile runs fp32 encoders
        args.tokens = args.tokens or MEMORY_TOKENS     # as `scops export` makes them, low-memory the int8 variant
        args.encoder_precision = args.encoder_precision or "fp32,int8"
    opts = BenchOptions(args.shape, tuple(args.vs), args.reps, args.tokens, args.threads,
                        args.encoder_precision or "", Path(args.out), device, args.rehearse).resolved()
    args.reps, args.tokens, args.threads = opts.reps, opts.tokens, opts.threads
    args.encoder_precision = opts.encoder_precision
    command = reproduce_command(args)
    _log(f"{command}")
    if args.memory:
        from .memory_report import run_memory_bench
        t0 = time.perf_counter()
        print(run_memory_bench(opts, _log, command))
        print(f"reproduce: {command}")
        print(f"wrote {opts.out / 'memory.md'}, memory.json, memory.png ({time.perf_counter() - t0:.0f}s)")
        return 0
    result = run_bench(opts, _log)
    md = write_report(result, opts.out, command)
    print(md)
    m = result["machine"]
    gpu = f"{m['gpu']}, " if m.get("gpu") else ""
    print(f"machine: {gpu}{m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM")
    if result.get("rehearsal"):
        print("CPU REHEARSAL of the GPU run: these are CPU figures, not GPU ones")
    print(f"reproduce: {command}")
    print(f"wrote {opts.out / 'report.md'}, report.json, latency.png ({result['wall_s']:.0f}s)")
    return 0


def _ints(text: str) -> tuple:
    import argparse
    try:
        values = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def cmd_bench_serve(args) -> int:
    from scops.runtime.errors import OptionError

    from .serve import ServeBenchOptions, run_serve_bench, write_serve_report
    if args.shape not in SHAPES:
        raise OptionError(f"--serve benchmarks the MiniGPT-4 shapes ({', '.join(sorted(SHAPES))}), not {args.shape}")
    if args.device != "cpu" or args.rehearse or args.vs:
        raise OptionError("--serve measures the server on the CPU, without peers (no --device, --rehearse, --vs)")

    out = Path(args.out if args.out != Path("bench-out") else "bench-serve")
    o = ServeBenchOptions(args.shape, args.concurrency, args.reps, args.tokens, args.threads,
                          args.burst or (0, 0, 0), args.encoder_precision, out).resolved()
    command = (f"scops bench --serve --shape {o.shape} --concurrency {','.join(map(str, o.concurrency))} "
               f"--reps {o.reps} --tokens {o.tokens} --threads {o.threads} --burst {'x'.join(map(str, o.burst))} "
               f"--encoder-precision {o.encoder_precision} --out {o.out}")
    _log(command)
    result = run_serve_bench(o, _log)
    md = write_serve_report(result, o.out, command)
    print(md)
    print(f"reproduce: {command}")
    print(f"wrote {o.out / 'report.md'}, report.json, serve.png ({result['wall_s']:.0f}s)")
    return 0


def add_bench_parser(sub) -> None:
    """Register `scops bench --shape NAME ...` on the CLI's subparsers."""
    from .imagine import EMU_SHAPES
    p = sub.add_parser("bench", help="benchmark a shape-faithful bundle against HF and llama-cpp-python")
    p.add_argument("--shape", required=True,
                   choices=sorted(SHAPES) + ["lego-small", GROUNDING_SHAPE] + sorted(EMU_SHAPES))
    p.add_argument("--vs", type=_peers, default=(), help="peers, comma-separated: hf,llama-cpp")
    p.add_argument("--reps", type=int, default=0, help="timed repetitions after one warm-up (0: shape default)")
    p.add_argument("--tokens", type=int, default=0, help="decode length, EOS ignored (0: shape default)")
    p.add_argument("--threads", type=int, default=0, help="threads for every system (0: one per core)")
    p.add_argument("--encoder-precision", default=None, metavar="fp32|fp16|int8[,VARIANT]",
                   help="default: int8 on the CPU, fp16 with --device cuda; with --memory fp32,int8 (the "
                        "default profile runs fp32 as `scops export` makes it, low-memory the int8 variant)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--rehearse", action="store_true",
                   help="with --device cuda: run the GPU plan (peers, keys, report) on the CPU")
    p.add_argument("--steps", type=int, default=0, help="emu shapes: denoising steps (0: 20)")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="report folder (--serve: bench-serve)")
    p.add_argument("--memory", action="store_true",
                   help="peak RSS by stage through image turns: default vs low-memory profile (--vs ignored)")
    p.add_argument("--serve", action="store_true", help="benchmark `scops serve` under concurrent load instead")
    p.add_argument("--concurrency", type=_ints, default=(1, 2, 4), help="--serve: stream counts, e.g. 1,2,4,8")
    p.add_argument("--burst", type=_ints, default=None,
                   help="--serve: REQUESTSxPICTURESxSIDE of the memory burst (default tiny 2x2x1000, else 10x8x4000)")
    p.set_defaults(fn=cmd_bench)
