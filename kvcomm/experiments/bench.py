"""`kvcomm bench`: time-to-first-token and bytes on the wire, every method side by side in one run.

Speed does not depend on weight values, so the GPU preset is the real Llama-3.1-8B architecture
(config in `resources/llama-3.1-8b.json`) with *random bf16 weights*, stated in every output; token
ids are random too. Quality is measured elsewhere on real models (`kvcomm agents`, `kvcomm eval`).

Reuse (paper setting): 5 fully connected agents, each with its own 512-token system prefix, a
1,000-token user input, and each agent's 512-token reply passed on to the later agents; per agent
position, median TTFT of dense prefill, prefix caching and KV reuse over the measured requests. The
pool is first filled with `anchors` requests recorded by dense prefill; during measurement γ = 1 so
every call takes the reuse path (random tokens carry no meaning for the entropy test), and matching
runs against the whole pool, so its cost is included; with `missing` > 0 the last `missing` placeholders
of every prompt fail instead (`MissingAnchors`), to time the paper's dense fallback against `+partial`. Replies are random ids whose base KV is computed
outside the timed region (in a real run it is a by-product of the producer's decoding); under `relay` each
reply's transcript (its producer's prompt KV past p0, then the reply prefilled over it) is made the same way.

Sharing: receiver TTFT with a sender message at ratios 0.3/0.5/0.7 (contiguous middle layers; which
layers does not change speed), vs Skyline (receiver prefills context + question) and NLD (sender
decodes a 128-token summary, receiver prefills summary + question), plus payload bytes per token.

Timing: CUDA synchronise + wall clock around each measured call (TTFT is wall time by definition and
includes Python overhead), after warm-up, median of repeats. Dense prefill FLOP utilisation =
(2·params·T + 2·L·T²·d_q) / time / peak (causal attention counted once).
"""

from __future__ import annotations

import json
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from kvcomm.core.files import file_safe, write_atomic
from kvcomm.core.generation import greedy_continue, sync
from kvcomm.core.kv import KVBlock, cache_to_block, last_prefill_path, prefill, prefill_flops
from kvcomm.core.message import encode
from kvcomm.experiments.bench_models import (
    PRESETS,
    MissingAnchors,
    agent_templates,
    environment,
    peak_tflops,
    random_ids,
    random_model,
    random_request,
)
from kvcomm.experiments.bench_peer import bench_peer
from kvcomm.experiments.profiling import call_profiler, profile_text
from kvcomm.reuse.anchors import AnchorPool
from kvcomm.reuse.config import ReuseConfig, parse_setting
from kvcomm.reuse.engine import ReuseEngine
from kvcomm.reuse.relay import Transcript
from kvcomm.sharing.selection import layers_for
from kvcomm.sharing.send_receive import receive_prefill, send

PARTS = ("reuse", "sweep", "sharing", "peer")
ONE_TOKEN = ReuseConfig(max_new_tokens=1)  # TTFT is all a speed benchmark times

