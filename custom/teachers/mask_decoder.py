"""SAM's mask decoder, evaluated for a few prompt tokens over many image tokens with less work.

Segment Anything's two-way transformer projects all ``h*w`` image tokens (4096 for a 64x64
embedding) through ``Linear(256, 128)`` layers for every prompt, while each prompt has only
``T = 7`` tokens (iou + 4 mask tokens + 2 box corners). Attention is linear in its projections, so
the same result comes from projecting on the token side instead:

- token -> image attention: the scores ``q_h . (W_k x_j + b_k)`` equal ``(W_k,h^T q_h) . x_j`` plus a
  per-query constant that softmax ignores, and the output ``A (W_v x + b_v)`` equals
  ``W_v (A x) + b_v`` because each row of ``A`` sums to one;
- image -> token attention: the scores ``(W_q,h x_j + b_q) . k_h`` equal ``x_j . (W_q,h^T k_h) + b_q . k_h``,
  and the output projection is applied to the ``T`` value tokens before mixing them.

Each attention then costs ``h*w * 256 * (heads * T)`` multiply-adds instead of ``h*w * 256 * 128``
per projection (0.6 instead of 1.3 GFLOP per prompt for LiteMedSAM and SAM), and only the first
of SAM's four mask tokens goes through the hypernetwork and the upscaled product. The result equals
``MaskDecoder(..., multimask_output=False)`` up to float rounding (tests compare the two on the
real LiteMedSAM decoder and on a SAM ViT-B decoder). Dense prompts must be SAM's "no mask" embedding.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(P, T, I)`` -> ``(P, heads, T, I // heads)``."""
    p, t, i = x.shape
    return x.view(p, t, heads, i // heads).transpose(1, 2)


def token_to_image(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``attn(q=q, k=k, v=v)`` for few query tokens ``q`` ``(P, T, C)`` over many image tokens ``k``, ``v``
    ``(P, N, C)``, projecting the queries into image-token space instead of the image tokens."""
    heads, (p, t, c) = attn.num_heads, q.shape
    d = attn.internal_dim // heads
    qh = _heads(attn.q_proj(q), heads)  # (P, H, T, d)
    q_in_k = torch.einsum("phtd,hdc->phtc", qh / math.sqrt(d), attn.k_proj.weight.view(heads, d, c))
    scores = q_in_k.reshape(p, heads * t, c) @ k.transpose(1, 2)  # (P, H*T, N)
    mixed = (torch.softmax(scores, dim=-1) @ v).view(p, heads, t, c)  # attention-weighted image tokens
    out = torch.einsum("phtc,hdc->phtd", mixed, attn.v_proj.weight.view(heads, d, c))
    out = out + attn.v_proj.bias.view(heads, 1, d)
    return attn.out_proj(out.transpose(1, 2).reshape(p, t, heads * d))


def image_to_token(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``attn(q=q, k=k, v=v)`` for many image tokens ``q`` ``(P, N, C)`` attending to few tokens ``k``,
    ``v`` ``(P, T, C)``, projecting the keys into image-token space instead of the image tokens."""
    heads, (p, t, c) = attn.num_heads, k.shape
    d = attn.internal_dim // heads
    kh = _heads(attn.k_proj(k), heads) / math.sqrt(d)  # (P, H, T, d)
    k_in_q = torch.einsum("phtd,hdc->phtc", kh, attn.q_proj.weight.view(heads, d, c)).reshape(p, heads * t, c)
    bias = torch.einsum("phtd,hd->pht", kh, attn.q_proj.bias.view(heads, d)).reshape(p, 1, heads * t)
    scores = torch.bmm(q, k_in_q.transpose(1, 2)).add_(bias)  # (P, N, H*T)
    weights = softmax_few(scores.view(p, -1, heads, t)).view(p, -1, heads * t)
    vh = _heads(attn.v_proj(v), heads)  # (P, H, T, d)
    v_out = torch.einsum("phtd,chd->phtc", vh, attn.out_proj.weight.view(c, heads, d)).reshape(p, heads * t, c)
    return torch.bmm(weights, v_out).add_(attn.out_proj.bias)


def softmax_few(scores: torch.Tensor) -> torch.Tensor:
    """``torch.softmax(scores, -1)`` for a short last axis (the ``T`` prompt tokens) and very many rows,
    in place: ATen's CPU kernel runs such a shape several times slower than these three element-wise
    passes (research/results.md, ``allocator``)."""
    scores = scores.sub_(scores.amax(-1, keepdim=True)).exp_()
    return scores.div_(scores.sum(-1, keepdim=True))


def two_way_transformer(
    transformer: nn.Module, image: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``transformer(image, image_pe, tokens)`` of SAM's ``TwoWayTransformer`` with image tokens
    ``(P, N, C)`` and ``(1, N, C)`` positional encoding already flattened; returns (tokens, image tokens)."""
    queries, keys = tokens, image
    for layer in transformer.layers:
        if layer.skip_first_layer_pe:
            queries = layer.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + tokens
            queries = queries + layer.self_attn(q=q, k=q, v=queries)
        queries = layer.norm1(queries)
        keys_pe = keys + image_pe
        attended = token_to_image(layer.cross_attn_token_to_image, queries + tokens, keys_pe, keys)
        queries = layer.norm2(queries + attended)
        queries = layer.norm3(queries + layer.mlp(queries))
        attended = image_to_token(layer.cross_attn_image_to_token, keys_pe, queries + tokens, queries)
        keys = layer.norm4(keys + attended)
    final = token_to_image(transformer.final_attn_token_to_image, queries + tokens, keys + image_pe, keys)
    return transformer.norm_final_attn(queries + final), keys


def decode_masks(
    decoder: nn.Module,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
    image_index: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-mask logits ``(P, 1, 4h, 4w)`` and the image tokens after the two-way transformer
    ``(P, h*w, C)`` (the image-prompt fusion features) for ``P`` prompts, prompt ``p`` on image
    ``image_index[p]`` of ``image_embeddings`` ``(B, C, h, w)``; ``sparse`` ``(P, S, C)`` and ``dense``
    ``(P or 1, C, h, w)`` come from SAM's prompt encoder without a mask prompt."""
    if dense.shape[0] > 1 and not torch.equal(dense[:1].expand_as(dense), dense):
        raise ValueError("decode_masks needs the same dense prompt for every prompt (no mask prompts)")
    p, c = sparse.shape[0], image_embeddings.shape[1]
    h, w = image_embeddings.shape[-2:]
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat([output_tokens.unsqueeze(0).expand(p, -1, -1), sparse], dim=1)
    image = (image_embeddings + dense[:1]).flatten(2).transpose(1, 2)[image_index]  # (P, h*w, C)
    pe = image_pe.flatten(2).transpose(1, 2)
    hs, image_tokens = two_way_transformer(decoder.transformer, image, pe, tokens)
    # (P, h*w, C) viewed as (P, C, h, w) is channels-last: the upscaling convolutions run in that layout
    upscaled = decoder.output_upscaling(image_tokens.transpose(1, 2).view(p, c, h, w))
    hyper = decoder.output_hypernetworks_mlps[0](hs[:, 1])  # the first mask token: SAM's single-mask output
    return torch.einsum("pc,pchw->phw", hyper, upscaled).unsqueeze(1), image_tokens
