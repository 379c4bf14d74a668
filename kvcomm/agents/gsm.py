"""The `gsm` workload: generated multi-step word problems in the style of GSM8K, one integer answer.

Each problem takes 3 to 5 arithmetic steps, mixing +, −, × and integer division that always divides
exactly, with numbers up to a few hundred; about half carry a distractor fact the answer does not use.
Four families (a running count, a shopping bill, a production line, a reading plan) keep the wording
varied. The answer is computed alongside the text, in Python, so it is correct by construction.

Grading (`final_number`): the first number after the last "Answer:" in the reply; a reply without
one is read for its last number. Commas between thousands are ignored and "12.0" reads as 12.
"""

from __future__ import annotations

import random
import re

NAMES = ["Ann", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jia", "Kofi", "Lena", "Milo", "Nia"]
THINGS = ["apples", "books", "coins", "marbles", "pencils", "stamps", "shells", "cards", "stickers", "beads"]
GOODS = [("notebooks", "pens"), ("apples", "pears"), ("tickets", "snacks"), ("shirts", "socks"), ("cups", "plates")]
BAKES = [("bakery", "muffins", "trays", "boxes"), ("farm", "eggs", "baskets", "cartons"),
         ("workshop", "toys", "crates", "bags"), ("garden", "tomatoes", "rows", "jars")]
TIMES = {2: "twice", 3: "three times", 4: "four times"}
PARTS = {2: "half", 3: "a third", 4: "a quarter", 5: "a fifth"}
MAX_VALUE = 800  # no intermediate result above this


def _distractor(rng: random.Random, who: str, friend: str, things: str) -> str:
    other = rng.choice([t for t in THINGS if t != things])
    return rng.choice([f"{friend} has {rng.randint(3, 90)} {other}.", f"{who} is {rng.randint(8, 15)} years old.",
                       f"The shop is {rng.randint(2, 12)} blocks from {who}'s house.",
                       f"{friend} collected {rng.randint(5, 60)} {things} last year."])


def _count_problem(rng: random.Random, steps: int, who: str, friend: str) -> tuple[list[str], str, int]:
    """A running count changed step by step (every step keeps it a positive integer ≤ MAX_VALUE)."""
    things = rng.choice(THINGS)
    x = rng.randint(12, 90)
    text = [f"{who} has {x} {things}."]
    done, kinds = 0, set()
    while done < steps:
        ops = ["add", "sub", "add_groups", "sub_groups", "mul", "part", "split"]
        kind = rng.choice(ops)
        if kind == "add":
            b = rng.randint(5, 60)
            if x + b > MAX_VALUE:
                continue
            text.append(rng.choice([f"Then {who} buys {b} more.", f"{friend} gives {who} {b} more {things}."]))
            x, cost = x + b, 1
        elif kind == "sub":
            if x < 8:
                continue
            b = rng.randint(3, x - 3)
            text.append(rng.choice([f"{who} gives {b} of them to {friend}.", f"{who} loses {b} {things}."]))
            x, cost = x - b, 1
        elif kind == "add_groups":
            n, m = rng.randint(2, 6), rng.randint(3, 12)
            if x + n * m > MAX_VALUE or steps - done < 2:
                continue
            text.append(f"{who} buys {n} packs with {m} {things} in each pack.")
            x, cost = x + n * m, 2
        elif kind == "sub_groups":
            n, m = rng.randint(2, 5), rng.randint(2, 9)
            if n * m >= x or steps - done < 2:
                continue
            text.append(f"{who} gives each of {n} friends {m} {things}.")
            x, cost = x - n * m, 2
        elif kind == "mul":
            k = rng.choice(list(TIMES))
            if x * k > MAX_VALUE:
                continue
            when = rng.choice(["A month later", "By the end of the year", "After a trade"])
            text.append(f"{when}, {who} has {TIMES[k]} as many {things} as before.")
            x, cost = x * k, 1
        elif kind == "part":
            ds = [d for d in PARTS if x % d == 0 and x > d]
            if not ds or steps - done < 2:
                continue
            d = rng.choice(ds)
            text.append(f"{who} gives away {PARTS[d]} of the {things}.")
            x, cost = x - x // d, 2
        else:
            ks = [k for k in range(2, 7) if x % k == 0 and x > k]
            if not ks:
                continue
            k = rng.choice(ks)
            text.append(f"{who} sorts the {things} into {k} equal piles and keeps only one pile.")
            x, cost = x // k, 1
        done += cost
        kinds.add(kind)
    if len(kinds) < 2:  # a problem of one repeated operation is too easy: start again
        return _count_problem(rng, steps, who, friend)
    return text, f"How many {things} does {who} have now?", x


def _shopping_problem(rng: random.Random, steps: int, who: str, friend: str) -> tuple[list[str], str, int]:
    """Two items at unit prices, an optional coupon, then change from bills or a cost split evenly."""
    g1, g2 = rng.choice(GOODS)
    a, p, b, q = rng.randint(2, 9), rng.randint(2, 15), rng.randint(2, 9), rng.randint(2, 15)
    total = a * p + b * q
    text = [f"{who} buys {a} {g1} at {p} dollars each and {b} {g2} at {q} dollars each."]
    if steps >= 4 and rng.random() < 0.5:  # ×, ×, +, ÷ (and − for a coupon that makes the split exact)
        k = rng.randint(2, 5)
        coupon = total % k + (k if total % k == 0 and rng.random() < 0.5 else 0)
        if coupon:
            text.append(f"{who} has a coupon that takes {coupon} {'dollar' if coupon == 1 else 'dollars'} off the total.")
        text.append(f"{who} and {k - 1} {'friend' if k == 2 else 'friends'} split the cost equally.")
        return text, "How many dollars does each person pay?", (total - coupon) // k
    bill = rng.choice([10, 20, 50])
    count = -(-(total + 1) // bill) + rng.randint(0, 1)  # enough bills to pay, sometimes one more
    if steps >= 5 or count == 1:
        text.append(f"{who} pays with {count} {'bill' if count == 1 else 'bills'} of {bill} dollars.")
    else:
        text.append(f"{who} pays with {count * bill} dollars.")
    return text, f"How many dollars of change does {who} get?", count * bill - total


def _production_problem(rng: random.Random, steps: int, who: str, friend: str) -> tuple[list[str], str, int]:
    """Batches of n things, some sold or broken, the rest packed in boxes of k (exactly), maybe priced."""
    place, things, batch, box = rng.choice(BAKES)
    t, m, k = rng.randint(3, 9), rng.randint(6, 24), rng.randint(3, 8)
    made = t * m
    if made <= 2 * k:
        return _production_problem(rng, steps, who, friend)
    spare = made % k + k * rng.randint(0, max(0, made // k - 2))
    spare = spare or k
    text = [f"A {place} fills {t} {batch} with {m} {things} each.",
            f"It uses {spare} of the {things} right away and packs the rest into {box} of {k}."]
    boxes = (made - spare) // k
    if steps >= 4:
        price = rng.randint(2, 9)
        text.append(f"Each of the {box} sells for {price} dollars.")
        return text, f"How many dollars does the {place} get for all the {box}?", boxes * price
    return text, f"How many {box} does the {place} fill?", boxes


def _reading_problem(rng: random.Random, steps: int, who: str, friend: str) -> tuple[list[str], str, int]:
    """Two reading rates over some days, pages left of a book; five steps add a third day count."""
    p, d, q, e = rng.randint(5, 25), rng.randint(2, 6), rng.randint(5, 25), rng.randint(2, 6)
    read = p * d + q * e
    text = [f"{who} reads {p} pages a day for {d} days, then {q} pages a day for the next {e} days."]
    if steps >= 5:
        r = rng.randint(2, 4)
        text.append(f"On Saturday {who} reads {r} times as many pages as on the first day.")
        read += r * p
    book = read + rng.randint(10, 150)
    text.insert(0, f"{who}'s book has {book} pages.")
    return text, "How many pages are left to read?", book - read


FAMILIES = (_count_problem, _count_problem, _shopping_problem, _production_problem, _reading_problem)


def gsm_problem(rng: random.Random) -> tuple[str, int]:
    """One problem: (question text, integer answer)."""
    who, friend = rng.sample(NAMES, 2)
    steps = rng.choice([3, 4, 4, 5, 5])
    text, question, answer = rng.choice(FAMILIES)(rng, steps, who, friend)
    if rng.random() < 0.5:  # a distractor, about the thing asked for when it can be
        asked = question.split()[2]
        text.insert(rng.randint(1, len(text)), _distractor(rng, who, friend, asked if asked in THINGS else rng.choice(THINGS)))
    return " ".join(text + [question]), answer


_ANSWER = re.compile(r"answer\s*(?:is)?\s*[:：]", re.I)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def _canonical(number: str) -> str:
    if "." in number:
        whole, frac = number.split(".")
        return whole if not frac.strip("0") else number
    return str(int(number))


def final_number(reply: str) -> str:
    """The reply's answer as a canonical integer string ('' if it names no number)."""
    text = _THOUSANDS.sub("", reply)
    marks = list(_ANSWER.finditer(text))
    if marks:
        after = _NUMBER.findall(text[marks[-1].end() :])
        if after:
            return _canonical(after[0])
    nums = _NUMBER.findall(text)
    return _canonical(nums[-1]) if nums else ""
