"""Packing documents into fixed-length training sequences.

`pack_stream`: pre-training style — documents concatenated end to end (each followed by EOS) and
cut into rows of `seq_len`; a row's documents are kept apart by segment ids and their position ids
restart at 0 (no attention across documents).
`best_fit_pack`: mid-training style (GLM-4.5 uses best-fit packing only there) — whole documents
placed into bins by best-fit decreasing, never split; the rest of a bin is padding (segment id -1).
"""

from __future__ import annotations

import torch


def pack_stream(docs: list[list[int]], seq_len: int, eos_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, segment_ids, position_ids), each [rows, seq_len]; the tail that does not fill a
    row is dropped."""
    ids, seg, pos = [], [], []
    for d, doc in enumerate(docs):
        toks = list(doc) + [eos_id]
        ids += toks
        seg += [d] * len(toks)
        pos += list(range(len(toks)))
    rows = len(ids) // seq_len
    cut = rows * seq_len
    ids_t, seg_t = (torch.tensor(x[:cut], dtype=torch.long).view(rows, seq_len) for x in (ids, seg))
    return ids_t, seg_t, positions_from_segments(seg_t)


def positions_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """Position ids that restart at 0 where a segment starts (and at the start of every row)."""
    rows, T = segment_ids.shape
    col = torch.arange(T).expand(rows, T)
    starts = torch.cat([torch.ones(rows, 1, dtype=torch.bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    return col - torch.cummax(torch.where(starts, col, torch.zeros_like(col)), 1).values


def packed_loss_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """1 where token t is a target: it continues the segment of token t-1 and is not padding (-1)."""
    same = torch.cat([torch.zeros_like(segment_ids[:, :1], dtype=torch.bool),
                      segment_ids[:, 1:] == segment_ids[:, :-1]], 1)
    return (same & (segment_ids >= 0)).long()


def best_fit_pack(docs: list[list[int]], seq_len: int, pad_id: int, masks: list[list[int]] | None = None):
    """Best-fit decreasing: each document (longest first) goes to the fullest bin it fits in.
    Documents longer than seq_len are truncated to it. Returns (input_ids, segment_ids, position_ids,
    loss_mask): the loss mask is `masks` per document (1 = a target token) where given, else every
    token but each document's first; padding is never a target."""
    order = sorted(range(len(docs)), key=lambda i: -len(docs[i]))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = min(len(docs[i]), seq_len)
        best = min((f, b) for b, f in enumerate(free) if f >= n) if any(f >= n for f in free) else None
        if best is None:
            bins.append([i])
            free.append(seq_len - n)
        else:
            bins[best[1]].append(i)
            free[best[1]] -= n
    ids = torch.full((len(bins), seq_len), pad_id, dtype=torch.long)
    seg = torch.full((len(bins), seq_len), -1, dtype=torch.long)
    pos = torch.zeros((len(bins), seq_len), dtype=torch.long)
    mask = torch.zeros((len(bins), seq_len), dtype=torch.long)
    for r, members in enumerate(bins):
        at = 0
        for s, i in enumerate(members):
            doc = docs[i][:seq_len]
            n = len(doc)
            ids[r, at:at + n] = torch.tensor(doc)
            seg[r, at:at + n] = s
            pos[r, at:at + n] = torch.arange(n)
            mask[r, at:at + n] = torch.tensor(masks[i][:n]) if masks is not None else 1
            mask[r, at] = 0  # nothing predicts a document's first token
            at += n
    return ids, seg, pos, mask
