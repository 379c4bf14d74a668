"""Selective recompute over reused KV (in the spirit of CacheBlend), on top of KVCOMM's offsets.

A reused prompt's KV is assembled from pieces (exact p0, then placeholder contents and template
segments with estimated offsets). Offsets leave an error, largest on a few tokens. `blend` picks the
fraction r of the reusable tokens (every token after p0 and before the tail) and recomputes their KV
through every layer: one forward runs the picked tokens and the tail together, at their real
positions, over the assembled cache, with a mask that hides the picked tokens' stale entries and
shows the fresh ones causally. Each layer's recomputed tokens so see the reused KV of everyone else
and the fresh KV of each other, which is what CacheBlend does layer by layer.

Always exact or always recomputed, whatever r is:
  p0     the agent's first template segment (the chat head: BOS / `<|im_start|>system`, the attention
         sinks, and the role) comes from the template cache, computed by a real prefill: exact.
  tail   the last prompt token (or, with `refresh_tail`, the whole last template segment) is always run.

Token pickers (`select`):
  deviation  CacheBlend's rule: the tokens whose layer-1 values deviate most (squared L2) from the
             assembled ones. Layer 0's KV depends only on token and position, so layer 0 run over the
             whole prompt gives the exact layer-1 input, and layer 1's fresh values follow from it; this
             costs one layer of a full prefill (counted as prompt/L tokens prefilled).
  offset     the tokens whose estimated value offsets are largest (summed over layers); costs nothing.
  first      the first tokens of every reused span (EPIC / LegoLink's chunk-start sinks), round-robin
             over spans until the budget is spent; costs nothing.
  attention  (relay only, `attention_pick`) the tokens the prompt's last segment reads most: the rest of the
             prompt runs over the reused KV once, its last `window` queries' attention recorded (SnapKV's
             observation window), then the picks and the last prompt token run again over the result; costs
             one token more than `first`. Why: a token's error matters as much as the answer reads it.
"""

from __future__ import annotations

import math

import torch

from kvcomm.core.attention import TokenImportanceRecorder, causal_mask, mask_zeros
from kvcomm.core.kv import KVBlock, block_to_cache, cache_to_block, ids_tensor, prefill

SELECTORS = ("deviation", "offset", "first", "attention")


def reusable_positions(spans, tail: int) -> list[tuple[int, int]]:
    """[(a, b)] of every span after p0, clipped before the tail: the tokens a picker may choose."""
    out = []
    for _, a, b in spans[1:]:
        b = min(b, tail)
        if b > a:
            out.append((a, b))
    return out


def spans_without(spans, positions: list[int]):
    """`spans` with the contiguous run `positions` cut out (a span it splits keeps both sides, same name): what a
    picker may choose when those positions are recomputed anyway (relay+newest's header)."""
    if not positions:
        return spans
    lo, hi = positions[0], positions[-1] + 1
    out = []
    for name, a, b in spans:
        out += [(name, x, y) for x, y in ((a, min(b, lo)), (max(a, hi), b)) if y > x]
    return out


def without_question(spans):
    """`spans` less the question's, spans[1] (the user turn after p0): what `+replies` may pick and count in R."""
    return spans[:1] + spans[2:]


def cap_room(cap: float, prompt: int, prefilled: int) -> int:
    """Tokens a `+capB` call may still prefill after the `prefilled` it spends anyway: floor(B x prompt) minus
    them (negative: none). `choose(limit=)` takes the picks and the picker's own cost from it."""
    return math.floor(cap * prompt) - prefilled


def budget(fraction: float, spans: list[tuple[int, int]]) -> int:
    total = sum(b - a for a, b in spans)
    return min(total, math.ceil(fraction * total - 1e-9)) if fraction > 0 else 0


def pick_first(spans: list[tuple[int, int]], k: int) -> list[int]:
    """The first tokens of every span, one per span per round, until `k` are picked."""
    picked: list[int] = []
    depth = 0
    while len(picked) < k:
        row = [a + depth for a, b in spans if a + depth < b]
        if not row:
            break
        picked += row[: k - len(picked)]
        depth += 1
    return sorted(picked)


