"""A tiny CLIP-layout vocabulary that both transformers' CLIPTokenizer and cinematic's Tokenizer load.

Layout as in CLIP: the 256 byte characters (so "!" is id 0, the pad id), the same with "</w>", one token per merge,
then <|startoftext|> and <|endoftext|>. The merges spell out the words below left to right, so common prompt words
become one token after several merges and everything else falls back to bytes: no input maps to the unknown token.
"""

from __future__ import annotations

import json
from pathlib import Path

from cinematic.tokenizer import END, END_OF_WORD, MERGES_HEADER, START, byte_alphabet

WORDS = (
    "a an the of on in with and at by to is it",
    "cat dog horse astronaut riding mars moon beach sunset city night forest river ocean waves",
    "panda playing guitar robot dancing rain car driving road mountain snow fire",
    "red blue green golden small big old young happy slow fast",
    "photo video painting cinematic realistic highly detailed 4k 8k",
)


def tiny_clip_merges() -> list[tuple[str, str]]:
    """Merges that build each word from its characters left to right, deduplicated, in first-seen order."""
    merges: list[tuple[str, str]] = []
    for word in " ".join(WORDS).split():
        symbols = [*word[:-1], word[-1] + END_OF_WORD]
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            if pair not in merges:
                merges.append(pair)
            symbols = [symbols[0] + symbols[1], *symbols[2:]]
    return merges


def tiny_clip_vocab() -> dict[str, int]:
    alphabet = byte_alphabet()
    tokens = [*alphabet, *(c + END_OF_WORD for c in alphabet)]
    for left, right in tiny_clip_merges():
        if left + right not in tokens:
            tokens.append(left + right)
    tokens += [START, END]
    return {token: i for i, token in enumerate(tokens)}


def write_tiny_clip_vocab(folder: str | Path) -> Path:
    """Write vocab.json and merges.txt into ``folder`` (created if needed) and return the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(tiny_clip_vocab(), ensure_ascii=False), encoding="utf-8")
    lines = [MERGES_HEADER, *(f"{left} {right}" for left, right in tiny_clip_merges())]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder
