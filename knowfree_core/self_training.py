"""Self-training (variant FU): which of a trained model's predictions on unlabelled in-domain
text become training samples.

A frozen model labels a pool of raw sentences (``jobs.predict``); its labels are right often
enough to teach a model trained on a few hundred gold sentences more contexts, but wrong
labels teach it errors. The rule keeps a sentence only when the model is sure of *all* of it:

- **confident**: it has at least one predicted span and every predicted span scores at least
  ``min_score`` (τ). One doubtful span and the whole sentence goes: a dropped sentence costs
  nothing, a sentence with a missed entity teaches "not an entity" for it;
- **empty**: the model predicts no span at all. Without some of these the retrained model sees
  an entity in every pseudo sentence and over-predicts; they are kept at ``empty_ratio`` per
  confident sentence, drawn with ``seed``;
- every other sentence (some span under τ) is dropped.

With ``doubt_score`` set (partial annotation) no sentence is dropped for a doubtful span: the
pool is labelled down to that score, spans at or above τ are the labels, spans between
``doubt_score`` and τ become the sample's ``uncertain_spans`` (the loss leaves their cells out
of the target columns), and everything under ``doubt_score`` is taught as "no entity". A
sentence with no span at or above τ counts as empty (its doubtful spans left out the same
way). Why it exists: the plain rule's pseudo labels on Weibo were precise (P 0.75-0.81) but
incomplete (R 0.53-0.64), so the retrained model learned to miss entities. It did not help
there (FU-partial - FU = -1.7, 3 of 3 seeds, bench/RESULTS.md): the model scores most entities
it misses under 0.1, so the doubt band catches few of them. Off by default.

The rule reads prediction rows (``{"id", "text", "spans": [{"start", "end", "label",
"score"}], ...}``, what ``jobs.predict`` and ``knowfree predict`` write) and returns
:class:`~knowfree_core.records.Sentence` samples flagged ``pseudo_labeled`` (their loss is
weighted by ``model.beta_unlabeled``).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Optional

from .bounds import COUNT, NON_NEGATIVE, PROBABILITY, check_bounds
from .errors import ConfigError
from .records import Sentence


@dataclass
class PseudoLabelRule:
    """Which predicted sentences become pseudo-labelled training samples."""

    #: τ: every predicted span of a kept sentence scores at least this.
    min_score: float = 0.9
    #: Sentences with no predicted span kept per confident sentence (0: none; 0.5: one empty
    #: sentence for every two with spans), so that "no entity here" is learned too.
    empty_ratio: float = 0.5
    #: At most this many pseudo samples in all (confident first, then empty ones in
    #: proportion), drawn with ``seed``; None: every sentence the rule keeps.
    max_sentences: Optional[int] = None
    seed: int = 42
    #: Partial annotation: the pool is labelled down to this score, and spans between it and
    #: τ are left out of the loss instead of dropping their sentence (see the module
    #: docstring). None: the plain rule.
    doubt_score: Optional[float] = None

    def __post_init__(self) -> None:
        check_bounds("unlabeled.rule", self, {
            "min_score": PROBABILITY, "empty_ratio": NON_NEGATIVE, "max_sentences": COUNT,
            "doubt_score": PROBABILITY,
        })
        if self.doubt_score is not None and self.doubt_score >= self.min_score:
            raise ConfigError(f"unlabeled.rule.doubt_score ({self.doubt_score}) must be below min_score "
                              f"({self.min_score}): spans between the two are the doubtful ones")


@dataclass
class PseudoLabelSelection:
    """The kept samples and what became of the rest, for the cell's record."""

    samples: list[Sentence]
    counts: dict[str, int] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kept": len(self.samples), **self.counts, "spans_by_label": self.labels}


def select_pseudo_labeled(rows: Iterable[dict[str, Any]], rule: PseudoLabelRule,
                          exclude_texts: Iterable[str] = ()) -> PseudoLabelSelection:
    """Apply ``rule`` to prediction rows. ``exclude_texts``: sentences never to keep (the gold
    training sentences, when the pool is the rest of the same corpus). The result's order is
    the rows' order, so the same rows and seed give the same file."""
    excluded = set(exclude_texts)
    confident: list[int] = []
    empty: list[int] = []
    counts = Counter()
    parsed: list[Sentence] = []
    for row in rows:
        scores = [float(span.get("score", 0.0)) for span in row.get("spans", [])]
        sentence = _sentence(row, scores, rule)
        index = len(parsed)
        parsed.append(sentence)
        counts["predicted"] += 1
        if sentence.text in excluded:
            counts["excluded_gold"] += 1
        elif rule.doubt_score is not None:
            (confident if sentence.spans else empty).append(index)
        elif not scores:
            empty.append(index)
        elif min(scores) >= rule.min_score:
            confident.append(index)
        else:
            counts["dropped_uncertain"] += 1
    rng = random.Random(rule.seed)
    if rule.max_sentences is not None and len(confident) > rule.max_sentences:
        # Room for the empty sentences in proportion: confident / (1 + ratio) of the cap.
        keep = max(1, int(rule.max_sentences / (1 + rule.empty_ratio)))
        confident = sorted(rng.sample(confident, min(keep, len(confident))))
    wanted_empty = int(round(rule.empty_ratio * len(confident)))
    if rule.max_sentences is not None:
        wanted_empty = min(wanted_empty, max(0, rule.max_sentences - len(confident)))
    chosen_empty = sorted(rng.sample(empty, min(wanted_empty, len(empty))))
    counts.update(confident=len(confident), empty_kept=len(chosen_empty),
                  empty_dropped=len(empty) - len(chosen_empty))
    kept = sorted(confident + chosen_empty)
    samples = [parsed[i] for i in kept]
    if rule.doubt_score is not None:
        counts["uncertain_spans"] = sum(len(sample.uncertain_spans) for sample in samples)
    labels = Counter(span.label for sample in samples for span in sample.spans)
    return PseudoLabelSelection(samples, dict(counts), dict(sorted(labels.items())))


def _sentence(row: dict[str, Any], scores: list[float], rule: PseudoLabelRule) -> Sentence:
    """A prediction row as a pseudo-labelled sample: its spans the predicted ones (with
    ``doubt_score``, those at or above τ, the doubtful ones its ``uncertain_spans``; spans
    under ``doubt_score`` are dropped). ``scores``: the row's span scores, in order. Its id
    gets ``#pseudo`` (as synthetic ones get ``#syn``): a pool's ids may repeat the gold file's."""
    sentence = Sentence.from_dict(row)
    sentence = replace(sentence, id=f"{sentence.id}#pseudo", extension_spans=[], pseudo_labeled=True)
    if rule.doubt_score is not None:
        sentence = replace(
            sentence,
            spans=[span for span, score in zip(sentence.spans, scores) if score >= rule.min_score],
            uncertain_spans=[span for span, score in zip(sentence.spans, scores)
                             if rule.doubt_score <= score < rule.min_score],
        )
    sentence.validate()
    return sentence
