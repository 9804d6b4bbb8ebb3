"""Loading a bench/ script in a test: bench/ is not a package."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_bench_script(stem: str, module_name: str | None = None) -> ModuleType:
    """Execute ``bench/<stem>.py`` as the module ``module_name`` (default: ``stem``).

    Registered in ``sys.modules`` because OmegaConf reads dataclass annotations through their
    module.
    """
    spec = importlib.util.spec_from_file_location(module_name or stem, ROOT / "bench" / f"{stem}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def markdown_table_rows(output: str) -> dict[str, dict[str, str]]:
    """The first markdown table printed in ``output``, as {first cell: {column: cell}}: how the
    bench scripts' tests read the tables they print."""
    lines = [line for line in output.splitlines() if line.startswith("| ")]
    columns = [c.strip() for c in lines[0].strip("|").split("|")]
    return {cells[0]: dict(zip(columns, cells))
            for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[1:])}
