"""P9: precision and recall of the semantic cache on a labelled set of prompt pairs.

The figures come from the test part of the systematic set in ``bench/semantic_pairs.py`` (1,055
pairs, split once by base prompt); the older hand-written ``bench/data/semantic_pairs.tsv``
(described below) is kept for reference: the rules were written looking at it.

``bench/data/semantic_pairs.tsv``: for each base prompt (chat questions and the classifier's task
types: summarization, translation, extraction/classification, code, reasoning), one paraphrase
that deserves the same answer and one near miss that does not (another entity, number, language,
sentiment, direction or word order). Each pair goes through the shipped :class:`SemanticStage`
with the real all-MiniLM-L6-v2: the base prompt is answered and indexed, then the other prompt is
looked up. The similarity of each hit is recorded with the threshold at 0, so the precision and
recall at any threshold come from one pass (with one entry per index, a hit at threshold t is a
hit at 0 with similarity >= t)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from bench.harness import BenchEnv, ScenarioResult
from bench.semantic_pairs import build_pairs, split
from core.catalog import Catalog, ModelEntry
from core.settings import ProcessorSettings
from core.topics import Topics
from schemas import ChatMessage, InferenceRequest, InferenceResult, ResultStatus, Route, Serde, utcnow
from stream_processors.embedding import Embedder, MiniLMEmbedder
from stream_processors.emit import Emitter
from stream_processors.semantic import SemanticStage

__all__ = ["Pair", "load_pairs", "run_p9", "similarities"]

DATA = Path(__file__).parent / "data" / "semantic_pairs.tsv"
THRESHOLDS = (0.70, 0.75, 0.80, 0.85, 0.88, 0.90, 0.92, 0.95)
_CATALOG = Catalog(
    models=[
        ModelEntry(name="m", source="bench", tier=1, context_length=4096, input_price_per_1m=1, output_price_per_1m=2)
    ]
)
_SERDE = Serde()
_TOPICS = Topics("bench.")


@dataclass(frozen=True)
class Pair:
    task: str
    cached: str
    asked: str
    same_answer: bool


def load_pairs(path: Path = DATA) -> list[Pair]:
    rows = [r for r in csv.reader(path.open(encoding="utf-8"), delimiter="\t") if r and not r[0].startswith("#")]
    return [Pair(r[0], r[1], r[2], True) for r in rows] + [Pair(r[0], r[1], r[3], False) for r in rows]


def _request(text: str, rid: str) -> InferenceRequest:
    r = InferenceRequest(request_id=rid, tenant="bench", messages=[ChatMessage(role="user", content=text)])
    r.route = Route(model="m", reason="bench")
    return r


def similarities(pairs: list[Pair], embedder: Embedder, **semantic: object) -> list[float | None]:
    """The similarity of each pair's hit with the threshold at 0, or None for a miss."""
    settings = ProcessorSettings.model_validate({"semantic": {"enabled": True, **semantic, "threshold": 0.0}})
    out: list[float | None] = []
    for i, pair in enumerate(pairs):
        stage = SemanticStage({}, Emitter(_TOPICS, _SERDE, _CATALOG), _CATALOG, settings, embedder)
        first = _request(pair.cached, f"a{i}")
        items, texts = stage.prepare([(first, _SERDE.encode(first), [])])
        stage.finish(items, texts, stage.vectors(texts) if texts else None)
        now = utcnow()
        stage.on_completed(
            InferenceResult(
                request_id=first.request_id,
                tenant="bench",
                priority=first.priority,
                model="m",
                status=ResultStatus.SUCCEEDED,
                output_text="answer",
                finish_reason="stop",
                completion_tokens=5,
                created_at=now,
                started_at=now,
                completed_at=now,
                engine_run_id="bench",
            ),
            0,
        )
        second = _request(pair.asked, f"b{i}")
        items, texts = stage.prepare([(second, _SERDE.encode(second), [])])
        forwards = stage.finish(items, texts, stage.vectors(texts) if texts else None)
        hit = next(
            (f.record for f in forwards if f.topic == _TOPICS.results and isinstance(f.record, InferenceResult)), None
        )
        out.append(hit.similarity if hit is not None else None)
    return out


def precision_recall(pairs: list[Pair], sims: list[float | None], threshold: float) -> tuple[float, float, int]:
    hits = [p.same_answer for p, s in zip(pairs, sims, strict=True) if s is not None and s >= threshold]
    positives = sum(p.same_answer for p in pairs)
    tp = sum(hits)
    precision = tp / len(hits) if hits else 1.0
    return precision, tp / positives, len(hits) - tp


def run_p9(env: BenchEnv, quick: bool) -> ScenarioResult:
    # The test part of the systematic set only: the rules and the threshold were tuned on its
    # other part (bench/semantic_pairs.py), never on this one.
    pairs = [Pair(p.task, p.cached, p.asked, p.same_answer) for p in split(build_pairs(), "test")]
    sims = similarities(pairs, MiniLMEmbedder(threads=2))
    default = ProcessorSettings().semantic.threshold
    table = {t: precision_recall(pairs, sims, t) for t in sorted({*THRESHOLDS, default})}
    precision, recall, _ = table[default]
    measured: dict[str, float] = {"pairs": len(pairs), "paraphrases": sum(p.same_answer for p in pairs)}
    for t, (p, r, _) in table.items():
        measured[f"P@{t:.2f}"] = p
        measured[f"R@{t:.2f}"] = r
    lowest_ok = min((t for t, (p, _, _) in table.items() if p >= 0.98), default=float("nan"))
    by_task: dict[str, list[int]] = {}
    for pair, s in zip(pairs, sims, strict=True):
        hit = s is not None and s >= default
        counts = by_task.setdefault(pair.task, [0, 0, 0])
        counts[0] += pair.same_answer
        counts[1] += hit and pair.same_answer
        counts[2] += hit and not pair.same_answer
    notes = (
        f"test part of the systematic set ({len(pairs)} pairs); "
        f"default threshold {default:.2f}: precision {precision:.3f}, recall {recall:.3f}; lowest threshold with "
        f"precision >= 0.98: {lowest_ok:.2f}. Per task (paraphrases, hits, false hits): "
        + ", ".join(f"{k} {v[0]}/{v[1]}/{v[2]}" for k, v in sorted(by_task.items()))
    )
    return ScenarioResult(
        "P9",
        "semantic cache precision/recall",
        measured,
        precision,
        "precision >= 0.99 and recall >= 0.5 at the default threshold, test part",
        precision >= 0.99 and recall >= 0.5,
        notes=notes,
        extra={"similarities": sims},
    )
