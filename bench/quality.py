"""The paper-table harness: test F1 of a grid (dataset × subset size or k × variant × seed) run
through ``jobs.pipeline``, tabulated like the paper's Table 1 / Table 2 with the published
figure beside each cell.

    python bench/quality.py --config bench/quality.yaml                        # run what is missing
    python bench/quality.py --config bench/quality.yaml --only dataset=weibo,setting=n250
    python bench/quality.py --config bench/quality.yaml --dry-run              # list what would run
    python bench/quality.py --config bench/quality.yaml --table-only           # table from the results

Run it from the repository root (the configs' relative paths are relative to it). Each cell
(dataset, setting, seed) is one ``jobs.pipeline.Cell`` in ``<runs_dir>/<dataset>/<n250-seed1>/``;
every finished (dataset, setting, variant, seed) becomes one JSON line in the results file
(``bench/quality_results.jsonl``, meant to be committed). A rerun skips what the results file
holds, and inside an interrupted cell the pipeline's own stage skipping continues where it stopped.

``--only`` takes ``key=value`` pairs (keys: dataset, setting, variant, seed), comma-separated;
pairs with the same key are alternatives: ``--only dataset=weibo,dataset=msra,seed=1``.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import statistics
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import yaml

from knowfree_core.commandline import run_main
from knowfree_jobs.common import RayConfig, init_ray
from knowfree_jobs.pipeline import (
    Cell,
    CellSettings,
    GridConfig,
    PipelineConfig,
    VariantSpec,
    check_variants,
    grid_cells,
    schema_fields,
)
from knowfree_core.config import load_config, load_structured
from knowfree_core.errors import ConfigError
from knowfree_core.safe_paths import child_path
from quality_paired import default_pairs, paired_caption, paired_comparisons, paired_table
from quality_records import (
    append_result,
    machine_description,
    make_record,
    read_results,
    result_key,
)

ROOT = Path(__file__).resolve().parents[1]

logger = logging.getLogger("bench.quality")

# -- configuration ---------------------------------------------------------------------------


@dataclass
class DatasetEntry(CellSettings, GridConfig):
    """One registered dataset: jobs.pipeline's settings of its cells (CellSettings; paths from
    the repo root, and ``custom_variants`` are this dataset's own, beside the config's shared
    ones) and its grid: one, in the fields of jobs.pipeline's ``grid`` section (GridConfig) ..."""

    #: ... or several, when seeds or variants differ between sizes (then leave those empty).
    grids: List[GridConfig] = field(default_factory=list)
    #: The paper's column name (Weibo, UD, MSR, ...); None: no paper figure to compare with.
    paper_name: Optional[str] = None


@dataclass
class QualityConfig:
    datasets: Dict[str, DatasetEntry] = field(default_factory=dict)
    #: Named variants every dataset may list (jobs.pipeline's VariantSpec: F's training file, or
    #: the plain subset, with training overrides), e.g. knowledge settings compared against F.
    custom_variants: Dict[str, VariantSpec] = field(default_factory=dict)
    results: str = "bench/quality_results.jsonl"
    runs_dir: str = "runs/quality"
    paper_results: str = "bench/paper_results.yaml"
    ray: RayConfig = field(default_factory=RayConfig)


def dataset_variants(config: QualityConfig, entry: DatasetEntry) -> Dict[str, VariantSpec]:
    """The custom variants a dataset's cells know: the shared ones, then its own (which win)."""
    return {**config.custom_variants, **entry.custom_variants}


def dataset_grids(name: str, entry: DatasetEntry, custom: Dict[str, VariantSpec] | None = None) -> list[GridConfig]:
    flat = GridConfig(**schema_fields(entry, GridConfig))
    if entry.grids and flat != GridConfig():
        raise ConfigError(f"datasets.{name}: give grids or subset_sizes/k_shot/seeds/variants, not both")
    grids = list(entry.grids) or [flat]
    for grid in grids:
        if not grid.variants:
            raise ConfigError(f"datasets.{name}: a grid without variants")
        try:
            check_variants(list(grid.variants), dict(custom or {}))
        except ConfigError as error:
            raise ConfigError(f"datasets.{name}: {error}") from None
        if not (grid.k_shot or grid.subset_sizes):
            raise ConfigError(f"datasets.{name}: a grid needs subset_sizes or k_shot")
    return grids


def pipeline_config(entry: DatasetEntry, grid: GridConfig, output_dir: Path, ray: RayConfig,
                    custom: Dict[str, VariantSpec] | None = None) -> PipelineConfig:
    return PipelineConfig(**(schema_fields(entry, CellSettings) | {"custom_variants": dict(custom or {})}),
                          output_dir=str(output_dir), grid=grid, ray=ray)


