"""Shrink an encoder's vocabulary to the pieces a corpus uses.

multilingual-e5-small is 118M parameters, of which 96M are the 250k-piece word-embedding
table; a Chinese corpus touches a few thousand pieces. Pruning keeps the transformer intact
and drops the rows nothing will look up, so the model fits where size matters (a 64 MiB
transfer to a GPU machine, a container image): 12 layers in fp16 are about 42 MB.

The pruned tokenizer keeps the original pieces and scores for what it keeps; text made of
the kept pieces tokenizes exactly as before, anything else falls back to ``<unk>``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import torch
from safetensors.torch import load_file, save_file

from .units import UnitTokenizer

WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"


def used_piece_ids(tokenizer, corpus_units: Iterable[Sequence[str]], mode: str = "char") -> set[int]:
    """Every piece id the unit tokenizer produces for the corpus, plus the special pieces."""
    units_tokenizer = UnitTokenizer(tokenizer, mode=mode)
    used: set[int] = set(tokenizer.all_special_ids)
    metaspace = tokenizer.convert_tokens_to_ids("\u2581")
    if isinstance(metaspace, int) and metaspace != tokenizer.unk_token_id:
        used.add(metaspace)
    for units in corpus_units:
        for pieces in units_tokenizer.unit_pieces(units):
            used.update(pieces.ids)
    return used


def _remap_tokenizer_json(data: dict, kept: list[int]) -> dict:
    new_id = {old: new for new, old in enumerate(kept)}
    model = data["model"]
    if model.get("type") != "Unigram":
        raise ValueError(f"only Unigram tokenizers can be pruned, got {model.get('type')}")
    vocab = model["vocab"]
    model["vocab"] = [vocab[old] for old in kept if old < len(vocab)]
    model["unk_id"] = new_id[model["unk_id"]]
    for token in data.get("added_tokens", []):
        token["id"] = new_id[token["id"]]
    special = (data.get("post_processor") or {}).get("special_tokens", {})
    for entry in special.values():
        entry["ids"] = [new_id[i] for i in entry["ids"]]
    return data


def prune_encoder(
    source: str | Path,
    corpus_units: Iterable[Sequence[str]],
    out_dir: str | Path,
    mode: str = "char",
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write a copy of the transformers encoder in ``source`` keeping only the used pieces.

    Returns the output folder; its ``pruning.json`` records the sizes before and after.
    """
    from transformers import AutoTokenizer

    source, out = Path(source), Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(source)
    kept = sorted(used_piece_ids(tokenizer, corpus_units, mode))
    out.mkdir(parents=True, exist_ok=True)

    data = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    original_pieces = len(data["model"]["vocab"])
    data = _remap_tokenizer_json(data, kept)
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)

    state = load_file(str(source / "model.safetensors"))
    state[WORD_EMBEDDINGS] = state[WORD_EMBEDDINGS][kept]
    save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, str(out / "model.safetensors"))

    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    new_id = {old: new for new, old in enumerate(kept)}
    config["vocab_size"] = len(kept)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if config.get(key) is not None:
            config[key] = new_id[config[key]]
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (out / "pruning.json").write_text(
        json.dumps({"source": str(source), "pieces_before": original_pieces, "pieces_after": len(kept),
                    "dtype": str(dtype).removeprefix("torch.")}, indent=2),
        encoding="utf-8",
    )
    return out
