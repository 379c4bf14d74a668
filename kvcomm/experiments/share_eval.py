"""`kvcomm eval share`: selective-sharing methods × tasks, resumable, with the paper's metrics.

Methods (KVComm paper §4): `baseline` (question only), `skyline` (context + question), `nld`,
`cipher`, `ac-replace` / `ac-mean` / `ac-sum` (see `kvcomm.baselines`), and at each ratio
`kvcomm` (attention importance + prior, calibrated once), `kvcomm-online` (recalibrated every T
queries), `random` (seeded) and `contiguous` (the best-scoring contiguous chunk of the same size).

Choices where the paper is silent:
- Prompts follow the paper's layout by default (`layout`, see `kvcomm.sharing.prompts`): the receiver
  has its own complete chat prompt, asks for the answer only, and the rankings are calibrated in the
  layout they serve. `layout="split"` with `answer_prefix="The answer is:"` and 12 tokens is the
  earlier setting (the receiver continues Skyline's prompt).
- Two scores per reply (`kvcomm.experiments.share_report`): `contains` (a gold answer occurs in the
  reply) and the paper's token-F1 match on the reply's first line ("The Sydney Opera House is located
  in Australia." scores F1 0.25 against "Australia": F1 alone measures verbosity). The answer budget is
  32 tokens and every row records whether the reply hit it (`capped`). The raw reply is kept.
- The static ranking per task is calibrated on one sample: for a generated task a held-out one
  (seed + 1000); for a user JSONL file its first item, which is also evaluated.
- `kvcomm-online`: at every T-th query of a task (0, T, 2T, …) the sender sends all layers, the
  receiver records Eq. 1 on it, and the ranking becomes the mean Ŝ over all such queries so far; that
  query is then answered with the new selection. Its bytes count the full message on those queries.

Every finished (task, item, method) is appended to `results.jsonl` at once and skipped on a re-run,
so an interrupted run resumes where it stopped; a torn last line (a kill mid-write) is dropped.
Summary files are written to a temporary name and renamed. Costs per item: bytes on the wire,
analytic FLOPs for sender and receiver (`kvcomm.core.kv.prefill_flops`), sender time and receiver TTFT.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from kvcomm.core.datasets import read_jsonl
from kvcomm.core.errors import DataError
from kvcomm.core.files import write_atomic
from kvcomm.core.fingerprint import fingerprint
from kvcomm.core.kv import prefill_flops
from kvcomm.experiments.metrics import contains, exact_match, match, rouge_l_recall, token_f1
from kvcomm.experiments.share_report import PLAIN_METHODS, ranking_file, read_results, summarise, write_report
from kvcomm.experiments.tasks import generate as generate_task
from kvcomm.sharing import baselines
from kvcomm.sharing.prompts import DEFAULT_LAYOUT, split_prompt
from kvcomm.sharing.selection import (
    DEFAULT_SPAN,
    Ranking,
    calibrate,
    calibrate_fidelity,
    layers_for,
    ranking_score,
)
from kvcomm.sharing.selection import METHODS as RATIO_METHODS
from kvcomm.sharing.send_receive import generate, send

DEFAULT_METHODS = ("baseline", "skyline", "nld", "cipher", "ac", "kvcomm", "kvcomm-online", "random", "contiguous")
DEFAULT_TASKS = ("countries", "tipsheets", "twohop", "needle")
ANSWER_PREFIX = ""


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation run; every default is documented here once.

    tasks              generated task names (countries, tipsheets, twohop, needle[:words]) or .jsonl paths
    methods            method names; 'ac' stands for its three modes
    ratios             layer ratios of the ratio methods (kvcomm, kvcomm-online, random, contiguous)
    limit              items per task
    max_new_tokens     answer length cap (rows record whether a reply hit it: `capped`)
    answer_prefix      text that starts every reply (see the module docstring)
    layout             prompt layout of sender, receiver, Skyline and Baseline (`kvcomm.sharing.prompts`)
    span               the key columns calibration counts: the sender's tokens or its context's (`selection`)
    precision          KV message precision (fp8/int8/int4/bf16/…; None: the model's dtype, sent as is); the
                       receiver answers from what it decodes, and `bytes` counts the encoded message
    calibration_items  held-out items per task the rankings (attention and fidelity) are calibrated on
    recalibrate_every  T of kvcomm-online
    summary_tokens     NLD / CIPHER message length
    ac_layer           AC's layer k = j (None: round(26/32 · layers))
    shard              (k, n): run only items whose index is k mod n
    """

    tasks: tuple[str, ...] = DEFAULT_TASKS
    methods: tuple[str, ...] = DEFAULT_METHODS
    ratios: tuple[float, ...] = (0.3, 0.5, 0.7)
    limit: int = 200
    seed: int = 0
    max_new_tokens: int = 32
    answer_prefix: str = ANSWER_PREFIX
    layout: str = DEFAULT_LAYOUT
    span: str = DEFAULT_SPAN
    precision: str | None = None
    calibration_items: int = 1
    recalibrate_every: int = 50
    summary_tokens: int = 48
    ac_layer: int | None = None
    shard: tuple[int, int] = (0, 1)

    def method_names(self) -> list[str]:
        return method_names(list(self.methods), list(self.ratios))


