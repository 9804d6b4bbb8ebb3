"""The restore guard: the job config is kept next to the Tune experiment, and a rerun that would
restore it with another search is refused (its trials would mix two searches)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from .schema import TuneJobConfig
from knowfree_core.config import structured_to_dict
from knowfree_core.errors import ConfigError

EXPERIMENT = "tune"  # the Tune experiment's folder under output_dir
# Sections of the job config that define the search: a restored experiment must not change them.
SEARCH_DEFINITION = ("train_config", "train_overrides", "search_space", "num_samples", "scheduler",
                     "search_alg", "seed", "trial_runner")


def record_search(job: TuneJobConfig, out: Path, restoring: bool) -> None:
    """Keep the job config next to the experiment; a restore must not change the search."""
    saved = out / "tune_config.yaml"
    current = structured_to_dict(job)
    if restoring and saved.is_file():
        previous = OmegaConf.to_container(OmegaConf.load(saved), resolve=True)
        changed = [key for key in SEARCH_DEFINITION if previous.get(key) != current.get(key)]  # type: ignore[union-attr]
        if changed:
            raise ConfigError(f"{out / EXPERIMENT} holds an experiment with another search (changed: "
                              f"{', '.join(changed)}); choose a new output_dir or delete {out}")
    saved.write_text(OmegaConf.to_yaml(OmegaConf.create(current)), encoding="utf-8")
