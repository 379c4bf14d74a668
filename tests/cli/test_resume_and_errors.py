"""Interrupted benchmark runs resume; every CLI user error is one line, exit 2, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvcomm.cli.main import main
from kvcomm.experiments import bench


def _fake_reuse(calls, fail_on):
    def fake(lm, n_agents, prefix, user, reply, anchors=2, repeats=1):
        calls.append((prefix, reply))
        if len(calls) == fail_on:
            raise RuntimeError("killed")  # the run dies during this sweep point
        agent = {"ttft_ms": float(prefix), "speedup_vs_dense": 1.0}
        return {m: {"per_agent": [agent] * n_agents} for m in ("dense", "prefix", "reuse")}
    return fake


def test_interrupted_benchmark_resumes_without_redoing_finished_points(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(bench, "bench_reuse", _fake_reuse(calls, fail_on=3))
    with pytest.raises(RuntimeError, match="killed"):
        bench.run_bench(bench.BenchConfig("cpu", "cpu", repeats=2, anchors=1, parts=("sweep",)), tmp_path)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert len(saved["sweep"]) == 2 and not list(tmp_path.glob("*.partial"))
    calls.clear()
    monkeypatch.setattr(bench, "bench_reuse", _fake_reuse(calls, fail_on=None))
    report = bench.run_bench(bench.BenchConfig("cpu", "cpu", repeats=2, anchors=1, parts=("sweep",)), tmp_path)
    assert calls == [(64, 32), (64, 64)]  # only the two unfinished points ran
    assert [(r["prefix"], r["output"]) for r in report["sweep"]] == [(32, 32), (32, 64), (64, 32), (64, 64)]
    calls.clear()  # other settings do not resume from these results
    bench.run_bench(bench.BenchConfig("cpu", "cpu", repeats=3, anchors=1, parts=("sweep",)), tmp_path)
    assert len(calls) == 4


@pytest.mark.parametrize(("argv", "needle"), [
    # missing files
    (["inspect", "/no/such.kv"], "does not exist"),
    (["receive", "--message", "/no/such.kv", "--question", "q", "--model", "/no/model/dir"], "unknown model"),
    (["share", "--context", "@/no/such.txt", "--question", "q"], "does not exist"),
    (["eval", "share", "--tasks", "/no/such.jsonl"], "does not exist"),
    (["calibrate", "--samples", "/no/such.jsonl", "--model", "/no/model/dir"], "unknown model"),
    # unknown model / device / dtype
    (["share", "--model", "missing.gguf", "--context", "c", "--question", "q"], "does not exist"),
    (["share", "--device", "tpu9", "--context", "c", "--question", "q"], "unknown device"),
    (["share", "--dtype", "float8", "--context", "c", "--question", "q"], "unknown dtype"),
    # bad flag values
    (["share", "--ratio", "1.5", "--context", "c", "--question", "q"], "ratio must be in (0, 1]"),
    (["share", "--ratio", "abc", "--context", "c", "--question", "q"], "ratio must be a number"),
    (["share", "--selection", "best", "--context", "c", "--question", "q"], "invalid choice"),
    (["receive", "--message", "m", "--question", "q", "--max-bytes", "-1"], "positive integer"),
    (["agents", "--agents", "40"], "must be in [1, 16]"),
    (["agents", "--gamma", "2"], "must be in [0.0, 1.0]"),
    (["agents", "--tau", "0"], "must be in (0.0, inf]"),
    (["agents", "--limit", "0"], "positive integer"),
    (["agents", "--workload", "poetry"], "invalid choice"),
    (["agents", "--shard", "3/2"], "0 <= K < N"),
    (["agents", "--report-only", "--out", "/no/such/dir"], "no shard results"),
    (["bench", "--parts", "reuse,speed"], "unknown part"),
    (["eval", "share", "--methods", "telepathy"], "unknown method"),
    (["eval", "share", "--ratios", "0.5,2"], "--ratios"),
    (["eval", "share", "--tasks", "needle:abc"], "needle length"),
    (["eval", "share", "--tasks", "poems"], "unknown task"),
    (["eval", "share", "--shard", "2/2"], "0 <= K < N"),
    (["eval", "share", "--shard", "half"], "expected K/N"),
    (["frobnicate"], "invalid choice"),
    (["share", "--question", "q"], "required: --context"),
])
def test_every_user_error_is_one_line_and_exit_2(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("KVCOMM_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        code = main(argv)
    except SystemExit as e:  # argparse errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_errors_found_after_loading_end_with_one_error_line(tiny_dir, capsys):
    code = main(["share", "--model", str(tiny_dir), "--layers", "0,99", "--context", "c", "--question", "q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == "kvcomm: error: layer list '0,99' must name layers in 0..3"
    assert not any("Traceback" in line or "error" in line for line in err[:-1])


def test_bad_jsonl_line_is_named(tmp_path, capsys):
    bad = tmp_path / "data.jsonl"
    bad.write_text('{"id": 1, "context": "c", "question": "q", "answers": ["a"]}\n\n{"context": 3}\n')
    assert main(["eval", "share", "--tasks", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "data.jsonl:3" in err and len(err.splitlines()) == 1


def test_a_real_process_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kvcomm.cli", "agents", "--gamma", "nan?"], capture_output=True,
                          text=True, timeout=120, env={"KVCOMM_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "--gamma" in proc.stderr
