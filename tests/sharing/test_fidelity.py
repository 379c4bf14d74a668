"""Output-fidelity ranking: backward elimination against all-layer sharing (tiny random models, CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny

from kvcomm.sharing.fidelity import _Sample, fidelity_order
from kvcomm.sharing.selection import Ranking, calibrate, calibrate_fidelity, layers_for

CHATML = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
          "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
SAMPLES = [("uma is at the house in kansas", "which country is uma in"), ("the code is nine", "what is the code")]


@pytest.fixture(params=["llama", "qwen2"])
def lm(request):
    lm = make_tiny(request.param, layers=5)
    lm.tokenizer.chat_template = CHATML
    return lm


def test_teacher_is_all_layer_sharing_and_kl_grows_as_layers_go(lm):
    s = _Sample(lm, *SAMPLES[0], answer_prefix="", layout="turn", reply_tokens=6)
    every = list(range(lm.num_layers))
    assert s.kl(every) == pytest.approx(0.0, abs=1e-6)  # all layers shared is the teacher itself
    assert s.kl(every[1:]) >= 0 and s.kl([0]) > 1e-4
    assert len(s.ids) - s.first == s.teacher.shape[0]  # one distribution per reply token


def test_elimination_order_is_a_permutation_and_its_curve_is_the_kl_left(lm):
    order, curve = fidelity_order(lm, SAMPLES, layout="turn", reply_tokens=6)
    assert sorted(order) == list(range(lm.num_layers)) and len(curve) == lm.num_layers - 1
    items = [_Sample(lm, c, q, "", "turn", 6) for c, q in SAMPLES]
    # after the last removal only order[0] is left: the curve's last point is that set's KL
    assert curve[-1] == pytest.approx(sum(s.kl([order[0]]) for s in items), rel=1e-4)
    # the first removal (the order's last layer) was the cheapest one from the full set
    without = [sum(s.kl([x for x in order if x != layer]) for s in items) for layer in order]
    assert curve[0] == pytest.approx(min(without), rel=1e-4) == pytest.approx(without[-1], rel=1e-4)


def test_fidelity_ranking_selects_nested_sets_and_only_for_its_method(lm, tmp_path):
    ranking = calibrate_fidelity(lm, SAMPLES[:1], task="t", layout="turn")
    assert ranking.score == "fidelity" and ranking.layout == "turn"
    sets = [layers_for("fidelity", r, lm.num_layers, ranking) for r in (0.2, 0.4, 0.6, 0.8, 1.0)]
    assert all(set(a) <= set(b) for a, b in zip(sets, sets[1:])) and sets[-1] == list(range(lm.num_layers))
    assert sets[0] == [ranking.order()[0]]
    ranking.save(tmp_path / "r.json")
    assert Ranking.load(tmp_path / "r.json").order() == ranking.order()
    attention = calibrate(lm, SAMPLES[:1], layout="turn")
    with pytest.raises(ValueError, match="fidelity ranking"):
        layers_for("fidelity", 0.5, lm.num_layers, attention)
    with pytest.raises(ValueError, match="attention ranking"):
        layers_for("kvcomm", 0.5, lm.num_layers, ranking)
    with pytest.raises(ValueError, match="attention ranking"):
        layers_for("contiguous", 0.5, lm.num_layers, ranking)


def test_eval_runs_fidelity_beside_kvcomm_and_compares_them(lm, tmp_path):
    from kvcomm.experiments.share_eval import EvalConfig, run_eval

    cfg = EvalConfig(tasks=("countries",), methods=("kvcomm", "fidelity", "random"), ratios=(0.4, 0.8), limit=2,
                     max_new_tokens=4, layout="turn")
    summary = run_eval(lm, cfg, tmp_path, progress=False)
    assert (tmp_path / "rankings" / "countries.fidelity.json").exists()
    assert set(summary["table"]) == {"kvcomm@0.4", "kvcomm@0.8", "fidelity@0.4", "fidelity@0.8", "random@0.4", "random@0.8"}
    assert "fidelity@0.4 vs kvcomm@0.4" in summary["comparisons"] and "fidelity@0.8 vs random@0.8" in summary["comparisons"]
    order = summary["fidelity_orders"]["countries"]
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert all(r["layers"] == sorted(order[: len(r["layers"])]) for r in rows if r["method"].startswith("fidelity"))
    assert torch.is_tensor(Ranking.load(tmp_path / "rankings" / "countries.fidelity.json").combined())


def test_choose_layers_calibrates_and_caches_a_fidelity_ranking_of_its_own(lm, tmp_path, monkeypatch):
    from kvcomm.sharing.selection import Selection, choose_layers, ranking_path

    monkeypatch.setenv("KVCOMM_CACHE", str(tmp_path))
    layers, how = choose_layers(lm, Selection(ratio=0.4, method="fidelity", layout="turn", task="t"), progress=False)
    path = ranking_path(lm, "t", "turn", "fidelity")
    assert how == "fidelity" and path.exists() and layers == Ranking.load(path).select(0.4)
    assert not ranking_path(lm, "t", "turn").exists()  # the attention ranking of the same task is another file


def test_eval_calibrates_on_several_held_out_items_when_asked(lm, tmp_path):
    from kvcomm.core.errors import DataError
    from kvcomm.experiments.share_eval import EvalConfig, run_eval

    cfg = EvalConfig(tasks=("countries",), methods=("kvcomm", "fidelity"), ratios=(0.6,), limit=1, max_new_tokens=3,
                     layout="turn", calibration_items=2)
    summary = run_eval(lm, cfg, tmp_path, progress=False)
    assert summary["calibration_items"] == 2
    for name in ("countries.json", "countries.fidelity.json"):
        assert Ranking.load(tmp_path / "rankings" / name).samples == 2
    with pytest.raises(DataError, match="calibration_items"):  # rows of another calibration are not mixed in
        run_eval(lm, EvalConfig(**{**cfg.__dict__, "calibration_items": 1}), tmp_path, progress=False)
