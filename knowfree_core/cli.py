"""The ``knowfree`` command line: train, evaluate, predict, sample, annotate, encoder, report.

Every sub-command is a thin layer over the library; errors the user can fix (a wrong file,
label or config key) are printed as one clear line with exit status 2, not as a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

from .errors import KnowFreeError


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model from a config file; writes a run folder")
    p.add_argument("--config", "-c", help="YAML config file (see configs/)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.epochs=5 (repeatable)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=cmd_train)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score a saved model on a labelled file")
    p.add_argument("--model", "-m", required=True, help="model directory (run_dir/model)")
    p.add_argument("--data", "-d", required=True, help="labelled file (jsonl, conll, conllu)")
    p.add_argument("--format", help="force the reader format")
    p.add_argument("--read-option", action="append", default=[], metavar="KEY=VALUE",
                   help="reader option, e.g. task=pos for CoNLL-U")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=cmd_evaluate)


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="label raw sentences (one per line) and write JSONL spans")
    p.add_argument("--model", "-m", required=True)
    p.add_argument("--input", "-i", default="-", help="text file, one sentence per line (default stdin)")
    p.add_argument("--output", "-o", default="-", help="JSONL output (default stdout)")
    p.add_argument("--tokens", action="store_true",
                   help="split lines on whitespace (English-style units) instead of characters")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threshold", type=float, help="override the model's decision threshold")
    p.set_defaults(handler=cmd_predict)


def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="write seeded many-shot or k-shot training subsets")
    p.add_argument("--data", "-d", required=True)
    p.add_argument("--format")
    p.add_argument("--out", "-o", required=True, help="output folder")
    p.add_argument("--sizes", type=int, nargs="*", default=[250, 500, 1000])
    p.add_argument("--k-shot", type=int, nargs="*", help="greedy n-way k-shot sizes instead, e.g. 5 10")
    p.add_argument("--seed", type=int, default=42)
    p.set_defaults(handler=cmd_sample)


def _add_annotate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("annotate", help="add offline extension labels (lac, jieba) to a dataset")
    p.add_argument("--data", "-d", required=True)
    p.add_argument("--format")
    p.add_argument("--out", "-o", required=True, help="JSONL output")
    p.add_argument("--annotator", "-a", action="append", required=True, help="lac or jieba (repeatable)")
    p.add_argument("--steps", nargs="*", default=["ent", "seg", "pos"])
    p.set_defaults(handler=cmd_annotate)


def _add_pipeline(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pipeline",
        help="the main job on Ray: annotate → merge → train (F), + synthesize → retrain (FS); see jobs.pipeline",
    )
    p.add_argument("--config", "-c", required=True, help="pipeline YAML config (e.g. configs/demo-pipeline.yaml)")
    p.add_argument("--variant", help="overrides the config's variant: F, FS, noext, biaffine, or an ablation "
                                     "(F-noent, F-nopos, F-nomerge, F-cnn)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a pipeline config key, e.g. --set grid.seeds=[1,2,3] (repeatable)")
    p.set_defaults(handler=cmd_pipeline)


def _add_encoder(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("encoder", help="convert the bundled offline e5 encoder once and print its path")
    p.add_argument("--cache-dir", help="where to keep it (default $KNOWFREE_CACHE or ~/.cache/knowfree)")
    p.set_defaults(handler=cmd_encoder)


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write RUN/report/report.md + report.html with plots (metrics, Figures 5 and 8)")
    p.add_argument("--run", "-r", required=True, help="run folder written by knowfree train")
    p.add_argument("--data", "-d", help="labelled test file (default: the run config's data.test)")
    p.add_argument("--no-embeddings", action="store_true",
                   help="skip the 2-D sentence-embedding plot (no embedding model is loaded)")
    p.add_argument("--embedder", default="offline-e5", help="sentence-transformers name or path (default offline-e5)")
    p.add_argument("--compare", nargs="+", default=[], metavar="RUN_DIR",
                   help="other run folders for the F1-against-training-size plot (e.g. a pipeline grid)")
    p.set_defaults(handler=cmd_report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="knowfree", description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_evaluate, _add_predict, _add_sample, _add_annotate, _add_pipeline, _add_encoder,
                _add_report):
        add(sub)
    return parser


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

    model = KnowFreeModel.from_pretrained(args.model)
    if args.threshold is not None:
        model.config.threshold = args.threshold
    source = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")
    with source:
        lines = [line.rstrip("\r\n") for line in source]
    units = [line.split() if args.tokens else list(line) for line in lines]
    predictions = model.predict(units, batch_size=args.batch_size)
    joiner = " " if args.tokens else ""
    out = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
    with out:
        for number, (unit_list, spans) in enumerate(zip(units, predictions), start=1):
            record = {
                "id": str(number),
                "text": joiner.join(unit_list),
                "spans": [
                    {**span.to_dict(), "text": joiner.join(unit_list[span.start : span.end])} for span in spans
                ],
            }
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from .formats import read_dataset
    from .sampling import greedy_k_shot, many_shot_subsets, write_subsets

    sentences = read_dataset(args.data, format=args.format)
    extra = {"source": str(args.data)}
    if args.k_shot:
        subsets = {f"{k}shot": greedy_k_shot(sentences, k, seed=args.seed) for k in args.k_shot}
    else:
        subsets = many_shot_subsets(sentences, sizes=tuple(args.sizes), seed=args.seed)
    print(write_subsets(subsets, args.out, seed=args.seed, extra=extra))
    return 0


def cmd_annotate(args: argparse.Namespace) -> int:
    from .formats import read_dataset, write_dataset
    from .run import annotate_with

    sentences, counts = annotate_with(args.annotator, read_dataset(args.data, format=args.format), args.steps)
    for name, (spans, rejected) in counts.items():
        print(f"{name}: {spans} extension spans, {rejected} rejected", file=sys.stderr)
    write_dataset(sentences, args.out)
    print(args.out)
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    # The library does not import ray; the jobs package does, and only this command needs it.
    try:
        from jobs.pipeline import PipelineConfig, run_pipeline
    except ImportError as error:
        raise KnowFreeError(f"knowfree pipeline needs Ray: pip install 'knowfree[all]' ({error})") from error
    from .config import load_structured

    overrides = list(args.overrides) + ([f"variant={args.variant}"] if args.variant else [])
    run_pipeline(load_structured(PipelineConfig, args.config, overrides))
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.handler(args) or 0)
    except (KnowFreeError, FileNotFoundError) as error:
        print(f"knowfree {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
