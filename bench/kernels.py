"""Benchmark of the fused projector against the unfused numpy fp32 chain (and torch, if present).

    python -m scops.bench.kernels [--json FILE] [--reps N] [--backend auto|cpu|cpu-scalar|cuda]
                                  [--threads T] [--clock wall|cpu]

Prints a markdown table (stdout): shape, chain, weight dtype, backend, p50 us, effective GB/s
(bytes of weights + x + y over p50) and speedup = p50 of numpy fp32 unfused / p50 of the row,
both measured in this run: every contender runs in blocks, five rounds in alternating order,
each block after a short pause (see time_rounds).  Progress goes to stderr.  Shapes are the
real projector uses: MiniGPT-4 class 32x768->4096, PandaGPT 1x1024->5120, LEGO
576x1024->4096->GELU->4096, ImageBind head 1x768->1024 (LayerNorm, no bias, L2 x scale).
Weights are warm in cache between calls (a 1024x5120 fp32 matrix fits a 32 MiB L3).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time

import numpy as np

from scops.kernels import Projector, ProjectorSpec, native_info
from scops.kernels import reference as R

CASES = [  # (rows, spec, chain label)
    (32, ProjectorSpec(in_dim=768, out_dim=4096), "linear+bias"),
    (1, ProjectorSpec(in_dim=1024, out_dim=5120), "linear+bias"),
    (576, ProjectorSpec(in_dim=1024, hidden_dim=4096, out_dim=4096, gelu="erf"), "linear+bias>gelu(erf)>linear+bias"),
    (1, ProjectorSpec(in_dim=768, out_dim=1024, layernorm=True, bias=False, l2norm=True, scale=20.0),
     "layernorm>linear>l2norm*scale"),
]
# Rows whose GEMM takes ~0.1 s or more get fewer repetitions (never fewer than 5).
HEAVY_MACS = 1 << 30


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def shape_of(rows: int, spec: ProjectorSpec) -> str:
    dims = [rows, spec.in_dim] + ([spec.hidden_dim] if spec.hidden_dim else []) + [spec.out_dim]
    return "x".join(map(str, dims))


def macs_of(rows: int, spec: ProjectorSpec) -> int:
    if spec.hidden_dim:
        return rows * (spec.in_dim * spec.hidden_dim + spec.hidden_dim * spec.out_dim)
    return rows * spec.in_dim * spec.out_dim


def make_weights(spec: ProjectorSpec, dtype, rng) -> dict:
    n1 = spec.hidden_dim or spec.out_dim
    w = {"fc1.weight": (rng.standard_normal((n1, spec.in_dim), dtype=np.float32) / np.sqrt(spec.in_dim)).astype(dtype)}
    if spec.bias:
        w["fc1.bias"] = rng.standard_normal(n1, dtype=np.float32)
    if spec.hidden_dim:
        w["fc2.weight"] = (rng.standard_normal((spec.out_dim, n1), dtype=np.float32) / np.sqrt(n1)).astype(dtype)
        if spec.bias:
            w["fc2.bias"] = rng.standard_normal(spec.out_dim, dtype=np.float32)
    if spec.layernorm:
        w["ln.weight"] = rng.standard_normal(spec.in_dim, dtype=np.float32)
        w["ln.bias"] = rng.standard_normal(spec.in_dim, dtype=np.float32)
    return w


def torch_runner(spec: ProjectorSpec, w32: dict, x: np.ndarray, threads: int):
    """torch fp32 unfused chain (None when torch is not installed)."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    if threads > 0:
        torch.set_num_threads(threads)
    t = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in w32.items()}
    xt = torch.from_numpy(x)

    def run():
        with torch.inference_mode():
            h = xt
            if spec.layernorm:
                h = F.layer_norm(h, (spec.in_dim,), t["ln.weight"], t["ln.bias"], spec.ln_eps)
            h = F.linear(h, t["fc1.weight"], t.get("fc1.bias") if spec.bias else None)
            if spec.hidden_dim:
                h = F.gelu(h, approximate="tanh" if spec.gelu == "tanh" else "none") if spec.gelu != "none" else h
                h = F.linear(h, t["fc2.weight"], t.get("fc2.bias") if spec.bias else None)
            if spec.l2norm:
                h = F.normalize(h, dim=-1) * spec.scale
            return h

    return run


