"""A straightforward TPT written from the paper (Shu et al., NeurIPS 2022): the bench's baseline
and the reference the equivalence tests compare the fast implementation with.

Deliberately plain, as the published code runs it (minus AMP): every forward pass re-encodes all
views with the image encoder and runs the prompted text encoder over CLIP's full 77-token context
for every class, in fp32, with autograd keeping every activation. It shares nothing with
`tta.prompts` or `tta.methods.tpt` so that it is an independent check of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from tta.models import ClipModel


class ReferencePrompt(torch.nn.Module):
    """CoOp prompt "[SOS] ctx_1..ctx_4 {class}. [EOS]" over the full context length."""

    def __init__(self, clip: ClipModel, classnames: Sequence[str], ctx_init: str = "a photo of a") -> None:
        super().__init__()
        self.clip = clip
        n_ctx = len(ctx_init.split())
        tokens = clip.tokenizer([f"{ctx_init} {name}." for name in classnames]).to(clip.device)
        with torch.no_grad():
            embedding = clip.model.token_embedding(tokens).float()
        self.register_buffer("tokens", tokens)
        self.register_buffer("prefix", embedding[:, :1])
        self.register_buffer("suffix", embedding[:, 1 + n_ctx :])
        self.ctx_init = embedding[0, 1 : 1 + n_ctx].clone()
        self.ctx = torch.nn.Parameter(self.ctx_init.clone())

    def reset(self) -> None:
        with torch.no_grad():
            self.ctx.copy_(self.ctx_init)

    def text_features(self) -> torch.Tensor:
        model = self.clip.model
        n = self.prefix.shape[0]
        x = torch.cat([self.prefix, self.ctx.unsqueeze(0).expand(n, -1, -1), self.suffix], dim=1)
        x = x + model.positional_embedding
        x = model.transformer(x, attn_mask=model.attn_mask)
        x = model.ln_final(x)
        x = x[torch.arange(n), self.tokens.argmax(dim=-1)] @ model.text_projection
        return F.normalize(x, dim=-1)


def image_features(clip: ClipModel, views: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(clip.model.encode_image(views).float(), dim=-1)


def select_confident_samples(logits: torch.Tensor, top: float) -> torch.Tensor:
    """Indices of the lowest-entropy fraction `top` of the views (the paper's confidence selection)."""
    entropy = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
    return torch.argsort(entropy, descending=False)[: max(1, int(logits.shape[0] * top))]


def avg_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the mean of the views' softmax, averaged in log space."""
    log_p = logits - logits.logsumexp(dim=-1, keepdim=True)
    avg = log_p.logsumexp(dim=0) - math.log(log_p.shape[0])
    avg = torch.clamp(avg, min=torch.finfo(avg.dtype).min)
    return -(avg * avg.exp()).sum(dim=-1)


def reference_tpt(
    clip: ClipModel,
    prompt: ReferencePrompt,
    views: torch.Tensor,
    selection_p: float = 0.1,
    lr: float = 5e-3,
    steps: int = 1,
    weight_decay: float = 0.01,
) -> dict[str, torch.Tensor]:
    """One TPT request on normalised views [N, 3, S, S] (view 0 = the original image)."""
    scale = clip.model.logit_scale.exp().item()
    prompt.reset()
    optimizer = torch.optim.AdamW([prompt.ctx], lr=lr, weight_decay=weight_decay)
    selected = None
    with torch.enable_grad():
        for _ in range(steps):
            logits = scale * image_features(clip, views) @ prompt.text_features().t()
            if selected is None:
                selected = select_confident_samples(logits.detach(), selection_p)
            loss = avg_entropy(logits[selected])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        probs = (scale * image_features(clip, views[:1]) @ prompt.text_features().t()).softmax(-1)[0]
        ctx = prompt.ctx.detach().clone()
    prompt.reset()
    return {"probs": probs, "selected": selected, "ctx": ctx}
