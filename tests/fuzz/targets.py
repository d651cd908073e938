"""Fuzz targets: bytes from anywhere -> the runtime's own decoding path.

Each target takes one input (the bytes of a file or a request body) and runs it through
what the runtime does with such an input: `modalities.KINDS[kind]` decode -> key ->
prepare with the preprocess record a real bundle carries. The contract under test:
bad input raises the runtime's one clear error (`EXPECTED`, one line) and nothing else;
no crash, no hang, no unbounded memory (run.py gives libFuzzer the time and RSS limits).

Used by run.py (atheris, coverage-guided) and by tests/test_fuzz_corpus.py (a replay of
the committed corpus in `make test`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

# The preprocess records of shipped bundles (export/minigpt4.py BLIP2_IMAGE,
# export/bubogpt.py BUBOGPT_IMAGE / BUBOGPT_AUDIO, export/pandagpt.py MODALITIES).
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
SPECS = {
    "image": [{"kind": "image", "size": 224, "resize": "squash", "interpolation": "bicubic",
               "mean": CLIP_MEAN, "std": CLIP_STD},
              {"kind": "image", "size": 224, "resize": "short_side_crop", "interpolation": "bicubic",
               "mean": CLIP_MEAN, "std": CLIP_STD},
              {"kind": "image", "size": 336, "resize": "pad_square", "pad_color": [122, 116, 104],
               "interpolation": "bicubic", "mean": CLIP_MEAN, "std": CLIP_STD}],
    "audio": [{"kind": "audio", "recipe": "imagebind"}, {"kind": "audio", "recipe": "bubogpt"}],
    "video": [{"kind": "video"}, {"kind": "video", "recipe": "lego", "frames": 64, "size": 224, "crop_area": 1.0, "interpolation": "bicubic",
                                  "mean": CLIP_MEAN, "std": CLIP_STD}],
    "thermal": [{"kind": "thermal"}],
    "depth": [{"kind": "depth"}],
    "imu": [{"kind": "imu"}],
}


def _expected():
    from scops.runtime.errors import InputError
    return (InputError,)


def _check_message(e: Exception) -> None:
    msg = str(e)
    if not msg or "\n" in msg:
        raise AssertionError(f"{type(e).__name__} is not one clear line: {msg!r}")


def media_target(kind: str) -> Callable[[bytes], None]:
    def run(data: bytes) -> None:
        import numpy as np

        from scops.runtime.modalities import KINDS
        k = KINDS[kind]
        expected = _expected()
        for spec in SPECS[kind]:
            try:
                decoded = k.decode(data, spec)
                k.key(decoded)
                batch = k.prepare(decoded, spec)
            except expected as e:
                _check_message(e)
                return                      # decoding failed: the same for every spec
            if not isinstance(batch, np.ndarray) or batch.dtype != np.float32 or batch.ndim < 2:
                raise AssertionError(f"{kind}: prepare gave {type(batch).__name__} "
                                     f"{getattr(batch, 'dtype', '')} {getattr(batch, 'shape', '')}")
            if not np.all(np.isfinite(batch)):
                raise AssertionError(f"{kind}: prepared batch holds NaN or inf")
    run.__name__ = f"fuzz_{kind}"
    return run


TARGETS: dict[str, Callable[[bytes], None]] = {k: media_target(k) for k in SPECS}
# Largest input libFuzzer makes per target (bytes): room for a real small file of the kind.
MAX_LEN = {"image": 65536, "audio": 65536, "video": 131072, "thermal": 32768, "depth": 32768, "imu": 65536}


# ---- the manifest reader ---------------------------------------------------------------------------
# A small bundle whose manifest the fuzzer rewrites: every file the runtime checks at open
# (two ONNX graphs, one with external data; a projector; a GGUF) is real but tiny, so a
# mutated manifest reaches the file, external-data, projector and GGUF checks.
_BUNDLE: dict = {}


def _write_mini_bundle(root: Path) -> dict:
    """Write the files of a tiny bundle into `root`; return the manifest that describes them."""
    import gguf
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from safetensors.numpy import save_file

    from scops.runtime.bundle import sha256_file

    def graph(name, inp, out, shape_in, shape_out, weight=None):
        nodes, inits = [helper.make_node("Identity", [inp], [out])], []
        if weight is not None:                       # an initializer the graph keeps in a side file
            inits.append(numpy_helper.from_array(weight, "w"))
            nodes = [helper.make_node("Add", [inp, "w"], [out])]
        g = helper.make_graph(nodes, name, [helper.make_tensor_value_info(inp, TensorProto.FLOAT, shape_in)],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, shape_out)], inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="scops-fuzz")

    vision = graph("vision", "pixel_values", "image_embeds", ["batch", 8], ["batch", 8],
                   weight=np.arange(8, dtype=np.float32))
    onnx.save_model(vision, str(root / "vision.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="vision.onnx.data", size_threshold=0)
    onnx.save_model(graph("qformer", "image_embeds", "query_output", ["batch", 8], ["batch", 8]),
                    str(root / "qformer.onnx"))
    save_file({"fc1.weight": np.ones((16, 8), np.float32), "fc1.bias": np.zeros(16, np.float32)},
              str(root / "projector.safetensors"))
    w = gguf.GGUFWriter(str(root / "llm.gguf"), arch="llama")
    w.add_embedding_length(16)
    w.add_tensor("token_embd.weight", np.zeros((32, 16), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    kinds = {"vision.onnx": "onnx", "vision.onnx.data": "onnx-data", "qformer.onnx": "onnx",
             "projector.safetensors": "safetensors", "llm.gguf": "gguf"}
    files = {n: {"kind": k, "bytes": (root / n).stat().st_size, "sha256": sha256_file(root / n)}
             for n, k in kinds.items()}
    return {
        "schema": 1, "family": "minigpt4",
        "llm": {"file": "llm.gguf", "quant": "F32", "n_embd": 16, "n_vocab": 32, "n_ctx_train": 64},
        "template": {"system": "S", "user": "###Human: {content}", "assistant": "###Assistant: ",
                     "answer": "{answer}", "media": {"image": "<Img><ImageHere></Img>"}, "media_sep": " ",
                     "placeholder": "<ImageHere>", "bos": True, "stop": ["###"]},
        "modalities": {"image": {"preprocess": SPECS["image"][0], "rows": 4, "stages": [
            {"op": "onnx", "file": "vision.onnx", "inputs": {"pixel_values": "pixel_values"},
             "output": "image_embeds"},
            {"op": "onnx", "file": "qformer.onnx", "inputs": {"image_embeds": "image_embeds"},
             "output": "query_output"},
            {"op": "projector", "file": "projector.safetensors", "in_dim": 8, "out_dim": 16, "bias": True}]}},
        "files": files,
    }


def mini_bundle() -> tuple[Path, dict]:
    """(folder, valid manifest) of the tiny bundle, made once per process (on /dev/shm if there)."""
    if not _BUNDLE:
        import atexit
        import shutil
        import tempfile
        shm = Path("/dev/shm")
        root = Path(tempfile.mkdtemp(prefix="scops-fuzz-bundle-", dir=shm if shm.is_dir() else None))
        atexit.register(shutil.rmtree, root, True)
        _BUNDLE.update(root=root, manifest=_write_mini_bundle(root))
    return _BUNDLE["root"], _BUNDLE["manifest"]


def fuzz_manifest(data: bytes) -> None:
    """manifest.json bytes -> open_bundle (contract, files, ONNX external data, projector
    shapes, GGUF header): a Bundle or one BundleError."""
    from scops.runtime.bundle import open_bundle
    from scops.runtime.errors import BundleError
    root, _ = mini_bundle()
    (root / "manifest.json").write_bytes(data)
    try:
        open_bundle(root, verify=False)
    except BundleError as e:
        _check_message(e)


TARGETS["manifest"] = fuzz_manifest
MAX_LEN["manifest"] = 16384


# ---- the OpenAI request parser ---------------------------------------------------------------------
# What `scops serve` does with a chat-completions body before any model work: the pydantic
# models (JSON, Unicode, nesting, types, ranges), the server's limits, the media (decoded
# here under small limits) and the sampling options the runtime takes (GenOptions).
REQUEST_MODALITIES = {"image": {}, "audio": {}}


def _no_fetch(url: str) -> bytes:
    raise AssertionError(f"a remote URL got past the parser with remote media off: {url[:80]!r}")


def fuzz_request(data: bytes) -> None:
    """A request body -> ChatRequest whose options the runtime accepts, or one 4xx ApiError
    whose answer is the OpenAI error body (as the server renders it)."""
    from starlette.responses import JSONResponse

    from scops.runtime.chat import GenOptions
    from scops.runtime.errors import OptionError
    from scops.runtime.openai_api import ApiError, ErrorBody, Limits, decode_media, parse_chat_request, to_api_error
    limits = Limits(max_tokens_cap=64, max_image_pixels=1_000_000, max_audio_seconds=2.0, allow_remote_media=False)
    try:
        try:
            req = parse_chat_request(data, limits, REQUEST_MODALITIES)
            for spec in req.media():
                decode_media(spec, limits, _no_fetch)
            GenOptions.from_kwargs(**req.gen)            # what Conversation.send does with them
        except OptionError as e:
            raise to_api_error(e) from None
    except ApiError as e:
        if not 400 <= e.status < 500:
            raise AssertionError(f"status {e.status} for a bad request: {e.message}") from None
        _check_message(e)
        body = JSONResponse(e.body(), status_code=e.status).body      # what goes on the wire
        err = ErrorBody.model_validate_json(body).error
        if err.message != e.message or not err.type:
            raise AssertionError(f"error body does not carry the error: {body[:200]!r}") from None


TARGETS["request"] = fuzz_request
MAX_LEN["request"] = 65536
