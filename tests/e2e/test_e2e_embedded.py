"""End to end on the embedded SmolLM2-135M-Instruct (30 layers, 3 KV heads)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from kvcomm.cli.share import DEMO_CONTEXT, DEMO_QUESTION
from kvcomm.sharing.prompts import split_prompt
from kvcomm.sharing.selection import calibrate
from kvcomm.sharing.send_receive import generate, receive_prefill, send

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.mark.parametrize("layout", ["paper", "split"])
def test_all_layers_equal_a_dense_prefill_on_the_real_model(embedded, layout):
    """Every layer shared = dense prefill of [sender; receiver] (for the split layout that is Skyline)."""
    split = split_prompt(embedded.tokenizer, DEMO_CONTEXT, DEMO_QUESTION, layout=layout)
    whole = split.sender_ids + split.receiver_ids
    if layout == "split":
        assert whole == split.skyline_ids
    logits = receive_prefill(embedded, split.receiver_ids, [send(embedded, split.sender_ids)], all_logits=True)[0][0]
    ref = embedded.model(input_ids=torch.tensor([whole])).logits[0, len(split.sender_ids):]
    torch.testing.assert_close(logits, ref, atol=2e-3, rtol=1e-3)
    shared = generate(embedded, split.receiver_ids, send(embedded, split.sender_ids), max_new_tokens=16)
    assert shared.token_ids == generate(embedded, whole, max_new_tokens=16).token_ids


def test_half_the_layers_answer_what_baseline_cannot(embedded):
    ranking = calibrate(embedded, [("Noor is at the Palace of Versailles. The Palace of Versailles is near Paris.",
                                    "Which country is Noor located in?")])
    layers = ranking.select(0.5)
    assert len(layers) <= embedded.num_layers // 2
    split = split_prompt(embedded.tokenizer, DEMO_CONTEXT, DEMO_QUESTION)
    kv = generate(embedded, split.receiver_ids, send(embedded, split.sender_ids, layers), max_new_tokens=24)
    base = generate(embedded, split.baseline_ids, max_new_tokens=24)
    assert "United States" in kv.text
    assert "United States" not in base.text


def test_demo_command_prints_answers_and_bytes(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kvcomm.cli", "demo", "--ratio", "0.5"], capture_output=True, timeout=600,
                          text=True, env={**__import__("os").environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    assert "KVComm sent 15 of 30 layers" in proc.stdout and "bytes" in proc.stdout
    kv_row = [line for line in proc.stdout.splitlines() if line.startswith("│ KVComm")][0]
    assert "United States" in kv_row
