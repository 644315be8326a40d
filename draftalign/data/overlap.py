"""Word n-gram overlap: near-duplicate instructions, and instructions that copy an evaluation prompt.

Both rules compare sets of word 3-grams ("shingles") of normalised text (NFKC, lowercase, words
only, so case, punctuation and spacing never hide a copy). Cheap and exact: an inverted index
from shingle to text finds the texts that share any shingle, so a request is compared only with
those, never with the whole set.

- Near duplicates (`NearDuplicates`): Jaccard similarity |A ∩ B| / |A ∪ B| at or above a threshold.
- Evaluation prompts (`HeldOutPrompts`): a text copies an evaluation prompt when it holds at least
  a `threshold` share of the prompt's shingles, and, for a prompt with an input, that share of its
  input's too. A task's instruction is shared by all its prompts (every summarisation prompt opens
  "Summarize the following passage"); the input is what makes a prompt that prompt, so the same
  instruction over another passage is no copy, while the same passage under other words is one.
  On the bundled sets (examples/data/), measured so: two prompts of the evaluation sets share at
  most 22%, the closest of the 347 seeds holds 25% of one, and a prompt with any one word
  replaced still holds 50% or more of itself in 9,281 of 9,321 cases (the rest: inputs of a few
  words, such as `print "Hello, world"`, where one word makes another input); hence the default
  threshold of 0.5. A paraphrase in other words is not caught: that would take a model.

Pure logic only: the generate pipeline reads the evaluation sets and hands their texts here.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from draftalign.data.seeds import normalize_text

__all__ = ["SHINGLE_WORDS", "words", "shingles", "jaccard", "NearDuplicates", "HeldOutPrompt", "HeldOutPrompts",
           "Match"]

# 3 words: long enough that common pairs ("of the") do not make two texts look alike, short enough
# that one changed word in a 10-word request leaves most shingles intact.
SHINGLE_WORDS = 3
_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """The normalised words of `text` (seeds.normalize_text, then runs of letters and digits)."""
    return _WORD.findall(normalize_text(text))


def shingles(text_words: list[str], n: int = SHINGLE_WORDS) -> set[str]:
    """The word n-grams of a word list; a text shorter than n words is one shingle of all its words."""
    if len(text_words) <= n:
        return {" ".join(text_words)} if text_words else set()
    return {" ".join(text_words[i:i + n]) for i in range(len(text_words) - n + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


@dataclass(frozen=True)
class Match:
    """The closest text found: its key and the score that matched it."""

    key: str
    score: float


class _Index:
    """Shingle -> keys of the texts holding it; `shared` counts common shingles per key."""

    def __init__(self) -> None:
        self._keys: dict[str, list[str]] = {}

    def add(self, key: str, grams: Iterable[str]) -> None:
        for g in grams:
            self._keys.setdefault(g, []).append(key)

    def shared(self, grams: Iterable[str]) -> Counter:
        counts: Counter = Counter()
        for g in grams:
            counts.update(self._keys.get(g, ()))
        return counts


class NearDuplicates:
    """Texts kept so far; `match` finds the one a new text nearly repeats (Jaccard ≥ threshold).

    `skip` (an opener the pipeline wrote, not the model) is left out of a text's shingles: every
    request of a kind starts with the same opener, which would make them all look alike.
    """

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self._index = _Index()
        self._grams: dict[str, set[str]] = {}

    @staticmethod
    def grams(text: str, skip: str = "") -> set[str]:
        return shingles(words(text)) - (shingles(words(skip)) if skip else set())

    def match(self, text: str, skip: str = "") -> Match | None:
        mine = self.grams(text, skip)
        best: Match | None = None
        for key, common in self._index.shared(mine).items():
            score = common / (len(mine) + len(self._grams[key]) - common)
            if score >= self.threshold and (best is None or score > best.score):
                best = Match(key, round(score, 3))
        return best

    def add(self, key: str, text: str, skip: str = "") -> None:
        self._grams[key] = self.grams(text, skip)
        self._index.add(key, self._grams[key])


@dataclass(frozen=True)
class HeldOutPrompt:
    """One evaluation prompt: `key` names it (task/id), `text` is the user turn the target sees,
    `input` the row's input (passage, sentence, code) or None."""

    key: str
    text: str
    input: str | None = None


@dataclass(frozen=True)
class _Part:
    """A prompt or its input, as words and shingles (computed once, compared with every request)."""

    words: list[str]
    grams: set[str]

    @classmethod
    def of(cls, text: str | None) -> _Part:
        w = words(text) if text else []
        return cls(w, shingles(w))

    def held(self, text_words: list[str], text_grams: set[str]) -> float:
        """The share of this part's shingles found in the text; a part of at most the shingle size
        must appear as a run of words (its one shingle is all its words)."""
        if not self.words:
            return 0.0
        if len(self.words) <= SHINGLE_WORDS:
            return 1.0 if f" {' '.join(self.words)} " in f" {' '.join(text_words)} " else 0.0
        return len(self.grams & text_grams) / len(self.grams)


class HeldOutPrompts:
    """The evaluation prompts that must stay unseen; `match` says which one a text copies, if any."""

    def __init__(self, prompts: Iterable[HeldOutPrompt], threshold: float) -> None:
        self.threshold = threshold
        self._index = _Index()
        self._prompts: dict[str, tuple[_Part, _Part]] = {}  # key -> (the prompt, its input)
        self._short: list[str] = []  # prompts of at most SHINGLE_WORDS words: matched as runs of words
        for p in prompts:
            prompt = _Part.of(p.text)
            self._prompts[p.key] = (prompt, _Part.of(p.input))
            if len(prompt.words) <= SHINGLE_WORDS:
                self._short.append(p.key)
            else:
                self._index.add(p.key, prompt.grams)

    def __len__(self) -> int:
        return len(self._prompts)

    def keys(self) -> list[str]:
        return list(self._prompts)

    def score(self, key: str, text_words: list[str], text_grams: set[str]) -> float:
        """How much of prompt `key` the text holds: the smaller of the prompt's and its input's share."""
        prompt, given = self._prompts[key]
        share = prompt.held(text_words, text_grams)
        return min(share, given.held(text_words, text_grams)) if given.words else share

    def match(self, text: str) -> Match | None:
        """The evaluation prompt `text` copies most (score ≥ threshold), or None."""
        text_words = words(text)
        text_grams = shingles(text_words)
        # Only prompts sharing a shingle can reach the threshold (> 0); short ones are checked whole.
        candidates = [*self._index.shared(text_grams), *self._short]
        best: Match | None = None
        for key in candidates:
            score = self.score(key, text_words, text_grams)
            if score >= self.threshold and score > 0 and (best is None or score > best.score):
                best = Match(key, round(score, 3))
        return best

    def reason(self, text: str) -> str | None:
        """Why `text` is dropped as a copy of an evaluation prompt (the kind "evaluation prompt"), or None."""
        match = self.match(text)
        if match is None:
            return None
        return (f"evaluation prompt: holds {match.score:.0%} of the word 3-grams of {match.key} "
                f"(generate.exclude_eval.threshold {self.threshold})")