def time_rounds(runners: dict, reps: int, rounds: int = 5, quiet_s: float = 0.2, clock=time.perf_counter) -> dict:
    """(p50, min) seconds per runner.  Each round runs every contender as one block (1 warm-up call,
    then its share of the reps) after a pause of quiet_s, so that spinning worker threads
    of the previous contender (OpenBLAS, OpenMP in torch, our pool) have gone to sleep;
    rounds alternate the order so slow drifts in machine load hit every contender alike."""
    samples = {k: [] for k in runners}
    per_round = [reps // rounds + (1 if i < reps % rounds else 0) for i in range(rounds)]
    keys = list(runners)
    for i, n in enumerate(per_round):
        for key in (keys if i % 2 == 0 else keys[::-1]):
            fn = runners[key]
            time.sleep(quiet_s)
            fn()
            for _ in range(n):
                t0 = clock()
                fn()
                samples[key].append(clock() - t0)
    return {k: (float(np.median(v)), float(np.min(v))) for k, v in samples.items()}


def bench_case(rows, spec, chain, reps, backend, threads, rng, clock) -> list[dict]:
    x = rng.standard_normal((rows, spec.in_dim), dtype=np.float32)
    out = np.empty((rows, spec.out_dim), dtype=np.float32)
    weights = {dt: make_weights(spec, dt, rng) for dt in ("float32", "float16")}
    w32 = R.prepare_fp32(spec, weights["float32"])
    runners = {("numpy-fp32-unfused", "fp32"): lambda: R.project_numpy_fp32(spec, w32, x)}
    trun = torch_runner(spec, weights["float32"], x, threads)
    if trun is not None:
        runners[("torch-fp32-unfused", "fp32")] = trun
    projs = []
    for dt, label in (("float32", "fp32"), ("float16", "fp16")):
        p = Projector.create(spec, weights[dt], backend=backend, threads=threads)
        projs.append(p)
        runners[(p.backend, label)] = (lambda p=p: p.forward(x, out=out))
    if macs_of(rows, spec) >= HEAVY_MACS:
        reps = max(6, reps // 4)
    log(f"  {shape_of(rows, spec)} {chain}: {len(runners)} contenders x {reps} reps")
    p50 = time_rounds(runners, reps, clock=clock)
    for p in projs:
        p.close()
    base = p50[("numpy-fp32-unfused", "fp32")][0]
    io_bytes = 4 * rows * (spec.in_dim + spec.out_dim)
    n_weights = sum(v.size for k, v in weights["float32"].items() if k.endswith("weight") and k.startswith("fc"))
    rows_out = []
    for (name, label), (sec, best) in p50.items():
        wbytes = n_weights * (2 if label == "fp16" else 4)
        rows_out.append(dict(shape=shape_of(rows, spec), chain=chain, weights=label, backend=name,
                             p50_us=round(sec * 1e6, 1), min_us=round(best * 1e6, 1),
                             gbps=round((wbytes + io_bytes) / sec / 1e9, 2),
                             speedup=round(base / sec, 2), reps=reps))
    return rows_out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scops.bench.kernels", description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write the rows as a JSON list to this file")
    ap.add_argument("--reps", type=int, default=30, help="timed repetitions per contender (>= 5; heavy shapes use reps/4, at least 6)")
    ap.add_argument("--backend", default="auto", help="projector backend (default auto)")
    ap.add_argument("--threads", type=int, default=0,
                    help="projector (and torch) CPU threads, 0 = all cores; for numpy set OPENBLAS_NUM_THREADS")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall: perf_counter (default); cpu: process CPU time -- a fair measure on a loaded "
                         "machine only when every contender runs one thread (OPENBLAS_NUM_THREADS=1 --threads 1)")
    args = ap.parse_args(argv)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    args.reps = max(5, args.reps)
    rng = np.random.default_rng(0)
    info = native_info()
    log(f"scops.bench.kernels: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, {info}")
    load_before = os.getloadavg()[0]
    rows = []
    for n_rows, spec, chain in CASES:
        rows += bench_case(n_rows, spec, chain, args.reps, args.backend, args.threads, rng, clock)
    header = "| shape | chain | weights | backend | p50 us | GB/s | speedup |"
    print(header)
    print("|" + "---|" * 7)
    for r in rows:
        print(f"| {r['shape']} | {r['chain']} | {r['weights']} | {r['backend']} | {r['p50_us']:.1f} "
              f"| {r['gbps']:.2f} | {r['speedup']:.2f} |")
    blas_env = " ".join(f"{k}={os.environ[k]}" for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS") if k in os.environ)
    command = (blas_env + " " if blas_env else "") + "python -m scops.bench.kernels " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    print(f"\n{args.clock} clock; speedup = numpy fp32 unfused p50 / row p50, same run; cpu_features={info['cpu_features']}, "
          f"cuda_devices={info['cuda_devices']}, {os.cpu_count()} cpus, "
          f"1-min load average {load_before:.2f} before / {os.getloadavg()[0]:.2f} after")
    print(f"reproduce: {command.strip()}")
    if args.json:
        for r in rows:
            r.update(cpu_features=info["cpu_features"], cuda_devices=info["cuda_devices"], cpus=os.cpu_count(),
                     loadavg_before=round(load_before, 2), clock=args.clock)
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
