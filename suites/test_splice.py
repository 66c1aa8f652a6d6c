"""Splicing image features into token embeddings: the original's order and quirks, exactly.

An embedding table whose rows are their own index (and features filled with recognisable
constants) makes every position of the spliced sequence readable: the test states, position by
position, what LLaVA's `prepare_inputs_labels_for_multimodal` puts there.
"""

from __future__ import annotations

import pytest
import torch

from harness.model.splice import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    ImageCountError,
    images_needed,
    splice,
)

IMG = IMAGE_TOKEN_INDEX
HIDDEN = 3


def _embed(ids: torch.Tensor) -> torch.Tensor:
    """Row i of the table is [i, i, i]."""
    return ids.float()[:, None].expand(-1, HIDDEN).clone()


def _image(value: float, tokens: int = 2) -> torch.Tensor:
    return torch.full((tokens, HIDDEN), value)


def _firsts(embeds: torch.Tensor) -> list[float]:
    return embeds[..., 0].tolist()


def test_one_image_replaces_its_token_with_all_its_features():
    ids = torch.tensor([[1, 5, IMG, 6]])
    out = splice(ids, [_image(100.0)], _embed)
    assert _firsts(out.inputs_embeds) == [[1, 5, 100, 100, 6]]
    assert out.attention_mask is None and out.position_ids is None and out.labels is None


def test_images_are_consumed_in_order_across_rows():
    ids = torch.tensor([[IMG, 7, IMG], [8, IMG, 9]])
    out = splice(ids, [_image(100.0, 1), _image(200.0, 1), _image(300.0, 1)], _embed)
    assert _firsts(out.inputs_embeds) == [[100, 7, 200], [8, 300, 9]]


def test_a_row_without_image_tokens_still_consumes_an_image():
    """The original's quirk: row 0 has no image token but uses up image 0."""
    ids = torch.tensor([[4, 5, 6], [7, IMG, 8]])
    out = splice(ids, [_image(100.0, 1), _image(200.0, 1)], _embed)
    assert _firsts(out.inputs_embeds) == [[4, 5, 6], [7, 200, 8]]
    assert images_needed(ids) == 2


def test_too_few_images_is_a_clear_error():
    with pytest.raises(ImageCountError, match="consumes 2 images .* 1 were given"):
        splice(torch.tensor([[IMG, 1, IMG]]), [_image(1.0)], _embed)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_mask_positions_and_labels(side):
    ids = torch.tensor([[1, IMG, 2], [3, 4, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    labels = torch.tensor([[1, IMG, 2], [3, 4, IGNORE_INDEX]])
    out = splice(ids, [_image(100.0), _image(200.0)], _embed, attention_mask=mask,
                 position_ids=torch.arange(3)[None].expand(2, -1), labels=labels,
                 padding_side=side)
    # Row 0 grows to 4 (1 + 2 image tokens + 1); row 1 loses its padding (2) and its image.
    if side == "right":
        assert _firsts(out.inputs_embeds) == [[1, 100, 100, 2], [3, 4, 0, 0]]
        assert out.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
        assert out.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 0, 0]]
        assert out.labels.tolist() == [[1, IGNORE_INDEX, IGNORE_INDEX, 2],
                                       [3, 4, IGNORE_INDEX, IGNORE_INDEX]]
    else:
        assert _firsts(out.inputs_embeds) == [[1, 100, 100, 2], [0, 0, 3, 4]]
        assert out.attention_mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
        assert out.position_ids.tolist() == [[0, 1, 2, 3], [0, 0, 0, 1]]
    assert out.attention_mask.dtype == mask.dtype


def test_truncation_to_tokenizer_model_max_length():
    ids = torch.tensor([[1, IMG, 2, 3]])
    out = splice(ids, [_image(100.0, 4)], _embed, labels=ids.clone(), max_length=4)
    assert _firsts(out.inputs_embeds) == [[1, 100, 100, 100]]
    assert out.labels.tolist() == [[1] + [IGNORE_INDEX] * 3]


def test_the_check_sees_a_misplaced_image():
    """The expectations above are specific: features one slot off would fail them."""
    ids = torch.tensor([[1, 5, IMG, 6]])
    out = splice(ids, [_image(100.0)], _embed)
    assert _firsts(out.inputs_embeds) != [[1, 100, 100, 5, 6]]
