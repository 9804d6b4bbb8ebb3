"""Pipeline-1 annotation as plain functions: input preparation, one batch, output records,
the summary. ``jobs/annotate.py`` runs these inside Ray Data; nothing here imports ray, so
every piece is unit-tested without a cluster.

Flow::

    prepare_input(inputs)   any dataset format, or raw text (one sentence per line)
        → JSONL shards of {"id", "order", "record"}   (ids unique and stable across runs,
                                                       which is what resume keys on)
    BatchAnnotator(specs)(rows) → output rows          (one per input row, never dropped;
                                                        several annotators run in turn)
    collect_output(rows_dir, failed_dir) → annotated.jsonl + summary
                                                       (failed_dir: the rows an LLM engine
                                                        failed, withheld from the checkpoint)

An output row keeps the original sentence with its new extension spans, the raw answers,
the prompt versions, the tokens each step used and every rejection with its step and reason.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

from knowfree_core.annotators import apply_annotations, get_annotator
from knowfree_core.annotators.alignment import REASON_TOO_LONG, Rejection
from knowfree_core.annotators.base import STEPS, AnnotationResult, Annotator
from knowfree_core.errors import ConfigError, DataFormatError, KnowFreeError
from knowfree_core.formats import read_dataset
from knowfree_core.llm.engine import REASON_ENGINE_ERROR, EngineConfig
from knowfree_core.llm.ledger import cost_summary, ledger_of_rows, row_tokens, token_lines
from knowfree_core.records import Sentence
from knowfree_core.retry import run_batch_or_one_by_one

REASON_BATCH_FAILED = "annotator failed"

#: Files read as raw text (one sentence per line) when the input is a folder.
RAW_TEXT_SUFFIXES = (".txt",)


@dataclass
class AnnotatorSpec:
    """Which annotator runs and with what: enough to rebuild it inside a Ray actor.

    name
        ``lac``, ``jieba``, ``llm``, ``knowfree`` or ``package.module:Class`` (a user's Annotator).
    steps
        The steps this annotator runs (a subset of its ``supported_steps``).
    options
        Constructor keyword arguments (for ``llm``: ``engine``, ``language``,
        ``prompts_dir``, ``params``, ``cache``, ``source_prefix``; for ``knowfree``: ``model``,
        ``corpus``, ``label_prefix`` ...).
    max_units
        Longer sentences are passed through unannotated with a counted rejection: a prompt
        past the model's context would fail anyway, and a tool may slow down badly.
    """

    name: str = "lac"
    steps: tuple[str, ...] = STEPS
    options: dict[str, Any] = field(default_factory=dict)
    max_units: int = 512

    def build(self) -> Annotator:
        return get_annotator(self.name, **self.options)


# -- input --------------------------------------------------------------------------------


@dataclass
class PreparedInput:
    shards: list[Path]
    sentences: int
    fingerprint: str


def _raw_text_sentences(path: Path, relative: str, joiner: str) -> Iterator[Sentence]:
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataFormatError(str(path), line_number, f"not UTF-8 ({error.reason})", "UTF-8 text") from error
            text = line.strip()
            if not text:
                continue
            units = list(text) if joiner == "" else text.split()
            yield Sentence(id=f"{relative}:{line_number}", units=units, joiner=joiner)


def check_inputs_exist(inputs: Sequence[str | Path], what: str = "input") -> None:
    """A ConfigError naming every input (file or folder) that is not there, ``what`` first."""
    missing = [str(item) for item in inputs if not Path(item).exists()]
    if missing:
        raise ConfigError(f"{what} {', '.join(missing)} does not exist")


def iter_input_sentences(
    inputs: Sequence[str | Path], format: str | None = None, read_options: dict | None = None, joiner: str = ""
) -> Iterator[Sentence]:
    """Sentences of every input, in order. A folder, or ``format="text"``, is raw text: one
    sentence per line, id ``<file>:<line>``. Dataset files keep their readers' ids, prefixed
    by the file stem when several files are given (ids must be unique across the job)."""
    check_inputs_exist(inputs)
    multiple = len(inputs) > 1
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in RAW_TEXT_SUFFIXES)
            if not files:
                raise ConfigError(f"input folder {path} has no {'/'.join(RAW_TEXT_SUFFIXES)} files")
            for file in files:
                yield from _raw_text_sentences(file, str(file.relative_to(path)), joiner)
        elif format == "text":
            yield from _raw_text_sentences(path, path.name, joiner)
        else:
            for sentence in read_dataset(path, format=format, **dict(read_options or {})):
                if multiple:
                    sentence.id = f"{path.stem}/{sentence.id}"
                yield sentence


def prepare_input(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    format: str | None = None,
    read_options: dict | None = None,
    joiner: str = "",
    shard_size: int = 5000,
) -> PreparedInput:
    """Write the inputs as JSONL shards of ``{"id", "order", "record"}`` rows.

    ``order`` is the sentence's position over all inputs (the collected output keeps it, so
    training subsets drawn from the output are the same as from the input). A repeated id
    is an error naming it: resume and de-duplication key on ids.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("shard-*.jsonl"):
        old.unlink()
    digest = hashlib.sha256()
    seen: set[str] = set()
    shards: list[Path] = []
    handle = None
    count = 0
    try:
        for sentence in iter_input_sentences(inputs, format, read_options, joiner):
            if sentence.id in seen:
                raise DataFormatError(str(inputs[0]), None, f"sentence id {sentence.id!r} occurs twice", "unique ids")
            seen.add(sentence.id)
            if count % shard_size == 0:
                if handle:
                    handle.close()
                shards.append(out / f"shard-{len(shards):05d}.jsonl")
                handle = open(shards[-1], "w", encoding="utf-8")
            record = json.dumps(sentence.to_dict(), ensure_ascii=False)
            line = json.dumps({"id": sentence.id, "order": count, "record": record}, ensure_ascii=False)
            digest.update(line.encode("utf-8"))
            handle.write(line + "\n")
            count += 1
    finally:
        if handle:
            handle.close()
    if count == 0:
        raise ConfigError(f"no sentences in {', '.join(map(str, inputs))}")
    return PreparedInput(shards, count, digest.hexdigest()[:16])


