"""Learnable prompt context (CoOp style) shared by all classes, with exact save/restore.

The prompt for class c is ``[SOS] ctx_1 .. ctx_n <class tokens> . [EOS]``; only the ctx vectors
are learnable. They start from the word embeddings of "a photo of a", so at its initial value
the prompt reproduces the zero-shot classifier "a photo of a {class}.".

Because the text transformer is causal, the end-of-text feature depends only on the positions
up to EOS; we therefore run the transformer over the longest prompt of the label set instead of
the full 77-token context (an exact speed-up: same outputs up to float rounding).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from tta.models import ClipModel

DEFAULT_CTX_INIT = "a photo of a"


def encode_text_embeddings(
    clip: ClipModel, x: torch.Tensor, eot_index: torch.Tensor
) -> torch.Tensor:
    """open_clip's `encode_text`, starting from token embeddings [B, L, D] (L may be < 77)."""
    model = clip.model
    length = x.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = x.to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    attn_mask = model.attn_mask[:length, :length] if model.attn_mask is not None else None
    x = model.transformer(x, attn_mask=attn_mask)
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), eot_index]
    projection = model.text_projection
    if projection is not None:
        x = projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection
    return x


class PromptLearner:
    """Per-label-set prompt: frozen class-token embeddings + a learnable shared context."""

    def __init__(
        self,
        clip: ClipModel,
        classnames: Sequence[str],
        n_ctx: int = 4,
        ctx_init: str | None = DEFAULT_CTX_INIT,
        truncate: bool = True,
        seed: int = 0,
    ) -> None:
        self.clip = clip
        self.classnames = tuple(classnames)
        model = clip.model
        device = clip.device
        if ctx_init:
            init_tokens = clip.tokenizer([ctx_init])[0]
            init_len = int(init_tokens.argmax()) - 1  # tokens between SOS and EOS
            if init_len != n_ctx:
                ctx_init = None
        prefix_text = ctx_init if ctx_init else " ".join(["X"] * n_ctx)
        tokens = clip.tokenizer([f"{prefix_text} {name}." for name in self.classnames]).to(device)
        with torch.no_grad():
            embedding = model.token_embedding(tokens).float()
        self.eot_index = tokens.argmax(dim=-1)
        self.length = int(self.eot_index.max()) + 1 if truncate else tokens.shape[1]
        self.n_ctx = n_ctx
        self.token_prefix = embedding[:, :1, :]
        self.token_suffix = embedding[:, 1 + n_ctx : self.length, :]
        if ctx_init:
            ctx = embedding[0, 1 : 1 + n_ctx, :].clone()
        else:
            gen = torch.Generator().manual_seed(seed)
            ctx = torch.randn(n_ctx, embedding.shape[-1], generator=gen).mul_(0.02).to(device)
        self.ctx_init = ctx.detach().clone()
        self.ctx = torch.nn.Parameter(ctx.detach().clone())

    def __len__(self) -> int:
        return len(self.classnames)

    def prompt_embeddings(self, ctx: torch.Tensor, classes: slice = slice(None)) -> torch.Tensor:
        prefix = self.token_prefix[classes]
        suffix = self.token_suffix[classes]
        ctx = ctx.unsqueeze(0).expand(prefix.shape[0], -1, -1)
        return torch.cat([prefix, ctx.to(prefix.dtype), suffix], dim=1)

    def text_features(self, ctx: torch.Tensor | None = None, classes: slice = slice(None)) -> torch.Tensor:
        """Normalised [C, d] class features for the given (default: current) context."""
        ctx = self.ctx if ctx is None else ctx
        x = self.prompt_embeddings(ctx, classes)
        return F.normalize(encode_text_embeddings(self.clip, x, self.eot_index[classes]).float(), dim=-1)

    # --- save / restore: episodic methods must leave no trace ---------------------------------
    def save(self) -> torch.Tensor:
        return self.ctx.detach().clone()

    def restore(self, saved: torch.Tensor) -> None:
        with torch.no_grad():
            self.ctx.copy_(saved)
        self.ctx.grad = None

    def reset(self) -> None:
        """Back to the initial context, bit-exact."""
        self.restore(self.ctx_init)

    @contextlib.contextmanager
    def episode(self) -> Iterator[torch.nn.Parameter]:
        """Yield the context for one request's updates; restore it afterwards, even on error."""
        saved = self.save()
        try:
            yield self.ctx
        finally:
            self.restore(saved)
