"""The `kvcomm` attention implementation: SDPA, plus two things selective sharing needs.

Registered through transformers' public `AttentionInterface` (no monkey-patching).

1. **Layers of different lengths.** In selective sharing the sender's KV sits in front of the
   receiver's own KV in the *selected* layers only; unselected layers hold the receiver's tokens alone,
   so nothing at the sender positions exists there to be attended. kvcomm passes one 4-D additive mask
   sized for the longest layer (all sender tokens + receiver tokens); each layer uses its *rightmost*
   `key_len` columns. Since the mask is causal over the receiver's tokens, the right-aligned slice is
   the correct causal mask for every layer. When the mask and the keys have the same length (every
   ordinary call) this is exactly SDPA.
   A static cache (`kvcomm.core.fast_decode`) instead passes `kvcomm_layer_lens`, each layer's filled
   length, to a split-key Triton kernel (`kvcomm.core.decode_attention`), or where that kernel cannot
   run `kvcomm_layer_masks`, one mask per layer over the same preallocated key slots.
2. **Grouped-query attention with a mask, without copying keys.** transformers repeats every key and
   value head for the query heads that share it (`repeat_kv`) whenever a mask is passed, a copy of the
   whole cache per layer and call; over a static cache of L slots that copy dominates a short forward
   (measured on an H100, random-weight Llama-3.1-8B, 4K context: 96 copies of 53 us in one receiver
   prefill). Here the query heads of a group are folded into the query-length axis instead, so each
   key head is read once: query [B, Hkv·r, q, d] -> [B, Hkv, r·q, d], the mask rows tiled r times, and the
   output unfolded. Exact (the same scores and softmax rows); calls without a mask keep transformers'
   path (SDPA's own GQA support).
3. **Attention-importance recording** (KVComm Eq. 1). When a `kvcomm_recorder` is passed to the model
   call, each layer also computes its softmax attention weights and adds the mass that the query
   tokens put on the first `recorder.context_len` key columns (the sender's context), averaged over
   heads and queries; or, with a `TokenImportanceRecorder` (relay's `attention` picker), the mass
   per key column of the last queries.
"""

from __future__ import annotations

import torch

NAME = "kvcomm"
_registered = False


def attention_weights(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """Softmax attention probabilities [batch, heads, q, keys] in float32, each key head serving its query heads."""
    n_rep = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(n_rep, dim=1) if n_rep > 1 else key
    scores = torch.matmul(query.float(), k.float().transpose(-1, -2)) * scaling
    if mask is not None:
        scores = scores + mask.float() if mask.dtype != torch.bool else scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1)


class ImportanceRecorder:
    """Collects Ŝ_l = 1/(H·|Q|) Σ_h Σ_q Σ_{c∈C} a^l_{h,q,c} per layer, summed over calls, where C is the
    key columns [context_start, context_len): all the sender's tokens, or only its context's."""

    def __init__(self, num_layers: int, context_len: int, context_start: int = 0):
        self.context_start, self.context_len = context_start, context_len
        self.sums = torch.zeros(num_layers, dtype=torch.float64)
        self.calls = torch.zeros(num_layers, dtype=torch.long)

    def add(self, layer: int, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float):
        weights = attention_weights(query, key, mask, scaling)
        mass = weights[..., self.context_start : self.context_len].sum(-1)  # [batch, heads, q]
        self.sums[layer] += mass.mean().item()
        self.calls[layer] += 1

    def scores(self) -> torch.Tensor:
        """Mean raw score per layer (Ŝ), over the calls recorded."""
        return self.sums / self.calls.clamp(min=1)


class TokenImportanceRecorder:
    """Attention mass per key position from a forward's last `window` queries, summed over layers and heads
    (SnapKV's observation window): which earlier tokens the newest ones read. `mass` [keys] stays on the
    model's device; a layer with fewer keys adds to the leading positions."""

    def __init__(self, window: int):
        self.window = window
        self.mass: torch.Tensor | None = None

    def add(self, layer: int, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float):
        w = min(self.window, query.shape[2])
        rows = mask[..., -w:, :] if mask is not None and mask.shape[-2] > 1 else mask
        mass = attention_weights(query[:, :, -w:], key, rows, scaling).sum(dim=(0, 1, 2))  # [keys]
        if self.mass is None:
            self.mass = mass
        else:
            n = max(self.mass.numel(), mass.numel())
            self.mass = torch.nn.functional.pad(self.mass, (0, n - self.mass.numel())) \
                + torch.nn.functional.pad(mass, (0, n - mass.numel()))


