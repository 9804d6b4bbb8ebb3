"""Synonymous extension-label merging (paper §3.1, equations 2-6).

An LLM asked for entities of any type invents many names for one kind of thing (``ENT-组织机构``,
``ENT-机构``, ``ENT-组织``). Merging them is two steps:

1. **Proposal.** Groups ``{standard label: [synonymous labels]}``: from the LLM with the
   P_merge prompt (:func:`propose_groups_llm`), or without an LLM from the geometry of the
   labels' centres with FAISS (:func:`propose_groups_faiss`).
2. **Verification** (:func:`verify_groups`). A proposal reads label *names*; whether two labels
   mean the same thing *in this data* is decided by their samples. Every entity-label pair
   becomes a text ``"[entity] is [type]"`` embedded by a sentence model; label ``k`` has the
   vector set ``V_k``, centre ``c_k`` (eq. 5) and radius ``r_k``, the mean distance of its ``p``
   farthest vectors from the centre (eq. 6). In each group the member with the most samples
   (ties: the largest radius) is the reference; another member ``j`` joins the group iff
   ``||c_j - c_ref|| <= epsilon * r_ref``, otherwise it stays a label of its own.

The result is a :class:`LabelMap` (old label -> new label, with every number behind every
decision), saved as readable JSON, and :func:`apply_label_map` rewrites the sentences with it.
:func:`merge_labels` runs the whole chain.

Samples and counts: ``V_k`` is a *set* in the paper, so each distinct (entity, type) pair gives
one vector: a frequent entity ("中国" 500 times) would otherwise pull the centre onto itself and
shrink the radius to nothing. The *sample count* used to pick the reference is the number of
spans, though, because that is how much of the data a label stands for.

faiss and sentence-transformers are optional (extra ``merge``) and imported only when used.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from knowfree_core.annotators.alignment import Rejection
from knowfree_core.annotators.base import ENT_PREFIX
from knowfree_core.records import ExtensionSpan, Sentence

if TYPE_CHECKING:
    from knowfree_core.embeddings import SentenceEmbedder
    from knowfree_core.llm.cache import AnswerCache
    from knowfree_core.llm.engine import EngineConfig, GenerationParams, LLMEngine

#: The paper's template for an entity-label pair; for Chinese data "{entity}是{type}" reads better.
DEFAULT_TEMPLATE = "{entity} is {type}"
DEFAULT_P = 5
DEFAULT_EPSILON = 1.5
#: Relative slack on the epsilon rule, so that a centre exactly on the boundary (the rule is
#: "<=") is not rejected by float rounding.
_BOUNDARY_SLACK = 1e-9

# Rejection reasons of the proposal step (step "merge").
REASON_ENGINE_ERROR = "engine error"
REASON_UNPARSABLE = "unparsable answer"
REASON_NOT_A_LABEL = "not a label"
REASON_OMITTED = "label not in answer"
MERGE_STEP = "merge"

LABEL_MAP_FORMAT = 1


# -- samples ------------------------------------------------------------------------------


def _entity_spans(
    sentences: Iterable[Sentence], prefix: str, sources: Collection[str] | None
) -> Iterable[tuple[Sentence, ExtensionSpan]]:
    for sentence in sentences:
        for span in sentence.extension_spans:
            if span.label.startswith(prefix) and len(span.label) > len(prefix):
                if sources is None or span.source in sources:
                    yield sentence, span


def entity_label_samples(
    sentences: Iterable[Sentence],
    prefix: str = ENT_PREFIX,
    template: str = DEFAULT_TEMPLATE,
    sources: Collection[str] | None = None,
) -> dict[str, list[str]]:
    """``{label: [sample text, ...]}`` for every label starting with ``prefix``.

    A sample is ``template.format(entity=<span text>, type=<label without prefix>)``; each
    distinct text appears once, in first-seen order (see the module docstring for why).
    ``sources`` keeps only spans of those sources (``{"llm:ent"}``); ``None`` keeps all.
    """
    samples: dict[str, dict[str, None]] = {}
    for sentence, span in _entity_spans(sentences, prefix, sources):
        text = template.format(entity=sentence.span_text(span), type=span.label[len(prefix):])
        samples.setdefault(span.label, {})[text] = None
    return {label: list(texts) for label, texts in samples.items()}


def entity_label_counts(
    sentences: Iterable[Sentence], prefix: str = ENT_PREFIX, sources: Collection[str] | None = None
) -> dict[str, int]:
    """``{label: number of spans}``: the sample count that decides a group's reference."""
    return dict(Counter(span.label for _, span in _entity_spans(sentences, prefix, sources)))


