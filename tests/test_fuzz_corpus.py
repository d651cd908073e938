"""A short pass of every fuzz target over its committed corpus and crash files.

Each input must end in the runtime's one clear error or a good result (tests/fuzz/targets.py);
each target runs in its own process, so a native crash, a hang (timeout) or a memory blow-up
(peak RSS) fails its test here instead of taking pytest down. `make fuzz` runs the fuzzer.
"""
from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parent / "fuzz"
sys.path.insert(0, str(FUZZ))
from targets import TARGETS  # noqa: E402

# Generous bounds: the whole corpus of a target takes seconds and ~200 MB here.
TIMEOUT_S = 300
MAX_RSS_MB = 2048


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz_corpus_replays_clean(target):
    files = [p for d in ("corpus", "crashes") for p in (FUZZ / d / target).glob("*")]
    assert files, f"no committed inputs for {target}"
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(FUZZ / "run.py"), "replay", target], capture_output=True, text=True,
                       timeout=TIMEOUT_S, env=env)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert f"{target}: {len(files)} inputs replayed" in r.stdout
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss        # KiB, the largest child so far
    assert peak <= MAX_RSS_MB * 1024 or peak == before, f"{target}: peak RSS {peak >> 10} MB"
