"""Tokenizer parity: transformers' CLIPTokenizer (pinned in pyproject) and an open_clip-style reference BPE.

The real CLIP vocabulary cannot be downloaded here, so the checks run on two vocabularies: the tiny one from
tests/clip_vocab.py and one trained by ``train_tokenizer`` on a generated corpus, whose many merges make whole
words single tokens.
"""

from __future__ import annotations

import html
import itertools
import json
import random
from pathlib import Path

import ftfy
import pytest
import regex
import torch
from transformers import CLIPTokenizer

from cinematic.errors import CinematicError
from cinematic.tokenizer import END, START, Tokenizer, train_tokenizer
from tests.clip_vocab import tiny_clip_vocab, write_tiny_clip_vocab

LONG = " ".join(["a golden retriever puppy running on the beach at sunset, cinematic, 4k"] * 8)
PROMPTS = [
    "a cat riding a horse on mars",
    "An astronaut riding a horse, 4k, highly detailed",
    "A PANDA PLAYING GUITAR IN TIMES SQUARE",
    "  lots   of\twhitespace\n\nand newlines  ",
    "tab\tseparated\twords",
    "",
    "   ",
    "a",
    "...",
    "?!",
    "wow! a dog!!",
    "it's a dog's life; they're here, we'll see, i'd go, i'm ok, you've won",
    "DON'T STOP, It'S fine",
    "numbers 1234567890 and 3.14159",
    "1080p 60fps 24mm f/1.8",
    "(parentheses) [brackets] {braces} <angle> |pipes|",
    "e-mail: test@example.com, url https://example.org/a?b=1&c=2",
    "snake_case and kebab-case and CamelCase",
    "café au lait, crème brûlée, naïve façade",
    "Ünïcödé Äccents: Ñandú, Øresund, Ærø, straße",
    "decomposed accents: cafe\u0301 nai\u0308ve",
    "東京の夜景、雨が降っている",
    "一只熊猫在弹吉他",
    "한국어 프롬프트",
    "Ελληνικά κείμενο",
    "русский текст про кошку",
    "עברית",
    "العربية",
    "हिन्दी",
    "a panda 🐼 playing guitar 🎸",
    "emoji only 😀😃😄",
    "family 👨‍👩‍👧 with zero-width joiners",
    "flags 🇯🇵🇫🇷 and skin tones 👍🏽",
    "fish &amp; chips",
    "&lt;b&gt;bold&lt;/b&gt; html",
    "&amp;amp; double escaped",
    "caf&eacute; and &quot;quoted&quot;",
    "&#128512; numeric entity &#x263A;",
    "“curly quotes” and ‘single’ ones",
    "mojibake cafÃ© should be repaired",
    "ﬁne ﬂowers ligature",
    "ｆｕｌｌｗｉｄｔｈ ｔｅｘｔ",
    "non\u00a0breaking\u2003spaces",
    "soft\u00adhyphen",
    "control \x07 bell",
    "mixed Case WORDS with Trailing space ",
    "beautiful sunset over the ocean, waves crashing on the rocks",
    "a red car driving on a mountain road in the snow",
    "an old man walking in the rain at night, city lights",
    "slow motion video of fire, highly detailed, 8k",
    "robot dancing in the forest",
    "a small blue bird on a green branch",
    "ocean waves, beach, moon, night",
    "riding riding riding riding",
    "supercalifragilisticexpialidocious",
    "x" * 300,
    LONG,
    " ".join(["東京"] * 60),
    " ".join(["😀"] * 40),
]

# The generated training corpus draws its words from here.
_WORD_TEXT = (
    "a an the of on in at with and by to from over under near is are was running walking riding flying "
    "playing dancing jumping swimming cat cats dog dogs horse horses astronaut robot panda bird birds "
    "fish car cars boat mountain mountains river ocean beach sunset sunrise forest city street road snow "
    "rain fire water sky moon mars space night day light lights golden red blue green white black small "
    "big old young happy beautiful cinematic realistic detailed highly photo video painting portrait "
    "landscape 4k 8k hd slow motion camera café crème brûlée naïve façade straße 東京 夜景 熊猫 кошка собака 😀 "
    "🐼 🎸 it's they're we'll don't supercalifragilisticexpialidocious golden retriever puppy guitar waves "
    "crashing rocks times square"
)
WORDS = _WORD_TEXT.split()


