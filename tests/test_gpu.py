"""The GPU path: provider choice and fallbacks, fp16 encoders, pinned splice memory, the
device kit and the GPU benchmark plan.

Tests without a marker run everywhere (the logic, on the CPU); @pytest.mark.gpu ones need an
NVIDIA GPU with onnxruntime-gpu and llama.cpp built with CUDA (bench/gpu_check.sh sets that up
on a lent machine) and are skipped elsewhere.
"""
from __future__ import annotations

import hashlib
import json
import logging
import mmap
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

from scops.bench import gpukit
from scops.kernels import KernelError, PinnedBuffer, Projector, ProjectorSpec, load_library
from scops.kernels import reference as R
from scops.runtime import encode, gpu
from scops.runtime.encode import CPU, CUDA, TRT

REPO = Path(__file__).resolve().parent.parent
HAVE_GPU = bool(gpu.cuda_devices())
GPU_RATIO_KEYS = {"ttft_ms", "decode_tok_s", "decode_vs_llama_cpp", "vs_hf_fp16", "vs_hf_nf4", "vram_peak_gb"}


# -- provider choice (CPU) --------------------------------------------------------------------------
@pytest.fixture
def fake_gpu_machine(monkeypatch):
    """onnxruntime-gpu with TensorRT compiled in, one H200; TensorRT's libraries as the test says."""
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: [TRT, CUDA, CPU])
    monkeypatch.setattr(gpu, "cuda_devices", lambda: ("NVIDIA H200",))
    monkeypatch.setattr(gpu, "preload_cuda_libraries", lambda: ())
    trt = {"present": False}
    monkeypatch.setattr(gpu, "tensorrt_available", lambda: trt["present"])
    return trt


def test_providers_prefer_tensorrt_then_cuda_then_cpu(fake_gpu_machine, monkeypatch):
    assert encode.pick_providers() == (CUDA, CPU)                 # TensorRT's libraries missing
    fake_gpu_machine["present"] = True
    assert encode.pick_providers() == (TRT, CUDA, CPU)
    assert encode.pick_providers((CUDA,)) == (CUDA, CPU)          # CPU stays the last resort
    assert encode.pick_providers((CPU,)) == (CPU,)
    monkeypatch.setattr(gpu, "cuda_devices", lambda: ())          # onnxruntime-gpu on a CPU machine
    assert encode.pick_providers() == (CPU,)


def test_tensorrt_engine_cache_keyed_by_graph_and_gpu(fake_gpu_machine, tmp_path):
    sha = hashlib.sha256(b"vision graph").hexdigest()
    config = encode.provider_config((TRT, CUDA, CPU), sha, tmp_path)
    (trt_name, trt), (cuda_name, cuda), cpu = config
    assert (trt_name, cuda_name, cpu) == (TRT, CUDA, CPU)
    want = tmp_path / "trt" / f"{sha[:16]}-nvidia-h200"
    assert trt["trt_engine_cache_enable"] and Path(trt["trt_engine_cache_path"]) == want and want.is_dir()
    assert cuda["arena_extend_strategy"] == "kSameAsRequested"
    other = encode.provider_config((TRT,), hashlib.sha256(b"q-former").hexdigest(), tmp_path)[0][1]
    assert other["trt_engine_cache_path"] != trt["trt_engine_cache_path"]


def test_gpu_load_failure_falls_back_to_cpu(bundle, monkeypatch, caplog):
    """A GPU provider that cannot start (missing cuDNN, a broken driver): CPU, with a warning."""
    import onnxruntime as ort

    real = ort.InferenceSession

    def picky(path, so=None, providers=None, **kw):
        if any((p if isinstance(p, str) else p[0]) == CUDA for p in providers or ()):
            raise RuntimeError("CUDA failure 999: unknown error\nmore detail")
        return real(path, so, providers=providers, **kw)
    monkeypatch.setattr(ort, "InferenceSession", picky)
    b = bundle("Q4_K_M")
    m = json.loads((b / "manifest.json").read_text())
    record = next(st for st in m["modalities"]["image"]["stages"] if st["op"] == "onnx")
    with caplog.at_level(logging.WARNING, logger="scops"):
        stage = encode.OnnxStage(b / record["file"], record, m["files"][record["file"]], (CUDA, CPU), 1)
    assert stage.backend == CPU
    assert "CUDA failed to load it (CUDA failure 999: unknown error); using the CPU instead" in caplog.text


