"""CLI: send/receive between processes, and every refusal as a non-zero exit with one line, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import make_tiny

from kvcomm.cli.main import main
from kvcomm.core.message import encode, save_message
from kvcomm.sharing.send_receive import send

CONTEXT = "uma is at the house in kansas"


def run_cli(*args, stdin: bytes | None = None, env_cache=None):
    env = dict(os.environ)
    if env_cache:
        env["KVCOMM_CACHE"] = str(env_cache)
    return subprocess.run([sys.executable, "-m", "kvcomm.cli", *map(str, args)], input=stdin,
                          capture_output=True, env=env, timeout=300)


def assert_one_line_refusal(proc, *needles):
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert "Traceback" not in err
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert lines[-1].startswith("kvcomm: error: "), err
    for n in needles:
        assert n in lines[-1], err


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCOMM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_send_receive_through_files(tiny_dir, tmp_path, cache, capsys):
    out = tmp_path / "m.kv"
    assert main(["send", "--model", str(tiny_dir), "--context", CONTEXT, "--layers", "1,2", "--out", str(out)]) == 0
    assert main(["inspect", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layers"] == [1, 2] and info["seq_len"] > 0
    assert main(["receive", "--model", str(tiny_dir), "--message", str(out), "--question", "which country", "--json",
                 "--max-new-tokens", "3"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["layers"] == [[1, 2]] and res["prefix_tokens"] == info["seq_len"]


def test_send_receive_through_a_pipe_between_processes(tiny_dir, tmp_path):
    sender = run_cli("send", "--model", tiny_dir, "--context", CONTEXT, "--ratio", "0.5", "--selection", "contiguous",
                     "--out", "-", env_cache=tmp_path)
    assert sender.returncode == 0, sender.stderr.decode()
    assert sender.stdout[:8] != b"" and b"kvcomm.kv" in sender.stdout[:2000]
    receiver = run_cli("receive", "--model", tiny_dir, "--message", "-", "--question", "which country", "--json",
                       stdin=sender.stdout, env_cache=tmp_path)
    assert receiver.returncode == 0, receiver.stderr.decode()
    assert json.loads(receiver.stdout)["layers"] == [[1, 2]]


def test_share_with_calibration(tiny_dir, cache, capsys):
    assert main(["share", "--model", str(tiny_dir), "--context", CONTEXT, "--question", "which country", "--ratio", "0.5",
                 "--json", "--max-new-tokens", "2"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(res["layers"]) == 2 and res["bytes_sent"] > 0 and res["selection"] == "kvcomm"
    assert list(cache.glob("rankings/*/default.paper.json"))  # saved for reuse, per prompt layout


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, tiny_dir):
    """One file per refusal reason, all from the tiny model saved in tiny_dir (seed 0)."""
    from transformers import AutoModelForCausalLM

    from kvcomm.core.models import from_objects

    d = tmp_path_factory.mktemp("bad")
    lm = from_objects(AutoModelForCausalLM.from_pretrained(tiny_dir), make_tiny().tokenizer)
    msg = send(lm, [5, 6, 7, 8, 9], layers=[0, 1])
    good = encode(msg)
    n = int.from_bytes(good[:8], "little")
    header = json.loads(good[8 : 8 + n])

    def with_header(h):
        b = json.dumps(h).encode()
        return len(b).to_bytes(8, "little") + b + good[8 + n :]

    files = {}
    other = make_tiny("llama", seed=7)
    save_message(send(other, [5, 6, 7], layers=[0]), d / "foreign.kv")
    files["foreign"] = d / "foreign.kv"
    (d / "truncated.kv").write_bytes(good[: len(good) // 2])
    files["truncated"] = d / "truncated.kv"
    (d / "corrupt.kv").write_bytes(b"\xff" * 64)
    files["corrupt"] = d / "corrupt.kv"
    h = json.loads(json.dumps(header))
    h["__metadata__"]["version"] = "7"
    (d / "version.kv").write_bytes(with_header(h))
    files["version"] = d / "version.kv"
    h = json.loads(json.dumps(header))
    h["k.0"]["shape"] = [1, 2, 4, 16]
    (d / "shape.kv").write_bytes(with_header(h))
    files["shape"] = d / "shape.kv"
    nan = msg.to()
    nan.values[0] = nan.values[0].clone()
    nan.values[0][..., 0] = float("nan")
    save_message(nan, d / "nan.kv")
    files["nan"] = d / "nan.kv"
    (d / "good.kv").write_bytes(good)
    files["good"] = d / "good.kv"
    return files


@pytest.mark.parametrize(("case", "needle"), [
    ("foreign", "different model"),
    ("truncated", "truncated"),
    ("corrupt", "not a kvcomm message"),
    ("version", "version '7'"),
    ("shape", "k.0"),
    ("nan", "NaN"),
])
def test_receive_refusals_in_process(tiny_dir, bad_files, cache, capsys, case, needle):
    code = main(["receive", "--model", str(tiny_dir), "--message", str(bad_files[case]), "--question", "which"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("kvcomm: error: ") and needle in err and len(err.strip().splitlines()) == 1


def test_receive_refusals_as_real_processes(tiny_dir, bad_files, tmp_path):
    proc = run_cli("receive", "--model", tiny_dir, "--message", bad_files["foreign"], "--question", "which", env_cache=tmp_path)
    assert_one_line_refusal(proc, "different model")
    proc = run_cli("receive", "--model", tiny_dir, "--message", bad_files["good"], "--question", "which",
                   "--max-bytes", "100", env_cache=tmp_path)
    assert_one_line_refusal(proc, "over the 100-byte limit")
    proc = run_cli("inspect", bad_files["truncated"], env_cache=tmp_path)
    assert_one_line_refusal(proc, "truncated")
    proc = run_cli("inspect", "-", stdin=bad_files["nan"].read_bytes(), env_cache=tmp_path)
    assert_one_line_refusal(proc, "NaN")


@pytest.mark.parametrize(("argv", "needle"), [
    (["receive", "--model", "no/such/dir/x", "--message", "m", "--question", "q"], "unknown model"),
    (["share", "--model", "missing.gguf", "--context", "c", "--question", "q"], "does not exist"),
    (["inspect", "/nonexistent.kv"], "does not exist"),
    (["share", "--context", "@/nonexistent.txt", "--question", "q"], "text file /nonexistent.txt does not exist"),
])
def test_user_errors_exit_2_in_process(argv, needle, capsys, cache):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_bad_flag_values_exit_2(capsys):
    for argv in (["share", "--context", "c", "--question", "q", "--ratio", "1.5"],
                 ["share", "--context", "c", "--question", "q", "--ratio", "abc"],
                 ["receive", "--message", "m", "--question", "q", "--max-bytes", "-1"],
                 ["bench", "--missing-anchors", "-1"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    assert "ratio must be" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["agents", "--compile", "--report-only", "--out", "X"], ["bench", "--compile"]])
def test_compile_flag_turns_on_compiled_forwards(argv, monkeypatch, tmp_path):
    """--compile reaches the static path through KVCOMM_COMPILE (kvcomm.core.compiled.wanted)."""
    from kvcomm.cli.common import apply_compile
    from kvcomm.cli.main import build_parser
    from kvcomm.core import compiled

    monkeypatch.setenv("KVCOMM_COMPILE", "0")  # recorded, so the flag's setting is undone after the test
    args = build_parser().parse_args([a if a != "X" else str(tmp_path) for a in argv])
    assert args.compile and not compiled.wanted()
    apply_compile(args)
    assert compiled.wanted()
