"""Splicing image features into the token embeddings, as LLaVA's
`prepare_inputs_labels_for_multimodal` does, step for step.

Per row: drop the padding (attention mask), cut the ids at every IMAGE_TOKEN_INDEX, embed the
text pieces, put one image's features in place of each image token, label image positions
IGNORE_INDEX, truncate to `tokenizer_model_max_length`, then pad the rows back to one length
(right or left, `tokenizer_padding_side`) with fresh attention mask and position ids.

The original's quirks are kept, because they decide which image goes where: a row with no image
token still consumes one image (its features are dropped); images are consumed in order across
the batch. Where the original would crash (IndexError: too few images), this raises a clear
error instead.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import HarnessError

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200


class ImageCountError(HarnessError):
    pass


@dataclass
class Spliced:
    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    labels: torch.Tensor | None


def images_needed(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> int:
    """How many images a batch consumes: one per image token, and one per row with none."""
    total = 0
    for row, ids in enumerate(input_ids):
        if attention_mask is not None:
            ids = ids[attention_mask[row].bool()]
        total += max(int((ids == IMAGE_TOKEN_INDEX).sum()), 1)
    return total


def _row_pieces(ids: torch.Tensor, labels: torch.Tensor) -> tuple[list, list]:
    """Split a row at its image tokens: the text pieces (ids, labels) between them."""
    cuts = [-1] + torch.where(ids == IMAGE_TOKEN_INDEX)[0].tolist() + [ids.shape[0]]
    id_pieces = [ids[a + 1:b] for a, b in itertools.pairwise(cuts)]
    label_pieces = [labels[a + 1:b] for a, b in itertools.pairwise(cuts)]
    return id_pieces, label_pieces


def _splice_row(ids, labels, features: Sequence[torch.Tensor], next_image: int,
                embed: Callable, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    count = int((ids == IMAGE_TOKEN_INDEX).sum())
    if count == 0:
        # The original embeds the text and appends a zero-length slice of the next image's
        # features: the image is consumed, nothing is added.
        embeds = torch.cat([embed(ids), features[next_image][0:0]], dim=0)
        return embeds, labels, next_image + 1
    id_pieces, label_pieces = _row_pieces(ids, labels)
    text = torch.split(embed(torch.cat(id_pieces)), [p.shape[0] for p in id_pieces], dim=0)
    embeds, new_labels = [], []
    for i in range(count + 1):
        embeds.append(text[i])
        new_labels.append(label_pieces[i])
        if i < count:
            feats = features[next_image]
            next_image += 1
            embeds.append(feats)
            new_labels.append(torch.full((feats.shape[0],), IGNORE_INDEX,
                                         device=labels.device, dtype=labels.dtype))
    embeds = torch.cat([e.to(device) for e in embeds])
    return embeds, torch.cat(new_labels), next_image


def _pad_rows(rows: list[torch.Tensor], row_labels: list[torch.Tensor], left: bool,
              mask_dtype, pos_dtype):
    max_len = max(r.shape[0] for r in rows)
    batch = len(rows)
    labels = torch.full((batch, max_len), IGNORE_INDEX, dtype=row_labels[0].dtype,
                        device=row_labels[0].device)
    mask = torch.zeros((batch, max_len), dtype=mask_dtype, device=row_labels[0].device)
    positions = torch.zeros((batch, max_len), dtype=pos_dtype, device=row_labels[0].device)
    padded = []
    for i, (row, lab) in enumerate(zip(rows, row_labels)):
        n = row.shape[0]
        pad = torch.zeros((max_len - n, row.shape[1]), dtype=row.dtype, device=row.device)
        padded.append(torch.cat((pad, row) if left else (row, pad), dim=0))
        if n > 0:
            span = slice(max_len - n, max_len) if left else slice(0, n)
            labels[i, span] = lab
            mask[i, span] = True
            positions[i, span] = torch.arange(0, n, dtype=pos_dtype, device=positions.device)
    return torch.stack(padded, dim=0), labels, mask, positions


def splice(input_ids: torch.Tensor, features: Sequence[torch.Tensor], embed: Callable, *,
           attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
           labels: torch.Tensor | None = None, max_length: int | None = None,
           padding_side: str = "right", device=None) -> Spliced:
    """`features[i]` is the i-th image's projected features [tokens, hidden]."""
    needed = images_needed(input_ids, attention_mask)
    if needed > len(features):
        raise ImageCountError(
            f"the input consumes {needed} images (one per image token {IMAGE_TOKEN_INDEX}, and "
            f"one per row without any, as the original does) but {len(features)} were given")
    mask = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
            else attention_mask.bool())
    all_labels = torch.full_like(input_ids, IGNORE_INDEX) if labels is None else labels
    pos_dtype = position_ids.dtype if position_ids is not None else torch.long
    rows, row_labels, next_image = [], [], 0
    for ids, row_mask, lab in zip(input_ids, mask, all_labels):
        embeds, new_lab, next_image = _splice_row(ids[row_mask], lab[row_mask], features,
                                                  next_image, embed, device)
        rows.append(embeds[:max_length] if max_length is not None else embeds)
        row_labels.append(new_lab[:max_length] if max_length is not None else new_lab)
    embeds, new_labels, new_mask, positions = _pad_rows(
        rows, row_labels, padding_side == "left", mask.dtype, pos_dtype)
    return Spliced(
        inputs_embeds=embeds,
        attention_mask=None if attention_mask is None else new_mask.to(attention_mask.dtype),
        position_ids=None if position_ids is None else positions,
        labels=None if labels is None else new_labels,
    )
