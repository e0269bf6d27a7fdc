"""CLIPin (`--clipin`): a non-contrastive plug-in beside the contrastive loss.

Per step, from the batch (images x, captions t) and the step's generator:

    views       x₁, x₂ = two independent ViewAugment draws of x; t₂ = a second caption: a random
                subset of the caption's sentences when it has several, else a word-dropout copy
                (each word dropped with probability 0.2, at least one kept)
    online      e_I = f_I(x₁), e_T = f_T(t) — the towers' normalised embeddings, which the
                contrastive loss uses as well (so the online image tower sees x₁);
                p_I = q_I(g_I(e_I)), p_T = q_T(g_T(e_T)): projection heads g and predictors q
                (MLPs: linear → batch norm → ReLU → linear)
    target      EMA copies f̄, ḡ of the towers and projection heads (no predictor), no gradient:
                z_I = ḡ_I(f̄_I(x₁)), z_I' = ḡ_I(f̄_I(x₂)), z_T = ḡ_T(f̄_T(t)), z_T' = ḡ_T(f̄_T(t₂))
    losses      L_inter = ½[cos(p_I, z_T) + cos(p_T, z_I)]     (image ↔ its caption, by ids)
                L_intra = ½[cos(p_I, z_I') + cos(p_T, z_T')]
                L = L_contrastive + λ_inter·L_inter + λ_intra·L_intra,   cos = pyclipfast.cosine_loss
    after step  θ̄ ← m·θ̄ + (1−m)·θ with torch._foreach_mul_ / _foreach_add_ (m = 0.95)

The heads sit on the towers' output embeddings (open_clip's projections play CLIPin's shared
pre-projectors), so p_I and p_T are functions of the full-batch embeddings the loop hands to loss
terms: under gradient caching (--chunk-size) their gradient reaches the towers chunk by chunk
like the contrastive loss's. The target encoders run without autograd, in chunks of
--chunk-size, so they add forward passes but no activation memory. On several processes each
rank embeds its own inputs with the targets; the heads and losses run on the gathered global
batch (their BatchNorm statistics are the global batch's), as in one process. Heads and targets are a
module of the run ("clipin"): checkpointed and restored on resume.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

import pyclipfast

from ..batches import TokenizedBatch
from ..data import sample_sentences, split_sentences
from ..evaluate import Embedder
from ..hooks import Hooks, LossContext
from .augment import ViewAugment
from .compositions import captions_per_image

Tokenizer = Callable[[list[str]], torch.Tensor]
WORD_DROPOUT = 0.2


def mlp(dim_in: int, hidden: int, dim_out: int) -> nn.Sequential:
    """Linear → BatchNorm (batch statistics only, no running buffers) → ReLU → Linear."""
    return nn.Sequential(nn.Linear(dim_in, hidden), nn.BatchNorm1d(hidden, track_running_stats=False),
                         nn.ReLU(inplace=True), nn.Linear(hidden, dim_out))


def ema_update(target: Sequence[torch.Tensor], online: Sequence[torch.Tensor], momentum: float) -> None:
    """θ_t ← m·θ_t + (1 − m)·θ_o in place, for every pair, with torch's foreach ops."""
    with torch.no_grad():
        torch._foreach_mul_(target, momentum)
        torch._foreach_add_(target, online, alpha=1.0 - momentum)


def text_view(caption: str, generator: torch.Generator, word_dropout: float = WORD_DROPOUT) -> str:
    """A second view of a caption: a random non-empty subset of its sentences, or with one sentence,
    the caption with each word dropped with probability `word_dropout` (at least one word kept)."""
    if len(split_sentences(caption)) > 1:
        return sample_sentences(caption, generator)
    words = caption.split()
    keep = (torch.rand(len(words), generator=generator) >= word_dropout).tolist()
    if not any(keep):
        keep[int(torch.randint(len(words), (1,), generator=generator))] = True
    return " ".join(word for word, kept in zip(words, keep) if kept)


