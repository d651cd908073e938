"""Crash-safe writes: an export killed with SIGKILL at a random moment leaves the previous
bundle (or none) intact, never half of one; what killed runs leave behind is removed by the
next run, which says so; a full disk is one clear error and leaves nothing behind.

The kills hit real exports of the tiny checkpoint (`scops export` in a process forked from
one that has imported torch already, so a trial costs the export, not the imports), at a
random step of the export ([k/n] progress lines, then a random delay) or a random time.
"""
from __future__ import annotations

import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

# A pre-imported parent: reads {"out", "quant", "log"} lines, forks `scops export` for each,
# answers "pid N" at once and "exit N" when the child is gone.
ZYGOTE = textwrap.dedent("""
    import json, os, sys
    # the slow imports, once (none of them starts a thread: forking after them is safe)
    import torch, onnx, onnxruntime, llama_cpp, gguf, safetensors.numpy, huggingface_hub, torch.onnx
    from transformers import Blip2Config, Blip2QFormerModel, Blip2VisionModel, InstructBlipQFormerModel
    import scops.export.minigpt4, scops.export.llm_gguf, scops.runtime.cli
    src = sys.argv[1]
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1); os.dup2(fd, 2)
            from scops.runtime.cli import main
            try:
                rc = main(["export", "--family", "minigpt4", "--from", src, "--out", job["out"],
                           "--quant", job["quant"]])
            except BaseException:
                rc = 99
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(rc)
        print("pid", pid, flush=True)
        _, status = os.waitpid(pid, 0)
        print("exit", status, flush=True)
""")