def load_items(task: str, limit: int, seed: int) -> list[dict]:
    if task.endswith(".jsonl"):
        return read_jsonl(task, require_answers=True)[:limit]
    return generate_task(task, limit, seed)


def expand_methods(methods: list[str]) -> list[str]:
    """'ac' stands for its three modes; unknown names raise DataError."""
    out = []
    for m in methods:
        names = [f"ac-{mode}" for mode in baselines.AC_MODES] if m == "ac" else [m]
        for name in names:
            if name not in PLAIN_METHODS + RATIO_METHODS:
                raise DataError(f"unknown method {m!r}; choose from {', '.join(PLAIN_METHODS + RATIO_METHODS)} or ac")
            out.append(name)
    return out


def method_names(methods: list[str], ratios: list[float]) -> list[str]:
    names = []
    for m in expand_methods(methods):
        names += [f"{m}@{r}" for r in ratios] if m in RATIO_METHODS else [m]
    return names


def task_ranking(lm, task: str, config: EvalConfig, out: Path, score: str = "attention") -> Ranking:
    """The task's ranking by `score`, calibrated on `config.calibration_items` held-out items (the paper:
    one), saved under out/rankings."""
    path = ranking_file(out, task, score)
    if path.exists():
        return Ranking.load(path)
    held_out = load_items(task, config.calibration_items, config.seed + 1000)  # a JSONL file: its first items
    sample = [(item["context"], item["question"]) for item in held_out]
    if score == "fidelity":
        ranking = calibrate_fidelity(lm, sample, task=task, answer_prefix=config.answer_prefix, layout=config.layout)
    else:
        ranking = calibrate(lm, sample, task=task, answer_prefix=config.answer_prefix, layout=config.layout,
                            span=config.span)
    ranking.save(path)
    return ranking


class OnlineRanking:
    """Rankings recalibrated every `every` queries of one task: mean Ŝ over queries 0, T, 2T, … ≤ i."""

    def __init__(self, lm, items: list[dict], config: EvalConfig):
        self.lm, self.items, self.config, self.every = lm, items, config, config.recalibrate_every
        self._by_round: dict[int, Ranking] = {}

    def at(self, index: int) -> tuple[Ranking, bool]:
        """The ranking in force for query `index`, and whether that query was a recalibration."""
        rounds = index // self.every
        if rounds not in self._by_round:
            samples = [(it["context"], it["question"]) for it in self.items[: index + 1 : self.every]]
            self._by_round[rounds] = calibrate(self.lm, samples, task="online", answer_prefix=self.config.answer_prefix,
                                               layout=self.config.layout, span=self.config.span)
        return self._by_round[rounds], index % self.every == 0


