"""Train a small LLaMA-style sentencepiece tokenizer on a generated corpus.

Real MiniGPT-4 / InstructBLIP checkpoints ship LLaMA's 32000-piece tokenizer.
For tests and offline demos we need a tokenizer with the *same configuration*
(BPE, byte fallback, split digits, dummy prefix, identity normalization, the
same special ids) but small and reproducible, so it is trained here from a
deterministic synthetic corpus in well under a second.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Sequence

# Prompt strings used by MiniGPT-4's Vicuna conversation template; they are in
# the corpus so the image placeholder markup tokenizes into a few pieces.
MINIGPT4_PROMPTS = (
    "Give the following image: <Img>ImageContent</Img>. You will be able to "
    "see the image once I provide it to you. Please answer my questions.",
    "###Human: <Img><ImageHere></Img> ",
    "###Assistant:",
)

# Word lists for the synthetic corpus; small on purpose (the vocabulary is
# tiny), but varied enough for BPE to learn a few hundred merges.
_SUBJECTS = (
    "the cat", "a dog", "the image", "this picture", "a small bird", "the man",
    "a woman", "the child", "two horses", "the red car", "an old house",
    "the tree", "a blue boat", "the city", "my friend", "the robot",
)
_VERBS = (
    "shows", "contains", "looks at", "sits near", "runs across", "is next to",
    "describes", "holds", "sees", "jumps over", "stands behind", "follows",
)
_OBJECTS = (
    "a green field", "the river", "a wooden table", "the mountains",
    "a bright window", "the street", "a cup of coffee", "the beach",
    "a yellow flower", "the sky", "a large building", "the forest",
)
_TAILS = (
    "in the morning", "at night", "during the summer", "on a sunny day",
    "while it rains", "near the water", "with a smile", "very quickly",
)
_QUESTIONS = (
    "What is in the image?", "Describe this image in detail.",
    "How many people are there?", "What color is the car?",
    "Where was this photo taken?", "Is it day or night?",
    "What is the animal doing?", "Can you explain the scene?",
)

# Defaults: 512 pieces = 3 specials + 256 byte-fallback pieces + ~250
# characters/merges; the corpus seed fixes the sentences (and thus the model).
DEFAULT_VOCAB_SIZE = 512
CORPUS_SEED = 1234
CORPUS_SENTENCES = 600


def generate_corpus(
    n_sentences: int = CORPUS_SENTENCES,
    seed: int = CORPUS_SEED,
    extra_text: Sequence[str] = (),
) -> list[str]:
    """Build a deterministic list of English-like sentences."""
    rng = random.Random(seed)
    lines: list[str] = []
    for i in range(n_sentences):
        kind = i % 4
        if kind == 0:
            subject = rng.choice(_SUBJECTS)
            line = f"{subject.capitalize()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}."
        elif kind == 1:
            line = f"###Human: <Img><ImageHere></Img> {rng.choice(_QUESTIONS)}"
        elif kind == 2:
            count = rng.randint(0, 2025)
            line = f"###Assistant: There are {count} items and {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."
        else:
            # Leading/doubled spaces and a newline keep whitespace-only pieces
            # in the data, as in LLaMA's training text (code, indentation).
            line = f"  {rng.choice(_SUBJECTS)}  {rng.choice(_VERBS)}\n    {rng.choice(_OBJECTS)}, {rng.choice(_TAILS)}!"
        lines.append(line)
    lines.extend(MINIGPT4_PROMPTS)
    lines.extend(extra_text)
    return lines


def train_sentencepiece(lines: Sequence[str], vocab_size: int) -> bytes:
    """Train a BPE model configured like LLaMA's; return the serialized model."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        # Special ids exactly as in LLaMA: <unk>=0, <s>=1, </s>=2, no pad.
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        split_by_unicode_script=True,
        split_by_whitespace=True,
        split_by_number=True,
        max_sentencepiece_length=16,
        # LLaMA uses 0.99995 on a huge corpus; on ours every character counts.
        character_coverage=1.0,
        # Deterministic: use every sentence, single thread, no shuffling.
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=1,
        hard_vocab_limit=True,
        minloglevel=2,
    )
    return model.getvalue()


def train_tokenizer(
    out_dir: Path,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    extra_text: Sequence[str] = (),
) -> Path:
    """Train the tokenizer, write ``tokenizer.model`` and HF files into out_dir.

    Returns the path of ``tokenizer.model``. ``AutoTokenizer.from_pretrained(
    out_dir, use_fast=False)`` then loads a slow ``LlamaTokenizer``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_bytes = train_sentencepiece(generate_corpus(extra_text=extra_text), vocab_size)
    model_path = out_dir / "tokenizer.model"
    model_path.write_bytes(model_bytes)
    save_hf_tokenizer(model_path, out_dir)
    return model_path


def save_hf_tokenizer(model_path: Path, out_dir: Path) -> None:
    """Save a slow HF LlamaTokenizer wrapping the sentencepiece model."""
    from transformers import LlamaTokenizer

    tok = LlamaTokenizer(
        vocab_file=str(model_path),
        legacy=True,
        add_bos_token=True,
        add_eos_token=False,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token=None,
        clean_up_tokenization_spaces=False,
        sp_model_kwargs={},
    )
    tok.save_pretrained(str(out_dir))