def test_gpu_run_failure_falls_back_to_cpu(bundle, photos, caplog):
    """A GPU that fails while running a graph: that graph reruns on the CPU, same answer."""
    from scops.runtime.session import Session

    with Session.open(bundle("Q4_K_M"), n_ctx=512, device="cpu", warmup=False) as s:
        stage = s.encoders["image"].base[0]
        ctx = {stage.input_key if hasattr(stage, "input_key") else next(iter(stage.feeds.values())):
               np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)}
        want = stage.run(ctx)

        class Broken:
            def run(self, *a, **k):
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
        stage.sess, stage.backend = Broken(), CUDA
        with caplog.at_level(logging.WARNING, logger="scops"):
            got = stage.run(ctx)
        assert stage.backend == CPU
        np.testing.assert_array_equal(got, want)
        assert "CUDA failed while running (CUDA error: an illegal memory access was encountered); " \
               "falling back to the CPU" in caplog.text

        class InvalidArgument(Exception):      # onnxruntime's name for an input error
            pass

        class Picky:
            def run(self, *a, **k):
                raise InvalidArgument("Got invalid dimensions for input")
        stage.sess, stage.backend = Picky(), CUDA
        with pytest.raises(InvalidArgument):     # bad input: raised as it is, the GPU kept
            stage.run(ctx)
        assert stage.backend == CUDA


@pytest.mark.skipif(HAVE_GPU, reason="checks the no-GPU answers")
def test_cpu_machine_answers(bundle):
    from scops.runtime.errors import BundleError
    from scops.runtime.session import Session

    with pytest.raises(BundleError, match="--device cuda: no NVIDIA GPU is visible"):
        Session.open(bundle("Q4_K_M"), n_ctx=512, device="cuda")
    with pytest.raises(KernelError):
        PinnedBuffer.allocate(1024)
    with Session.open(bundle("Q4_K_M"), n_ctx=512, warmup=False) as s:       # auto on a CPU machine
        line = s.describe_backends()
    assert "vision.onnx CPU" in line and "qformer.onnx CPU" in line and "llama.cpp CPU" in line
    assert "pinned" not in line and s.llm.gpu_layers == 0


def test_cuda_kernels_compile_where_nvcc_is():
    """CI's machine has nvcc: the CUDA projector library must build there (and load without a GPU)."""
    import shutil

    cpu, _ = load_library(cuda=False)
    cu, where = load_library(cuda=True)
    if not (shutil.which("nvcc") or Path("/usr/local/cuda/bin/nvcc").exists()):
        pytest.skip("no nvcc on this machine")
    assert cu is not None, where
    assert cu.scops_cuda_available() == len(gpu.cuda_devices())
    import ctypes
    ptr = ctypes.c_void_p()
    assert cpu.scops_host_alloc(1024, ctypes.byref(ptr)) == 3 and not ptr.value    # SCOPS_E_UNSUPPORTED
    assert cu.scops_host_alloc(0, ctypes.byref(ptr)) == 1                            # invalid size