def embed_samples(samples: Mapping[str, Sequence[str]], embedder: "SentenceEmbedder",
                  batch_size: int = 64) -> dict[str, np.ndarray]:
    """``{label: (n_label, d) vectors}``, embedding every distinct text once."""
    texts = list(dict.fromkeys(t for group in samples.values() for t in group))
    if not texts:
        return {}
    matrix = embedder.embed(texts, batch_size=batch_size)
    row = {text: i for i, text in enumerate(texts)}
    return {label: matrix[[row[t] for t in group]] for label, group in samples.items() if group}


# -- statistics ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelStats:
    """``size`` vectors, their mean ``centre`` (eq. 5) and mean radius (eq. 6)."""

    size: int
    centre: np.ndarray
    radius: float


def label_stats(vectors: np.ndarray, p: int = DEFAULT_P) -> LabelStats:
    """Centre = mean vector; radius = mean distance to the centre of the ``p`` farthest vectors
    (all of them when there are fewer than ``p``). Computed in float64."""
    if p < 1:
        raise ValueError(f"p must be at least 1, got {p}")
    points = np.asarray(vectors, dtype=np.float64)
    if points.ndim != 2 or len(points) == 0:
        raise ValueError(f"need a non-empty (n, d) array of vectors, got shape {points.shape}")
    centre = points.mean(axis=0)
    distances = np.linalg.norm(points - centre, axis=1)
    farthest = np.sort(distances)[::-1][:p]
    return LabelStats(size=len(points), centre=centre, radius=float(farthest.mean()))


# -- the label map ------------------------------------------------------------------------


@dataclass
class MergeDecision:
    """Why ``label`` became ``new_label``.

    ``role`` is ``reference`` (the group's reference set: merged by definition, distance 0) or
    ``member``. ``samples`` is the span count, ``vectors`` the distinct samples embedded;
    ``distance`` is ``||c_label - c_ref||`` and ``threshold`` is ``epsilon * r_ref``.
    """

    group: str
    label: str
    new_label: str
    role: str
    samples: int
    vectors: int
    radius: float
    distance: float
    threshold: float
    merged: bool
    note: str = ""


@dataclass
class LabelMap:
    """Old label -> new label, with the evidence for every decision.

    ``mapping`` holds every label a group decided about (unchanged ones map to themselves);
    labels absent from it keep their names. ``unknown`` lists proposed labels that have no
    samples (they cannot be checked, so they were ignored); ``conflicts`` explains labels that
    were proposed in more than one group (the first group wins) and renamed groups.
    """

    mapping: dict[str, str] = field(default_factory=dict)
    decisions: list[MergeDecision] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    #: The proposal as given (standard label -> labels), so a reader sees what was checked.
    proposal: dict[str, list[str]] = field(default_factory=dict)
    #: Problems of the proposal step (LLM errors, answers naming labels that do not exist).
    rejections: list[dict[str, str]] = field(default_factory=list)
    #: p, epsilon, template, proposer, embedder ...: enough to reproduce the run.
    settings: dict[str, Any] = field(default_factory=dict)

    def map_label(self, label: str) -> str:
        return self.mapping.get(label, label)

    def renamed(self) -> dict[str, str]:
        """Only the labels whose name changes."""
        return {old: new for old, new in self.mapping.items() if old != new}

    def merged_groups(self) -> dict[str, list[str]]:
        """``{new label: [old labels]}`` for every new label that more than one old label joined."""
        groups: dict[str, list[str]] = {}
        for old, new in self.mapping.items():
            groups.setdefault(new, []).append(old)
        return {new: olds for new, olds in groups.items() if len(olds) > 1}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": LABEL_MAP_FORMAT,
            "settings": self.settings,
            "mapping": self.mapping,
            "merged_groups": self.merged_groups(),  # derived; for the reader, ignored on load
            "decisions": [asdict(d) for d in self.decisions],
            "unknown": self.unknown,
            "conflicts": self.conflicts,
            "proposal": self.proposal,
            "rejections": self.rejections,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=2)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LabelMap":
        if data.get("format", LABEL_MAP_FORMAT) != LABEL_MAP_FORMAT:
            raise ValueError(f"label map format {data.get('format')!r} is not {LABEL_MAP_FORMAT}")
        return cls(
            mapping={str(k): str(v) for k, v in data.get("mapping", {}).items()},
            decisions=[MergeDecision(**d) for d in data.get("decisions", [])],
            unknown=[str(x) for x in data.get("unknown", [])],
            conflicts=[str(x) for x in data.get("conflicts", [])],
            proposal={str(k): [str(x) for x in v] for k, v in data.get("proposal", {}).items()},
            rejections=[dict(r) for r in data.get("rejections", [])],
            settings=dict(data.get("settings", {})),
        )

    @classmethod
    def from_json(cls, text: str) -> "LabelMap":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "LabelMap":
        return cls.from_json(Path(path).read_text(encoding="utf-8"))


