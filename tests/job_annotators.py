"""Annotators used by the job tests, loaded in Ray workers as ``job_annotators:Name``."""

from __future__ import annotations

import os
import time
from pathlib import Path

from knowfree_core.annotators.base import AnnotationResult, Annotator, source_name
from knowfree_core.records import ExtensionSpan


class FirstCharAnnotator(Annotator):
    """Marks the first unit of each sentence; ``die_on`` kills its worker process once (a
    marker file remembers it already did), ``sleep_s`` slows it down per sentence."""

    name = "first"
    supported_steps = ("seg",)

    def __init__(self, die_on: str | None = None, marker: str | None = None, sleep_s: float = 0.0):
        self.die_on, self.marker, self.sleep_s = die_on, marker, sleep_s

    def annotate(self, sentences, steps=("seg",)):
        results = []
        for sentence in sentences:
            if sentence.id == self.die_on and self.marker and not Path(self.marker).exists():
                Path(self.marker).write_text(str(os.getpid()))
                os._exit(1)  # the actor process dies mid-batch, as on an OOM kill
            time.sleep(self.sleep_s)
            results.append(
                AnnotationResult(
                    sentence.id,
                    spans=[ExtensionSpan(0, 1, "SEG", source_name(self.name, "seg"))],
                    sources=(source_name(self.name, "seg"),),
                )
            )
        return results
