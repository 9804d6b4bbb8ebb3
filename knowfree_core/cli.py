"""The library's commands: train, evaluate, predict, sample, annotate, encoder, report.

``python -m knowfree_core.cli`` runs them without Ray; the ``knowfree`` console script
(``jobs/cli.py``) adds the Ray jobs (``knowfree pipeline``). Every command is a thin layer over
the library, declared as a :class:`~knowfree_core.commandline.Command`; errors the user can fix
(a wrong file, label or config key) are one clear line with exit status 2, not a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

from . import commandline
from .commandline import Command, ConfigOptions
from .errors import KnowFreeError


def _quiet_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _evaluate_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", required=True, help="model directory (run_dir/model)")
    p.add_argument("--data", "-d", required=True, help="labelled file (jsonl, conll, conllu)")
    p.add_argument("--format", help="force the reader format")
    p.add_argument("--read-option", action="append", default=[], metavar="KEY=VALUE",
                   help="reader option, e.g. task=pos for CoNLL-U")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    _quiet_option(p)


def _predict_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", required=True)
    p.add_argument("--input", "-i", default="-", help="text file, one sentence per line (default stdin)")
    p.add_argument("--output", "-o", default="-", help="JSONL output (default stdout)")
    p.add_argument("--tokens", action="store_true",
                   help="split lines on whitespace (English-style units) instead of characters")
    p.add_argument("--batch-size", type=int, default=32, help="sentences (windows) per forward pass")
    p.add_argument("--threshold", type=float, help="override the model's decision threshold")
    p.add_argument("--min-score", type=float, help="leave out spans the model scores below this")
    p.add_argument("--max-units", type=int,
                   help="window size in units (default: the encoder's limit); longer lines are labelled "
                        "through overlapping windows")


def _sample_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", "-d", required=True)
    p.add_argument("--format")
    p.add_argument("--out", "-o", required=True, help="output folder")
    p.add_argument("--sizes", type=int, nargs="*", default=[250, 500, 1000])
    p.add_argument("--k-shot", type=int, nargs="*", help="greedy n-way k-shot sizes instead, e.g. 5 10")
    p.add_argument("--seed", type=int, default=42)


def _annotate_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", "-d", required=True,
                   help="dataset file, or a folder of raw .txt files (one sentence per line), as jobs.annotate reads")
    p.add_argument("--format", help="force the reader format; text: a raw text file, one sentence per line")
    p.add_argument("--tokens", action="store_true",
                   help="raw text: split lines on whitespace (English-style units) instead of characters")
    p.add_argument("--out", "-o", required=True, help="JSONL output")
    p.add_argument("--annotator", "-a", action="append", required=True, help="lac or jieba (repeatable)")
    p.add_argument("--steps", nargs="*", default=["ent", "seg", "pos"])


def _encoder_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", help="where to keep it (default $KNOWFREE_CACHE or ~/.cache/knowfree)")


def _report_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", "-r", required=True,
                   help="run folder written by knowfree train, or an LLM job folder (its summary.json tokens and cost)")
    p.add_argument("--data", "-d", help="labelled test file (default: the run config's data.test)")
    p.add_argument("--no-embeddings", action="store_true",
                   help="skip the 2-D sentence-embedding plot (no embedding model is loaded)")
    p.add_argument("--embedder", default="offline-e5", help="sentence-transformers name or path (default offline-e5)")
    p.add_argument("--compare", nargs="+", default=[], metavar="RUN_DIR",
                   help="other run folders for the F1-against-training-size plot (e.g. a pipeline grid)")


def _parse_key_values(pairs: Sequence[str]) -> dict:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise KnowFreeError(f"expected KEY=VALUE, got {pair!r}")
        options[key] = value
    return options


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .run import print_run_summary, run_training

    config = load_config(args.config, args.overrides)
    summary = run_training(config, progress=not args.quiet)
    print_run_summary(summary)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .formats import read_dataset
    from .model.knowfree import KnowFreeModel
    from .training import evaluate

    model = KnowFreeModel.from_pretrained(args.model)
    sentences = read_dataset(args.data, format=args.format, **_parse_key_values(args.read_option))
    unknown = sorted({s.label for x in sentences for s in x.spans} - set(model.vocab.targets))
    if unknown:
        # Spans of labels the model never learned can only be missed: say so instead of silently
        # lowering recall.
        logging.getLogger(__name__).warning(
            "%s has labels the model does not know (scored as misses): %s", args.data, ", ".join(unknown)
        )
    scores = evaluate(model, sentences, args.batch_size, progress=not args.quiet)
    if args.json:
        print(json.dumps(scores.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(scores.format_table())
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .model.knowfree import KnowFreeModel
    from .prediction import PredictSettings, predict_sentences, prediction_record
    from .records import Sentence

    # Checked before the model loads: a bad value is one line, at once.
    settings = PredictSettings(threshold=args.threshold, min_score=args.min_score, max_units=args.max_units)
    model = KnowFreeModel.from_pretrained(args.model)
    source = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")
    with source:
        lines = [line.rstrip("\r\n") for line in source]
    joiner = " " if args.tokens else ""
    sentences = [Sentence(str(number), line.split() if args.tokens else list(line), joiner=joiner)
                 for number, line in enumerate(lines, start=1)]
    predictions = predict_sentences(model, sentences, settings, batch_size=args.batch_size)
    out = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
    with out:
        for sentence, prediction in zip(sentences, predictions):
            out.write(json.dumps(prediction_record(sentence, prediction), ensure_ascii=False) + "\n")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from .bounds import COUNT, check_bounds
    from .formats import read_dataset
    from .sampling import greedy_k_shot, many_shot_subsets, write_subsets

    # Before reading: --sizes -5 or --k-shot 0 is one line, not a traceback from the sampler.
    check_bounds("", args, {"sizes": COUNT, "k_shot": COUNT})
    sentences = read_dataset(args.data, format=args.format)
    extra = {"source": str(args.data)}
    if args.k_shot:
        subsets = {f"{k}shot": greedy_k_shot(sentences, k, seed=args.seed) for k in args.k_shot}
    else:
        subsets = many_shot_subsets(sentences, sizes=tuple(args.sizes), seed=args.seed)
    print(write_subsets(subsets, args.out, seed=args.seed, extra=extra))
    return 0


def cmd_annotate(args: argparse.Namespace) -> int:
    from .annotation import iter_input_sentences
    from .formats import write_dataset
    from .run import annotate_with

    # The input as jobs.annotate reads it: a dataset file, or raw text (a folder of .txt
    # files, or --format text), so the two commands accept the same --data.
    sentences = list(iter_input_sentences([args.data], args.format, joiner=" " if args.tokens else ""))
    sentences, counts = annotate_with(args.annotator, sentences, args.steps)
    for name, (spans, rejected) in counts.items():
        print(f"{name}: {spans} extension spans, {rejected} rejected", file=sys.stderr)
    write_dataset(sentences, args.out)
    print(args.out)
    return 0


def cmd_encoder(args: argparse.Namespace) -> int:
    from .encoders.e5_offline import ensure_offline_e5

    print(ensure_offline_e5(args.cache_dir))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    page = write_report(args.run, test_path=args.data, embeddings=not args.no_embeddings, embedder=args.embedder,
                        compare_runs=args.compare)
    print(page)
    return 0


COMMANDS: tuple[Command, ...] = (
    Command("train", "train a model from a config file; writes a run folder", cmd_train, _quiet_option,
            config=ConfigOptions()),
    Command("evaluate", "score a saved model on a labelled file", cmd_evaluate, _evaluate_options),
    Command("predict", "label raw sentences (one per line) and write JSONL spans", cmd_predict, _predict_options),
    Command("sample", "write seeded many-shot or k-shot training subsets", cmd_sample, _sample_options),
    Command("annotate", "add offline extension labels (lac, jieba) to a dataset", cmd_annotate, _annotate_options),
    Command("encoder", "convert the bundled offline e5 encoder once and print its path", cmd_encoder,
            _encoder_options),
    Command("report", "write RUN/report/report.md + report.html with plots (metrics, Figures 5 and 8)", cmd_report,
            _report_options),
)


def main(argv: Sequence[str] | None = None) -> int:
    """The library's commands (no Ray); the ``knowfree`` console script is ``jobs.cli.main``."""
    return commandline.main(COMMANDS, argv, prog="knowfree", description=__doc__.splitlines()[0])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
