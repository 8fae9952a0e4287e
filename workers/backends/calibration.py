"""Calibration text: what static int8 quantisation measures activation ranges on, and what the
accuracy gate compares against fp32 on (a held-out slice the quantiser never saw).

bertq makes its own general-English set: a few hundred texts of one to eight sentences about people,
places, work, science, weather, food, sport and history, with names, organisations, dates and
numbers (so NER and QA see entities), from fixed templates and a fixed seed. A user's own domain text comes from
``BERTQ_CALIBRATION_FILE``: plain text lines, or JSONL with a ``text`` field."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

from bertq.schemas import TaskName

from bertq.errors import InvalidInput

#: Texts in the shipped set, and how many sentences each text has (drawn uniformly from this tuple).
SHIPPED_TEXTS = 400
SENTENCES_PER_TEXT = (1, 1, 2, 3, 4, 6, 8)
#: Of any set, every HELD_OUT_SHARE-th text is held out for the accuracy gate.
HELD_OUT_SHARE = 4  # one in four, at most MAX_HELD_OUT
MAX_HELD_OUT = 100
MAX_CALIBRATION = 300

NAMES = [
    "Maria Chen", "Tom Okafor", "Anna Schmidt", "Luis García", "Priya Nair", "James Walker",
    "Sofia Rossi", "Kenji Tanaka", "Amara Diallo", "Olivia Brown", "Ahmed Hassan", "Elena Petrova",
]  # fmt: skip
CITIES = "London|Paris|Nairobi|Lisbon|Toronto|Osaka|Buenos Aires|Berlin|Melbourne|Cairo|Oslo|Chicago".split("|")
COUNTRIES = "Kenya|Portugal|Canada|Japan|Argentina|Germany|Australia|Egypt|Norway|India|Brazil|Spain".split("|")
ORGS = [
    "the city council", "the national museum", "a local hospital", "the university", "the railway company",
    "a small bakery", "the football club", "the weather service", "a software company", "the public library",
]  # fmt: skip
JOBS = "teacher|nurse|engineer|farmer|journalist|architect|chef|pilot|librarian|carpenter|scientist|lawyer".split("|")
THINGS = "bridge|garden|school|market|harbour|museum|stadium|theatre|factory|hospital|park|tower".split("|")
FOODS = "bread|rice|soup|fresh fruit|grilled fish|lentils|cheese|noodles|roasted vegetables|honey cake".split("|")
ANIMALS = "owls|dolphins|bees|wolves|elephants|penguins|foxes|turtles|swallows|salmon".split("|")
MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December".split("|")
DAYS = "Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday".split("|")
ADJECTIVES = "quiet|busy|old|modern|beautiful|crowded|narrow|famous|cold|warm|green|empty".split("|")
TEMPLATES = (
    "{name} moved to {city} in {year} to work as a {job}.",
    "{org} announced on {day} that it will open a new {thing} in {city}.",
    "Most {animals} travel long distances when the seasons change.",
    "The {thing} in the centre of {city} was built more than {n} years ago.",
    "In {month}, the weather in {country} is usually {adj} and dry.",
    "{name} said that the new {thing} would be ready before the end of {month}.",
    "Scientists believe that {animals} can recognise each other after many years apart.",
    "The train from {city} to {city2} takes about {n} hours and stops at {small} stations.",
    "For dinner we had {food} and {food2}, and everyone wanted a second plate.",
    "{org} hired {n} new staff last year, most of them from {country}.",
    "When {name} was a child, she spent every summer near a {adj} lake in {country}.",
    "The museum in {city} reopened on {day} after a long repair of its roof.",
    "A {job} from {city} won the prize for her work on clean water.",
    "Heavy rain closed the roads around {city} for {small} days in {month}.",
    "The match between {city} and {city2} ended in a draw after {n} minutes of play.",
    "{name} and {name2} met at a conference in {city} and started a company together.",
    "Water boils at a lower temperature on high mountains because the air pressure is lower.",
    "The library lends books, maps and old newspapers to anyone who lives in the area.",
    "During the {century} century, {city} grew quickly as trade with {country} increased.",
    "Our neighbour grows {food} in a {adj} garden behind the house.",
    "The report says that about {pct} percent of the forest was lost in the fire.",
    "{name} learned to play the piano at the age of {small} and still practises every {day}.",
    "Tickets for the concert in {city} sold out within {n} minutes.",
    "The {job} explained the plan slowly, so that everyone in the room could follow it.",
    "Why do {animals} gather in such large groups before winter?",
    "If you visit {country} in {month}, bring a warm coat and good shoes.",
    "The old {thing} near the river is now a {adj} place for young families.",
    "{org} will publish its findings on {day}, {month} {date}.",
    "Light from the Sun takes about eight minutes to reach the Earth.",
    "After {small} years abroad, {name} returned to {city} and opened a shop.",
    "The children planted {n} trees along the road to the {thing}.",
    "Prices of {food} rose by {pct} percent in {year}, according to {org}.",
)


def _sentence(rng: random.Random) -> str:
    names, cities, foods = rng.sample(NAMES, 2), rng.sample(CITIES, 2), rng.sample(FOODS, 2)
    text = rng.choice(TEMPLATES).format(
        name=names[0],
        name2=names[1],
        city=cities[0],
        city2=cities[1],
        country=rng.choice(COUNTRIES),
        org=rng.choice(ORGS),
        job=rng.choice(JOBS),
        thing=rng.choice(THINGS),
        food=foods[0],
        food2=foods[1],
        animals=rng.choice(ANIMALS),
        month=rng.choice(MONTHS),
        day=rng.choice(DAYS),
        adj=rng.choice(ADJECTIVES),
        year=rng.randint(1950, 2024),
        n=rng.randint(10, 400),
        small=rng.randint(2, 12),
        pct=rng.randint(3, 60),
        date=rng.randint(1, 28),
        century=rng.choice(["sixteenth", "seventeenth", "eighteenth", "nineteenth"]),
    )
    return text[0].upper() + text[1:]


def shipped_texts(count: int = SHIPPED_TEXTS, seed: int = 0) -> list[str]:
    """bertq's general-English set: ``count`` distinct texts of 1 to 8 sentences (about 12 to 250
    tokens), so the quantiser sees short and long inputs alike."""
    rng = random.Random(seed)
    texts: dict[str, None] = {}
    while len(texts) < count:
        texts[" ".join(_sentence(rng) for _ in range(rng.choice(SENTENCES_PER_TEXT)))] = None
    return list(texts)


def read_calibration_file(path: str | Path) -> list[str]:
    """Texts from a user's file: one per line, or JSONL objects with a ``text`` field."""
    texts = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            line = line.strip()
            if not line:
                continue
            if line.startswith("{"):
                try:
                    value: Any = json.loads(line)["text"]
                except (ValueError, KeyError, TypeError) as error:
                    raise InvalidInput(
                        f"line {number} of {path} is not JSON with a `text` field ({error})", field="calibration_file"
                    ) from error
                line = str(value)
            texts.append(line)
    if len(texts) < 8:
        raise InvalidInput(f"{path} has {len(texts)} texts; calibration needs at least 8", field="calibration_file")
    return texts


