"""Extension labels from a trained KnowFREE model of a related labelled corpus.

A model trained on, say, MSRA NER (``knowfree train --config configs/msra-annotator.yaml``)
tags the target corpus with *its* entity types; those entities feed training as extension
labels, the way LAC's entities do. Only the ``ent`` step exists: the model predicts entities
of its own target types, not words or POS tags.

Labels and source (``corpus: msra``, a model whose targets are PER, LOC, ORG)::

    label   <label_prefix><target label>    ENT-msra.PER, ENT-msra.LOC, ENT-msra.ORG
    source  <corpus>:ent                     msra:ent

``label_prefix`` defaults to ``ENT-<corpus>.``: the ``ENT-`` start puts the labels in the
entity view (``labels.extension_view``, ``merge_labels``), and the ``<corpus>.`` part keeps
them apart from LAC's ``ENT-PER`` and from the target corpus' own labels, which training
needs (a label cannot be both a target and an extension label). ``label_prefix: ENT-``
shares LAC's label names on purpose (the sources stay apart, so ablations still work).

The model loads on the first ``annotate`` call, so an annotation actor is built cheaply and
pays the load once. Sentences over ``max_units`` and sentences the model fails on are
counted rejections, never a crash; a missing or broken model folder is an error naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from knowfree_core.annotators.alignment import REASON_TOO_LONG, REASON_TOOL_ERROR, Rejection
from knowfree_core.annotators.base import ENT_PREFIX, AnnotationResult, Annotator, source_name
from knowfree_core.errors import ConfigError, KnowFreeError
from knowfree_core.records import ExtensionSpan, Sentence, Span

MANIFEST = "knowfree.json"  # what KnowFreeModel.save_pretrained writes first in a model folder


class KnowFreeModelAnnotator(Annotator):
    """Entities predicted by a saved KnowFREE model, as ``ENT-<corpus>.<type>`` extension spans.

    model
        A saved model folder (``<run_dir>/model``). Required.
    corpus
        A tag for the model's training corpus (``msra``): the source is ``<corpus>:ent`` and,
        by default, the labels ``ENT-<corpus>.<type>``. (Not ``name``: that is
        ``get_annotator``'s own first argument.)
    label_prefix
        Put before every predicted label; default ``ENT-<corpus>.``. Must start with ``ENT-``.
    batch_size
        Sentences per forward pass.
    threshold
        Span probability threshold; default the saved model's own (chosen on its dev set).
    device
        ``auto`` (CUDA when this process sees a GPU, as a Ray actor with
        ``pool.gpus_per_actor`` does), ``cpu``, ``cuda``, ``cuda:1`` ...
    max_units
        Longer sentences are rejected (the span grid grows with the square of the length);
        ``None``: no limit.
    """

    name = "knowfree"
    supported_steps = ("ent",)

    def __init__(
        self,
        model: str | Path | None = None,
        corpus: str = "knowfree",
        label_prefix: str | None = None,
        batch_size: int = 32,
        threshold: float | None = None,
        device: str = "auto",
        max_units: int | None = 512,
    ) -> None:
        if not model:
            raise ConfigError("annotator knowfree: option 'model' (a saved model folder, <run_dir>/model) is required")
        if not corpus or ":" in corpus or any(c.isspace() for c in corpus):
            raise ConfigError(f"annotator knowfree: corpus {corpus!r} must be non-empty, without ':' or spaces "
                              "(it names the source '<corpus>:ent')")
        prefix = f"{ENT_PREFIX}{corpus}." if label_prefix is None else label_prefix
        if not prefix.startswith(ENT_PREFIX):
            raise ConfigError(f"annotator knowfree: label_prefix {prefix!r} must start with {ENT_PREFIX!r} "
                              "(entity labels form the 'ent' view of extension labels)")
        if batch_size < 1:
            raise ConfigError(f"annotator knowfree: batch_size must be at least 1, got {batch_size}")
        if threshold is not None and not 0.0 < threshold < 1.0:
            raise ConfigError(f"annotator knowfree: threshold must be in (0, 1), got {threshold}")
        if max_units is not None and max_units < 1:
            raise ConfigError(f"annotator knowfree: max_units must be at least 1 or null, got {max_units}")
        self.model_dir = Path(model)
        self.name = corpus  # the source prefix, as LLMAnnotator's source_prefix
        self.label_prefix = prefix
        self.batch_size = batch_size
        self.threshold = threshold
        self.device = device
        self.max_units = max_units
        self._model: Any = None  # a KnowFreeModel, loaded on first use

    @property
    def source(self) -> str:
        return source_name(self.name, "ent")

    def check_access(self) -> None:
        """Fail fast (``jobs.annotate`` calls this in the driver) on a folder that is not a
        saved model, without paying the model load there."""
        _check_model_dir(self.model_dir)

    def loaded_model(self) -> Any:
        if self._model is None:
            _check_model_dir(self.model_dir)
            # Imported here: torch and the model code load only when a model is needed.
            from knowfree_core.model.knowfree import KnowFreeModel

            self._model = KnowFreeModel.from_pretrained(self.model_dir, device=self._device())
        return self._model

    def _device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def annotate(self, sentences: list[Sentence], steps: Sequence[str] | str = ("ent",)) -> list[AnnotationResult]:
        wanted = self.check_steps(steps)
        results = [AnnotationResult(s.id, sources=tuple(source_name(self.name, w) for w in wanted)) for s in sentences]
        if not sentences or not wanted:
            return results
        model = self.loaded_model()  # a missing model is the user's error to fix, not a rejection
        fits: list[int] = []
        for index, sentence in enumerate(sentences):
            if self.max_units is not None and len(sentence) > self.max_units:
                results[index].rejections.append(
                    Rejection(REASON_TOO_LONG, f"{len(sentence)} units > max_units {self.max_units}", "ent")
                )
            else:
                fits.append(index)
        predicted = self._predict_safely(model, [sentences[i] for i in fits])
        for index, (spans, error) in zip(fits, predicted):
            if error is not None:
                results[index].rejections.append(Rejection(REASON_TOOL_ERROR, error, "ent"))
            results[index].spans.extend(
                ExtensionSpan(span.start, span.end, self.label_prefix + span.label, self.source) for span in spans
            )
        return results

    def _predict(self, model: Any, sentences: list[Sentence]) -> list[list[Span]]:
        logits = model.target_logits(sentences, batch_size=self.batch_size)
        return model.decode(logits, threshold=self.threshold)

    def _predict_safely(self, model: Any, sentences: list[Sentence]) -> list[tuple[list[Span], str | None]]:
        """Predict in batches; if that fails (e.g. out of memory), retry one by one so that a
        single bad sentence costs only its own spans."""
        if not sentences:
            return []
        try:
            return [(spans, None) for spans in self._predict(model, sentences)]
        except Exception:  # noqa: BLE001 - retried per sentence below
            pass
        out: list[tuple[list[Span], str | None]] = []
        for sentence in sentences:
            try:
                out.append((self._predict(model, [sentence])[0], None))
            except Exception as error:  # noqa: BLE001 - reported as a rejection, not raised
                out.append(([], f"{type(error).__name__}: {error}"))
        return out


def _check_model_dir(directory: Path) -> None:
    if not directory.is_dir():
        raise KnowFreeError(f"annotator knowfree: model folder {directory} does not exist "
                            "(expected a saved model, <run_dir>/model of knowfree train)")
    if not (directory / MANIFEST).is_file():
        raise KnowFreeError(f"annotator knowfree: {directory} is not a saved KnowFREE model (no {MANIFEST})")
