"""Learnable prompt context (CoOp style) shared by all classes, with exact save/restore.

The prompt for class c is ``[SOS] ctx_1 .. ctx_n <class tokens> . [EOS]``; only the ctx vectors
are learnable. They start from the word embeddings of "a photo of a", so at its initial value
the prompt reproduces the zero-shot classifier "a photo of a {class}.".

Exact speed-ups of the prompted text encoder (same outputs up to float rounding), all resting on
the text transformer being causal, so the end-of-text (EOT) feature depends only on positions
up to EOT:

- truncation: positions after a prompt's EOT are never computed (CLIP pads to 77 tokens; ImageNet
  prompts are 7-18 tokens long);
- length buckets: classes are grouped by prompt length, each group truncated to its own length;
- shared prefix: ``[SOS] ctx_1 .. ctx_n`` is the same for every class and, being causal, so are its
  hidden states; they are computed once per layer and their keys/values are shared by all
  classes, whose own positions (class tokens, '.', EOS) are the only per-class work;
- last layer: only the EOT row is a query there (the other rows' outputs are never read).

Towers that are not the standard open_clip text transformer fall back to plain truncation.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from tta.models import ClipModel

DEFAULT_CTX_INIT = "a photo of a"
NOGRAD_GROUP_CLASSES = 512  # classes per transformer call when no graph is kept (memory is transient)

Classes = slice | torch.Tensor | Sequence[int]


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
    return _project(model, x)


def _project(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    projection = model.text_projection
    if projection is not None:
        x = projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection
    return x


def shared_prefix_supported(model: torch.nn.Module) -> bool:
    """True for the standard open_clip text tower (causal mask, plain residual attention blocks)."""
    from open_clip.transformer import ResidualAttentionBlock

    transformer = getattr(model, "transformer", None)
    if transformer is None or getattr(model, "attn_mask", None) is None:
        return False
    if not getattr(transformer, "batch_first", False) or getattr(model, "cls_emb", None) is not None:
        return False
    if getattr(model, "text_pool_type", "argmax") != "argmax":
        return False
    for block in transformer.resblocks:
        if type(block) is not ResidualAttentionBlock or hasattr(block, "ln_1_kv"):
            return False
        attn = block.attn
        if not (attn.batch_first and attn._qkv_same_embed_dim and attn.in_proj_bias is not None):
            return False
    return True


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, length, width = x.shape
    return x.view(batch, length, heads, width // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    batch, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * dim)


def _qkv(block: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    attn = block.attn
    q, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    heads = attn.num_heads
    return _split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads)


def _finish_block(block: torch.nn.Module, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    x = x + block.ls_1(block.attn.out_proj(_merge_heads(attended)))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def prefix_keys_values(model: torch.nn.Module, prefix: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer keys/values [1, H, P, Dh] of the class-independent prefix embeddings [P, D]."""
    length = prefix.shape[0]
    cast_dtype = model.transformer.get_cast_dtype()
    x = (prefix.to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)).unsqueeze(0)
    blocks = model.transformer.resblocks
    out = []
    for i, block in enumerate(blocks):
        q, k, v = _qkv(block, x)
        out.append((k, v))
        if i + 1 < len(blocks):  # the last layer's prefix outputs are never read
            x = _finish_block(block, x, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    return out


def encode_suffixes(
    model: torch.nn.Module,
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]],
    suffix: torch.Tensor,
    eot_in_suffix: torch.Tensor,
) -> torch.Tensor:
    """Unnormalised text features [B, d] of per-class suffix embeddings [B, S, D] after a shared prefix."""
    batch, length, _ = suffix.shape
    prefix_len = prefix_kv[0][0].shape[2]
    device = suffix.device
    cast_dtype = model.transformer.get_cast_dtype()
    positions = model.positional_embedding[prefix_len : prefix_len + length].to(cast_dtype)
    x = suffix.to(cast_dtype) + positions
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    mask = torch.cat([torch.ones(length, prefix_len, dtype=torch.bool, device=device), causal], dim=1)
    rows = torch.arange(batch, device=device)
    blocks = model.transformer.resblocks
    for i, block in enumerate(blocks):
        q, k, v = _qkv(block, x)
        keys = torch.cat([prefix_kv[i][0].expand(batch, -1, -1, -1), k], dim=2)
        values = torch.cat([prefix_kv[i][1].expand(batch, -1, -1, -1), v], dim=2)
        if i + 1 < len(blocks):
            x = _finish_block(block, x, F.scaled_dot_product_attention(q, keys, values, attn_mask=mask))
        else:  # last layer: the EOT row is the only query whose output is read
            q_eot = q[rows, :, eot_in_suffix].unsqueeze(2)  # [B, H, 1, Dh]
            row_mask = mask[eot_in_suffix].unsqueeze(1).unsqueeze(1)  # [B, 1, 1, P + S]
            attended = F.scaled_dot_product_attention(q_eot, keys, values, attn_mask=row_mask)
            x = _finish_block(block, x[rows, eot_in_suffix].unsqueeze(1), attended)[:, 0]
    return _project(model, model.ln_final(x))


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32; fp64 stays fp64, so a float64 copy of the model gives a float64 reference."""
    return x if x.dtype == torch.float64 else x.float()


def _as_index(classes: Classes, n: int, device: torch.device) -> torch.Tensor:
    if isinstance(classes, slice):
        return torch.arange(n, device=device)[classes]
    return torch.as_tensor(classes, dtype=torch.long, device=device).flatten()


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
        shared_prefix: bool = True,
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
            embedding = _at_least_fp32(model.token_embedding(tokens))
        self.eot_index = tokens.argmax(dim=-1)
        self.length = int(self.eot_index.max()) + 1 if truncate else tokens.shape[1]
        self.n_ctx = n_ctx
        self.token_prefix = embedding[:, :1, :]
        self.token_suffix = embedding[:, 1 + n_ctx : self.length, :]
        self.fast = truncate and shared_prefix and shared_prefix_supported(model)
        # length-sorted order: groups of equal prompt length need no padding at all
        self.order = torch.argsort(self.eot_index, stable=True)
        if ctx_init:
            ctx = embedding[0, 1 : 1 + n_ctx, :].clone()
        else:
            gen = torch.Generator().manual_seed(seed)
            ctx = torch.randn(n_ctx, embedding.shape[-1], generator=gen).mul_(0.02).to(device)
        self.ctx_init = ctx.detach().clone()
        self.ctx = torch.nn.Parameter(ctx.detach().clone())
        self._initial: torch.Tensor | None = None
        self._initial_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.classnames)

    def prompt_embeddings(self, ctx: torch.Tensor, classes: slice = slice(None)) -> torch.Tensor:
        prefix = self.token_prefix[classes]
        suffix = self.token_suffix[classes]
        ctx = ctx.unsqueeze(0).expand(prefix.shape[0], -1, -1)
        return torch.cat([prefix, ctx.to(prefix.dtype), suffix], dim=1)

    def groups(self, classes: Classes = slice(None), max_classes: int | None = None) -> list[torch.Tensor]:
        """Class indices split into groups of equal prompt length (at most `max_classes` each)."""
        index = _as_index(classes, len(self), self.eot_index.device)
        lengths = self.eot_index[index]
        sort = torch.argsort(lengths, stable=True)
        index, lengths = index[sort], lengths[sort]
        values, counts = torch.unique_consecutive(lengths, return_counts=True)
        out: list[torch.Tensor] = []
        for group in torch.split(index, counts.tolist()):
            step = max_classes or group.numel()
            out.extend(torch.split(group, step))
        return out

    def _encode_group(self, ctx: torch.Tensor, group: torch.Tensor, prefix_kv: list | None) -> torch.Tensor:
        if prefix_kv is None:  # generic tower: truncated full prompts
            x = self.prompt_embeddings(ctx, group)
            length = int(self.eot_index[group].max()) + 1
            return encode_text_embeddings(self.clip, x[:, :length], self.eot_index[group])
        start = 1 + self.n_ctx
        eot = self.eot_index[group]
        length = int(eot.max()) + 1
        suffix = self.token_suffix[group, : length - start]
        return encode_suffixes(self.clip.model, prefix_kv, suffix, eot - start)

    def prefix_kv(self, ctx: torch.Tensor) -> list | None:
        """Shared keys/values of ``[SOS] ctx`` (None when the tower needs the generic path)."""
        if not self.fast:
            return None
        prefix = torch.cat([self.token_prefix[0], ctx.to(self.token_prefix.dtype)], dim=0)
        return prefix_keys_values(self.clip.model, prefix)

    def text_features(
        self,
        ctx: torch.Tensor | None = None,
        classes: Classes = slice(None),
        max_group: int | None = None,
    ) -> torch.Tensor:
        """Normalised [len(classes), d] class features for the given (default: current) context.

        Differentiable with respect to `ctx` when grad is enabled; rows follow `classes`' order.
        """
        ctx = self.ctx if ctx is None else ctx
        index = _as_index(classes, len(self), self.eot_index.device)
        if max_group is None and not torch.is_grad_enabled():
            max_group = NOGRAD_GROUP_CLASSES
        prefix_kv = self.prefix_kv(ctx)
        groups = self.groups(index, max_group)
        feats = _at_least_fp32(torch.cat([self._encode_group(ctx, g, prefix_kv) for g in groups]))
        # rows are in group order; put them back in the order asked for
        position = torch.empty(len(self), dtype=torch.long, device=index.device)
        position[torch.cat(groups)] = torch.arange(index.numel(), device=index.device)
        return F.normalize(feats[position[index]], dim=-1)

    def initial_text_features(self) -> torch.Tensor:
        """Features at the initial context, computed once per label set (every episode starts there)."""
        with self._initial_lock:
            if self._initial is None:
                with torch.no_grad():
                    self._initial = self.text_features(self.ctx_init)
            return self._initial

    def at_initial_context(self) -> bool:
        return bool(torch.equal(self.ctx.detach(), self.ctx_init))

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