def _corpus(n: int = 3000) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) for _ in range(n)]


@pytest.fixture(scope="module")
def vocab_folders(tmp_path_factory) -> dict[str, Path]:
    trained = train_tokenizer(_corpus(), vocab_size=800)
    return {
        "tiny": write_tiny_clip_vocab(tmp_path_factory.mktemp("tiny")),
        "trained": trained.save(tmp_path_factory.mktemp("trained")),
    }


@pytest.fixture(scope="module", params=["tiny", "trained"])
def pair(request, vocab_folders) -> tuple[Tokenizer, CLIPTokenizer, Path]:
    folder = vocab_folders[request.param]
    return Tokenizer.from_folder(folder), CLIPTokenizer.from_pretrained(str(folder), pad_token="!"), folder


def _hf_ids(hf: CLIPTokenizer, text: str) -> list[int]:
    return hf(text, padding="max_length", max_length=77, truncation=True)["input_ids"]


def _openclip_clean(text: str) -> str:
    # open_clip's _clean_lower, written out again: transformers' CLIPTokenizer does not do it
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).strip().lower()


# transformers registers the pad token "!" (and start/end) as special tokens, and splits them out of the raw text
# before BPE: every "!" becomes id 0 instead of being merged like any other character. open_clip does not.
def _hf_comparable(prompt: str) -> bool:
    return not any(s in prompt for s in ("!", START, END))


def test_ids_match_transformers_after_openclip_cleaning(pair):
    ours, hf, _ = pair
    compared = [p for p in PROMPTS if _hf_comparable(p)]
    assert len(compared) >= 50
    for prompt in compared:
        assert ours(prompt)[0].tolist() == _hf_ids(hf, _openclip_clean(prompt)), prompt


def test_plain_prompts_match_transformers_without_cleaning(pair):
    ours, hf, _ = pair
    plain = [p for p in PROMPTS if _hf_comparable(p) and _openclip_clean(p) == " ".join(p.split()).lower()]
    assert len(plain) >= 30
    for prompt in plain:
        assert ours(prompt)[0].tolist() == _hf_ids(hf, prompt), prompt


def _byte_chars() -> dict[int, str]:
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def _reference_bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    symbols = [*word[:-1], word[-1] + "</w>"]
    while len(symbols) > 1:
        pairs = list(itertools.pairwise(symbols))
        best = min(pairs, key=lambda p: ranks.get(p, len(ranks)))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def _openclip_ids(prompt: str, folder: Path) -> list[int]:
    """open_clip's SimpleTokenizer algorithm: regex words, bytes to characters, BPE by merge rank, then layout."""
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    ranks = {tuple(line.split()): rank for rank, line in enumerate(lines) if line}
    chars = _byte_chars()
    pattern = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    ids = [vocab[START]]
    for word in regex.findall(pattern, _openclip_clean(prompt), regex.IGNORECASE):
        ids += [vocab[t] for t in _reference_bpe("".join(chars[b] for b in word.encode("utf-8")), ranks)]
    ids = [*ids[:76], vocab[END]]
    return ids + [vocab["!"]] * (77 - len(ids))


def test_ids_match_openclip_reference(pair):
    ours, _, folder = pair
    for prompt in PROMPTS:
        assert ours(prompt)[0].tolist() == _openclip_ids(prompt, folder), prompt


def test_special_ids_and_layout():
    vocab = tiny_clip_vocab()
    tok = Tokenizer(vocab, [])
    assert (tok.pad_id, tok.start_id, tok.end_id) == (0, len(vocab) - 2, len(vocab) - 1)
    ids = tok("")
    assert ids.dtype == torch.long and ids.shape == (1, 77)
    assert ids[0, :2].tolist() == [tok.start_id, tok.end_id] and (ids[0, 2:] == 0).all()
    # "!" in a prompt is the byte token "!</w>", not padding
    assert tok("wow!")[0, 4].item() == vocab["!</w>"] != tok.pad_id


