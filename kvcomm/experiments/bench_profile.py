"""`kvcomm bench --profile`: where the time of one reuse call and of the sharing receiver goes.

torch.profiler tables (sorted by device time on CUDA) of one agent-5 reuse call of the benchmark's
setting and of one KVComm receiver prefill per context length of the preset, each followed by the CPU
and device time of the engine's labelled phases (`record_function` ranges: match, assemble, forward).
Not compiled: profiles show the kernels eager PyTorch issues.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kvcomm.core.generation import sync
from kvcomm.core.kv import last_prefill_path
from kvcomm.experiments.bench import ONE_TOKEN
from kvcomm.experiments.bench_models import PRESETS, agent_templates, random_ids, random_model, random_request
from kvcomm.experiments.profiling import call_profiler, profile_text
from kvcomm.reuse.anchors import AnchorPool
from kvcomm.reuse.engine import ReuseEngine
from kvcomm.sharing.selection import layers_for
from kvcomm.sharing.send_receive import receive_prefill, send


def profile_calls(preset: str = "gpu", out: Path | None = None, device: str | None = None) -> str:
    """torch.profiler tables for one agent-5 reuse call and one KVComm receiver prefill per context length of the
    preset (where time goes), each with the CPU and device time of the labelled phases."""
    cfg, n_agents, prefix, user, reply, *_, contexts = PRESETS[preset]
    lm = random_model(preset, device)
    vocab = lm.config.vocab_size
    g = torch.Generator().manual_seed(1)
    templates = agent_templates(n_agents, prefix, g, vocab)
    pool = AnchorPool(byte_budget=1 << 40, gamma=1.0)
    engine = ReuseEngine(lm, "reuse", pool=pool, config=ONE_TOKEN)

    for seed in range(3):
        q, reps = random_request(lm, seed, n_agents, user, reply)
        for k, agent in enumerate(templates):
            engine.force_new_anchors = seed == 0
            engine.call(agent, {"user_question": q, **{f"agent_{j}_current": reps[j] for j in range(k)}}, request=seed)
        pool.commit(seed)
    q, reps = random_request(lm, 99, n_agents, user, reply)
    engine.base_kv(q)
    last = templates[-1]
    args = {"user_question": q, **{f"agent_{j}_current": reps[j] for j in range(n_agents - 1)}}
    engine.call(last, args, request="p")
    sync(lm.device)
    with call_profiler(lm.device) as prof:
        res = engine.call(last, args, request="p")
        sync(lm.device)
    text = [profile_text(prof, lm.device, f"reuse call, agent {n_agents}: path={res.path} ttft={res.ttft_s * 1e3:.1f} ms")]
    for n in contexts:  # the receiver at every context length of the preset
        ctx, qq = random_ids(n, g, vocab), random_ids(32, g, vocab)
        msg = send(lm, ctx).select(layers_for("contiguous", 0.5, lm.num_layers))
        receive_prefill(lm, qq, [msg])
        sync(lm.device)
        with call_profiler(lm.device) as prof:
            receive_prefill(lm, qq, [msg])
            sync(lm.device)
        text.append(profile_text(prof, lm.device, f"KVComm receiver prefill, {n} context tokens, 0.5 of layers, "
                                                  f"path={last_prefill_path()}"))
        del msg
    report = "\n".join(text)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "profile.txt").write_text(report)
    return report
