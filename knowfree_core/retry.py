"""Run a batch; if it fails, run its items one at a time so only the bad item is lost.

Every batch worker of the project (the offline tools, the annotation actors, the vLLM and
transformers engines) has the same failure mode: one bad input (a sentence that crashes a
tool, a prompt past the model's context) fails the whole call. Retrying the items singly
costs one extra call per item, but only when a batch failed, and keeps every good answer.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence, TypeVar

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


def describe_error(error: BaseException) -> str:
    """The text a failed item carries: the exception's type and message."""
    return f"{type(error).__name__}: {error}"


def run_batch_or_one_by_one(
    run: Callable[[list[Item]], Sequence[Result]],
    items: Sequence[Item],
    failed: Callable[[Item, str], Result],
    what: str,
) -> list[Result]:
    """``run(items)``, one result per item in order; if it raises (or answers a different
    number of results) each item is run alone, and an item that fails alone becomes
    ``failed(item, describe_error(error))``.

    A batch of one is not run again: that would be the same call. ``what`` names the worker
    in the warning logged when a batch is split.
    """
    batch = list(items)
    if not batch:
        return []
    try:
        results = list(run(batch))
        if len(results) == len(batch):
            return results
        reason = f"{len(results)} results for {len(batch)} items"
    except Exception as error:  # noqa: BLE001 - any failure is retried item by item below
        reason = describe_error(error)
    if len(batch) == 1:
        return [failed(batch[0], reason)]
    log.warning("%s: a batch of %d failed (%s); retrying one by one", what, len(batch), reason)
    return [_run_alone(run, item, failed) for item in batch]


def _run_alone(run: Callable[[list[Item]], Sequence[Result]], item: Item,
               failed: Callable[[Item, str], Result]) -> Result:
    try:
        results = list(run([item]))
    except Exception as error:  # noqa: BLE001 - a failed item, never a lost batch
        return failed(item, describe_error(error))
    if len(results) != 1:
        return failed(item, f"{len(results)} results for 1 item")
    return results[0]
