"""Linking the answer's phrases to the detector's labels: BuboGPT's match.py, offline.

The original (MatchModule) sends gpt-3.5-turbo a system prompt, six worked examples as
`<List>[...]</List><Text>...</Text>` -> "span - label" lines, then the answer and the list of
labels GroundingDINO returned; it keeps a line when its label is in the list and its span is
found (lower-cased) in the answer, and highlights spans left to right without overlaps.

scops asks the bundle's own LLM instead (greedy, in a llama.cpp context of its own on the
same loaded model, so the chat's KV cache is never touched; the few-shot prefix is decoded
once per session), rendered in the bundle's chat markup. When that output gives no valid
pair, a deterministic matcher links labels to words of the answer: whole words,
case-insensitive, a label's plural forms too, multi-word labels as a phrase, then a
multi-word label's single words (the head noun first).
"""
from __future__ import annotations

import ctypes
import re
import threading
from dataclasses import dataclass

from .llm import run_graph

# match.py MatchModule.system_prompt and examples, verbatim (the prompt format is the fact).
SYSTEM = ("You are a helpful assistant. Now I will give you a list of entities and give you a "
          "paragraph or sentence. you need to first extract the entity given in the text and then"
          "find the corresponding entity having similar or identical meanings in the given list. "
          "Find all the pairs.Are you clear? let us think step by step. "
          "The extracted entities must come from the given text and the corresponding entity must "
          "come from the given list. If multiple entities can be linked to the same span of text or vice versa, "
          "just keep one and do not merge them.Here is an example: <List>['dog', 'sheepdog', 'grass', "
          "'chase sheepdog', 'field', 'field park', 'grassy', 'corgi', 'brown dog', 'brown', 'park']</List> "
          "<Text>A brown dog running in the grassy field</Text>The answer is: brown dog — brown dog \n "
          "grassy field — field")
EXAMPLES = (
    ("<List>['dog', 'sheepdog', 'grass', 'chase sheepdog', 'field', 'field park', 'grassy', 'corgi', 'brown dog', "
     "'brown', 'park']</List><Text>A brown dog running in the grassy field</Text>",
     "brown dog - brown dog\ngrassy field - field"),
    ("<List>['man', 'ride', 'bicycle', 'red', 'passenger train', 'track']</List>"
     "<Text>A man riding a bicycle next to a red passenger train on the tracks.</Text>",
     "man - man\nbicycle - bicycle\nred passenger train - passenger train\ntracks - track"),
    ("<List>['horse', 'herd', 'dust', 'grassy', 'field']</List>"
     "<Text>The image shows a large herd of wild horses running across a wide, open field . "
     "There are many horses running in different directions, with some running towards the camera "
     "and others running towards the edge of the field. "
     "The horses are brown and white, with some having manes and tails</Text>",
     "herd - herd\nwild horses - horse\nfield - field"),
    ("<List>['man', 'plate platter', 'sandwich', 'tablening table', 'saucer', 'coffee coffee cup', 'coffee', "
     "'bean chip fry', 'chip fry', 'coffee cup', 'bean', 'food', 'table', 'restaurant']</List>"
     "<Text>The image shows a man sitting at a table , surrounded by a large amount of food and drinks . There is "
     "a chicken sandwich on the table, as well as a bowl of soup, potato wedges, and several fried potatoes. The "
     "man is holding a spoon, which he is expected to use to eat one of the wedges or possibly a piece of the "
     "chicken sandwich. The other items on the table, such as drinks and a bowl of soup, appear to be for those "
     "accompanying the man at the table. The scene takes place in a dining establishment , likely a restaurant , "
     "based on the presence of a spoon and food items on the table, along with a tablecloth and table setting. "
     "Additionally, the presence of several chairs and the overall setup suggest this is a formal, sit-down "
     "setting rather than a fast food or take-out restaurant. The amount of food on the table suggests that this "
     "is a hearty, satisfying meal, providing a range of flavors and textures that satisfy the palate.</Text>",
     "man - man\ntable - table\nfood - food\nchicken sandwich - sandwich\nrestaurant - restaurant\n"
     "fried potatoes - chip fry\ndrinks - coffee"),
    ("<List>['bacon', 'silverware utensil', 'fork', 'coffee', 'table dinning table', 'plate platter', 'beverage', "
     "'napkin', 'bread french toast pan', 'pine cone', 'coffee cup cup mug', 'fruit', 'breakfast food fruit', "
     "'bacon', 'gravy', 'bread pancake']</List>"
     "<Text>The image presents a delicious breakfast setting on a wooden dining table. The main course is a white "
     "plate with French toast and bacon . Adding to the meal are a bottle of maple syrup and a cup of coffee , both "
     "placed next to the plate. The table is set with a fork , a knife, and a spoon, all arranged neatly around "
     "the plate. There are also a few apples scattered across the table, possibly serving as a healthy addition to "
     "the meal. Overall, the scene is inviting and warmly lit, making the breakfast look especially "
     "appetizing.</Text>",
     "wooden dinning table - table dinning table\nfork - fork\ncoffee - coffee\napples - fruit\n"
     "white plate - plate platter\nfrench toast - bread french toast pan\nbacon - bacon"),
    ("<List>['woman', 'canopy', 'man', 'dog pet', 'dog', 'canopy', 'bicycle', 'person', 'leash', "
     "'dog pet', 'leash', 'stall', 'person woman', 'dog pet', 'city street road', 'street scene']</List>"
     "<Text>The image captures a lively street scene with several people walking and riding bikes. "
     "There are two bicycles in the picture, one located in the middle of the scene and the other towards "
     "the right side. Among the people, some are walking close to the bicycles, while others are scattered"
     "throughout the scene. In addition to the bicycles and people, there are four dogs in the picture, "
     "adding to the liveliness of the scene. The dogs are walking around the street, mingling with the "
     "pedestrians and bikers. The street is bustling with activity, as people, bikes, and dogs all "
     "share the space and enjoy the day.</Text>",
     "street scene - street scene\nthe street - city street road\nbicycles - bicycle\nfour dogs - dog\n"
     "people - person"),
)


