"""Peak memory and disk of a command, per step of its progress log.

    python -m scops.bench.memwatch [--disk DIR] [--json FILE] -- scops export --from CKPT ...

Runs the command, echoes its stderr, and samples every --interval seconds the resident set
of the command's process tree (/proc/PID/status: RssAnon, the memory that must fit in RAM;
RssFile, mapped file pages the kernel can drop and read again) and, with --disk, the bytes
of every file under DIR (temp files included). Lines like "[3/6] LLM: ..." (scops export's
step lines) start a new step. Prints a markdown table of the peaks per step, the overall
peaks and the command's own peak RSS as the kernel counted it (wait4's ru_maxrss).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

STEP = re.compile(r"^\[(\d+)/(\d+)\] (.*)")
GIB = 2**30


def tree_pids(root: int) -> list[int]:
    """root and its descendants (from /proc/*/stat parent links)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(d))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def rss_of(pid: int) -> tuple[int, int]:
    """(RssAnon, RssFile + RssShmem) in bytes; (0, 0) once the process is gone."""
    anon = file = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                anon = int(line.split()[1]) * 1024
            elif line.startswith(("RssFile:", "RssShmem:")):
                file += int(line.split()[1]) * 1024
    except OSError:
        pass
    return anon, file


def disk_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


class Watch:
    def __init__(self, pid: int, disk: Path | None, interval: float):
        self.pid, self.disk, self.interval = pid, disk, interval
        self.steps = [{"step": "start", "t0": time.time(), "anon": 0, "file": 0, "total": 0, "disk": 0}]
        self.lock = threading.Lock()
        self.done = threading.Event()

    def new_step(self, name: str) -> None:
        with self.lock:
            self.steps.append({"step": name, "t0": time.time(), "anon": 0, "file": 0, "total": 0, "disk": 0})

    def sample(self) -> None:
        anon = file = 0
        for pid in tree_pids(self.pid):
            a, f = rss_of(pid)
            anon, file = anon + a, file + f
        disk = disk_bytes(self.disk) if self.disk else 0
        with self.lock:
            s = self.steps[-1]
            s["anon"], s["file"] = max(s["anon"], anon), max(s["file"], file)
            s["total"], s["disk"] = max(s["total"], anon + file), max(s["disk"], disk)

    def run(self) -> None:
        while not self.done.is_set():
            self.sample()
            self.done.wait(self.interval)


def render(steps: list[dict], t_end: float, maxrss: int, command: str, disk: Path | None) -> str:
    lines = [f"Command: `{command}`", "",
             "| step | s | peak RSS GiB | anon GiB | file-backed GiB |" + (" disk GiB |" if disk else ""),
             "|---|---:|---:|---:|---:|" + ("---:|" if disk else "")]
    for i, s in enumerate(steps):
        end = steps[i + 1]["t0"] if i + 1 < len(steps) else t_end
        row = f"| {s['step'][:70]} | {end - s['t0']:.0f} | {s['total'] / GIB:.2f} | {s['anon'] / GIB:.2f} " \
              f"| {s['file'] / GIB:.2f} |"
        lines.append(row + (f" {s['disk'] / GIB:.2f} |" if disk else ""))
    peak = {k: max(s[k] for s in steps) for k in ("total", "anon", "file", "disk")}
    lines += ["", f"Peak (sampled): RSS {peak['total'] / GIB:.2f} GiB (anon {peak['anon'] / GIB:.2f}, "
              f"file-backed {peak['file'] / GIB:.2f})" + (f", disk under {disk} {peak['disk'] / GIB:.2f} GiB"
                                                           if disk else ""),
              f"Peak RSS as the kernel counted it (ru_maxrss of the command): {maxrss / GIB:.2f} GiB"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scops.bench.memwatch")
    ap.add_argument("--disk", type=Path, default=None, help="also sample the bytes of the files under DIR")
    ap.add_argument("--interval", type=float, default=0.25)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("no command given (put it after --)")
    t_start = time.time()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, bufsize=1)
    watch = Watch(proc.pid, args.disk, args.interval)
    sampler = threading.Thread(target=watch.run, daemon=True)
    sampler.start()
    for line in proc.stderr:
        sys.stderr.write(line)
        m = STEP.match(line.strip())
        if m:
            watch.sample()                     # close the previous step with a fresh sample
            watch.new_step(line.strip())
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    watch.done.set()
    sampler.join()
    t_end = time.time()
    command = " ".join(cmd)
    md = render(watch.steps, t_end, usage.ru_maxrss * 1024, command, args.disk)
    print(md)
    print(f"exit status {proc.returncode}, {t_end - t_start:.0f}s")
    if args.json:
        args.json.write_text(json.dumps({"command": command, "steps": watch.steps, "ru_maxrss": usage.ru_maxrss * 1024,
                                         "exit": proc.returncode, "wall_s": t_end - t_start}, indent=1))
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
