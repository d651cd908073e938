"""Q4_K_M against F32 (teacher-forced top-1 agreement), and the CLI as a user runs it."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from conftest import write_png

Q = "What is in this picture?"
N = 48
# Measured on the tiny fixture (2 layers, width 256, random weights): 0.79-0.94 across
# photos; a wrong splice or a broken quantization drops it to chance (~0.01).
MIN_TOP1_AGREEMENT = 0.6


def teacher_forced_argmax(session, conv, image, tokens):
    """argmax of the logits at the prompt's end and after each of `tokens`."""
    from scops.runtime.chat import _fill_from
    from scops.runtime.template import Message
    conv.reset()
    refs, _ = conv._encode({"images": [image]}, Q)
    cells = conv._cells([Message("user", Q, refs)])
    llm = session.llm
    llm.sync(cells, _fill_from(session, conv._media))
    out = [int(np.argmax(llm.logits()))]
    for t in tokens[:-1]:
        llm.decode_tokens([t], True)
        out.append(int(np.argmax(llm.logits())))
    return np.array(out)


def test_q4_k_m_agrees_with_f32_at_most_positions(bundle, photos):
    from scops.runtime.session import Session
    rates = []
    with Session.open(bundle("F32"), kv_type="f32", flash_attn="off", n_ctx=512) as f32, \
            Session.open(bundle("Q4_K_M"), n_ctx=512) as q4:
        for name in ("cat", "astronaut", "coffee"):
            reply = f32.chat().send(Q, images=[photos[name]], temperature=0, max_tokens=N, ignore_stop=True).result()
            a = teacher_forced_argmax(f32, f32.chat(), photos[name], reply.token_ids)
            b = teacher_forced_argmax(q4, q4.chat(), photos[name], reply.token_ids)
            assert list(a) == reply.token_ids           # F32 teacher forcing reproduces its own greedy run
            rates.append(float(np.mean(a == b)))
    print(f"Q4_K_M vs F32 top-1 agreement over {N} teacher-forced positions: {rates}")
    assert min(rates) >= MIN_TOP1_AGREEMENT


def _cli(*args, timeout=300, **kw):
    return subprocess.run([sys.executable, "-m", "scops.runtime.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, **kw)


def test_cli_run_json_and_info(bundle, photos, tmp_path):
    b = bundle("Q4_K_M")
    img = write_png(tmp_path / "cat.png", photos["cat"])
    r = _cli("run", b, "--image", img, "--prompt", Q, "--max-tokens", "8", "--temperature", "0", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) >= {"text", "token_ids", "timings"}
    assert 1 <= len(out["token_ids"]) <= 8
    assert set(out["timings"]) >= {"preprocess_ms", "encode_ms", "prefill_ms", "ttft_ms", "decode_tok_s"}
    from scops.runtime.session import Session
    with Session.open(b) as s:
        api = s.chat().send(Q, images=[img], temperature=0, max_tokens=8).result()
    assert api.token_ids == out["token_ids"] and api.text == out["text"]
    r = _cli("info", b)
    assert r.returncode == 0 and "minigpt4" in r.stdout and "llm.Q4_K_M.gguf" in r.stdout
    assert "max abs diff" in r.stdout


def test_cli_chat_session(bundle, photos, tmp_path):
    img = write_png(tmp_path / "cat.png", photos["cat"])
    script = f"/image {img}\n{Q}\nand then?\n/reset\nhello\n/quit\n"
    r = _cli("chat", bundle("Q4_K_M"), "--max-tokens", "6", "--temperature", "0", input=script)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("ttft") == 3 and "(new conversation)" in r.stderr


def test_cli_export_is_atomic_and_reports_bad_source(tiny_ckpt, tmp_path):
    out = tmp_path / "b"
    r = _cli("export", "--from", tmp_path / "missing", "--family", "minigpt4", "--out", out)
    assert r.returncode == 2 and "no such folder" in r.stderr and not out.exists()
    r = _cli("export", "--from", tiny_ckpt, "--family", "minigpt4", "--out", out, "--quant", "Q8_0")
    assert r.returncode == 0, r.stderr
    assert "max abs diff" in r.stderr and (out / "llm.Q8_0.gguf").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]    # no partial dirs left


def test_demo_builds_once_and_answers(tmp_path):
    r = _cli("demo", "--cache", tmp_path)
    assert r.returncode == 0, r.stderr
    assert "answer:" in r.stdout and "gibberish" in r.stdout and "ttft" in r.stdout
    assert "first run" in r.stderr
    r = _cli("demo", "--cache", tmp_path)
    assert r.returncode == 0 and "first run" not in r.stderr


def test_log_lines_go_to_the_stderr_of_the_moment(monkeypatch):
    """The CLI's log handler looks sys.stderr up per record: a captured stream that was closed
    since (pytest's, once its test ended) is never written to again."""
    import io
    import logging

    from scops.runtime.cli import StderrHandler, install_log_handler
    logger = install_log_handler()
    assert any(isinstance(h, StderrHandler) for h in logger.handlers)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        first, second = io.StringIO(), io.StringIO()
        monkeypatch.setattr("sys.stderr", first)
        logger.info("one")
        first.close()
        monkeypatch.setattr("sys.stderr", second)
        logger.info("two")                      # a handler bound to `first` would fail here
    finally:
        logger.setLevel(level)
    assert second.getvalue() == "scops: two\n"
