"""Run several ``knowfree train`` configurations side by side and tabulate how each learns.

Made for the encoder-recipe search on a GPU machine with no network (inputs from
``bench/gpu_bundle.py``), but it runs anywhere ``knowfree_core`` imports. Each run is a
subprocess of the real CLI, so what is measured is what users run. A global deadline stops
unfinished runs and still tabulates what they reached (their per-epoch history).

    python bench/recipe_sweep.py --bundle .gpu_bundle --sweep bench/sweeps/e5_recipe.yaml \
        --parallel 6 --deadline 480 --out results/
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

from subprocess_pool import Command, run_commands

from knowfree_core.report.document import markdown_table

ROOT = Path(__file__).resolve().parents[1]


def base_overrides(bundle: Path, size: int) -> list[str]:
    data = bundle / "data"
    return [
        f"data.train={data / f'weibo-train-{size}.jsonl'}",
        f"data.dev={data / 'weibo-dev.jsonl'}",
        f"data.test={data / 'weibo-test.jsonl'}",
        f"encoder.name={bundle / 'e5'}",
        "encoder.unit_mode=char",
    ]


def summarise(name: str, overrides: list[str], run_dir: Path, status: str) -> dict:
    history = []
    history_path = run_dir / "history.jsonl"
    if history_path.is_file():
        history = [json.loads(line) for line in history_path.read_text().splitlines() if line.strip()]
    metrics = {}
    if (run_dir / "metrics.json").is_file():
        metrics = json.loads((run_dir / "metrics.json").read_text())
    dev_curve = [round(h["dev_f1"] or 0.0, 4) for h in history]
    best = max(range(len(dev_curve)), key=dev_curve.__getitem__) if dev_curve else None
    first_03 = next((i + 1 for i, f in enumerate(dev_curve) if f >= 0.3), None)
    return {
        "name": name,
        "overrides": overrides,
        "status": status,
        "epochs": len(history),
        "best_epoch": None if best is None else best + 1,
        "best_dev_f1": None if best is None else dev_curve[best],
        "test_f1": metrics.get("test", {}).get("f1"),
        "test_p": metrics.get("test", {}).get("precision"),
        "test_r": metrics.get("test", {}).get("recall"),
        "first_epoch_dev_ge_0.3": first_03,
        "s_per_epoch": round(sum(h["seconds"] for h in history) / max(1, len(history)), 1),
        "dev_curve": dev_curve,
    }


def format_table(rows: list[dict]) -> str:
    header = ["run", "overrides", "epochs", "best dev F1 (epoch)", "test F1 at best dev", "P / R",
              "first epoch dev ≥ 0.3", "s/epoch"]
    table = []
    for r in rows:
        test = "—" if r["test_f1"] is None else f"{r['test_f1']:.4f}"
        pr = "—" if r["test_p"] is None else f"{r['test_p']:.3f} / {r['test_r']:.3f}"
        best = "—" if r["best_dev_f1"] is None else f"{r['best_dev_f1']:.4f} ({r['best_epoch']})"
        table.append([r["name"], f"`{' '.join(r['overrides'])}`", r["epochs"], best, test, pr,
                      r["first_epoch_dev_ge_0.3"] or "—", r["s_per_epoch"]])
    return markdown_table(header, table, align="llrrrrrr")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=ROOT / ".gpu_bundle")
    parser.add_argument("--sweep", type=Path, required=True, help="YAML: {size, common: [...], runs: [{name, set: [...]}]}")
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--deadline", type=float, default=480.0, help="seconds before unfinished runs are stopped")
    parser.add_argument("--work", type=Path, default=Path("/tmp/knowfree-sweep"))
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--only", nargs="*", help="run only these names")
    args = parser.parse_args()

    spec = yaml.safe_load(args.sweep.read_text())
    size = int(spec.get("size", 250))
    common = list(spec.get("common", []))
    runs = [r for r in spec["runs"] if not args.only or r["name"] in args.only]
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    commands = []
    for run in runs:
        run_dir = args.work / run["name"]
        argv = [sys.executable, "-m", "knowfree_core.cli", "train", "--quiet"]
        for item in base_overrides(args.bundle, size) + common + list(run.get("set", [])) + [f"output_dir={run_dir}"]:
            argv += ["--set", item]
        commands.append(Command(run["name"], argv, args.work / f"{run['name']}.log"))
    finished = run_commands(commands, args.parallel, args.deadline, env)

    rows = []
    for run in runs:
        rows.append(summarise(run["name"], list(run.get("set", [])), args.work / run["name"], finished.get(run["name"], "?")))
    table = format_table(rows)
    print(table)
    (args.out / "sweep.md").write_text(table + "\n")
    (args.out / "sweep.json").write_text(json.dumps({"size": size, "common": common, "rows": rows}, indent=2))
    for run in runs:  # the tail of each log explains failures
        log = args.work / f"{run['name']}.log"
        if finished.get(run["name"]) not in ("ok",) and log.is_file():
            print(f"--- {run['name']} ({finished.get(run['name'])}) ---")
            print("\n".join(log.read_text(errors="replace").splitlines()[-8:]))


if __name__ == "__main__":
    main()
