"""Prompts for sender, receiver, Skyline and Baseline, built so that sender + receiver == Skyline.

The Skyline prompt is the model's chat template applied to one user turn "<context>\\n\\n<question>".
We render it with marker strings, cut the rendered text where the question begins, and tokenize the
two halves separately. The sender prefills the first half (it never sees the question); the receiver
the second. Skyline is defined as the *concatenation of those token lists*, so the sender's tokens are
an exact prefix of Skyline's and sharing all layers reproduces Skyline exactly (a tested property).
Models without a chat template use "Context: ...\\n\\nQuestion: ...\\nAnswer:".
"""

from __future__ import annotations

from dataclasses import dataclass

_C, _Q = "\x00KVCOMM_CONTEXT\x00", "\x00KVCOMM_QUESTION\x00"
DEFAULT_SYSTEM = "Answer the question with a few words, using the context if one is given."


@dataclass
class SplitPrompt:
    sender_ids: list[int]
    receiver_ids: list[int]

    @property
    def skyline_ids(self) -> list[int]:
        return self.sender_ids + self.receiver_ids


def _render(tokenizer, user: str, system: str | None) -> str:
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{system + chr(10) if system else ''}{user}\nAnswer:"


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` alone: no BOS or other special tokens added (prompts are rendered already)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _body(context: str, question: str, chat: bool) -> str:
    return f"{context}\n\n{question}" if chat else f"Context: {context}\n\nQuestion: {question}"


def split_text(tokenizer, context: str, question: str, system: str | None = DEFAULT_SYSTEM,
               answer_prefix: str = "") -> tuple[str, str]:
    """The rendered Skyline prompt cut where the question begins: (sender text, receiver text)."""
    chat = bool(getattr(tokenizer, "chat_template", None))
    text = _render(tokenizer, _body(_C, _Q, chat), system)
    cut = text.index(_Q)
    if not chat:
        cut = text.index("Question: " + _Q)
    return text[:cut].replace(_C, context), text[cut:].replace(_Q, question) + answer_prefix


def split_prompt(tokenizer, context: str, question: str, system: str | None = DEFAULT_SYSTEM,
                 answer_prefix: str = "") -> SplitPrompt:
    """`answer_prefix` starts the reply (e.g. "The answer is:"), so small models answer in a few words."""
    sender_text, receiver_text = split_text(tokenizer, context, question, system, answer_prefix)
    return SplitPrompt(encode(tokenizer, sender_text), encode(tokenizer, receiver_text))


def sender_ids(tokenizer, context: str, system: str | None = DEFAULT_SYSTEM) -> list[int]:
    return split_prompt(tokenizer, context, "?", system).sender_ids


def receiver_ids(tokenizer, question: str, system: str | None = DEFAULT_SYSTEM) -> list[int]:
    return split_prompt(tokenizer, "", question, system).receiver_ids


def baseline_ids(tokenizer, question: str, system: str | None = DEFAULT_SYSTEM, answer_prefix: str = "") -> list[int]:
    """The receiver alone: the question with no context at all."""
    return encode(tokenizer, _render(tokenizer, question, system) + answer_prefix)


def prompt_ids(tokenizer, user: str, system: str | None = DEFAULT_SYSTEM) -> list[int]:
    """Any single-turn prompt (used for NLD summaries and agent turns)."""
    return encode(tokenizer, _render(tokenizer, user, system))
