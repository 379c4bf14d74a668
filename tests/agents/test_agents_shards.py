"""Sharded and resumed `kvcomm agents` runs, the merged report, and the share of replies at the budget."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from conftest import make_tiny
from hypothesis import given
from hypothesis import strategies as st

from kvcomm.agents.runner import MultiAgentRunner
from kvcomm.core.errors import DataError
from kvcomm.experiments.agents_report import (
    AgentsConfig,
    build_report,
    cap_share,
    prefill_fraction,
    run_modes,
)
from kvcomm.experiments.agents_shards import collect, mode_file, read_rows, shard_dir, shard_range
from kvcomm.reuse.config import ReuseConfig

CONFIG = AgentsConfig(model="tiny", workload="math", agents=2, modes=("dense",), limit=5, warmup=1,
                      reuse=ReuseConfig(max_new_tokens=3))


@given(st.integers(0, 200), st.integers(1, 12))
def test_shards_cover_every_item_exactly_once_in_contiguous_slices(n_items, n):
    ranges = [shard_range(n_items, k, n) for k in range(n)]
    assert [i for r in ranges for i in r] == list(range(n_items))
    assert max(map(len, ranges)) - min(map(len, ranges)) <= 1
    with pytest.raises(ValueError):
        shard_range(n_items, n, n)


def _same_items(a: dict, b: dict) -> None:
    """Two reports agree on everything but timings."""
    for mode in a["modes"]:
        x, y = a["modes"][mode], b["modes"][mode]
        for key in ("accuracy", "prefilled_tokens", "prompt_tokens", "cap_share", "cap_share_final", "finished",
                    "prefill_fraction", "answer_agreement_with_dense", "call_agreement_with_dense"):
            assert x[key] == y[key], (mode, key)
        strip = [[(it["id"], it["final"], it["answer"], [c["reply_ids"] for c in it["calls"]]) for it in m["items"]]
                 for m in (x, y)]
        assert strip[0] == strip[1]


@pytest.fixture(scope="module")
def lm():
    return make_tiny()


@pytest.fixture(scope="module")
def whole(lm, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    return out, run_modes(lm, CONFIG, progress=False, out=out)


def test_shards_merge_into_the_unsharded_report(lm, whole, tmp_path):
    _, report = whole
    assert [it["index"] for it in report["modes"]["dense"]["items"]] == list(range(5))
    for k in range(2):
        part = run_modes(lm, replace(CONFIG, shard=(k, 2)), progress=False, out=tmp_path)
        assert [it["index"] for it in part["modes"]["dense"]["items"]] == list(shard_range(5, k, 2))
    _, meta, rows = collect(tmp_path)
    assert meta["shards"] == 2 and meta["shards_found"] == [0, 1]
    _same_items(report, build_report(meta, rows, CONFIG.warmup))


def test_a_killed_run_resumes_skipping_finished_items(lm, whole, tmp_path, monkeypatch):
    src, report = whole
    d = shard_dir(tmp_path, 0, 1)
    d.mkdir(parents=True)
    (d / "run.json").write_text((shard_dir(src, 0, 1) / "run.json").read_text())
    lines = mode_file(shard_dir(src, 0, 1), "dense").read_text().splitlines(keepends=True)
    mode_file(d, "dense").write_text("".join(lines[:2]) + lines[2][:40])  # killed while writing item 2
    ran = []
    real = MultiAgentRunner.run_item
    monkeypatch.setattr(MultiAgentRunner, "run_item", lambda self, item, *a, **k: ran.append(item.id) or real(self, item, *a, **k))
    resumed = run_modes(lm, CONFIG, progress=False, out=tmp_path)
    assert ran == [it["id"] for it in report["modes"]["dense"]["items"][2:]]
    _same_items(report, resumed)
    assert len(read_rows(mode_file(d, "dense"))) == 5
    # the pool of a resumed run starts empty: the warm-up counts again from the resume point
    assert [it["pool_items_before"] for it in resumed["modes"]["dense"]["items"]] == [0, 1, 0, 1, 2]


def test_an_unsharded_run_may_grow_its_limit(lm, whole, tmp_path, monkeypatch):
    import shutil

    src, report = whole
    shutil.copytree(shard_dir(src, 0, 1), shard_dir(tmp_path, 0, 1))
    ran = []
    real = MultiAgentRunner.run_item
    monkeypatch.setattr(MultiAgentRunner, "run_item", lambda self, item, *a, **k: ran.append(item.id) or real(self, item, *a, **k))
    grown = run_modes(lm, replace(CONFIG, limit=6), progress=False, out=tmp_path)
    assert ran == ["math-0-5"] and grown["items"] == 6 and grown["modes"]["dense"]["finished"] == 6
    shrunk = run_modes(lm, replace(CONFIG, limit=3), progress=False, out=tmp_path)
    assert ran == ["math-0-5"] and shrunk["modes"]["dense"]["finished"] == 3
    assert len(collect(tmp_path)[2]["dense"]) == 3


def test_chosen_items_run_alone_and_join_the_folder(lm, whole, tmp_path):
    """`only` (--items) runs just those items, with the rows the whole run gives them; the rest of the folder's
    items fill in later, and an index past --limit is refused."""
    _, report = whole
    part = run_modes(lm, replace(CONFIG, only=(1, 3)), progress=False, out=tmp_path)
    assert [it["index"] for it in part["modes"]["dense"]["items"]] == [1, 3]
    rest = run_modes(lm, CONFIG, progress=False, out=tmp_path)
    _same_items(report, rest)
    with pytest.raises(DataError, match="past the 5 items"):
        run_modes(lm, replace(CONFIG, only=(5,)), progress=False, out=tmp_path)


def test_other_settings_do_not_resume_into_the_same_folder(lm, whole):
    out, _ = whole
    other = replace(CONFIG, seed=1)
    with pytest.raises(DataError, match=r"seed 0 there, 1 now \(--seed\)"):
        run_modes(lm, other, progress=False, out=out)
    with pytest.raises(DataError, match=r"shards 1 there, 2 now \(--shard\)"):
        run_modes(lm, replace(CONFIG, shard=(1, 2)), progress=False, out=out)
    with pytest.raises(DataError, match="has no items"):
        run_modes(lm, replace(CONFIG, limit=1, shard=(0, 2)), progress=False, out=out)


def test_report_only_merges_without_a_model(whole, tmp_path, monkeypatch, capsys):
    import shutil

    import kvcomm.cli.agents as cli
    from kvcomm.cli.main import main

    src, report = whole
    shutil.copytree(shard_dir(src, 0, 1), shard_dir(tmp_path, 0, 1))
    monkeypatch.setattr(cli, "load", lambda args: pytest.fail("--report-only loaded a model"))
    assert main(["agents", "--report-only", "--warmup", "1", "--out", str(tmp_path)]) == 0
    merged = json.loads((tmp_path / "agents.json").read_text())
    _same_items(report, merged)
    assert (tmp_path / "agents_tradeoff.png").stat().st_size > 0 and (tmp_path / "agents_ttft.png").exists()
    assert "merged 1 of 1 shards" in capsys.readouterr().out
    assert main(["agents", "--report-only", "--out", str(tmp_path / "empty")]) == 2


def _row(id_, replies, prefilled, mode="reuse", final="x"):
    calls = [{"reply_ids": [1] * n, "prefilled_tokens": p, "prompt_tokens": 10, "path": "dense", "ttft_ms": 1.0}
             for n, p in zip(replies, prefilled)]
    return {"mode": mode, "id": id_, "index": int(id_), "final": final, "correct": True, "answer": final, "calls": calls}


def test_cap_share_prefill_fraction_and_agreement_by_item_id():
    rows = [_row("0", [4, 2, 4], [5, 5, 5]), _row("1", [1, 4, 3], [2, 2, 2], final="y")]
    assert cap_share(rows, 4) == 3 / 6 and cap_share(rows, 4, final_only=True) == 1 / 2
    assert cap_share(rows, 5) == 0.0
    dense = [_row(str(i), [1, 1, 1], [10, 10, 10], mode="dense") for i in range(3)]
    assert prefill_fraction(dense, rows) == pytest.approx(21 / 60)  # only the items both ran
    meta = {"workload": "math", "agents": 2, "topology": "fully_connected", "max_new_tokens": 4, "items": 3}
    report = build_report(meta, {"dense": dense, "reuse": rows}, warmup=0)
    m = report["modes"]["reuse"]
    assert (m["cap_share"], m["cap_share_final"], m["agreement_items"]) == (0.5, 0.5, 2)
    assert m["answer_agreement_with_dense"] == 0.5 and m["prefill_fraction"] == pytest.approx(0.35)
    assert report["modes"]["dense"]["prefill_fraction"] == 1.0


def test_warmup_applies_only_to_modes_with_an_anchor_pool():
    """Items whose anchor pool was still filling are left out of the reuse rate after warm-up; relay keeps no
    pool (its rows all say 0 items before), so all its items count."""
    def row(mode, i, paths):
        calls = [{"path": p, "reply_ids": [1], "prompt_tokens": 5, "prefilled_tokens": 1} for p in paths]
        return {**_row(str(i), [1] * len(paths), [5] * len(paths), mode=mode), "calls": calls, "pool_items_before": 0}

    meta = {"workload": "math", "agents": 2, "topology": "fully_connected", "max_new_tokens": 4, "items": 2}
    rows = {m: [row(m, i, ["prefix", m]) for i in range(2)] for m in ("relay", "reuse")}
    modes = build_report(meta, rows, warmup=1)["modes"]
    assert modes["relay"]["reuse_rate_after_warmup"] == 0.5
    assert modes["reuse"]["reuse_rate_after_warmup"] == 0.0  # no item past the warm-up


def test_cli_runs_shards_and_merges_them(tiny_dir, tmp_path, capsys):
    from kvcomm.cli.main import main

    args = ["agents", "--model", str(tiny_dir), "--agents", "2", "--limit", "3", "--max-new-tokens", "2",
            "--mode", "dense", "--mode", "prefix", "--out", str(tmp_path)]
    for k in range(2):
        assert main([*args, "--shard", f"{k}/2"]) == 0
    assert "kvcomm agents --report-only" in capsys.readouterr().out and not (tmp_path / "agents.json").exists()
    assert main(["agents", "--report-only", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "agents.json").read_text())
    assert report["shards"] == 2 and list(report["modes"]) == ["dense", "prefix"]
    assert [it["id"] for it in report["modes"]["prefix"]["items"]] == [f"math-0-{i}" for i in range(3)]
    assert report["modes"]["prefix"]["answer_agreement_with_dense"] == 1.0


def test_batch_decode_gives_the_same_report(lm, tmp_path):
    """--batch-decode: the concurrent requests' decodes share a batched step; fp32 replies are unchanged."""
    config = replace(CONFIG, modes=("dense", "reuse"), concurrency=3)
    plain = run_modes(lm, config, progress=False)
    batched = run_modes(lm, replace(config, batch_decode=True), progress=False, out=tmp_path)
    assert batched["batch_decode"] and not plain["batch_decode"]
    assert json.loads((shard_dir(tmp_path, 0, 1) / "run.json").read_text())["settings"]["batch_decode"] == 3
    _same_items(plain, batched)
    with pytest.raises(DataError, match=r"batch_decode 3 there, 2 now \(--concurrency\)"):  # the flag, not the key
        run_modes(lm, replace(config, batch_decode=True, concurrency=2), progress=False, out=tmp_path)


def test_batch_decode_flag_is_local_only():
    from kvcomm.cli.agents import config_of
    from kvcomm.cli.main import build_parser
    from kvcomm.core.errors import KVCommError

    parse = build_parser().parse_args
    assert config_of(parse(["agents", "--batch-decode", "--concurrency", "4"])).batch_decode
    assert not config_of(parse(["agents"])).batch_decode
    with pytest.raises(KVCommError, match="local backend"):
        config_of(parse(["agents", "--batch-decode", "--backend", "ray"]))
