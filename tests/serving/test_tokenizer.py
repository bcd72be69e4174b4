"""Parity of serving.tokenizer.ClipTokenizer with open_clip's SimpleTokenizer."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from serving.errors import BundleError, ClassNameError
from serving.format import VOCAB_FILE
from serving.tokenizer import ClipTokenizer, default_vocab_path

open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer")


LONG_NAME = " ".join(["extraordinarily long hyphenated-class name with many words"] * 12)

CORPUS = [
    "",
    "dog",
    "a photo of a dog.",
    "A Photo Of A DOG",
    "a photo of a {}.",
    "golden retriever",
    "Yorkshire_terrier",
    "German shepherd dog's toy",
    "don't stop",
    "it's, we're, they've, I'm, we'll, he'd",
    "IT'S LOUD",
    "café crème brûlée",
    "Ångström naïve façade",
    "Ñandú",
    "東京タワー",
    "北京烤鸭",
    "한국어 텍스트",
    "🐶 dog emoji 🐕‍🦺",
    "👨‍👩‍👧‍👦 family",
    "مرحبا بالعالم",
    "שלום עולם",
    "Привет, мир!",
    "Ελληνικά γράμματα",
    "fish &amp; chips",
    "fish &amp;amp; chips",
    "&lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot; &#39;apos&#39;",
    "mojibake: cafÃ© Ã  la carte",
    "The Mona Lisa doesnâ€™t have eyebrows.",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\nand   runs",
    "\u00a0non-breaking\u2003em space\u3000ideographic",
    "Boeing 747-400",
    "route 66, 2024/12/31, 3.14159",
    "١٢٣ arabic-indic digits",
    "punctuation!!! ??? ... --- ((())) [x] {y} <z>",
    "e-mail@example.com #hashtag $100 50% ^_^ ~tilde~",
    "C++ / C# / F*",
    "O'Reilly's car",
    "ﬁnancial ligature",
    "Ｆｕｌｌｗｉｄｔｈ ＬＥＴＴＥＲＳ",
    "combining e\u0301 accent",
    "zero\u200bwidth space",
    "<start_of_text> and <end_of_text> literals",
    "antidisestablishmentarianism supercalifragilisticexpialidocious",
    "xylophone, quokka, axolotl, pangolin, narwhal",
    LONG_NAME,
]


@pytest.fixture(scope="module")
def vocab_path() -> Path:
    return default_vocab_path()


@pytest.fixture(scope="module")
def ours(vocab_path: Path) -> ClipTokenizer:
    return ClipTokenizer(vocab_path)


@pytest.fixture(scope="module")
def reference():
    return open_clip_tokenizer.SimpleTokenizer()


def test_corpus_is_broad_and_has_a_long_name(ours: ClipTokenizer) -> None:
    assert len(CORPUS) >= 40
    assert ours.num_tokens(LONG_NAME) > ours.context_length


def test_special_ids_and_vocab_size_match(ours: ClipTokenizer, reference) -> None:
    assert ours.sot_token_id == reference.sot_token_id
    assert ours.eot_token_id == reference.eot_token_id
    assert ours.vocab_size == reference.vocab_size == 49408
    assert ours.context_length == 77


@pytest.mark.parametrize("text", CORPUS)
def test_encode_matches_open_clip(ours: ClipTokenizer, reference, text: str) -> None:
    assert ours.encode(text) == reference.encode(text)
    assert ours.num_tokens(text) == len(reference.encode(text)) + 2


def test_batch_call_matches_open_clip_with_truncation(ours: ClipTokenizer, reference) -> None:
    got = ours(CORPUS, truncate=True)
    want = reference(CORPUS).numpy()
    assert got.dtype == np.int64
    assert got.shape == (len(CORPUS), 77)
    assert np.array_equal(got, want)


def test_single_string_call(ours: ClipTokenizer, reference) -> None:
    got = ours("a photo of a dog.")
    assert got.shape == (1, 77)
    assert np.array_equal(got, reference("a photo of a dog.").numpy())


def test_empty_batch(ours: ClipTokenizer) -> None:
    assert ours([]).shape == (0, 77)


def test_long_name_truncated_like_open_clip(ours: ClipTokenizer, reference) -> None:
    got = ours([LONG_NAME], truncate=True)
    assert np.array_equal(got, reference([LONG_NAME]).numpy())
    assert got[0, -1] == ours.eot_token_id


def test_long_name_refused_without_truncate(ours: ClipTokenizer) -> None:
    n = ours.num_tokens(LONG_NAME)
    with pytest.raises(ClassNameError) as info:
        ours(["dog", LONG_NAME])
    message = str(info.value)
    assert LONG_NAME[:40] in message
    assert str(n) in message and "77" in message
    assert info.value.field == "names"


def test_exactly_full_context_is_not_truncated(ours: ClipTokenizer) -> None:
    text = " ".join(["dog"] * 75)  # 75 tokens + SOT + EOT == 77
    assert ours.num_tokens(text) == 77
    row = ours(text)[0]
    assert row[0] == ours.sot_token_id and row[-1] == ours.eot_token_id
    with pytest.raises(ClassNameError):
        ours(text + " dog")


@pytest.mark.parametrize("context_length", [16, 5])
def test_other_context_length(vocab_path: Path, context_length: int) -> None:
    ours = ClipTokenizer(vocab_path, context_length=context_length)
    reference = open_clip_tokenizer.SimpleTokenizer(context_length=context_length)
    got = ours(CORPUS, truncate=True)
    assert got.shape == (len(CORPUS), context_length)
    assert np.array_equal(got, reference(CORPUS).numpy())
    with pytest.raises(ClassNameError, match=f"holds {context_length}"):
        ours(CORPUS)


def test_decode_round_trip(ours: ClipTokenizer, reference) -> None:
    text = "café 東京 🐶 dog"
    ids = ours.encode(text)
    assert ours.decode(ids) == reference.decode(ids)
    assert ours.decode(ids).strip() == text


def test_default_vocab_path_is_open_clips_copy(vocab_path: Path) -> None:
    assert vocab_path.name == VOCAB_FILE
    assert vocab_path.parent == Path(open_clip_tokenizer.__file__).parent


def test_default_vocab_path_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(FileNotFoundError, match="not installed"):
        default_vocab_path()


def test_missing_vocab_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        ClipTokenizer(tmp_path / VOCAB_FILE)


def test_malformed_vocab_file(tmp_path: Path) -> None:
    bad = tmp_path / VOCAB_FILE
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(BundleError, match="Cannot read"):
        ClipTokenizer(bad)
    with gzip.open(bad, "wb") as fh:
        fh.write(b"#version: 0.2\ni n\nt h\n")
    with pytest.raises(BundleError, match="merge"):
        ClipTokenizer(bad)


def test_bad_context_length(vocab_path: Path) -> None:
    with pytest.raises(ValueError, match="context_length"):
        ClipTokenizer(vocab_path, context_length=1)


def test_import_does_not_pull_torch_or_open_clip() -> None:
    from promptclip_testing import assert_torch_free

    assert_torch_free("import serving.tokenizer as t\nt.ClipTokenizer(t.default_vocab_path())('a photo of a dog')")
