"""kvcomm: LLM agents that communicate through their KV caches.

The package is layered by concept; imports go downward only (checked by import-linter):

  cli          the `kvcomm` command (argparse only)
  experiments  evaluations and benchmarks that write tables and plots
  agents       the multi-agent runtime: runner, workloads, sandbox, Ray actors
  reuse        cross-context KV reuse (KVCOMM): templates, anchor pool, engine
  sharing      selective KV sharing (KVComm): prompts, layer selection, send/receive, text baselines
  core         what every method uses: models, attention, RoPE, KV blocks and the one prefill,
               generation, the KV message format, fingerprints, errors

The public API below is importable from `kvcomm` directly; each name is loaded on first use, so
`import kvcomm` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "kvcomm.core.models": ["load_model", "from_objects", "LoadedModel"],
    "kvcomm.core.message": ["KVMessage", "encode", "decode", "save_message", "load_message"],
    "kvcomm.core.fingerprint": ["fingerprint", "Fingerprint"],
    "kvcomm.core.kv": ["KVBlock", "prefill"],
    "kvcomm.core.errors": ["KVCommError", "MessageError", "IncompatibleModelError", "ModelLoadError", "DataError"],
    "kvcomm.sharing.prompts": ["split_prompt", "sender_ids", "receiver_ids"],
    "kvcomm.sharing.selection": ["calibrate", "Ranking", "Selection", "choose_layers", "layers_for"],
    "kvcomm.sharing.send_receive": ["send", "generate", "Generation"],
    "kvcomm.reuse.anchors": ["AnchorPool", "PoolConfig"],
    "kvcomm.reuse.engine": ["ReuseEngine", "Content"],
    "kvcomm.reuse.config": ["ReuseConfig"],
    "kvcomm.reuse.templates": ["AgentTemplate"],
    "kvcomm.agents.runner": ["MultiAgentRunner", "make_engine"],
    "kvcomm.agents.workloads": ["load_workload"],
}
_WHERE = {name: module for module, names in _API.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'kvcomm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
