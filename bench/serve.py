"""`scops bench --serve`: the server under concurrent load, measured from outside.

    scops bench --serve --shape minigpt4-small --out bench-serve

Starts `scops serve` on the shape's bundle in its own process and drives it with the
OpenAI client: for each concurrency c (0 = idle, then 1, 2, 4, ...) c long text streams
run; their aggregate decode tokens/s is measured over `tokens` tokens once all are
decoding, then the time to first token of a short text turn is probed `reps` times while
they go on. Then turn 1 (a new picture + question) against turn 2 (a follow-up in the same
conversation), and a burst of large pictures with the server's RSS sampled before, during
and after. Writes report.md, report.json (`ratios`: decode_4_vs_1, ttft_loaded_vs_idle,
turn2_vs_turn1) and serve.png.
"""
from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .report import Target, check_targets
from .serve_report import write_serve_report  # noqa: F401  (the CLI's entry point)
from .run import describe_machine
from .shapes import SHAPES, ensure_bundle

Log = Callable[[str], None]
LONG_STREAM = "Tell me a long story about the sea."
PROBE = "Say hello."
QUESTION, FOLLOW_UP = "Describe this image in detail.", "What colours stand out?"
N_CTX = 1024
START_TIMEOUT_S = 600        # bundle verification + model load + warm-up of a 7B on a slow disk
TARGETS = (
    Target("decode_4_vs_1", "aggregate decode tok/s at 4 streams >= 2.5x one stream", 2.5, True),
    Target("ttft_loaded_vs_idle", "p50 TTFT of a text turn while 4 streams decode <= 2x idle", 2.0, False),
    Target("turn2_vs_turn1", "turn-2 TTFT <= 0.15x turn 1 on the same picture", 0.15, False),
)


@dataclass(frozen=True)
class ServeBenchOptions:
    shape: str
    concurrency: tuple = (1, 2, 4)
    reps: int = 0                   # 0: the shape's default
    tokens: int = 0                 # tokens per stream in the decode window (0: shape default)
    threads: int = 0
    burst: tuple = (0, 0, 0)        # requests, pictures per request, side in pixels (0: shape default)
    encoder_precision: str | None = None   # None: int8 (onnxruntime's fast CPU path)
    out: Path = Path("bench-serve")

    def resolved(self) -> "ServeBenchOptions":
        s = SHAPES[self.shape]
        burst = self.burst if all(self.burst) else ((2, 2, 1000) if self.shape == "tiny" else (10, 8, 4000))
        return ServeBenchOptions(self.shape, tuple(sorted(set(self.concurrency))), self.reps or s.reps,
                                 self.tokens or s.tokens, self.threads or os.cpu_count() or 1, burst,
                                 self.encoder_precision or "int8", Path(self.out))


# ---- the server process -----------------------------------------------------------------
class ServerProcess:
    def __init__(self, bundle: Path, parallel: int, queue: int, threads: int, log_path: Path):
        with socket.socket() as s:                       # a free port (the server binds it right after)
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "scops.runtime.cli", "serve", str(bundle), "--port", str(self.port),
               "--parallel", str(parallel), "--queue", str(queue), "--n-ctx", str(N_CTX), "--threads", str(threads),
               "--max-tokens-cap", str(N_CTX), "--no-verify"]
        self.command = " ".join(["scops"] + cmd[3:])
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> None:
        import urllib.request
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"scops serve exited with {self.proc.returncode} (see {self.log.name})")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("scops serve did not come up")

    def health(self) -> dict:
        import urllib.request
        with urllib.request.urlopen(self.url + "/health", timeout=10) as r:
            return json.loads(r.read())

    def rss(self) -> dict:
        """Resident and peak resident bytes of the server process (Linux /proc)."""
        out = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
        return out

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# ---- clients ------------------------------------------------------------------------------
class Stream(threading.Thread):
    """One streaming request; records the arrival time of every content chunk."""

    def __init__(self, client, messages: list, max_tokens: int):
        super().__init__(daemon=True)
        self.client, self.messages, self.max_tokens = client, messages, max_tokens
        self.times: list[float] = []
        self.text = ""
        self.server: dict = {}              # the finish chunk's `scops` object (server-side timings)
        self.t0 = self.error = None
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            self.t0 = time.perf_counter()
            stream = self.client.chat.completions.create(
                model="bench", messages=self.messages, max_tokens=self.max_tokens, temperature=0, stream=True,
                extra_body={"ignore_eos": True})
            with stream:
                for chunk in stream:
                    if chunk.choices and (chunk.choices[0].delta.content or chunk.choices[0].finish_reason):
                        self.times.append(time.perf_counter())
                        self.text += chunk.choices[0].delta.content or ""
                    if chunk.choices and chunk.choices[0].finish_reason and chunk.model_extra:
                        self.server = chunk.model_extra.get("scops") or {}
                    if self._halt.is_set():
                        break
        except Exception as e:              # reported by the caller
            self.error = e

    def ttft(self) -> float:
        return (self.times[0] - self.t0) * 1e3

    def stop(self) -> None:
        self._halt.set()


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.005)


