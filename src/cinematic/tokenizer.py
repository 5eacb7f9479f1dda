"""CLIP's byte-level BPE tokenizer, run by the ``tokenizers`` library.

The ids match ``open_clip.tokenize`` (what ModelScope conditioned on) and diffusers' ``CLIPTokenizer`` with
``pad_token="!"``: ``[start] + bpe(prompt) + [end]``, truncated to 77 keeping the end token, padded with the id of
``"!"`` (0 in the published vocabulary). The UNet cross-attends to every one of the 77 positions, padding included,
so the pad id is part of the model, not a detail of batching.

Text is cleaned the way open_clip cleans it (ftfy, HTML unescaped twice, whitespace collapsed, lower case) in
Python before the ``tokenizers`` pipeline sees it. transformers' fast ``CLIPTokenizer`` only applies NFC and
lower case, so it differs from open_clip (and from us) on HTML entities, curly quotes, ligatures, full-width
characters and mojibake; on ordinary prompts the three agree.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import ftfy
import torch
from tokenizers import Regex, pre_tokenizers
from tokenizers import Tokenizer as _BackendTokenizer
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from cinematic.errors import CinematicError

START = "<|startoftext|>"
END = "<|endoftext|>"
PAD = "!"  # open_clip pads with zeros, and id 0 of CLIP's vocabulary is "!"
END_OF_WORD = "</w>"
CONTEXT_LENGTH = 77
MERGES_HEADER = "#version: 0.2"

# CLIP's word splitter: contractions, runs of letters, single digits, runs of anything else; whitespace dropped.
_WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


@lru_cache(maxsize=1)
def byte_alphabet() -> tuple[str, ...]:
    """The 256 printable characters that stand for the bytes 0..255, in CLIP's vocabulary order.

    Printable Latin-1 bytes stand for themselves and come first ("!" is byte 33, hence id 0); the remaining
    bytes (controls, space, soft hyphen) are shifted to code points 256 and up, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    chars = dict(zip(printable, map(chr, printable)))
    chars.update({b: chr(256 + n) for n, b in enumerate(shifted)})
    return tuple(chars[b] for b in (*printable, *shifted))


