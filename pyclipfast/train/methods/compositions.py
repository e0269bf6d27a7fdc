"""CLIP-C semantic compositions in the trainer (`--clipc-rate ρ`): a batch transform.

`data.semantic_compositions` draws, with probability ρ per element, a composite of the element
and a partner (centre halves side by side, caption "<caption 1> and <caption 2>"). Here that
becomes a step of the loop:

    - partners are redrawn every step from the step's generator (a pure function of (seed, step)),
      so a resumed run composes exactly the batches the uninterrupted run composed;
    - with several captions per image (--caption all, or a list of modes) each caption mode is
      composed with the same partners: "<short 1> and <short 2>", "<detailed 1> and <detailed 2>";
    - a composite is a new sample: it gets a fresh id (`id_offset` + its position in the global
      batch, above every dataset id), and so do its captions, so multi-positive ids stay right —
      the composite's captions are its positives, nothing else is;
    - plain InfoNCE then treats each composite as an ordinary positive pair;
    - batch.extra["altered"] marks the composites (a teacher cache must not serve them).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..batches import TokenizedBatch
from ..data import semantic_compositions

Tokenizer = Callable[[list[str]], torch.Tensor]


def captions_per_image(batch: TokenizedBatch) -> int:
    """k when the texts are image-major (texts k·i … k·i + k − 1 belong to image i); else ValueError."""
    images, texts = batch.images.shape[0], len(batch.texts or ())
    if batch.texts is None or texts % images:
        raise ValueError(f"a batch of {images} images needs k captions per image in its texts, got {texts} texts")
    per_image = texts // images
    if batch.image_ids is None:
        if per_image != 1:
            raise ValueError("without ids a batch must hold exactly one caption per image")
        return 1
    if not torch.equal(batch.text_ids.view(images, per_image), batch.image_ids.view(-1, 1).expand(-1, per_image)):
        raise ValueError("texts must come image by image (collate_clip's order) with their image's id")
    return per_image


class Compositions:
    """The CLIP-C batch transform.

    Args:
        rate: ρ, the probability that an element becomes a composite, in [0, 1].
        tokenizer: the model's tokenizer (composite captions are tokenized again).
        id_offset: the first fresh id; larger than every dataset id (the training set size).
        rank: this process's rank; composites get id_offset + rank·b + i for a per-rank batch of b.
    """

    def __init__(self, rate: float, tokenizer: Tokenizer, id_offset: int, rank: int = 0) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be in [0, 1], got {rate}")
        self.rate, self.tokenizer, self.id_offset, self.rank = rate, tokenizer, id_offset, rank

    def __call__(self, batch: TokenizedBatch, generator: torch.Generator) -> TokenizedBatch:
        per_image = captions_per_image(batch)
        state = generator.get_state()
        texts = list(batch.texts)
        for mode in range(per_image):  # the same draws for every caption mode: the same partners
            replay = torch.Generator().set_state(state)
            images, captions, composite = semantic_compositions(batch.images, texts[mode::per_image], self.rate,
                                                                replay)
            texts[mode::per_image] = captions
        generator.set_state(replay.get_state())
        changed = composite.repeat_interleave(per_image)
        tokens = batch.tokens.clone()
        if changed.any():
            tokens[changed] = self.tokenizer([texts[i] for i in changed.nonzero().flatten().tolist()])
        image_ids, text_ids = self._ids(batch, composite, per_image)
        altered = batch.extra.get("altered", torch.zeros_like(composite)) | composite
        return batch._replace(images=images, tokens=tokens, image_ids=image_ids, text_ids=text_ids,
                              texts=tuple(texts), extra={**batch.extra, "altered": altered})

    def _ids(self, batch: TokenizedBatch, composite: torch.Tensor, per_image: int):
        """Fresh ids for the composites and their captions (no ids: the diagonal stays right)."""
        if batch.image_ids is None:
            return None, None
        count = batch.images.shape[0]
        if int(batch.image_ids.max()) >= self.id_offset:
            raise ValueError(f"dataset ids reach {int(batch.image_ids.max())}, not below id_offset {self.id_offset}")
        fresh = self.id_offset + self.rank * count + torch.arange(count, device=batch.image_ids.device)
        image_ids = torch.where(composite, fresh, batch.image_ids)
        return image_ids, image_ids.repeat_interleave(per_image)
