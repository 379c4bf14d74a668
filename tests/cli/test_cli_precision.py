"""CLI: `send --precision`, `inspect` showing precision, group size and bytes per context token, `share --precision`."""

from __future__ import annotations

import json

import pytest

from kvcomm.cli.main import main

CONTEXT = "uma is at the house in kansas and the house is in the city of paris in france"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCOMM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_send_at_each_precision_inspect_and_receive(tiny_dir, tmp_path, cache, capsys):
    infos = {}
    for precision in (None, "int8", "int4", "fp8"):
        out = tmp_path / f"{precision}.kv"
        argv = ["send", "--model", str(tiny_dir), "--context", CONTEXT, "--layers", "0-3", "--out", str(out)]
        argv += ["--precision", precision] if precision else []
        assert main(argv) == 0
        capsys.readouterr()
        assert main(["inspect", str(out)]) == 0
        infos[precision] = info = json.loads(capsys.readouterr().out)
        assert info["precision"] == (precision or "fp32") and info["dtype"] == "float32"
        assert info["group_size"] == (128 if precision else 0)
        assert info["file_bytes"] == out.stat().st_size
        assert info["bytes_per_context_token"] == pytest.approx(info["file_bytes"] / info["seq_len"], abs=0.1)
        assert main(["receive", "--model", str(tiny_dir), "--message", str(out), "--question", "which country",
                     "--json", "--max-new-tokens", "3"]) == 0
        res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert res["layers"] == [[0, 1, 2, 3]] and res["prefix_tokens"] == info["seq_len"]
    # tiny model (head_dim 16, short context): the header is a large share, yet the payload shrinks
    assert infos["int4"]["file_bytes"] < infos["int8"]["file_bytes"] < infos[None]["file_bytes"]


def test_group_size_and_precision_flags(tiny_dir, tmp_path, cache, capsys):
    out = tmp_path / "g.kv"
    assert main(["send", "--model", str(tiny_dir), "--context", CONTEXT, "--layers", "1", "--out", str(out),
                 "--precision", "int4", "--group-size", "4"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["group_size"] == 4
    assert main(["send", "--model", str(tiny_dir), "--context", CONTEXT, "--out", str(out), "--group-size", "4"]) == 2
    err = capsys.readouterr().err
    assert "--group-size applies to" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as e:
        main(["send", "--context", "c", "--out", str(out), "--precision", "int2"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_share_reports_the_bytes_of_the_chosen_precision(tiny_dir, cache, capsys):
    sizes = {}
    for precision in ("fp32", "int8"):
        assert main(["share", "--model", str(tiny_dir), "--context", CONTEXT, "--question", "which country",
                     "--layers", "0-3", "--precision", precision, "--json", "--max-new-tokens", "2"]) == 0
        res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert res["precision"] == precision
        sizes[precision] = res["bytes_sent"]
    assert sizes["int8"] < sizes["fp32"]


def test_agents_offset_precision_reaches_the_pool_config():
    from kvcomm.cli.agents import config_of
    from kvcomm.cli.main import build_parser

    args = build_parser().parse_args(["agents", "--offset-precision", "int8"])
    assert config_of(args).pool.offset_precision == "int8"
    assert config_of(build_parser().parse_args(["agents"])).pool.offset_precision is None