class ClipinParts(nn.Module):
    """The modules CLIPin adds: online heads (trained) and the EMA targets (frozen).

    online: image/text projectors (D → hidden → out) and predictors (out → hidden → out).
    target: a copy of the CLIP model and of the two projectors, requires_grad False, eval mode.
    """

    def __init__(self, model: nn.Module, embed_dim: int, hidden: int, out: int) -> None:
        super().__init__()
        self.online = nn.ModuleDict({
            "image_projector": mlp(embed_dim, hidden, out), "image_predictor": mlp(out, hidden, out),
            "text_projector": mlp(embed_dim, hidden, out), "text_predictor": mlp(out, hidden, out),
        })
        self.target = nn.ModuleDict({
            "model": copy.deepcopy(model),
            "image_projector": copy.deepcopy(self.online["image_projector"]),
            "text_projector": copy.deepcopy(self.online["text_projector"]),
        })
        self.target.requires_grad_(False)
        self.target.eval()

    def ema_pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(target parameters, the online parameters they follow), in matching order."""
        pairs = [(self.target["model"], model)]
        pairs += [(self.target[name], self.online[name]) for name in ("image_projector", "text_projector")]
        target = [p for t, _ in pairs for p in t.parameters()]
        online = [p for _, o in pairs for p in o.parameters()]
        if len(target) != len(online) or any(t.shape != o.shape for t, o in zip(target, online)):
            raise ValueError("the target encoders do not mirror the online model")
        return target, online


class Clipin:
    """CLIPin's hooks for the training loop (see the module docstring).

    Args:
        model: the online CLIP model (open_clip), trained by the loop.
        tokenizer: its tokenizer (for the second caption views).
        embed_dim: the towers' embedding width D.
        lambda_inter, lambda_intra: weights of the two cosine losses.
        momentum: EMA momentum m of the targets.
        augment: the view augmentation.
        device, precision, chunk_size, backend: where and how the targets run and the loss is computed.
    """

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, embed_dim: int, *, lambda_inter: float,
                 lambda_intra: float, momentum: float, augment: ViewAugment, device: torch.device,
                 precision: str = "fp32", chunk_size: int = 256, backend: str = "auto") -> None:
        self.model, self.tokenizer, self.augment, self.backend = model, tokenizer, augment, backend
        self.lambda_inter, self.lambda_intra, self.momentum = lambda_inter, lambda_intra, momentum
        self.parts = ClipinParts(model, embed_dim, hidden=2 * embed_dim, out=embed_dim).to(device)
        self.target_embed = Embedder(self.parts.target["model"], device, precision, chunk_size)
        self._target_params, self._online_params = self.parts.ema_pairs(model)

    def hooks(self) -> Hooks:
        return Hooks(batch_transform=self.views, loss_terms=[self.loss_terms], after_step=self.update_targets,
                     modules={"clipin": self.parts})

    def views(self, batch: TokenizedBatch, generator: torch.Generator) -> TokenizedBatch:
        """x₁ replaces the images; x₂ and the tokens of t₂ go to batch.extra."""
        first, second = self.augment(batch.images, generator), self.augment(batch.images, generator)
        text_views = self.tokenizer([text_view(t, generator) for t in batch.texts])
        altered = torch.ones(batch.images.shape[0], dtype=torch.bool)
        return batch._replace(images=first, extra={**batch.extra, "image_view": second, "text_view": text_views,
                                                   "altered": altered})

    def loss_terms(self, context: LossContext) -> dict[str, torch.Tensor]:
        """λ_inter·L_inter and λ_intra·L_intra on the full batch."""
        batch, online, target = context.batch, self.parts.online, self.parts.target
        predicted_image = online["image_predictor"](online["image_projector"](context.image_features.float()))
        predicted_text = online["text_predictor"](online["text_projector"](context.text_features.float()))
        local, gather = context.local_batch, context.gather
        with torch.no_grad():  # targets of this rank's inputs, then joined (the projectors' BatchNorm: global batch)
            image = target["image_projector"](gather(self.target_embed.images(local.images)))
            image_view = target["image_projector"](gather(self.target_embed.images(local.extra["image_view"])))
            text = target["text_projector"](gather(self.target_embed.texts(local.tokens)))
            text_view_ = target["text_projector"](gather(self.target_embed.texts(local.extra["text_view"])))
        per_image = captions_per_image(batch)
        first_caption = torch.arange(0, len(text), per_image, device=text.device)  # image i ↔ its first caption
        own_image = torch.arange(len(text), device=text.device) // per_image  # caption j ↔ its image
        cos = lambda p, z: pyclipfast.cosine_loss(p, z, backend=self.backend)  # noqa: E731
        inter = 0.5 * (cos(predicted_image, text[first_caption]) + cos(predicted_text, image[own_image]))
        intra = 0.5 * (cos(predicted_image, image_view) + cos(predicted_text, text_view_))
        return {"clipin_inter": self.lambda_inter * inter, "clipin_intra": self.lambda_intra * intra}

    def update_targets(self, model: nn.Module, step: int) -> None:
        """The EMA step of the target encoders and projectors."""
        ema_update(self._target_params, self._online_params, self.momentum)
