"""Which layers to send: attention-importance calibration with a Gaussian prior (KVComm §3).

  Ŝ_l  = 1/(H·|Q|) Σ_h Σ_q Σ_{c∈C} a^l_{h,q,c}   (receiver's attention mass on the sender's context,
                                                   sender KV present in *all* layers, causal masks)
  S_l  = (Ŝ_l − min Ŝ) / (max Ŝ − min Ŝ)
  P_l  = exp(−(l − µ)² / (2σ²)),  µ = L/2, σ = 10
  S'_l = α·S_l + (1 − α)·P_l,    M = ⌈ratio·L⌉ layers with the highest S'

α defaults to 1.0 for the Llama family and 0.8 for Qwen and Falcon (the paper's choices); other
families get 0.8 as well, since a little prior towards the middle layers is the safer default.
Ŝ is averaged over calibration samples (one is enough per the paper). Rankings are JSON files keyed
by (model fingerprint, task) so a fixed selection is reused without recalibrating.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kvcomm.core.attention import ImportanceRecorder
from kvcomm.core.datasets import read_jsonl
from kvcomm.core.errors import DataError
from kvcomm.core.files import write_atomic
from kvcomm.core.fingerprint import fingerprint
from kvcomm.core.models import LoadedModel, cache_dir
from kvcomm.sharing.prompts import DEFAULT_LAYOUT, context_span, split_prompt
from kvcomm.sharing.send_receive import receive_prefill, send

SPANS = ("context", "sender")
DEFAULT_SPAN = "sender"
ALPHA_BY_FAMILY = {"llama": 1.0, "mistral": 1.0, "qwen2": 0.8, "qwen3": 0.8, "falcon": 0.8}


def default_alpha(model_type: str) -> float:
    return ALPHA_BY_FAMILY.get(model_type, 0.8)


def num_selected(ratio: float, num_layers: int) -> int:
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    return min(num_layers, math.ceil(ratio * num_layers - 1e-9))


def gaussian_prior(num_layers: int, mu: float | None = None, sigma: float = 10.0) -> torch.Tensor:
    mu = num_layers / 2 if mu is None else mu
    idx = torch.arange(num_layers, dtype=torch.float64)
    return torch.exp(-((idx - mu) ** 2) / (2 * sigma**2))


def normalise(raw: torch.Tensor) -> torch.Tensor:
    lo, hi = raw.min(), raw.max()
    return torch.zeros_like(raw) if hi - lo < 1e-12 else (raw - lo) / (hi - lo)


@dataclass
class Ranking:
    """Calibrated per-layer scores for one (model, task)."""

    raw: list[float]  # Ŝ_l
    alpha: float
    mu: float
    sigma: float
    samples: int
    model: str = ""
    task: str = ""
    layout: str = DEFAULT_LAYOUT  # the prompt layout it was calibrated with, and serves
    span: str = DEFAULT_SPAN  # the key columns Ŝ counts: every sender token, or the context's alone
    score: str = "attention"  # "attention" (Eq. 1, raw = Ŝ) or "fidelity" (raw = L − rank: `sharing.fidelity`)
    curve: list[float] | None = None  # fidelity only: the calibration KL after each removal

    @property
    def num_layers(self) -> int:
        return len(self.raw)

    def combined(self) -> torch.Tensor:
        s = normalise(torch.tensor(self.raw, dtype=torch.float64))
        return self.alpha * s + (1 - self.alpha) * gaussian_prior(self.num_layers, self.mu, self.sigma)

    def order(self) -> list[int]:
        """Every layer, the first chosen first (ties: the lower layer)."""
        return torch.argsort(self.combined(), descending=True, stable=True).tolist()

    def select(self, ratio: float) -> list[int]:
        m = num_selected(ratio, self.num_layers)
        return sorted(self.order()[:m])

    def save(self, path: str | Path) -> None:
        write_atomic(path, json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Ranking:
        try:
            data = json.loads(Path(path).read_text())
            return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except (OSError, ValueError, TypeError) as e:
            raise DataError(f"cannot read layer ranking {path}: {e}; delete it to recalibrate") from None


@torch.no_grad()
def importance_per_sample(lm: LoadedModel, samples: list[tuple[str, str]], progress: bool = False,
                          answer_prefix: str = "", layout: str = DEFAULT_LAYOUT, span: str = DEFAULT_SPAN) -> torch.Tensor:
    """Ŝ_l of each (context, question) sample, sender KV in every layer: [samples, layers].

    `span="sender"` counts attention on every sender token; `span="context"` only on the context's own
    tokens (Eq. 1's c ∈ C), leaving out the sender's chat template, whose first token is the attention
    sink that every query visits in every layer whatever the context says."""
    from tqdm.auto import tqdm

    if span not in SPANS:
        raise ValueError(f"span must be one of {SPANS}, got {span!r}")
    rows = []
    for context, question in tqdm(samples, desc="calibrating", disable=not progress, unit="sample"):
        split = split_prompt(lm.tokenizer, context, question, answer_prefix=answer_prefix, layout=layout)
        msg = send(lm, split.sender_ids)
        start, end = context_span(lm.tokenizer, context, layout=layout) if span == "context" else (0, msg.seq_len)
        rec = ImportanceRecorder(lm.num_layers, context_len=end, context_start=start)
        receive_prefill(lm, split.receiver_ids, [msg], recorder=rec)
        rows.append(rec.scores())
    return torch.stack(rows) if rows else torch.zeros(0, lm.num_layers, dtype=torch.float64)


def attention_importance(lm: LoadedModel, samples: list[tuple[str, str]], progress: bool = False,
                         answer_prefix: str = "", layout: str = DEFAULT_LAYOUT, span: str = DEFAULT_SPAN) -> torch.Tensor:
    """Ŝ_l averaged over (context, question) samples, sender KV in every layer."""
    return importance_per_sample(lm, samples, progress, answer_prefix, layout, span).mean(0)


def calibrate(
    lm: LoadedModel,
    samples: list[tuple[str, str]],
    alpha: float | None = None,
    mu: float | None = None,
    sigma: float = 10.0,
    task: str = "",
    progress: bool = False,
    answer_prefix: str = "",
    layout: str = DEFAULT_LAYOUT,
    span: str = DEFAULT_SPAN,
) -> Ranking:
    """The ranking of `samples` in the prompt `layout` it will serve (α by model family when None)."""
    if not samples:
        raise ValueError("calibration needs at least one (context, question) sample")
    raw = attention_importance(lm, samples, progress, answer_prefix, layout, span)
    alpha = default_alpha(lm.config.model_type) if alpha is None else alpha
    return Ranking(raw.tolist(), alpha, lm.num_layers / 2 if mu is None else mu, sigma, len(samples), lm.name, task,
                   layout, span)


def calibrate_fidelity(lm: LoadedModel, samples: list[tuple[str, str]], task: str = "", progress: bool = False,
                       answer_prefix: str = "", layout: str = DEFAULT_LAYOUT) -> Ranking:
    """The output-fidelity ranking of `samples` (`kvcomm.sharing.fidelity`) as a Ranking: raw = L − rank,
    α = 1, so `select` and `combined` follow the elimination order."""
    from kvcomm.sharing.fidelity import fidelity_order

    order, curve = fidelity_order(lm, samples, answer_prefix=answer_prefix, layout=layout, progress=progress)
    raw = [0.0] * lm.num_layers
    for rank, layer in enumerate(order):
        raw[layer] = float(lm.num_layers - rank)
    return Ranking(raw, 1.0, lm.num_layers / 2, 10.0, len(samples), lm.name, task, layout, score="fidelity",
                   curve=curve)


SCORES = ("attention", "fidelity")


def score_suffix(score: str) -> str:
    """The file-name part a ranking's score adds: '' for attention (names from before fidelity existed)."""
    return "" if score == "attention" else f".{score}"


def ranking_path(lm: LoadedModel, task: str, layout: str = DEFAULT_LAYOUT, score: str = "attention") -> Path:
    fp = fingerprint(lm.model, lm.tokenizer)
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in task) or "default"
    return (cache_dir() / "rankings" / f"{fp.architecture}-{fp.weights_digest[:12]}"
            / f"{safe}.{layout}{score_suffix(score)}.json")


