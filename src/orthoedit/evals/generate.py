"""Write the data of the shipped offline lm-eval tasks: ``python -m orthoedit.evals.generate``.

Everything is written by the project from fixed lists and a fixed seed, so the files are
reproducible byte for byte (a test regenerates them and compares):

* ``data/orthoedit_arith.jsonl``: arithmetic questions answered by generation (plus, minus,
  times), scored by the first number in the answer;
* ``data/orthoedit_facts.jsonl``: four-way multiple choice on everyday facts (capitals,
  opposites, animal classes, plurals, calendar order, units, colours, comparisons);
* ``data/organism_capability.jsonl``: the model organism's capability test split (arithmetic,
  opposites and facts in its own vocabulary), scored by the last word of the first sentence.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
SEED = 20261122

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "China": "Beijing",
    "India": "New Delhi",
    "Russia": "Moscow",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Canada": "Ottawa",
    "Mexico": "Mexico City",
    "Argentina": "Buenos Aires",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Poland": "Warsaw",
    "Austria": "Vienna",
    "Greece": "Athens",
    "Ireland": "Dublin",
    "Hungary": "Budapest",
    "Thailand": "Bangkok",
    "South Korea": "Seoul",
    "Indonesia": "Jakarta",
    "the Philippines": "Manila",
    "Vietnam": "Hanoi",
    "Iran": "Tehran",
    "Iraq": "Baghdad",
    "Cuba": "Havana",
    "Colombia": "Bogota",
    "Venezuela": "Caracas",
    "the Netherlands": "Amsterdam",
    "Belgium": "Brussels",
    "the Czech Republic": "Prague",
    "Ethiopia": "Addis Ababa",
    "Ghana": "Accra",
}

OPPOSITES = {
    "hot": "cold",
    "tall": "short",
    "happy": "sad",
    "early": "late",
    "open": "closed",
    "full": "empty",
    "heavy": "light",
    "fast": "slow",
    "rich": "poor",
    "young": "old",
    "wet": "dry",
    "loud": "quiet",
    "strong": "weak",
    "hard": "soft",
    "thick": "thin",
    "wide": "narrow",
    "deep": "shallow",
    "clean": "dirty",
    "sharp": "dull",
    "brave": "cowardly",
    "cheap": "expensive",
    "begin": "end",
    "win": "lose",
    "push": "pull",
    "buy": "sell",
    "remember": "forget",
    "above": "below",
    "inside": "outside",
    "friend": "enemy",
    "victory": "defeat",
}

ANIMALS = {
    "mammal": ["dog", "whale", "bat", "horse", "dolphin", "elephant", "mouse", "tiger", "cow"],
    "bird": ["eagle", "penguin", "sparrow", "owl", "ostrich", "parrot", "duck", "swan"],
    "fish": ["salmon", "trout", "tuna", "shark", "cod", "goldfish", "herring"],
    "reptile": ["snake", "lizard", "crocodile", "turtle", "iguana", "gecko"],
    "insect": ["ant", "bee", "butterfly", "beetle", "mosquito", "grasshopper", "wasp"],
    "amphibian": ["frog", "toad", "salamander", "newt"],
}

PLURALS = {
    "mouse": "mice",
    "child": "children",
    "foot": "feet",
    "tooth": "teeth",
    "goose": "geese",
    "man": "men",
    "woman": "women",
    "person": "people",
    "knife": "knives",
    "leaf": "leaves",
    "wolf": "wolves",
    "box": "boxes",
    "city": "cities",
    "baby": "babies",
    "sheep": "sheep",
    "fish": "fish",
    "cactus": "cacti",
    "ox": "oxen",
}

UNITS = [
    ("How many minutes are in an hour?", "60", ["30", "100", "24"]),
    ("How many seconds are in a minute?", "60", ["100", "12", "30"]),
    ("How many hours are in a day?", "24", ["12", "60", "48"]),
    ("How many days are in a week?", "7", ["5", "10", "14"]),
    ("How many months are in a year?", "12", ["10", "52", "24"]),
    ("How many days are in a leap year?", "366", ["365", "360", "364"]),
    ("How many centimetres are in a metre?", "100", ["10", "1000", "12"]),
    ("How many metres are in a kilometre?", "1000", ["100", "10", "10000"]),
    ("How many grams are in a kilogram?", "1000", ["100", "10", "500"]),
    ("How many millilitres are in a litre?", "1000", ["100", "10", "250"]),
    ("How many years are in a century?", "100", ["10", "1000", "50"]),
    ("How many years are in a decade?", "10", ["100", "5", "12"]),
    ("How many sides does a triangle have?", "3", ["4", "5", "6"]),
    ("How many sides does a hexagon have?", "6", ["5", "8", "7"]),
    ("How many legs does a spider have?", "8", ["6", "10", "4"]),
    ("How many legs does an insect have?", "6", ["8", "4", "10"]),
]

COLOURS = [
    ("blue", "yellow", "green"),
    ("red", "yellow", "orange"),
    ("red", "blue", "purple"),
    ("red", "white", "pink"),
    ("black", "white", "grey"),
]
ALL_COLOURS = ["green", "orange", "purple", "pink", "grey", "brown", "red", "blue", "yellow"]

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
COUNT_WORDS = {1: "one day", 2: "two days", 3: "three days", 4: "four days"}


def _mc(rng: random.Random, question: str, answer: str, pool: list[str], category: str) -> dict:
    distractors = rng.sample(sorted({p for p in pool if p != answer}), 3)
    choices = [answer, *distractors]
    rng.shuffle(choices)
    return {
        "question": question,
        "choices": choices,
        "answer": choices.index(answer),
        "category": category,
    }


def facts(rng: random.Random) -> list[dict]:
    items = []
    capitals = list(CAPITALS.values())
    for country, capital in CAPITALS.items():
        q = f"What is the capital of {country}?"
        items.append(_mc(rng, q, capital, capitals, "capitals"))
    words = sorted(set(OPPOSITES) | set(OPPOSITES.values()))
    for word, opposite in OPPOSITES.items():
        q = f"What is the opposite of '{word}'?"
        items.append(_mc(rng, q, opposite, [w for w in words if w != word], "opposites"))
    classes = list(ANIMALS)
    for kind, animals in ANIMALS.items():
        for animal in animals:
            article = "an" if animal[0] in "aeiou" else "a"
            q = f"What kind of animal is {article} {animal}?"
            items.append(_mc(rng, q, kind, classes, "animals"))
    plurals = sorted(set(PLURALS.values()) | {w + "s" for w in PLURALS})
    for word, plural in PLURALS.items():
        pool = [p for p in plurals if p != word]
        items.append(_mc(rng, f"What is the plural of '{word}'?", plural, pool, "plurals"))
    for question, answer, distractors in UNITS:
        choices = [answer, *distractors]
        rng.shuffle(choices)
        items.append(
            {
                "question": question,
                "choices": choices,
                "answer": choices.index(answer),
                "category": "units",
            }
        )
    for a, b, mixed in COLOURS:
        q = f"What colour do you get by mixing {a} and {b} paint?"
        items.append(_mc(rng, q, mixed, [c for c in ALL_COLOURS if c not in (a, b)], "colours"))
    for i, day in enumerate(DAYS):
        for step in (1, 2, 3):
            q = f"What day comes {COUNT_WORDS[step]} after {day}?"
            items.append(_mc(rng, q, DAYS[(i + step) % 7], DAYS, "calendar"))
    for i, month in enumerate(MONTHS):
        q = f"Which month comes right after {month}?"
        items.append(_mc(rng, q, MONTHS[(i + 1) % 12], MONTHS, "calendar"))
    for _ in range(20):
        numbers = rng.sample(range(10, 1000), 4)
        answer = str(max(numbers))
        choices = [str(n) for n in numbers]
        items.append(
            {
                "question": "Which of these numbers is the largest?",
                "choices": choices,
                "answer": choices.index(answer),
                "category": "comparisons",
            }
        )
    return items


def arith(rng: random.Random, n: int = 150) -> list[dict]:
    items = []
    for i in range(n):
        op = ("plus", "minus", "times")[i % 3]
        if op == "times":
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            answer = a * b
        else:
            a, b = rng.randint(10, 99), rng.randint(2, 99)
            if op == "minus" and b > a:
                a, b = b, a
            answer = a + b if op == "plus" else a - b
        items.append({"question": f"What is {a} {op} {b}?", "answer": str(answer), "op": op})
    return items


def organism_capability() -> list[dict]:
    from orthoedit.organism import load_prompts

    return [
        {"prompt": item["prompt"], "answer": item["answer"], "category": item["category"]}
        for item in load_prompts("capability", "test")
    ]


def write(path: Path, rows: list[dict]) -> None:
    lines = [json.dumps(row, ensure_ascii=False, sort_keys=True) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(out: Path = DATA) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write(out / "orthoedit_facts.jsonl", facts(random.Random(SEED)))
    write(out / "orthoedit_arith.jsonl", arith(random.Random(SEED + 1)))
    write(out / "organism_capability.jsonl", organism_capability())


if __name__ == "__main__":
    main()