# -- fp16 encoders (CPU) ------------------------------------------------------------------------------
def _overflow_graph(path: Path) -> Path:
    """y = ((x * 3e4) * 4 + 1) * 1e-5: the middle values pass fp16's 65504, the ends do not."""
    import onnx
    from onnx import TensorProto, helper

    consts = [helper.make_tensor(n, TensorProto.FLOAT, [], [v]) for n, v in
              (("a", 3e4), ("b", 4.0), ("c", 1.0), ("d", 1e-5))]
    nodes = [helper.make_node("Mul", ["x", "a"], ["t1"], name="scale_up"),
             helper.make_node("Mul", ["t1", "b"], ["t2"], name="scale_more"),
             helper.make_node("Add", ["t2", "c"], ["t3"], name="shift"),
             helper.make_node("Mul", ["t3", "d"], ["y"], name="scale_down")]
    g = helper.make_graph(nodes, "overflow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], consts)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_fp16_keeps_overflowing_nodes_in_fp32(tmp_path):
    from scops.export.encoder_precision import convert_fp16, fp16_overflow_nodes, open_stage

    src = _overflow_graph(tmp_path / "g.onnx")
    x = np.random.default_rng(0).uniform(0.5, 1.0, (2, 8)).astype(np.float32)
    hot = fp16_overflow_nodes(src, [{"x": x}])
    assert set(hot) == {"scale_up", "scale_more", "shift", "scale_down"}   # producers and consumers
    want = open_stage(src).run(None, {"x": x})[0]

    def weight_types(path):
        import onnx
        return {t.name: t.data_type for t in onnx.load(str(path)).graph.initializer}
    convert_fp16(src, tmp_path / "plain.onnx")
    convert_fp16(src, tmp_path / "kept.onnx", hot)
    assert set(weight_types(tmp_path / "plain.onnx").values()) == {10}    # FLOAT16 everywhere (a GPU overflows)
    assert set(weight_types(tmp_path / "kept.onnx").values()) == {1}      # FLOAT: the hot chain stayed fp32
    kept = open_stage(tmp_path / "kept.onnx").run(None, {"x": x})[0]
    np.testing.assert_allclose(kept, want, rtol=1e-6)


# -- the device kit (CPU) -------------------------------------------------------------------------
def test_kit_pieces_join_back(tmp_path):
    stage = tmp_path / "stage"
    (stage / "site" / "pkg").mkdir(parents=True)
    payload = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    (stage / "site" / "pkg" / "blob.bin").write_bytes(payload)
    (stage / "lib").mkdir()
    (stage / "lib" / "libx.so").write_bytes(b"\x7fELF" + payload[:1000])
    kit = tmp_path / "kit"
    kit.mkdir()
    meta = gpukit.pack(stage, kit, "base", piece_bytes=100_000)
    assert len(meta["pieces"]) == 4 and all(p["bytes"] <= 100_000 for p in meta["pieces"])
    joined = b"".join((kit / p["dir"] / "piece").read_bytes() for p in meta["pieces"])
    assert hashlib.sha256(joined).hexdigest() == meta["sha256"] and len(joined) == meta["bytes"]
    out = tmp_path / "out"
    with tarfile.open(fileobj=__import__("io").BytesIO(joined), mode="r:xz") as tar:
        tar.extractall(out, filter="data")
    assert (out / "site" / "pkg" / "blob.bin").read_bytes() == payload


def test_kit_plan_fits_the_device_limits(tmp_path):
    meta = {"made": "now", "payloads": {
        "base": {"pieces": [{"dir": "base.1", "bytes": 50 << 20}]},
        "ort": {"pieces": [{"dir": f"ort.{i}", "bytes": 60 << 20} for i in (1, 2, 3)] +
                [{"dir": "ort.4", "bytes": 20 << 20}]}}}
    calls = gpukit.plan_calls(meta, ".gpukit")
    assert len(calls) == 6
    assert calls[0]["command"].startswith("bash bench/gpu_check.sh probe && ")
    assert "setup base" in calls[0]["command"] and "start-build" in calls[0]["command"]
    assert "setup ort" in calls[4]["command"] and calls[4]["command"].endswith("bash bench/gpu_check.sh test")
    assert calls[-1] == {"command": "bash bench/gpu_check.sh bench", "carry": [], "timeout_s": 600}
    for c in calls:
        assert len(c["command"]) <= 2000 and len(c["carry"]) <= 8 and 1 <= c["timeout_s"] <= 600
    text = gpukit.render_plan(meta, REPO / ".gpukit")
    assert "6 calls" in text and "bench/gpu_collect.sh" in text


def test_gpu_check_recv_checks_each_piece(tmp_path):
    piece = tmp_path / "piece"
    piece.write_bytes(b"piece one")
    kitjson = tmp_path / "kit.json"
    kitjson.write_text(json.dumps({"payloads": {"ort": {"pieces": [
        {"dir": "ort.1", "sha256": hashlib.sha256(b"piece one").hexdigest(), "bytes": 9}]}}}))
    env = {"KIT": str(tmp_path / "kit"), "KITJSON": str(kitjson), "PY": "python3", "PATH": "/usr/bin:/bin"}
    ok = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "recv", "ort.1", str(piece)], env=env,
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "kit" / "pieces" / "ort.1").read_bytes() == b"piece one"
    piece.write_bytes(b"piece 0ne")
    bad = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "recv", "ort.1", str(piece)], env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 3 and "sha256" in bad.stderr