# -- the grid and what is left of it --------------------------------------------------------

Selection = Dict[str, set]
SELECTION_KEYS = ("dataset", "setting", "variant", "seed")


def parse_selection(text: Optional[str]) -> Selection:
    """``dataset=weibo,setting=n250`` → {"dataset": {"weibo"}, "setting": {"n250"}}."""
    selection: Selection = {}
    for pair in filter(None, (text or "").split(",")):
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or key not in SELECTION_KEYS:
            raise ConfigError(f"--only: expected KEY=VALUE with KEY one of {', '.join(SELECTION_KEYS)}, got {pair!r}")
        selection.setdefault(key, set()).add(value.strip())
    return selection


def selected(selection: Selection, **fields: Any) -> bool:
    """Whether the fields given pass the selection (keys not given are not judged)."""
    return all(str(fields[key]) in values for key, values in selection.items() if key in fields)


@dataclass
class PlannedCell:
    """One pipeline cell of the grid and the variants it still has to run."""

    dataset: str
    name: str  # the cell's folder, as jobs.pipeline names it: n250-seed1, k5-seed2
    setting: str  # n250, k5
    seed: int
    variants: List[str]
    overrides: List[str]  # the train-config overrides of this cell (subset and seeds)
    pipeline: PipelineConfig

    @property
    def root(self) -> Path:
        return Path(self.pipeline.output_dir) / self.name


def split_cell_name(name: str) -> tuple[str, int]:
    setting, _, seed = name.rpartition("-seed")
    return setting, int(seed)


def plan_cells(config: QualityConfig, selection: Selection) -> list[PlannedCell]:
    """Every selected cell of every registered dataset, with all its selected variants."""
    cells = []
    for dataset, entry in config.datasets.items():
        if not selected(selection, dataset=dataset):
            continue
        custom = dataset_variants(config, entry)
        for grid in dataset_grids(dataset, entry, custom):
            runs = child_path(config.runs_dir, dataset, f"datasets.{dataset}")  # a dataset name is a folder
            pipeline = pipeline_config(entry, grid, runs, config.ray, custom)
            for name, overrides in grid_cells(pipeline):
                setting, seed = split_cell_name(name)
                variants = [v for v in grid.variants if selected(selection, variant=v)]
                if variants and selected(selection, setting=setting, seed=seed):
                    cells.append(PlannedCell(dataset, name, setting, seed, variants, overrides, pipeline))
    return cells


def pending_cells(cells: Iterable[PlannedCell], results: Iterable[dict]) -> list[PlannedCell]:
    """The cells that still miss a variant, each narrowed to the variants it misses."""
    done = {result_key(r) for r in results}
    pending = []
    for cell in cells:
        missing = [v for v in cell.variants if (cell.dataset, cell.setting, v, cell.seed) not in done]
        if missing:
            pending.append(replace(cell, variants=missing))
    return pending


# -- the results file -----------------------------------------------------------------------


def result_record(cell: PlannedCell, variant: str, score: dict, machine: str, command: str) -> dict:
    engine = cell.pipeline.synthesis.engine
    return make_record(cell.dataset, cell.setting, variant, cell.seed, score, run_dir=str(cell.root),
                       machine=machine, command=command,
                       synthesis_engine=f"{engine.kind} {engine.model}" if variant in ("FS", "FSU") else None)


# -- the paper's figures and the table ------------------------------------------------------

#: Which rows of bench/paper_results.yaml a variant is compared with: (table, row).
PAPER_ROWS: dict[str, tuple[tuple[str, str], ...]] = {
    "biaffine": (("table1_many_shot", "BiaffineNER"), ("table3_ablations", "w/o local attn & L.E.A.")),
    "F": (("table1_many_shot", "KnowFREE-F (ChatGLM3-6B)"),),
    "FS": (("table1_many_shot", "KnowFREE-FS (ChatGLM3-6B)"), ("table2_few_shot", "Ours")),
    "noext": (("table3_ablations", "w/o L.E.A."),),
    "F-noent": (("table3_ablations", "w/o entity"),),
    "F-nopos": (("table3_ablations", "w/o pos"),),
    "F-nomerge": (("table3_ablations", "w/o S.L."),),
    "F-cnn": (("table3_ablations", "w/o local attn w cnn"),),
}
TABLE_TAGS = {"table1_many_shot": "T1", "table2_few_shot": "T2", "table3_ablations": "T3"}
#: Table rows: baselines, then ablations, then the full methods, as in the paper's tables.
ROW_ORDER = ("biaffine", "noext", "F-noent", "F-nopos", "F-nomerge", "F-cnn", "F", "FS", "FU", "FSU")


