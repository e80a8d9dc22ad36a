"""``builtin:chat``: multi-turn conversations generated at run time, whose later answers need the earlier turns.

Each conversation opens with the user telling the assistant something (a favourite colour, a name, a number, a pet,
a list of words, a city), then asks about it in later turns, possibly after an unrelated exchange in between (a
small sum, a word in upper case). Every answer can be checked exactly, and the later ones cannot be given without
reading the conversation: "My favourite colour is teal." ... "What is my favourite colour?" -> "teal"; "Remember
the number 7." ... "Add 5 to it." -> "12". The records are in the ``messages`` format (``{"messages": [...]}``) with
a ``kind`` column, shuffled with a fixed seed, so any split gets every kind. The set depends only on ``seed`` and
``count``: it is the same on every machine.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from lit_llm.data.builtin.instruct import WORDS

COLOURS = ("red", "blue", "green", "teal", "orange", "purple", "yellow", "pink", "brown", "grey", "black", "white")
NAMES = ("Ada", "Ben", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana", "Ivo", "Jana", "Kai", "Lena", "Max", "Nora",
         "Omar", "Pia", "Ravi", "Sara", "Tom", "Uma", "Vera", "Will", "Yara", "Zoe")
PETS = ("cat", "dog", "horse", "rabbit", "parrot", "fish", "turtle", "mouse")
CITIES = ("Paris", "Rome", "Oslo", "Lima", "Cairo", "Tokyo", "Delhi", "Quito", "Berlin", "Madrid", "Vienna", "Dublin")

Turn = tuple[str, str]  # (user, assistant)
_Maker = Callable[[random.Random], tuple[list[Turn], list[Turn]]]  # (opening turns, questions about them)


def _colour(rng: random.Random) -> tuple[list[Turn], list[Turn]]:
    c = rng.choice(COLOURS)
    return ([(f"My favourite colour is {c}.", f"Noted, {c}.")],
            [("What is my favourite colour?", c), ("What is the first letter of my favourite colour?", c[0])])


def _name(rng: random.Random) -> tuple[list[Turn], list[Turn]]:
    n = rng.choice(NAMES)
    return ([(f"Hi, my name is {n}.", f"Hello, {n}.")],
            [("What is my name?", n), ("How many letters are in my name?", str(len(n)))])


def _number(rng: random.Random) -> tuple[list[Turn], list[Turn]]:
    n, m = rng.randint(0, 9), rng.randint(0, 9)
    return ([(f"Remember the number {n}.", f"OK, {n}.")],
            [(f"Add {m} to it.", str(n + m)), ("What was the number?", str(n))])


def _pet(rng: random.Random) -> tuple[list[Turn], list[Turn]]:
    pet, name = rng.choice(PETS), rng.choice(NAMES)
    return ([(f"I have a {pet} called {name}.", "Nice.")],
            [("What kind of pet do I have?", pet), ("What is my pet called?", name)])


def _words(rng: random.Random) -> tuple[list[Turn], list[Turn]]:
    words = rng.sample(WORDS, 3)
    return ([(f"Remember these words: {' '.join(words)}.", "OK.")],
            [("What was the first word?", words[0]), ("What was the last word?", words[2]),
             ("Say the words in reverse order.", " ".join(reversed(words)))])


def _city(rng: random.Random) -> tuple[list[Turn], list[Turn]]:
    city = rng.choice(CITIES)
    return ([(f"I live in {city}.", f"{city} is nice.")],
            [("Where do I live?", city), ("Say the name of my city in uppercase.", city.upper())])


def _aside(rng: random.Random) -> Turn:
    """An unrelated exchange, so that a question is not always right after what it asks about."""
    if rng.random() < 0.5:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"What is {a} + {b}?", str(a + b)
    word = rng.choice(WORDS)
    return f"Write '{word}' in uppercase.", word.upper()


#: The conversation kinds, by the name stored in each record's ``kind`` column.
KINDS: dict[str, _Maker] = {
    "colour": _colour,
    "name": _name,
    "number": _number,
    "pet": _pet,
    "words": _words,
    "city": _city,
}


def generate_conversations(count: int = 3000, seed: int = 0) -> dict[str, list]:
    """The built-in conversations as columns ``messages`` (lists of ``{"role", "content"}``) and ``kind``.

    Each has an opening exchange, one or two questions about it (in random order) and, half of the time, an
    unrelated exchange before the questions; the first question always needs the opening.

    Args:
        count: Conversations (spread evenly over the kinds).
        seed: Seed of the generator and of the final shuffle.
    """
    rng = random.Random(seed)
    rows: list[tuple[list[dict[str, str]], str]] = []
    kinds = list(KINDS.items())
    for i in range(count):
        kind, make = kinds[i % len(kinds)]
        opening, questions = make(rng)
        asked = rng.sample(questions, rng.randint(1, min(2, len(questions))))
        turns = list(opening)
        if rng.random() < 0.5:
            turns.append(_aside(rng))
        turns += asked
        messages = []
        for user, assistant in turns:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        rows.append((messages, kind))
    rng.shuffle(rows)
    return {"messages": [m for m, _ in rows], "kind": [k for _, k in rows]}