def cached_ranking(lm: LoadedModel, task: str, samples: list[tuple[str, str]], progress: bool = False,
                   layout: str = DEFAULT_LAYOUT, score: str = "attention", **kw) -> Ranking:
    """Load the saved ranking for (model, task, layout, score), calibrating and saving it the first time."""
    path = ranking_path(lm, task, layout, score)
    if path.exists():
        return Ranking.load(path)
    if score == "fidelity":
        ranking = calibrate_fidelity(lm, samples, task=task, progress=progress, layout=layout, **kw)
    else:
        ranking = calibrate(lm, samples, task=task, progress=progress, layout=layout, **kw)
    ranking.save(path)
    return ranking


def random_layers(num_layers: int, ratio: float, seed: int = 0) -> list[int]:
    return sorted(random.Random(seed).sample(range(num_layers), num_selected(ratio, num_layers)))


def contiguous_layers(num_layers: int, ratio: float, start: int | None = None, scores: torch.Tensor | None = None) -> list[int]:
    """A contiguous chunk of M layers: at `start`, or the chunk with the highest total score, or centred."""
    m = num_selected(ratio, num_layers)
    if start is None:
        if scores is not None:
            sums = [float(scores[i : i + m].sum()) for i in range(num_layers - m + 1)]
            start = max(range(len(sums)), key=sums.__getitem__)
        else:
            start = (num_layers - m) // 2
    if not 0 <= start <= num_layers - m:
        raise ValueError(f"a chunk of {m} layers cannot start at {start} in a {num_layers}-layer model")
    return list(range(start, start + m))


