"""Malformed request bodies, generated (hypothesis): random bytes, random JSON (huge and
non-finite numbers, lone surrogates, deep nesting), and valid requests with one field
replaced or removed. The parser only ever raises ApiError with a 4xx; the server answers
each with a 4xx in the OpenAI error shape (or a 200 when the mutation stayed valid),
never a 5xx, and goes on serving."""
from __future__ import annotations

import http.client
import json
import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings

from test_server import running

sys.path.insert(0, str(Path(__file__).resolve().parent / "fuzz"))
from request_bodies import bodies  # noqa: E402
from targets import fuzz_request  # noqa: E402

LIMITS_CAP = 2
BODIES = bodies()


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(BODIES)
def test_parser_raises_only_4xx_api_errors(raw):
    """The `request` fuzz target's contract (tests/fuzz/targets.py): a ChatRequest whose
    options the runtime takes, or one 4xx ApiError whose body is the OpenAI error shape."""
    fuzz_request(raw)


def _post(port: int, raw: bytes) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body=raw, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, data


def test_server_answers_malformed_bodies_with_4xx(bundle):
    from scops.runtime.session import Session
    with Session.open(bundle("Q4_K_M"), n_ctx=512) as session, running(session, max_tokens_cap=LIMITS_CAP) as server:
        seen: dict = {}

        @settings(max_examples=300, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow])
        @given(BODIES)
        def check(raw):
            status, data = _post(server.port, raw)
            seen[status] = seen.get(status, 0) + 1
            assert status < 500, data[:300]
            if status != 200:
                err = json.loads(data)["error"]
                assert 400 <= status < 500 and set(err) == {"message", "type", "param", "code"} and err["message"]
        check()
        assert seen.get(400, 0) > 100, seen                       # the corpus is mostly malformed
        assert server.engine.counts["failed"] == 0
        status, _ = _post(server.port, json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode())
        assert status == 200
