"""Synonym extension-label merging (paper §3.1) as a Ray job.

    python -m jobs.merge_labels --config configs/merge-weibo.yaml [--set key=value ...]

reads sentences with ``ENT-*`` extension labels (``annotated.jsonl`` of ``jobs.annotate``)
→ "[entity] is [type]" samples per label → sentence embeddings in a Ray Data actor pool →
groups proposed by an LLM (P_merge), read from a file, or from FAISS over the label centres
→ each group checked with the centre/radius rule (||c_j − c_max|| ≤ ε·r_max, p farthest) →
``label_map.json`` (every decision with its evidence) and ``merged.jsonl`` (the sentences
with rewritten labels, what ``knowfree train`` reads).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Literal, Optional

import numpy as np
from omegaconf import MISSING

from .actor_pool import ActorPool, map_with_actor_pool
from .annotate import LLMSettings
from .cli import MERGE_LABELS
from .common import RayConfig, init_ray, write_summary
from knowfree_core import commandline
from knowfree_core.bounds import COUNT, NON_NEGATIVE, check_bounds
from knowfree_core.config import load_structured
from knowfree_core.errors import ConfigError
from knowfree_core.formats import read_dataset, write_dataset
from knowfree_core.merging import DEFAULT_TEMPLATE, entity_label_samples, merge_labels

logger = logging.getLogger("jobs.merge_labels")


@dataclass
class MergeSettings:
    """Every jobs.merge_labels setting but where the sentences come from and go to: a
    pipeline's ``merge:`` section is this schema."""

    format: Optional[str] = None
    #: llm (P_merge), file (``groups_file``: {standard: [synonyms]}) or faiss (no LLM).
    proposer: Literal["llm", "file", "faiss"] = "faiss"
    groups_file: Optional[str] = None
    llm: LLMSettings = field(default_factory=LLMSettings)
    embedder: str = "offline-e5"  # or any sentence-transformers model name/path
    embedder_prefix: Optional[str] = None
    template: str = DEFAULT_TEMPLATE
    p: int = 5
    epsilon: float = 1.5
    sources: Optional[List[str]] = None  # only spans of these sources (e.g. [llm:ent])
    faiss_method: Literal["graph", "kmeans"] = "graph"  # graph (threshold/k links) or kmeans
    faiss_threshold: Optional[float] = None
    faiss_k: Optional[int] = None
    faiss_clusters: Optional[int] = None
    #: The embedding actors (one sentence-embedding model each).
    pool: ActorPool = field(default_factory=lambda: ActorPool(num_actors=1, batch_size=256))

    def __post_init__(self) -> None:
        check_bounds("", self, {"p": COUNT, "faiss_k": COUNT, "faiss_clusters": COUNT, "epsilon": NON_NEGATIVE})


@dataclass
class MergeJobConfig(MergeSettings):
    """The job's config file: the settings plus the input file, the output folder and Ray."""

    input: str = MISSING
    output_dir: str = MISSING
    ray: RayConfig = field(default_factory=RayConfig)


class EmbedActor:
    """Holds one sentence-embedding model; embeds Arrow batches of ``text``."""

    def __init__(self, name: str, prefix: Optional[str], device: Optional[str]):
        from knowfree_core.embeddings import load_embedder

        self.embedder = load_embedder(name, device=device, prefix=prefix)

    def __call__(self, table):
        import pyarrow as pa

        texts = table.column("text").to_pylist()
        vectors = self.embedder.embed(texts)
        return table.append_column("vector", pa.array(list(vectors), type=pa.list_(pa.float32())))


def embed_with_ray(samples: Dict[str, List[str]], config: MergeJobConfig) -> Dict[str, np.ndarray]:
    import ray

    rows = [{"label": label, "text": text} for label, texts in samples.items() for text in texts]
    if not rows:
        return {}
    pool = config.pool
    # In-memory input, nothing to resume: clear a checkpoint config an earlier stage set.
    ray.data.DataContext.get_current().checkpoint_config = None
    dataset = ray.data.from_items(rows).repartition(max(1, min(len(rows) // pool.batch_size, 4 * pool.num_actors)))
    device = "cuda" if pool.gpus_per_actor else "cpu"
    dataset = map_with_actor_pool(
        dataset, EmbedActor, {"name": config.embedder, "prefix": config.embedder_prefix, "device": device}, pool
    )
    grouped: Dict[str, List[np.ndarray]] = {}
    for row in dataset.iter_rows():
        grouped.setdefault(row["label"], []).append(np.asarray(row["vector"], dtype=np.float32))
    return {label: np.stack(vectors) for label, vectors in grouped.items()}


def run_merge(config: MergeJobConfig) -> dict:
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    sentences = read_dataset(config.input, format=config.format)
    sources = set(config.sources) if config.sources else None
    samples = entity_label_samples(sentences, template=config.template, sources=sources)
    if not samples:
        raise ConfigError(f"{config.input}: no ENT-* extension labels to merge (run jobs.annotate with step ent)")
    logger.info("%d entity labels, %d distinct samples", len(samples), sum(map(len, samples.values())))

    init_ray(config.ray, min_cpus=config.pool.cpu_slots(), settings="pool.num_actors or pool.cpus_per_actor")
    vectors = embed_with_ray(samples, config)

    groups = None
    engine = None
    if config.proposer == "file":
        if not config.groups_file:
            raise ConfigError("proposer=file needs groups_file")
        groups = json.loads(Path(config.groups_file).read_text(encoding="utf-8"))
    elif config.proposer == "llm":
        engine = asdict(config.llm.engine)
    merged, label_map = merge_labels(
        sentences,
        None,
        groups=groups,
        engine=engine,
        p=config.p,
        epsilon=config.epsilon,
        template=config.template,
        sources=sources,
        language=config.llm.language,
        prompts_dir=config.llm.prompts_dir,
        cache=config.llm.cache or str(out.resolve() / "answers.sqlite"),
        params=asdict(config.llm.generation) if config.proposer == "llm" else None,
        faiss_threshold=config.faiss_threshold,
        faiss_k=config.faiss_k,
        faiss_method=config.faiss_method,
        faiss_clusters=config.faiss_clusters,
        vectors=vectors,
    )
    label_map.settings = {**label_map.settings, "embedder": config.embedder, "p": config.p, "epsilon": config.epsilon}
    label_map.save(out / "label_map.json")
    write_dataset(merged, out / "merged.jsonl")

    before = Counter(s.label for x in sentences for s in x.extension_spans if s.label.startswith("ENT-"))
    after = Counter(s.label for x in merged for s in x.extension_spans if s.label.startswith("ENT-"))
    summary = {
        "sentences": len(merged),
        "entity_labels_before": len(before),
        "entity_labels_after": len(after),
        "renamed": label_map.renamed(),
        "merged_groups": label_map.merged_groups(),
        "proposer": config.proposer,
        "label_map": str(out / "label_map.json"),
        "merged": str(out / "merged.jsonl"),
    }
    write_summary(out / "summary.json", summary)
    print(f"entity labels: {len(before)} -> {len(after)}")
    for new, old in sorted(summary["merged_groups"].items()):
        print(f"  {new} <- {', '.join(old)}")
    print(f"label map: {out / 'label_map.json'}\nmerged sentences: {out / 'merged.jsonl'}")
    return summary


#: ``python -m jobs.merge_labels`` in this process (its options: jobs/cli.py); a user error is raised.
main = MERGE_LABELS.run


if __name__ == "__main__":
    raise SystemExit(commandline.main(MERGE_LABELS))
