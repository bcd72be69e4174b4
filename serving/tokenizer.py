"""Torch-free CLIP byte-level BPE tokenizer.

Re-implements the algorithm of ``open_clip.tokenizer.SimpleTokenizer`` (itself OpenAI CLIP's
tokenizer) with numpy output, so the serving stack can tokenize class names without torch.
The output is token-for-token identical to open_clip's with its defaults (``clean="lower"``, no
reduction mask); ``tests/serving/test_tokenizer.py`` checks that on a mixed corpus.

Text cleaning, as in open_clip: ``ftfy.fix_text``, ``html.unescape`` twice, strip, collapse all
whitespace runs to single spaces, lowercase. The cleaned text is split by the CLIP regex, every
piece is mapped byte-wise to printable unicode characters and merged with the BPE ranks from
``bpe_simple_vocab_16e6.txt.gz``.

Like open_clip, the literal strings ``<start_of_text>`` and ``<end_of_text>`` in the input are
encoded as the special tokens themselves (callers that take untrusted text may want to refuse them).
"""
from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import ftfy
import numpy as np
import regex

from .errors import BundleError, ClassNameError
from .format import VOCAB_FILE

__all__ = ["ClipTokenizer", "default_vocab_path", "clean_text", "DEFAULT_CONTEXT_LENGTH"]

logger = logging.getLogger(__name__)

#: Context length of every OpenAI CLIP text tower.
DEFAULT_CONTEXT_LENGTH = 77

SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
_END_OF_WORD = "</w>"
#: Number of merges CLIP uses from the vocabulary file (49152 - 256 byte tokens - 2 specials).
_NUM_MERGES = 49152 - 256 - 2
#: Word-level BPE cache size; class names repeat a small vocabulary, so this is plenty.
_BPE_CACHE_SIZE = 1 << 16
#: Rank of a pair that is not a merge (sorts after every real merge).
_NOT_A_MERGE = float("inf")

# Special tokens first so they are matched whole; the rest is CLIP's word/number/punctuation split.
_TOKEN_PATTERN = regex.compile(
    "|".join(regex.escape(t) for t in (SOT_TOKEN, EOT_TOKEN))
    + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


def default_vocab_path() -> Path:
    """Locate open_clip's copy of the CLIP BPE vocabulary without importing open_clip.

    Raises:
        FileNotFoundError: open_clip is not installed or its package lacks the vocabulary file.
    """
    spec = importlib.util.find_spec("open_clip")  # top-level: finds the package without importing it
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / VOCAB_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Cannot find the CLIP BPE vocabulary {VOCAB_FILE!r}: open_clip is "
        + ("not installed" if spec is None else f"installed at {locations} but has no such file")
        + ". Pass the vocabulary path explicitly (every deploy bundle ships one as "
        f"{VOCAB_FILE!r}), or `pip install open_clip_torch`."
    )


@functools.lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the others (control chars, space, ...) are shifted
    to code points from 256 upwards, in byte order.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


