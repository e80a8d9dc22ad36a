"""``builtin:reviews``: product reviews labelled ``negative`` or ``positive``, generated offline and deterministically.

Each review talks about one product: an optional neutral opening ("Ordered the kettle for my sister."), one or three
remarks on aspects of it ("the lid feels flimsy", "the price is not bad at all"), and sometimes a closing verdict
("I would not buy it again."). A remark's sentiment is its adjective's polarity, flipped by a negation ("not",
"isn't", "never", "far from", ...); the label is the majority sentiment of the remarks, and a closing verdict, when
there is one, agrees with it.

What makes the task need a model rather than a keyword list:

- every adjective appears with and without negation, and negation is as common in positive reviews as in negative
  ones, so neither "great" nor "not" tells the label by itself;
- three-remark reviews mix sentiments ("the screen is sharp, but the battery is poor"), so the label depends on
  counting;
- openings, connectives, products and aspects are shared by both classes, and verdicts use negation both ways
  ("I would not recommend it" / "I'm not sending it back").

The best rule of the form "label A if word w occurs, else label B" is right for 54 % of the reviews, while a small
GPT trained for a minute on a CPU gets 88 % of the test split right (see ``docs/classification.md``).
"""

from __future__ import annotations

import random

LABELS = ("negative", "positive")

_NEGATION_RATE = 0.25  # remarks whose adjective is negated
_SINGLE_RATE = 0.25  # reviews with one remark (the others have three)
_DISSENT_RATE = 0.3  # three-remark reviews with one remark against the label
_VERDICT_RATE = 0.35  # reviews that end with a verdict

_PRODUCTS: dict[str, list[str]] = {
    "headphones": ["sound", "bass", "battery", "ear cushions", "microphone", "noise cancelling"],
    "blender": ["motor", "jug", "lid", "blades", "noise level", "speed settings"],
    "backpack": ["zippers", "straps", "fabric", "pockets", "padding", "stitching"],
    "desk lamp": ["light", "base", "switch", "brightness control", "arm", "cable"],
    "coffee maker": ["coffee", "carafe", "water tank", "timer", "heating plate", "filter"],
    "keyboard": ["keys", "backlight", "software", "wrist rest", "cable", "typing feel"],
    "water bottle": ["lid", "insulation", "seal", "finish", "handle", "mouthpiece"],
    "tent": ["poles", "zips", "rain fly", "floor", "pegs", "ventilation"],
    "vacuum cleaner": ["suction", "battery", "brush", "dust bin", "filter", "attachments"],
    "monitor": ["screen", "colours", "stand", "menu", "speakers", "brightness"],
    "kettle": ["lid", "handle", "switch", "spout", "base", "boil time"],
    "office chair": ["seat", "armrests", "wheels", "back support", "height lever", "cushion"],
    "toaster": ["slots", "browning control", "crumb tray", "lever", "timer", "finish"],
    "camera": ["lens", "autofocus", "battery", "screen", "menus", "image quality"],
    "phone case": ["grip", "buttons", "edges", "material", "camera cutout", "fit"],
    "rain jacket": ["hood", "zip", "fabric", "pockets", "cuffs", "lining"],
}
_COMMON_ASPECTS = ["price", "build quality", "design", "packaging", "delivery", "instructions", "customer service",
                   "size", "colour", "weight"]

_POSITIVE = ["great", "excellent", "solid", "sturdy", "impressive", "reliable", "comfortable", "good", "decent",
             "nice", "perfect", "well made", "fantastic", "pleasant", "smooth", "generous"]
_NEGATIVE = ["bad", "poor", "flimsy", "disappointing", "terrible", "awful", "weak", "unreliable", "noisy", "cheap",
             "annoying", "clumsy", "fragile", "mediocre", "awkward", "useless"]
_DEGREE = ["", "", "", "really ", "very ", "pretty ", "quite ", "rather ", "surprisingly "]
_PEOPLE = ["my sister", "my dad", "my flatmate", "the office", "my son", "my partner", "a friend", "myself"]
_TIMES = ["two weeks", "a month", "three months", "a few days", "half a year", "a week", "six weeks"]

_OPENINGS = [
    "", "", "",
    "I bought this {product} last month.",
    "Ordered the {product} for {person}.",
    "Got this {product} as a gift.",
    "I have used the {product} for {time} now.",
    "Update after {time} with the {product}:",
    "Second {product} I have owned.",
    "Bought the {product} on sale.",
    "Replaced my old {product} with this one.",
]

