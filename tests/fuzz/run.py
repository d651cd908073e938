"""Fuzz the runtime's decoders with atheris (libFuzzer, coverage-guided), or replay the corpus.

    python tests/fuzz/run.py fuzz image --seconds 600     # one target; new inputs -> build/fuzz/image/
    python tests/fuzz/run.py all --seconds 600            # every target, one after another
    python tests/fuzz/run.py replay [image audio ...]     # every committed input, no atheris needed

Committed inputs: tests/fuzz/corpus/<target>/ (seeds from seeds.py plus inputs the fuzzer
found worth keeping) and tests/fuzz/crashes/<target>/ (each input that once crashed, hung or
blew memory: a regression file). libFuzzer writes what it finds under build/fuzz/<target>/
(corpus/, crash-*/timeout-*/oom-* artifacts and fuzz.log); copy what matters into the
committed folders. A summary line per target (executions, crashes) goes to build/fuzz/summary.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

from targets import MAX_LEN, TARGETS  # noqa: E402

CORPUS = HERE / "corpus"
CRASHES = HERE / "crashes"
WORK = ROOT / "build" / "fuzz"
# Limits an input must stay under: a hang is an input slower than TIMEOUT_S, unbounded
# memory is a process over RSS_MB (the decoders' own caps: 50 MP images, 10 min audio...).
TIMEOUT_S = 30
RSS_MB = 4096


def inputs(target: str) -> list[Path]:
    return sorted(p for d in (CORPUS / target, CRASHES / target) if d.is_dir()
                  for p in d.iterdir() if p.is_file())


def replay(targets: list[str]) -> int:
    """Run every committed input of each target; print one line per failure; 1 if any."""
    failed = 0
    for name in targets:
        fn = TARGETS[name]
        files = inputs(name)
        t0 = time.perf_counter()
        for p in files:
            try:
                fn(p.read_bytes())
            except Exception as e:       # anything but the runtime's one clear error
                failed += 1
                print(f"FAIL {name} {p.relative_to(ROOT)}: {type(e).__name__}: {e}".splitlines()[0])
        print(f"{name}: {len(files)} inputs replayed in {time.perf_counter() - t0:.1f} s", flush=True)
    return 1 if failed else 0


def _instrument_module(atheris, mod) -> None:
    """Patch coverage into every function (and method) defined in `mod`; nested functions
    are code constants of their parents and are patched with them."""
    import inspect
    for obj in list(vars(mod).values()):
        obj = getattr(obj, "__wrapped__", obj)            # lru_cache and friends
        if inspect.isfunction(obj) and obj.__module__ == mod.__name__:
            atheris.instrument_func(obj)
        elif inspect.isclass(obj) and obj.__module__ == mod.__name__:
            for member in vars(obj).values():
                if inspect.isfunction(member):
                    atheris.instrument_func(member)


def fuzz_one(name: str, seconds: int, extra: list[str]) -> None:
    """In this process: atheris over `name` (exits when libFuzzer does)."""
    import atheris

    # Coverage: Pillow's format parsers are Python (instrumented as they are imported); the
    # runtime's own modules come through the editable install's import hook, which
    # instrument_imports cannot see through, so their functions are patched in place.
    # Native decoders (libpng, libsndfile, FFmpeg) are not instrumented: their callers are.
    with atheris.instrument_imports(include=["PIL", "soundfile", "av", "jsonschema"]):
        import PIL.Image
        PIL.Image.init()                               # every format plugin
        import av  # noqa: F401
        import jsonschema  # noqa: F401
        import soundfile  # noqa: F401
    import scops.runtime.audio
    import scops.runtime.bundle
    import scops.runtime.contract
    import scops.runtime.gguf_check
    import scops.runtime.media
    import scops.runtime.modalities
    import scops.runtime.openai_api
    import scops.runtime.preprocess
    import scops.runtime.video
    for mod in (scops.runtime.video, scops.runtime.audio, scops.runtime.bundle, scops.runtime.contract, scops.runtime.gguf_check,
                scops.runtime.media, scops.runtime.modalities, scops.runtime.preprocess, scops.runtime.openai_api):
        _instrument_module(atheris, mod)
    fn = TARGETS[name]
    work = WORK / name
    (work / "corpus").mkdir(parents=True, exist_ok=True)
    (work / "artifacts").mkdir(parents=True, exist_ok=True)
    args = [sys.argv[0], f"-max_total_time={seconds}", f"-timeout={TIMEOUT_S}", f"-rss_limit_mb={RSS_MB}",
            f"-max_len={MAX_LEN[name]}", f"-artifact_prefix={work / 'artifacts'}/", "-print_final_stats=1",
            *extra, str(work / "corpus"), str(CORPUS / name)]
    if (CRASHES / name).is_dir():
        args.append(str(CRASHES / name))
    atheris.Setup(args, fn)
    atheris.Fuzz()


def _executions(text: str) -> int:
    """Executions of one libFuzzer run from its log (final stats, else its last status line)."""
    final = re.findall(r"stat::number_of_executed_units:\s*(\d+)", text)
    if final:
        return int(final[-1])
    lines = re.findall(r"^#(\d+)\s", text, re.M)
    return int(lines[-1]) if lines else 0


def _one_thread_env() -> dict:
    """One BLAS/OpenMP thread: inputs are small, and a thread pool per matmul only costs."""
    return {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def fuzz_child(name: str, seconds: int, extra: list[str]) -> dict:
    """One target for `seconds` in child processes: a crash (an artifact) ends a child, the
    next one resumes from the grown corpus until the time is spent. Log + summary row."""
    work = WORK / name
    work.mkdir(parents=True, exist_ok=True)
    log = work / "fuzz.log"
    log.write_text("")
    t0 = time.time()
    runs, execs, codes = 0, 0, []
    while (left := int(seconds - (time.time() - t0))) >= 5 or runs == 0:
        start = log.stat().st_size
        with open(log, "a") as f:
            rc = subprocess.call([sys.executable, __file__, "_one", name, "--seconds", str(max(left, 1)), "--",
                                  *extra], stdout=f, stderr=subprocess.STDOUT, env=_one_thread_env())
        with open(log, errors="replace") as f:
            f.seek(start)
            execs += _executions(f.read())
        runs, codes = runs + 1, codes + [rc]
        if rc == 0:
            break
    artifacts = sorted(p.name for p in (work / "artifacts").iterdir()) if (work / "artifacts").is_dir() else []
    row = {"target": name, "seconds": round(time.time() - t0), "executions": execs, "runs": runs,
           "exit_codes": codes, "artifacts": artifacts, "log": str(log.relative_to(ROOT))}
    with open(WORK / "summary.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []     # after --: libFuzzer flags
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["fuzz", "all", "replay", "_one"])
    ap.add_argument("targets", nargs="*", help=f"of: {', '.join(TARGETS)} (default: all)")
    ap.add_argument("--seconds", type=int, default=600, help="time budget per target")
    a = ap.parse_args(argv)
    names = a.targets or list(TARGETS)
    for n in names:
        if n not in TARGETS:
            ap.error(f"unknown target {n!r} (targets: {', '.join(TARGETS)})")
    if a.mode == "replay":
        return replay(names)
    if a.mode == "_one":
        fuzz_one(names[0], a.seconds, extra)
        return 0
    WORK.mkdir(parents=True, exist_ok=True)
    rows = [fuzz_child(n, a.seconds, extra) for n in names]
    return 1 if any(r["artifacts"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
