"""Training examples to batches: tokenized with completion-only labels, then padded or packed into rows."""

from __future__ import annotations

import torch

from ftstudy.prompt import IGNORE_INDEX, tokenize_example

WIDTH_BUCKETS = 4  # batch widths under compiled layers: max_seq_len / 4, / 2, 3/4 and whole


class Collator:
    """Batches tokenized examples.

    Padded (``pack=False``): rows right-padded to the longest, padding with IGNORE_INDEX labels and a zero
    attention mask. Packed: the examples laid out first-fit-decreasing into rows of at most ``row_len`` tokens,
    positions restarting at each example and no attention mask, from which transformers builds a block-diagonal
    causal mask, so no example attends to another; each example's first label is IGNORE_INDEX, so none predicts
    the next one's first token. The rest of a row is padding that restarts its positions too (its own block,
    which no token attends to). Same examples, same loss (tested), little compute spent on padding.

    Rows, not the whole batch as one sequence: SDPA has no variable-length kernel, so a packed sequence gets
    a dense mask and its attention costs the square of its length: on an H200 a QLoRA step of 64 x 512 tokens as
    one sequence took 3.3x as long as one of 32 x 512. Rows of ``row_len`` cost what a padded batch's rows do.
    ``num_tokens`` (the non-padding tokens) rides along for the throughput metrics, as a Python int: counted here,
    on the host, it never makes the training loop wait for the GPU.
    """

    def __init__(self, pad_id: int, pack: bool = False, row_len: int | None = None, width_buckets: int = 0):
        self.pad_id = pad_id
        self.pack = pack
        self.row_len = row_len
        # > 0: rows padded up to the next of that many equal steps of row_len, not to the fullest row, so that
        # batches come in at most that many shapes (each one is compiled and recorded as a CUDA graph once).
        self.width_buckets = width_buckets

    def _width(self, fullest: int) -> int:
        if not (self.width_buckets and self.row_len):
            return fullest
        step = -(-self.row_len // self.width_buckets)
        return min(max(-(-fullest // step) * step, step), max(self.row_len, fullest))

    def rows(self, lengths: list[int]) -> list[list[int]]:
        """Example indices per row, first-fit decreasing into rows of ``row_len`` (one per example if None)."""
        cap = self.row_len or 0
        rows: list[list[int]] = []
        room: list[int] = []
        for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            j = next((j for j, r in enumerate(room) if r >= lengths[i]), None)
            if j is None:
                rows.append([i])
                room.append(cap - lengths[i])
            else:
                rows[j].append(i)
                room[j] -= lengths[i]
        return rows

    def __call__(self, examples: list[dict]) -> dict:
        if self.pack:
            lengths = [len(e["input_ids"]) for e in examples]
            layout = self.rows(lengths)
            width = self._width(max(sum(lengths[i] for i in row) for row in layout))
            ids = torch.full((len(layout), width), self.pad_id, dtype=torch.long)
            labels = torch.full((len(layout), width), IGNORE_INDEX, dtype=torch.long)
            positions = torch.zeros((len(layout), width), dtype=torch.long)
            for r, row in enumerate(layout):
                at = 0
                for i in row:
                    e, n = examples[i], lengths[i]
                    ids[r, at:at + n] = torch.tensor(e["input_ids"])
                    labels[r, at + 1:at + n] = torch.tensor(e["labels"][1:])
                    positions[r, at:at + n] = torch.arange(n)
                    at += n
                positions[r, at:] = torch.arange(width - at)
            return {"input_ids": ids, "labels": labels, "position_ids": positions,
                    "num_tokens": sum(lengths)}
        width = self._width(max(len(e["input_ids"]) for e in examples))
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[i, :n] = torch.tensor(e["input_ids"])
            labels[i, :n] = torch.tensor(e["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask,
                "num_tokens": sum(len(e["input_ids"]) for e in examples)}


def packed_batches(packing: bool, levers: list[str]) -> bool:
    """Whether batches are packed: ``train.packing``, except into compiled layers.

    Each packed batch has its own row count, so compiled layers would compile (and record CUDA graphs) for nearly
    every batch; padded batches come in the collator's few width buckets. Packed rows into compiled layers once
    computed wrong weight gradients on an H200, but so did padded ones: both through SDPA under a mask, which
    compiled layers no longer use (``fastpath.compile_layers``). What keeps them padded is the shapes.
    """
    return packing and "compiled_layers" not in levers


def tokenize_dataset(tokenizer, records: list[dict], max_seq_len: int, max_prompt_tokens: int) -> list[dict]:
    return [tokenize_example(tokenizer, r, max_seq_len, max_prompt_tokens) for r in records]
