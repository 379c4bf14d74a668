"""Task generators (deterministic, answers checkable from the context) and answer metrics."""

from __future__ import annotations

import json

import pytest

from kvcomm.core.datasets import read_jsonl
from kvcomm.core.errors import DataError
from kvcomm.experiments.metrics import exact_match, match, normalise, rouge_l_recall, token_f1
from kvcomm.experiments.tasks import TASKS, generate, landmarks


@pytest.mark.parametrize("task", ["countries", "tipsheets", "twohop", "needle", "needle:1000"])
def test_generators_are_deterministic_and_well_formed(task):
    a, b, c = generate(task, 50, seed=1), generate(task, 50, seed=1), generate(task, 50, seed=2)
    assert a == b and a != c
    assert len({x["id"] for x in a}) == 50
    for item in a:
        assert item["context"] and item["question"] and item["answers"] and all(item["answers"])


def test_answers_are_checkable_from_the_context():
    table = {lm: country for lm, _, country in landmarks()}
    for item in generate("countries", 100, 3):
        landmark = item["context"].split(" is at ", 1)[1].rstrip(".")
        assert table[landmark] == item["answers"][0]
    for item in generate("tipsheets", 100, 3):
        good_tip = [s for s in item["context"].split(". ") if item["answers"][0] in s][0]
        assert not any(bad in good_tip for bad in ("lawsuit", "lost", "fraud", "losses", "shut down"))
    for item in generate("twohop", 100, 3):
        assert item["answers"][0] in item["context"]
    for item in generate("needle:500", 20, 3):
        assert f"The secret code is {item['answers'][0]}." in item["context"]
        assert len(item["context"].split()) == 500 + 5


def test_generated_items_round_trip_through_the_user_jsonl_format(tmp_path):
    path = tmp_path / "items.jsonl"
    items = generate("twohop", 5, 0)
    path.write_text("\n".join(json.dumps(x) for x in items))
    assert read_jsonl(path, require_answers=True) == items


def test_bad_jsonl_lines_are_named(tmp_path):
    cases = {'{"context": "c", "question": "q"}\nnot json\n': ":2: not valid JSON",
             '[1, 2]\n': ":1: expected a JSON object",
             '{"context": 3, "question": "q"}\n': ":1: field 'context'",
             '{"context": "c", "question": "q", "answers": "x"}\n': ":1: field 'answers'",
             '{"id": 1, "context": "c", "question": "q"}\n{"id": 1, "context": "c", "question": "q"}\n': ":2: duplicate id"}
    for text, needle in cases.items():
        path = tmp_path / "bad.jsonl"
        path.write_text(text)
        with pytest.raises(DataError, match=needle):
            read_jsonl(path)
    with pytest.raises(DataError, match="unknown task"):
        generate("nope", 1)
    with pytest.raises(DataError, match="positive"):
        generate("needle:x", 1)
    assert set(TASKS) == {"countries", "tipsheets", "twohop", "needle"}


def test_metrics():
    assert normalise("The  United States!") == "united states"
    assert token_f1("United States", ["the United States"]) == 1.0
    assert token_f1("in the United States of America", ["United States"]) == pytest.approx(2 * (2 / 5) * 1 / (2 / 5 + 1))
    assert match("It is in the United States.", ["United States"])  # F1 = 2/3 > 0.5
    assert not match("Kansas", ["United States"])
    assert exact_match("the france.", ["France"]) and not exact_match("France today", ["France"])
    assert rouge_l_recall("p q x r", ["p q r s"]) == pytest.approx(3 / 4)
    assert token_f1("", ["x"]) == 0.0 and token_f1("", [""]) == 1.0
