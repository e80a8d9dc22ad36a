"""Shared pieces of the classification tests: SMS-like data in the SMS Spam Collection's own format, tiny models."""

from __future__ import annotations

import random
import zipfile
from pathlib import Path

from lit_llm.model.config import GPTConfig

TINY_MODEL = [
    "--model.init_args.model.n_layers=2",
    "--model.init_args.model.emb_dim=32",
    "--model.init_args.model.n_heads=2",
    "--model.init_args.speed.compile=false",
]

_HAM = [
    "Ok lar... Joking wif u oni", "I'll be home by {n}, want me to pick up some bread?", "Sorry, I'll call later",
    "Are you coming to the match on {day}?", "Mum says dinner is at {n}", "Did you see the game last night",
    "Can't talk now, in a meeting till {n}", "Happy birthday! Hope you have a great {day}",
    "Where are you? We're at the cafe", "Thanks for yesterday, it was fun", "On my way, see you in {n} mins",
    "Don't forget the keys on {day}",
]
_SPAM = [
    "WINNER!! You have won a {n} prize. Call 0906{n} now to claim", "FREE entry to win a holiday! Text WIN to 8{n}",
    "URGENT! Your mobile number has been awarded {n} pounds. Call 0800{n}",
    "Congratulations, you are selected for a {day} cash bonus. Reply YES to {n}",
    "You have 1 new voicemail. Call 0906{n} to listen, 150p/min",
    "Claim your free ringtone now! Text TONE to {n}, T&Cs apply",
]
_DAYS = ["Monday", "Tuesday", "Friday", "Saturday", "Sunday"]


def sms_rows(n_ham: int, n_spam: int, seed: int = 0) -> list[tuple[str, str]]:
    """``(label, text)`` rows of short messages, spam and ham mixed in a seeded order."""
    rng = random.Random(seed)
    rows = [("ham", rng.choice(_HAM)) for _ in range(n_ham)] + [("spam", rng.choice(_SPAM)) for _ in range(n_spam)]
    rng.shuffle(rows)
    return [(label, text.format(n=rng.randint(2, 999), day=rng.choice(_DAYS))) for label, text in rows]


def write_sms_collection(path: Path, rows: list[tuple[str, str]]) -> Path:
    """Write rows as the SMS Spam Collection does: ``label<TAB>text`` lines, no header."""
    path.write_text("".join(f"{label}\t{text}\n" for label, text in rows), encoding="utf-8")
    return path


def write_sms_zip(path: Path, rows: list[tuple[str, str]]) -> Path:
    """A zip laid out like the UCI download: ``SMSSpamCollection`` (no extension) beside a ``readme``."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("SMSSpamCollection", "".join(f"{label}\t{text}\n" for label, text in rows))
        zf.writestr("readme", "SMS Spam Collection (test copy)\n")
    return path


def tiny_config(vocab_size: int = 300, context_length: int = 64, **overrides: object) -> GPTConfig:
    """2 layers, 32 wide, 2 heads."""
    values = dict(vocab_size=vocab_size, context_length=context_length, emb_dim=32, n_heads=2, n_layers=2,
                  drop_rate=0.0)
    values.update(overrides)
    return GPTConfig(**values)