def pick_top(scores: torch.Tensor, spans: list[tuple[int, int]], k: int) -> list[int]:
    """The `k` reusable positions of largest score (scores indexed by position)."""
    if k == 0:
        return []
    pos = torch.cat([torch.arange(a, b) for a, b in spans])
    top = torch.topk(scores[pos.to(scores.device)].float(), k).indices.cpu()
    return sorted(pos[top].tolist())


def offset_scores(offsets: torch.Tensor, n: int) -> torch.Tensor:
    """Per-position squared norm of the value offsets, [n] (0 where no offset was added)."""
    return offsets.float().pow(2).sum(dim=(0, 1, 3)) if offsets.shape[2] == n else torch.zeros(n)


@torch.no_grad()
def layer1_value_deviation(lm, ids: list[int], assembled: KVBlock) -> torch.Tensor:
    """||V1_fresh − V1_assembled||² per position, [n], for the first n = assembled.n prompt tokens.

    Runs the embeddings and decoder layer 0 over the prompt from position 0 (exact: layer 0 needs
    only layer-0 KV, which depends on token and position alone), then layer 1's input norm and value
    projection. Works for the Llama/Qwen2 decoder layout (`input_layernorm`, `self_attn.v_proj`)."""
    inner = lm.model.model
    n = assembled.n
    x = inner.embed_tokens(ids_tensor(ids[:n], lm.device))
    pos = torch.arange(n, device=lm.device).unsqueeze(0)
    pe = inner.rotary_emb(x, position_ids=pos)
    h = inner.layers[0](x, attention_mask=causal_mask(0, 0, n, x.dtype, lm.device), position_embeddings=pe, position_ids=pos, past_key_values=None,
                        use_cache=False)
    layer1 = inner.layers[1]
    v = layer1.self_attn.v_proj(layer1.input_layernorm(h))  # [1, n, kv_heads * head_dim]
    v = v.view(n, assembled.v.shape[1], -1).transpose(0, 1)  # [kv_heads, n, head_dim]
    return (v.float() - assembled.v[1].float()).pow(2).sum(dim=(0, 2)).cpu()


@torch.no_grad()
def attention_mass(lm, ids: list[int], assembled: KVBlock, window: int, rerun: int = 1) -> tuple[torch.Tensor, KVBlock]:
    """(attention mass per prompt position, the KV to recompute over).

    Runs ids[assembled.n:] over `assembled`, recording the attention mass its last `window` queries put on
    every key, summed over layers and heads (`TokenImportanceRecorder`). The KV returned is `assembled` plus
    that run's KV of all but the last `rerun` tokens (computed over the picks' stale KV: the approximation
    this picker makes); `recompute` over it runs the picks and those tokens."""
    rest = len(ids) - assembled.n
    rec = TokenImportanceRecorder(min(window, rest))
    _, cache, _ = prefill(lm, ids[assembled.n :], assembled, recorder=rec)
    return rec.mass, cache_to_block(cache, 0, len(ids) - min(max(rerun, 1), rest))


def attention_pick(lm, ids: list[int], assembled: KVBlock, reusable: list[tuple[int, int]], k: int,
                   window: int) -> tuple[list[int], KVBlock]:
    """(the `k` reusable positions the last `window` prompt tokens attend to most, the KV to recompute over):
    `attention_mass`, then the top k. Cost with `recompute`: the rest of the prompt + k + 1 tokens."""
    mass, over = attention_mass(lm, ids, assembled, window)
    return pick_top(mass, reusable, k), over


def recompute_mask(picked: list[int], t: int, tail: int, dtype, device) -> torch.Tensor:
    """Additive mask [1, 1, m, t + m] for m = len(picked) + tail new tokens after a t-token cache.

    New token j sits at position P_j (picked positions, then t..t+tail-1). It sees cache entry c when
    c ≤ P_j and c was not picked (a picked entry is stale; its fresh copy is among the new tokens),
    and new token j' when P_j' ≤ P_j."""
    positions = torch.tensor(picked + list(range(t, t + tail)), device=device)
    m = positions.numel()
    cache_pos = torch.arange(t, device=device)
    stale = torch.zeros(t, dtype=torch.bool, device=device)
    if picked:
        stale[torch.tensor(picked, device=device)] = True
    hide_cache = (cache_pos[None, :] > positions[:, None]) | stale[None, :]
    hide_new = positions[None, :] > positions[:, None]
    mask = mask_zeros(m, t + m, dtype, device)
    mask[0, 0].masked_fill_(torch.cat([hide_cache, hide_new], 1), torch.finfo(dtype).min)
    return mask


