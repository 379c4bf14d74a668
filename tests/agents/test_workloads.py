"""The gsm workload (generation, grading), the shared preamble in agent prompts, code extraction."""

from __future__ import annotations

import re

import pytest

from kvcomm.agents.gsm import MAX_VALUE, PARTS, TIMES, final_number
from kvcomm.agents.workloads import TEAM_PROTOCOL, Item, gsm_items, load_workload

WORD_TIMES = {v: k for k, v in TIMES.items()}
WORD_PARTS = {v: k for k, v in PARTS.items()}


def solve(question: str) -> int:
    """An independent reading of a generated problem: every sentence form the generator writes, replayed.
    Distractors are the sentences that change nothing; an unknown sentence fails the test."""
    sentences = re.split(r"(?<=[.?])\s+", question)
    *facts, ask = sentences
    x = total = paid = per = book = read = boxes = price = None
    for i, s in enumerate(facts):
        n = [int(v) for v in re.findall(r"\d+", s)]
        if i == 0 and re.fullmatch(r"\w+ has \d+ \w+\.", s):
            x = n[0]
        elif re.fullmatch(r"(Then \w+ buys \d+ more|\w+ gives \w+ \d+ more \w+)\.", s):
            x += n[0]
        elif re.fullmatch(r"\w+ (gives \d+ of them to \w+|loses \d+ \w+)\.", s):
            x -= n[0]
        elif "packs with" in s:
            x += n[0] * n[1]
        elif "gives each of" in s:
            x -= n[0] * n[1]
        elif m := re.search(r"has (twice|three times|four times) as many", s):
            x *= WORD_TIMES[m.group(1)]
        elif m := re.search(r"gives away (half|a third|a quarter|a fifth) of", s):
            assert x % WORD_PARTS[m.group(1)] == 0
            x -= x // WORD_PARTS[m.group(1)]
        elif "equal piles" in s:
            assert x % n[0] == 0
            x //= n[0]
        elif "dollars each and" in s:
            total = n[0] * n[1] + n[2] * n[3]
        elif "coupon" in s:
            total -= n[0]
        elif "split the cost" in s:
            assert total % (n[0] + 1) == 0
            per = total // (n[0] + 1)
        elif "pays with" in s:
            paid = n[0] * n[1] if re.search(r"bills? of", s) else n[0]
        elif re.fullmatch(r"A \w+ fills \d+ \w+ with \d+ \w+ each\.", s):
            made = n[0] * n[1]
        elif "right away and packs the rest" in s:
            assert (made - n[0]) % n[1] == 0 and made > n[0]
            boxes = (made - n[0]) // n[1]
        elif "sells for" in s:
            price = n[0]
        elif "book has" in s:
            book = n[0]
        elif "pages a day for" in s:
            p, read = n[0], n[0] * n[1] + n[2] * n[3]
        elif "On Saturday" in s:
            read += n[0] * p
        else:  # a distractor: it must be one of the known ones
            assert re.fullmatch(r"\w+ has \d+ \w+\.|\w+ is \d+ years old\.|The shop is \d+ blocks from \w+'s house\."
                                r"|\w+ collected \d+ \w+ last year\.", s), s
        for v in (x, total):
            assert v is None or 0 < v <= MAX_VALUE
    if "change" in ask:
        return paid - total
    if "each person pay" in ask:
        return per
    if "pages are left" in ask:
        return book - read
    if "How many dollars does the" in ask:
        return boxes * price
    if re.fullmatch(r"How many \w+ does the \w+ fill\?", ask):
        return boxes
    return x


def test_gsm_is_seeded_and_every_answer_matches_its_text():
    items = gsm_items(300, seed=0)
    assert items == gsm_items(300, seed=0) and items[:20] != gsm_items(20, seed=1)
    assert len({it.question for it in items}) == len(items)
    for it in items:
        assert int(it.answer) == solve(it.question) and int(it.answer) >= 0, it.question
        assert all(int(v) <= MAX_VALUE for v in re.findall(r"\d+", it.question)), it.question
    # every family and a distractor now and then
    for needle in ("have now?", "change", "each person pay", "fill?", "get for all", "pages are left", "years old",
                   "equal piles", "gives away", "as many"):
        assert any(needle in it.question for it in items), needle


@pytest.mark.parametrize(("reply", "number"), [
    ("8 * 7 = 56\n56 - 32 = 24\n24 / 8 = 3\nAnswer: 3", "3"),
    ("Answer: 4 then I checked: the answer is: 12 apples", "12"),  # the last "Answer:" wins
    ("answer: **1,250** dollars", "1250"),
    ("So she has 17 left.", "17"),  # no "Answer:": the last number
    ("Answer: 12.0", "12"),
    ("Answer: 12.5", "12.5"),
    ("Answer: none; 3 + 4 = 7", "3"),  # the first number after the marker
    ("no digits here", ""),
])
def test_final_number(reply, number):
    assert final_number(reply) == number


def test_gsm_grading_and_answer_of():
    wl = load_workload("gsm", 2)
    item = Item("x", "q", "42")
    assert wl.grade(item, "6 * 7 = 42\nAnswer: 42") and not wl.grade(item, "Answer: 41 (not 42)")
    assert wl.grade(item, "so it is 42.") and wl.answer_of(item, "6 * 7 = 42\nAnswer: 42") == "42"
    assert wl.answer_of(item, "Answer: 41 (not 42)") == "41"


def test_preamble_is_shared_by_every_agent_and_the_judge():
    from conftest import make_tiny

    from kvcomm.agents.runner import MultiAgentRunner
    from kvcomm.reuse.engine import ReuseEngine

    lm = make_tiny()
    for name in ("gsm", "coding"):
        wl = load_workload(name, 1)
        assert wl.preamble.startswith(TEAM_PROTOCOL) and "{" not in wl.preamble and "}" not in wl.preamble
        runner = MultiAgentRunner(ReuseEngine(lm, "dense"), wl, 3)
        lines = [f"{wl.roles[k]} You are agent {k}." for k in range(3)] + [wl.decision_role]
        for agent, line in zip([*(runner.templates[(0, k)] for k in range(3)), runner.decider], lines):
            # no chat template on the tiny tokenizer: the prompt opens with the system text itself
            assert agent.template.texts[0].startswith(f"{wl.preamble}\n{line}\n")
    math = load_workload("math", 1)
    assert math.preamble == "" and math.role("You are a tutor.") == "You are a tutor."


def test_humaneval_has_164_problems_and_code_blocks_are_extracted():
    from kvcomm.agents.sandbox import extract_code, run_humaneval

    assert len(load_workload("coding", 1000).items) == 164
    prompt = "import math\n\ndef area(r):\n    \"\"\"Area of a circle.\"\"\"\n"
    test = "def check(f):\n    assert abs(f(1) - math.pi) < 1e-9\n"
    replies = ["Here it is:\n```python\ndef area(r):\n    return math.pi * r * r\n```\nDone.",
               "```Python\ndef area(r):\n    return math.pi * r ** 2\n```",
               "```py\nprint('example')\n```\nand\n```python\ndef area(r):\n    return math.pi * r * r\n```",
               "The function:\ndef area(r):\n    return math.pi * r * r\n",
               "```python\ndef area(r):\n    return math.pi * r * r\n"]  # cut off before the closing fence
    for reply in replies:
        assert run_humaneval(prompt, reply, test, "area").passed, extract_code(prompt, reply, "area")
    assert not run_humaneval(prompt, "```python\ndef area(r):\n    return r\n```", test, "area").passed
