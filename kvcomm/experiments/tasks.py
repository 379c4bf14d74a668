"""Locally generated, seeded evaluation tasks for selective KV sharing (no downloads).

Each task returns items {"id", "context", "question", "answers"}: the same shape as a user JSONL file
(`kvcomm.datasets.read_jsonl`). The same (task, n, seed) always gives the same items.

  countries  a person at a landmark → the landmark's country (landmark table in resources/)
  tipsheets  tips on three companies, one clearly good → which company to buy
  twohop     two facts chained through a person → the answer needs both
  needle     one fact hidden in filler text of a chosen length (in words) → recall it
"""

from __future__ import annotations

import json
import random
from functools import lru_cache
from pathlib import Path

PEOPLE = ["Uma", "Noor", "Ravi", "Lena", "Omar", "Ines", "Kofi", "Mei", "Tariq", "Sofia", "Yuki", "Pavel",
          "Amara", "Diego", "Hana", "Jonas", "Lucia", "Malik", "Nina", "Oskar"]
COMPANIES = ["Orbital Foods", "Kestrel Mining", "Vantage Rail", "Bluefin Labs", "Cobalt Energy", "Nimbus Air",
             "Harbor Textiles", "Juniper Health", "Quartz Logistics", "Summit Robotics", "Tidewater Water", "Aurora Media"]
GOOD = ["expects record profits next quarter", "just won a large government contract", "reported revenue up 40 percent",
        "launched a product that is selling out everywhere"]
BAD = ["faces a major lawsuit", "lost its largest customer", "is under investigation for fraud",
       "reported a second year of heavy losses", "had its factory shut down by regulators"]
CITIES = ["Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Tunis", "Quito", "Riga", "Perth", "Dakar", "Graz", "Cork"]
JOBS = ["a baker", "a pilot", "a nurse", "a carpenter", "a chemist", "a violinist", "a judge", "a farmer"]
FILLER = ("The morning was quiet and the streets were still wet from the rain. A few shops opened late and the "
          "market filled slowly with people carrying baskets. Somewhere a radio played an old song while a dog "
          "slept by the door. Clouds moved across the hills and the river kept its slow pace toward the sea.").split()


@lru_cache(maxsize=1)
def landmarks() -> list[tuple[str, str, str]]:
    rows = json.loads((Path(__file__).parents[1] / "resources" / "landmarks.json").read_text())
    return [tuple(r) for r in rows]


def countries(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(f"countries-{seed}")
    items = []
    for i in range(n):
        person, (landmark, _city, country) = rng.choice(PEOPLE), rng.choice(landmarks())
        items.append({"id": f"countries-{seed}-{i}", "context": f"{person} is at {landmark}.",
                      "question": f"Which country is {person} located in?", "answers": [country]})
    return items


def tipsheets(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(f"tipsheets-{seed}")
    items = []
    for i in range(n):
        names = rng.sample(COMPANIES, 3)
        good = rng.randrange(3)
        tips = [f"{c} {rng.choice(GOOD) if j == good else rng.choice(BAD)}." for j, c in enumerate(names)]
        items.append({"id": f"tipsheets-{seed}-{i}", "context": "Tip sheet: " + " ".join(tips),
                      "question": "Which one company should an investor buy shares in?", "answers": [names[good]]})
    return items


def twohop(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(f"twohop-{seed}")
    items = []
    for i in range(n):
        a, b = rng.sample(PEOPLE, 2)
        city, job = rng.choice(CITIES), rng.choice(JOBS)
        facts = [f"{a} is the sister of {b}.", f"{b} works as {job} in {city}."]
        rng.shuffle(facts)
        items.append({"id": f"twohop-{seed}-{i}", "context": " ".join(facts),
                      "question": f"In which city does the sibling of {a} work?", "answers": [city]})
    return items


def needle(n: int, seed: int = 0, length: int = 200) -> list[dict]:
    """A 'secret code' sentence at a random depth of `length` words of filler."""
    rng = random.Random(f"needle-{seed}-{length}")
    items = []
    for i in range(n):
        start = rng.randrange(len(FILLER))
        words = [FILLER[(start + j) % len(FILLER)] for j in range(length)]
        code = str(rng.randint(1000, 9999))
        at = rng.randrange(len(words) + 1)
        text = " ".join(words[:at] + f"The secret code is {code}.".split() + words[at:])
        items.append({"id": f"needle{length}-{seed}-{i}", "context": text, "question": "What is the secret code?",
                      "answers": [code]})
    return items


TASKS = {"countries": countries, "tipsheets": tipsheets, "twohop": twohop, "needle": needle}


def generate(task: str, n: int, seed: int = 0) -> list[dict]:
    """`task` is a name above; 'needle:<words>' sets the needle task's length."""
    from kvcomm.core.errors import DataError

    name, _, arg = task.partition(":")
    if name not in TASKS:
        raise DataError(f"unknown task {task!r}; choose {', '.join(TASKS)} (needle:<words> sets the length) or a .jsonl path")
    if name == "needle" and arg:
        if not arg.isdigit() or int(arg) < 1:
            raise DataError(f"needle length must be a positive number of words, got {arg!r}")
        return needle(n, seed, int(arg))
    return TASKS[name](n, seed)