def _fatbin_entries(path: Path):
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        off, size = gpukit._section(m, ".nv_fatbin")
        return [(kind, sm, bytes(m[p:p + n])) for _, kind, sm, p, n in gpukit.fatbin_entries(m, off, size)]


def test_prune_fatbin_keeps_one_architecture(tmp_path):
    lib, _ = load_library(cuda=True)
    if lib is None:
        pytest.skip("libscops_kernels_cuda.so not built (no nvcc)")
    src = Path(lib._name)
    before = _fatbin_entries(src)
    assert {sm for _, sm, _ in before} >= {80, 86, 89, 90}        # kernels/CMakeLists.txt's list
    info = gpukit.prune_fatbin(src, tmp_path / "pruned.so", 90)
    after = _fatbin_entries(tmp_path / "pruned.so")
    assert (tmp_path / "pruned.so").stat().st_size == src.stat().st_size
    assert [(k, sm) for k, sm, _ in after] == [(k, sm) for k, sm, _ in before]
    for (_, sm, old), (_, _, new) in zip(before, after):
        assert new == old if sm == 90 else new == bytes(len(old))
    assert info["zeroed_bytes"] == sum(len(p) for _, sm, p in before if sm != 90) > 0
    nothing = gpukit.prune_fatbin(src, tmp_path / "same.so", 75)  # no sm_75 code: every blob kept
    assert nothing["zeroed_bytes"] == 0 and (tmp_path / "same.so").read_bytes() == src.read_bytes()


# -- the GPU benchmark plan (CPU rehearsal) -------------------------------------------------------
def test_gpu_ratios_arithmetic():
    from scops.bench.run import compute_gpu_ratios

    stats = {"scops": {"ttft": {"p50": 30.0}, "decode_tok_s": {"mean": 250.0}, "answer": {"p50": 540.0}},
             "llama-cpp": {"decode_tok_s": {"mean": 260.0}},
             "hf-fp16": {"answer": {"p50": 5400.0}}}
    r = compute_gpu_ratios(stats, {"scops": 6.5e9})
    assert set(r) == GPU_RATIO_KEYS
    assert r["ttft_ms"] == 30.0 and r["decode_tok_s"] == 250.0 and r["vram_peak_gb"] == 6.5
    assert r["decode_vs_llama_cpp"] == pytest.approx(250 / 260) and r["vs_hf_fp16"] == pytest.approx(10.0)
    assert r["vs_hf_nf4"] is None                                  # not run: never invented


