"""The paper's non-KV communication baselines: NLD, CIPHER and AC (KVComm §4 baselines).

All three use the same model as sender and receiver, greedy decoding, and the prompts of
`kvcomm.prompts`, so they differ from KV sharing only in *what* crosses the wire.

  NLD     natural-language debate, one round: the sender writes a summary of the context
          (`summary_tokens` at most, greedy); the receiver answers with the summary as its context.
          Wire: the summary's UTF-8 bytes.
  CIPHER  (Pham et al. 2024) the sender "writes" the summary without sampling: each step's input is
          the probability-weighted mean of the token embeddings, Σ_v softmax(z/T)_v · e_v, and those
          vectors replace the summary tokens in the receiver's prompt. Generation stops where the
          argmax token would have been an end-of-turn token. T = 1 (the method's default; not tuned).
          Wire: one hidden-size vector per step.
  AC      activation communication (Ramesh & Li 2025): the receiver's last-prompt-token hidden state
          at the output of decoder layer j is replaced by / averaged with / summed with the sender's
          last-token hidden state at layer k of its context prompt; the receiver then decodes as usual.
          k = j = round(26/32 · L), the paper's 26 of 32 for Llama-3.1-8B scaled to the model's depth.
          Hidden states are read and written with plain PyTorch forward hooks on the decoder layer.
          Wire: one hidden-size vector.

Each function returns the receiver's `Generation` plus a dict of costs (bytes, sender FLOPs,
sender wall time) so the evaluation can put them next to KV sharing's.
"""

from __future__ import annotations

import time

import torch

from kvcomm.core.generation import greedy_continue, stop_ids, sync
from kvcomm.core.kv import ids_tensor, prefill, prefill_flops
from kvcomm.core.models import LoadedModel
from kvcomm.sharing.prompts import (
    DEFAULT_LAYOUT,
    DEFAULT_SYSTEM,
    encode,
    prompt_ids,
    skyline_text,
    split_prompt,
    split_text,
)
from kvcomm.sharing.send_receive import Generation, generate

SUMMARY_REQUEST = "Summarise the following text in one sentence. Keep every name, place and number.\n\n{context}"
AC_MODES = ("replace", "mean", "sum")
_MARK = "\x00KVCOMM_CIPHER\x00"


def ac_layer(num_layers: int) -> int:
    """The AC paper's layer 26 of 32, scaled to this model's depth (0-based decoder layer index)."""
    return min(num_layers - 1, round(num_layers * 26 / 32))