def bench_reuse(lm, n_agents: int, prefix: int, user: int, reply: int, anchors: int = 4, repeats: int = 5,
                modes=("dense", "prefix", "reuse"), progress=None, missing: int = 0, profile_dir: Path | None = None) -> dict:
    """Median TTFT per agent position for each setting in `modes` (`parse_setting` names: dense, prefix,
    reuse, blend@0.15, cacheblend@0.15, ...). With `profile_dir`, one more request per setting, after the
    measured ones, runs its last agent's call under torch.profiler: `profile-<setting>.txt` there (kernels and
    the engine's phases; relay: past, choose, forward), so a setting's cost is profiled in the harness that times it."""

    vocab = lm.config.vocab_size
    g = torch.Generator().manual_seed(1)
    templates = agent_templates(n_agents, prefix, g, vocab)

    def run(engine, seed, record=True, watch=None):
        question, replies = random_request(lm, seed, n_agents, user, reply)
        rows = []
        for k, agent in enumerate(templates):
            contents = {"user_question": question, **{f"agent_{j}_current": replies[j] for j in range(k)}}
            with watch if watch is not None and k == n_agents - 1 else nullcontext():
                res = engine.call(agent, contents, request=seed)
            rows.append((res.ttft_s * 1e3, res.path, res.prompt_tokens, res.prefilled_tokens, last_prefill_path()))
            if engine.mode == "relay":
                replies[k].transcript = _relay_transcript(engine, agent, res, replies[k].ids)
        engine.pool.commit(seed) if record else engine.pool.discard(seed)
        return rows

    out = {}
    for setting in modes:
        mode, config = parse_setting(setting, ONE_TOKEN)
        if config.recompute_only:  # its agents are agent0..N-1: nothing would recompute, silently relay's numbers
            raise ValueError(f"{setting}: the benchmark's agents have no decision agent to recompute at; "
                             f"time relay@R instead (the decision agent's call costs what relay@R's last one does)")
        pool = AnchorPool(max_anchors=max(anchors, 1), byte_budget=1 << 40, gamma=1.0)
        engine = ReuseEngine(lm, mode, pool=MissingAnchors(pool, missing) if missing else pool, config=config)
        warm = ReuseEngine(lm, mode, pool=pool, config=config, force_new_anchors=True) if mode == "reuse" else engine
        for s in range(max(anchors, 1)):
            warm._templates = engine._templates
            run(warm, 1000 + s)  # fills the pool (reuse) and warms kernels and allocator (all modes)
        run(engine, 1999, record=False)  # the measured calls' own shapes once (`warm` may take other paths)
        measured = [run(engine, 2000 + s, record=False) for s in range(repeats)]
        per_agent = []
        for k in range(n_agents):
            ttfts = [m[k][0] for m in measured]
            per_agent.append({"agent": k + 1, "ttft_ms": statistics.median(ttfts), "ttft_ms_all": ttfts,
                              "path": measured[-1][k][1], "prompt_tokens": measured[-1][k][2],
                              "prefilled_tokens": measured[-1][k][3], "prefill_path": measured[-1][k][4]})
        out[setting] = {"per_agent": per_agent, "pool_bytes": pool.nbytes, "pool_anchors": pool.stats().anchors}
        if profile_dir is not None:
            prof = call_profiler(lm.device)
            row = run(engine, 2000 + repeats, record=False, watch=prof)[-1]
            title = (f"{setting}, agent {n_agents}: path={row[1]} ttft={row[0]:.1f} ms (under the profiler), prefilled {row[3]} "
                     f"of {row[2]} tokens")
            profile_dir.mkdir(parents=True, exist_ok=True)
            (profile_dir / f"profile-{file_safe(setting)}.txt").write_text(profile_text(prof, lm.device, title))
        if progress:
            progress(setting)
        del engine, warm, pool
        if lm.device.type == "cuda":
            torch.cuda.empty_cache()
    if "dense" in out:
        peak = peak_tflops(lm)
        for row in out["dense"]["per_agent"]:
            tflops = prefill_flops(lm, row["prompt_tokens"]) / (row["ttft_ms"] / 1e3) / 1e12
            row["tflops"] = tflops
            row["flop_utilisation"] = tflops / peak if peak else None
        for m in out.values():
            for row, d in zip(m["per_agent"], out["dense"]["per_agent"]):
                row["speedup_vs_dense"] = d["ttft_ms"] / row["ttft_ms"]
    return out


def _relay_transcript(engine, agent, res, reply: list[int]) -> Transcript:
    """The transcript relay's agent k would leave had it decoded the benchmark's random `reply`: its prompt's
    KV past p0 (from the call), then `reply` prefilled over it. Untimed, like the replies' base KV."""
    t = res.reply.transcript
    n = res.prompt_tokens - t.start
    past = KVBlock.cat([engine.template_kv(agent).p0, t.kv.slice(0, n)])
    _, cache, _ = prefill(engine.lm, reply, past)
    return Transcript(t.ids[:n] + list(reply), cache_to_block(cache, t.start, past.n + len(reply)), t.start)


