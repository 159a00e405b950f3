"""Token streams for the demo: a self-generated corpus (no downloads) or any file, byte-level.

The generated corpus is a word-level Markov chain over a fixed random lexicon, written out as
characters. Its structure is what makes it a useful test bed: inside a word every character is
nearly determined by the word's first ones, and the next word depends on the previous one, so a
model that learns both falls far below the unigram entropy (3.2 nats per character here) towards
the chain's entropy rate (about 0.3 nats per character: 1.4 nats per word boundary plus the
sentence lengths, spread over about 6 characters per word). Everything is drawn from one
seeded `random.Random`, so the corpus is identical on every machine and Python version.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

ALPHABET = "abcdefghijklmnopqrstuvwxyz .\n"

# Successor weights of each word: a few likely continuations, so the next word is learnable but
# not deterministic (1.3 nats per word boundary), like text.
_SUCCESSOR_WEIGHTS = (0.45, 0.25, 0.15, 0.1, 0.05)


@dataclass
class Corpus:
    """A token stream split into train and validation parts, with its vocabulary."""

    train: torch.Tensor  # int64 [N_train]
    val: torch.Tensor  # int64 [N_val]
    vocab: list[str]
    description: str

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def unigram_entropy(self) -> float:
        """Entropy (nats per token) of the training stream's token frequencies: the loss of the
        best model that ignores context."""
        counts = torch.bincount(self.train, minlength=self.vocab_size).double()
        p = counts[counts > 0] / counts.sum()
        return float(-(p * p.log()).sum())


def generate_corpus(num_chars: int = 400_000, num_words: int = 32, seed: int = 1234) -> Corpus:
    """Deterministic Markov-chain text over a random lexicon (see the module docstring)."""
    rng = random.Random(seed)
    letters = ALPHABET[:26]
    lexicon: list[str] = []
    seen: set[str] = set()
    while len(lexicon) < num_words:
        word = "".join(rng.choice(letters) for _ in range(rng.randint(2, 8)))
        if word not in seen:
            seen.add(word)
            lexicon.append(word)
    successors = [rng.sample(range(num_words), len(_SUCCESSOR_WEIGHTS)) for _ in range(num_words)]

    pieces: list[str] = []
    length = 0
    word = rng.randrange(num_words)
    words_in_sentence = 0
    sentence_length = rng.randint(4, 12)
    while length < num_chars:
        pieces.append(lexicon[word])
        words_in_sentence += 1
        if words_in_sentence == sentence_length:
            sep = ".\n"
            words_in_sentence = 0
            sentence_length = rng.randint(4, 12)
        else:
            sep = " "
        pieces.append(sep)
        length += len(lexicon[word]) + len(sep)
        word = rng.choices(successors[word], weights=_SUCCESSOR_WEIGHTS)[0]
    text = "".join(pieces)[:num_chars]

    index = {c: i for i, c in enumerate(ALPHABET)}
    tokens = torch.tensor([index[c] for c in text], dtype=torch.int64)
    return _split(tokens, list(ALPHABET), f"generated Markov text ({num_words} words, seed {seed})")


def load_file(path: str | Path) -> Corpus:
    """Any file as bytes (vocabulary 256): works for every encoding and needs no tokenizer."""
    data = Path(path).read_bytes()
    if len(data) < 1000:
        raise ValueError(f"--data {path}: {len(data)} bytes is too little text to train on")
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)
    return _split(tokens, [chr(i) for i in range(256)], f"bytes of {path}")


def _split(tokens: torch.Tensor, vocab: list[str], description: str) -> Corpus:
    # The last 10% is held out so the final loss is measured on text the model never trained on.
    n_train = int(len(tokens) * 0.9)
    return Corpus(tokens[:n_train], tokens[n_train:], vocab, description)


class Batches:
    """Random windows of a token stream from a private generator: both runs of the demo see the
    same batches in the same order when built with the same seed."""

    def __init__(self, tokens: torch.Tensor, batch_size: int, context: int, seed: int):
        if len(tokens) <= context + 1:
            raise ValueError(f"need more than context + 1 = {context + 1} tokens, got {len(tokens)}")
        self.tokens = tokens
        self.batch_size = batch_size
        self.context = context
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(
            0, len(self.tokens) - self.context - 1, (self.batch_size,), generator=self.generator
        )
        offsets = torch.arange(self.context + 1)
        windows = self.tokens[starts[:, None] + offsets]
        return windows[:, :-1], windows[:, 1:]
