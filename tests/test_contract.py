"""The bundle contract at load: crafted bundles whose manifest hashes match are refused by
scops itself, with one clear error, before onnxruntime or llama.cpp sees a byte."""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from scops.runtime.bundle import open_bundle
from scops.runtime.errors import BundleError


@pytest.fixture(scope="module")
def good(bundle):
    return bundle("Q4_K_M")


def craft(src, dst, mutate):
    """Copy a bundle, let `mutate(dir, manifest)` change it, then re-hash every listed file
    (a crafted bundle is self-consistent: only scops' own checks can refuse it)."""
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    mutate(dst, m)
    for name, entry in m["files"].items():
        p = dst / name
        if p.is_file() and not p.is_symlink() and "/" not in name and name not in ("..", "."):
            entry["bytes"] = p.stat().st_size
            entry["sha256"] = hashlib.sha256(p.read_bytes()).hexdigest()
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def refused(path, match):
    with pytest.raises(BundleError, match=match):
        open_bundle(path)


def test_the_good_bundle_opens(good):
    assert open_bundle(good).family == "minigpt4"


@pytest.mark.parametrize("name, match", [("../llm.gguf", "not a plain file name"), ("/etc/passwd", "not a plain file name"),
                                         (".hidden", "not a plain file name")])
def test_paths_that_leave_the_bundle(good, tmp_path, name, match):
    def mutate(d, m):
        m["files"][name] = m["files"].pop(m["llm"]["file"])
        m["llm"]["file"] = name
    refused(craft(good, tmp_path / "b", mutate), match)


def test_a_symlink_in_the_bundle(good, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"

    def mutate(d, m):
        shutil.copy(d / "projector.safetensors", outside)
        (d / "projector.safetensors").unlink()
        (d / "projector.safetensors").symlink_to(outside)
    refused(craft(good, tmp_path / "b", mutate), "symlink")


def test_onnx_external_data_outside_the_bundle(good, tmp_path):
    import onnx
    from onnx import TensorProto

    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(64, dtype=np.float32).tobytes())

    def mutate(d, m):
        model = onnx.load(str(d / "qformer.onnx"))
        init = model.graph.initializer[0]
        init.ClearField("raw_data")
        init.data_location = TensorProto.EXTERNAL
        del init.external_data[:]
        init.external_data.extend([onnx.StringStringEntryProto(key="location", value="../secret.bin"),
                                   onnx.StringStringEntryProto(key="offset", value="0"),
                                   onnx.StringStringEntryProto(key="length", value="256")])
        onnx.save(model, str(d / "qformer.onnx"))
    refused(craft(good, tmp_path / "b", mutate), "points at external data '../secret.bin'")


def _gguf_header(path) -> tuple[int, int, int]:
    with open(path, "rb") as f:
        magic, version, n_tensors, n_kv = struct.unpack("<4sIQQ", f.read(24))
    return version, n_tensors, n_kv


def _patch(path, offset: int, fmt: str, value) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


@pytest.mark.parametrize("case, match", [
    ("tensor count", "tensors"),
    ("kv count", "metadata keys"),
    ("truncated", "lies outside the file|truncated"),
    ("magic", "not a GGUF file"),
    ("huge array", "array of"),
])
def test_crafted_gguf_is_refused_before_llama_cpp(good, tmp_path, case, match):
    def mutate(d, m):
        g = d / m["llm"]["file"]
        if case == "tensor count":
            _patch(g, 8, "<Q", 1 << 40)
        elif case == "kv count":
            _patch(g, 16, "<Q", 1 << 40)
        elif case == "truncated":
            data = g.read_bytes()
            g.write_bytes(data[: len(data) * 2 // 3])
        elif case == "magic":
            _patch(g, 0, "<4s", b"GGML")
        else:                                   # the token list's length: 2^60 strings
            data = g.read_bytes()
            key = b"tokenizer.ggml.tokens"
            at = data.index(key) + len(key) + 4 + 4        # key, then value type (ARRAY), item type (STRING)
            _patch(g, at, "<Q", 1 << 60)
    refused(craft(good, tmp_path / "b", mutate), match)


@pytest.mark.parametrize("path, value, match", [
    (("modalities", "image", "rows"), 10 ** 9, "modalities.image.rows"),
    (("llm", "n_embd"), 10 ** 7, "llm.n_embd"),
    (("llm", "n_ctx_train"), 1 << 40, "llm.n_ctx_train"),
    (("modalities", "image", "stages", 2, "in_dim"), -1, r"stages\[2\]"),
    (("schema",), 99, "schema 99 not supported"),
])
def test_absurd_numbers(good, tmp_path, path, value, match):
    def mutate(d, m):
        target = m
        for k in path[:-1]:
            target = target[k]
        target[path[-1]] = value
    refused(craft(good, tmp_path / "b", mutate), match)


def test_projector_shapes_must_match_the_manifest(good, tmp_path):
    def mutate(d, m):
        m["modalities"]["image"]["stages"][-1]["in_dim"] = 48
    refused(craft(good, tmp_path / "b", mutate), r"fc1.weight is \[256, 64\], manifest says \[256, 48\]")


def test_an_unknown_stage_op(good, tmp_path):
    def mutate(d, m):
        m["modalities"]["image"]["stages"].insert(1, {"op": "exec", "input": "a", "output": "b"})
    refused(craft(good, tmp_path / "b", mutate), r"modalities.image.stages\[1\]")


@pytest.mark.parametrize("text, match", [("{", "malformed JSON"), ("[" * 100000 + "]" * 100000, "malformed JSON"),
                                         ("[]", "is not of type 'object'")])
def test_manifest_that_is_not_one(good, tmp_path, text, match):
    def mutate(d, m):
        pass
    b = craft(good, tmp_path / "b", mutate)
    (b / "manifest.json").write_text(text)
    refused(b, match)


def test_cli_says_one_line_and_exits_2(good, tmp_path):
    def mutate(d, m):
        m["llm"]["n_vocab"] = -5
    b = craft(good, tmp_path / "b", mutate)
    r = subprocess.run([sys.executable, "-m", "scops.runtime.cli", "info", str(b)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "llm.n_vocab" in r.stderr


def test_ggml_type_table_equals_gguf_py():
    from gguf import GGML_QUANT_SIZES

    from scops.runtime.gguf_check import GGML_TYPE_SIZES
    assert GGML_TYPE_SIZES == {t.value: tuple(v) for t, v in GGML_QUANT_SIZES.items()}


def test_audio_recipes_named_in_the_contract_are_the_runtimes():
    from scops.runtime.audio import RECIPES
    from scops.runtime.contract import AUDIO_RECIPES
    assert set(AUDIO_RECIPES) == set(RECIPES)


def test_an_unknown_audio_recipe_is_refused_at_open(good, tmp_path):
    def mutate(d, m):
        m["modalities"]["audio"] = dict(m["modalities"]["image"], preprocess={"kind": "audio", "recipe": "whisper"})
    refused(craft(good, tmp_path / "b", mutate), "modalities.audio.preprocess.recipe")