# -- verification -------------------------------------------------------------------------


def _as_label(name: str, prefix: str) -> str:
    """Proposals may name labels with or without the prefix (the LLM sees bare types)."""
    name = " ".join(str(name).split())
    return name if name.startswith(prefix) else f"{prefix}{name}"


def _reference(members: Sequence[str], counts: Mapping[str, int], stats: Mapping[str, LabelStats]) -> str:
    # max() keeps the first of equal keys: a full tie goes to the member listed first.
    return max(members, key=lambda label: (counts[label], stats[label].radius))


def verify_groups(
    groups: Mapping[str, Sequence[str]],
    vectors: Mapping[str, np.ndarray],
    counts: Mapping[str, int] | None = None,
    p: int = DEFAULT_P,
    epsilon: float = DEFAULT_EPSILON,
    prefix: str = ENT_PREFIX,
) -> LabelMap:
    """Check proposed groups against the samples (the paper's epsilon rule).

    ``groups`` maps a standard label to its proposed synonyms, with or without ``prefix``.
    ``vectors[label]`` are the label's sample vectors and ``counts[label]`` its sample count
    (default: the number of vectors). The standard label joins its own group when it is a
    label with samples. Per group, the reference is the member with the most samples, ties
    broken by the larger radius, then by the order listed; it and every member that passes
    ``||c_j - c_ref|| <= epsilon * r_ref`` get the standard label's name, the others keep theirs.

    The new name would collide when the standard label is itself a label that does not end up
    in this group (it failed the check, or an earlier group claimed it) or an earlier group
    already gave that name: the merged labels then take the reference's own name instead, and
    ``conflicts`` says so.
    """
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    counts = {label: int(counts[label]) if counts and label in counts else len(v) for label, v in vectors.items()}
    stats = {label: label_stats(v, p) for label, v in vectors.items() if len(v)}
    result = LabelMap(
        proposal={str(k): [str(x) for x in v] for k, v in groups.items()},
        settings={"p": p, "epsilon": epsilon, "prefix": prefix},
    )
    claimed: dict[str, str] = {}  # label -> the group that decided it
    taken: set[str] = set()  # new names given by earlier groups
    unknown: dict[str, None] = {}
    for standard_name, proposed in groups.items():
        standard = _as_label(standard_name, prefix)
        members: list[str] = []
        for position, name in enumerate([standard, *proposed]):
            label = _as_label(name, prefix)
            if label in members:
                continue
            if label not in stats:
                # The standard label is a name, not necessarily a label: only listed ones count.
                if position > 0:
                    unknown[label] = None
                continue
            if label in claimed:
                result.conflicts.append(
                    f"{label} is proposed in groups {claimed[label]} and {standard}; kept in {claimed[label]}"
                )
                continue
            members.append(label)
        if not members:
            continue
        for label in members:
            claimed[label] = standard
        decisions = _decide_group(standard, members, counts, stats, epsilon, taken, result)
        taken.update(d.new_label for d in decisions if d.merged)
        result.decisions.extend(decisions)
    for decision in result.decisions:
        result.mapping[decision.label] = decision.new_label
    result.unknown = [label for label in unknown if label not in claimed]
    return result


