"""``builtin:preference``: preference pairs built from ``builtin:instruct``'s tasks, for DPO without a download.

Each record is one of :func:`lit_llm.data.builtin.instruct.generate_tasks`'s records, in the same order (so the
book's ordered split gives the same train, validation and test prompts as the instruction quickstart), with two
more fields: ``chosen``, the correct answer (equal to ``output``), and ``rejected``, a plausible wrong one, the kind of
mistake a small model makes on that task:

- numbers (sums, differences, letter and word counts): the right answer off by one or two;
- the larger of two numbers: the smaller one;
- reversing or sorting words: the words as given;
- upper or lower case: the text left in its case;
- a first letter: the word's last letter (or second, when the two agree);
- repeating a word: one repetition too many or too few;
- an opposite: the word itself.

The wrong answers are drawn with a fixed seed, so the set is the same on every machine, and never equal the right one.
"""

from __future__ import annotations

import random
import re

from lit_llm.data.builtin.instruct import generate_tasks


def _subject(instruction: str, input_: str) -> str:
    """The text a task works on: its input, or the quoted part of its instruction."""
    if input_:
        return input_
    quoted = re.search(r"'([^']*)'", instruction)
    return quoted.group(1) if quoted else ""


def wrong_answer(task: str, instruction: str, input_: str, output: str, rng: random.Random) -> str:
    """A plausible wrong answer to one built-in task (never equal to ``output``).

    Args:
        task: The record's ``task`` kind (a key of :data:`lit_llm.data.builtin.instruct.KINDS`).
        instruction: Its instruction.
        input_: Its input (may be empty).
        output: Its correct answer.
        rng: Draws the variations (off by one or two, too many or too few).
    """
    subject = _subject(instruction, input_)
    if task in ("add", "subtract", "count_letters", "count_words"):
        right = int(output)
        delta = rng.choice((1, 2))
        wrong = right - delta if right >= delta and rng.random() < 0.5 else right + delta
    elif task == "larger":
        numbers = [int(n) for n in re.findall(r"\d+", input_ or instruction)]
        wrong = min(numbers)
    elif task in ("reverse", "sort"):
        wrong = subject
        if wrong == output:  # already sorted: the reverse order instead
            wrong = " ".join(reversed(output.split()))
    elif task == "upper":
        wrong = output.lower()
    elif task == "lower":
        wrong = output.upper()
    elif task == "first_letter":
        wrong = subject[-1] if subject[-1] != output else subject[1]
    elif task == "repeat":
        words = output.split()
        n = len(words) + (-1 if len(words) > 2 and rng.random() < 0.5 else 1)
        wrong = " ".join(words[:1] * n)
    elif task == "opposite":
        wrong = subject
    else:
        raise ValueError(f"no wrong answer is defined for task kind {task!r}")
    wrong = str(wrong)
    if wrong == output:  # a programming error in the rules above, not a data problem
        raise AssertionError(f"wrong answer equals the right one for {task}: {instruction!r} {input_!r} -> {output!r}")
    return wrong


def generate_preferences(per_kind: int = 250, seed: int = 0) -> dict[str, list]:
    """The built-in preference set: ``generate_tasks(per_kind, seed)``'s columns plus ``chosen`` and ``rejected``.

    Args:
        per_kind: Records of each of the 12 kinds (3,000 records by default).
        seed: Seed of the tasks; the wrong answers use a generator seeded from it too.

    Returns:
        Columns ``instruction``, ``input``, ``output``, ``task``, ``chosen`` (= ``output``) and ``rejected``.
    """
    columns = generate_tasks(per_kind=per_kind, seed=seed)
    rng = random.Random(seed + 1)
    rejected = [
        wrong_answer(task, ins, inp, out, rng)
        for task, ins, inp, out in zip(columns["task"], columns["instruction"], columns["input"], columns["output"])
    ]
    return {**columns, "chosen": list(columns["output"]), "rejected": rejected}