def clean_text(text: str) -> str:
    """open_clip's ``_clean_lower``: repair mojibake, unescape HTML twice, collapse whitespace, lower-case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


def _backend(vocab: dict[str, int], merges: list[tuple[str, str]]) -> _BackendTokenizer:
    # No normalizer: clean_text has already done open_clip's cleaning. ByteLevel only maps bytes to the
    # alphabet above; the splitting is CLIP's, so its own GPT-2 regex is switched off.
    model = BPE(vocab, merges, unk_token=END, continuing_subword_prefix="", end_of_word_suffix=END_OF_WORD)
    backend = _BackendTokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_WORD_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    return backend


class Tokenizer:
    """Prompts to ``[B, context_length]`` token ids for the text encoder."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], context_length: int = CONTEXT_LENGTH):
        missing = [t for t in (START, END, PAD) if t not in vocab]
        if missing:
            raise CinematicError(f"tokenizer vocabulary lacks the special tokens {missing}")
        if context_length < 2:
            raise CinematicError(f"tokenizer context_length must be at least 2, got {context_length}")
        try:
            self._backend = _backend(vocab, merges)
        except Exception as e:  # tokenizers raises a bare Exception for a merge whose result is not in vocab
            raise CinematicError(f"inconsistent tokenizer vocabulary and merges: {e}") from e
        self.vocab = dict(vocab)
        self.merges = list(merges)
        self.context_length = context_length
        self.start_id, self.end_id, self.pad_id = vocab[START], vocab[END], vocab[PAD]

    @classmethod
    def from_files(cls, vocab: str | Path, merges: str | Path, context_length: int = CONTEXT_LENGTH) -> Tokenizer:
        """Load a ``vocab.json`` (token -> id) and a ``merges.txt`` (one ``left right`` pair per line, by rank)."""
        for path in (Path(vocab), Path(merges)):
            if not path.is_file():
                raise CinematicError(f"tokenizer file not found: {path}")
        try:
            vocab_dict = json.loads(Path(vocab).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise CinematicError(f"{vocab} is not valid JSON: {e}") from e
        return cls(vocab_dict, _read_merges(Path(merges)), context_length)

    @classmethod
    def from_folder(cls, folder: str | Path, context_length: int = CONTEXT_LENGTH) -> Tokenizer:
        """Load a diffusers ``tokenizer/`` folder; only vocab.json and merges.txt are read.

        The pad token is always "!": the published special_tokens_map.json and tokenizer_config.json disagree
        about it (reference-model.md section 2), and open_clip, which the model was trained with, pads with 0.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise CinematicError(f"tokenizer folder not found: {folder}")
        if not (folder / "vocab.json").is_file() and (folder / "tokenizer.json").is_file():
            return cls.from_tokenizer_json(folder / "tokenizer.json", context_length)
        return cls.from_files(folder / "vocab.json", folder / "merges.txt", context_length)

    @classmethod
    def from_tokenizer_json(cls, path: str | Path, context_length: int = CONTEXT_LENGTH) -> Tokenizer:
        """The single ``tokenizer.json`` that transformers 5 saves instead of vocab.json + merges.txt."""
        try:
            model = json.loads(Path(path).read_text(encoding="utf-8"))["model"]
            vocab, merges = model["vocab"], model["merges"]
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
            raise CinematicError(f"{path} is not a BPE tokenizer.json: {e}") from None
        pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
        return cls(vocab, pairs, context_length)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, prompt: str) -> list[int]:
        """BPE ids of the cleaned prompt, without start/end tokens and without truncation."""
        return self._backend.encode(clean_text(prompt), add_special_tokens=False).ids

    def truncated(self, prompt: str) -> bool:
        """Whether ``prompt`` loses tokens to the context length (the caller may want to warn)."""
        return len(self.encode(prompt)) > self.context_length - 2

    def __call__(self, prompts: str | list[str]) -> torch.Tensor:
        """``[B, context_length]`` int64 ids: start, BPE ids cut to fit, end, then pad ids."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        encodings = self._backend.encode_batch([clean_text(p) for p in prompts], add_special_tokens=False)
        out = torch.full((len(prompts), self.context_length), self.pad_id, dtype=torch.long)
        for row, encoding in enumerate(encodings):
            # Truncating the BPE ids before adding the end token keeps the end token, as open_clip does.
            ids = [self.start_id, *encoding.ids[: self.context_length - 2], self.end_id]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def save(self, folder: str | Path) -> Path:
        """Write vocab.json and merges.txt, plus the two small JSON files transformers' CLIPTokenizer reads."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        ordered = dict(sorted(self.vocab.items(), key=lambda item: item[1]))
        (folder / "vocab.json").write_text(json.dumps(ordered, ensure_ascii=False), encoding="utf-8")
        lines = [MERGES_HEADER, *(f"{left} {right}" for left, right in self.merges)]
        (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        special = {"bos_token": START, "eos_token": END, "unk_token": END, "pad_token": PAD}
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.context_length, **special}
        (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        return folder


def _read_merges(path: Path) -> list[tuple[str, str]]:
    merges = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line or (number == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise CinematicError(f"{path}:{number}: expected 'left right', got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


# Training stand-ins for the 256 "<byte></w>" symbols, one private-use character each (see train_tokenizer).
_WORD_END_BASE = 0xE000


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, min_frequency: int = 2, context_length: int = CONTEXT_LENGTH
) -> Tokenizer:
    """Learn a CLIP-layout BPE vocabulary of at most ``vocab_size`` tokens from ``texts``, deterministically.

    The layout is CLIP's, so the pad id is 0 and the special tokens come last: the 256 byte characters, the same
    with "</w>", one token per merge in rank order, then start and end. ``tokenizers`` learns the merges; the
    vocabulary is laid out here because its trainer numbers the special tokens and the alphabet its own way.
    The result is smaller than ``vocab_size`` when the texts run out of pairs seen ``min_frequency`` times.
    """
    alphabet = byte_alphabet()
    base = [*alphabet, *(c + END_OF_WORD for c in alphabet)]
    if vocab_size < len(base) + 2:
        raise CinematicError(f"vocab_size must be at least {len(base) + 2} (bytes, bytes+</w>, start, end)")
    learned = _learn_merges(texts, vocab_size + len(base), min_frequency)

    vocab = {token: i for i, token in enumerate(base)}
    merges: list[tuple[str, str]] = []
    for left, right in learned:  # a prefix of a BPE merge list is itself a valid merge list
        if len(vocab) + 2 == vocab_size:
            break
        merges.append((left, right))
        # Two different pairs can spell the same token; BPE needs both merges but the vocabulary needs one id.
        vocab.setdefault(left + right, len(vocab))
    vocab[START], vocab[END] = len(vocab), len(vocab) + 1
    return Tokenizer(vocab, merges, context_length)


def _learn_merges(texts: Iterable[str], trainer_vocab_size: int, min_frequency: int) -> list[tuple[str, str]]:
    """BPE merges in rank order, learned by the ``tokenizers`` trainer.

    The trainer breaks ties between equally frequent pairs by symbol id, and it numbers the "x</w>" symbols as it
    meets them while walking a hash map, so with ``end_of_word_suffix`` two runs can disagree. Instead each word's
    last character is swapped for a private-use stand-in of "x</w>" that belongs to the initial alphabet, which the
    trainer numbers in sorted order; the stand-ins are swapped back in the learned merges.
    """
    alphabet = byte_alphabet()
    word_end = {c: chr(_WORD_END_BASE + i) for i, c in enumerate(alphabet)}
    unfold = {stand_in: c + END_OF_WORD for c, stand_in in word_end.items()}
    splitter = _backend({}, []).pre_tokenizer

    def words(text: str) -> str:
        pieces = [piece for piece, _ in splitter.pre_tokenize_str(clean_text(text))]
        return " ".join(piece[:-1] + word_end[piece[-1]] for piece in pieces)

    trainer_model = _BackendTokenizer(BPE())
    trainer_model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = BpeTrainer(
        vocab_size=trainer_vocab_size,
        min_frequency=min_frequency,
        initial_alphabet=[*alphabet, *word_end.values()],
        show_progress=False,
    )
    trainer_model.train_from_iterator((words(t) for t in texts), trainer)
    learned = json.loads(trainer_model.to_str())["model"]["merges"]
    pairs = [pair.split(" ") if isinstance(pair, str) else pair for pair in learned]
    return [
        ("".join(unfold.get(c, c) for c in left), "".join(unfold.get(c, c) for c in right)) for left, right in pairs
    ]