METHODS = ("kvcomm", "kvcomm-online", "fidelity", "random", "contiguous")


def ranking_score(method: str) -> str:
    """Which calibrated ranking a selection method reads: 'fidelity' for fidelity, else 'attention'."""
    return "fidelity" if method == "fidelity" else "attention"


def layers_for(method: str, ratio: float, num_layers: int, ranking: Ranking | None = None, seed: int = 0) -> list[int]:
    """The one map from a selection method and ratio to the layers sent (CLI, evaluation, benchmark).

      kvcomm, kvcomm-online  the top ⌈ratio·L⌉ layers of `ranking` by S' (the online variant differs
                             only in which ranking it passes)
      fidelity               the first ⌈ratio·L⌉ layers of an output-fidelity ranking (`sharing.fidelity`)
      random                 ⌈ratio·L⌉ layers drawn with `seed`
      contiguous             the contiguous chunk of that size with the highest total S' of `ranking`;
                             the centred chunk when no ranking is given (speed benchmarks, where
                             which layers travel does not matter)
    """
    if method in ("kvcomm", "kvcomm-online", "fidelity"):
        if ranking is None or ranking.score != ranking_score(method):
            raise ValueError(f"{method} selection needs a calibrated {ranking_score(method)} ranking")
        return ranking.select(ratio)
    if method == "random":
        return random_layers(num_layers, ratio, seed)
    if method == "contiguous":
        if ranking is not None and ranking.score != "attention":
            raise ValueError("contiguous selection takes the best block of an attention ranking")
        return contiguous_layers(num_layers, ratio, scores=ranking.combined() if ranking is not None else None)
    raise ValueError(f"unknown selection method {method!r}; choose from {', '.join(METHODS)}")


def needs_ranking(method: str) -> bool:
    return method != "random"


@dataclass(frozen=True)
class Selection:
    """Which layers a sender sends: an explicit list, or `method` at `ratio` (ranking saved under `task`).

    layers       explicit list such as "0,3,10-14" (overrides method and ratio)
    method       kvcomm (attention importance + prior), fidelity (output-checked ranking), random or
                 contiguous (best chunk of the attention ranking)
    calibration  JSONL of calibration samples; None = the two built-in samples
    layout       the prompt layout the ranking is calibrated for (`kvcomm.sharing.prompts`)
    """

    ratio: float = 0.5
    method: str = "kvcomm"
    layers: str | None = None
    task: str = "default"
    calibration: str | None = None
    seed: int = 0
    layout: str = DEFAULT_LAYOUT


def calibration_samples(path: str | None = None) -> list[tuple[str, str]]:
    """(context, question) pairs of a JSONL file, or the built-in samples."""
    src = Path(path) if path else Path(__file__).parents[1] / "resources" / "calibration.jsonl"
    return [(item["context"], item["question"]) for item in read_jsonl(src)]


def choose_layers(lm: LoadedModel, selection: Selection, progress: bool = True) -> tuple[list[int], str]:
    """The layers to send and how they were chosen ('explicit' or the method), calibrating once if needed."""
    if selection.layers:
        return parse_layers(selection.layers, lm.num_layers), "explicit"
    ranking = None
    if needs_ranking(selection.method):
        ranking = cached_ranking(lm, selection.task, calibration_samples(selection.calibration), progress=progress,
                                 layout=selection.layout, score=ranking_score(selection.method))
    return layers_for(selection.method, selection.ratio, lm.num_layers, ranking, selection.seed), selection.method


def parse_layers(text: str, num_layers: int) -> list[int]:
    """'0,3,5-9' -> [0, 3, 5, 6, 7, 8, 9], checked against the model's layer count."""
    layers: set[int] = set()
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                a, b = part.split("-")
                layers.update(range(int(a), int(b) + 1))
            elif part:
                layers.add(int(part))
    except ValueError:
        raise DataError(f"cannot parse layer list {text!r}; use e.g. 0,3,5-9") from None
    bad = [x for x in layers if not 0 <= x < num_layers]
    if bad or not layers:
        raise DataError(f"layer list {text!r} must name layers in 0..{num_layers - 1}")
    return sorted(layers)


def format_layers(layers) -> str:
    """[3, 4, 5, 8] -> '3-5,8' (compact, for tables and logs)."""
    layers = sorted(layers)
    parts, i = [], 0
    while i < len(layers):
        j = i
        while j + 1 < len(layers) and layers[j + 1] == layers[j] + 1:
            j += 1
        parts.append(str(layers[i]) if i == j else f"{layers[i]}-{layers[j]}")
        i = j + 1
    return ",".join(parts)