def probe(client, messages: list) -> Stream:
    s = Stream(client, messages, 1)
    s.run()
    if s.error is not None or not s.times:
        raise RuntimeError(f"probe failed: {s.error}")
    return s


def probe_ttft(client, messages: list) -> float:
    return probe(client, messages).ttft()


def server_side(streams: list) -> dict:
    """p50 of what the server says about requests: its own TTFT (from the request's arrival at
    the scheduler), time queued for a slot, prefill, and the cells it decoded."""
    out = {}
    for key in ("arrival_ttft_ms", "ttft_ms", "queue_ms", "prefill_ms", "encode_ms", "preprocess_ms"):
        v = [s.server.get("timings", {}).get(key) for s in streams]
        if v and all(x is not None for x in v):
            out[key] = float(np.percentile(v, 50))
    cells = [s.server.get("decoded_cells") for s in streams]
    if cells and all(c is not None for c in cells):
        out["decoded_cells"] = float(np.percentile(cells, 50))
    return out


def measure_level(client, c: int, o: ServeBenchOptions, log: Log) -> dict:
    """c long streams: aggregate decode tok/s over `tokens` tokens each, then TTFT probes."""
    need = o.tokens + 2 * o.reps * 40 + 64             # room for the probes' duration
    streams = [Stream(client, [{"role": "user", "content": f"{LONG_STREAM} ({i})"}], min(need, N_CTX - 128))
               for i in range(c)]
    for s in streams:
        s.start()
    try:
        wait_for(lambda: all(s.times or s.error for s in streams), 600, f"{c} streams to start")
        for s in streams:
            if s.error is not None:
                raise RuntimeError(f"stream failed: {s.error}")
        marks = [len(s.times) for s in streams]
        t0 = time.perf_counter()
        wait_for(lambda: all(len(s.times) >= m + o.tokens or not s.is_alive() for s, m in zip(streams, marks)),
                 600, f"{o.tokens} tokens of {c} streams")
        ends = [s.times[min(m + o.tokens, len(s.times)) - 1] for s, m in zip(streams, marks)]
        got = [min(o.tokens, len(s.times) - m) for s, m in zip(streams, marks)]
        agg = sum(got) / (max(ends) - t0) if c else 0.0
        # A probe sent as soon as the previous one's first token came would arrive just as the
        # streams' next step starts (that token ends the step the probe had to itself), and wait
        # all of it; a user's request comes at any point of the server's step: each probe first
        # waits a random fraction of the streams' time per token.
        rng, period = np.random.default_rng(c), token_interval(streams)
        probes = []
        for r in range(o.reps):
            time.sleep(rng.uniform(0.0, period))
            probes.append(probe(client, [{"role": "user", "content": f"{PROBE} ({c}.{r})"}]))
        ttft = [p.ttft() for p in probes]
        if c and not all(s.is_alive() for s in streams):
            log("  warning: a stream ended before the probes did (raise --tokens headroom)")
    finally:
        for s in streams:
            s.stop()
        for s in streams:
            s.join(timeout=60)
    return {"concurrency": c, "decode_tok_s": agg, "per_stream_tok_s": agg / c if c else 0.0,
            "ttft_ms": ttft, "ttft_p50": float(np.percentile(ttft, 50)), "ttft_p90": float(np.percentile(ttft, 90)),
            "server_p50": server_side(probes)}


