"""The restore guards: a rerun that would restore the Tune experiment with another search is
refused (its trials would mix two searches), and an experiment folder the job did not create, or
one others could write, is never restored (restoring unpickles it: the folder is trusted like
code)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import uuid
from pathlib import Path

from omegaconf import OmegaConf

from .schema import TuneJobConfig
from knowfree_core.config import structured_to_dict
from knowfree_core.errors import ConfigError

EXPERIMENT = "tune"  # the Tune experiment's folder under output_dir
# Sections of the job config that define the search: a restored experiment must not change them.
SEARCH_DEFINITION = ("train_config", "train_overrides", "search_space", "num_samples", "scheduler",
                     "search_alg", "seed", "trial_runner")


def save_job_config(job: TuneJobConfig, out: Path) -> None:
    """Keep the job config next to the experiment (for the reader; a restore compares the search
    with the experiment's marker, :func:`check_restorable`)."""
    saved = out / "tune_config.yaml"
    saved.write_text(OmegaConf.to_yaml(OmegaConf.create(structured_to_dict(job))), encoding="utf-8")


# The marker this job writes into every experiment folder it creates. Ray's Tuner.restore
# unpickles <experiment>/tuner.pkl, so a folder is trusted like code: one without the marker (not
# made by this job, e.g. copied in or planted) is never restored.
MARKER = "knowfree_experiment.json"


def _search_definition(job: TuneJobConfig) -> dict:
    """The search-defining sections as JSON gives them back (what the marker keeps)."""
    current = structured_to_dict(job)
    return json.loads(json.dumps({key: current.get(key) for key in SEARCH_DEFINITION}, default=str))


def _search_hash(definition: dict) -> str:
    return hashlib.sha256(json.dumps(definition, sort_keys=True).encode("utf-8")).hexdigest()


def mark_experiment(job: TuneJobConfig, experiment: Path) -> None:
    """Create the experiment folder with the marker, before Ray writes tuner.pkl into it. The
    folder is made writable by its owner only (a umask of 002 would let the group replace
    tuner.pkl, and the guard would then refuse the resume)."""
    experiment.mkdir(parents=True, exist_ok=True)
    _drop_shared_write(experiment)
    definition = _search_definition(job)
    marker = {"created_by": "knowfree jobs.tune", "id": uuid.uuid4().hex,
              "search_sha256": _search_hash(definition), "search": definition}
    (experiment / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def seal_experiment(experiment: Path) -> None:
    """After fit: tuner.pkl as Ray wrote it (under the user's umask) loses group/other write."""
    pickle_file = experiment / "tuner.pkl"
    if pickle_file.is_file():
        _drop_shared_write(pickle_file)


def _drop_shared_write(path: Path) -> None:
    if os.name == "posix":
        mode = path.stat().st_mode
        if mode & 0o022:
            path.chmod(stat.S_IMODE(mode) & ~0o022)


def check_restorable(job: TuneJobConfig, experiment: Path) -> None:
    """Refuse to restore (unpickle) an experiment this job did not create, or one another user
    could have changed. Runs before anything in the folder is read by Ray."""
    marker = experiment / MARKER
    if not marker.is_file():
        raise ConfigError(f"{experiment} is not restored: it has no {MARKER} (it was not created by "
                          f"knowfree jobs.tune, and restoring unpickles its tuner.pkl); choose a new "
                          f"output_dir or delete {experiment}")
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{experiment} is not restored: {marker} is unreadable ({error})") from error
    if not isinstance(recorded, dict) or not isinstance(recorded.get("search"), dict) \
            or recorded.get("search_sha256") != _search_hash(recorded["search"]):
        raise ConfigError(f"{experiment} is not restored: {marker} is not a marker this job wrote")
    current = _search_definition(job)
    changed = [key for key in SEARCH_DEFINITION if recorded["search"].get(key) != current.get(key)]
    if changed:
        raise ConfigError(f"{experiment} holds an experiment with another search (changed: "
                          f"{', '.join(changed)}); choose a new output_dir or delete {experiment.parent}")
    if os.name != "posix":  # no POSIX mode bits or owners to check
        return
    for path in (experiment, experiment / "tuner.pkl", marker):
        info = path.stat()
        if info.st_uid != os.getuid():
            raise ConfigError(f"{experiment} is not restored: {path} is owned by another user (uid "
                              f"{info.st_uid}), and restoring unpickles the folder's tuner.pkl")
        if info.st_mode & 0o022:
            raise ConfigError(f"{experiment} is not restored: {path} is writable by group or others (mode "
                              f"{stat.S_IMODE(info.st_mode):o}), and restoring unpickles the folder's "
                              f"tuner.pkl; if only you could write it: chmod go-w {path}")
