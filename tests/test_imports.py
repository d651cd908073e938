"""The runtime imports and runs a turn without torch (nor transformers, gguf, sentencepiece;
onnx is a runtime dependency since bundles are checked with it before onnxruntime opens them)."""
import subprocess
import sys


def test_runtime_runs_without_torch(bundle, photos, tmp_path):
    from conftest import write_png
    img = write_png(tmp_path / "cat.png", photos["cat"])
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # any import of torch now raises ImportError\n"
        "from scops.runtime.session import Session\n"
        f"s = Session.open({str(bundle('Q4_K_M'))!r})\n"
        f"r = s.chat().send('hi', images=[{str(img)!r}], max_tokens=3, temperature=0).result()\n"
        "heavy = [m for m in ('transformers', 'gguf', 'sentencepiece') if m in sys.modules]\n"
        "print(heavy, r.token_ids); sys.exit(1 if heavy or not r.token_ids else 0)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