class ItemState:
    """What several methods of one item share: the prompt split and the sender's all-layer message."""

    def __init__(self, lm, item: dict, config: EvalConfig):
        self.split = split_prompt(lm.tokenizer, item["context"], item["question"], answer_prefix=config.answer_prefix,
                                  layout=config.layout)
        self.lm, self.item, self._msg, self.send_s = lm, item, None, 0.0

    def message(self):
        if self._msg is None:
            start = time.perf_counter()
            self._msg = send(self.lm, self.split.sender_ids)
            self.send_s = time.perf_counter() - start
        return self._msg


def run_item(lm, item: dict, method: str, ranking: Ranking | None, config: EvalConfig = EvalConfig(),
             state: ItemState | None = None, online: OnlineRanking | None = None) -> dict:
    """One (item, method): the receiver's answer, its scores and its costs, as one results row."""
    prefix, max_new_tokens, summary_tokens, layout = (config.answer_prefix, config.max_new_tokens, config.summary_tokens,
                                                      config.layout)
    name, _, ratio = method.partition("@")
    state = state or ItemState(lm, item, config)
    split = state.split
    n_ctx, n_q = len(split.sender_ids), len(split.receiver_ids)
    ctx, question = item["context"], item["question"]
    cost = {"layers": [], "bytes": 0, "sender_flops": 0.0, "sender_s": 0.0, "message": ""}
    if name == "baseline":
        gen = generate(lm, split.baseline_ids, max_new_tokens=max_new_tokens)
        cost["receiver_flops"] = prefill_flops(lm, gen.prompt_tokens)
    elif name == "skyline":
        gen = generate(lm, split.skyline_ids, max_new_tokens=max_new_tokens)
        cost["receiver_flops"] = prefill_flops(lm, len(split.skyline_ids))
    elif name == "nld":
        gen, extra = baselines.nld(lm, ctx, question, max_new_tokens, summary_tokens, prefix, layout=layout)
        cost.update(extra)
    elif name == "cipher":
        gen, extra = baselines.cipher(lm, ctx, question, max_new_tokens, summary_tokens, prefix, layout=layout)
        cost.update(extra)
    elif name.startswith("ac-"):
        gen, extra = baselines.ac(lm, ctx, question, name[3:], max_new_tokens, config.ac_layer, prefix, layout=layout)
        cost.update(extra)
    else:
        recalibrated = False
        if name == "kvcomm-online":
            ranking, recalibrated = online.at(item["_index"])
        layers = layers_for(name, float(ratio), lm.num_layers, ranking, config.seed)
        full = state.message()
        msg = full.select(layers)
        if config.precision:
            msg = msg.quantized(config.precision)
        sent = (full.quantized(config.precision) if recalibrated else msg).wire_bytes if config.precision else \
            (full.payload_bytes if recalibrated else msg.payload_bytes)
        cost.update(layers=layers, bytes=sent,
                    sender_flops=prefill_flops(lm, n_ctx), sender_s=state.send_s)
        gen = generate(lm, split.receiver_ids, msg, max_new_tokens=max_new_tokens)
        cost["receiver_flops"] = prefill_flops(lm, n_q, past=round(n_ctx * len(layers) / lm.num_layers))
    answer, answers = (gen.text.splitlines() or [""])[0].strip(), item["answers"]
    return {"task": item["_task"], "id": item["id"], "method": method, "answer": answer, "reply": gen.text,
            "f1": token_f1(answer, answers), "match": match(answer, answers), "em": exact_match(answer, answers),
            "rouge_l": rouge_l_recall(answer, answers), "contains": contains(gen.text, answers),
            "capped": len(gen.token_ids) >= max_new_tokens, **cost, "ttft_ms": gen.ttft_s * 1e3,
            "total_ms": gen.total_s * 1e3}


SETTING_DEFAULTS = {"calibration_items": 1}