def parse_setting(setting: str) -> tuple[str, int]:
    """``n250`` → ("n", 250) (many-shot subset size), ``k5`` → ("k", 5) (k-shot)."""
    return setting[0], int(setting[1:])


def _paper_value(table: str, cells: Any, kind: str, number: int) -> Optional[str]:
    """One figure of one table for one dataset (``cells``): each table covers its own settings."""
    if cells is None:
        return None
    if table == "table1_many_shot" and kind == "n":
        value = cells.get(number)
        return None if value is None else f"{value:.2f}"
    if table == "table2_few_shot" and kind == "k":
        value = cells.get(number)
        return None if value is None else f"{value['mean']:.2f} ± {value['std']:.2f}"
    if table == "table3_ablations" and kind == "n" and number == 1000:  # Table 3 is at 1000 only
        return f"{cells:.2f}"
    return None


def paper_figures(paper: dict, paper_name: Optional[str], setting: str, variant: str) -> list[tuple[str, str]]:
    """The published figures for one cell: (table tag, figure) per table that has one."""
    if not paper_name:
        return []
    kind, number = parse_setting(setting)
    figures = []
    for table, row in PAPER_ROWS.get(variant, ()):
        cells = (paper.get(table) or {}).get("rows", {}).get(row, {}).get(paper_name)
        value = _paper_value(table, cells, kind, number)
        if value is not None:
            figures.append((TABLE_TAGS[table], value))
    return figures


def format_cell(f1_values: list[float], figures: list[tuple[str, str]]) -> str:
    """``46.3 ± 0.9 (3) · paper 66.76``: test F1 in percent over the seeds, then the paper's."""
    if not f1_values:
        text = "–"
    elif len(f1_values) == 1:
        text = f"{100 * f1_values[0]:.1f} (1)"
    else:
        text = f"{100 * statistics.fmean(f1_values):.1f} ± {100 * statistics.stdev(f1_values):.1f} ({len(f1_values)})"
    if len(figures) == 1:
        text += f" · paper {figures[0][1]}"
    elif figures:  # e.g. biaffine at 1000 is both BiaffineNER (T1) and an ablation (T3)
        text += " · paper " + ", ".join(f"{value} ({tag})" for tag, value in figures)
    return text


def latest_results(results: Iterable[dict]) -> dict[tuple, dict]:
    """One record per (dataset, setting, variant, seed): the last one written wins."""
    return {result_key(r): r for r in results}


def quality_table(results: Iterable[dict], paper: dict, paper_names: Dict[str, Optional[str]]) -> str:
    """Markdown: one row per variant, one column per dataset × setting (datasets in the order
    of ``paper_names``, i.e. the config, then any others in the results); each cell test F1
    mean ± std (n seeds) with the paper's figure for the same cell."""
    latest = latest_results(results)
    order = {name: index for index, name in enumerate(paper_names)}
    columns = sorted({(d, s) for d, s, _, _ in latest},
                     key=lambda c: (order.get(c[0], len(order)), c[0], parse_setting(c[1])))  # k before n
    present = {v for _, _, v, _ in latest}
    rows = [v for v in ROW_ORDER if v in present] + sorted(present - set(ROW_ORDER))
    from knowfree_core.report.document import markdown_table

    titles = [f"{paper_names.get(d) or d} {s}" for d, s in columns]
    table = []
    for variant in rows:
        cells = []
        for dataset, setting in columns:
            values = [r["test_f1"] for (d, s, v, _), r in sorted(latest.items())
                      if (d, s, v) == (dataset, setting, variant) and r.get("test_f1") is not None]
            figures = paper_figures(paper, paper_names.get(dataset), setting, variant) if values else []
            cells.append(format_cell(values, figures))
        table.append([variant, *cells])
    return markdown_table(["variant", *titles], table, align="l" + "r" * len(columns))


CAPTION = ("Test F1 (%), mean ± std over seeds (n seeds); \"paper\": the published figure for the same "
           "cell (T1/T2/T3: Tables 1, 2, 3 of Lai et al.; bench/paper_results.yaml).")


# -- running --------------------------------------------------------------------------------