def token_interval(streams: list) -> float:
    """Median seconds between two tokens of the streams (the server's step period); 0 for none."""
    gaps = [b - a for s in streams for a, b in zip(s.times, s.times[1:])]
    return float(np.median(gaps)) if gaps else 0.0


def data_url(rgb: np.ndarray) -> str:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def measure_turns(client, reps: int, tokens: int) -> dict:
    """Turn 1: a new picture + question; turn 2: a text follow-up in the same conversation."""
    from .peers import bench_images
    t1, t2, s1, s2 = [], [], [], []
    for img in bench_images(reps + 1):               # the first is a warm-up
        user = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(img)}},
                                            {"type": "text", "text": QUESTION}]}
        first = Stream(client, [user], tokens)
        first.run()
        second = Stream(client, [user, {"role": "assistant", "content": first.text},
                                 {"role": "user", "content": FOLLOW_UP}], 1)
        second.run()
        if first.error or second.error:
            raise RuntimeError(f"turn failed: {first.error or second.error}")
        t1.append(first.ttft())
        t2.append(second.ttft())
        s1.append(first)
        s2.append(second)
    t1, t2 = t1[1:], t2[1:]
    return {"turn1_ttft_ms": t1, "turn2_ttft_ms": t2, "turn1_p50": float(np.percentile(t1, 50)),
            "turn2_p50": float(np.percentile(t2, 50)), "turn1_server_p50": server_side(s1[1:]),
            "turn2_server_p50": server_side(s2[1:])}


def burst_pictures(k: int, side: int) -> list[str]:
    """k distinct, well-compressing side x side PNGs (a few KB each on the wire)."""
    from PIL import Image
    out = []
    for i in range(k):
        rng = np.random.default_rng(i)
        tile = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
        out.append(data_url(np.asarray(Image.fromarray(tile).resize((side, side), Image.NEAREST))))
    return out


def measure_burst(server: ServerProcess, client_factory, burst: tuple, log: Log) -> dict:
    """`requests` concurrent requests of `pictures` side x side PNGs; server RSS sampled."""
    requests, pictures, side = burst
    urls = burst_pictures(pictures, side)
    content = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": "?"}]
    wire = sum(len(u) for u in urls)
    time.sleep(1.0)
    idle = server.rss()["VmRSS"]
    samples, statuses, done = [], [], threading.Event()

    def sample():
        while not done.is_set():
            samples.append(server.rss()["VmRSS"])
            time.sleep(0.02)

    def ask():
        import openai
        try:
            client_factory().chat.completions.create(model="bench", messages=[{"role": "user", "content": content}],
                                                     max_tokens=2)
            statuses.append(200)
        except openai.APIStatusError as e:
            statuses.append(e.status_code)
        except Exception as e:
            statuses.append(repr(e))
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=ask) for _ in range(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    time.sleep(2.0)
    done.set()
    sampler.join()
    after = server.rss()["VmRSS"]
    peak = max(samples + [after])
    log(f"burst: {requests} x {pictures} x {side}^2: idle {idle / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB, "
        f"after {after / 2**20:.0f} MiB, {wall:.1f} s, statuses {sorted(set(map(str, statuses)))}")
    return {"requests": requests, "pictures": pictures, "side": side, "wire_bytes_per_request": wire,
            "idle_rss": idle, "peak_rss": peak, "after_rss": after, "peak_over_idle": peak - idle,
            "after_over_idle": after - idle, "wall_s": wall, "statuses": [str(s) for s in statuses]}


# ---- the run -------------------------------------------------------------------------------
def measure_ceiling(bundle: Path, o: ServeBenchOptions, parallel: int, log: Log) -> dict:
    """Raw batched llama_decode on the server's GGUF and context, in its own process (bench/ceiling.py)."""
    gguf = bundle / json.loads((bundle / "manifest.json").read_text())["llm"]["file"]
    ks = ",".join(str(k) for k in (1,) + tuple(o.concurrency) if k < parallel)
    cmd = [sys.executable, "-m", "scops.bench.ceiling", str(gguf), "--threads", str(o.threads), "--n-seq",
           str(parallel), "--n-ctx", str(N_CTX), "--ks", ",".join(sorted(set(ks.split(",")), key=int)),
           "--reps", str(max(5, 2 * o.reps))]
    log("raw llama_decode ceiling: " + " ".join(["python"] + cmd[1:]))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"the ceiling run failed: {out.stderr.strip()[-2000:]}")
    c = json.loads(out.stdout.strip().splitlines()[-1])
    log("  " + ", ".join(f"{k} seq: {c['step_ms_p50'][k]:.1f} ms/step = {v:.1f} tok/s" for k, v in c["tok_s"].items()))
    return c


