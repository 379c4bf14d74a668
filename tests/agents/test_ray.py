"""Ray backend on a local 2-CPU cluster: same outputs as one process, and faults survived."""

from __future__ import annotations

import pytest
from conftest import make_tiny

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # starts a local Ray cluster

from kvcomm.agents.remote import RayEngine, share  # noqa: E402
from kvcomm.agents.runner import MultiAgentRunner  # noqa: E402
from kvcomm.agents.workloads import Workload, math_items  # noqa: E402
from kvcomm.core.errors import IncompatibleModelError  # noqa: E402
from kvcomm.core.models import load_model  # noqa: E402
from kvcomm.reuse.anchors import PoolConfig  # noqa: E402
from kvcomm.reuse.config import ReuseConfig  # noqa: E402
from kvcomm.reuse.engine import ReuseEngine  # noqa: E402

ROLES = ["you are one", "you are two", "you are three"]


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def workload(n=3):
    return Workload("math", ROLES, "answer", "judge", math_items(n, 0))


def calls(results):
    return [[(c["path"], c["reply_ids"]) for c in r.calls] for r in results]


def run_local(model_dir, items, mode="reuse", pool=PoolConfig(), with_engine=False, config=ReuseConfig(max_new_tokens=4)):
    engine = ReuseEngine(load_model(str(model_dir), progress=False), mode, pool=pool.build(), config=config)
    runner = MultiAgentRunner(engine, workload(), 3, "fully_connected")
    got = [runner.run_item(it) for it in items]
    return (got, engine) if with_engine else got


def test_ray_backend_gives_the_single_process_outputs(tiny_dir, cluster):
    wl = workload()
    items = wl.items + wl.items[:1]  # the replayed item reuses every call
    engine = RayEngine(str(tiny_dir), "reuse", ReuseConfig(max_new_tokens=4))
    try:
        remote = MultiAgentRunner(engine, wl, 3, "fully_connected")
        got = [remote.run_item(it) for it in items]
        stats = engine.pool.stats()
    finally:
        engine.shutdown()
    want = run_local(tiny_dir, items)
    assert calls(got) == calls(want)
    assert [c["path"] for c in got[-1].calls] == ["reuse"] * 4 and [r.final for r in got] == [r.final for r in want]
    assert stats["anchors"] > 0 and stats["matches"] > 0
    # KV crossed processes: later agents fetched the question's base KV and earlier replies' KV, and the
    # replay's pool sync carried anchors; the single process moved none
    assert all(c["wire_bytes"] > 0 for r in got for c in r.calls[1:]) and all(c["wire_bytes"] == 0 for r in want for c in r.calls)


def test_partial_reuse_on_the_ray_backend_gives_the_single_process_outputs(tiny_dir, cluster):
    """`+partial` across actors: the first item's calls are partial (every placeholder new), their anchors reach
    the replicas, and the replay reuses; every call's path and reply equal the single-process run's."""
    wl = workload(2)
    items = wl.items + wl.items[:1]
    config = ReuseConfig(max_new_tokens=4, partial=True)
    engine = RayEngine(str(tiny_dir), "reuse", config)
    try:
        remote = MultiAgentRunner(engine, wl, 3, "fully_connected")
        got = [remote.run_item(it) for it in items]
    finally:
        engine.shutdown()
    want = run_local(tiny_dir, items, config=config)
    assert calls(got) == calls(want)
    assert [c["path"] for c in got[0].calls] == ["partial"] * 4 and [c["path"] for c in got[-1].calls] == ["reuse"] * 4


def test_replicas_match_like_the_central_pool_with_eviction_and_compressed_offsets(tiny_dir, cluster):
    """Agents match on local replicas: with a pool that evicts (2 anchors per placeholder, use counts decided
    by the pool actor) and stores int8 offsets (shipped dequantized), every call and the pool's counters equal
    one process's; and no agent call waits on more than one pool round trip before its first token."""
    wl, pool = workload(8), PoolConfig(max_anchors=2, offset_precision="int8")
    tok = load_model(str(tiny_dir), progress=False).tokenizer
    by_length = sorted(wl.items, key=lambda it: len(tok(it.question)["input_ids"]))  # a longer question: new anchor
    items = by_length + by_length[:3]
    engine = RayEngine(str(tiny_dir), "reuse", ReuseConfig(max_new_tokens=4), pool)
    try:
        remote = MultiAgentRunner(engine, wl, 3, "fully_connected")
        got = [remote.run_item(it) for it in items]
        stats = engine.pool.stats()
        trips = [t for a in engine.agents.values() for t in ray.get(a.info.remote())["pool_round_trips"]]
        counts = ray.get(engine.pool_actor.call_counts.remote())
    finally:
        engine.shutdown()
    want, local = run_local(tiny_dir, items, pool=pool, with_engine=True)
    assert calls(got) == calls(want)
    assert stats == local.pool.stats().__dict__ and stats["evictions"] > 0 and stats["matches"] > 0
    n_calls = sum(len(r.calls) for r in got)
    assert len(trips) == n_calls and max(trips) == 1  # every reuse-mode call syncs once, and only once
    assert counts["changes"] == n_calls and counts["report"] <= n_calls  # no other pool call from the agents


