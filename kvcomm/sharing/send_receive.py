"""Selective KV sharing (KVComm, Shi et al. 2025): sender prefill, receiver generation.

Sender: one prefill over the context only; its KV (keys after RoPE, positions 0..|C|-1) for every
layer becomes a `KVMessage`, of which the chosen layers are sent.

Receiver: builds a `DynamicCache` in which each *selected* layer starts with the sender's KV and each
unselected layer starts empty, so nothing at sender positions exists there to be attended. Its own
tokens take positions |C|..|C|+|Q|-1 in every layer (RoPE scores depend on relative position only,
so in unselected layers this equals restarting at 0). One 4-D mask sized for the longest layer is
causal over the receiver's tokens and open over the sender's; the `kvcomm` attention function
right-aligns it per layer (see `kvcomm.attention`).

Several senders: their messages are placed one after another; message i's keys are re-rotated from
their own start position to the running offset, so positions stay consistent (each sender still only
saw its own context). A layer holds the messages that selected it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch.profiler import record_function

from kvcomm.core.attention import ImportanceRecorder
from kvcomm.core.fingerprint import fingerprint
from kvcomm.core.generation import greedy_continue, sync
from kvcomm.core.generation import stop_ids as default_stop_ids
from kvcomm.core.kv import hold, ids_tensor, prefill
from kvcomm.core.message import KVMessage
from kvcomm.core.models import LoadedModel
from kvcomm.core.rope import rerotate


@torch.no_grad()
def send(lm: LoadedModel, context_ids, layers=None, meta: dict | None = None) -> KVMessage:
    """Prefill the context alone and return its KV (all layers, or only `layers`)."""
    ids = ids_tensor(context_ids, lm.device)
    _, cache, _ = prefill(lm, ids)
    n = lm.num_layers
    msg = KVMessage(
        layers=list(range(n)),
        keys=[cache.layers[i].keys for i in range(n)],
        values=[cache.layers[i].values for i in range(n)],
        fingerprint=fingerprint(lm.model, lm.tokenizer),
        position_start=0,
        meta=dict(meta or {}, context_tokens=int(ids.shape[1])),
    )
    return msg if layers is None else msg.select(layers)


def build_prefix_cache(lm: LoadedModel, messages: list[KVMessage]):
    """A DynamicCache holding each message's KV in the layers it selected; returns (cache, prefix_len)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=lm.model.config)
    cfg = lm.model.config
    n = lm.num_layers
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_layer: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(n)]
    offset = 0
    for msg in messages:
        msg = msg.to(lm.device, lm.dtype)
        shift = offset - msg.position_start
        for layer, k, v in zip(msg.layers, msg.keys, msg.values):
            per_layer[layer].append((rerotate(lm.model, k, shift) if shift else k, v))
        offset += msg.seq_len
    empty = torch.empty(1, kv_heads, 0, head_dim, device=lm.device, dtype=lm.dtype)
    for layer in range(n):
        parts = per_layer[layer]
        k = (parts[0][0] if len(parts) == 1 else torch.cat([p[0] for p in parts], dim=-2)) if parts else empty
        v = (parts[0][1] if len(parts) == 1 else torch.cat([p[1] for p in parts], dim=-2)) if parts else empty
        hold(cache, layer, k, v)  # no copy of a single sender's KV
    return cache, offset


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    ttft_s: float
    total_s: float
    prompt_tokens: int
    prefix_tokens: int
    first_logits: torch.Tensor | None = field(default=None, repr=False)


def receive_prefill(lm: LoadedModel, ids, messages: list[KVMessage] | None = None,
                    recorder: ImportanceRecorder | None = None, all_logits: bool = False, fast: bool | None = None):
    """Run the receiver's prompt over the prefix built from `messages`; return (logits, cache, prefix_len).
    A short prompt runs on the graph-captured path on CUDA (`kvcomm.core.kv.prefill`; `fast` as there)."""
    with record_function("kvcomm.receive.prefix"):
        cache, prefix = build_prefix_cache(lm, messages or [])
    return prefill(lm, ids, cache, start=prefix, recorder=recorder, all_logits=all_logits, fast=fast)


@torch.no_grad()
def generate(
    lm: LoadedModel,
    ids,
    messages: list[KVMessage] | KVMessage | None = None,
    max_new_tokens: int = 32,
    stop_ids: list[int] | None = None,
) -> Generation:
    """Greedy generation of the receiver's answer, with the messages' KV in front of its own."""
    if isinstance(messages, KVMessage):
        messages = [messages]
    ids = ids_tensor(ids, lm.device)
    stops = set(stop_ids if stop_ids is not None else default_stop_ids(lm))
    sync(lm.device)
    start = time.perf_counter()
    logits, cache, prefix = receive_prefill(lm, ids, messages)
    first_logits = logits[0, -1].float().cpu()
    sync(lm.device)
    ttft = time.perf_counter() - start
    out_ids = greedy_continue(lm, cache, logits[0, -1], prefix + ids.shape[1], max_new_tokens, stops)
    sync(lm.device)
    text = lm.tokenizer.decode(out_ids, skip_special_tokens=True).strip()
    return Generation(text, out_ids, ttft, time.perf_counter() - start, ids.shape[1], prefix, first_logits)