def run_serve_bench(o: ServeBenchOptions, log: Log) -> dict:
    import openai
    o = o.resolved()
    t0 = time.perf_counter()
    _, bundle = ensure_bundle(SHAPES[o.shape], o.encoder_precision, log)
    parallel = max(o.concurrency) + 1                   # the probe needs a slot of its own
    o.out.mkdir(parents=True, exist_ok=True)
    ceiling = measure_ceiling(bundle, o, parallel, log)
    server = ServerProcess(bundle, parallel, max(o.burst[0], 8), o.threads, o.out / "serve.log")
    log(f"{server.command}")
    try:
        server.wait_ready()

        def client_factory():
            return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)
        client = client_factory()
        log("warm-up")
        probe_ttft(client, [{"role": "user", "content": "warm up"}])
        levels = []
        for c in (0,) + o.concurrency:
            before = server.health()
            level = measure_level(client, c, o, log)
            after = server.health()
            # steps of the streams' tokens that a probe cut short (runtime/batch.py), of all steps
            level["steps"] = after["steps"] - before["steps"]
            level["steps_cut_short"] = after["steps_cut_short"] - before["steps_cut_short"]
            levels.append(level)
            log(f"{c} streams: {level['decode_tok_s']:.1f} tok/s aggregate, probe TTFT p50 {level['ttft_p50']:.0f} ms")
        log(f"turns: {o.reps} repetitions (+1 warm-up) of a picture + question, then a follow-up")
        turns = measure_turns(client, o.reps, o.tokens)
        log(f"turn 1 TTFT p50 {turns['turn1_p50']:.0f} ms, turn 2 {turns['turn2_p50']:.0f} ms")
        burst = measure_burst(server, client_factory, o.burst, log)
    finally:
        server.stop()
    by_c = {lv["concurrency"]: lv for lv in levels}
    one, four = by_c.get(1), by_c.get(4)
    ratios = {
        "decode_4_vs_1": four["decode_tok_s"] / one["decode_tok_s"] if one and four else None,
        "ttft_loaded_vs_idle": four["ttft_p50"] / by_c[0]["ttft_p50"] if four else None,
        "turn2_vs_turn1": turns["turn2_p50"] / turns["turn1_p50"],
    }
    return {"shape": o.shape, "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(o).items()},
            "machine": describe_machine(), "bundle": str(bundle), "server_command": server.command,
            "parallel": parallel, "ceiling": ceiling, "levels": levels, "turns": turns, "burst": burst, "ratios": ratios,
            "targets": check_targets(ratios, TARGETS), "wall_s": time.perf_counter() - t0}