def clean_text(text: str) -> str:
    """Clean ``text`` exactly like open_clip's default (``clean="lower"``) tokenizer."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).lower()


class ClipTokenizer:
    """CLIP BPE tokenizer producing int64 numpy arrays identical to open_clip's ``SimpleTokenizer``.

    Args:
        vocab_path: path of ``bpe_simple_vocab_16e6.txt.gz`` (a bundle ships it as ``VOCAB_FILE``).
        context_length: length of the rows :meth:`__call__` returns (SOT + tokens + EOT + padding).
    """

    def __init__(self, vocab_path: str | os.PathLike, context_length: int = DEFAULT_CONTEXT_LENGTH) -> None:
        if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
            raise ValueError(f"context_length must be an int >= 2 (room for SOT and EOT), got {context_length!r}")
        self.vocab_path = Path(vocab_path)
        merges = _read_merges(self.vocab_path)

        byte_chars = list(_byte_to_unicode().values())
        vocab = byte_chars + [c + _END_OF_WORD for c in byte_chars] + ["".join(m) for m in merges]
        vocab += [SOT_TOKEN, EOT_TOKEN]
        self.encoder: dict[str, int] = {tok: i for i, tok in enumerate(vocab)}
        self.decoder: dict[int, str] = {i: tok for tok, i in self.encoder.items()}
        self.bpe_ranks: dict[tuple[str, str], int] = {m: i for i, m in enumerate(merges)}
        self._byte_encoder = _byte_to_unicode()
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}

        self.sot_token_id: int = self.encoder[SOT_TOKEN]
        self.eot_token_id: int = self.encoder[EOT_TOKEN]
        self.context_length: int = context_length
        self.vocab_size: int = len(self.encoder)
        # Per-instance bounded cache (open_clip's is an unbounded dict; results are the same).
        self._bpe_cached = functools.lru_cache(maxsize=_BPE_CACHE_SIZE)(self._bpe)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_path={str(self.vocab_path)!r}, context_length={self.context_length})"

    # -- BPE -------------------------------------------------------------------------------

    def _bpe(self, piece: str) -> tuple[str, ...]:
        """Split one byte-encoded regex piece into vocabulary symbols by greedy rank merging."""
        if piece in (SOT_TOKEN, EOT_TOKEN):
            return (piece,)
        word: tuple[str, ...] = (*piece[:-1], piece[-1] + _END_OF_WORD)
        ranks = self.bpe_ranks
        while len(word) > 1:
            # The adjacent pair with the lowest merge rank; stop when no pair is a known merge.
            best = min(zip(word, word[1:]), key=lambda pair: ranks.get(pair, _NOT_A_MERGE))
            if best not in ranks:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return word

    # -- public API ------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """BPE token ids of ``text`` after open_clip's cleaning, without SOT/EOT."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids: list[int] = []
        byte_encoder = self._byte_encoder
        for piece in _TOKEN_PATTERN.findall(clean_text(text)):
            encoded = "".join(byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[symbol] for symbol in self._bpe_cached(encoded))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ``ids`` (word ends become spaces), as open_clip's ``decode``; for debugging."""
        symbols = "".join(self.decoder[int(i)] for i in ids)
        data = bytearray(self._byte_decoder[c] for c in symbols)
        return data.decode("utf-8", errors="replace").replace(_END_OF_WORD, " ")

    def num_tokens(self, text: str) -> int:
        """Number of tokens ``text`` occupies in the context, SOT and EOT included."""
        return len(self.encode(text)) + 2

    def __call__(self, texts: str | Sequence[str], *, truncate: bool = False) -> np.ndarray:
        """Tokenize ``texts`` into an int64 ``[N, context_length]`` array (SOT, ids, EOT, zeros).

        Args:
            texts: one string or a sequence of strings.
            truncate: what to do with a text longer than the context. ``True`` mimics open_clip
                (cut to ``context_length`` and force the last token to EOT); ``False`` raises
                :class:`ClassNameError`, because a silently shortened class name may mean
                something else.
        """
        if isinstance(texts, str):
            texts = [texts]
        out = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            tokens = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(tokens) > self.context_length:
                if not truncate:
                    raise ClassNameError(
                        f"Text {_preview(text)} is {len(tokens)} tokens long (SOT and EOT included) but the "
                        f"text context holds {self.context_length}; shorten it by at least "
                        f"{len(tokens) - self.context_length} tokens."
                    )
                tokens = tokens[: self.context_length]
                tokens[-1] = self.eot_token_id
            out[row, : len(tokens)] = tokens
        return out


def _preview(text: str, limit: int = 80) -> str:
    """``repr`` of ``text`` shortened for error messages."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def _read_merges(path: Path) -> list[tuple[str, str]]:
    """Read CLIP's BPE merge list (first line is a header) from the gzipped vocabulary file."""
    if not path.is_file():
        raise FileNotFoundError(f"CLIP BPE vocabulary not found: {path} (expected a {VOCAB_FILE} file)")
    try:
        with gzip.open(path, "rb") as fh:
            lines = fh.read().decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise BundleError(f"Cannot read the CLIP BPE vocabulary {path}: {exc}. Re-export or re-copy the file.") from exc
    merges: list[tuple[str, str]] = []
    for line_no, line in enumerate(lines[1 : _NUM_MERGES + 1], start=2):
        parts = line.split()
        if len(parts) != 2:
            raise BundleError(f"Malformed CLIP BPE vocabulary {path}: line {line_no} is not a merge pair: {line!r}")
        merges.append((parts[0], parts[1]))
    if len(merges) != _NUM_MERGES:
        raise BundleError(
            f"CLIP BPE vocabulary {path} has {len(merges)} merges, expected {_NUM_MERGES}; "
            "the file is truncated or not the CLIP vocabulary."
        )
    logger.debug("loaded %d BPE merges from %s", len(merges), path)
    return merges
