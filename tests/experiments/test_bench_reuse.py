"""The reuse part of `kvcomm bench` on a tiny model: which path each setting takes and what it prefills,
with every placeholder matching and with the newest one failing the entropy test (`missing`)."""

from __future__ import annotations

import pytest

from kvcomm.experiments.bench import bench_reuse

USER, REPLY, SEGMENT = 12, 10, 8  # question and reply lengths here; bench_models.agent_templates' segments


def _run(lm, modes, missing):
    return bench_reuse(lm, n_agents=3, prefix=16, user=USER, reply=REPLY, anchors=2, repeats=1, modes=modes,
                       missing=missing)


def test_every_placeholder_matches_by_default(tiny):
    out = _run(tiny, ("dense", "reuse"), missing=0)
    assert [r["path"] for r in out["dense"]["per_agent"]] == ["dense"] * 3
    assert [r["path"] for r in out["reuse"]["per_agent"]] == ["reuse"] * 3


def test_a_failing_placeholder_costs_a_dense_prefill_or_only_itself_with_partial(tiny):
    out = _run(tiny, ("dense", "reuse", "reuse+partial"), missing=1)
    paper, partial = out["reuse"]["per_agent"], out["reuse+partial"]["per_agent"]
    assert [r["path"] for r in paper] == ["dense"] * 3  # the paper: any failure → the whole prompt
    assert [r["path"] for r in partial] == ["partial"] * 3
    for k, (a, b) in enumerate(zip(paper, partial)):
        assert a["prompt_tokens"] == b["prompt_tokens"]
        newest = USER if k == 0 else REPLY  # agent 1's only placeholder is the question
        # partial prefills the failing placeholder and the template segment after it (the last token of
        # which is the one every path runs), where the paper prefills the whole prompt
        assert a["prefilled_tokens"] - b["prefilled_tokens"] == a["prompt_tokens"] - (newest + SEGMENT)


def test_relay_prefills_the_newest_reply_and_the_segments_around_it(tiny):
    """The agents share the headers before each reply and the closing segment (as the workloads' prompts do), so
    from agent 2 on relay reuses the previous agent's transcript up to the newest reply: it prefills that reply,
    its header and the closing segment, whatever the agent's position; relay@0.5 adds half the relayed tokens."""
    out = _run(tiny, ("dense", "relay", "relay@0.5"), missing=0)
    relay, half = out["relay"]["per_agent"], out["relay@0.5"]["per_agent"]
    assert [r["path"] for r in relay] == ["prefix", "relay", "relay"]
    assert relay[0]["prefilled_tokens"] == USER + SEGMENT  # agent 1: everything after its own first segment
    assert [r["prefilled_tokens"] for r in relay[1:]] == [REPLY + 2 * SEGMENT] * 2
    for k in (1, 2):
        relayed = relay[k]["prompt_tokens"] - 16 - relay[k]["prefilled_tokens"]  # 16: the first segment
        assert half[k]["prefilled_tokens"] == relay[k]["prefilled_tokens"] + -(-relayed // 2)


def test_relay_decision_is_refused_where_no_agent_decides(tiny):
    """The benchmark's agents are agent0..N-1: `+decision` would recompute nowhere and time plain relay."""
    with pytest.raises(ValueError, match="no decision agent"):
        _run(tiny, ("relay@0.1+decision",), missing=0)


def test_a_reuse_only_run_writes_json_and_plot_with_the_failing_placeholders(tmp_path):
    from kvcomm.experiments.bench import BenchConfig, run_bench

    config = BenchConfig("cpu", "cpu", repeats=1, anchors=1, parts=("reuse",), reuse_settings=("dense", "reuse+partial"),
                         missing_anchors=1)
    report = run_bench(config, tmp_path)
    assert report["key"]["missing_anchors"] == 1
    assert [r["path"] for r in report["reuse"]["reuse+partial"]["per_agent"]] == ["partial"] * 5
    assert (tmp_path / "bench.json").exists() and (tmp_path / "bench.png").stat().st_size > 0


def test_profile_names_the_reuse_call_and_each_receiver(tmp_path):
    from kvcomm.experiments.bench_profile import profile_calls

    text = profile_calls("cpu", tmp_path, "cpu")
    assert "reuse call, agent 5: path=reuse" in text
    assert text.count("KVComm receiver prefill") == 2 and text.count("phases of the call") == 3
    assert (tmp_path / "profile.txt").read_text() == text


def test_profile_calls_profiles_each_settings_last_call_in_the_timing_harness(tiny, tmp_path):
    """relay@0.5:attention's picker runs its own forward inside `choose`: the profile of its last agent's call
    names relay's three phases, and the recompute forward runs once per call."""
    out = bench_reuse(tiny, n_agents=3, prefix=16, user=USER, reply=REPLY, anchors=1, repeats=1,
                      modes=("reuse", "relay@0.5:attention"), profile_dir=tmp_path)
    relay = (tmp_path / "profile-relay@0.5_attention.txt").read_text()
    last = out["relay@0.5:attention"]["per_agent"][-1]
    assert relay.startswith("relay@0.5:attention, agent 3: path=relay")
    assert f"prefilled {last['prefilled_tokens']} of {last['prompt_tokens']} tokens" in relay.splitlines()[0]
    phases = {line.split()[0]: line.split()[-1] for line in relay.splitlines() if line.startswith("  kvcomm.")}
    assert phases["kvcomm.relay.past"] == phases["kvcomm.relay.choose"] == phases["kvcomm.relay.forward"] == "x1"
    assert "kvcomm.reuse.assemble" in (tmp_path / "profile-reuse.txt").read_text()