def check_run_settings(out: Path, settings: dict) -> None:
    """Refuse to resume into `out` a run whose rows would not be comparable with those already there.

    `out/run.json` records the model's fingerprint, dtype and every setting that changes an item's
    result; a resumed run must match it, or the table would silently mix two models (or two
    generation lengths). The task list, methods and --limit may change (they add rows, not alter
    them). A directory from before run.json existed is adopted as is."""
    path = out / "run.json"
    if path.exists():
        try:
            before = json.loads(path.read_text())
        except ValueError as e:
            raise DataError(f"cannot read {path}: {e}; delete it to adopt {out} for this run") from None
        before = {**SETTING_DEFAULTS, **before}  # settings added since a run.json was written took these values
        diff = [f"{k} {before.get(k)!r} there, {v!r} now" for k, v in settings.items() if before.get(k) != v]
        if diff:
            raise DataError(f"{out} holds results of another run ({'; '.join(diff)}); use a new --out, "
                            f"or rerun with the same settings to resume")
    else:
        write_atomic(path, json.dumps(settings, indent=1))


def run_eval(lm, config: EvalConfig, out: Path, progress: bool = True) -> dict:
    """Run every (item, method) of `config` not yet in `out`/results.jsonl. `config.shard=(k, n)` runs
    only items whose index is k mod n, so n processes (or machines) can split a run; each result depends
    on its item alone (online recalibration reads fixed earlier items, not earlier results), so the rows
    of the shards, concatenated, are the rows of one whole run."""
    from tqdm.auto import tqdm

    c, tasks = config, list(config.tasks)
    out.mkdir(parents=True, exist_ok=True)
    check_run_settings(out, {"model": fingerprint(lm.model, lm.tokenizer).short, "dtype": str(lm.dtype).removeprefix("torch."),
                             "seed": c.seed, "max_new_tokens": c.max_new_tokens, "answer_prefix": c.answer_prefix,
                             "recalibrate_every": c.recalibrate_every, "summary_tokens": c.summary_tokens,
                             "ac_layer": c.ac_layer, "layout": c.layout, "span": c.span, "precision": c.precision,
                             "calibration_items": c.calibration_items})
    results_path = out / "results.jsonl"
    done = read_results(results_path)
    names = c.method_names()
    per_task, rankings, online = {}, {}, {}
    for task in tasks:
        items = load_items(task, c.limit, c.seed)
        scores = {ranking_score(m.partition("@")[0]) for m in names if m.partition("@")[0] in RATIO_METHODS}
        rankings[task] = {score: task_ranking(lm, task, c, out, score) for score in sorted(scores)}
        online[task] = OnlineRanking(lm, items, c)
        per_task[task] = [dict(item, _task=task, _index=i) for i, item in enumerate(items)]
    # Item i of every task before item i + 1 of any: an interrupted run still gives a balanced table.
    k, n = c.shard
    todo = [(item, m) for i in range(max(map(len, per_task.values()), default=0))
            for task in tasks if i < len(per_task[task]) for item in [per_task[task][i]]
            for m in names if (task, item["id"], m) not in done and i % n == k]
    skipped = len(done)
    state = None
    with open(results_path, "a") as f:
        for item, m in tqdm(todo, desc="eval", disable=not progress, unit="run"):
            if state is None or state.item is not item:
                state = ItemState(lm, item, c)
            task = item["_task"]
            row = run_item(lm, item, m, rankings[task].get(ranking_score(m.partition("@")[0])), c, state, online[task])
            f.write(json.dumps(row) + "\n")
            f.flush()
            done[(row["task"], row["id"], row["method"])] = row
    summary = summarise(list(done.values()), tasks, names)
    orders = {t: r["fidelity"].order() for t, r in rankings.items() if "fidelity" in r}
    summary.update({"model": lm.name, "limit": c.limit, "seed": c.seed, "ran": len(todo), "resumed": skipped,
                    "answer_prefix": c.answer_prefix, "recalibrate_every": c.recalibrate_every, "layout": c.layout,
                    "span": c.span, "precision": c.precision, "calibration_items": c.calibration_items,
                    "max_new_tokens": c.max_new_tokens,
                    "ac_layer": baselines.ac_layer(lm.num_layers) if c.ac_layer is None else c.ac_layer,
                    "rankings": {t: r["attention"].raw for t, r in rankings.items() if "attention" in r},
                    **({"fidelity_orders": orders} if orders else {})})
    write_report(out, summary)
    return summary
