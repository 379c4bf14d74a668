"""Prompts of selective sharing: what the sender reads, what the receiver reads, Skyline and Baseline.

Three layouts, an explicit choice (`layout=`):

  paper  (default) the paper's and its code's layout (KVComm §3.1, App. K). The sender reads its own
         chat prompt, a finished user turn "Context: <C>"; the receiver reads its own *complete* chat
         prompt "Question: <Q>" plus the short-answer instruction and the assistant header, its
         positions continuing after the sender's. So in a layer without the sender's KV the receiver
         still has a chat head (its attention sink) and a whole prompt. Skyline is one chat prompt
         holding context, question and instruction; Baseline is the receiver's prompt alone.
         Sharing every layer equals a dense prefill of [sender tokens; receiver tokens] (tested).
  turn   the sender's prompt as in `paper`; the receiver's prompt is the *next user turn* of the sender's
         conversation ("<|im_start|>user Question: …" + the assistant header), with no system prompt of
         its own, positions continuing after the sender's. Sharing every layer equals a dense prefill
         of one two-turn conversation. Why: in `paper` the receiver opens a second conversation (its
         own system prompt), and small models read that as a reset: on SmolLM2-135M sharing *every*
         layer answers the needle task 40% of the time in `paper` and 100% in `turn` (Skyline: 100%;
         `docs/sharing.md`). Skyline and Baseline are `paper`'s.
  split  Skyline's chat prompt "<C>\\n\\n<Q>" cut where the question begins: the sender prefills the
         first half, the receiver the rest, so sender + receiver tokens *are* Skyline's and sharing
         every layer reproduces Skyline exactly (tested). The receiver's tokens have no chat head.

The short-answer instruction is LongBench's (whose QA tasks the paper evaluates): the receiver is
asked for the answer only, so a reply is scored on recall, not verbosity. Every text part is
tokenized separately (no special tokens added: the chat template has rendered them), so boundaries
never depend on the content. Models without a chat template use plain "Context: …/Question: …/Answer:".
"""

from __future__ import annotations

from dataclasses import dataclass

_C, _Q = "\x00KVCOMM_CONTEXT\x00", "\x00KVCOMM_QUESTION\x00"
DEFAULT_SYSTEM = "Answer the question with a few words, using the context if one is given."
SHORT_ANSWER = "Only give me the answer and do not output any other words."
LAYOUTS = ("paper", "turn", "split")
DEFAULT_LAYOUT = "paper"


@dataclass
class SharePrompt:
    """Token ids of one (context, question) in one layout."""

    sender_ids: list[int]
    receiver_ids: list[int]
    skyline_ids: list[int]
    baseline_ids: list[int]
    layout: str


def _chat(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer, user: str, system: str | None, generation: bool = True) -> str:
    if _chat(tokenizer):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    return f"{system + chr(10) if system else ''}{user}" + ("\nAnswer:" if generation else "\n\n")