def test_an_agent_killed_mid_call_is_restarted_and_the_answers_do_not_change(tiny_dir, cluster):
    wl = workload()
    engine = RayEngine(str(tiny_dir), "reuse", ReuseConfig(max_new_tokens=4))
    submit, killed = engine.submit, {}

    def submit_then_kill(agent, contents, request):
        refs = submit(agent, contents, request)
        if agent.agent_id == "agent1" and not killed:  # kill the actor while its call is in flight
            ray.kill(engine.agents["agent1"], no_restart=False)
            killed["done"] = True
        return refs

    engine.submit = submit_then_kill
    try:
        engine.start(["agent1"])
        before = ray.get(engine.agents["agent1"].info.remote())["pid"]
        remote = MultiAgentRunner(engine, wl, 3, "fully_connected")
        got = [remote.run_item(it) for it in wl.items]
        after = ray.get(engine.agents["agent1"].info.remote())["pid"]
    finally:
        engine.shutdown()
    assert killed and before != after  # it really died and came back
    assert calls(got) == calls(run_local(tiny_dir, wl.items))


def wait_dead(actor, timeout: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ray.get(actor.stats.remote(), timeout=10)
        except ray.exceptions.RayActorError:  # ActorDiedError: gone for good
            return
        except ray.exceptions.GetTimeoutError:
            continue
        time.sleep(0.05)
    raise AssertionError("the killed actor still answers")


def test_losing_the_pool_falls_back_to_dense_never_to_wrong_reuse(tiny_dir, cluster):
    wl = workload()
    engine = RayEngine(str(tiny_dir), "reuse", ReuseConfig(max_new_tokens=4))
    try:
        remote = MultiAgentRunner(engine, wl, 3, "fully_connected")
        first = [remote.run_item(it) for it in wl.items[:2]]
        ray.kill(engine.pool_actor, no_restart=True)  # the pool holder dies between requests
        wait_dead(engine.pool_actor)  # ray.kill is asynchronous: a call sent at once may still be served
        rest = [remote.run_item(it) for it in wl.items]
    finally:
        engine.shutdown()
    assert all(c["path"] == "dense" for r in rest for c in r.calls)
    # with no pool every call is a dense prefill, so the answers are exactly dense mode's
    assert calls(rest) == calls(run_local(tiny_dir, wl.items, mode="dense"))
    assert len(first) == 2


def test_sharing_between_actors_matches_local_and_refuses_a_foreign_receiver(tiny_dir, tmp_path, cluster):
    from kvcomm.sharing.prompts import receiver_ids, sender_ids
    from kvcomm.sharing.send_receive import generate, send

    ctx, q, layers = "uma is at the house in paris", "which country is uma in", [1, 3]
    got = share(str(tiny_dir), ctx, q, layers, max_new_tokens=4)
    lm = load_model(str(tiny_dir), progress=False)
    want = generate(lm, receiver_ids(lm.tokenizer, q), send(lm, sender_ids(lm.tokenizer, ctx), layers), max_new_tokens=4)
    assert got["token_ids"] == want.token_ids and got["bytes"] > 0
    other = make_tiny(seed=1)
    other.model.save_pretrained(tmp_path / "other")
    other.tokenizer.save_pretrained(tmp_path / "other")
    with pytest.raises(IncompatibleModelError, match="different model"):
        share(str(tiny_dir), ctx, q, layers, receiver_model=str(tmp_path / "other"))


def test_cli_agents_with_the_ray_backend(tiny_dir, tmp_path, cluster, capsys):
    import json

    from kvcomm.cli.main import main

    out = tmp_path / "run"
    assert main(["agents", "--model", str(tiny_dir), "--backend", "ray", "--agents", "2", "--limit", "2",
                 "--max-new-tokens", "3", "--mode", "reuse", "--out", str(out)]) == 0
    report = json.loads((out / "agents.json").read_text())
    assert report["backend"] == "ray" and len(report["modes"]["reuse"]["items"]) == 2
    assert report["modes"]["reuse"]["pool"]["anchors"] > 0
