"""Paired comparisons of two variants of the quality harness: same subset, same training seed.

Seed noise on these cells (sd 1.5-1.8 test F1 points on Weibo-250) is as large as the effects
being looked for, and part of it is shared by two variants trained on the same subset with the
same seed (the subset, the batch order, the initial weights). The difference per seed removes
that shared part, so the comparison is on the per-seed differences: their mean and standard
deviation, how many seeds each side wins, and two-sided paired tests from scipy (the sign test
and the Wilcoxon signed-rank test; with n seeds neither can go below 2 / 2^n, i.e. 0.0625 at
5 seeds, so the p-values say how far the evidence goes, not a verdict).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence

from knowfree_core.report.document import markdown_table

#: (dataset, setting, variant, seed) -> results record, as bench/quality.py's latest_results gives.
Latest = Mapping[tuple, dict]


@dataclass
class PairedComparison:
    """``variant`` against ``baseline`` on one (dataset, setting), over the seeds both ran."""

    dataset: str
    setting: str
    variant: str
    baseline: str
    metric: str
    seeds: list[int]
    #: variant − baseline per seed, in points (percent F1).
    differences: list[float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.differences)

    @property
    def sd(self) -> Optional[float]:
        return statistics.stdev(self.differences) if len(self.differences) > 1 else None

    @property
    def wins(self) -> int:
        return sum(d > 0 for d in self.differences)

    @property
    def losses(self) -> int:
        return sum(d < 0 for d in self.differences)

    @property
    def ties(self) -> int:
        return sum(d == 0 for d in self.differences)

    @property
    def sign_p(self) -> Optional[float]:
        """Two-sided sign test on the seeds that differ (ties dropped)."""
        from scipy.stats import binomtest

        decided = self.wins + self.losses
        return None if decided == 0 else float(binomtest(self.wins, decided, 0.5).pvalue)

    @property
    def wilcoxon_p(self) -> Optional[float]:
        """Two-sided Wilcoxon signed-rank test (exact for these few seeds); None below 2 seeds
        or when every difference is zero (nothing to rank)."""
        from scipy.stats import wilcoxon

        if len(self.differences) < 2 or not any(self.differences):
            return None
        return float(wilcoxon(self.differences, zero_method="wilcox", alternative="two-sided").pvalue)


def paired_comparisons(latest: Latest, variant: str, baseline: str, metric: str = "test_f1") -> list[PairedComparison]:
    """One comparison per (dataset, setting) where both variants have the metric for a seed."""
    by_cell: dict[tuple[str, str], dict[str, dict[int, float]]] = {}
    for (dataset, setting, name, seed), record in latest.items():
        value = record.get(metric)
        if name in (variant, baseline) and value is not None:
            by_cell.setdefault((dataset, setting), {}).setdefault(name, {})[int(seed)] = float(value)
    comparisons = []
    for (dataset, setting), scores in by_cell.items():
        ours, theirs = scores.get(variant, {}), scores.get(baseline, {})
        seeds = sorted(set(ours) & set(theirs))
        if seeds:
            comparisons.append(PairedComparison(
                dataset, setting, variant, baseline, metric, seeds,
                [round(100 * (ours[s] - theirs[s]), 6) for s in seeds],
            ))
    return comparisons


def default_pairs(variants: Iterable[str]) -> list[tuple[str, str]]:
    """What a reader of the harness asks first: every variant against no extension labels,
    the knowledge variants also against the biaffine baseline, and noext against biaffine; the
    variants that add samples to F's (FS's synthetic ones, FU's pseudo-labelled ones) against F."""
    present = list(dict.fromkeys(variants))
    pairs = []
    if "F" in present:
        pairs += [(v, "F") for v in present if v in ("FS", "FU", "FSU") or v.startswith(("FU-", "FSU-"))]
    for baseline in ("noext", "biaffine"):
        if baseline in present:
            pairs += [(v, baseline) for v in present if v not in ("noext", "biaffine")]
    if "noext" in present and "biaffine" in present:
        pairs.append(("noext", "biaffine"))
    return pairs


def _p(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.3f}"


def _signed(value: float) -> str:
    return f"{value:+.1f}".replace("-", "−")


def paired_table(comparisons: Sequence[PairedComparison], titles: Mapping[str, str] | None = None,
                 order: Sequence[str] = ()) -> str:
    """Markdown, one row per (dataset, setting): the mean ± sd of the per-seed difference in
    points, the differences seed by seed, wins / losses / ties, and the two p-values."""
    if not comparisons:
        return ""
    first = comparisons[0]
    rank = {name: i for i, name in enumerate(order)}
    rows = sorted(comparisons, key=lambda c: (rank.get(c.dataset, len(rank)), c.dataset, c.setting[0],
                                              int(c.setting[1:]) if c.setting[1:].isdigit() else 0))
    header = ["cell", f"{first.variant} − {first.baseline} (points)", "per seed", "wins / losses / ties",
              "sign p", "Wilcoxon p"]
    table = []
    for c in rows:
        spread = "" if c.sd is None else f" ± {c.sd:.1f}"
        per_seed = ", ".join(f"{s}: {_signed(d)}" for s, d in zip(c.seeds, c.differences))
        name = (titles or {}).get(c.dataset) or c.dataset
        seeds = f"{len(c.seeds)} seed" + ("s" if len(c.seeds) > 1 else "")
        table.append([f"{name} {c.setting} ({seeds})", f"{_signed(c.mean)}{spread}", per_seed,
                      f"{c.wins} / {c.losses} / {c.ties}", _p(c.sign_p), _p(c.wilcoxon_p)])
    return markdown_table(header, table, align="lrlrrr")


def paired_caption(metric: str) -> str:
    what = "test F1" if metric == "test_f1" else metric
    return (f"Paired {what} differences (points): same subset and training seed for both variants; "
            "mean ± sd over the seeds both ran, two-sided sign and Wilcoxon signed-rank tests (scipy).")