def _decide_group(
    standard: str,
    members: Sequence[str],
    counts: Mapping[str, int],
    stats: Mapping[str, LabelStats],
    epsilon: float,
    taken: Collection[str],
    result: LabelMap,
) -> list[MergeDecision]:
    reference = _reference(members, counts, stats)
    ref = stats[reference]
    threshold = epsilon * ref.radius
    decisions = [
        MergeDecision(
            group=standard, label=reference, new_label=standard, role="reference",
            samples=counts[reference], vectors=ref.size, radius=ref.radius,
            distance=0.0, threshold=threshold, merged=True,
        )
    ]
    for label in members:
        if label == reference:
            continue
        own = stats[label]
        distance = float(np.linalg.norm(own.centre - ref.centre))
        merged = distance <= threshold + _BOUNDARY_SLACK * max(1.0, threshold)
        decisions.append(
            MergeDecision(
                group=standard, label=label, new_label=standard if merged else label, role="member",
                samples=counts[label], vectors=own.size, radius=own.radius,
                distance=distance, threshold=threshold, merged=merged,
            )
        )
    # The standard name must not end up meaning two things (see verify_groups): it is free
    # unless it is a label kept out of this group or an earlier group already took it.
    why = ""
    if standard in taken:
        why = "is already the name of an earlier group"
    elif standard in stats and not any(d.label == standard and d.merged for d in decisions):
        why = "is not in this group" if standard not in members else "failed the check"
    if why:
        result.conflicts.append(
            f"group {standard}: the label {standard} {why}, so the merged labels are named {reference}"
        )
        for decision in decisions:
            if decision.merged:
                decision.new_label = reference
                decision.note = f"named {reference}: {standard} {why}"
    return decisions


# -- applying a map -----------------------------------------------------------------------


def apply_label_map(
    sentences: Iterable[Sentence], label_map: LabelMap | Mapping[str, str],
    sources: Collection[str] | None = None,
) -> list[Sentence]:
    """New sentences whose extension labels are renamed by ``label_map``; a span that becomes an
    exact duplicate (same start, end, label and source) of an earlier one is dropped. Only spans
    of ``sources`` are renamed when given. The input sentences are not changed."""
    mapping = label_map.mapping if isinstance(label_map, LabelMap) else dict(label_map)
    out: list[Sentence] = []
    for sentence in sentences:
        spans: dict[ExtensionSpan, None] = {}
        for span in sentence.extension_spans:
            if span.label in mapping and (sources is None or span.source in sources):
                span = replace(span, label=mapping[span.label])
            spans.setdefault(span, None)
        out.append(replace(sentence, extension_spans=list(spans), spans=list(sentence.spans), units=list(sentence.units)))
    return out


# -- proposals: LLM -----------------------------------------------------------------------