def test_truncation_keeps_end_token(vocab_folders):
    tok = Tokenizer.from_folder(vocab_folders["trained"])
    ids = tok(LONG)[0]
    assert tok.truncated(LONG) and not tok.truncated(PROMPTS[0])
    assert ids[0].item() == tok.start_id and ids[-1].item() == tok.end_id
    assert ids[1:76].tolist() == tok.encode(LONG)[:75]
    # exactly 75 BPE ids fit without truncation
    fits = "a " * 75
    assert len(tok.encode(fits)) == 75 and not tok.truncated(fits) and tok(fits)[0, -1].item() == tok.end_id


def test_batch_equals_single_prompts(vocab_folders):
    tok = Tokenizer.from_folder(vocab_folders["tiny"])
    batch = tok(PROMPTS[:6])
    assert batch.shape == (6, 77)
    assert torch.equal(batch, torch.cat([tok(p) for p in PROMPTS[:6]]))


def test_train_tokenizer_layout_and_merges(vocab_folders):
    tok = Tokenizer.from_folder(vocab_folders["trained"])
    assert tok.vocab["!"] == 0 and tok.pad_id == 0
    assert tok.vocab_size == 800 and (tok.start_id, tok.end_id) == (798, 799)
    assert sorted(tok.vocab.values()) == list(range(800))
    assert all(tok.vocab[c + "</w>"] == tok.vocab[c] + 256 for c in "!az\u0100")
    # long frequent words took many merges to become one token
    for word in ("mountains", "cinematic", "landscape", "retriever"):
        assert len(tok.encode(word)) == 1, word
    # deterministic, ties between equally frequent pairs included (this corpus has many)
    assert train_tokenizer(_corpus(500), vocab_size=600).merges == train_tokenizer(_corpus(500), 600).merges


def test_train_tokenizer_rejects_too_small_vocab():
    with pytest.raises(CinematicError, match="vocab_size"):
        train_tokenizer(["a cat"], vocab_size=100)


def test_save_roundtrip_and_transformers_reads_pad(vocab_folders, tmp_path):
    tok = Tokenizer.from_folder(vocab_folders["trained"])
    tok.save(tmp_path)
    again = Tokenizer.from_folder(tmp_path)
    assert again.vocab == tok.vocab and again.merges == tok.merges
    hf = CLIPTokenizer.from_pretrained(str(tmp_path))  # pad "!" comes from the saved special_tokens_map.json
    assert hf.pad_token_id == 0 and hf.model_max_length == 77
    assert tok(PROMPTS[1])[0].tolist() == _hf_ids(hf, PROMPTS[1])


def test_transformers4_style_folder_loads(tmp_path):
    # the published tokenizer/ folder: its tokenizer_config.json says pad "<|endoftext|>", special_tokens_map "!"
    folder = write_tiny_clip_vocab(tmp_path)
    token = {"__type": "AddedToken", "content": END, "lstrip": False, "normalized": True, "rstrip": False}
    config = {
        "add_prefix_space": False,
        "bos_token": {**token, "content": START},
        "do_lower_case": True,
        "eos_token": token,
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": END,
        "special_tokens_map_file": "./special_tokens_map.json",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": token,
    }
    special = {"bos_token": START, "eos_token": END, "pad_token": "!", "unk_token": END}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    tok = Tokenizer.from_folder(folder)
    hf = CLIPTokenizer.from_pretrained(str(folder))
    assert tok.pad_id == hf.pad_token_id == 0
    assert tok(PROMPTS[0])[0].tolist() == _hf_ids(hf, PROMPTS[0])


def test_missing_or_bad_files_raise(tmp_path):
    with pytest.raises(CinematicError, match="not found"):
        Tokenizer.from_folder(tmp_path / "nowhere")
    with pytest.raises(CinematicError, match="vocab.json"):
        Tokenizer.from_folder(tmp_path)
    folder = write_tiny_clip_vocab(tmp_path / "bad")
    (folder / "merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(CinematicError, match="merges.txt:2"):
        Tokenizer.from_folder(folder)
    (folder / "merges.txt").write_text("#version: 0.2\nq z\n")  # "qz" is not in the vocabulary
    with pytest.raises(CinematicError, match="inconsistent"):
        Tokenizer.from_folder(folder)
    with pytest.raises(CinematicError, match="special tokens"):
        Tokenizer({"a": 0}, [])