@dataclass(frozen=True)
class Match:
    span: tuple[int, int]      # [start, end) in the answer
    label: str                 # one of the detector's labels


def query(labels: list[str], answer: str) -> str:
    """The user message: the label list as Python prints a list of str, then the answer."""
    return f"<List>{labels!r}</List><Text>{answer}</Text>"


def render_prompt(template: dict, labels: list[str], answer: str) -> tuple[str, str]:
    """(few-shot prefix, this answer's suffix) in the bundle's chat markup."""
    user, assistant = template["user"], template["assistant"]
    reply = template.get("answer", " {answer}")
    prefix = SYSTEM + "".join(user.format(content=q) + assistant + reply.format(answer=a) for q, a in EXAMPLES)
    return prefix, user.format(content=query(labels, answer)) + assistant


def parse(output: str, labels: list[str], answer: str) -> list[Match]:
    """match.py's parsing: 'span - label' lines, lower-cased; kept when the label is known and
    the span occurs in the answer; then left to right without overlaps (the highlight pass)."""
    known = {lab.lower(): lab for lab in labels}
    low = answer.lower()
    found = []
    for line in output.split("\n"):
        if " - " not in line:
            continue
        name, ref = (p.strip().lower() for p in line.split(" - ", 1))
        if not name or ref not in known:
            continue
        at = low.find(name)
        if at >= 0:
            found.append(Match((at, at + len(name)), known[ref]))
    return _left_to_right(found)


def _left_to_right(found: list[Match], rank=None) -> list[Match]:
    """Earliest first, then longest, then the lower rank; spans never overlap."""
    rank = rank or [0] * len(found)
    out, end = [], 0
    order = sorted(range(len(found)), key=lambda i: (found[i].span[0], -found[i].span[1], rank[i]))
    for m in (found[i] for i in order):
        if m.span[0] >= end:
            out.append(m)
            end = m.span[1]
    return out


def _word_forms(word: str) -> str:
    """A regex for a word and its plural: dog/dogs, box/boxes, berry/berries, the same with any case."""
    w = re.escape(word)
    if word.endswith("y") and len(word) > 2 and word[-2] not in "aeiou":
        return f"(?:{w}|{re.escape(word[:-1])}ies)"
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return f"(?:{w}|{w}es)"
    return f"(?:{w}|{w}s)"


def _phrase_pattern(words: list[str]) -> re.Pattern:
    """Whole words only (no match inside 'hotdog' or 'doghouse'), the last word in any number."""
    body = r"\s+".join([re.escape(w) for w in words[:-1]] + [_word_forms(words[-1])])
    return re.compile(rf"(?<![\w-]){body}(?![\w-])", re.IGNORECASE)


# Words a label may hold that name nothing: BERT's markers (the detector decodes them when
# they score) and English function words.
_NOT_NAMES = {"[cls]", "[sep]", "[pad]", "[unk]", "a", "an", "the", "of", "and", "or", "in", "on", "with", "to"}


def _candidates(label: str) -> list[list[str]]:
    """Word sequences to look for, best first: each comma-separated part of the label (the
    detector joins caption parts with ','), then each part's words, last (the head noun) first."""
    parts = [[w for w in re.findall(r"\[?[\w'-]+\]?", p.lower()) if w not in _NOT_NAMES]
             for p in label.split(",")]
    parts = [p for p in parts if p]
    singles = [[w] for p in parts if len(p) > 1 for w in reversed(p)]
    return parts + singles


