"""`+keysonly` (`ReuseConfig.value_offsets=False`): a reused placeholder gets its key offsets but not its value
offsets; the template segment after it keeps both."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny, rand_ids

from kvcomm.core.kv import KVBlock
from kvcomm.reuse.anchors import Match
from kvcomm.reuse.config import ReuseConfig, parse_setting
from kvcomm.reuse.engine import Content, ReuseEngine
from kvcomm.reuse.templates import AgentTemplate


def test_settings():
    mode, cfg = parse_setting("reuse+keysonly")
    assert mode == "reuse" and not cfg.value_offsets and not cfg.partial
    mode, cfg = parse_setting("blend@0.15+keysonly+partial+defer")
    assert (cfg.value_offsets, cfg.partial, cfg.defer_base, cfg.recompute) == (False, True, True, 0.15)
    assert parse_setting("reuse+partial")[1].value_offsets
    for bad in ("cacheblend@0.1+keysonly", "dense+keysonly", "reuse+keysonly+keysonly"):
        with pytest.raises(ValueError, match="unknown setting"):
            parse_setting(bad)
    with pytest.raises(ValueError, match="value_offsets=False needs offsets"):
        ReuseConfig(value_offsets=False, offsets=False)


def _random_block(like: KVBlock, n: int, seed: int) -> KVBlock:
    g = torch.Generator().manual_seed(seed)
    shape = (*like.k.shape[:2], n, like.k.shape[3])
    return KVBlock(torch.randn(shape, generator=g), torch.randn(shape, generator=g))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_only_the_placeholders_value_offsets_are_dropped(arch):
    """Same matches, both settings: keys equal everywhere, values equal outside the placeholders; inside a
    placeholder the values are its base values with `+keysonly` and base + value offset without."""
    lm = make_tiny(arch)
    agent = AgentTemplate.build(lm.tokenizer, "a", "you are one", "what {user_question} and {agent_0_current} is")
    contents = {"user_question": rand_ids(5, 1), "agent_0_current": rand_ids(4, 2)}
    ids, spans = agent.layout(contents)
    full = {}
    for keys_only in (False, True):
        engine = ReuseEngine(lm, "reuse", config=ReuseConfig(value_offsets=not keys_only))
        tkv = engine.template_kv(agent)
        bases = {n: engine.base_kv(Content(list(c)))[0] for n, c in contents.items()}
        matches = {}
        for i, name in enumerate(agent.names):  # offsets longer than the content, as anchors may be
            seg = tkv.segments[i]
            matches[name] = Match(_random_block(seg, bases[name].n + 2, 10 + i), _random_block(seg, seg.n, 20 + i),
                                  torch.ones(1), 0.0, ["x"])
        full[keys_only], _ = engine._assemble(agent, tkv, spans, bases, matches)
    torch.testing.assert_close(full[True].k, full[False].k)
    inside = torch.zeros(len(ids), dtype=torch.bool)
    for i, name in enumerate(agent.names):
        kind, a, b = spans[2 * i + 1]
        assert kind == name
        inside[a:b] = True
        torch.testing.assert_close(full[True].v[:, :, a:b], bases[name].v)
        torch.testing.assert_close(full[False].v[:, :, a:b], bases[name].v + matches[name].placeholder_offset.v[:, :, : b - a])
    torch.testing.assert_close(full[True].v[:, :, ~inside], full[False].v[:, :, ~inside])