# A remark with its sentiment kept ({adj} as is) or flipped by a negation. {deg} is an optional degree adverb;
# {is}/{was}/{feels} agree with the aspect ("the lid is", "the wheels are").
_PLAIN = [
    "the {aspect} {is} {deg}{adj}",
    "the {aspect} {was} {deg}{adj}",
    "I found the {aspect} {deg}{adj}",
    "the {aspect} {feels} {deg}{adj}",
    "the {aspect} turned out {deg}{adj}",
    "honestly the {aspect} {is} {deg}{adj}",
]
_FRAGMENT = "{adj} {aspect}"  # "Flimsy zippers." only starts a sentence
_NEGATED = [
    "the {aspect} {is} not {adj}",
    "the {aspect} {is}n't {adj}",
    "the {aspect} {was}n't {adj}",
    "I didn't find the {aspect} {adj}",
    "the {aspect} {is} far from {adj}",
    "the {aspect} {is} never {adj}",
    "the {aspect} {is} not {adj} at all",
    "I wouldn't call the {aspect} {adj}",
]
_JOINS = [". ", ", and ", ", but ", "; ", ". Also, ", ", while ", ". On the other hand, ", ", although "]

# Closing verdicts by the label they support; both sides use negation.
_VERDICTS = {
    "positive": ["Overall I would recommend it.", "I would buy it again.", "I'm not sending it back.",
                 "No regrets so far.", "It was worth the money.", "I can't complain.", "Happy with it overall.",
                 "I wouldn't hesitate to buy another."],
    "negative": ["Overall I would not recommend it.", "I wouldn't buy it again.", "I'm sending it back.",
                 "I regret buying it.", "It was not worth the money.", "I can't recommend it.",
                 "Not happy with it overall.", "I would hesitate to buy another."],
}


def generate_reviews(n: int = 4000, seed: int = 1234) -> dict[str, list]:
    """Generate ``n`` labelled reviews, half ``negative`` and half ``positive``, in a shuffled order.

    Args:
        n: Number of reviews.
        seed: Seed of the generator; the same ``(n, seed)`` always gives the same reviews.

    Returns:
        Columns ``text`` (the review) and ``label`` (``"negative"`` or ``"positive"``).
    """
    rng = random.Random(seed)
    labels = [LABELS[i % 2] for i in range(n)]
    rng.shuffle(labels)
    return {"text": [_review(rng, label) for label in labels], "label": labels}


def _review(rng: random.Random, label: str) -> str:
    product = rng.choice(sorted(_PRODUCTS))
    aspects = rng.sample(_PRODUCTS[product] + _COMMON_ASPECTS, 3)
    positive = label == "positive"
    if rng.random() < _SINGLE_RATE:
        sentiments = [positive]
    else:
        # Three remarks whose majority is the label: two or three of them agree with it, in any order.
        sentiments = [positive, positive, not positive if rng.random() < _DISSENT_RATE else positive]
        rng.shuffle(sentiments)
    body = ""
    for i, (aspect, sentiment) in enumerate(zip(aspects, sentiments)):
        join = rng.choice(_JOINS) if i else ". "
        remark = _remark(rng, aspect, sentiment, sentence_start=join.endswith(". "))
        body += (join if i else "") + (remark[0].upper() + remark[1:] if join.endswith(". ") else remark)
    body += "."
    opening = rng.choice(_OPENINGS).format(product=product, person=rng.choice(_PEOPLE), time=rng.choice(_TIMES))
    if not opening:  # name the product in the first remark instead
        if rng.random() < 0.5:
            body = f"The {product}: " + (body if body.startswith("I ") else body[0].lower() + body[1:])
    parts = [opening, body]
    if rng.random() < _VERDICT_RATE:
        parts.append(rng.choice(_VERDICTS[label]))
    return " ".join(p for p in parts if p)


def _remark(rng: random.Random, aspect: str, positive: bool, sentence_start: bool) -> str:
    """One remark on ``aspect`` whose sentiment is ``positive``: a plain adjective, or the opposite one negated."""
    negate = rng.random() < _NEGATION_RATE
    adj = rng.choice(_POSITIVE if positive != negate else _NEGATIVE)
    if negate:
        template = rng.choice(_NEGATED)
    else:
        template = rng.choice(_PLAIN + [_FRAGMENT] * sentence_start)
    plural = aspect.endswith("s") and not aspect.endswith(("ss", "ness", "lens"))
    return template.format(
        aspect=aspect, adj=adj, deg=rng.choice(_DEGREE),
        **({"is": "are", "was": "were", "feels": "feel"} if plural else {"is": "is", "was": "was", "feels": "feels"}),
    )
