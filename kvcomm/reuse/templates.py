"""Agent prompt templates: fixed text segments and runtime placeholders, [p0, φ1, p1, φ2, p2, …].

Placeholder names follow the KVCOMM paper: ``{user_question}``, ``{condition_<name>_current}`` and
``{condition_<name>_history_<t>}`` (tool results), ``{agent_<id>_current}`` and
``{agent_<id>_history_<t>}`` (other agents' replies). Any other ``{...}`` is a user error.

The template is rendered through the model's chat template (system = the agent's role, user = the
template body), then cut at the placeholders. Every text segment and every placeholder's content is
tokenized *separately* and the prompt is the concatenation, so token boundaries never depend on the
content, all execution modes (dense, prefix caching, reuse) see identical token ids, and a content's
tokens are the same under every agent's prefix — which is what makes its KV reusable.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

from kvcomm.core.errors import DataError

PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_]+)\}")
VALID = re.compile(r"^(user_question|condition_[A-Za-z0-9]+_(current|history_\d+)|agent_[A-Za-z0-9]+_(current|history_\d+))$")


def placeholder_names(names) -> tuple[str, ...]:
    """`names` as a tuple, each checked against the placeholder syntax: a ValueError names the bad ones, so a
    typo in a setting is an error rather than a name that silently matches nothing."""
    names = tuple(names)
    bad = [n for n in names if not VALID.match(n)]
    if bad:
        raise ValueError(f"{', '.join(bad)}: not a placeholder name (user_question, agent_<id>_current, ...)")
    return names


@dataclass(frozen=True)
class Template:
    """A parsed template: `texts` has one more element than `names` (p0, then p_i after φ_i)."""

    texts: tuple[str, ...]
    names: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Template:
        texts, names, last = [], [], 0
        for m in PLACEHOLDER.finditer(text):
            if not VALID.match(m.group(1)):
                raise DataError(
                    f"unknown placeholder {{{m.group(1)}}}; use {{user_question}}, {{agent_<id>_current}}, "
                    "{agent_<id>_history_<t>}, {condition_<name>_current} or {condition_<name>_history_<t>}"
                )
            texts.append(text[last : m.start()])
            names.append(m.group(1))
            last = m.end()
        texts.append(text[last:])
        if len(set(names)) != len(names):
            raise DataError(f"placeholder used twice in one template: {names}")
        return cls(tuple(texts), tuple(names))


_BODY = "\x00KVCOMM_BODY\x00"


def render(tokenizer, role: str, body: str) -> str:
    """Chat-template a single user turn with `role` as the system prompt, keeping placeholders."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": role}, {"role": "user", "content": _BODY}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = f"{role}\n\n{_BODY}\nAnswer:"
    return text.replace(_BODY, body)


@dataclass
class AgentTemplate:
    """One agent's template, tokenized: `segment_ids[i]` are p_i's tokens."""

    agent_id: str
    template: Template
    segment_ids: list[list[int]]

    @classmethod
    def build(cls, tokenizer, agent_id: str, role: str, body: str) -> AgentTemplate:
        template = Template.parse(render(tokenizer, role, body))
        segs = [tokenizer(t, add_special_tokens=False)["input_ids"] if t else [] for t in template.texts]
        if not segs[-1]:
            raise DataError(f"agent {agent_id}: the template must end with text after its last placeholder")
        return cls(agent_id, template, segs)

    @property
    def names(self) -> tuple[str, ...]:
        return self.template.names

    @cached_property
    def key(self) -> tuple:
        """Identity of the fixed parts: two calls with the same key share template KV."""
        return (self.agent_id, tuple(tuple(s) for s in self.segment_ids), self.names)

    @cached_property
    def pool_key(self) -> str:
        """Stable, process-independent id under which the anchor pool keeps this template's deltas."""
        from kvcomm.reuse.anchors import content_key

        return f"{self.agent_id}|{content_key([repr(self.key)])[:16]}"

    def layout(self, contents: dict[str, list[int]]) -> tuple[list[int], list[tuple[str, int, int]]]:
        """Prompt ids and spans [(kind, start, end)], kind = 'p<i>' for segments or the placeholder name."""
        missing = [n for n in self.names if n not in contents]
        if missing:
            raise DataError(f"agent {self.agent_id}: no content for placeholders {missing}")
        ids: list[int] = []
        spans: list[tuple[str, int, int]] = []
        for i, seg in enumerate(self.segment_ids):
            if i > 0:
                name = self.names[i - 1]
                spans.append((name, len(ids), len(ids) + len(contents[name])))
                ids.extend(contents[name])
            spans.append((f"p{i}", len(ids), len(ids) + len(seg)))
            ids.extend(seg)
        return ids, spans


def shared_head_ids(tokenizer) -> list[int]:
    """The token ids every agent prompt starts with, whatever its role: the chat template's opening
    (e.g. ``<|im_start|>system\n`` or ``<|begin_of_text|>…``); empty for a template-less tokenizer.

    Reuse encodes stand-alone contents after these tokens (see `ReuseEngine.base_kv`): they are
    agent-independent, and they give the content's tokens the attention sink they will have in every
    real prompt, instead of making the content's own first token the sink."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    # roles of different first characters, so a merge of the template's last fixed token with the
    # role's first one (BPE) shortens the head instead of making it role-specific
    firsts = [AgentTemplate.build(tokenizer, "h", role, "{user_question}\nx").segment_ids[0]
              for role in ("Alpha beta.", "zulu yankee", "9 lives", " (spaced)", "\u00e9t\u00e9", "-")]
    n = 0
    while all(n < len(f) for f in firsts) and len({f[n] for f in firsts}) == 1:
        n += 1
    return firsts[0][:n]
