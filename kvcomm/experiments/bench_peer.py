"""The peer row of `kvcomm bench`: what transformers already gives, timed beside kvcomm in one run.

The same appended segment both ways: a `question`-token segment run after a cached context of n
tokens (a receiver holding the sender's KV, a reused agent's last tokens), then greedy decoding.
  kvcomm        `kvcomm.core.kv.prefill` of the segment after the context's KV (graph-captured short
                forward on CUDA; its eager path beside it), then `greedy_continue` (graph decode).
  transformers  `model.generate` on [context; segment] with a `StaticCache` already holding the
                context, SDPA attention: it prefills the segment eagerly and, on CUDA, auto-compiles
                the decoding forward with the static cache (its documented fast path).
TTFT = one call that returns the first token. Per-token decode time = (time for 1 + N tokens − time
for 1 token) / N, medians over `repeats`. Compilation happens in an untimed warm-up. The context's
KV is built once, outside the timed region, and copied back before every timed call.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from kvcomm.core.generation import greedy_continue, sync
from kvcomm.core.kv import cache_to_block, last_prefill_path, prefill
from kvcomm.experiments.bench_models import random_ids


def _median_ms(lm, fn, setup, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        state = setup()
        sync(lm.device)
        t = time.perf_counter()
        fn(state)
        sync(lm.device)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _kvcomm_times(lm, ctx, q, tokens: int, repeats: int) -> dict:
    _, cache, _ = prefill(lm, ctx)
    block = cache_to_block(cache)

    def first(_=None, fast=None):
        logits, c, _ = prefill(lm, q, block, fast=fast)
        return logits, c

    def generate(_=None):
        logits, c = first()
        greedy_continue(lm, c, logits[0, -1], len(ctx) + len(q), tokens, stops=set(), feed_last=True)

    first(), generate()  # captures and warm-up
    ttft = _median_ms(lm, first, lambda: None, repeats)
    path = last_prefill_path()
    eager = _median_ms(lm, lambda _: first(fast=False), lambda: None, repeats)
    total = _median_ms(lm, generate, lambda: None, repeats)
    return {"ttft_ms": ttft, "path": path, "eager_ttft_ms": eager, "decode_ms_per_token": (total - ttft) / tokens}


def _transformers_times(lm, ctx, q, tokens: int, repeats: int) -> dict:
    from transformers import StaticCache

    model = lm.model
    previous = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        static = StaticCache(config=model.config, max_cache_len=len(ctx) + len(q) + tokens + 8)
        with torch.no_grad():
            model(input_ids=torch.tensor([ctx], device=lm.device), past_key_values=static, use_cache=True)
        full = torch.tensor([ctx + q], device=lm.device)
        ones = torch.ones_like(full)

        def gen(cache, n):
            with torch.no_grad():
                model.generate(input_ids=full, attention_mask=ones, past_key_values=cache, max_new_tokens=n,
                               min_new_tokens=n, do_sample=False, pad_token_id=0)

        fresh = lambda: copy.deepcopy(static)  # noqa: E731
        gen(fresh(), tokens + 1), gen(fresh(), 1)  # compiles the decoding forward on CUDA
        ttft = _median_ms(lm, lambda c: gen(c, 1), fresh, repeats)
        total = _median_ms(lm, lambda c: gen(c, tokens + 1), fresh, repeats)
        compiled = bool(getattr(model, "_compiled_call", None))
    finally:
        model.set_attn_implementation(previous)
    return {"ttft_ms": ttft, "decode_ms_per_token": (total - ttft) / tokens, "compiled": compiled}


def bench_peer(lm, contexts=(1024, 4096), question: int = 32, tokens: int = 32, repeats: int = 5) -> dict:
    """Per context length: kvcomm's and transformers' TTFT for the appended segment and ms per decoded token."""
    g = torch.Generator().manual_seed(11)
    vocab = lm.config.vocab_size
    rows = []
    for n in contexts:
        ctx, q = random_ids(n, g, vocab), random_ids(question, g, vocab)
        row = {"context_tokens": n, "kvcomm": _kvcomm_times(lm, ctx, q, tokens, repeats),
               "transformers": _transformers_times(lm, ctx, q, tokens, repeats)}
        row["ttft_ratio"] = row["transformers"]["ttft_ms"] / row["kvcomm"]["ttft_ms"]
        row["decode_ratio"] = row["transformers"]["decode_ms_per_token"] / row["kvcomm"]["decode_ms_per_token"]
        rows.append(row)
        if lm.device.type == "cuda":
            torch.cuda.empty_cache()
    return {"rows": rows, "question_tokens": question, "decode_tokens": tokens}