def propose_groups_llm(
    engine: "LLMEngine | EngineConfig | dict",
    labels: Iterable[str],
    language: str = "zh",
    prompts_dir: str | Path | None = None,
    cache: "AnswerCache | str | Path | None" = None,
    params: "GenerationParams | dict | None" = None,
    batch: int = 200,
    prefix: str = ENT_PREFIX,
) -> tuple[dict[str, list[str]], list[Rejection]]:
    """Ask the LLM (prompt P_merge, eq. 2) which labels are synonyms.

    The model sees the types without ``prefix``, ``batch`` labels per prompt (sorted, so a
    rerun asks the same prompts and hits the answer cache). Groups with the same standard label
    from different prompts are joined, but the model only compares the labels of one prompt.
    Returns ``({standard label: [labels]}, rejections)`` with every name prefixed;
    synonyms that are not among ``labels`` are dropped and reported, as are labels the answer
    left out (those simply keep their names). An engine built here from a config is closed here.
    """
    from knowfree_core.llm.annotator import step_schema
    from knowfree_core.llm.cache import AnswerCache, generate_cached
    from knowfree_core.llm.engine import EngineConfig, GenerationParams, LLMEngine, build_engine
    from knowfree_core.llm.parsing import parse_merge_groups
    from knowfree_core.prompts import load_prompt

    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    real = sorted({_as_label(label, prefix) for label in labels})
    if not real:
        return {}, []
    template = load_prompt("merge", language, prompts_dir)
    if isinstance(params, dict):
        params = GenerationParams(**params)
    # A grouping of 200 labels runs to thousands of tokens; the engine default (512) would cut it.
    params = params or GenerationParams(max_tokens=8192)
    if isinstance(cache, (str, Path)):
        cache = AnswerCache(cache)
    if isinstance(engine, dict):
        engine = EngineConfig(**engine)
    owned = not isinstance(engine, LLMEngine)
    # With structured outputs the groups come as P_merge's schema says ({groups: [...]}).
    config = engine if owned else engine.config
    schema = step_schema(template) if config.structured_outputs else None
    llm: LLMEngine = build_engine(engine) if owned else engine

    chunks = [real[i:i + batch] for i in range(0, len(real), batch)]
    prompts = [template.render(labels=[label[len(prefix):] for label in chunk]) for chunk in chunks]
    try:
        answers = generate_cached(llm, cache, prompts, params, template.version, schema)
    finally:
        if owned:
            llm.close()

    known = set(real)
    groups: dict[str, list[str]] = {}
    rejections: list[Rejection] = []
    for chunk, answer in zip(chunks, answers):
        if not answer.ok:
            rejections.append(Rejection(REASON_ENGINE_ERROR, str(answer.error), MERGE_STEP))
            continue
        parsed = parse_merge_groups(answer.text)
        rejections.extend(Rejection(r.reason, r.detail, MERGE_STEP) for r in parsed.rejections)
        if parsed.error is not None:
            if not any(r.reason == parsed.error for r in parsed.rejections):
                rejections.append(Rejection(REASON_UNPARSABLE, parsed.error, MERGE_STEP))
            continue
        mentioned: set[str] = set()
        for standard, synonyms in parsed.items.items():
            group = groups.setdefault(_as_label(standard, prefix), [])
            for name in synonyms:
                label = _as_label(name, prefix)
                if label not in known:
                    rejections.append(Rejection(REASON_NOT_A_LABEL, f"group {standard!r}: {name!r}", MERGE_STEP))
                elif label not in group:
                    group.append(label)
                    mentioned.add(label)
        rejections.extend(
            Rejection(REASON_OMITTED, label, MERGE_STEP) for label in chunk
            if label not in mentioned and _as_label(label, prefix) not in groups
        )
    # A standard name that keeps no real synonym and is no label itself proposes nothing.
    return {s: g for s, g in groups.items() if g or s in known}, rejections


# -- proposals: FAISS ---------------------------------------------------------------------


def faiss_backend() -> str:
    """``"gpu"`` when the installed faiss is a GPU build and sees a GPU, else ``"cpu"``.
    faiss-cpu has no ``StandardGpuResources``, so both are checked."""
    import faiss

    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        return "gpu"
    return "cpu"


#: GPU flat search handles at most this k (faiss's GPU k-selection limit).
_GPU_MAX_K = 2048


def _flat_index(dimension: int, backend: str) -> Any:
    import faiss

    index = faiss.IndexFlatL2(dimension)
    if backend == "gpu":
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    return index