class Exporter:
    """Runs forked exports of `src`; each can be killed at a chosen moment."""

    def __init__(self, src: Path, work: Path):
        self.work = work
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE, str(src)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)

    def _line(self, timeout: float | None = None) -> str | None:
        if timeout is not None and not select.select([self.proc.stdout], [], [], timeout)[0]:
            return None
        line = self.proc.stdout.readline()
        assert line, "export helper died"
        return line.split()

    def run(self, out: Path, quant: str, kill_after: str | None = None, delay: float = 0.0,
            log_name: str = "export.log") -> dict:
        """kill_after: a progress marker ("" = the start) after which, plus `delay` s, SIGKILL."""
        log = self.work / log_name
        log.unlink(missing_ok=True)
        self.proc.stdin.write(json.dumps({"out": str(out), "quant": quant, "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        word, pid = self._line()
        assert word == "pid"
        pid = int(pid)
        killed, status = False, None
        if kill_after is not None:
            while status is None and (kill_after not in (log.read_text() if log.exists() else "")):
                ans = self._line(0.002)            # poll the log every 2 ms
                status = int(ans[1]) if ans else None
            if status is None and (ans := self._line(delay)) is not None:
                status = int(ans[1])
            if status is None:
                os.kill(pid, signal.SIGKILL)
                killed = True
        if status is None:
            word, st = self._line()
            status = int(st)
        return {"killed": killed and os.WIFSIGNALED(status), "rc": os.waitstatus_to_exitcode(status),
                "log": log.read_text()}

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _bundle_state(out: Path) -> str | None:
    """None (no bundle) or the quant of a complete one; fails on anything in between."""
    from scops.runtime.bundle import open_bundle
    if not out.exists():
        return None
    b = open_bundle(out, verify=True)         # every file present with its sha256: complete
    return b.manifest["llm"]["quant"]


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


# Where a kill lands: after a progress line of the export, plus a random delay.
STEPS = ["[1/", "[2/", "[3/", "[4/", "[5/", "[6/"]


def kill_trials(tiny_ckpt, bundle, work: Path, plan: list[tuple[str, float]]) -> dict:
    """One forked export per (marker, delay) of `plan`, killed there, alternating F32 and
    Q4_K_M so the previous bundle and the new one are told apart; every 4th trial starts
    from no bundle. After each kill the target holds no bundle or a complete one (every
    file's sha256 checked); each leftover is later removed by the next export, by name."""
    work.mkdir(parents=True, exist_ok=True)
    out = work / "bundle"
    exp = Exporter(tiny_ckpt, work)
    counts = {"previous intact": 0, "new complete": 0, "no bundle": 0, "finished before the kill": 0}
    seen, said = set(), []
    try:
        for i, (marker, delay) in enumerate(plan + [(None, 0.0)]):    # + one run to the end
            if i % 4 == 0 and marker is not None:
                shutil.rmtree(out, ignore_errors=True)
            elif not out.exists():
                shutil.copytree(bundle("F32"), out)
            before = _bundle_state(out)
            new = ["F32", "Q4_K_M"][i % 2] if marker is not None else "Q4_K_M"
            r = exp.run(out, new, kill_after=marker, delay=delay, log_name=f"trial{i}.log")
            said += [line for line in r["log"].splitlines() if "interrupted export" in line]
            seen |= set(_leftovers(out))
            after = _bundle_state(out)
            if not r["killed"]:
                assert r["rc"] == 0, r["log"]
                assert after == new
                counts["finished before the kill"] += marker is not None
            elif after is None:
                assert before is None, f"trial {i}: the kill lost the previous {before} bundle"
                counts["no bundle"] += 1
            elif after == new and (before != new or "done in" in r["log"]):
                counts["new complete"] += 1
            else:
                assert after == before, f"trial {i}: {after} bundle, expected {before} or {new}"
                counts["previous intact"] += 1
        assert _leftovers(out) == []
        for name in seen:                           # each leftover of a killed run: removed, and said so
            assert f"removed {name}: left beside bundle by an interrupted export" in said, (name, said)
    finally:
        exp.close()
    counts["leftovers removed with a message"] = len(seen)
    return counts


def test_killed_exports_leave_a_usable_state(tiny_ckpt, bundle, tmp_path):
    # one kill in each writing step: ONNX graphs, GGUF, quantization, manifest + rename
    # The tiny model's quantization and manifest steps take milliseconds: a kill there is sent
    # the moment the progress line is read (a random delay let a fast machine finish first).
    rng = random.Random(1)
    plan = [("[2/", rng.uniform(0, 0.3)), ("[4/", rng.uniform(0, 0.3)), ("[5/", 0.0), ("[6/", 0.0)]
    counts = kill_trials(tiny_ckpt, bundle, tmp_path, plan)
    print(counts)
    # the quantization and manifest kills may come too late on a fast machine; the ONNX and
    # GGUF steps take long enough that their kills land, leaving leftovers to clean up
    assert counts["finished before the kill"] <= 2 and counts["leftovers removed with a message"] >= 2


@pytest.mark.slow
def test_twenty_killed_exports_leave_a_usable_state(tiny_ckpt, bundle, tmp_path):
    # 28 kills at a random step + up to 0.5 s; a kill late in the last step may find the export
    # done (counted apart): at least 20 must really interrupt one
    rng = random.Random(20)
    plan = [(rng.choice(STEPS), rng.uniform(0, 0.5)) for _ in range(28)]
    counts = kill_trials(tiny_ckpt, bundle, tmp_path, plan)
    print(counts)
    assert 28 - counts["finished before the kill"] >= 20, counts


def test_stale_partial_from_a_killed_run_is_removed_with_a_message(tmp_path):
    from scops.export.bundle import atomic_dir            # what BundleBuilder writes through
    out = tmp_path / "b"
    stale = tmp_path / ".b.partial-abc123"
    stale.mkdir()
    (stale / "vision.onnx").write_bytes(b"half a file")
    said = []
    with atomic_dir(out, log=said.append) as tmp:
        assert _leftovers(out) == [tmp.name]                 # only its own partial folder now
        (tmp / "x.bin").write_bytes(b"x")
    assert said == ["removed .b.partial-abc123: left beside b by an interrupted export"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"] and (out / "x.bin").read_bytes() == b"x"


def test_a_running_exports_partial_folder_is_left_alone(tmp_path):
    from scops.export.bundle import atomic_dir
    out = tmp_path / "b"
    with atomic_dir(out, log=print) as first:
        (first / "who").write_text("first")
        said = []
        with atomic_dir(out, log=said.append) as second:       # same target, while the first runs
            (second / "who").write_text("second")
        assert said == [] and first.exists()
        assert (out / "who").read_text() == "second"
    assert (out / "who").read_text() == "first"                # the later commit replaced it whole
    assert _leftovers(out) == []


# ---- a full disk ----------------------------------------------------------------------------------
# tmpfs sizes that fill up in different steps of the tiny export: the ONNX graphs, the f16
# intermediate GGUF, the quantized GGUF (ONNX + projector 973 KiB, f16 GGUF 3090 KiB, Q4_K_M
# GGUF 964 KiB: the quantize step needs ~5030 KiB, the GGUF step ~4070 KiB).
DISKS_KIB = {"onnx": 600, "gguf": 3000, "quantize": 4600}


def _full_disk_runner(mounts: dict[Path, int]) -> list[str] | None:
    """A command prefix that runs a program with a tmpfs of the given KiB at each path (in a
    private mount namespace: nothing outside sees them, they end with it); None if not permitted."""
    if not shutil.which("unshare"):
        return None
    script = " && ".join(f"mount -t tmpfs -o size={k}k tmpfs {m}" for m, k in mounts.items()) + ' && exec "$@"'
    for prefix in (["unshare", "--mount", "--propagation", "private"],
                   ["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private"]):
        probe = subprocess.run(prefix + ["sh", "-c", script, "sh", "true"], capture_output=True)
        if probe.returncode == 0:
            return prefix + ["sh", "-c", script, "sh"]
    return None


# Exports onto each small disk, then lists what is left there (inside the namespace).
FULL_DISK_CHILD = textwrap.dedent("""
    import contextlib, io, json, os, sys
    from scops.runtime.cli import main
    src, mounts = sys.argv[1], sys.argv[2:]
    for mount in mounts:
        os.makedirs(f"{mount}/models")
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(["export", "--family", "minigpt4", "--from", src, "--out", f"{mount}/models/tiny",
                       "--quant", "Q4_K_M"])
        st = os.statvfs(mount)
        print("RESULT " + json.dumps({"mount": mount, "rc": rc, "stderr": err.getvalue(),
                                      "left": sorted(os.listdir(f"{mount}/models")),
                                      "free": st.f_bfree * st.f_frsize, "total": st.f_blocks * st.f_frsize}),
              flush=True)
""")


def test_full_disk_is_one_clear_error_and_leaves_nothing(tiny_ckpt, tmp_path):
    mounts = {tmp_path / name: kib for name, kib in DISKS_KIB.items()}
    for m in mounts:
        m.mkdir()
    prefix = _full_disk_runner(mounts)
    if prefix is None:
        pytest.skip("cannot mount a tmpfs here (no mount namespace); the RLIMIT_FSIZE test drives the same path")
    r = subprocess.run(prefix + [sys.executable, "-c", FULL_DISK_CHILD, str(tiny_ckpt), *map(str, mounts)],
                       capture_output=True, text=True, timeout=900)
    results = [json.loads(line[7:]) for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(results) == len(mounts), r.stdout + r.stderr
    steps = []
    for res in results:
        log = res["stderr"]
        assert res["rc"] == 2, log                                # a user error, not a crash
        errors = [line for line in log.splitlines() if line.startswith("scops: error:")]
        assert len(errors) == 1 and "no space left on the disk" in errors[0], log
        assert "Traceback" not in log
        assert res["left"] == [], res                             # no partial folder or temp file left
        assert res["free"] > res["total"] - 64 * 1024             # the space is given back
        steps.append([line for line in log.splitlines() if line.startswith("[")][-1])
    # the disks filled up in different steps of the export
    assert len(set(steps)) == len(steps), steps


@pytest.mark.slow
def test_file_size_limit_is_one_clear_error_and_leaves_nothing(tiny_ckpt, tmp_path):
    """Where no tmpfs can be mounted the same path is driven by RLIMIT_FSIZE (EFBIG)."""
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (300 * 1024, 300 * 1024))
    out = tmp_path / "models" / "tiny"
    out.parent.mkdir()
    r = subprocess.run([sys.executable, "-m", "scops.runtime.cli", "export", "--family", "minigpt4", "--from",
                        str(tiny_ckpt), "--out", str(out), "--quant", "F32"],
                       capture_output=True, text=True, timeout=600, preexec_fn=limit)
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("scops: error:")]
    assert len(errors) == 1 and "the file size limit was reached" in errors[0], r.stderr
    assert list(out.parent.iterdir()) == []
