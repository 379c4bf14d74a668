"""Prompt layouts: sharing every layer equals a dense prefill of [sender; receiver] in every layout."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny

from kvcomm.sharing.prompts import DEFAULT_SYSTEM, LAYOUTS, _question, encode, split_prompt
from kvcomm.sharing.selection import calibrate
from kvcomm.sharing.send_receive import generate, receive_prefill, send

CHATML = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
          "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
CONTEXT, QUESTION = "uma is at the house in kansas", "which country is uma in"


def model(arch: str, chat: bool):
    lm = make_tiny(arch)
    if chat:
        lm.tokenizer.chat_template = CHATML
    return lm


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("arch", "chat"), [("llama", True), ("qwen2", True), ("llama", False)])
def test_all_layers_equal_a_dense_prefill_of_sender_then_receiver(layout, arch, chat):
    lm = model(arch, chat)
    p = split_prompt(lm.tokenizer, CONTEXT, QUESTION, layout=layout)
    logits, _, prefix = receive_prefill(lm, p.receiver_ids, [send(lm, p.sender_ids)], all_logits=True)
    dense = lm.model(input_ids=torch.tensor([p.sender_ids + p.receiver_ids])).logits[0, len(p.sender_ids):]
    assert prefix == len(p.sender_ids)
    torch.testing.assert_close(logits[0], dense, atol=1e-4, rtol=1e-4)
    shared = generate(lm, p.receiver_ids, send(lm, p.sender_ids), max_new_tokens=8, stop_ids=[])
    assert shared.token_ids == generate(lm, p.sender_ids + p.receiver_ids, max_new_tokens=8, stop_ids=[]).token_ids


def test_split_layout_is_skyline_cut_in_two():
    lm = model("llama", True)
    p = split_prompt(lm.tokenizer, CONTEXT, QUESTION, layout="split")
    assert p.sender_ids + p.receiver_ids == p.skyline_ids


def test_paper_layout_gives_the_receiver_its_own_complete_prompt():
    lm = model("llama", True)
    tok = lm.tokenizer
    p = split_prompt(tok, CONTEXT, QUESTION, layout="paper")
    head = tok("<|im_start|> system", add_special_tokens=False)["input_ids"]
    assert p.sender_ids[: len(head)] == head and p.receiver_ids[: len(head)] == head  # each has a chat head
    assert p.baseline_ids == p.receiver_ids  # Baseline is the receiver alone
    text = tok.decode(p.skyline_ids)
    assert "uma is at the house" in text and "which country is uma in" in text
    assert "which" not in tok.decode(p.sender_ids)  # the sender never sees the question
    assert "kansas" not in tok.decode(p.receiver_ids)  # nor the receiver the context


def test_turn_layout_continues_the_senders_conversation():
    """`turn`: the sender's prompt is paper's; sender + receiver is one conversation with two user turns
    (one system prompt), rendered by the chat template exactly as a single two-turn chat would be."""
    lm = model("llama", True)
    tok = lm.tokenizer
    paper, turn = (split_prompt(tok, CONTEXT, QUESTION, layout=lay) for lay in ("paper", "turn"))
    assert turn.sender_ids == paper.sender_ids and turn.skyline_ids == paper.skyline_ids
    assert turn.baseline_ids == paper.receiver_ids  # Baseline: the question alone, in its own complete prompt
    messages = [{"role": "system", "content": DEFAULT_SYSTEM}, {"role": "user", "content": "Context: " + CONTEXT},
                {"role": "user", "content": _question(QUESTION)}]
    chat = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    first = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=False)
    assert turn.sender_ids == encode(tok, first) and turn.receiver_ids == encode(tok, chat[len(first):])
    assert chat[len(first):].startswith("<|im_start|> user") and "system" not in chat[len(first):]


def test_turn_layout_refuses_a_template_that_rewrites_the_first_turn():
    lm = model("llama", True)
    lm.tokenizer.chat_template = ("{% for m in messages %}{% if loop.last %}<|last|>{% endif %}<|im_start|> {{ m['role'] }} "
                                  "{{ m['content'] }} <|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|> "
                                  "assistant {% endif %}")
    with pytest.raises(ValueError, match="renders a first turn differently"):
        split_prompt(lm.tokenizer, CONTEXT, QUESTION, layout="turn")


def test_calibration_uses_the_layout_it_serves():
    lm = model("qwen2", True)
    rankings = {lay: calibrate(lm, [(CONTEXT, QUESTION)], layout=lay) for lay in LAYOUTS}
    assert {r.layout for r in rankings.values()} == set(LAYOUTS)
    assert rankings["paper"].raw != rankings["split"].raw