def kvcomm_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    recorder: ImportanceRecorder | TokenImportanceRecorder | None = kwargs.pop("kvcomm_recorder", None)
    layer_masks: torch.Tensor | None = kwargs.pop("kvcomm_layer_masks", None)
    layer_lens: torch.Tensor | None = kwargs.pop("kvcomm_layer_lens", None)
    if layer_lens is not None:  # fast_decode's static cache with per-layer filled lengths: no mask needed
        from kvcomm.core import decode_attention

        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return decode_attention.attend(query, key, value, layer_lens, module.layer_idx, scale), None
    if layer_masks is not None:  # [layers, 1, 1, q, keys]: one mask per layer (fast_decode's static cache)
        attention_mask = layer_masks[module.layer_idx]
    if attention_mask is not None and attention_mask.shape[-1] != key.shape[-2]:
        if attention_mask.shape[-1] < key.shape[-2]:
            raise ValueError(
                f"kvcomm: mask covers {attention_mask.shape[-1]} keys but layer {module.layer_idx} holds "
                f"{key.shape[-2]}; build the mask for the longest layer"
            )
        attention_mask = realign(attention_mask[..., -key.shape[-2] :])
    if recorder is not None:
        recorder.add(module.layer_idx, query, key, attention_mask, scaling if scaling is not None else query.shape[-1] ** -0.5)
    n_rep = query.shape[1] // key.shape[1]
    if (attention_mask is not None and attention_mask.dtype != torch.bool and n_rep > 1 and query.shape[0] == 1
            and attention_mask.shape[:2] == (1, 1) and not kwargs.get("dropout") and kwargs.get("softcap") is None
            and kwargs.get("position_bias") is None):
        return folded_gqa_attention(query, key, value, attention_mask, scaling, n_rep), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def folded_gqa_attention(query, key, value, mask, scaling, n_rep: int) -> torch.Tensor:
    """SDPA for grouped-query attention with an additive mask [1, 1, q, keys], keys read once per key head.

    query [1, Hkv·r, q, d] is viewed as [1, Hkv, r·q, d] (query head h = g·r + j sits in group g, rows
    j·q..j·q+q-1), the mask's rows are tiled r times to match, and the output [1, Hkv, r·q, dv] is unfolded
    to transformers' layout [1, q, Hkv·r, dv]."""
    b, h, q, d = query.shape
    folded = query.reshape(b, h // n_rep, n_rep * q, d)
    tiled = mask if mask.shape[-2] == 1 else realign(mask.repeat(1, 1, n_rep, 1))  # one row broadcasts as it is
    out = torch.nn.functional.scaled_dot_product_attention(folded, key, value, attn_mask=tiled, scale=scaling)
    return out.reshape(b, h, q, value.shape[-1]).transpose(1, 2).contiguous()


def register() -> None:
    """Register `kvcomm` with transformers' attention and mask interfaces (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, kvcomm_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    _registered = True


_ALIGN = 16  # elements; SDPA's memory-efficient CUDA kernel reads mask rows with vector loads


def mask_zeros(rows: int, cols: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A zero additive mask [1, 1, rows, cols] whose rows start on aligned addresses.

    The row stride is padded to a multiple of 16 elements and the view sliced back, as the
    memory-efficient SDPA kernel wants; without it PyTorch pads a copy on every layer call."""
    return torch.zeros(1, 1, rows, cols + (-cols % _ALIGN), dtype=dtype, device=device)[..., :cols]


def realign(mask: torch.Tensor) -> torch.Tensor:
    """A right-aligned slice of a mask, copied to aligned memory where the slice is not.

    Slicing the last `key_len` columns moves the data pointer by a column count that is rarely a
    multiple of 16; with fp32 on CUDA the memory-efficient kernel then fails with "CUDA error:
    misaligned address" (seen on an H100, torch 2.11). CPU kernels do not care, so CPU skips the copy."""
    if mask.device.type == "cpu" or (mask.data_ptr() % (_ALIGN * mask.element_size()) == 0
                                     and mask.stride(-2) % _ALIGN == 0):
        return mask
    return aligned_copy(mask)


def aligned_copy(mask: torch.Tensor) -> torch.Tensor:
    """`mask`'s values in fresh memory with a row stride padded to a multiple of 16 elements."""
    cols = mask.shape[-1]
    out = mask.new_zeros(*mask.shape[:-1], cols + (-cols % _ALIGN))[..., :cols]
    return out.copy_(mask)


def causal_mask(num_prefix: int, num_past: int, num_new: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Additive 4-D mask [1, 1, num_new, num_prefix + num_past + num_new].

    New tokens see every prefix (sender) column and every past column, and each other causally.
    """
    total = num_prefix + num_past + num_new
    mask = mask_zeros(num_new, total, dtype, device)
    if num_new > 1:
        upper = torch.triu(torch.ones(num_new, num_new, dtype=torch.bool, device=device), diagonal=1)
        mask[0, 0, :, total - num_new :].masked_fill_(upper, torch.finfo(dtype).min)
    return mask
