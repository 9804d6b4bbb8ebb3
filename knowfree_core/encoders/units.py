"""From sentences of units to encoder inputs, and from piece vectors back to unit vectors.

A sentence is a list of *units* (characters for Chinese, whitespace tokens for English). The
encoder sees sub-word pieces; this module decides which pieces stand for which unit.

Unit modes
    ``"char"``: every character becomes exactly one piece: the piece of the (normalised) bare
    character if the vocabulary has it, else ``▁`` + character, else the first piece the tokenizer
    produces for it, else ``<unk>``. One piece per unit keeps sequences short and makes piece and
    unit positions identical.
    ``"word"``: every word is tokenized on its own with the metaspace prefix (as
    ``is_split_into_words`` does) and keeps all its pieces. A leading bare ``▁`` piece, which
    the unigram model emits before many CJK words, stays in the input but is not pooled:
    it carries no information about the word.

Long sentences: sliding windows
    A sentence whose pieces exceed the window (``max_length`` minus the special tokens) is cut
    into overlapping windows, each encoded as an ordinary input ``<s> ... </s>``. Windows start
    every ``stride`` pieces (default: half a window), always at unit boundaries, and the last
    window is pulled back to end exactly at the sentence end so it is full. Each unit takes its
    vector from the window in which it is most central (largest distance to the window's
    nearer edge; the earlier window on ties), so every unit sees at least a quarter window of
    context on each side wherever the sentence allows. Nothing is truncated; only a single unit
    longer than a whole window (hundreds of pieces) is clipped to the window. A window is
    encoded exactly like a sentence made of its units, which is what the tests check.

Pooling from pieces to units: ``"first"``, ``"max"`` or ``"mean"``.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

METASPACE = "\u2581"
UnitMode = Literal["char", "word"]
Pooling = Literal["first", "max", "mean"]
UNIT_MODES: tuple[str, ...] = ("char", "word")
POOLINGS: tuple[str, ...] = ("first", "max", "mean")


def unit_mode_for_joiner(joiner: str) -> UnitMode:
    """``""`` (units are characters) → ``"char"``; anything else (``" "``) → ``"word"``."""
    return "char" if joiner == "" else "word"


@dataclass(frozen=True)
class UnitPieces:
    """The pieces fed for one unit and which of them are pooled (``ids[pool_start:]``)."""

    ids: tuple[int, ...]
    pool_start: int = 0


def plan_windows(piece_counts: Sequence[int], window: int, stride: int) -> list[tuple[int, int]]:
    """Unit ranges ``[start, end)`` of the windows covering a sentence (see module docstring)."""
    n = len(piece_counts)
    offsets = [0]
    for count in piece_counts:
        offsets.append(offsets[-1] + count)
    if offsets[-1] <= window:
        return [(0, n)]
    windows: list[tuple[int, int]] = []
    start = 0
    while True:
        # Largest end with offsets[end] - offsets[start] <= window, but never an empty window.
        end = max(start + 1, bisect.bisect_right(offsets, offsets[start] + window) - 1)
        if end >= n:
            while start > 0 and offsets[n] - offsets[start - 1] <= window:
                start -= 1  # a full last window gives the tail more left context
            windows.append((start, n))
            return windows
        windows.append((start, end))
        next_start = bisect.bisect_left(offsets, offsets[start] + stride)
        start = max(start + 1, min(next_start, end))  # progress, and no unit left uncovered


def assign_units(
    piece_counts: Sequence[int], windows: Sequence[tuple[int, int]]
) -> list[int]:
    """For each unit, the index of the window in which it is most central."""
    offsets = [0]
    for count in piece_counts:
        offsets.append(offsets[-1] + count)
    owner = [-1] * len(piece_counts)
    margin = [float("-inf")] * len(piece_counts)
    for w, (start, end) in enumerate(windows):
        left, right = offsets[start], offsets[end]
        for u in range(start, end):
            centre = (offsets[u] + offsets[u + 1]) / 2
            m = min(centre - left, right - centre)
            if m > margin[u]:  # strict: ties keep the earlier window
                owner[u], margin[u] = w, m
    return owner


def _special_affixes(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special ids the tokenizer puts before and after a single sequence."""
    probe = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for i in range(len(full) - len(probe) + 1):
        if probe and full[i : i + len(probe)] == probe:
            return full[:i], full[i + len(probe) :]
    cls = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    return ([cls] if cls is not None else []), ([sep] if sep is not None else [])


