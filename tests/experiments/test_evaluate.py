"""Evaluation runner: a user JSONL file end to end, resumption, outputs; CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_tiny

from kvcomm.cli.main import main
from kvcomm.core.errors import DataError
from kvcomm.experiments.share_eval import EvalConfig, method_names, run_eval

FIXTURE = str(Path(__file__).parents[1] / "data" / "fixture.jsonl")


def evaluate(lm, tasks, methods, ratios, out, **settings):
    """run_eval with the settings spelled out as EvalConfig fields."""
    config = EvalConfig(tasks=tuple(tasks), methods=tuple(methods), ratios=tuple(ratios), **settings)
    return run_eval(lm, config, out, progress=False)


def test_user_jsonl_end_to_end_and_resume(tmp_path):
    lm = make_tiny()
    methods, ratios = ["baseline", "skyline", "kvcomm", "random", "contiguous"], [0.25, 0.5]
    s1 = evaluate(lm, [FIXTURE, "twohop"], methods, ratios, limit=3, out=tmp_path, max_new_tokens=3)
    names = method_names(methods, ratios)
    assert len(names) == 8
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 3 * 8 and s1["ran"] == 48 and s1["resumed"] == 0
    kv = [r for r in rows if r["method"] == "kvcomm@0.5"]
    assert all(len(r["layers"]) == 2 and r["bytes"] > 0 and r["sender_flops"] > 0 for r in kv)
    assert all(r["bytes"] == 0 for r in rows if r["method"] in ("baseline", "skyline"))
    assert all(0 <= r["f1"] <= 1 for r in rows)
    # interrupted run: drop the last 5 rows, re-run, only those are recomputed
    (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:-5]) + "\n")
    s2 = evaluate(lm, [FIXTURE, "twohop"], methods, ratios, limit=3, out=tmp_path, max_new_tokens=3)
    assert s2["ran"] == 5 and s2["resumed"] == 43
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 48
    for f in ("summary.json", "table.md", "eval.png", "rankings/fixture.json"):
        assert (tmp_path / f).exists(), f
    table = (tmp_path / "table.md").read_text()
    assert "| kvcomm@0.5 |" in table and "fixture" in table
    # the report of a partial run needs no model and counts only what finished
    (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:10]) + "\n")
    (tmp_path / "table.md").unlink()
    args = ["eval", "share", "--tasks", f"{FIXTURE},twohop", "--methods", ",".join(methods), "--ratios", "0.25,0.5",
            "--out", str(tmp_path), "--report-only"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rows"] == 10 and summary["partial"] and (tmp_path / "table.md").exists()


def test_every_method_runs_and_online_recalibration_pays_for_full_messages(tmp_path):
    lm = make_tiny()
    methods = ["baseline", "skyline", "nld", "cipher", "ac", "kvcomm", "kvcomm-online", "random", "contiguous"]
    s = evaluate(lm, ["twohop", "countries"], methods, [0.5], limit=3, out=tmp_path, max_new_tokens=2,
                 recalibrate_every=2, summary_tokens=4)
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert s["ran"] == len(rows) == 2 * 3 * 11
    # interleaved: item 0 of both tasks comes before item 1 of either
    assert [r["id"].rsplit("-", 1)[1] for r in rows[::11]] == ["0", "0", "1", "1", "2", "2"]
    online = [r for r in rows if r["method"] == "kvcomm-online@0.5" and r["task"] == "twohop"]
    static = [r for r in rows if r["method"] == "kvcomm@0.5" and r["task"] == "twohop"]
    # queries 0 and 2 recalibrate (T = 2): they send all layers; query 1 sends only the selection
    assert online[0]["bytes"] == online[2]["bytes"] == 2 * static[0]["bytes"] and online[1]["bytes"] == static[1]["bytes"]
    for m in ("nld", "cipher", "ac-replace", "ac-mean", "ac-sum"):
        assert s["table"][m]["twohop"]["n"] == 3 and s["table"][m]["twohop"]["sender_flops"] > 0


def test_a_torn_last_line_is_dropped_and_recomputed(tmp_path):
    lm = make_tiny()
    evaluate(lm, ["twohop"], ["baseline", "skyline"], [0.5], limit=2, out=tmp_path, max_new_tokens=2)
    path = tmp_path / "results.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # killed mid-write
    s = evaluate(lm, ["twohop"], ["baseline", "skyline"], [0.5], limit=2, out=tmp_path, max_new_tokens=2)
    assert s["ran"] == 1 and s["resumed"] == 3
    def untimed(text):
        return [{k: v for k, v in json.loads(x).items() if not k.endswith(("_ms", "_s"))} for x in text]

    assert untimed(path.read_text().splitlines()) == untimed(lines)
    assert not list(tmp_path.glob("*.partial"))


def test_resuming_with_another_model_or_setting_is_refused(tmp_path):
    kw = dict(methods=["baseline", "kvcomm"], ratios=[0.5], limit=1, out=tmp_path)
    evaluate(make_tiny(seed=0), ["twohop"], max_new_tokens=2, **kw)
    rows = (tmp_path / "results.jsonl").read_text()
    with pytest.raises(DataError, match="holds results of another run.*model .*use a new --out"):
        evaluate(make_tiny(seed=1), ["twohop"], max_new_tokens=2, **kw)  # same architecture, other weights
    with pytest.raises(DataError, match="max_new_tokens 2 there, 3 now"):
        evaluate(make_tiny(seed=0), ["twohop"], max_new_tokens=3, **kw)
    assert (tmp_path / "results.jsonl").read_text() == rows  # nothing was mixed in
    s = evaluate(make_tiny(seed=0), ["twohop", "countries"], max_new_tokens=2, **kw)  # more tasks: allowed
    assert s["resumed"] == 2 and s["ran"] == 2


def test_shards_concatenated_equal_one_run(tmp_path):
    lm = make_tiny()
    kw = dict(methods=["baseline", "kvcomm", "kvcomm-online"], ratios=[0.5], limit=3, max_new_tokens=2,
              recalibrate_every=2)
    evaluate(lm, ["twohop"], out=tmp_path / "whole", **kw)
    for k in range(2):
        evaluate(lm, ["twohop"], out=tmp_path / f"s{k}", shard=(k, 2), **kw)

    def untimed(folder):
        rows = [json.loads(x) for x in (tmp_path / folder / "results.jsonl").read_text().splitlines()]
        return sorted(tuple(sorted((k, str(v)) for k, v in r.items() if not k.endswith(("_ms", "_s")))) for r in rows)

    assert len(untimed("s0")) == 2 * 3 and len(untimed("s1")) == 3
    assert untimed("whole") == sorted(untimed("s0") + untimed("s1"))


@pytest.mark.parametrize(("argv", "needle"), [
    (["eval", "share", "--tasks", "nope"], "unknown task"),
    (["eval", "share", "--tasks", "/no/such.jsonl"], "does not exist"),
    (["eval", "share", "--methods", "telepathy"], "unknown method"),
    (["eval", "share", "--ratios", "2"], "--ratios"),
])
def test_eval_cli_errors(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_eval_cli_names_a_bad_jsonl_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "c", "question": "q", "answers": ["a"]}\n{broken\n')
    assert main(["eval", "share", "--tasks", str(bad)]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err


def test_precision_sends_compressed_messages_and_is_part_of_the_run(tmp_path):
    lm = make_tiny()
    kw = dict(methods=["kvcomm"], ratios=[0.5], limit=2, max_new_tokens=2)
    full = evaluate(lm, ["twohop"], out=tmp_path / "full", **kw)
    int8 = evaluate(lm, ["twohop"], out=tmp_path / "int8", precision="int8", **kw)
    assert int8["precision"] == "int8" and full["precision"] is None
    b_full, b_int8 = (s["table"]["kvcomm@0.5"]["twohop"]["bytes"] for s in (full, int8))
    assert 0 < b_int8 < 0.6 * b_full  # fp32 KV on CPU: int8 codes plus scales and header
    with pytest.raises(DataError, match="precision"):
        evaluate(lm, ["twohop"], out=tmp_path / "int8", precision="int4", **kw)  # another precision: refused
    with pytest.raises(DataError, match="precision"):
        evaluate(lm, ["twohop"], out=tmp_path / "int8", **kw)  # nor the model's dtype into an int8 run
