"""Corpus reading, a joint sentencepiece vocabulary, and token-budget batches sorted by length."""

from __future__ import annotations

import csv
import gzip
import random
from pathlib import Path
from typing import Iterator

import sentencepiece as spm
import torch

from nmt.config import ModelConfig

# Ids fixed by the vocabulary so that ModelConfig's defaults hold for every model we train.
SPECIAL_IDS = dict(pad_id=0, unk_id=1, bos_id=2, eos_id=3)


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    """Reads a gzip TSV with header ``source<TAB>en<TAB>de`` into (en, de) pairs."""
    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        en, de = header.index("en"), header.index("de")
        return [(row[en], row[de]) for row in reader if len(row) == len(header)]


def train_sentencepiece(pairs: list[tuple[str, str]], model_prefix: str | Path, vocab_size: int,
                        sample_size: int = 400_000, seed: int = 0) -> Path:
    """Trains one joint unigram sentencepiece model on both sides of ``pairs``; returns the .model path.

    Joint so that source, target and output projection share one embedding (the output projection tied to the
    embedding as in Vaswani et al. 2017, section 3.4).
    """
    sentences = [s for pair in pairs for s in pair]
    random.Random(seed).shuffle(sentences)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences[:sample_size]), model_prefix=str(model_prefix), vocab_size=vocab_size,
        model_type="unigram", character_coverage=0.9999, **SPECIAL_IDS, pad_piece="<pad>", unk_piece="<unk>",
        bos_piece="<s>", eos_piece="</s>", num_threads=2, minloglevel=2)
    return Path(f"{model_prefix}.model")


def encode_pairs(sp: spm.SentencePieceProcessor, pairs: list[tuple[str, str]], cfg: ModelConfig,
                 max_tokens: int = 128) -> list[tuple[list[int], list[int]]]:
    """Tokenizes pairs to (src ids + eos, bos + tgt ids + eos); drops pairs longer than ``max_tokens``."""
    src = sp.encode([p[0] for p in pairs])
    tgt = sp.encode([p[1] for p in pairs])
    out = []
    for s, t in zip(src, tgt):
        if 0 < len(s) < max_tokens and 0 < len(t) < max_tokens:
            out.append((s + [cfg.eos_id], [cfg.bos_id] + t + [cfg.eos_id]))
    return out


def token_budget_batches(examples: list[tuple[list[int], list[int]]], max_batch_tokens: int,
                         seed: int | None = None) -> list[list[int]]:
    """Groups example indices into batches of at most ``max_batch_tokens`` padded tokens per side.

    Examples are sorted by length so that padding stays small; batch order is shuffled when ``seed`` is given.
    """
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i][0]), len(examples[i][1])))
    batches, current, longest = [], [], 0
    for i in order:
        longest_next = max(longest, len(examples[i][0]), len(examples[i][1]))
        if current and longest_next * (len(current) + 1) > max_batch_tokens:
            batches.append(current)
            current, longest_next = [], max(len(examples[i][0]), len(examples[i][1]))
        current.append(i)
        longest = longest_next
    if current:
        batches.append(current)
    if seed is not None:
        random.Random(seed).shuffle(batches)
    return batches


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pads a batch. Returns src_ids/src_mask [batch, src_len], tgt_in/tgt_out [batch, tgt_len - 1] (int64/bool)."""
    src_len = max(len(s) for s, _ in examples)
    tgt_len = max(len(t) for _, t in examples)
    src = torch.full((len(examples), src_len), pad_id, dtype=torch.long)
    tgt = torch.full((len(examples), tgt_len), pad_id, dtype=torch.long)
    for row, (s, t) in enumerate(examples):
        src[row, :len(s)] = torch.tensor(s)
        tgt[row, :len(t)] = torch.tensor(t)
    return dict(src_ids=src, src_mask=src != pad_id, tgt_in=tgt[:, :-1], tgt_out=tgt[:, 1:])


def iterate_batches(examples, batches: list[list[int]], pad_id: int, start: int = 0) -> Iterator[dict]:
    for b in batches[start:]:
        yield collate([examples[i] for i in b], pad_id)
