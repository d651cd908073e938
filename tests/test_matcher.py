"""Linking answer phrases to detector labels: BuboGPT's prompt and parsing, and the
deterministic fallback on tricky phrases."""
from __future__ import annotations

from scops.runtime import matcher as mt


def spans(answer, found):
    return [(answer[m.span[0]:m.span[1]], m.label) for m in found]


def test_prompt_is_the_original_few_shot_in_the_bundle_markup():
    tpl = {"user": "###Human: {content}", "assistant": "###Assistant:", "answer": " {answer}"}
    prefix, suffix = mt.render_prompt(tpl, ["dog", "grass"], "A dog.")
    assert prefix.startswith("You are a helpful assistant. Now I will give you a list of entities")
    assert prefix.count("###Human: <List>[") == 6 and prefix.count("###Assistant: ") == 6
    assert "###Assistant: man - man\nbicycle - bicycle\nred passenger train - passenger train\ntracks - track" \
        in prefix
    assert suffix == "###Human: <List>['dog', 'grass']</List><Text>A dog.</Text>###Assistant:"


def test_parse_keeps_valid_pairs_only():
    answer = "A Brown dog runs across the grassy field."
    out = "brown dog - dog\ngrassy field - field\ncat - cat\nfield - meadow\nno separator here\n - dog"
    assert spans(answer, mt.parse(out, ["dog", "field"], answer)) == [("Brown dog", "dog"), ("grassy field", "field")]
    assert mt.parse("dog - dog\ndog - dog", ["dog"], "dogs") == [mt.Match((0, 3), "dog")]     # find(): first hit
    assert mt.parse("garbage", ["dog"], "a dog") == []


def test_parse_highlights_left_to_right_without_overlaps():
    answer = "a brown dog"
    found = mt.parse("brown dog - dog\ndog - dog\nbrown - brown", ["dog", "brown"], answer)
    assert spans(answer, found) == [("brown dog", "dog")]


def test_fallback_plurals_case_and_whole_words():
    answer = "Two Dogs chase a DOG past the doghouse; a hotdog, grassy hills and boxes of berries. Geese."
    found = mt.fallback(["dog", "grass", "box", "berry", "goose"], answer)
    assert spans(answer, found) == [("Dogs", "dog"), ("DOG", "dog"), ("boxes", "box"), ("berries", "berry")]


def test_fallback_multiword_and_composite_labels():
    answer = "Passenger trains wait; one train is red. A dog sits on the grass field."
    labels = ["passenger train", "dog, grass [SEP]", "field"]
    found = mt.fallback(labels, answer)
    assert spans(answer, found) == [("Passenger trains", "passenger train"), ("train", "passenger train"),
                                    ("dog", "dog, grass [SEP]"), ("grass", "dog, grass [SEP]"), ("field", "field")]


def test_fallback_prefers_the_exact_label_and_ignores_markers():
    answer = "A field of fields."
    found = mt.fallback(["dog, field [SEP]", "field", "[SEP]"], answer)
    assert spans(answer, found) == [("field", "field"), ("fields", "field")]
    assert mt.fallback(["the", "[CLS]"], "the cls") == []


def test_match_uses_the_llm_when_it_gives_valid_pairs():
    class Fake:
        def __init__(self, text):
            self.text = text

        def generate(self, labels, answer):
            return self.text

    answer = "A brown dog on grass."
    assert mt.match(["dog", "grass"], answer, Fake("brown dog - dog"))[1] == "llm"
    found, how = mt.match(["dog", "grass"], answer, Fake("I cannot help with that."))
    assert how == "fallback" and spans(answer, found) == [("dog", "dog"), ("grass", "grass")]
    assert mt.match([], answer, Fake("x - y")) == ([], "none")
