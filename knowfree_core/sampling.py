"""Low-resource training subsets: seeded many-shot prefixes and greedy n-way k-shot.

Every function takes an explicit seed and uses its own ``random.Random(seed)``, so a subset
is reproducible from (data, seed) alone and nothing touches the global random state.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from knowfree_core.errors import ConfigError
from knowfree_core.records import Sentence

logger = logging.getLogger(__name__)


def many_shot_subsets(
    sentences: Sequence[Sentence], sizes: Iterable[int] = (250, 500, 1000), *, seed: int
) -> dict[int, list[Sentence]]:
    """Random subsets of the given sizes, each larger one containing every smaller one.

    One seeded permutation of the pool; each subset is its prefix, so results for 250 and
    500 sentences differ only by the extra data (not by a different random draw).
    """
    sizes = sorted(set(int(size) for size in sizes))
    if not sizes:
        raise ValueError("no subset sizes given")
    if sizes[0] <= 0:
        raise ValueError(f"subset sizes must be positive, got {sizes[0]}")
    if sizes[-1] > len(sentences):
        # ConfigError (a ValueError): a size the user asked for, reported on one line.
        raise ConfigError(
            f"subset size {sizes[-1]} exceeds the {len(sentences)} sentences available; "
            f"use sizes <= {len(sentences)}"
        )
    order = list(range(len(sentences)))
    random.Random(seed).shuffle(order)
    return {size: [sentences[i] for i in order[:size]] for size in sizes}


@dataclass
class KShotSelection:
    sentences: list[Sentence]
    k: int
    seed: int
    label_counts: dict[str, int] = field(default_factory=dict)  # mentions per label in the selection
    unreachable: dict[str, int] = field(default_factory=dict)  # label -> mentions in the whole pool (< k)


def select_k_shot(
    sentences: Sequence[Sentence], k: int, *, seed: int, labels: Iterable[str] | None = None
) -> KShotSelection:
    """Greedy n-way k-shot selection (the standard greedy sampler, no upper cap).

    Shuffle the pool with the seed, walk through it once, and keep a sentence when it
    mentions at least one label that still has fewer than k mentions; stop when every label
    has >= k. Labels are the target span labels (or only ``labels`` when given); mentions of
    other labels neither qualify a sentence nor count. Sentences without a span never qualify.

    Chosen variant: no cap on overshoot. Capping (skip sentences that would push a label past
    2k) is common, but with very rare labels (Weibo dev has one GPE.NOM mention) a cap can
    make k unreachable for no reason; frequent labels may therefore exceed k.

    Nested across k for one seed (the paper: each larger subset includes the smaller ones):
    every k walks the same seeded order, and while a label is still open for the smaller k
    both walks have kept exactly the same sentences mentioning it, so it is open for the
    larger k too; a sentence the smaller k keeps is therefore kept by the larger one. A cap
    would break this (tests/test_sampling.py checks it on Weibo train and a skewed pool).
    """
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    wanted = set(labels) if labels is not None else {s.label for x in sentences for s in x.spans}
    available = Counter(s.label for x in sentences for s in x.spans if s.label in wanted)
    unreachable = {label: available.get(label, 0) for label in sorted(wanted) if available.get(label, 0) < k}

    order = list(range(len(sentences)))
    random.Random(seed).shuffle(order)
    counts: Counter[str] = Counter()
    chosen: list[Sentence] = []
    # Labels that can still improve; unreachable ones keep collecting until exhausted,
    # which is the most the pool can give.
    open_labels = {label for label in wanted if available[label] > 0}
    for i in order:
        if not open_labels:
            break
        mentions = Counter(s.label for s in sentences[i].spans if s.label in wanted)
        if any(label in open_labels for label in mentions):
            chosen.append(sentences[i])
            counts.update(mentions)
            open_labels = {label for label in open_labels if counts[label] < min(k, available[label])}
    if unreachable:
        logger.warning(
            "k-shot (k=%d): %d label(s) have fewer than k mentions in the pool: %s",
            k, len(unreachable), ", ".join(f"{label} ({n})" for label, n in unreachable.items()),
        )
    return KShotSelection(chosen, k, seed, dict(sorted(counts.items())), unreachable)


def greedy_k_shot(
    sentences: Sequence[Sentence], k: int, seed: int, labels: Iterable[str] | None = None
) -> list[Sentence]:
    """The sentences of ``select_k_shot`` (labels that cannot reach k are logged)."""
    return select_k_shot(sentences, k, seed=seed, labels=labels).sentences


def label_counts(sentences: Iterable[Sentence]) -> dict[str, int]:
    """Target mentions per label, sorted by label."""
    return dict(sorted(Counter(s.label for x in sentences for s in x.spans).items()))


def write_subsets(
    subsets: Mapping[int | str, Sequence[Sentence]],
    out_dir: str | Path,
    *,
    seed: int,
    prefix: str = "subset",
    format: str = "jsonl",
    extra: Mapping[str, object] | None = None,
) -> Path:
    """Write each subset to ``out_dir/<prefix>-<name>.<format>`` plus ``manifest.json``.

    The manifest records the seed, the sizes, label counts and sentence ids of every subset
    (and anything in ``extra``, e.g. the source file and k), so a subset can be inspected
    and rebuilt. Returns the manifest's path.
    """
    from knowfree_core.formats import write_dataset  # formats does not import sampling; keep it lazy anyway

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, object] = {"seed": seed, "format": format, **(dict(extra) if extra else {})}
    entries: dict[str, object] = {}
    for name, subset in subsets.items():
        file_name = f"{prefix}-{name}.{format}"
        write_dataset(subset, out / file_name, format=format)
        entries[str(name)] = {
            "file": file_name,
            "size": len(subset),
            "label_counts": label_counts(subset),
            "sentence_ids": [s.id for s in subset],
        }
    manifest["sizes"] = {name: entry["size"] for name, entry in entries.items()}  # type: ignore[index]
    manifest["subsets"] = entries
    path = out / "manifest.json"
    path.write_text(json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return path


def hold_out(sentences: Sequence[Sentence], size: int, *, seed: int) -> tuple[list[Sentence], list[Sentence]]:
    """``(rest, held_out)``: ``size`` sentences drawn with ``seed`` as a dev set, the rest as the pool.

    For corpora that ship no dev split (UD GSDSimp here, MSRA): without a dev set a run keeps
    its last epoch and the default threshold blind. The draw depends on its own seed only, so
    every training subset and seed of a grid sees the same dev set and samples from the same
    rest; both keep the pool's order.
    """
    if size <= 0:
        raise ValueError(f"the held-out dev set needs a positive size, got {size}")
    if size >= len(sentences):
        raise ValueError(f"cannot hold out {size} of {len(sentences)} sentences as dev: nothing would be left to train on")
    order = list(range(len(sentences)))
    random.Random(seed).shuffle(order)
    chosen = set(order[:size])
    return ([s for i, s in enumerate(sentences) if i not in chosen],
            [s for i, s in enumerate(sentences) if i in chosen])
