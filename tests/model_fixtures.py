"""Tiny, learnable corpora and a random encoder for model tests.

The corpus is templated so that a 2-layer random encoder learns it in seconds: names are
PER, cities LOC, and a few sentences carry extension spans (SEG/POS) like the offline
annotators would add.
"""

from __future__ import annotations

import random
from pathlib import Path

from knowfree_core.encoders.unit_encoder import build_random_encoder
from knowfree_core.records import ExtensionSpan, Sentence, Span

NAMES = ["张三", "李四", "王五", "赵六", "孙七", "周八"]
CITIES = ["北京", "上海", "广州", "深圳", "成都", "杭州"]
TEMPLATES = ["{p}在{c}工作。", "{p}去了{c}。", "我和{p}住在{c}", "{c}欢迎{p}"]


def tiny_corpus(count: int, seed: int, prefix: str = "s", with_extensions: bool = True) -> list[Sentence]:
    rng = random.Random(seed)
    sentences = []
    for index in range(count):
        person, city = rng.choice(NAMES), rng.choice(CITIES)
        text = rng.choice(TEMPLATES).format(p=person, c=city)
        spans = []
        for word, label in ((person, "PER"), (city, "LOC")):
            start = text.index(word)
            spans.append(Span(start, start + len(word), label))
        extensions = []
        if with_extensions:
            for span in spans:
                extensions.append(ExtensionSpan(span.start, span.end, "SEG", "test:seg"))
                extensions.append(ExtensionSpan(span.start, span.end, "POS-n", "test:pos"))
        sentences.append(
            Sentence(id=f"{prefix}{index}", units=list(text), spans=sorted(spans), extension_spans=extensions)
        )
    return sentences


def corpus_characters() -> str:
    return "".join(NAMES + CITIES + TEMPLATES) + "{}。，"


def make_random_encoder(directory: Path) -> Path:
    return build_random_encoder(directory, corpus_characters(), hidden=32, layers=2, heads=2,
                                max_position_embeddings=64, seed=0)


def build_tiny_model(encoder_dir: Path, train: list[Sentence]):
    """A small KnowFREE model on the random encoder, seeded: the same weights every call."""
    from knowfree_core.config import EncoderConfig, ModelConfig
    from knowfree_core.labels import LabelVocab
    from knowfree_core.model.knowfree import KnowFreeModel
    from knowfree_core.training import seed_everything

    seed_everything(5)
    return KnowFreeModel.build(
        EncoderConfig(name=str(encoder_dir), unit_mode="char"),
        ModelConfig(ffn_size=40, grid_size=40, biaffine_heads=2, attn_heads=4, dropout=0.1),
        LabelVocab.from_sentences(train),
    )


def tiny_run_config(root: Path, **train: object) -> dict:
    """Files for a tiny run in ``root`` (train/dev/test JSONL, a random encoder) and the
    ``knowfree train`` config dict that uses them; ``train`` overrides train.* keys."""
    from knowfree_core.formats import write_dataset

    write_dataset(tiny_corpus(20, seed=1), root / "train.jsonl")
    write_dataset(tiny_corpus(8, seed=2, prefix="d", with_extensions=False), root / "dev.jsonl")
    write_dataset(tiny_corpus(8, seed=3, prefix="t", with_extensions=False), root / "test.jsonl")
    return {
        "data": {"train": str(root / "train.jsonl"), "dev": str(root / "dev.jsonl"), "test": str(root / "test.jsonl")},
        "encoder": {"name": str(make_random_encoder(root / "encoder")), "unit_mode": "char"},
        "model": {"ffn_size": 40, "grid_size": 40, "biaffine_heads": 2, "attn_heads": 4},
        "train": {"epochs": 3, "batch_size": 4, "seed": 3, "device": "cpu", "threshold_candidates": [0.3, 0.5],
                  **train},
    }


def tiny_quality_config(root: Path, seeds: list[int], variants: list[str]) -> Path:
    """A quality-harness config (bench/quality.yaml's shape) for one tiny dataset of 10-sentence
    cells, trained 1 epoch; results in ``root/results.jsonl``, cells in ``root/runs``."""
    import yaml

    train = tiny_run_config(root, epochs=1, num_threads=1)
    (root / "train.yaml").write_text(yaml.safe_dump(train, allow_unicode=True), encoding="utf-8")
    config = {
        "results": str(root / "results.jsonl"), "runs_dir": str(root / "runs"),
        "paper_results": str(Path(__file__).resolve().parents[1] / "bench" / "paper_results.yaml"),
        "datasets": {"tiny": {"paper_name": "Weibo", "train_config": str(root / "train.yaml"),
                              "train_resources": {"num_cpus": 1},
                              "subset_sizes": [10], "seeds": seeds, "variants": variants}},
    }
    path = root / "quality.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def joined_corpus(count: int, seed: int, prefix: str = "j", most: int = 4) -> list[Sentence]:
    """Templated sentences joined 1..``most`` at a time into one (no extension spans): a model
    trained on them labels a window holding several sentences as well as one alone."""
    rng = random.Random(seed)
    parts = tiny_corpus(count * most, seed=seed, with_extensions=False)
    joined = []
    for index in range(count):
        units: list[str] = []
        spans = []
        for part in (parts.pop() for _ in range(rng.randint(1, most))):
            spans += [Span(s.start + len(units), s.end + len(units), s.label) for s in part.spans]
            units += part.units
        joined.append(Sentence(id=f"{prefix}{index}", units=units, spans=spans))
    return joined


def save_trained_tiny_model(root: Path, epochs: int = 20) -> Path:
    """A tiny model trained on :func:`joined_corpus` until it labels names and cities in
    text of any length, saved in ``root/model`` (its encoder in ``root/encoder``; the
    encoder's window is 62 units)."""
    from knowfree_core.config import TrainConfig
    from knowfree_core.training import fit

    train = joined_corpus(60, seed=1)
    model = build_tiny_model(make_random_encoder(root / "encoder"), train)
    fit(model, train, None, TrainConfig(epochs=epochs, batch_size=8, encoder_lr=1e-3, head_lr=3e-3, warmup_ratio=0.0,
                                        seed=13), progress=False)
    return model.save_pretrained(root / "model")