def _neighbour_pairs(x: np.ndarray, threshold: float | None, k: int | None, backend: str) -> list[tuple[int, int]]:
    """Pairs (i, j), i != j, with j among i's ``k`` nearest and/or within ``threshold`` (L2)."""
    n = len(x)
    index = _flat_index(x.shape[1], backend)
    index.add(x)
    pairs: list[tuple[int, int]] = []
    limit = None if threshold is None else threshold * threshold  # IndexFlatL2 works in squared L2
    if k is None and backend == "cpu":
        # range_search keeps distances strictly below the radius; the rule here is "<=", and
        # the slack also keeps identical centres linked when the threshold is 0.
        assert limit is not None
        lims, _, ids = index.range_search(x, float(limit) * (1 + 1e-6) + 1e-12)
        for i in range(n):
            pairs.extend((i, int(j)) for j in ids[lims[i]:lims[i + 1]] if j != i)
        return pairs
    # kNN (on GPU also for a threshold alone: GPU flat indexes have no range search).
    want = n if k is None else k + 1  # +1: each point finds itself first
    want = min(want, n, _GPU_MAX_K if backend == "gpu" else n)
    distances, ids = index.search(x, want)
    for i in range(n):
        for distance, j in zip(distances[i], ids[i]):
            if j >= 0 and j != i and (limit is None or distance <= limit):
                pairs.append((i, int(j)))
    return pairs