def decoder_layers(lm: LoadedModel):
    layers = getattr(lm.model.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError(f"{type(lm.model).__name__} has no decoder `layers` list; AC needs one to hook")
    return layers


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _wire_bytes(lm: LoadedModel, vectors: int) -> int:
    return vectors * lm.config.hidden_size * torch.tensor([], dtype=lm.dtype).element_size()


@torch.no_grad()
def generate_from_embeds(lm: LoadedModel, embeds: torch.Tensor, max_new_tokens: int, hook=None) -> Generation:
    """Greedy generation from input embeddings [1, n, d]; `hook` (layer, fn) edits one layer's output during prefill."""
    stops = set(stop_ids(lm))
    sync(lm.device)
    start = time.perf_counter()
    handle = decoder_layers(lm)[hook[0]].register_forward_hook(hook[1]) if hook else None
    try:
        logits, cache, _ = prefill(lm, embeds=embeds)
    finally:
        if handle is not None:
            handle.remove()
    sync(lm.device)
    ttft = time.perf_counter() - start
    n = embeds.shape[1]
    ids = greedy_continue(lm, cache, logits[0, -1], n, max_new_tokens, stops)
    sync(lm.device)
    text = lm.tokenizer.decode(ids, skip_special_tokens=True).strip()
    return Generation(text, ids, ttft, time.perf_counter() - start, n, 0, logits[0, -1].float().cpu())


def _embed(lm: LoadedModel, ids) -> torch.Tensor:
    return lm.model.get_input_embeddings()(ids_tensor(ids, lm.device))


@torch.no_grad()
def summarise(lm: LoadedModel, context: str, summary_tokens: int) -> tuple[str, int, list[int], float]:
    """NLD sender: greedy summary of the context. Returns (text, prompt tokens, summary token ids, seconds)."""
    ids = prompt_ids(lm.tokenizer, SUMMARY_REQUEST.format(context=context), system=None)
    sync(lm.device)
    start = time.perf_counter()
    logits, cache, _ = prefill(lm, ids)
    toks = greedy_continue(lm, cache, logits[0, -1], len(ids), summary_tokens, set(stop_ids(lm)))
    sync(lm.device)
    return lm.tokenizer.decode(toks, skip_special_tokens=True).strip(), len(ids), toks, time.perf_counter() - start


def nld(lm: LoadedModel, context: str, question: str, max_new_tokens: int, summary_tokens: int = 48,
        answer_prefix: str = "", system: str | None = DEFAULT_SYSTEM, layout: str = DEFAULT_LAYOUT) -> tuple[Generation, dict]:
    summary, n_prompt, toks, sender_s = summarise(lm, context, summary_tokens)
    n_sum = len(toks)
    split = split_prompt(lm.tokenizer, summary, question, system, answer_prefix, layout)
    gen = generate(lm, split.skyline_ids, max_new_tokens=max_new_tokens)
    return gen, {"bytes": len(summary.encode()), "message": summary, "sender_s": sender_s,
                 "sender_flops": prefill_flops(lm, n_prompt) + prefill_flops(lm, n_sum, past=n_prompt),
                 "receiver_flops": prefill_flops(lm, len(split.skyline_ids))}


@torch.no_grad()
def cipher_vectors(lm: LoadedModel, context: str, steps: int, temperature: float = 1.0) -> tuple[torch.Tensor, int, float]:
    """CIPHER sender: expected-embedding decoding. Returns (vectors [n, d], prompt tokens, seconds)."""
    embedding = lm.model.get_input_embeddings()
    table = embedding.weight
    scale = getattr(embedding, "embed_scale", 1.0)  # Gemma scales embeddings inside the module
    ids = prompt_ids(lm.tokenizer, SUMMARY_REQUEST.format(context=context), system=None)
    stops = set(stop_ids(lm))
    sync(lm.device)
    start = time.perf_counter()
    logits, cache, _ = prefill(lm, ids)
    logits, pos, vectors = logits[0, -1], len(ids), []
    for _ in range(steps):
        if int(logits.argmax()) in stops:
            break
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        vec = ((probs.to(table.dtype) @ table) * scale).view(1, 1, -1)
        vectors.append(vec[0, 0])
        out = lm.model(inputs_embeds=vec, past_key_values=cache, use_cache=True,
                       position_ids=torch.tensor([[pos]], device=lm.device))
        logits, pos = out.logits[0, -1], pos + 1
    sync(lm.device)
    d = table.shape[1]
    stacked = torch.stack(vectors) if vectors else torch.empty(0, d, device=lm.device, dtype=table.dtype)
    return stacked, len(ids), time.perf_counter() - start


def cipher(lm: LoadedModel, context: str, question: str, max_new_tokens: int, summary_tokens: int = 48,
           answer_prefix: str = "", system: str | None = DEFAULT_SYSTEM, temperature: float = 1.0,
           layout: str = DEFAULT_LAYOUT) -> tuple[Generation, dict]:
    vectors, n_prompt, sender_s = cipher_vectors(lm, context, summary_tokens, temperature)
    # The receiver's prompt is Skyline's with the summary tokens replaced by the CIPHER vectors.
    if layout == "split":  # Skyline's ids are the sender's and the receiver's, each tokenized alone
        sender_text, receiver_text = split_text(lm.tokenizer, _MARK, question, system, answer_prefix)
        before, after = sender_text.split(_MARK)
        head, tail = encode(lm.tokenizer, before), encode(lm.tokenizer, after) + encode(lm.tokenizer, receiver_text)
    else:
        before, after = skyline_text(lm.tokenizer, _MARK, question, system, answer_prefix, layout).split(_MARK)
        head, tail = encode(lm.tokenizer, before), encode(lm.tokenizer, after)
    embeds = torch.cat([_embed(lm, head)[0], vectors.to(lm.dtype), _embed(lm, tail)[0]]).unsqueeze(0)
    gen = generate_from_embeds(lm, embeds, max_new_tokens)
    n, vocab = len(vectors), lm.config.vocab_size
    return gen, {"bytes": _wire_bytes(lm, n), "message": f"{n} vectors", "sender_s": sender_s,
                 "sender_flops": prefill_flops(lm, n_prompt) + prefill_flops(lm, n, past=n_prompt)
                 + 2 * n * vocab * lm.config.hidden_size,
                 "receiver_flops": prefill_flops(lm, embeds.shape[1])}


@torch.no_grad()
def sender_activation(lm: LoadedModel, ids, layer: int) -> tuple[torch.Tensor, float]:
    """AC sender: the last token's hidden state at the output of decoder layer `layer`."""
    captured = {}

    def grab(_module, _inputs, output):
        captured["h"] = _hidden(output)[0, -1].clone()

    sync(lm.device)
    start = time.perf_counter()
    handle = decoder_layers(lm)[layer].register_forward_hook(grab)
    try:
        prefill(lm, ids)
    finally:
        handle.remove()
    sync(lm.device)
    return captured["h"], time.perf_counter() - start


def ac(lm: LoadedModel, context: str, question: str, mode: str, max_new_tokens: int, layer: int | None = None,
       answer_prefix: str = "", system: str | None = DEFAULT_SYSTEM, layout: str = DEFAULT_LAYOUT) -> tuple[Generation, dict]:
    if mode not in AC_MODES:
        raise ValueError(f"AC mode must be one of {AC_MODES}, got {mode!r}")
    layer = ac_layer(lm.num_layers) if layer is None else layer
    split = split_prompt(lm.tokenizer, context, question, system, answer_prefix, layout)
    h_sender, sender_s = sender_activation(lm, split.sender_ids, layer)
    receiver = split.baseline_ids
    gen = ac_generate(lm, receiver, h_sender, layer, mode, max_new_tokens)
    return gen, {"bytes": _wire_bytes(lm, 1), "message": f"layer {layer}", "sender_s": sender_s,
                 "sender_flops": prefill_flops(lm, len(split.sender_ids)), "receiver_flops": prefill_flops(lm, len(receiver))}


def ac_generate(lm: LoadedModel, receiver_ids, h_sender: torch.Tensor, layer: int, mode: str,
                max_new_tokens: int) -> Generation:
    """AC receiver: combine `h_sender` into the last prompt token's state after decoder layer `layer`, then decode."""

    def inject(_module, _inputs, output):
        hidden = _hidden(output)
        last = hidden[:, -1]
        hidden[:, -1] = {"replace": h_sender, "mean": (last + h_sender) / 2, "sum": last + h_sender}[mode]
        return output

    return generate_from_embeds(lm, _embed(lm, receiver_ids), max_new_tokens, hook=(layer, inject))
