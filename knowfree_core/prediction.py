"""Batched span prediction with scores: what ``knowfree predict`` and ``jobs.predict`` run.

:func:`predict_sentences` gives one :class:`Prediction` per sentence, in input order: its
spans (label, start, end, text, and score: the model's probability of that label for that
span, the sigmoid of its grid cell) and the number of windows the sentence took.

Speed: the windows of every sentence of a call are sorted by length into batches of
``batch_size`` (``KnowFreeModel.iter_target_logits``), so a batch pads little, and each
batch's grids are reduced to span candidates at once: a call holds one batch of grids.

Long sentences: the span grid grows with the square of the length. A sentence longer than
``max_units`` (default: the encoder's window, its max length less the special tokens) is
cut into overlapping windows of ``max_units`` units, ``stride`` apart (default half a
window; the last window ends at the sentence end): the encoder's own plan,
``units.plan_windows``. Nothing is truncated. The windows' candidates are merged:

* a candidate touching a window edge that cuts the sentence may itself be cut; it is dropped
  when another window holds the same units away from its edges (that window sees the whole
  span, and its own candidate is the one that counts);
* the same span (start, end) from several windows is one candidate: the one with the higher
  score, and its label (as a grid cell keeps its best label);
* the candidates are then selected as the model decodes one grid (flat: no overlaps;
  nested: no crossing), most confident first.

A sentence that fits in one window is decoded exactly as ``KnowFreeModel.decode`` does it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

from .bounds import COUNT, PROBABILITY, check_bounds
from .decoding import SpanCandidate, select_flat, select_nested, span_candidates
from .encoders.units import plan_windows
from .errors import ConfigError, DataFormatError
from .records import Sentence

if TYPE_CHECKING:
    from .model.knowfree import KnowFreeModel


@dataclass
class PredictSettings:
    """The settings that decide which spans a prediction holds (``jobs.predict`` refuses to
    resume an output folder written with others)."""

    #: Span probability threshold; None: the saved model's own (chosen on its dev set).
    threshold: Optional[float] = None
    #: Leave out spans scored below this; None: every span above the threshold.
    min_score: Optional[float] = None
    #: Window size in units: longer sentences go through overlapping windows of this size.
    #: None: the encoder's window (its max length less the special tokens).
    max_units: Optional[int] = None
    #: Units from one window's start to the next; None: half a window.
    stride: Optional[int] = None

    def __post_init__(self) -> None:
        check_bounds("", self, {"threshold": PROBABILITY, "min_score": PROBABILITY, "max_units": COUNT,
                                "stride": COUNT})


@dataclass(frozen=True)
class PredictedSpan:
    start: int
    end: int  # exclusive
    label: str
    text: str
    score: float  # the model's probability of ``label`` for this span

    def to_dict(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "label": self.label, "text": self.text, "score": self.score}


@dataclass
class Prediction:
    spans: list[PredictedSpan]
    #: Windows the sentence took: 1 when it fits in ``max_units``, 0 for an empty sentence.
    windows: int


def window_limit(model: "KnowFreeModel") -> int:
    """The longest sentence, in units, labelled in one window by default: the encoder's
    window in pieces (one piece per unit in ``char`` mode; a word of several pieces is
    windowed again inside the encoder, never cut)."""
    return int(model.encoder.unit_tokenizer.window)


def sentence_windows(length: int, max_units: int, stride: Optional[int] = None) -> list[tuple[int, int]]:
    """Unit ranges ``[start, end)`` of the windows over a sentence of ``length`` units."""
    if length == 0:
        return []
    return plan_windows([1] * length, max_units, stride or max(1, max_units // 2))


def _at_cut_edge(candidate: SpanCandidate, window: tuple[int, int], length: int) -> bool:
    start, end = window
    return (start > 0 and candidate.start == start) or (end < length and candidate.end == end)


def _seen_whole_elsewhere(candidate: SpanCandidate, windows: Sequence[tuple[int, int]], length: int) -> bool:
    return any(start <= candidate.start and candidate.end <= end and not _at_cut_edge(candidate, (start, end), length)
               for start, end in windows)


def merge_window_candidates(
    windows: Sequence[tuple[int, int]],
    candidates: Sequence[Sequence[SpanCandidate]],
    length: int,
    nested: bool = False,
) -> list[SpanCandidate]:
    """The spans of a sentence of ``length`` units from its windows' candidates (sentence
    offsets, one list per window); see the module docstring. Sorted by (start, end)."""
    best: dict[tuple[int, int], SpanCandidate] = {}
    for window, found in zip(windows, candidates):
        for candidate in found:
            if _at_cut_edge(candidate, window, length) and _seen_whole_elsewhere(candidate, windows, length):
                continue
            key = (candidate.start, candidate.end)
            if key not in best or candidate.score > best[key].score:
                best[key] = candidate
    ranked = sorted(best.values(), key=lambda c: (-c.score, c.start, c.end))
    return select_nested(ranked) if nested else select_flat(ranked, length)


def predict_sentences(
    model: "KnowFreeModel",
    sentences: Sequence[Sentence],
    settings: Optional[PredictSettings] = None,
    batch_size: int = 32,
    progress: bool = False,
) -> list[Prediction]:
    """One :class:`Prediction` per sentence, in input order (see the module docstring)."""
    settings = settings or PredictSettings()
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    limit = settings.max_units or window_limit(model)
    if settings.stride is not None and settings.stride > limit:
        raise ConfigError(f"stride {settings.stride} is longer than a window ({limit} units): units would be skipped")
    threshold = model.config.threshold if settings.threshold is None else settings.threshold
    labels = model.vocab.targets
    plans = [sentence_windows(len(s), limit, settings.stride) for s in sentences]
    pieces: list[list[str]] = []
    owners: list[tuple[int, int]] = []  # (sentence, window) of each piece
    for index, (sentence, plan) in enumerate(zip(sentences, plans)):
        for window, (start, end) in enumerate(plan):
            pieces.append(sentence.units[start:end])
            owners.append((index, window))
    found: list[list[list[SpanCandidate]]] = [[[] for _ in plan] for plan in plans]
    for piece, logits in model.iter_target_logits(pieces, batch_size, progress):
        index, window = owners[piece]
        offset = plans[index][window][0]
        found[index][window] = [
            replace(c, start=c.start + offset, end=c.end + offset)
            for c in span_candidates(logits, len(labels), threshold, max_span_length=model.config.max_span_length)
        ]
    nested = model.config.decode == "nested"
    predictions = []
    for sentence, plan, candidates in zip(sentences, plans, found):
        chosen = merge_window_candidates(plan, candidates, len(sentence), nested)
        spans = [
            PredictedSpan(c.start, c.end, labels[c.label_id], sentence.joiner.join(sentence.units[c.start : c.end]),
                          c.score)
            for c in chosen
            if settings.min_score is None or c.score >= settings.min_score
        ]
        predictions.append(Prediction(spans, len(plan)))
    return predictions


def prediction_record(sentence: Sentence, prediction: Prediction) -> dict[str, Any]:
    """The output record of ``knowfree predict`` and of ``jobs.predict``'s rows: ``id``,
    ``text``, ``spans`` (start, end, label, text, score) and ``windows``."""
    return {"id": sentence.id, "text": sentence.text, "spans": [span.to_dict() for span in prediction.spans],
            "windows": prediction.windows}


# -- for jobs.predict ---------------------------------------------------------------------


def model_fingerprint(model_dir: str | Path) -> str:
    """A short hash of every file of a saved model folder (manifest, labels, head and the
    fine-tuned encoder): the model version that prediction rows carry, and that a resumed
    job compares. The same model copied elsewhere keeps it."""
    root = Path(model_dir)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode("utf-8") + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def parquet_sentences(path: str | Path, text_column: str = "text", id_column: Optional[str] = "id",
                      joiner: str = "") -> Iterator[Sentence]:
    """Sentences of a Parquet file's ``text_column`` (``joiner`` "" splits characters, " "
    whitespace tokens). Ids: ``id_column`` when the file has it, else ``<file>:<row>``
    (1-based), as raw text's ``<file>:<line>``."""
    import pyarrow.parquet as pq

    source = pq.ParquetFile(path)
    names = source.schema_arrow.names
    if text_column not in names:
        raise DataFormatError(str(path), None, f"no column {text_column!r} (columns: {', '.join(names)})",
                              "a text column, named by text_column")
    use_ids = id_column is not None and id_column in names
    columns = [text_column] + ([id_column] if use_ids else [])
    row = 0
    for batch in source.iter_batches(columns=columns):
        texts = batch.column(text_column).to_pylist()
        ids = batch.column(id_column).to_pylist() if use_ids else [None] * len(texts)
        for text, given in zip(texts, ids):
            row += 1
            text = (text or "").strip()
            units = list(text) if joiner == "" else text.split()
            yield Sentence(id=str(given) if given is not None else f"{Path(path).name}:{row}", units=units,
                           joiner=joiner)
