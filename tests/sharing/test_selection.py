"""Layer selection: Eq. 1 against an eager-attention reference, prior, top-M, helpers."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import rand_ids

from kvcomm.core.attention import ImportanceRecorder
from kvcomm.core.errors import DataError
from kvcomm.sharing.selection import (
    Ranking,
    contiguous_layers,
    format_layers,
    gaussian_prior,
    normalise,
    num_selected,
    parse_layers,
    random_layers,
)
from kvcomm.sharing.send_receive import receive_prefill, send


def test_importance_matches_eager_attention_of_dense_prefill(tiny):
    """With the sender KV in all layers, Ŝ_l = mean over heads and query rows of the attention mass
    that eager attention (output_attentions) puts on the context columns of a dense [C;Q] prefill."""
    ctx, q = rand_ids(15, 21), rand_ids(6, 22)
    rec = ImportanceRecorder(tiny.num_layers, context_len=len(ctx))
    receive_prefill(tiny, q, [send(tiny, ctx)], recorder=rec)
    tiny.model.set_attn_implementation("eager")
    try:
        out = tiny.model(input_ids=torch.tensor([ctx + q]), output_attentions=True)
    finally:
        tiny.model.set_attn_implementation("kvcomm")
    ref = torch.tensor([a[0, :, len(ctx):, : len(ctx)].sum(-1).mean().item() for a in out.attentions], dtype=torch.float64)
    torch.testing.assert_close(rec.scores(), ref, atol=1e-5, rtol=1e-5)
    assert ((ref > 0) & (ref < 1)).all()


def test_gaussian_prior_and_combination():
    p = gaussian_prior(30)
    assert p[15] == 1.0 and math.isclose(p[5].item(), math.exp(-100 / 200))
    r = Ranking(raw=[0.1, 0.5, 0.3, 0.9], alpha=1.0, mu=2.0, sigma=10.0, samples=1)
    torch.testing.assert_close(r.combined(), normalise(torch.tensor([0.1, 0.5, 0.3, 0.9], dtype=torch.float64)))
    assert r.select(0.5) == [1, 3]
    r0 = Ranking(raw=[0.1, 0.5, 0.3, 0.9], alpha=0.0, mu=0.0, sigma=1.0, samples=1)
    assert r0.select(0.25) == [0]  # prior alone picks the layer at µ
    mixed = Ranking(raw=[1.0, 0.0, 0.0, 0.0], alpha=0.8, mu=3.0, sigma=1.0, samples=1).combined()
    torch.testing.assert_close(mixed[0], torch.tensor(0.8 + 0.2 * math.exp(-4.5), dtype=torch.float64))


@pytest.mark.parametrize(("ratio", "layers", "m"), [(0.3, 30, 9), (0.5, 30, 15), (0.7, 30, 21), (0.3, 32, 10), (1.0, 4, 4), (0.01, 4, 1)])
def test_num_selected_is_ceiling(ratio, layers, m):
    assert num_selected(ratio, layers) == m


def test_ranking_roundtrip(tmp_path):
    r = Ranking(raw=[0.2, 0.4, 0.1], alpha=0.8, mu=1.5, sigma=10.0, samples=2, model="m", task="t")
    r.save(tmp_path / "r.json")
    assert Ranking.load(tmp_path / "r.json") == r
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(DataError, match="delete it to recalibrate"):
        Ranking.load(tmp_path / "bad.json")


def test_random_and_contiguous():
    assert random_layers(30, 0.3, seed=1) == random_layers(30, 0.3, seed=1)
    assert len(random_layers(30, 0.3, seed=1)) == 9
    assert random_layers(30, 0.3, seed=1) != random_layers(30, 0.3, seed=2)
    assert contiguous_layers(30, 0.3) == list(range(10, 19))
    scores = torch.zeros(30)
    scores[25:] = 1
    assert contiguous_layers(30, 0.1, scores=scores) == [25, 26, 27]
    with pytest.raises(ValueError):
        contiguous_layers(30, 0.5, start=20)


def test_parse_and_format_layers():
    assert parse_layers("0,3,5-7", 10) == [0, 3, 5, 6, 7]
    assert format_layers([0, 3, 5, 6, 7]) == "0,3,5-7"
    for bad in ("x", "1-", "10", "", "-1"):
        with pytest.raises(DataError):
            parse_layers(bad, 10)


def test_cli_and_evaluation_select_the_same_layers(tmp_path, monkeypatch):
    """One method→layers map: `kvcomm share/send --selection M --ratio R` and the evaluation's `M@R`
    send the same layers for every method and ratio, given the same calibrated ranking."""
    from conftest import make_tiny

    from kvcomm.cli.main import build_parser
    from kvcomm.cli.share import selection_of
    from kvcomm.experiments.share_eval import EvalConfig, run_item
    from kvcomm.sharing.selection import choose_layers, ranking_path

    monkeypatch.setenv("KVCOMM_CACHE", str(tmp_path))
    lm = make_tiny(layers=8)
    ranking = Ranking(raw=[0.9, 0.1, 0.8, 0.2, 0.7, 0.75, 0.3, 0.95], alpha=0.8, mu=4.0, sigma=10.0, samples=1)
    ranking.save(ranking_path(lm, "t"))  # the CLI reads the saved ranking of task "t"
    item = {"_task": "t", "_index": 0, "id": "i0", "context": "uma is at the house", "question": "which country",
            "answers": ["kansas"]}
    for method in ("kvcomm", "random", "contiguous"):
        for r in (0.25, 0.5, 0.7, 1.0):
            args = build_parser().parse_args(["share", "--context", "c", "--question", "q", "--task", "t",
                                              "--selection", method, "--ratio", str(r), "--seed", "3"])
            cli, _ = choose_layers(lm, selection_of(args), progress=False)
            row = run_item(lm, item, f"{method}@{r}", ranking, EvalConfig(seed=3, max_new_tokens=1))
            assert cli == row["layers"], (method, r)
