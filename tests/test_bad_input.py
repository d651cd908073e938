"""Bad input gets one clear error and leaves the session (and every file) intact."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import write_png

Q = "What is in this picture?"


@pytest.fixture(scope="module")
def session(bundle):
    from scops.runtime.session import Session
    s = Session.open(bundle("Q4_K_M"), n_ctx=256)
    yield s
    s.close()


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, photos):
    d = tmp_path_factory.mktemp("bad")
    jpeg = io.BytesIO()
    Image.fromarray(photos["cat"]).save(jpeg, format="JPEG")
    files = {
        "corrupt": (d / "corrupt.jpg", np.random.default_rng(0).bytes(5000)),
        "truncated": (d / "truncated.jpg", jpeg.getvalue()[: len(jpeg.getvalue()) // 3]),
        "empty": (d / "empty.png", b""),
        "text": (d / "notes.png", b"this is a text file, not a picture\n" * 20),
    }
    for path, data in files.values():
        path.write_bytes(data)
    bomb = d / "bomb.png"        # 12000 x 12000 = 144 MP of zeros: ~140 KB compressed
    Image.new("L", (12000, 12000)).save(bomb, optimize=True)
    out = {k: v[0] for k, v in files.items()}
    out["bomb"], out["missing"], out["directory"] = bomb, d / "nope.png", d
    return out


EXPECT = {"corrupt": "not an image", "truncated": "corrupt or truncated", "empty": "empty file",
          "text": "not an image", "bomb": "over the 50 MP limit", "missing": "cannot read",
          "directory": "is a directory"}


def test_bad_images_are_clear_errors_and_session_survives(session, bad_files, photos):
    from scops.runtime.errors import InputError
    good = session.chat().send(Q, images=[photos["cat"]], temperature=0, max_tokens=6, ignore_stop=True).result()
    for name, path in bad_files.items():
        conv = session.chat()
        with pytest.raises(InputError, match=EXPECT[name]) as e:
            conv.send(Q, images=[path])
        assert "\n" not in str(e.value)
        assert conv.messages == []
    again = session.chat().send(Q, images=[photos["cat"]], temperature=0, max_tokens=6, ignore_stop=True).result()
    assert again.token_ids == good.token_ids


def test_prompt_longer_than_context(session, photos):
    from scops.runtime.errors import PromptTooLong
    conv = session.chat()
    with pytest.raises(PromptTooLong, match="context holds 256"):
        conv.send("tell me more " * 200, images=[photos["cat"]])
    assert conv.messages == []
    reply = conv.send(Q, images=[photos["cat"]], temperature=0, max_tokens=4).result()
    assert reply.finish_reason in ("stop", "length")


def test_generation_stops_at_a_full_context(session, photos):
    reply = session.chat().send(Q, images=[photos["cat"]], temperature=0, max_tokens=1000,
                                ignore_stop=True).result()
    assert reply.finish_reason == "length"
    assert len(session.llm.cells) <= 256


@pytest.fixture()
def bundle_copy(bundle, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(bundle("Q4_K_M"), dst)
    return dst


def _flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    (lambda b: _flip_byte(b / "projector.safetensors", 200), "fails its sha256"),
    (lambda b: _flip_byte(b / "vision.onnx", 1000), "fails its sha256"),
    (lambda b: (b / "qformer.onnx").unlink(), "missing file qformer.onnx"),
    (lambda b: (b / "llm.Q4_K_M.gguf").write_bytes(b"GGUF"), "tampered or truncated"),
    (lambda b: (b / "manifest.json").write_text("{not json"), "malformed JSON"),
    (lambda b: (b / "manifest.json").unlink(), "no manifest.json"),
])
def test_damaged_bundle_is_refused(bundle_copy, damage, message):
    from scops.runtime.errors import BundleError
    from scops.runtime.session import Session
    damage(bundle_copy)
    before = sorted((p.name, p.stat().st_size) for p in bundle_copy.iterdir())
    with pytest.raises(BundleError, match=message):
        Session.open(bundle_copy)
    assert sorted((p.name, p.stat().st_size) for p in bundle_copy.iterdir()) == before


def test_manifest_pointing_outside_the_bundle_is_refused(bundle_copy):
    from scops.runtime.bundle import open_bundle
    from scops.runtime.errors import BundleError
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["files"]["../evil.onnx"] = m["files"].pop("vision.onnx")
    m["modalities"]["image"]["stages"][0]["file"] = "../evil.onnx"
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="'../evil.onnx' is not a plain file name of the bundle"):
        open_bundle(bundle_copy)


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "scops.runtime.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def test_cli_reports_bad_input_in_one_line(bundle, bad_files, bundle_copy, photos, tmp_path):
    b = bundle("Q4_K_M")
    _flip_byte(bundle_copy / "projector.safetensors", 200)
    cases = [
        (b, "--image", bad_files["corrupt"], "not an image"),
        (b, "--image", bad_files["bomb"], "50 MP limit"),
        (b, "--image", bad_files["empty"], "empty file"),
        (bundle_copy, "--image", write_png(tmp_path / "cat.png", photos["cat"]), "sha256"),
        (tmp_path / "no-bundle", "--image", bad_files["corrupt"], "not a bundle directory"),
    ]
    for bdir, flag, img, msg in cases:
        r = _cli("run", bdir, flag, img, "--prompt", Q, "--max-tokens", "4")
        assert r.returncode == 2, r.stderr
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("scops: error:")]
        assert len(lines) == 1 and msg in lines[0], r.stderr
        assert "Traceback" not in r.stderr
    r = _cli("run", b, "--prompt", "hi " * 3000, "--n-ctx", "256", "--max-tokens", "4")
    assert r.returncode == 2 and "context holds 256" in r.stderr
