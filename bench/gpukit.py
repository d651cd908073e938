"""The device kit: everything a bare lent GPU machine needs, packed into pieces that fit its calls.

    python -m scops.bench.gpukit prepare [--kit .gpukit] [--prune-sm 90]   (here, with a registry)
    python -m scops.bench.gpukit plan [--kit .gpukit]                      (prints the device calls)
    python -m scops.bench.gpukit prune-fatbin LIB.so --keep-sm 90 [--out F] (one library, for checks)

The lent machine (README of the device tool) has Python 3.12 with torch, numpy, onnx,
sentencepiece, scikit-image, matplotlib, CuPy, nvcc, CMake and ninja, but no registry, and
each call carries at most 64 MiB. `prepare` stages, for cp312 / manylinux x86-64:

  site/  onnxruntime-gpu (its CUDA provider library optionally pruned to one GPU
         architecture, see prune_fatbin), llama-cpp-python built with CUDA (a py3-none
         wheel built here by bench/gpu_build_llama.sh), bitsandbytes (its CUDA 13 libraries
         only), transformers / tokenizers / huggingface_hub at the project's pins, gguf
  lib/   libscops_kernels.so and libscops_kernels_cuda.so built from this tree

then packs base/ (with lib/) and ort/ into two tar.xz payloads, cut into pieces of
PIECE_BYTES, one per device call, with every sha256 in kit.json, and writes CALLS.md: the
exact device calls. bench/gpu_check.sh receives the pieces on the device (`recv`), checks
and unpacks them (`setup`), builds the benchmark bundle in the background while the
onnxruntime-gpu pieces arrive (`start-build`), and runs the work (`test`, `bench`).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import time
from pathlib import Path

# The device's Python and platform (KINDS.md: Python 3.12.3 on x86-64, glibc of Ubuntu 24.04).
DEVICE_PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "linux_x86_64")


def py_tags(python: str = DEVICE_PYTHON) -> list[str]:
    return ["--python-version", python, "--implementation", "cp", "--only-binary=:all:"] + [
        a for n in PLATFORMS for a in ("--platform", n)]


PY_TAGS = py_tags()
# Packages carried as wheels, pinned. transformers at the project's pin needs tokenizers <= 0.23.0
# and huggingface_hub < 1.0, older than the device's own.
BASE_WHEELS = ["bitsandbytes==0.50.2", "transformers==4.57.6", "tokenizers==0.22.2", "huggingface_hub==0.36.2",
               "gguf==0.19.0"]
ORT_WHEEL = "onnxruntime-gpu==1.31.1"
# bitsandbytes ships one library per CUDA / ROCm version; torch 2.11+cu130 there loads cuda130.
BNB_KEEP = ("libbitsandbytes_cuda130.so", "libbitsandbytes_cuda132.so", "libbitsandbytes_cpu.so")
# 64 MiB per call, less the working tree (~1 MiB) and a margin.
PIECE_BYTES = 60 << 20
FATBIN_MAGIC = 0xBA55ED50
ELF_SASS, ELF_PTX = 2, 1


def log(msg: str) -> None:
    print(f"[gpukit {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# ---- fatbin pruning -------------------------------------------------------------------------
def _section(m, name: str) -> tuple[int, int]:
    """(file offset, size) of an ELF64 section."""
    shoff, = struct.unpack_from("<Q", m, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", m, 0x3A)
    hdrs = [struct.unpack_from("<IIQQQQIIQQ", m, shoff + i * shentsize) for i in range(shnum)]
    strtab = hdrs[shstrndx][4]
    for h in hdrs:
        end = m.find(b"\0", strtab + h[0])
        if m[strtab + h[0]:end].decode() == name:
            return h[4], h[5]
    raise ValueError(f"no {name} section")


def fatbin_entries(m, off: int, size: int):
    """Yield (blob offset, kind, sm, payload offset, payload size) of every entry in .nv_fatbin.

    Layout (as cuobjdump reads it): blobs of {u32 magic 0xBA55ED50, u16 version, u16 header
    size, u64 entries size}, each followed by entries {u16 kind (1 PTX, 2 ELF), u16, u32 header
    size, u64 payload size, u32, u32, u16 minor, u16 major, u32 sm, ...} and their payloads.
    """
    pos, end = off, off + size
    while pos + 16 <= end:
        magic, _, hsz, fsz = struct.unpack_from("<IHHQ", m, pos)
        if magic != FATBIN_MAGIC:
            pos += 8                               # blobs are 8-byte aligned
            continue
        e, eend = pos + hsz, pos + hsz + fsz
        while e < eend:
            kind, _, ehs, psz = struct.unpack_from("<HHIQ", m, e)
            sm, = struct.unpack_from("<I", m, e + 28)
            yield pos, kind, sm, e + ehs, psz
            e += ehs + psz
        pos = eend


def prune_fatbin(src: Path, dst: Path, keep_sm: int) -> dict:
    """Copy src to dst with the payloads of every GPU-code entry for another architecture zeroed.

    The library's layout is untouched (same size, same offsets, every header intact); the
    zeroed payloads compress to nothing. For a GPU of compute capability keep_sm / 10 the
    CUDA runtime loads the entry built for exactly that architecture (SASS is not portable
    across major versions), so the zeroed ones are never read there. A blob with no entry
    for keep_sm keeps all of its entries (its PTX may be what that GPU would JIT).
    """
    shutil.copyfile(src, dst)
    kept = zeroed = blobs_without = 0
    with open(dst, "r+b") as f:
        m = mmap.mmap(f.fileno(), 0)
        off, size = _section(m, ".nv_fatbin")
        by_blob: dict[int, list] = {}
        for blob, kind, sm, poff, psz in fatbin_entries(m, off, size):
            by_blob.setdefault(blob, []).append((kind, sm, poff, psz))
        for entries in by_blob.values():
            if not any(sm == keep_sm for _, sm, _, _ in entries):
                blobs_without += 1
                kept += sum(psz for *_, psz in entries)
                continue
            for kind, sm, poff, psz in entries:
                if sm == keep_sm:
                    kept += psz
                else:
                    m[poff:poff + psz] = bytes(psz)
                    zeroed += psz
        m.flush()
        m.close()
    return {"kept_bytes": kept, "zeroed_bytes": zeroed, "blobs": len(by_blob), "blobs_without_sm": blobs_without}


# ---- staging --------------------------------------------------------------------------------
def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def _wheel(wheels_dir: Path, req: str) -> Path:
    name, version = req.split("==")
    stem = f"{name.replace('-', '_').lower()}-{version}-"
    cp = "cp" + PY_TAGS[1].replace(".", "")

    def fits(w: Path) -> bool:          # pure wheels, or built for the target Python
        return w.name.lower().startswith(stem) and any(t in w.name for t in ("-py3-", f"-{cp}-", "-abi3-"))
    found = [w for w in wheels_dir.glob("*.whl") if fits(w)]
    if not found:
        log(f"downloading {req} ({cp}, manylinux x86-64)")
        pip("download", "-q", "--no-deps", *PY_TAGS, "-d", str(wheels_dir), req)
        found = [w for w in wheels_dir.glob("*.whl") if fits(w)]
    return found[0]


def install(site: Path, wheels: list[Path]) -> None:
    if site.exists():
        shutil.rmtree(site)
    log(f"installing {', '.join(w.name for w in wheels)} into {site}")
    pip("install", "-q", "--no-deps", "--no-compile", "--target", str(site), *PY_TAGS, *map(str, wheels))


def stage_base(root: Path, wheels_dir: Path, llama_wheel: Path | None, llama_src: Path | None) -> dict:
    """base/: what the bundle build and the HF peers need (no onnxruntime-gpu): llama-cpp-python
    with CUDA (or its trimmed source, to build there), transformers stack, gguf, bitsandbytes."""
    wheels_dir.mkdir(parents=True, exist_ok=True)
    wheels = [_wheel(wheels_dir, r) for r in BASE_WHEELS]
    install(root / "site", wheels + ([llama_wheel] if llama_wheel else []))
    for lib in (root / "site" / "bitsandbytes").glob("libbitsandbytes_*.so"):
        if lib.name not in BNB_KEEP:
            lib.unlink()
    info = {"wheels": [w.name for w in wheels] + ([llama_wheel.name] if llama_wheel else [])}
    if llama_wheel is None:
        trim_llama_source(llama_src, root / "llama-src")
        info["llama"] = "source (built there by bench/gpu_build_llama.sh)"
    return info


def stage_ort(root: Path, wheels_dir: Path, prune_sm: int | None, req: str = "") -> dict:
    """ort/: onnxruntime-gpu (optionally its CUDA provider's GPU code pruned to one architecture)."""
    wheel = _wheel(wheels_dir, req or ORT_WHEEL)
    install(root / "site", [wheel])
    info = {"wheels": [wheel.name]}
    cuda_ep = root / "site" / "onnxruntime" / "capi" / "libonnxruntime_providers_cuda.so"
    if prune_sm and cuda_ep.exists():
        log(f"pruning {cuda_ep.name} to sm_{prune_sm}")
        pruned = cuda_ep.with_suffix(".pruned")
        info["fatbin"] = dict(prune_fatbin(cuda_ep, pruned, prune_sm), keep_sm=prune_sm)
        os.replace(pruned, cuda_ep)
    return info


# Parts of llama-cpp-python's sdist the CUDA build does not read (models/ alone is 75 MB).
LLAMA_SRC_DROP = ("vendor/llama.cpp/models", "vendor/llama.cpp/docs", "vendor/llama.cpp/benches",
                  "vendor/llama.cpp/tests", "vendor/llama.cpp/examples", "vendor/llama.cpp/.github",
                  "vendor/llama.cpp/media", "vendor/llama.cpp/gguf-py", "docs", "tests", "examples")


def trim_llama_source(sdist: Path, out: Path) -> None:
    if sdist is None or not sdist.is_file():
        raise FileNotFoundError("neither a CUDA llama-cpp-python wheel nor its sdist: build or download one")
    tmp = out.parent / ".llama-src"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp, filter="data")
    (top,) = list(tmp.iterdir())
    for rel in LLAMA_SRC_DROP:
        shutil.rmtree(top / rel, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(top, out)
    shutil.rmtree(tmp)


def build_kernels(out: Path) -> list[Path]:
    """The projector libraries of this tree (CPU + CUDA, sm_80..90), built by CMake into out."""
    repo = Path(__file__).resolve().parent.parent
    out.mkdir(parents=True, exist_ok=True)
    newest_src = max(p.stat().st_mtime for p in [repo / "CMakeLists.txt", *(repo / "kernels").glob("*")]
                     if p.suffix in (".h", ".c", ".cpp", ".cu", ".txt"))
    for tree in sorted((repo / "build").glob("*")):     # the editable install's build (make setup)
        libs = [next(tree.rglob(n), None) for n in ("libscops_kernels.so", "libscops_kernels_cuda.so")]
        if all(lib is not None and lib.stat().st_mtime > newest_src for lib in libs):
            log(f"kernel libraries: reusing {tree} (newer than every kernel source)")
            for lib in libs:
                shutil.copy(lib, out / lib.name)
            return [out / lib.name for lib in libs]
    build = out.parent / "kernels-build"
    subprocess.run(["cmake", "-S", str(repo), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-G", "Ninja"],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 1)], check=True,
                   stdout=subprocess.DEVNULL)
    libs = []
    for name in ("libscops_kernels.so", "libscops_kernels_cuda.so"):
        found = next(build.rglob(name), None)
        if found is None:
            raise RuntimeError(f"{name} was not built (is nvcc on PATH?)")
        shutil.copy(found, out / name)
        libs.append(out / name)
    return libs


def kernel_sources_hash() -> str:
    """sha256 over the kernel sources: gpu_check.sh rebuilds there when the tree's differ."""
    repo = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for p in sorted([repo / "CMakeLists.txt", *(repo / "kernels").glob("*")]):
        if p.suffix in (".h", ".c", ".cpp", ".cu", ".txt") and p.is_file():
            h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def pack(stage: Path, kit: Path, name: str, piece_bytes: int = PIECE_BYTES) -> dict:
    """stage/ -> NAME.tar.xz cut into kit/NAME.i/piece, one per device call."""
    payload = kit / f"{name}.tar.xz"
    log(f"packing {stage} (xz -6; minutes for a few hundred MB)")
    children = sorted(c.name for c in stage.iterdir())
    if shutil.which("xz") and shutil.which("tar"):         # multi-threaded xz; same format
        with open(payload, "wb") as f:
            tar = subprocess.Popen(["tar", "-C", str(stage), "-cf", "-", *children], stdout=subprocess.PIPE)
            subprocess.run(["xz", "-6", "-T0", "-c"], stdin=tar.stdout, stdout=f, check=True)
            if tar.wait() != 0:
                raise RuntimeError(f"tar of {stage} failed")
    else:
        with tarfile.open(payload, "w:xz", preset=6) as tar:
            for child in children:
                tar.add(stage / child, arcname=child)
    size = payload.stat().st_size
    n = max(1, -(-size // piece_bytes))
    for old in kit.glob(f"{name}.*"):
        if old.is_dir():
            shutil.rmtree(old)
    pieces = []
    with open(payload, "rb") as f:
        for i in range(1, n + 1):
            d = kit / f"{name}.{i}"
            d.mkdir(parents=True)
            data = f.read(piece_bytes)
            (d / "piece").write_bytes(data)
            pieces.append({"dir": d.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    meta = {"sha256": sha256(payload), "bytes": size, "pieces": pieces}
    payload.unlink()
    return meta


def prepare(args) -> int:
    global PY_TAGS
    PY_TAGS = py_tags(args.python)
    kit = Path(args.kit).resolve()
    kit.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache).expanduser()
    llama = Path(args.llama_wheel) if args.llama_wheel else None
    if llama is None:
        built = Path.home() / ".cache" / "scops" / "gpu" / f"llama-{args.archs.replace(';', '_').replace('-', '_')}"
        llama = next(built.glob("llama_cpp_python-*.whl"), None)
        sdist = next(built.glob("llama_cpp_python-*.tar.gz"), None)
    if llama is None:
        log("no CUDA llama-cpp-python wheel here: the kit carries its trimmed source, built on the device")
    t0 = time.perf_counter()
    meta = {"made": time.strftime("%Y-%m-%d %H:%M:%S"), "kernels_sha256": kernel_sources_hash(), "payloads": {},
            "python": args.python}
    base = cache / "stage-base"
    info = stage_base(base, cache / "wheels", llama, None if llama else sdist)
    log("building the projector libraries (CPU + CUDA)")
    build_kernels(base / "lib")
    meta["payloads"]["base"] = dict(pack(base, kit, "base"), **info)
    ort = cache / "stage-ort"
    info = stage_ort(ort, cache / "wheels", args.prune_sm or None, args.ort)
    meta["payloads"]["ort"] = dict(pack(ort, kit, "ort"), **info)
    meta["prepare_s"] = round(time.perf_counter() - t0)
    (kit / "kit.json").write_text(json.dumps(meta, indent=1))
    (kit / "CALLS.md").write_text(render_plan(meta, kit))
    n = sum(len(p["pieces"]) for p in meta["payloads"].values())
    log(f"{n} pieces; the device calls are in {kit / 'CALLS.md'}")
    return 0


def plan_calls(meta: dict, rel: str) -> list[dict]:
    """The device calls, in order: each carries one piece (and kit.json); work rides along.

    1       base piece(s): probe, unpack, start the benchmark bundle's build in the background
    2..k    onnxruntime-gpu pieces (the build goes on meanwhile)
    k       (last piece) unpack, smoke test, pytest -m gpu
    k+1     wait for the bundle, scops bench --device cuda ...
    """
    calls = []
    base, ort = meta["payloads"]["base"]["pieces"], meta["payloads"]["ort"]["pieces"]
    for i, p in enumerate(base):
        cmd = f"bash bench/gpu_check.sh recv {p['dir']} {rel}/{p['dir']}/piece"
        if i == 0:
            cmd = "bash bench/gpu_check.sh probe && " + cmd
        if i == len(base) - 1:
            cmd += " && bash bench/gpu_check.sh setup base && bash bench/gpu_check.sh start-build"
        calls.append({"command": cmd, "carry": [f"{rel}/{p['dir']}", f"{rel}/kit.json"], "timeout_s": 240})
    for i, p in enumerate(ort):
        cmd = f"bash bench/gpu_check.sh recv {p['dir']} {rel}/{p['dir']}/piece && bash bench/gpu_check.sh status"
        if i == len(ort) - 1:
            cmd += " && bash bench/gpu_check.sh setup ort && bash bench/gpu_check.sh test"
        calls.append({"command": cmd, "carry": [f"{rel}/{p['dir']}", f"{rel}/kit.json"],
                      "timeout_s": 420 if i == len(ort) - 1 else 120})
    calls.append({"command": "bash bench/gpu_check.sh bench", "carry": [], "timeout_s": 600})
    return calls


def render_plan(meta: dict, kit: Path) -> str:
    rel = os.path.relpath(kit, Path(__file__).resolve().parent.parent)
    calls = plan_calls(meta, rel)
    total = sum(p["bytes"] for pl in meta["payloads"].values() for p in pl["pieces"])
    lines = [f"# Device calls for this kit ({len(calls)} calls, {total / 2**20:.1f} MiB of pieces, made {meta['made']})",
             "", "The machine stays warm 30 s after a call: issue each call as soon as the previous one returns.",
             "Each call carries the working tree (~1 MiB) plus what `carry` names.", ""]
    for i, c in enumerate(calls, 1):
        lines += [f"{i}. run(command={json.dumps(c['command'])},",
                  f"       carry={json.dumps(c['carry'])}, timeout_s={c['timeout_s']})", ""]
    lines += ["After the last call: the files come back under files_at (report.md, report.json, latency.png,",
              "pytest-gpu.log, bench.log, build.log). Commit the report under the folder report.json names",
              "(`results_dir`, e.g. bench/results/nvidia-h200_minigpt4-7b/):",
              "    bash bench/gpu_collect.sh FILES_AT", "",
              "A call that stops short leaves /tmp/scops-kit in place while the machine is warm: the same",
              "call again resumes (pieces received, the bundle and finished steps are kept).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scops.bench.gpukit")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="download, build and pack the kit's pieces")
    p.add_argument("--kit", default=".gpukit", help="where the per-call pieces go (ignored by git)")
    p.add_argument("--cache", default="~/.cache/scops/gpukit")
    p.add_argument("--llama-wheel", default=None, help="the CUDA llama-cpp-python wheel (default: the cached one)")
    p.add_argument("--archs", default="90-real", help="CUDA_ARCHS the cached llama wheel was built for")
    p.add_argument("--prune-sm", type=int, default=0,
                   help="zero the onnxruntime CUDA provider's GPU code for other architectures (e.g. 90)")
    p.add_argument("--python", default=DEVICE_PYTHON, help="target Python (a rehearsal kit: this machine's)")
    p.add_argument("--ort", default=ORT_WHEEL, help="the onnxruntime requirement (a rehearsal kit: the CPU one)")
    p.set_defaults(fn=prepare)
    p = sub.add_parser("calls", help="print the device calls' commands, one per line")
    p.add_argument("--kit", default=".gpukit")
    p.set_defaults(fn=lambda a: print("\n".join(c["command"] for c in plan_calls(
        json.loads((Path(a.kit) / "kit.json").read_text()),
        os.path.relpath(Path(a.kit).resolve(), Path(__file__).resolve().parent.parent)))) or 0)
    p = sub.add_parser("plan", help="print the device calls of a prepared kit")
    p.add_argument("--kit", default=".gpukit")
    p.set_defaults(fn=lambda a: print(render_plan(json.loads((Path(a.kit) / "kit.json").read_text()),
                                                   Path(a.kit).resolve())) or 0)
    p = sub.add_parser("piece", help="(device) print the sha256 kit.json expects for a piece dir")
    p.add_argument("kit_json", type=Path)
    p.add_argument("dir")
    p.set_defaults(fn=lambda a: print(next(pc["sha256"] for pl in json.loads(a.kit_json.read_text())["payloads"].values()
                                           for pc in pl["pieces"] if pc["dir"] == a.dir)) or 0)
    p = sub.add_parser("prune-fatbin", help="prune one library's GPU code to one architecture")
    p.add_argument("lib", type=Path)
    p.add_argument("--keep-sm", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(fn=lambda a: print(json.dumps(prune_fatbin(a.lib, a.out, a.keep_sm))) or 0)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
