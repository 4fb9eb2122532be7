"""The paper's caption rewrite: the subject's own word ("woman", "puppy") becomes the domain word ("person", "pet").

The word lists are the defaults of :data:`SUBJECT_WORDS`; ``--words FILE`` replaces a domain's list (one word or
phrase a line, ``#`` starts a comment). Only singular forms are listed: a caption about several people ("two
women") names no single subject and is refused, as is one whose rewrite names the subject more than once ("a
man and a woman" -> "a person and a person"), since the adapter binds every occurrence of the word to one
identity.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from nested_attention.errors import NestedAttentionError

SUBJECT_WORDS = {
    "person": (
        "person", "woman", "man", "girl", "boy", "lady", "guy", "gentleman", "child", "kid", "baby", "toddler",
        "teenager", "teen", "adult", "individual", "human", "bride", "groom", "actor", "actress",
    ),
    "pet": (
        "pet", "dog", "cat", "puppy", "kitten", "kitty", "pup", "doggy", "doggo", "hound", "canine", "feline",
        "animal", "golden retriever", "labrador retriever", "retriever", "labrador", "terrier", "poodle", "bulldog",
        "corgi", "husky", "beagle", "dachshund", "german shepherd", "tabby",
    ),
}


@dataclass(frozen=True)
class Rewrite:
    """A caption after the word replacement, or the reason it is refused (`prompt` None)."""

    prompt: str | None
    reason: str = ""


class WordReplacer:
    """Replaces every listed word or phrase (whole words, not inside hyphenated ones, any case, longest phrase
    first) by the domain `word`; a run of listed words ("tabby cat", "baby girl") is one subject and becomes one
    domain word.

    An article directly before a replaced word is made to agree with the domain word ("an animal" -> "a pet").
    """

    def __init__(self, word: str, subject_words: tuple[str, ...] | list[str]):
        if not word.strip() or not re.fullmatch(r"[\w-]+", word.strip()):
            raise NestedAttentionError(f"The domain word must be one word such as 'person' or 'pet', got {word!r}.")
        self.word = word.strip()
        words = sorted({w.strip().lower() for w in subject_words if w.strip()} | {self.word.lower()},
                       key=lambda w: (-len(w), w))
        alternatives = "|".join(r"\s+".join(map(re.escape, w.split())) for w in words)
        end = r"(?![\w-])"  # whole words, and not part of a hyphenated one ("man-made")
        run = rf"(?:{alternatives}){end}(?:\s+(?:{alternatives}){end})*"  # "tabby cat", "baby girl": one subject
        self._pattern = re.compile(rf"(?<![\w-])(?:(an?)\s+)?({run})", flags=re.IGNORECASE)
        self._domain = re.compile(rf"(?<![\w-]){re.escape(self.word)}{end}", flags=re.IGNORECASE)

    def __call__(self, caption: str) -> Rewrite:
        """The caption with the domain word in place of the subject's word, or why it cannot be used."""
        text = " ".join(caption.split())
        if not text:
            return Rewrite(None, "the caption is empty")
        prompt = self._pattern.sub(self._replace, text)
        found = len(self._domain.findall(prompt))
        if found == 0:
            return Rewrite(None, f"the caption {text!r} names no subject word of the '{self.word}' list")
        if found > 1:
            return Rewrite(None, f"the caption {text!r} names {found} subjects ({prompt!r}); one is needed")
        return Rewrite(prompt)

    def _replace(self, match: re.Match) -> str:
        article, found = match.group(1), match.group(2)
        word = self.word.capitalize() if found[:1].isupper() and not article else self.word
        if article is None:
            return word
        agreeing = "an" if self.word[:1].lower() in "aeiou" else "a"
        return (agreeing.capitalize() if article[:1].isupper() else agreeing) + " " + word


def read_word_list(path: str | Path) -> list[str]:
    """A word list file: one word or phrase a line; blank lines and text after '#' are ignored."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise NestedAttentionError(
            f"The word list {path} could not be read ({error.__class__.__name__}); give a UTF-8 text file with one "
            f"word or phrase a line, e.g. 'woman'."
        ) from None
    words = [line.split("#", 1)[0].strip() for line in lines]
    words = [word for word in words if word]
    if not words:
        raise NestedAttentionError(
            f"The word list {path} has no words; give one word or phrase a line, e.g. 'woman'."
        )
    return words
