"""Synthetic training samples in LLaVA's conversation formats, tokenized and labelled the way
LLaVA's `train.py` does, and the collator that batches them.

Formats (from LLaVA's `conversation.py`):
  plain      (stage 1, `conv_llava_plain`): `<image>` + caption + "\\n"; loss on the caption and
             the newline only (`preprocess_plain`).
  vicuna_v1  (stage 2, `conv_vicuna_v1`): system + " " + "USER: <image>\\n<q1>" + " " +
             "ASSISTANT: <a1>" + "</s>" + "USER: <q2>" ...; loss on the assistant replies and
             their "</s>" only (`preprocess_v1`).

Ids come from `tokenizer_image_token` on the whole prompt, exactly as LLaVA feeds them. Labels
are found differently: `preprocess_v1` recounts tokens per round with per-tokenizer
corrections (and silently masks a whole sample when its count comes out wrong); here each
label boundary is the length of the prompt's prefix up to it, and a prefix that does not
tokenize as the start of the whole prompt is an error. The result is the same wherever
LLaVA's counting is right.

The data is learnable: each sample draws one of a few classes; the class sets the image (the
probe pattern with a class salt, at a random size) and the words of the caption, so a
projector can learn to say what it sees and the loss falls within a few steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..model.images import process_images
from ..model.probe import probe_image
from ..model.splice import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from .loop import TrainError

IMAGE_TOKEN = "<image>"
PLAIN_SEP = "\n"
V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
             "The assistant gives helpful, detailed, and polite answers to the user's questions.")
V1_ROLES = ("USER", "ASSISTANT")
V1_SEP, V1_SEP2 = " ", "</s>"

# Caption words the tiny tokenizer (trained on harness/synth/assets.py's corpus) splits into 1-3
# pieces, so captions stay short. One entry per class in each tuple.
COLOURS = ("red", "white", "dark", "green", "blue", "black", "red", "white")
THINGS = ("cat", "dog", "car", "bus", "kite", "ball", "clock", "tree")
PLACES = ("park", "lake", "sun", "park", "lake", "sun", "park", "lake")
CLASSES = len(THINGS)
# Salts far apart give visibly different probe patterns for neighbouring classes.
SALT_STEP = 37
SIZE_RANGE = (12, 48)  # image width/height in pixels: non-square, so `pad` preprocessing runs
QUESTIONS = ("What is in the image?", "Describe the picture.", "What do you see?")
FOLLOW_UP = "What colour is it?"


@dataclass
class Sample:
    """One training example: ids with IMAGE_TOKEN_INDEX for the image, labels with
    IGNORE_INDEX where no loss is taken, the PIL image, the id padding uses, the prompt."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    image: object
    pad_token_id: int
    prompt: str


def tokenizer_image_token(prompt: str, tokenizer) -> list[int]:
    """LLaVA's `tokenizer_image_token`: tokenize the text between `<image>` markers one piece
    at a time, keep one BOS at the start, and put IMAGE_TOKEN_INDEX where each marker was."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(IMAGE_TOKEN)]
    ids: list[int] = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(chunk[offset:])
    return ids


def pad_token_id(tokenizer) -> int:
    """LLaVA's plain and v1 training set `pad_token = unk_token` (Llama has no pad token)."""
    pad = tokenizer.pad_token_id
    pad = tokenizer.unk_token_id if pad is None else pad
    if pad is None:
        raise TrainError("the tokenizer has neither a pad nor an unk token to pad with")
    return pad