def test_gpu_bench_rehearsal_on_cpu(tmp_path, monkeypatch, capsys):
    from scops.runtime.cli import main

    monkeypatch.setenv("SCOPS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert main(["bench", "--device", "cuda", "--rehearse", "--shape", "tiny", "--vs", "hf,llama-cpp",
                 "--reps", "1", "--tokens", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "CPU REHEARSAL of the GPU run" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["rehearsal"] is True and report["device"] == "cpu"
    assert report["results_dir"] == "bench/results/cpu-rehearsal_tiny"
    assert set(report["ratios"]) == GPU_RATIO_KEYS
    assert report["encoder_precision"]["precision"] == "fp16"
    assert report["encoder_precision"]["accuracy"]["cos_min"] >= 0.999
    systems = set(report["stats"]) | set(report["not_measured"])
    assert systems == {"scops", "hf-fp16", "hf-nf4", "llama-cpp"}
    for key in ("ttft_ms", "decode_tok_s", "decode_vs_llama_cpp", "vs_hf_fp16"):
        assert report["ratios"][key] > 0, key
    assert report["ratios"]["vram_peak_gb"] is None                # no NVML on the CPU: not measured
    assert [t["key"] for t in report["targets"]] == ["ttft_ms", "decode_tok_s", "decode_vs_llama_cpp",
                                                      "vs_hf_fp16", "vs_hf_nf4", "vram_peak_gb"]
    assert report["samples"]["scops"][0]["n_tokens"] == 4
    md = (out / "report.md").read_text()
    assert md.startswith("# scops bench: tiny on the CPU") and "CPU REHEARSAL" in md
    assert (out / "latency.png").read_bytes()[:4] == b"\x89PNG"
    refused = subprocess.run(["bash", str(REPO / "bench" / "gpu_collect.sh"), str(out)], capture_output=True,
                             text=True)
    assert refused.returncode != 0 and "rehearsal" in refused.stderr


# -- on a GPU ---------------------------------------------------------------------------------------
gpu_mark = pytest.mark.gpu


@gpu_mark
@pytest.mark.parametrize("rows,in_dim,out_dim,hidden", [(1, 768, 4096, 0), (7, 37, 45, 19), (32, 768, 4096, 0),
                                                        (65, 1024, 4095, 300), (257, 767, 5120, 0)])
def test_cuda_projector_writes_pinned_memory(rows, in_dim, out_dim, hidden):
    from test_kernels import make_weights, make_x, rel_err

    spec = ProjectorSpec(in_dim=in_dim, out_dim=out_dim, hidden_dim=hidden, gelu="erf" if hidden else "none")
    w = make_weights(spec, np.float32, seed=rows)
    x = make_x(rows, in_dim, seed=rows + 1)
    buf = PinnedBuffer.allocate(rows * out_dim + 13)
    try:
        out = buf.array[13:13 + rows * out_dim].reshape(rows, out_dim)   # an offset view, as in a batch
        out[:] = np.nan
        with Projector.create(spec, w, backend="cuda") as proj:
            assert proj.backend == "cuda"
            proj.forward(x, out=out)
        assert np.isfinite(out).all()
        assert rel_err(out, R.project_reference(spec, w, x)) <= 1e-5
    finally:
        buf.close()


@gpu_mark
def test_cuda_projector_device_pointers():
    cupy = pytest.importorskip("cupy")
    import ctypes

    from test_kernels import make_weights, make_x, rel_err

    spec = ProjectorSpec(in_dim=768, out_dim=4095, hidden_dim=0)
    w = make_weights(spec, np.float16)
    x = make_x(33, 768)
    with Projector.create(spec, w, backend="cuda") as proj:
        xd = cupy.asarray(x)
        yd = cupy.full((33, 4095), cupy.nan, dtype=cupy.float32)
        status = proj._lib.scops_projector_forward_device(proj._handle, ctypes.c_void_p(xd.data.ptr), 33,
                                                          ctypes.c_void_p(yd.data.ptr), yd.size)
        assert status == 0
        y = cupy.asnumpy(yd)
        host = proj.forward(x)
    np.testing.assert_array_equal(y, host)
    np_err = rel_err(R.project_numpy_fp32(spec, R.prepare_fp32(spec, w), x), R.project_reference(spec, w, x))
    assert rel_err(y, R.project_reference(spec, w, x)) <= max(2 * np_err, 2 * 2.0**-23)


@gpu_mark
def test_session_runs_every_stage_on_the_gpu(bundle, photos, caplog):
    from scops.runtime.session import Session

    assert CUDA in encode.pick_providers()
    with caplog.at_level(logging.INFO, logger="scops"), Session.open(bundle("Q4_K_M"), n_ctx=512) as s:
        stages = [st for enc in s.encoders.values() for st in enc.base + enc.rest]
        assert all(st.backend in (TRT, CUDA) for st in stages), [st.backend for st in stages]
        assert {p.backend for p in s.projectors.values()} == {"cuda"} and s._pinned is not None
        assert s.llm.gpu_layers == -1 and gpu.llama_devices()
        line = s.describe_backends()
        reply = s.chat().send("What is it?", images=[photos["cat"]], temperature=0, max_tokens=4,
                              ignore_stop=True).result()
    assert "projector cuda (pinned embd)" in line and "layers offloaded" in line
    assert f"backends: {line}" in caplog.text                      # one log line names them all
    assert len(reply.token_ids) == 4


@gpu_mark
def test_image_turn_on_cuda_matches_cpu(bundle, photos):
    """Unquantized GGUF, f32 KV: the greedy answer on the GPU is the CPU's, token for token."""
    from scops.runtime.session import Session

    answers = {}
    for device in ("cpu", "cuda"):
        with Session.open(bundle("F32"), n_ctx=512, kv_type="f32", flash_attn="off", device=device) as s:
            answers[device] = s.chat().send("What is in the picture?", images=[photos["astronaut"]],
                                            temperature=0, max_tokens=8, ignore_stop=True).result().token_ids
    assert answers["cuda"] == answers["cpu"]


@gpu_mark
def test_fp16_encoders_on_cuda_keep_cosine(tiny_ckpt, bundle, tmp_path):
    """fp16 graphs on the CUDA provider vs the fp32 graphs on the CPU: projected rows cos >= 0.999."""
    from safetensors.numpy import load_file

    from scops.export.encoder_precision import row_cosines, sample_photos
    from scops.export.minigpt4 import BLIP2_IMAGE, export_minigpt4
    from scops.runtime.preprocess import preprocess_image

    import onnxruntime as ort

    fp16 = export_minigpt4(str(tiny_ckpt), tmp_path / "fp16", "Q4_K_M", log=lambda s: None, encoder_precision="fp16")
    acc = json.loads((fp16 / "manifest.json").read_text())["encoder_precision"]["accuracy"]
    assert acc["cos_min"] >= 0.999
    fp32 = bundle("Q4_K_M")
    w = load_file(str(fp32 / "projector.safetensors"))
    _, pics = sample_photos()
    px = np.stack([preprocess_image(p, BLIP2_IMAGE) for p in pics])

    def rows(folder, names, providers):
        sessions = [ort.InferenceSession(str(folder / n), providers=providers) for n in names]
        assert sessions[0].get_providers()[0] == providers[0]
        out = []
        for i in range(len(px)):
            x = px[i:i + 1]
            for s in sessions:
                x = s.run(None, {s.get_inputs()[0].name: x})[0]
            out.append(x)
        return np.concatenate(out) @ w["fc1.weight"].T + w["fc1.bias"]
    ref = rows(fp32, ["vision.onnx", "qformer.onnx"], [CPU])
    got = rows(fp16, ["vision.fp16.onnx", "qformer.fp16.onnx"], [CUDA, CPU])
    assert row_cosines(ref, got).min() >= 0.999


@gpu_mark
def test_tensorrt_engines_are_cached(bundle, tmp_path, monkeypatch):
    if not gpu.tensorrt_available():
        pytest.skip("TensorRT's libraries are not installed: the TensorRT provider is not used")
    from scops.runtime.session import Session

    monkeypatch.setenv("SCOPS_CACHE", str(tmp_path))
    with Session.open(bundle("Q4_K_M"), n_ctx=512) as s:
        assert all(st.backend == TRT for enc in s.encoders.values() for st in enc.base + enc.rest)
    engines = list((tmp_path / "trt").rglob("*.engine"))
    assert engines and all(gpu.slug(gpu.cuda_devices()[0]) in e.parent.name for e in engines)