def _next_turn(tokenizer, user: str, system: str | None) -> str:
    """The text that follows the sender's rendered prompt when the conversation goes on with a second
    user turn `user` and the assistant header (found by rendering both and taking the difference)."""
    first = "Context: \x00"
    if not _chat(tokenizer):
        return f"{user}\nAnswer:"
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": first}]
    head = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    both = tokenizer.apply_chat_template(messages + [{"role": "user", "content": user}], tokenize=False,
                                         add_generation_prompt=True)
    if not both.startswith(head):
        raise ValueError("this chat template renders a first turn differently when a second one follows; "
                         "use --layout paper or split")
    return both[len(head):]


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` alone: no BOS or other special tokens added (prompts are rendered already)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _check(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def _question(question: str) -> str:
    return f"Question: {question}\n{SHORT_ANSWER}"


def skyline_text(tokenizer, context: str, question: str, system: str | None = DEFAULT_SYSTEM, answer_prefix: str = "",
                 layout: str = DEFAULT_LAYOUT) -> str:
    """The rendered Skyline prompt: one prompt holding context and question."""
    _check(layout)
    if layout == "split":
        sender, receiver = split_text(tokenizer, context, question, system, answer_prefix)
        return sender + receiver
    return _render(tokenizer, f"Context: {context}\n\n{_question(question)}", system) + answer_prefix


def split_text(tokenizer, context: str, question: str, system: str | None = DEFAULT_SYSTEM,
               answer_prefix: str = "") -> tuple[str, str]:
    """The `split` layout: the rendered Skyline prompt cut where the question begins (sender, receiver text)."""
    chat = _chat(tokenizer)
    body = f"{_C}\n\n{_Q}" if chat else f"Context: {_C}\n\nQuestion: {_Q}"
    text = _render(tokenizer, body, system)
    cut = text.index(_Q) if chat else text.index("Question: " + _Q)
    return text[:cut].replace(_C, context), text[cut:].replace(_Q, question) + answer_prefix


def split_prompt(tokenizer, context: str, question: str, system: str | None = DEFAULT_SYSTEM,
                 answer_prefix: str = "", layout: str = DEFAULT_LAYOUT) -> SharePrompt:
    """Sender, receiver, Skyline and Baseline ids. `answer_prefix` starts the reply (e.g. "The answer is:")."""
    _check(layout)
    if layout == "split":
        sender_text, receiver_text = split_text(tokenizer, context, question, system, answer_prefix)
        sender, receiver = encode(tokenizer, sender_text), encode(tokenizer, receiver_text)
        baseline = encode(tokenizer, _render(tokenizer, question, system) + answer_prefix)
        return SharePrompt(sender, receiver, sender + receiver, baseline, layout)
    sender = encode(tokenizer, _render(tokenizer, f"Context: {context}", system, generation=False))
    alone = encode(tokenizer, _render(tokenizer, _question(question), system) + answer_prefix)
    receiver = encode(tokenizer, _next_turn(tokenizer, _question(question), system) + answer_prefix) \
        if layout == "turn" else alone
    skyline = encode(tokenizer, skyline_text(tokenizer, context, question, system, answer_prefix, layout))
    return SharePrompt(sender, receiver, skyline, alone, layout)


def context_span(tokenizer, context: str, system: str | None = DEFAULT_SYSTEM, layout: str = DEFAULT_LAYOUT) -> tuple[int, int]:
    """Where the context's own tokens sit in the sender's ids: [start, end), without the template around
    them (chat head, "Context: ", end of turn). Found as the ids shared with the sender prompts of two
    unrelated probe contexts, so token merges at the boundaries count as template."""
    ids = sender_ids(tokenizer, context, system, layout)
    start, tail = len(ids), len(ids)
    for probe in ("0", "#"):
        other = sender_ids(tokenizer, probe, system, layout)
        start = min(start, next((i for i, (a, b) in enumerate(zip(ids, other)) if a != b), min(len(ids), len(other))))
        same = next((i for i, (a, b) in enumerate(zip(ids[::-1], other[::-1])) if a != b), min(len(ids), len(other)))
        tail = min(tail, same)
    return start, max(start, len(ids) - tail)


def sender_ids(tokenizer, context: str, system: str | None = DEFAULT_SYSTEM, layout: str = DEFAULT_LAYOUT) -> list[int]:
    return split_prompt(tokenizer, context, "?", system, layout=layout).sender_ids


def receiver_ids(tokenizer, question: str, system: str | None = DEFAULT_SYSTEM, layout: str = DEFAULT_LAYOUT) -> list[int]:
    return split_prompt(tokenizer, "", question, system, layout=layout).receiver_ids


def baseline_ids(tokenizer, question: str, system: str | None = DEFAULT_SYSTEM, answer_prefix: str = "",
                 layout: str = DEFAULT_LAYOUT) -> list[int]:
    """The receiver alone: the question with no context at all."""
    return split_prompt(tokenizer, "", question, system, answer_prefix, layout).baseline_ids


def prompt_ids(tokenizer, user: str, system: str | None = DEFAULT_SYSTEM) -> list[int]:
    """Any single-turn prompt (used for NLD summaries and agent turns)."""
    return encode(tokenizer, _render(tokenizer, user, system))
