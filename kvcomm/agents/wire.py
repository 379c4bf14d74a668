"""KV blocks on the wire between Ray actors: messages in the project's format, never pickled tensors."""

from __future__ import annotations

import torch

from kvcomm.core.fingerprint import Fingerprint
from kvcomm.core.kv import KVBlock
from kvcomm.core.message import KVMessage, decode, encode


def block_to_bytes(block: KVBlock, fp: Fingerprint, kind: str = "kv", precision: str | None = None) -> bytes:
    """A KVBlock [layers, kv_heads, n, head_dim] as a validated-format message (all layers, positions from
    0), at `precision` (None: the block's dtype; see `kvcomm.core.message.encode`)."""
    layers = block.k.shape[0]
    msg = KVMessage(list(range(layers)), [block.k[i : i + 1] for i in range(layers)],
                    [block.v[i : i + 1] for i in range(layers)], fp, 0, {"kind": kind})
    return encode(msg, precision)


def block_from_bytes(data: bytes, fp: Fingerprint, device=None, dtype=None) -> KVBlock:
    """Decode with every check of `kvcomm.message.decode`, including the model fingerprint."""
    msg = decode(data, receiver=fp)
    if msg.layers != list(range(fp.num_layers)):
        from kvcomm.core.errors import ShapeMismatchError

        raise ShapeMismatchError(f"a KV block must hold all {fp.num_layers} layers, got {len(msg.layers)}")
    k, v = torch.cat(msg.keys, 0), torch.cat(msg.values, 0)
    return KVBlock(k.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype))


def require_ray():
    """The `ray` module, or a clear error when the optional extra is missing."""
    try:
        import ray
    except ImportError:
        from kvcomm.core.errors import KVCommError

        raise KVCommError("the Ray backend needs Ray: pip install 'kvcomm[ray]' (or bash scripts/install.sh ray)") from None
    return ray