def split(texts: list[str]) -> tuple[list[str], list[str]]:
    """(calibration, held out): every HELD_OUT_SHARE-th text is held out for the accuracy gate."""
    held = [i for i in range(HELD_OUT_SHARE - 1, len(texts), HELD_OUT_SHARE)][:MAX_HELD_OUT]
    held_set = set(held)
    calibration = [text for i, text in enumerate(texts) if i not in held_set][:MAX_CALIBRATION]
    return calibration, [texts[i] for i in held]


def fingerprint(texts: list[str]) -> str:
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]


QUESTIONS = (
    "Who is mentioned?",
    "Where did it happen?",
    "When did it happen?",
    "What is this about?",
    "How many were there?",
)


def task_items(task: TaskName, texts: list[str], mask_token: str | None = None) -> list[dict[str, Any]]:
    """Raw items of ``task`` made from calibration texts: the texts as they are; for fill_mask the
    middle word masked; for nsp and similarity each text with the next as its pair; for qa a short
    question on it; for rerank a question against three texts; for summarize four texts as one document."""
    if task is TaskName.fill_mask:
        items = []
        for text in texts:
            words = text.split()
            words[len(words) // 2] = str(mask_token)
            items.append({"text": " ".join(words)})
        return items
    if task is TaskName.nsp:
        return [{"text": text, "text_pair": texts[(i + 1) % len(texts)]} for i, text in enumerate(texts)]
    if task is TaskName.qa:
        return [{"question": QUESTIONS[i % len(QUESTIONS)], "context": text} for i, text in enumerate(texts)]
    if task is TaskName.similarity:
        return [{"text_a": text, "text_b": texts[(i + 1) % len(texts)]} for i, text in enumerate(texts)]
    if task is TaskName.rerank:  # a question against three texts
        return [
            {"query": QUESTIONS[i % len(QUESTIONS)], "documents": [texts[(i + k) % len(texts)] for k in range(3)]}
            for i in range(len(texts))
        ]
    if task is TaskName.summarize:  # several texts make one document of many sentences
        return [{"text": " ".join(texts[i : i + 4])} for i in range(0, len(texts), 4)]
    return [{"text": text} for text in texts]