def fallback(labels: list[str], answer: str) -> list[Match]:
    """Deterministic linking: for each label, the first of its candidates (whole part, then
    single words) that occurs in the answer as whole words, any case, singular or plural;
    every occurrence counts; longest and earliest first, no overlaps."""
    found, rank = [], []
    for label in dict.fromkeys(labels):
        cands = _candidates(label)
        if not cands:
            continue
        whole = len(label.split(",")) == 1 and len(cands[0]) == len(re.findall(r"[\w'-]+", label))
        for i, words in enumerate(cands):
            for h in _phrase_pattern(words).finditer(answer):
                found.append(Match(h.span(), label))
                rank.append(0 if (i == 0 and whole) else 1 + (len(words) == 1))   # exact label first
    return _left_to_right(found, rank)


class LlmMatcher:
    """The bundle's LLM in a second llama.cpp context: few-shot prefix decoded once, then per
    answer: truncate to the prefix, decode the answer's turn, greedy until the stop string."""

    # the answer's turn may take this many tokens (BuboGPT's app answers up to 300 new tokens)
    ROOM = 1024

    def __init__(self, llm, template: dict, max_tokens: int = 160):
        self.llm, self.template, self.max_tokens = llm, template, max_tokens
        self.stops = list(template.get("stop", [])) or ["###"]
        self.ctx = None
        self.prefix_len = self.n_ctx = 0
        self.lock = threading.Lock()
        self._piece = ctypes.create_string_buffer(256)      # its own: the chat's thread uses llm's

    def _open(self, prefix: str) -> None:
        """A context just large enough: the few-shot prefix, one answer's turn, the reply
        (for a 7B model with an f16 cache ~0.5 MiB a position, made on the first match)."""
        L, llm = self.llm.L, self.llm
        ids = llm.tokenize(prefix, True)
        self.n_ctx = len(ids) + self.ROOM + self.max_tokens
        p = L.llama_context_default_params()
        p.n_ctx = self.n_ctx
        p.n_batch = p.n_ubatch = 512
        p.n_threads = p.n_threads_batch = max(1, llm.threads // 2)      # leave the chat its cores
        self.ctx = L.llama_init_from_model(llm.model, p)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create the matcher's context")
        self.mem = L.llama_get_memory(self.ctx)
        self.batch = L.llama_batch_init(512, 0, 1)
        self._decode(ids, 0)
        self.prefix_len = len(ids)

    def _decode(self, ids: list[int], pos0: int) -> None:
        L, b = self.llm.L, self.batch
        for start in range(0, len(ids), 512):
            chunk = ids[start:start + 512]
            for i, t in enumerate(chunk):
                b.token[i], b.pos[i], b.n_seq_id[i] = t, pos0 + start + i, 1
                b.seq_id[i][0], b.logits[i] = 0, 0
            b.logits[len(chunk) - 1] = 1
            b.n_tokens = len(chunk)
            if run_graph(L.llama_decode, self.ctx, b) != 0:
                raise RuntimeError("llama_decode failed in the matcher")

    def generate(self, labels: list[str], answer: str) -> str:
        L, llm = self.llm.L, self.llm
        prefix, suffix = render_prompt(self.template, labels, answer)
        with self.lock:
            if self.ctx is None:
                self._open(prefix)
            ids = llm.tokenize(suffix, False)
            if self.prefix_len + len(ids) + self.max_tokens >= self.n_ctx:
                return ""                                         # too long to ask: the fallback answers
            L.llama_memory_seq_rm(self.mem, 0, self.prefix_len, -1)
            self._decode(ids, self.prefix_len)
            sampler = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
            L.llama_sampler_chain_add(sampler, L.llama_sampler_init_greedy())
            out, pos = b"", self.prefix_len + len(ids)
            try:
                for _ in range(self.max_tokens):
                    tok = int(L.llama_sampler_sample(sampler, self.ctx, -1))
                    if L.llama_vocab_is_eog(llm.vocab, tok):
                        break
                    n = L.llama_token_to_piece(llm.vocab, tok, self._piece, len(self._piece), 0, False)
                    out += self._piece.raw[:max(n, 0)]
                    text = out.decode("utf-8", errors="replace")
                    if any(s in text for s in self.stops):
                        break
                    self._decode([tok], pos)
                    pos += 1
            finally:
                L.llama_sampler_free(sampler)
            text = out.decode("utf-8", errors="replace")
            for s in self.stops:
                text = text.split(s, 1)[0]
            return text.strip()

    def close(self) -> None:
        with self.lock:
            if self.ctx is not None:
                self.llm.L.llama_batch_free(self.batch)
                self.llm.L.llama_free(self.ctx)
                self.ctx = None


def match(labels: list[str], answer: str, llm_matcher: LlmMatcher | None) -> tuple[list[Match], str]:
    """-> (matches, how: "llm" | "fallback" | "none")."""
    if not labels or not answer.strip():
        return [], "none"
    if llm_matcher is not None:
        found = parse(llm_matcher.generate(labels, answer), labels, answer)
        if found:
            return found, "llm"
    return fallback(labels, answer), "fallback"
