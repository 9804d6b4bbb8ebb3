"""What the wheel installs (pyproject.toml): knowfree_core, and the folders jobs/ and prompts/
under the names knowfree_jobs and knowfree_prompts -- no generic top-level name -- with every
package folder listed; the console script and the prompt templates come with it."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]


def _installed_name(folder_package: str) -> str:
    """``jobs.x`` -> ``knowfree_jobs.x`` through package-dir."""
    top, _, rest = folder_package.partition(".")
    renamed = {folder: name for name, folder in SETUPTOOLS.get("package-dir", {}).items()}.get(top, top)
    return f"{renamed}.{rest}" if rest else renamed


def test_the_wheel_claims_only_knowfree_names():
    assert {name.split(".")[0] for name in SETUPTOOLS["packages"]} == {"knowfree_core", "knowfree_jobs",
                                                                        "knowfree_prompts"}
    assert SETUPTOOLS["package-dir"] == {"knowfree_jobs": "jobs", "knowfree_prompts": "prompts"}
    assert PYPROJECT["project"]["scripts"] == {"knowfree": "knowfree_jobs.cli:main"}
    assert SETUPTOOLS["package-data"] == {"knowfree_prompts": ["**/*.yaml"]}


def test_every_folder_with_python_code_is_a_listed_package():
    folders = [folder for top in ("knowfree_core", "jobs", "prompts") for folder in [ROOT / top, *(ROOT / top).rglob("*")]
               if folder.is_dir() and folder.name != "__pycache__" and any(folder.glob("*.py"))]
    packages = [".".join(folder.relative_to(ROOT).parts) for folder in folders]
    assert sorted(_installed_name(p) for p in packages) == sorted(SETUPTOOLS["packages"])


def test_the_prompt_templates_are_package_data():
    # prompts/<language>/ are plain folders of YAML files: the ** pattern takes them.
    templates = list((ROOT / "prompts").glob("*/*.yaml"))
    assert templates and all(not any(p.parent.glob("*.py")) for p in templates)
