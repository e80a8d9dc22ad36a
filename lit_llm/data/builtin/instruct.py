"""``builtin:instruct``: instruction-following tasks generated at run time, with answers checkable exactly.

Each record asks for something a program can verify (a small sum or difference, the larger of two numbers, the
words of a phrase reversed or sorted, a word in upper or lower case, a count of letters or words, a word repeated,
a first letter, an opposite), so an instruction-finetuned model can be scored by exact match without an outside
judge. Answers are short (one to a few words), so a small model learns part of the set on a CPU in minutes.

Every task kind comes in two phrasings: everything in the instruction with an empty ``input`` (so the Alpaca
template's ``### Input:`` section is left out) and an instruction with a separate ``input``. The records are
shuffled with a fixed seed, so the book's ordered split (first 85 % train, next 10 % test, last 5 % validation)
gets every kind in every split. The set depends only on ``seed`` and ``per_kind``: it is the same on every machine.
"""

from __future__ import annotations

import random
from collections.abc import Callable

# Short, common, lower-case words: few tokens each, so answers stay short for any tokenizer.
WORDS: tuple[str, ...] = (
    "apple", "river", "stone", "cloud", "green", "house", "light", "table", "water", "bread",
    "chair", "dream", "earth", "flame", "grape", "horse", "lemon", "music", "night", "ocean",
    "paper", "queen", "robot", "sugar", "tiger", "train", "voice", "whale", "zebra", "cat",
    "dog", "sun", "moon", "tree", "bird", "fish", "book", "door", "road", "star",
    "rain", "snow", "wind", "leaf", "milk", "salt", "gold", "ring", "ship", "lamp",
    "blue", "red", "cold", "warm", "fast", "slow", "tall", "soft", "loud", "dark",
)

# Pairs of opposites: recall of facts the model can only learn from the training split.
OPPOSITES: tuple[tuple[str, str], ...] = (
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("day", "night"),
    ("open", "closed"), ("light", "dark"), ("happy", "sad"), ("old", "new"), ("early", "late"),
    ("full", "empty"), ("hard", "soft"), ("high", "low"), ("long", "short"), ("loud", "quiet"),
    ("rich", "poor"), ("wet", "dry"), ("near", "far"), ("strong", "weak"), ("thick", "thin"),
)

Record = tuple[str, str, str]  # (instruction, input, output)
_Maker = Callable[[random.Random], Record]


def _phrase(rng: random.Random, lo: int = 3, hi: int = 4) -> list[str]:
    return rng.sample(WORDS, rng.randint(lo, hi))


def _add(rng: random.Random) -> Record:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    if rng.random() < 0.5:
        return f"What is {a} + {b}?", "", str(a + b)
    return "Add the two numbers.", f"{a} + {b}", str(a + b)


def _subtract(rng: random.Random) -> Record:
    a = rng.randint(0, 20)
    b = rng.randint(0, a)  # non-negative answers
    if rng.random() < 0.5:
        return f"What is {a} - {b}?", "", str(a - b)
    return "Subtract the second number from the first.", f"{a} - {b}", str(a - b)


def _larger(rng: random.Random) -> Record:
    a, b = rng.sample(range(100), 2)
    if rng.random() < 0.5:
        return f"Which number is larger, {a} or {b}?", "", str(max(a, b))
    return "Return the larger of the two numbers.", f"{a}, {b}", str(max(a, b))


def _reverse(rng: random.Random) -> Record:
    words = _phrase(rng)
    answer = " ".join(reversed(words))
    if rng.random() < 0.5:
        return f"Reverse the order of the words in '{' '.join(words)}'.", "", answer
    return "Reverse the order of the words.", " ".join(words), answer


def _sort(rng: random.Random) -> Record:
    words = _phrase(rng)
    answer = " ".join(sorted(words))
    if rng.random() < 0.5:
        return f"Sort the words '{' '.join(words)}' alphabetically.", "", answer
    return "Sort the words alphabetically.", " ".join(words), answer


def _upper(rng: random.Random) -> Record:
    words = _phrase(rng, 1, 2)
    text = " ".join(words)
    if rng.random() < 0.5:
        return f"Write '{text}' in uppercase.", "", text.upper()
    return "Convert the text to uppercase.", text, text.upper()


def _lower(rng: random.Random) -> Record:
    words = _phrase(rng, 1, 2)
    text = " ".join(words).upper()
    if rng.random() < 0.5:
        return f"Write '{text}' in lowercase.", "", text.lower()
    return "Convert the text to lowercase.", text, text.lower()


def _count_letters(rng: random.Random) -> Record:
    word = rng.choice(WORDS)
    if rng.random() < 0.5:
        return f"How many letters are in the word '{word}'?", "", str(len(word))
    return "Count the letters in the word.", word, str(len(word))


def _count_words(rng: random.Random) -> Record:
    words = _phrase(rng, 2, 6)
    if rng.random() < 0.5:
        return f"How many words are in '{' '.join(words)}'?", "", str(len(words))
    return "Count the words in the text.", " ".join(words), str(len(words))


def _first_letter(rng: random.Random) -> Record:
    word = rng.choice(WORDS)
    if rng.random() < 0.5:
        return f"What is the first letter of the word '{word}'?", "", word[0]
    return "Give the first letter of the word.", word, word[0]


def _repeat(rng: random.Random) -> Record:
    word, n = rng.choice(WORDS), rng.randint(2, 4)
    answer = " ".join([word] * n)
    if rng.random() < 0.5:
        return f"Repeat the word '{word}' {n} times.", "", answer
    return f"Repeat the word {n} times.", word, answer


def _opposite(rng: random.Random) -> Record:
    a, b = rng.choice(OPPOSITES)
    if rng.random() < 0.5:
        a, b = b, a
    if rng.random() < 0.5:
        return f"What is the opposite of '{a}'?", "", b
    return "Give the opposite of the word.", a, b


#: The task kinds, by the name stored in each record's ``task`` column.
KINDS: dict[str, _Maker] = {
    "add": _add,
    "subtract": _subtract,
    "larger": _larger,
    "reverse": _reverse,
    "sort": _sort,
    "upper": _upper,
    "lower": _lower,
    "count_letters": _count_letters,
    "count_words": _count_words,
    "first_letter": _first_letter,
    "repeat": _repeat,
    "opposite": _opposite,
}


def generate_tasks(per_kind: int = 250, seed: int = 0) -> dict[str, list]:
    """The built-in instruction set as columns ``instruction``, ``input``, ``output`` and ``task`` (the kind).

    Args:
        per_kind: Records of each of the 12 kinds (3,000 records by default).
        seed: Seed of the generator and of the final shuffle.

    Returns:
        Equal-length column lists; about half of the records have an empty ``input``.
    """
    rng = random.Random(seed)
    rows: list[tuple[str, str, str, str]] = []
    for kind, make in KINDS.items():
        rows.extend((*make(rng), kind) for _ in range(per_kind))
    rng.shuffle(rows)
    instruction, input_, output, task = (list(column) for column in zip(*rows))
    return {"instruction": instruction, "input": input_, "output": output, "task": task}
