"""kvcomm: LLM agents that communicate through KV caches.

Modules, one job each:
  models       load a model + tokenizer (embedded GGUF, dir, hub id), device and dtype
  fingerprint  what must match before KV may move between models
  attention    the `kvcomm` attention function (per-layer prefix lengths, importance recording)
  prompts      sender / receiver / Skyline / Baseline prompts (sender ids are a prefix of Skyline's)
  sharing      selective KV sharing: sender prefill, receiver generation
  selection    layer ranking: attention importance + Gaussian prior, random / contiguous baselines
  message      the KV message wire format (safetensors) and its validation
  rope         re-rotating keys to other positions
  cli          the `kvcomm` command
"""

__version__ = "0.1.0"
