"""One family registry read everywhere; exact-by-default F32 bundles; hub ids; an export
that cannot proceed says why in one line, naming the file, and leaves nothing behind."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reference import MiniGPT4Reference, minigpt4_prompt
from scops.runtime.families import BY_NAME, FAMILIES, FIXTURES, markdown_table

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_every_surface_reads_the_registry():
    from scops.runtime.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "cmd")
    export = sub.choices["export"]
    family_arg = next(a for a in export._actions if a.dest == "family")
    assert list(family_arg.choices) == [f.name for f in FAMILIES]
    assert set(FIXTURES) == {name for f in FAMILIES for name, _ in f.fixtures}
    assert markdown_table() in (ROOT / "README.md").read_text()        # the README's table is the registry's
    r = cli("scops.export.fixtures", "--help")
    assert all(name in r.stdout for name in FIXTURES)
    r = cli("scops.runtime.cli", "families")
    assert r.returncode == 0
    for f in FAMILIES:
        assert f.name in r.stdout and all(n in r.stdout for rf in f.release for n in rf.names)


def test_registry_entries_resolve():
    for f in FAMILIES:
        assert callable(f.export_fn())
        assert f.template()["placeholder"] in "".join(f.template()["media"].values())
    assert BY_NAME["minigpt4"].template("minigpt4_llama2")["special"] == ["<s>"]


def test_f32_bundle_is_exact_by_default(bundle, tiny_ckpt, photos, tmp_path):
    """`scops run` on an F32 bundle: f32 KV + flash attention off unless told otherwise, so its
    greedy tokens follow PyTorch's for the whole answer (with f16 K/V they part after ~a dozen)."""
    import json

    from conftest import write_png
    from scops.runtime.session import SessionOptions, resolve_kv

    assert resolve_kv(SessionOptions(), "F32") == ("f32", "off")
    assert resolve_kv(SessionOptions(), "Q4_K_M") == ("f16", "auto")
    assert resolve_kv(SessionOptions(kv_type="f16"), "F32") == ("f16", "auto")
    png = write_png(tmp_path / "cat.png", photos["cat"])
    n = 32
    r = cli("scops.runtime.cli", "run", bundle("F32"), "--image", png, "--prompt", "What is this?", "--temperature",
            "0", "--max-tokens", n, "--json", "--n-ctx", 1024)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)["token_ids"]
    want = MiniGPT4Reference(tiny_ckpt).generate(minigpt4_prompt([("What is this?", None)]), photos["cat"], n)
    assert got == want[: len(got)] and len(got) >= 16


def test_hub_id_from_the_local_cache_and_offline_error(tmp_path):
    """A hub id resolves through huggingface_hub's cache (here: offline, a cache laid out as the
    hub writes it); an id that is not cached names the files to download instead."""
    from scops.export.fixtures_minigpt4 import build_minigpt4_llama2_tiny

    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--scops--minigpt4-llama2-tiny"
    build_minigpt4_llama2_tiny(repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    r = cli("scops.runtime.cli", "export", "--from", "scops/minigpt4-llama2-tiny", "--family", "minigpt4",
            "--out", tmp_path / "b", "--quant", "F32", env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "b" / "manifest.json").is_file()
    r = cli("scops.runtime.cli", "export", "--from", "someone/not-cached", "--family", "minigpt4",
            "--out", tmp_path / "c", env=env)
    assert r.returncode == 2 and "not in the local Hugging Face cache" in r.stderr
    assert "eva_vit_g.pth" in r.stderr and "prerained_minigpt4_7b.pth" in r.stderr
    assert not (tmp_path / "c").exists()


class Payload:
    """A pickle that would run code when loaded without weights_only."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/scops-pickle-ran",))


@pytest.mark.parametrize("case, match", [
    ("missing", "none of prerained_minigpt4_7b.pth"),
    ("truncated", "prerained_minigpt4_7b.pth: truncated or not a torch checkpoint"),
    ("not a state dict", "prerained_minigpt4_7b.pth: holds a list, not a state dict"),
    ("code", "prerained_minigpt4_7b.pth: holds Python objects other than tensors"),
    ("wrong keys", "prerained_minigpt4_7b.pth: not a MiniGPT-4 stage-2 checkpoint: missing llama_proj.weight"),
    ("wrong shapes", "llama_proj writes 128 wide rows"),
    ("eva not eva", "eva_vit_g.pth: not an EVA ViT state dict"),
])
def test_bad_release_files_are_one_line_errors(tmp_path_factory, case, match):
    import shutil

    from scops.export.fixtures_minigpt4 import build_minigpt4_release_tiny

    base = tmp_path_factory.getbasetemp() / "release-base"
    if not base.exists():
        build_minigpt4_release_tiny(base)
    src = tmp_path_factory.mktemp("bad") / "src"
    shutil.copytree(base, src)
    stage2 = src / "prerained_minigpt4_7b.pth"
    if case == "missing":
        stage2.unlink()
    elif case == "truncated":
        stage2.write_bytes(stage2.read_bytes()[:300])
    elif case == "not a state dict":
        torch.save([1, 2, 3], stage2)
    elif case == "code":
        stage2.write_bytes(pickle.dumps({"model": Payload()}))
    elif case == "wrong keys":
        torch.save({"model": {"proj.weight": torch.zeros(2, 2)}}, stage2)
    elif case == "wrong shapes":
        torch.save({"model": {"llama_proj.weight": torch.zeros(128, 128), "llama_proj.bias": torch.zeros(128)}},
                   stage2)
    else:
        torch.save({"blocks.0.weight": torch.zeros(2)}, src / "eva_vit_g.pth")
    out = src.parent / "out"
    r = cli("scops.runtime.cli", "export", "--from", src, "--family", "minigpt4", "--out", out)
    assert r.returncode == 2, r.stderr
    *progress, error = r.stderr.strip().splitlines()          # progress lines, then one error line
    assert error.startswith("scops: error: ") and match in error, r.stderr
    assert all(not line.startswith("scops: ") for line in progress) and "Traceback" not in r.stderr
    assert not out.exists() and not list(src.parent.glob(".out.partial-*"))
    assert not Path("/tmp/scops-pickle-ran").exists()