def labelled(tokenizer, segments: Sequence[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """(ids, labels) for a prompt given as consecutive (text, takes_loss) segments.

    Each segment's tokens are those between the tokenized lengths of the prompt's prefixes
    before and after it; every prefix must tokenize as the start of the whole prompt."""
    prompt = "".join(text for text, _ in segments)
    ids = tokenizer_image_token(prompt, tokenizer)
    labels = [IGNORE_INDEX] * len(ids)
    start, prefix = 0, ""
    for text, takes_loss in segments:
        prefix += text
        head = tokenizer_image_token(prefix, tokenizer)
        if ids[:len(head)] != head:
            raise TrainError(f"tokenizer: {prefix[-40:]!r} tokenizes differently alone than "
                            "inside the prompt, so its label boundary is ambiguous")
        if takes_loss:
            labels[start:len(head)] = ids[start:len(head)]
        start = len(head)
    return ids, labels


def plain_segments(caption: str) -> list[tuple[str, bool]]:
    """`conv_llava_plain`: the image, then the caption and the separator, which take loss."""
    return [(IMAGE_TOKEN, False), (caption + PLAIN_SEP, True)]


def v1_segments(turns: Sequence[tuple[str, str]]) -> list[tuple[str, bool]]:
    """`conv_vicuna_v1` for (question, answer) rounds, the image at the front of the first
    question (where `preprocess_multimodal` moves it). Joined, the segments are exactly
    `Conversation.get_prompt()` for SeparatorStyle.TWO."""
    user, assistant = V1_ROLES
    segments = []
    for i, (question, answer) in enumerate(turns):
        if i == 0:
            question = f"{IMAGE_TOKEN}\n{question}"
        head = f"{V1_SYSTEM}{V1_SEP}" if i == 0 else ""
        # The reply's leading space belongs to its first token ("▁word"), so the masked part
        # ends at the colon, as preprocess_v1's `instruction_len - 2` intends.
        segments.append((f"{head}{user}: {question}{V1_SEP}{assistant}:", False))
        segments.append((f" {answer}{V1_SEP2}", True))
    return segments


def caption_of(cls: int) -> str:
    return f"a {COLOURS[cls]} {THINGS[cls]} in the {PLACES[cls]}"


def image_of(cls: int, width: int, height: int):
    return probe_image(width, height, salt=SALT_STEP * cls)


def _draws(n: int, seed: int) -> list[tuple[int, int, int, int]]:
    """(class, width, height, variant) per sample, from a seeded torch generator."""
    if n < 1:
        raise TrainError(f"n={n!r}: need at least one sample")
    gen = torch.Generator().manual_seed(seed)
    classes = torch.randint(0, CLASSES, (n,), generator=gen)
    sizes = torch.randint(SIZE_RANGE[0], SIZE_RANGE[1] + 1, (n, 2), generator=gen)
    variants = torch.randint(0, len(QUESTIONS) * 2, (n,), generator=gen)
    return [(int(c), int(w), int(h), int(v)) for c, (w, h), v in
            zip(classes, sizes, variants, strict=True)]


def _sample(tokenizer, segments, image) -> Sample:
    ids, labels = labelled(tokenizer, segments)
    return Sample(torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long),
                  image, pad_token_id(tokenizer), "".join(text for text, _ in segments))


def plain_samples(tokenizer, n: int, seed: int = 0) -> list[Sample]:
    """n image-caption pairs in the `plain` format (stage 1)."""
    return [_sample(tokenizer, plain_segments(caption_of(c)), image_of(c, w, h))
            for c, w, h, _ in _draws(n, seed)]


def instruct_samples(tokenizer, n: int, seed: int = 0) -> list[Sample]:
    """n conversations in the `vicuna_v1` format (stage 2): one or two rounds about the
    image, the image in the first question."""
    out = []
    for c, w, h, variant in _draws(n, seed):
        turns = [(QUESTIONS[variant % len(QUESTIONS)], caption_of(c).capitalize() + ".")]
        if variant >= len(QUESTIONS):
            turns.append((FOLLOW_UP, f"It is {COLOURS[c]}."))
        out.append(_sample(tokenizer, v1_segments(turns), image_of(c, w, h)))
    return out


def collate(samples: Sequence[Sample], image_processor, config, *, dtype=None) -> dict:
    """A batch as LLaVA's DataCollatorForSupervisedDataset makes it: ids right-padded with the
    pad id, labels with IGNORE_INDEX, both cut to `tokenizer_model_max_length`, the attention
    mask, and the images preprocessed as the model's config says (`pad`: squared first).

    The attention mask comes from each sample's length rather than `ids != pad` (LLaVA's
    rule): the same for text without pad ids, and right for text that has one."""
    if not samples:
        raise TrainError("collate: no samples")
    pads = {s.pad_token_id for s in samples}
    if len(pads) != 1:
        raise TrainError(f"collate: samples disagree on the pad id ({sorted(pads)})")
    pad = pads.pop()
    seqs = [s.input_ids for s in samples]
    ids = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=pad)
    labels = torch.nn.utils.rnn.pad_sequence([s.labels for s in samples], batch_first=True,
                                             padding_value=IGNORE_INDEX)
    lengths = torch.tensor([len(s) for s in seqs])
    mask = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
    limit = getattr(config, "tokenizer_model_max_length", None)
    if limit:
        ids, labels, mask = ids[:, :limit], labels[:, :limit], mask[:, :limit]
    images = process_images([s.image for s in samples], image_processor, config)
    if dtype is not None:
        images = ([x.to(dtype) for x in images] if isinstance(images, list)
                  else images.to(dtype))
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "images": images}
