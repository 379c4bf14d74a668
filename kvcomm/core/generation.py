"""Greedy decoding from a prepared cache: one loop shared by sharing, reuse and the agent runner.

On CUDA the loop runs on a static cache with a CUDA-graph-captured step (`kvcomm.core.fast_decode`);
`KVCOMM_FAST_DECODE=0` or `greedy_continue(..., fast=False)` keeps the eager loop, and `last_path()`
says which one ran. While a `kvcomm.core.batch_decode` server runs for the model (opt-in), uniform caches
go through it instead: decodes from many threads then share one batched step ('batched'). The eager loop passes explicit `position_ids`; a 4-D mask sized for the longest
cache layer is passed only when layers hold different lengths (selective sharing), so uniform caches
decode with SDPA's fastest kernel and ragged ones stay correct.
"""

from __future__ import annotations

import threading
import warnings

import torch

from kvcomm.core import batch_decode, fast_decode, graph_capture
from kvcomm.core.attention import mask_zeros

_last = threading.local()


def last_path() -> str | None:
    """Which path this thread's last `greedy_continue` took: 'eager', 'static', 'graph' or 'batched'."""
    return getattr(_last, "path", None)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings measure it (no-op on CPU)."""
    if device.type == "cuda":
        with graph_capture.capture_lock:  # never while another thread captures a graph (that would break it)
            torch.cuda.synchronize(device)


def stop_ids(lm) -> list[int]:
    """EOS ids from tokenizer and generation config, plus common end-of-turn tokens."""
    stops: set[int] = set()
    if lm.tokenizer is None:
        return []
    for source in (lm.tokenizer.eos_token_id, getattr(lm.model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            stops.add(source)
        elif source:
            stops.update(source)
    for tok in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<end_of_turn>"):
        tid = lm.tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != lm.tokenizer.unk_token_id:
            stops.add(tid)
    return sorted(stops)


@torch.no_grad()
def greedy_continue(lm, cache, next_logits: torch.Tensor, length: int, max_new_tokens: int,
                    stops: set[int], feed_last: bool = False, fast: bool | None = None) -> list[int]:
    """Decode greedily after a prefill whose last logits are `next_logits`.

    `length` is the longest layer's cache length (= the position of the next token). With
    `feed_last`, a final token that stopped the loop on the length limit is fed too, so the cache
    holds the KV of every returned token (agents pass their reply's KV on). `fast`: None follows
    `KVCOMM_FAST_DECODE` (graphs on CUDA by default), False forces the eager loop, True the static
    cache (graphs on CUDA, none on CPU); every path leaves the same cache behind. A running
    `batch_decode` server for the model takes the call unless `fast` is False or it cannot hold the cache.
    """
    server = batch_decode.server_for(lm) if fast is not False else None
    if server is not None and server.accepts(cache, length, max_new_tokens):
        try:
            out = server.decode(cache, next_logits, length, max_new_tokens, stops, feed_last)
            _last.path = "batched"
            return out
        except batch_decode.BatchDecodeUnavailable as e:  # the caller's cache is untouched: decode it alone
            warnings.warn(f"kvcomm: batched decode unavailable ({e}); decoding this request alone", stacklevel=2)
    path = fast_decode.choose_path(lm, cache, fast) if max_new_tokens > 0 else "eager"
    if path != "eager":
        decoder = fast_decode.decoder_for(lm, graphs=path == "graph")
        if decoder.broken is None:
            try:
                out = decoder.decode(cache, next_logits, length, max_new_tokens, stops, feed_last)
                _last.path = path
                return out
            except fast_decode.FastDecodeUnavailable as e:
                warnings.warn(f"kvcomm: fast decode off for this model ({e}); decoding eagerly", stacklevel=2)
    _last.path = "eager"
    out: list[int] = []
    next_id = next_logits.argmax()
    # A single new token may attend every cached key, so no mask is needed unless layers hold
    # different lengths (selective sharing), where transformers would size its own mask from layer 0.
    lengths = {layer.keys.shape[-2] for layer in cache.layers}
    ragged = len(lengths) > 1
    for _ in range(max_new_tokens):
        tok = int(next_id)
        if tok in stops:
            break
        out.append(tok)
        if len(out) == max_new_tokens and not feed_last:
            break
        step = lm.model(
            input_ids=next_id.view(1, 1), past_key_values=cache, use_cache=True,
            position_ids=torch.tensor([[length]], device=lm.device),
            attention_mask=mask_zeros(1, length + 1, lm.dtype, lm.device) if ragged else None,
        )
        length += 1
        next_id = step.logits[0, -1].argmax()
    return out