class UnitTokenizer:
    """Encodes batches of unit lists into padded encoder inputs plus a unit → piece map.

    ``max_length`` is the longest input the encoder accepts, special tokens included; longer
    sentences go through sliding windows of that size, ``stride`` pieces apart.
    """

    def __init__(
        self,
        tokenizer: Any,
        max_length: int | None = None,
        mode: UnitMode = "char",
        stride: int | None = None,
    ):
        if mode not in UNIT_MODES:
            raise ValueError(f"unit mode {mode!r}: expected one of {UNIT_MODES}")
        self.tokenizer = tokenizer
        self.mode: UnitMode = mode
        limit = getattr(tokenizer, "model_max_length", None) or 512
        self.max_length = int(max_length if max_length is not None else min(limit, 512))
        self.prefix, self.suffix = _special_affixes(tokenizer)
        self.window = self.max_length - len(self.prefix) - len(self.suffix)
        if self.window < 2:
            raise ValueError(f"max_length {self.max_length} leaves no room for content pieces")
        self.stride = int(stride) if stride is not None else max(1, self.window // 2)
        if not 1 <= self.stride <= self.window:
            raise ValueError(f"stride {self.stride} must lie in [1, {self.window}]")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.unk_id = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else self.pad_id
        self._vocab: dict[str, int] = tokenizer.get_vocab()
        self._special_ids = set(getattr(tokenizer, "all_special_ids", []))
        self._metaspace_id = self._vocab.get(METASPACE)
        # Per-instance caches: a corpus has few distinct characters / words.
        self._char_cache: dict[str, UnitPieces] = {}
        self._word_cache: dict[str, UnitPieces] = {}

    # ------------------------------------------------------------------ unit → pieces

    def _normalize(self, text: str) -> str:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        normalizer = getattr(backend, "normalizer", None)
        return normalizer.normalize_str(text) if normalizer is not None else text

    def char_piece(self, char: str) -> int:
        """The one piece id that stands for a character in ``"char"`` mode."""
        cached = self._char_cache.get(char)
        if cached is not None:
            return cached.ids[0]
        piece = self._lookup_char(char)
        self._char_cache[char] = UnitPieces((piece,))
        return piece

    def _lookup_char(self, char: str) -> int:
        normed = self._normalize(char)
        if not normed.strip():  # whitespace or a character the normaliser deletes
            return self._metaspace_id if self._metaspace_id is not None else self.unk_id
        for candidate in (normed, METASPACE + normed, char):
            piece = self._vocab.get(candidate)
            if piece is not None and piece not in self._special_ids:
                return piece
        ids = self.tokenizer(char, add_special_tokens=False)["input_ids"]
        content = [i for i in ids if i != self._metaspace_id]
        return content[0] if content else self.unk_id

    def word_pieces(self, words: Sequence[str]) -> list[UnitPieces]:
        """Pieces of each word in ``"word"`` mode (tokenized together, cached per word)."""
        missing = sorted({w for w in words if w not in self._word_cache})
        if missing:
            encoded = self.tokenizer(missing, add_special_tokens=False)["input_ids"]
            for word, ids in zip(missing, encoded):
                ids = list(ids) or [self.unk_id]  # every unit needs a piece to be pooled from
                skip = 1 if len(ids) > 1 and ids[0] == self._metaspace_id else 0
                self._word_cache[word] = UnitPieces(tuple(ids), skip)
        return [self._word_cache[w] for w in words]

    def unit_pieces(self, units: Sequence[str]) -> list[UnitPieces]:
        if self.mode == "char":
            # Corpora of character-level languages still hold the odd multi-character unit (Weibo
            # has broken emoji stored as two U+FFFD); such a unit keeps all of its pieces and is
            # pooled like a word, rather than failing the whole batch.
            return [
                UnitPieces((self.char_piece(u),)) if len(u) == 1 else self.word_pieces([u])[0]
                for u in units
            ]
        return self.word_pieces(units)

    # ------------------------------------------------------------------ batch encoding

    def encode(self, batch: Sequence[Sequence[str]]) -> dict[str, torch.Tensor]:
        """Tensors for a batch of sentences (each a list of units).

        - ``input_ids``, ``attention_mask``: ``(R, T)``, one row per window (``R >= B``);
        - ``piece_index``: ``(B, L, K)`` flat indices into the ``R*T`` piece positions of the
          pieces pooled for each unit, ``piece_mask`` ``(B, L, K)`` which of them are real;
        - ``unit_mask``: ``(B, L)``, True for real units.
        """
        rows: list[list[int]] = []
        # (sentence, unit) -> (row, position of the unit's first pooled piece, pooled count)
        placements: list[list[tuple[int, int, int]]] = []
        for units in batch:
            pieces = self.unit_pieces(units)
            counts = [len(p.ids) for p in pieces]
            windows = plan_windows(counts, self.window, self.stride)
            owner = assign_units(counts, windows)
            first_row = len(rows)
            starts: list[dict[int, int]] = []
            for start, end in windows:
                row = list(self.prefix)
                where: dict[int, int] = {}
                for u in range(start, end):
                    where[u] = len(row)
                    row.extend(pieces[u].ids)
                del row[len(self.prefix) + self.window :]  # only a giant single unit reaches here
                row.extend(self.suffix)
                rows.append(row)
                starts.append(where)
            placed = []
            for u, w in enumerate(owner):
                position = starts[w][u] + pieces[u].pool_start
                last = len(self.prefix) + self.window  # clipped pieces cannot be pooled
                count = max(1, min(len(pieces[u].ids) - pieces[u].pool_start, last - position))
                placed.append((first_row + w, position, count))
            placements.append(placed)

        width = max(len(r) for r in rows) if rows else 0
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            input_ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[r, : len(row)] = 1

        n_units = max((len(p) for p in placements), default=0)
        k = max((c for p in placements for _, _, c in p), default=1)
        piece_index = torch.zeros((len(batch), n_units, k), dtype=torch.long)
        piece_mask = torch.zeros((len(batch), n_units, k), dtype=torch.bool)
        unit_mask = torch.zeros((len(batch), n_units), dtype=torch.bool)
        for b, placed in enumerate(placements):
            for u, (row, position, count) in enumerate(placed):
                flat = row * width + position
                piece_index[b, u, :count] = torch.arange(flat, flat + count)
                piece_mask[b, u, :count] = True
                unit_mask[b, u] = True
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "piece_index": piece_index,
            "piece_mask": piece_mask,
            "unit_mask": unit_mask,
        }


def pool_pieces(
    hidden: torch.Tensor,
    piece_index: torch.Tensor,
    piece_mask: torch.Tensor,
    unit_mask: torch.Tensor,
    pooling: Pooling = "first",
) -> torch.Tensor:
    """Unit vectors ``(B, L, D)`` from piece vectors ``(R, T, D)``; padding units are 0."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    if pooling == "first":
        pooled = flat[piece_index[:, :, 0]]
    else:
        gathered = flat[piece_index]  # (B, L, K, D)
        mask = piece_mask.unsqueeze(-1)
        if pooling == "max":
            pooled = gathered.masked_fill(~mask, float("-inf")).amax(dim=2)
        elif pooling == "mean":
            total = gathered.masked_fill(~mask, 0.0).sum(dim=2)
            pooled = total / mask.sum(dim=2).clamp(min=1).to(total.dtype)
        else:
            raise ValueError(f"pooling {pooling!r}: expected one of {POOLINGS}")
    # where() rather than a product: padding units may hold -inf from the max.
    return torch.where(unit_mask.unsqueeze(-1), pooled, torch.zeros((), dtype=pooled.dtype))
