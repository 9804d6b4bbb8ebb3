"""jobs.merge_labels on a local Ray cluster: samples embedded by the offline e5 in an actor
pool, proposed groups checked by the centre/radius rule, labels rewritten."""

from __future__ import annotations

import json

import pytest

from knowfree_core.formats import read_dataset, write_dataset
from knowfree_core.records import ExtensionSpan, Sentence

pytest.importorskip("ray")
pytest.importorskip("sentence_transformers")
from jobs.merge_labels import MergeJobConfig, run_merge  # noqa: E402
from knowfree_core.config import load_structured  # noqa: E402


def _sentence(i, text, *spans):
    return Sentence(id=str(i), units=list(text), extension_spans=[ExtensionSpan(*s, "llm:ent") for s in spans])


def test_merge_job_rewrites_labels_and_keeps_the_evidence(ray_cluster, tmp_path):
    corpus = [
        _sentence(1, "北京大学在北京", (0, 4, "ENT-组织机构"), (5, 7, "ENT-地点")),
        _sentence(2, "清华大学在海淀", (0, 4, "ENT-机构"), (5, 7, "ENT-地点")),
        _sentence(3, "复旦大学在上海", (0, 4, "ENT-组织机构"), (5, 7, "ENT-地名")),
    ]
    write_dataset(corpus, tmp_path / "annotated.jsonl")
    (tmp_path / "groups.json").write_text(json.dumps({"组织机构": ["机构"], "地点": ["地名"]}, ensure_ascii=False))
    config = load_structured(MergeJobConfig, None, [
        f"input={tmp_path / 'annotated.jsonl'}", f"output_dir={tmp_path / 'merge'}", "proposer=file",
        f"groups_file={tmp_path / 'groups.json'}", "pool.cpus_per_actor=0.5",
        # two samples per label: radii are tiny, so a loose epsilon shows the merge path; the
        # rule itself is covered exactly in test_merging.py
        "epsilon=50",
    ])
    summary = run_merge(config)
    assert summary["renamed"] == {"ENT-机构": "ENT-组织机构", "ENT-地名": "ENT-地点"}
    merged = read_dataset(tmp_path / "merge" / "merged.jsonl")
    assert {s.label for x in merged for s in x.extension_spans} == {"ENT-组织机构", "ENT-地点"}
    evidence = json.loads((tmp_path / "merge" / "label_map.json").read_text(encoding="utf-8"))
    decisions = {d["label"]: d for d in evidence["decisions"]}
    assert decisions["ENT-机构"]["merged"] and decisions["ENT-机构"]["distance"] > 0
    assert evidence["settings"]["embedder"] == "offline-e5"