def _components(n: int, pairs: Iterable[tuple[int, int]]) -> list[list[int]]:
    """The connected components of the graph on ``0..n-1`` with edges ``pairs``."""
    # scipy comes with the merge extra (sentence-transformers and scikit-learn need it).
    from scipy.sparse import coo_array
    from scipy.sparse.csgraph import connected_components

    edges = np.asarray(list(pairs), dtype=np.int64).reshape(-1, 2)
    graph = coo_array((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    groups: dict[int, list[int]] = {}
    for i, c in enumerate(component.tolist()):
        groups.setdefault(c, []).append(i)
    return list(groups.values())


def _kmeans_clusters(x: np.ndarray, n_clusters: int, seed: int, backend: str) -> list[list[int]]:
    import faiss

    n_clusters = max(1, min(n_clusters, len(x)))
    # Spherical: the directions of the centres carry the meaning; their lengths only say how
    # spread a label is (a mean of unit vectors is shorter the wider its samples scatter).
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    kmeans = faiss.Kmeans(unit.shape[1], n_clusters, niter=25, seed=seed, spherical=True,
                          gpu=backend == "gpu", verbose=False)
    # faiss warns below 39 points per centroid; label sets are small and that is fine here.
    kmeans.cp.min_points_per_centroid = 1
    kmeans.train(unit)
    _, assignment = kmeans.index.search(unit, 1)
    clusters: dict[int, list[int]] = {}
    for i, cluster in enumerate(assignment[:, 0]):
        clusters.setdefault(int(cluster), []).append(i)
    return list(clusters.values())


def propose_groups_faiss(
    centres: Mapping[str, np.ndarray],
    threshold: float | None = None,
    k: int | None = None,
    counts: Mapping[str, int] | None = None,
    method: str = "graph",
    n_clusters: int | None = None,
    seed: int = 0,
) -> dict[str, list[str]]:
    """Group labels whose centres are close, without an LLM.

    ``method="graph"``: labels are linked when one is within ``threshold`` (L2) of the other
    and/or among its ``k`` nearest; groups are the connected components. Linking is transitive,
    so a chain A~B~C lands in one group even if A and C are far apart: the epsilon check of
    :func:`verify_groups` then keeps such members apart. ``method="kmeans"``: spherical k-means
    into ``n_clusters`` clusters (for large label sets; default ``sqrt(n)``).

    Each group of two or more labels is keyed by its member with the most samples (``counts``;
    ties and no counts: the first in input order). Runs on the GPU when faiss can (see
    :func:`faiss_backend`).
    """
    labels = list(centres)
    if len(labels) < 2:
        return {}
    x = np.ascontiguousarray(np.stack([np.asarray(centres[label], dtype=np.float32) for label in labels]))
    backend = faiss_backend()
    if method == "graph":
        if threshold is None and k is None:
            raise ValueError("propose_groups_faiss: give threshold, k or both")
        clusters = _components(len(labels), _neighbour_pairs(x, threshold, k, backend))
    elif method == "kmeans":
        count = n_clusters or max(1, int(round(np.sqrt(len(labels)))))
        clusters = _kmeans_clusters(x, count, seed, backend)
    else:
        raise ValueError(f"unknown method {method!r}; use 'graph' or 'kmeans'")
    groups: dict[str, list[str]] = {}
    for cluster in sorted(clusters, key=min):
        if len(cluster) < 2:
            continue
        members = [labels[i] for i in sorted(cluster)]
        standard = max(members, key=lambda label: counts.get(label, 0) if counts else 0)
        groups[standard] = members
    return groups


# -- the whole chain ----------------------------------------------------------------------


#: The no-LLM fallback links label centres closer than this fraction of the median radius.
FAISS_LINK_FRACTION = 0.5


def merge_labels(
    sentences: Sequence[Sentence],
    embedder: "SentenceEmbedder | None",
    groups: Mapping[str, Sequence[str]] | None = None,
    engine: "LLMEngine | EngineConfig | dict | None" = None,
    *,
    p: int = DEFAULT_P,
    epsilon: float = DEFAULT_EPSILON,
    template: str = DEFAULT_TEMPLATE,
    prefix: str = ENT_PREFIX,
    sources: Collection[str] | None = None,
    language: str = "zh",
    prompts_dir: str | Path | None = None,
    cache: "AnswerCache | str | Path | None" = None,
    params: "GenerationParams | dict | None" = None,
    llm_batch: int = 200,
    faiss_threshold: float | None = None,
    faiss_k: int | None = None,
    faiss_method: str = "graph",
    faiss_clusters: int | None = None,
    batch_size: int = 64,
    vectors: Mapping[str, np.ndarray] | None = None,
) -> tuple[list[Sentence], LabelMap]:
    """Merge synonymous ``prefix`` labels of ``sentences``; returns the rewritten sentences and
    the :class:`LabelMap`.

    Groups come from ``groups`` when given, else from the LLM ``engine`` (P_merge), else from
    FAISS over the label centres. The FAISS default links centres closer than
    ``FAISS_LINK_FRACTION`` times the median label radius (a conservative heuristic, see the
    comment below); the epsilon check then decides each member exactly as for LLM groups.

    ``vectors`` (label → its samples' embeddings) replaces ``embedder`` when the caller has
    embedded the samples itself (the Ray job does, in an actor pool).
    """
    counts = entity_label_counts(sentences, prefix, sources)
    if vectors is None:
        if embedder is None:
            raise ValueError("merge_labels needs an embedder or precomputed vectors")
        samples = entity_label_samples(sentences, prefix, template, sources)
        vectors = embed_samples(samples, embedder, batch_size=batch_size)
    rejections: list[Rejection] = []
    settings: dict[str, Any] = {"template": template, "embedder": getattr(embedder, "name", type(embedder).__name__)}
    if groups is not None:
        settings["proposer"] = "given"
    elif engine is not None:
        groups, rejections = propose_groups_llm(
            engine, list(vectors), language, prompts_dir, cache, params, llm_batch, prefix
        )
        settings.update(proposer="llm", language=language)
    else:
        stats = {label: label_stats(v, p) for label, v in vectors.items()}
        if faiss_method == "graph" and faiss_threshold is None and faiss_k is None:
            spread = [s.radius for s in stats.values() if s.size > 1]
            # Conservative on purpose: measured with the offline e5 on LAC's PER/LOC/ORG/TIME,
            # distinct types' centres lie only ~1.1-1.5 radii apart ("X is Y" samples share
            # most of their text), so epsilon * radius would link unrelated types. Without an
            # LLM's proposal only near-identical centres are linked.
            faiss_threshold = FAISS_LINK_FRACTION * float(np.median(spread)) if spread else 0.0
        groups = propose_groups_faiss(
            {label: s.centre for label, s in stats.items()}, faiss_threshold, faiss_k, counts,
            method=faiss_method, n_clusters=faiss_clusters,
        )
        settings.update(proposer=f"faiss-{faiss_method}", faiss_threshold=faiss_threshold, faiss_k=faiss_k,
                        faiss_clusters=faiss_clusters)
    label_map = verify_groups(groups, vectors, counts, p=p, epsilon=epsilon, prefix=prefix)
    label_map.settings = {**label_map.settings, **settings}
    label_map.rejections = [r._asdict() for r in rejections]
    return apply_label_map(sentences, label_map, sources), label_map