# -- one batch ----------------------------------------------------------------------------


def _rejection_dicts(annotator: str, result: AnnotationResult) -> list[dict[str, str]]:
    return [{"annotator": annotator, "step": r.step, "reason": r.reason, "detail": r.detail}
            for r in result.rejections]


class BatchAnnotator:
    """Annotates batches of prepared rows; one instance per worker (a Ray actor).

    ``specs`` is one annotator or several: several run in turn on the same batch, each adding
    the spans of its own sources (``lac:pos``, ``jieba:pos`` ...), as ``jobs.annotate``'s
    ``annotators: [lac, jieba]`` asks. Each is built on first use.

    Input rows: ``{"id", "order", "record"}``. Output rows (one per input row, same id):
    ``id``, ``order``, ``record`` (the sentence as JSON with its extension spans),
    ``annotator`` (the names, joined by ``+``), ``raw_answers``, ``prompt_versions`` and
    ``tokens`` (JSON objects by step, the last of :class:`~knowfree_core.llm.ledger.StepTokens`;
    with several annotators by ``<annotator>/<step>``), ``rejections`` (JSON
    list of {annotator, step, reason, detail}), ``n_spans``, ``n_rejections``, ``seconds``
    (this batch's time, shared by its rows).

    If an annotator raises for the whole batch it is retried sentence by sentence, so a
    sentence that crashes the tool is rejected alone, and the other sentences, and the other
    annotators' spans of that sentence, are kept.
    """

    def __init__(self, specs: AnnotatorSpec | dict | Sequence[AnnotatorSpec | dict]):
        listed = [specs] if isinstance(specs, (AnnotatorSpec, dict)) else list(specs)
        if not listed:
            raise ConfigError("BatchAnnotator needs at least one annotator spec")
        self.specs = [s if isinstance(s, AnnotatorSpec) else AnnotatorSpec(**s) for s in listed]
        for spec in self.specs:
            spec.steps = tuple(spec.steps)
        self._annotators: list[Annotator | None] = [None] * len(self.specs)

    @property
    def spec(self) -> AnnotatorSpec:
        """The first (with one annotator, the only) spec."""
        return self.specs[0]

    @property
    def name(self) -> str:
        return "+".join(spec.name for spec in self.specs)

    def annotator_at(self, index: int) -> Annotator:
        if self._annotators[index] is None:
            self._annotators[index] = self.specs[index].build()
        return self._annotators[index]  # type: ignore[return-value]

    @property
    def annotator(self) -> Annotator:
        return self.annotator_at(0)

    def __call__(self, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        started = time.perf_counter()
        sentences = [Sentence.from_dict(json.loads(row["record"])) for row in rows]
        annotated = sentences
        by_annotator: list[dict[str, AnnotationResult]] = []
        for index in range(len(self.specs)):
            results = self._results(index, sentences)
            by_annotator.append(results)
            # In turn, as knowfree_core.run.annotate_with: each replaces only its own sources.
            annotated = apply_annotations(annotated, results.values())
        seconds = time.perf_counter() - started
        several = len(self.specs) > 1
        out = []
        for row, sentence, final in zip(rows, sentences, annotated):
            raw_answers: dict[str, str] = {}
            prompt_versions: dict[str, str] = {}
            tokens: dict = {}
            rejections: list[dict[str, str]] = []
            n_spans = 0
            for spec, results in zip(self.specs, by_annotator):
                result = results[sentence.id]
                # Two annotators may answer the same step: keyed by annotator when several ran.
                prefix = f"{spec.name}/" if several else ""
                raw_answers.update({prefix + step: answer for step, answer in result.raw_answers.items()})
                prompt_versions.update({prefix + step: v for step, v in result.prompt_versions.items()})
                tokens.update({prefix + step: t for step, t in result.tokens.items()})
                rejections.extend(_rejection_dicts(spec.name, result))
                n_spans += len(result.spans)
            out.append(
                {
                    "id": str(row["id"]),
                    "order": int(row["order"]),
                    "record": json.dumps(final.to_dict(), ensure_ascii=False),
                    "annotator": self.name,
                    "raw_answers": json.dumps(raw_answers, ensure_ascii=False),
                    "prompt_versions": json.dumps(prompt_versions, ensure_ascii=False),
                    "tokens": row_tokens(tokens),
                    "rejections": json.dumps(rejections, ensure_ascii=False),
                    "n_spans": n_spans,
                    "n_rejections": len(rejections),
                    "seconds": seconds / max(len(rows), 1),
                }
            )
        return out

    def _results(self, index: int, sentences: list[Sentence]) -> dict[str, AnnotationResult]:
        """One annotator's result per sentence id; sentences over its ``max_units`` are
        rejected without asking it."""
        limit = self.specs[index].max_units
        results = {r.sentence_id: r for r in self._annotate(index, [s for s in sentences if len(s) <= limit])}
        for sentence in sentences:
            if len(sentence) > limit:
                results[sentence.id] = AnnotationResult(sentence.id, rejections=[_too_long(len(sentence), limit)])
        return results

    def _annotate(self, index: int, sentences: list[Sentence]) -> list[AnnotationResult]:
        spec = self.specs[index]
        # A sentence that crashes the annotator is a counted rejection, never a lost batch.
        return run_batch_or_one_by_one(
            lambda batch: self.annotator_at(index).annotate(batch, steps=spec.steps),
            sentences,
            lambda sentence, error: AnnotationResult(sentence.id, rejections=[Rejection(REASON_BATCH_FAILED, error)]),
            what=f"annotator {spec.name}",
        )


def _too_long(length: int, limit: int) -> Rejection:
    return Rejection(REASON_TOO_LONG, f"{length} units > max_units {limit}")


# -- output -------------------------------------------------------------------------------


@dataclass
class AnnotationSummary:
    sentences: int = 0
    #: Sentences with an engine error (in failed.jsonl): written with what succeeded, but not
    #: recorded as done, so the same command asks them again.
    engine_failed_rows: int = 0
    annotated: int = 0
    extension_spans: int = 0
    spans_by_source: dict[str, int] = field(default_factory=dict)
    #: Distinct extension labels: what the label map (and the model's label space) grows to.
    extension_labels: int = 0
    rejections: int = 0
    rejections_by_reason: dict[str, int] = field(default_factory=dict)
    #: Several annotators: which of them rejected what (rows of older jobs have no annotator).
    rejections_by_annotator: dict[str, int] = field(default_factory=dict)
    sentences_with_rejections: int = 0
    annotator_seconds: float = 0.0
    wall_seconds: float | None = None
    sentences_per_second: float | None = None
    #: What the run should not pass silently but that does not fail it (shown in the table).
    warnings: list[str] = field(default_factory=list)
    #: The LLM steps' tokens (:meth:`TokenLedger.summary <knowfree_core.llm.ledger.TokenLedger.summary>`):
    #: ``{by_step: {step: {prompt_version, prompt_tokens, completion_tokens, requests, cached}},
    #: per_1000_sentences}``; ``by_step`` is empty without an LLM.
    tokens: dict[str, Any] = field(default_factory=dict)
    #: ``tokens`` priced with ``engine.price_per_million`` (:meth:`price`); None without a price.
    cost: Optional[dict[str, Any]] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def price(self, engine: EngineConfig) -> None:
        """Set ``cost`` from ``tokens`` and the engine's price (nothing without one)."""
        self.cost = cost_summary(self.tokens, engine.price_per_million, engine.cost_projection_sentences)

    def check_label_growth(self, max_extension_labels: int) -> None:
        """A warning when the run produced more distinct extension labels than
        ``max_extension_labels``: an LLM that invents a type per answer grows the label map
        (and the model's label space) without bound."""
        if self.extension_labels > max_extension_labels:
            self.warnings.append(
                f"{self.extension_labels} distinct extension labels, more than max_extension_labels "
                f"{max_extension_labels}: the label map grows with every new type; merge them "
                "(jobs.merge_labels) or look at the answers"
            )

    def table(self) -> str:
        lines = [
            f"sentences            {self.sentences}",
            f"extension spans      {self.extension_spans}",
        ]
        lines += [f"  {source:<18} {n}" for source, n in sorted(self.spans_by_source.items())]
        lines.append(f"extension labels     {self.extension_labels}")
        lines.append(f"rejections           {self.rejections} (in {self.sentences_with_rejections} sentences)")
        if self.engine_failed_rows:
            lines.append(f"engine failed        {self.engine_failed_rows} sentences (failed.jsonl; the same "
                         "command asks them again)")
        lines += [f"  {reason:<40} {n}" for reason, n in sorted(self.rejections_by_reason.items(), key=lambda x: -x[1])]
        if len(self.rejections_by_annotator) > 1:
            lines += [f"  by {name:<37} {n}" for name, n in sorted(self.rejections_by_annotator.items())]
        if self.sentences_per_second is not None:
            lines.append(f"throughput           {self.sentences_per_second:.1f} sentences/s over {self.wall_seconds:.1f} s")
        lines += token_lines(self.tokens, self.cost)
        lines += [f"warning: {warning}" for warning in self.warnings]
        return "\n".join(lines)


def summarize(rows: Iterable[dict[str, Any]]) -> AnnotationSummary:
    rows = list(rows)  # read twice: the counts, then the token ledger
    summary = AnnotationSummary()
    by_source: Counter[str] = Counter()
    by_reason: Counter[str] = Counter()
    by_annotator: Counter[str] = Counter()
    labels: set[str] = set()
    for row in rows:
        summary.sentences += 1
        record = json.loads(row["record"])
        by_source.update(span.get("source", "") for span in record.get("extension_spans", []))
        labels.update(span.get("label", "") for span in record.get("extension_spans", []))
        rejections = json.loads(row["rejections"])
        if rejections:
            summary.sentences_with_rejections += 1
        by_reason.update(f"{r['step']}: {r['reason']}" if r["step"] else r["reason"] for r in rejections)
        by_annotator.update(r.get("annotator") or row.get("annotator") or "" for r in rejections)
        summary.annotator_seconds += float(row.get("seconds") or 0.0)
    summary.extension_spans = sum(by_source.values())
    summary.spans_by_source = dict(by_source)
    summary.extension_labels = len(labels)
    summary.rejections = sum(by_reason.values())
    summary.rejections_by_reason = dict(by_reason)
    summary.rejections_by_annotator = dict(by_annotator)
    summary.tokens = ledger_of_rows(rows).summary(summary.sentences)
    return summary


def read_output_rows(rows_dir: str | Path) -> list[dict[str, Any]]:
    """Every row the job wrote (JSONL or Parquet files), sorted by input order."""
    rows: list[dict[str, Any]] = []
    for path in sorted(Path(rows_dir).rglob("*")):
        if path.suffix == ".json" or path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as handle:
                rows.extend(json.loads(line) for line in handle if line.strip())
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq

            rows.extend(pq.read_table(path).to_pylist())
    rows.sort(key=lambda row: int(row["order"]))
    return rows


def engine_failed(rejections: str | Sequence[dict[str, Any]]) -> bool:
    """Whether a row's rejections (its JSON column, or the list) hold an engine error: the row
    failed for a passing reason, not for its content, and is not done."""
    listed = json.loads(rejections) if isinstance(rejections, str) else rejections
    return any(r.get("reason") == REASON_ENGINE_ERROR for r in listed)


@dataclass
class CollectedRows:
    """A row job's output: ``rows`` (each id once, in input order), the ``failed`` ones among
    them (withheld for engine errors), and the ``duplicates`` of written rows dropped."""

    rows: list[dict[str, Any]]
    failed: list[dict[str, Any]]
    duplicates: int


def collect_rows(rows_dir: str | Path, failed_dir: str | Path | None = None) -> CollectedRows:
    """The written rows (first copy of an id kept) plus the engine-failed rows of ``failed_dir``
    whose id was not written: a batch retried after an actor crash may have set a row aside
    once and written it the next time, and a row set aside twice is one row."""
    written = read_output_rows(rows_dir)
    seen: set[str] = set()
    rows = []
    for row in written:
        if row["id"] not in seen:
            seen.add(row["id"])
            rows.append(row)
    duplicates = len(written) - len(rows)
    failed = []
    if failed_dir is not None and Path(failed_dir).exists():
        for row in read_output_rows(failed_dir):
            if row["id"] not in seen:
                seen.add(row["id"])
                failed.append(row)
    if failed:
        rows = sorted(rows + failed, key=lambda row: int(row["order"]))
    return CollectedRows(rows, failed, duplicates)


def _engine_errors(row: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in json.loads(row["rejections"]) if r.get("reason") == REASON_ENGINE_ERROR]


def write_failed_list(failed: Sequence[dict[str, Any]], path: str | Path) -> None:
    """``failed.jsonl``: one ``{"id", "order", "errors": [{step, reason, detail ...}]}`` per
    engine-failed row; written (empty) every run, so it never lists a row that has since
    succeeded."""
    with open(path, "w", encoding="utf-8") as handle:
        for row in failed:
            entry = {"id": row["id"], "order": int(row["order"]), "errors": _engine_errors(row)}
            handle.write(json.dumps(entry, ensure_ascii=False) + "\n")


def _error_text(error: dict[str, Any]) -> str:
    """``step: detail`` on one line, cut to a length a one-line message can carry."""
    text = " ".join(str(error.get("detail", "")).split())[:200]
    return f"{error['step']}: {text}" if error.get("step") else text


def check_error_rate(failed_list: str | Path, total: int, max_error_rate: float, what: str = "rows") -> None:
    """Raise a one-line KnowFreeError when the rows of ``failed_list`` (failed.jsonl) are more
    than ``max_error_rate`` of ``total``: a run that mostly failed must not end like one that
    worked. The message gives the count, the rate and the commonest engine error."""
    with open(failed_list, encoding="utf-8") as handle:
        failed = [json.loads(line) for line in handle if line.strip()]
    if not total or len(failed) / total <= max_error_rate:
        return
    errors: Counter[str] = Counter()
    for entry in failed:
        # Once per row and error text: a row whose three steps failed alike counts once.
        errors.update({_error_text(error) for error in entry["errors"]})
    commonest, times = errors.most_common(1)[0] if errors else ("?", 0)
    raise KnowFreeError(
        f"{len(failed)} of {total} {what} ({len(failed) / total:.1%}) failed through engine errors, more than "
        f"max_error_rate {max_error_rate:g}; commonest error ({times} of them): {commonest}. They are listed in "
        f"{failed_list} and not recorded as done: the same command asks them again (answers that "
        "succeeded are cached)"
    )


def collect_output(
    rows_dir: str | Path, out_path: str | Path, failed_dir: str | Path | None = None,
    failed_list: str | Path | None = None,
) -> tuple[AnnotationSummary, int]:
    """Write ``annotated.jsonl`` (the sentences with their extension spans, in input order,
    readable by ``knowfree train``) and return the summary and the number of duplicate ids
    found (0 when the job wrote every row exactly once; duplicates are dropped, first kept).

    The engine-failed rows of ``failed_dir`` are in the file too (each sentence with what did
    succeed, so training sees every sentence) and counted as ``engine_failed_rows``;
    ``failed_list`` (failed.jsonl) lists them (:func:`write_failed_list`)."""
    collected = collect_rows(rows_dir, failed_dir)
    with open(out_path, "w", encoding="utf-8") as handle:
        for row in collected.rows:
            handle.write(row["record"] + "\n")
    if failed_list is not None:
        write_failed_list(collected.failed, failed_list)
    summary = summarize(collected.rows)
    summary.engine_failed_rows = len(collected.failed)
    return summary, collected.duplicates
