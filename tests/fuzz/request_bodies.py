"""Generated chat-completions request bodies (hypothesis strategies), malformed mostly:
random bytes, random JSON (huge and non-finite numbers, lone surrogates, deep nesting), and
a valid request with one to three fields replaced or removed.

Used by tests/test_server_fuzz.py (the parser and a live server, a few hundred bodies each)
and by seeds.py (the committed seed corpus of the `request` fuzz target).
"""
from __future__ import annotations

import copy
import json

from hypothesis import strategies as st

SURROGATES = st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff"])
TEXT = st.lists(st.one_of(st.characters(), SURROGATES), max_size=12).map("".join)
NUMBERS = st.one_of(st.integers(min_value=-10**60, max_value=10**60), st.floats(),
                    st.sampled_from([0, 1, -1, 2**31, 2**63, 10**400, 1e308, -0.0]))
LEAF = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT)
JSON = st.recursive(LEAF, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                  st.dictionaries(TEXT, inner, max_size=4)), max_leaves=12)
VALID = {"model": "m", "max_tokens": 2, "temperature": 0.5, "stop": ["###"], "seed": 1, "stream": False,
         "messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": [{"type": "text", "text": "hi"},
                                                   {"type": "image_url", "image_url": {"url": "data:,"}}]},
                      {"role": "assistant", "content": "hello"},
                      {"role": "user", "content": "and?"}]}


def _paths(value, prefix=()):
    yield prefix
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        yield from _paths(v, prefix + (k,))


PATHS = [p for p in _paths(VALID) if p]


@st.composite
def mutated(draw):
    body = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PATHS))
        node = body
        try:
            for k in path[:-1]:
                node = node[k]
            if draw(st.booleans()):
                node[path[-1]] = draw(JSON)
            elif isinstance(node, dict):
                node.pop(path[-1], None)
        except (KeyError, IndexError, TypeError):
            pass
    return body


def encode(value, ascii_only: bool) -> bytes:
    text = json.dumps(value, ensure_ascii=ascii_only, allow_nan=True)
    return text.encode("utf-8", "surrogatepass")             # lone surrogates: invalid UTF-8 bytes


def nested(depth: int, kind: str) -> bytes:
    inner = "[" * depth + "]" * depth if kind == "list" else '{"a":' * depth + "1" + "}" * depth
    return ('{"messages": [{"role": "user", "content": "hi"}], "extra": ' + inner + "}").encode()


def bodies(max_depth: int = 20000):
    return st.one_of(
        st.binary(max_size=200),
        st.builds(encode, JSON, st.booleans()),
        st.builds(encode, mutated(), st.booleans()),
        st.builds(nested, st.integers(100, max_depth), st.sampled_from(["list", "dict"])),
    )


def examples(n: int, max_depth: int = 3000) -> list[bytes]:
    """n distinct bodies, the same ones on every run (derandomized)."""
    from hypothesis import given, settings
    seen: dict = {}

    @settings(max_examples=20 * n, deadline=None, derandomize=True, database=None)
    @given(bodies(max_depth))
    def collect(raw):
        if len(seen) < n:
            seen.setdefault(raw, None)
    collect()
    return list(seen)