@torch.no_grad()
def recompute(lm, ids: list[int], assembled: KVBlock, picked: list[int]):
    """Run the picked positions and the tail ids[assembled.n:] over `assembled`; return (last logits, cache).

    The returned cache holds len(ids) tokens in prompt order: the assembled KV with the picked
    positions replaced by their recomputed KV, then the tail's KV. With no picks this is exactly
    `prefill` of the tail over the assembled cache; so are picks that run contiguously up to the tail (a
    failing newest placeholder and its segment, under `+partial`): a prefill of ids[picked[0]:] over the
    assembled KV before it, which takes the fast prefill path instead of a masked forward."""
    t = assembled.n
    if not picked or picked == list(range(picked[0], t)):
        start = picked[0] if picked else t
        logits, cache, _ = prefill(lm, ids[start:], assembled.slice(0, start))
        return logits[0, -1], cache
    return masked_recompute(lm, ids, assembled, picked)


def masked_recompute(lm, ids: list[int], assembled: KVBlock, picked: list[int]):
    """`recompute` for any picks: one forward of the picked tokens and the tail at their real positions
    over the assembled cache, the stale copies of the picked entries masked (`recompute_mask`)."""
    t = assembled.n
    tail = len(ids) - t
    new_ids = [ids[p] for p in picked] + ids[t:]
    positions = torch.tensor(picked + list(range(t, len(ids))), device=lm.device).unsqueeze(0)
    cache = block_to_cache(lm, assembled)
    out = lm.model(input_ids=ids_tensor(new_ids, lm.device), past_key_values=cache, position_ids=positions,
                   attention_mask=recompute_mask(picked, t, tail, lm.dtype, lm.device), use_cache=True,
                   logits_to_keep=1)
    full = cache_to_block(out.past_key_values)
    s = len(picked)
    idx = torch.tensor(picked, device=full.k.device)
    k, v = full.k[:, :, :t].clone(), full.v[:, :, :t].clone()
    k[:, :, idx] = full.k[:, :, t : t + s]
    v[:, :, idx] = full.v[:, :, t : t + s]
    fixed = KVBlock(torch.cat([k, full.k[:, :, t + s :]], 2), torch.cat([v, full.v[:, :, t + s :]], 2))
    return out.logits[0, -1], block_to_cache(lm, fixed)


def choose(lm, select: str, fraction: float, ids: list[int], spans, assembled: KVBlock,
           value_offsets: torch.Tensor | None, limit: int | None = None) -> tuple[list[int], float, KVBlock]:
    """(picked positions, extra prefill cost in token-equivalents, the KV to `recompute` over) for one reused
    call. The KV is `assembled`, except under `attention`, which first runs the prompt's rest over it and
    returns that run's KV of all but the last token (`attention_pick`; its window is the last segment).
    `limit` caps picks plus the picker's own extra cost (in tokens); none fit: no picks, no extra cost."""
    if select not in SELECTORS:
        raise ValueError(f"select must be one of {SELECTORS}, got {select!r}")
    reusable = reusable_positions(spans, assembled.n)
    k = budget(fraction, reusable)
    ranking = assembled.n / lm.model.config.num_hidden_layers if select == "deviation" else 0.0  # one layer of a prefill
    if limit is not None:  # the attention picker's rerun token (below) counts as one
        k = max(0, min(k, limit - (1 if select == "attention" else math.ceil(ranking))))
    if k == 0:
        return [], 0.0, assembled
    if select == "first":
        return pick_first(reusable, k), 0.0, assembled
    if select == "attention":  # the rest ran once already; beyond it only the rerun tokens count
        picked, over = attention_pick(lm, ids, assembled, reusable, k, spans[-1][2] - spans[-1][1])
        return picked, float(len(ids) - over.n), over
    if select == "offset":
        scores = offset_scores(value_offsets, assembled.n) if value_offsets is not None else torch.zeros(assembled.n)
        return pick_top(scores, reusable, k), 0.0, assembled
    return pick_top(layer1_value_deviation(lm, ids, assembled), reusable, k), ranking, assembled