def run_cells(cells: list[PlannedCell], results_path: str | Path, command: str, ray: RayConfig) -> int:
    """Run each pending cell's variants and append each variant's record as it finishes."""
    if not cells:
        return 0
    init_ray(ray, min_cpus=max(c.pipeline.cpu_slots() for c in cells))
    machine = machine_description()
    for cell in cells:
        # Splits read with reader options (CoNLL-U task=pos) work as they are: the pipeline's
        # Cell gives dev and test JSONL copies next to its own JSONL training file.
        overrides = list(cell.pipeline.train_overrides) + list(cell.overrides)
        train_config = load_config(cell.pipeline.train_config, overrides)
        logger.info("cell %s/%s: %s", cell.dataset, cell.name, ", ".join(cell.variants))
        scores = Cell(cell.pipeline, train_config, cell.root).run(list(cell.variants))
        for variant in cell.variants:  # F comes with FS: only the variants asked for are recorded
            append_result(results_path, result_record(cell, variant, scores[variant], machine, command))
    return len(cells)


def check_train_configs(cells: list[PlannedCell]) -> None:
    """Load every cell's train config (cheap, no data read): a bad override fails now, not hours in."""
    for cell in cells:
        load_config(cell.pipeline.train_config, list(cell.pipeline.train_overrides) + list(cell.overrides))


def describe_cells(cells: list[PlannedCell]) -> str:
    return "\n".join(f"{c.dataset} {c.name}: {', '.join(c.variants)}  ({c.root})" for c in cells)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the paper-table harness: run the grid, print Table 1/2")
    parser.add_argument("--config", default="bench/quality.yaml", help="harness config (datasets and grids)")
    parser.add_argument("--only", help="e.g. dataset=weibo,setting=n250 (keys: dataset, setting, variant, seed)")
    parser.add_argument("--results", help="results file (default: the config's results)")
    parser.add_argument("--dry-run", action="store_true", help="list the cells that would run; run nothing")
    parser.add_argument("--table-only", action="store_true", help="print the tables from the results file")
    parser.add_argument("--compare", action="append", default=[], metavar="VARIANT:BASELINE",
                        help="paired table of VARIANT − BASELINE per cell (repeatable; default: every "
                             "variant against noext and biaffine)")
    parser.add_argument("--paired-metric", default="test_f1", choices=("test_f1", "dev_f1"),
                        help="the metric of the paired tables")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)

    config: QualityConfig = load_structured(QualityConfig, args.config)
    selection = parse_selection(args.only)
    results_path = args.results or config.results
    cells = plan_cells(config, selection)  # also checks every dataset's grid
    if not args.table_only:
        pending = pending_cells(cells, read_results(results_path))
        if args.dry_run:
            check_train_configs(pending)
            print(describe_cells(pending) or "nothing to run")
            print(f"{len(pending)} of {len(cells)} cells to run; results in {results_path}")
            return 0
        run_cells(pending, results_path, shlex.join(["python", "bench/quality.py", *argv]), config.ray)

    results = [r for r in read_results(results_path)
               if selected(selection, dataset=r["dataset"], setting=r["setting"], variant=r["variant"], seed=r["seed"])]
    paper = yaml.safe_load(Path(config.paper_results).read_text(encoding="utf-8")) or {}
    if not results:
        print(f"no results in {results_path} yet")
        return 0
    paper_names = {name: entry.paper_name for name, entry in config.datasets.items()}
    print(CAPTION)
    print()
    print(quality_table(results, paper, paper_names))
    print_paired_tables(results, [parse_pair(text) for text in args.compare], args.paired_metric, paper_names)
    return 0


def parse_pair(text: str) -> tuple[str, str]:
    variant, sep, baseline = text.partition(":")
    if not sep or not variant or not baseline:
        raise ConfigError(f"--compare: expected VARIANT:BASELINE, got {text!r}")
    return variant, baseline


def print_paired_tables(results: list[dict], pairs: list[tuple[str, str]], metric: str,
                        paper_names: Dict[str, Optional[str]]) -> None:
    """The paired tables (bench/quality_paired.py) of ``pairs``, or of the default pairs."""
    latest = latest_results(results)
    present = [v for v in ROW_ORDER if any(k[2] == v for k in latest)]
    present += sorted({k[2] for k in latest} - set(present))
    titles = {name: paper or name for name, paper in paper_names.items()}
    tables = []
    for variant, baseline in pairs or default_pairs(present):
        comparisons = paired_comparisons(latest, variant, baseline, metric)
        if comparisons:
            tables.append(paired_table(comparisons, titles, order=list(paper_names)))
    if tables:
        print()
        print(paired_caption(metric))
        for table in tables:
            print()
            print(table)


if __name__ == "__main__":
    raise SystemExit(run_main(main))