# ---- sharing --------------------------------------------------------------------------------------
def _timed(lm, fn, repeats: int = 5):
    fn()
    times = []
    for _ in range(repeats):
        sync(lm.device)
        t = time.perf_counter()
        fn()
        sync(lm.device)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _sharing_row(lm, ctx, q, summ, ratios, repeats) -> dict:
    n = len(ctx)
    full = send(lm, ctx)
    peak = peak_tflops(lm)
    row = {"context_tokens": n, "skyline_ms": _timed(lm, lambda: prefill(lm, ctx + q), repeats)}
    row["skyline_tflops"] = prefill_flops(lm, n + len(q)) / (row["skyline_ms"] / 1e3) / 1e12
    row["skyline_flop_utilisation"] = row["skyline_tflops"] / peak if peak else None
    row["sender_prefill_ms"] = _timed(lm, lambda: send(lm, ctx), repeats)

    def nld_sender():
        logits, cache, _ = prefill(lm, ctx)
        greedy_continue(lm, cache, logits[0, -1], n, len(summ), stops=set())

    row["nld_sender_ms"] = _timed(lm, nld_sender, max(1, repeats // 2))
    row["nld_receiver_ms"] = _timed(lm, lambda: prefill(lm, summ + q), repeats)
    row["nld_bytes"] = len(summ) * 4  # token ids as int32
    for r in ratios:
        msg = full.select(layers_for("contiguous", r, lm.num_layers))
        row[f"kvcomm_{r}_ms"] = _timed(lm, lambda m=msg: receive_prefill(lm, q, [m]), repeats)
        row["receiver_path"] = last_prefill_path()
        row[f"eager_kvcomm_{r}_ms"] = _timed(lm, lambda m=msg: receive_prefill(lm, q, [m], fast=False), repeats)
        row[f"kvcomm_{r}_bytes"] = len(encode(msg.to("cpu")))
        row[f"kvcomm_{r}_bytes_per_token"] = msg.payload_bytes / n
        row[f"kvcomm_{r}_layers"] = len(msg.layers)
    row["all_layers_bytes_per_token"] = full.payload_bytes / n
    return row


def bench_sharing(lm, contexts, ratios=(0.3, 0.5, 0.7), question: int = 32, summary: int = 128, repeats: int = 5) -> dict:
    vocab = lm.config.vocab_size
    g = torch.Generator().manual_seed(7)
    rows = []
    for n in contexts:
        rows.append(_sharing_row(lm, random_ids(n, g, vocab), random_ids(question, g, vocab), random_ids(summary, g, vocab), ratios, repeats))
        if lm.device.type == "cuda":
            torch.cuda.empty_cache()
    return {"rows": rows, "question_tokens": question, "summary_tokens": summary}


# ---- report ---------------------------------------------------------------------------------------
def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    both = "sharing" in report  # a run of the reuse part alone plots that alone
    fig, axes = plt.subplots(1, 2 if both else 1, figsize=(12 if both else 7.5, 4.4), squeeze=False)
    axes = axes[0]
    for mode, m in report["reuse"].items():
        axes[0].plot([r["agent"] for r in m["per_agent"]], [r["ttft_ms"] for r in m["per_agent"]], marker="o", label=mode)
    axes[0].set(xlabel="agent position", ylabel="median TTFT (ms)",
                title=f"{report['preset']['agents']} agents, {report['preset']['prefix']}-tok prefix, "
                      f"{report['preset']['user']}-tok input, {report['preset']['reply']}-tok replies"
                      + (f"\nthe newest {report['key']['missing_anchors']} placeholder(s) failing the entropy test"
                         if report.get("key", {}).get("missing_anchors") else ""))
    axes[0].title.set_fontsize(9)
    axes[0].legend()
    axes[0].grid(alpha=0.3)
    if both:
        _plot_sharing(axes[1], report["sharing"]["rows"])
    fig.suptitle(f"{report['env']['model']} ({report['env']['weights']}) on {report['env'].get('gpu', report['env']['device'])}",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_sharing(ax, rows: list[dict]) -> None:
    xs = [r["context_tokens"] for r in rows]
    ax.plot(xs, [r["skyline_ms"] for r in rows], marker="o", label="Skyline (prefill C+Q)")
    ax.plot(xs, [r["nld_sender_ms"] + r["nld_receiver_ms"] for r in rows], marker="o", label="NLD (summary + receiver)")
    for key in [k for k in rows[0] if k.startswith("kvcomm_") and k.endswith("_ms")]:
        ax.plot(xs, [r[key] for r in rows], marker="o", label=f"KVComm {key.split('_')[1]} (receiver)")
        if "eager_" + key in rows[0]:
            ax.plot(xs, [r["eager_" + key] for r in rows], ls="--", alpha=0.6, label=f"KVComm {key.split('_')[1]}, eager")
    ax.set(xscale="log", yscale="log", xlabel="context tokens", ylabel="median time (ms)", title="sharing: receiver TTFT")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def _resumable(path: Path, key: dict, fresh: bool, console) -> dict:
    """The finished parts of an earlier run of the same benchmark (same key), or {} to start over."""
    if fresh or not path.exists():
        return {}
    try:
        old = json.loads(path.read_text())
    except ValueError:
        console.print(f"[yellow]{path} is unreadable; starting over[/yellow]")
        return {}
    if old.get("key") != key:
        console.print(f"[yellow]{path} is from different settings ({old.get('key')}); starting over[/yellow]")
        return {}
    done = [p for p in PARTS if p in old]
    console.print(f"[dim]resuming {path}: {', '.join(done) or 'nothing'} already done"
                  + (f" ({len(old.get('sweep', []))} sweep points)" if "sweep" in old else "") + "[/dim]")
    return old


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run. preset: 'gpu' (Llama-3.1-8B architecture, random bf16 weights) or 'cpu' (a small
    Llama); repeats: measured requests per setting (median reported); anchors: anchors per placeholder in
    the pool while timing; parts: any of reuse, sweep, sharing; fresh: ignore finished parts in the output;
    reuse_settings: the settings of the reuse part (`parse_setting` names); missing_anchors: placeholders
    per prompt (the last ones) that fail the entropy test while timing (0: none); profile_calls: write
    profile-<setting>.txt beside bench.json, one last-agent call of each reuse setting under torch.profiler."""

    preset: str = "cpu"
    device: str | None = None
    repeats: int = 5
    anchors: int = 4
    parts: tuple[str, ...] = PARTS
    fresh: bool = False
    reuse_settings: tuple[str, ...] = ("dense", "prefix", "reuse")
    missing_anchors: int = 0
    profile_calls: bool = False


def run_bench(config: BenchConfig, out: Path) -> dict:
    """Run the chosen parts; bench.json is rewritten atomically after every part and sweep point, and a
    re-run with the same settings and output folder skips what is already there (`fresh` starts over)."""

    console = Console(stderr=True)
    preset, repeats, anchors, parts = config.preset, config.repeats, config.anchors, config.parts
    cfg, n_agents, prefix, user, reply, sweep_prefix, sweep_out, contexts = PRESETS[preset]
    with console.status("building the random-weight model …"):
        lm = random_model(preset, config.device)
    env = environment(lm)
    key = {"preset": preset, "repeats": repeats, "anchors": anchors, "device": env["device"], "dtype": env["dtype"],
           "reuse_settings": list(config.reuse_settings), "missing_anchors": config.missing_anchors}
    out.mkdir(parents=True, exist_ok=True)
    path = out / "bench.json"
    report = _resumable(path, key, config.fresh, console)
    report.update({"key": key, "preset": {"name": preset, "agents": n_agents, "prefix": prefix, "user": user,
                                          "reply": reply}, "env": env})
    console.print(f"[dim]{report['env']}[/dim]")

    def save():
        write_atomic(path, json.dumps(report, indent=1))

    if "reuse" in parts and "reuse" not in report:
        with console.status(f"reuse: {' / '.join(config.reuse_settings)} …"):
            report["reuse"] = bench_reuse(lm, n_agents, prefix, user, reply, anchors, repeats, config.reuse_settings,
                                          missing=config.missing_anchors,
                                          profile_dir=out if config.profile_calls else None)
        save()
    if "reuse" in report:
        _print_reuse(console, report["reuse"])
    if "sweep" in parts:
        done = {(r["prefix"], r["output"]) for r in report.setdefault("sweep", [])}
        for p in sweep_prefix:
            for o in sweep_out:
                if (p, o) in done:
                    continue
                with console.status(f"sweep: prefix {p}, output {o} …"):
                    r = bench_reuse(lm, 3, p, user, o, anchors=2, repeats=max(2, repeats // 2))
                report["sweep"].append({"prefix": p, "output": o, "agent3_dense_ms": r["dense"]["per_agent"][2]["ttft_ms"],
                                        "agent3_prefix_ms": r["prefix"]["per_agent"][2]["ttft_ms"],
                                        "agent3_reuse_ms": r["reuse"]["per_agent"][2]["ttft_ms"],
                                        "agent3_speedup": r["reuse"]["per_agent"][2]["speedup_vs_dense"]})
                save()
        console.print("sweep (agent 3 speedup of reuse over dense): " +
                      ", ".join(f"p{r['prefix']}/o{r['output']}: {r['agent3_speedup']:.2f}x" for r in report["sweep"]))
    if "sharing" in parts and "sharing" not in report:
        with console.status("sharing: KVComm vs Skyline vs NLD …"):
            report["sharing"] = bench_sharing(lm, contexts, repeats=repeats)
        save()
    if "sharing" in report:
        _print_sharing(console, report["sharing"])
    if "peer" in parts and "peer" not in report:
        with console.status("peer: transformers generate (static cache, compiled decode) vs kvcomm …"):
            report["peer"] = bench_peer(lm, contexts[:2], repeats=repeats)
        save()
    if "peer" in report:
        _print_peer(console, report["peer"])
    save()
    if "reuse" in report:
        plot(report, out / "bench.png")
    return report


def _print_reuse(console, reuse: dict) -> None:
    t = Table(title="TTFT per agent (median ms); speedup vs dense")
    t.add_column("agent")
    for mode in reuse:
        t.add_column(mode)
    t.add_column("dense prefill TFLOP/s (util.)")
    n = len(next(iter(reuse.values()))["per_agent"])
    for k in range(n):
        cells = [f"{reuse[m]['per_agent'][k]['ttft_ms']:.1f} ({reuse[m]['per_agent'][k].get('speedup_vs_dense', 1):.2f}x)" for m in reuse]
        d = reuse.get("dense", {}).get("per_agent", [{}] * n)[k]
        util = f"{d.get('tflops', 0):.0f} ({d['flop_utilisation']:.0%})" if d.get("flop_utilisation") else f"{d.get('tflops', 0):.2f}"
        t.add_row(str(k + 1), *cells, util)
    console.print(t)


def _print_peer(console, peer: dict) -> None:
    t = Table(title=f"{peer['question_tokens']} tokens after a cached context, then {peer['decode_tokens']} greedy tokens: "
                    "kvcomm vs transformers generate (StaticCache, compiled decode)")
    for c in ("context", "kvcomm TTFT ms (path)", "eager TTFT ms", "transformers TTFT ms", "kvcomm ms/token", "transformers ms/token"):
        t.add_column(c)
    for r in peer["rows"]:
        k, h = r["kvcomm"], r["transformers"]
        t.add_row(str(r["context_tokens"]), f"{k['ttft_ms']:.1f} ({k['path']})", f"{k['eager_ttft_ms']:.1f}", f"{h['ttft_ms']:.1f}",
                  f"{k['decode_ms_per_token']:.2f}", f"{h['decode_ms_per_token']:.2f}" + ("" if h["compiled"] else " (not compiled)"))
    console.print(t)


def _print_sharing(console, sharing: dict) -> None:
    rows = sharing["rows"]
    t = Table(title="sharing: receiver TTFT (ms) and bytes per context token")
    for col in ("context", "Skyline", "NLD send+recv", *[k.split("_")[1] for k in rows[0] if k.startswith("kvcomm_") and k.endswith("_ms")],
                "eager receiver", "bytes/token @0.3/0.5/0.7/all"):
        t.add_column(col)
    for r in rows:
        ks = [k for k in r if k.startswith("kvcomm_") and k.endswith("_ms")]
        bpt = "/".join(f"{r[k.replace('_ms', '_bytes_per_token')]:.0f}" for k in ks) + f"/{r['all_layers_bytes_per_token']:.0f}"
        t.add_row(str(r["context_tokens"]), f"{r['skyline_ms']:.1f}", f"{r['nld_sender_ms']:.0f}+{r['nld_receiver_ms']:.1f}",
                  *[f"{r[k]:.1f}" for k in ks], "/".join(f"{r['eager_' + k]:.1f}" for k in ks if "eager_" + k in r), bpt)
    console.print(t)
