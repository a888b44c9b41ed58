"""A small vision transformer, ``vit``, and its spec.

Patches of ``patch x patch`` pixels are embedded by a strided conv into ``dim`` features; a
learned class token and learned positional embeddings are added; ``depth`` pre-LN blocks follow
(``x + attn(norm1(x))``, then ``x + mlp(norm2(x))`` with a GELU MLP of ``mlp_dim`` units), a final
LayerNorm, and a Linear head on the class token. Attention has separate ``query``/``key``/
``value``/``out`` projections with biases, ``heads`` heads of ``dim / heads`` dims.

Spec — every group below is exactly function-preserving:

- ``stream``: the residual stream's ``dim`` features, shared by the whole network (patch-embedding
  output, class token, positional embeddings, every LayerNorm's weight and bias — mean and
  variance do not depend on feature order — the q/k/v input axes, the attention output and MLP
  ``fc2`` output axes, the ``fc1`` input axis, and the head's input axis).
- ``blocks.{i}.attn.qk{h}``: head ``h``'s query/key dims, one permutation for both (the dot
  product ``q·k`` is invariant when both are permuted alike).
- ``blocks.{i}.attn.v{h}``: head ``h``'s value dims, carried into ``out``'s input axis.
- ``blocks.{i}.mlp``: the MLP's hidden units.

Sites (where activation matching and REPAIR observe a group) are post-normalisation: the stream
at every LayerNorm's consumer (the q/k/v projections' input, ``fc1``'s input, the head's input),
a head's query/key dims at the query and key outputs, its value dims at ``out``'s input, the MLP's
hidden units at ``fc2``'s input (after GELU).

Permuting whole heads is also a symmetry but is not a gather of single units, so it is not
included.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from starfast.models.layer_axes import input_axes, output_axes
from starfast.models.options import image_channels, positive_int
from starfast.spec import Axis, Group, PermutationSpec, Site


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape

        def split_heads(projection: nn.Linear) -> torch.Tensor:
            return projection(x).view(batch, tokens, self.heads, dim // self.heads).transpose(1, 2)

        attended = F.scaled_dot_product_attention(split_heads(self.query), split_heads(self.key), split_heads(self.value))
        return self.out(attended.transpose(1, 2).reshape(batch, tokens, dim))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, image_shape, num_classes: int, patch: int, dim: int, depth: int, heads: int, mlp_dim: int):
        super().__init__()
        channels, height, width = image_shape
        if height % patch or width % patch:
            raise ValueError(f"vit: patch={patch} must divide the image size {height}x{width} (input_shape)")
        if dim % heads:
            raise ValueError(f"vit: dim={dim} must be divisible by heads={heads}")
        num_patches = (height // patch) * (width // patch)
        self.patch_embed = nn.Conv2d(channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self.pos_embed
        for block in self.blocks:
            tokens = block(tokens)
        return self.head(self.norm(tokens[:, 0]))

    def permutation_spec(self) -> PermutationSpec:
        dim = self.head.in_features
        stream = list(output_axes("patch_embed", self.patch_embed)) + [Axis("cls_token", 2), Axis("pos_embed", 2)]
        groups = []
        stream_sites = []
        for i, block in enumerate(self.blocks):
            prefix = f"blocks.{i}"
            attn = block.attn
            stream_sites += [Site(f"{prefix}.attn.query", "input", -1), Site(f"{prefix}.mlp.fc1", "input", -1)]
            stream += output_axes(f"{prefix}.norm1", block.norm1)
            for projection in ("query", "key", "value"):
                stream += input_axes(f"{prefix}.attn.{projection}", getattr(attn, projection))
            stream += output_axes(f"{prefix}.attn.out", attn.out)
            stream += output_axes(f"{prefix}.norm2", block.norm2) + input_axes(f"{prefix}.mlp.fc1", block.mlp.fc1)
            stream += output_axes(f"{prefix}.mlp.fc2", block.mlp.fc2)
            head_dim = dim // attn.heads
            for h in range(attn.heads):
                offset = h * head_dim
                query_key = output_axes(f"{prefix}.attn.query", attn.query, offset) + output_axes(
                    f"{prefix}.attn.key", attn.key, offset
                )
                value = output_axes(f"{prefix}.attn.value", attn.value, offset) + input_axes(
                    f"{prefix}.attn.out", attn.out, offset
                )
                query_key_sites = (Site(f"{prefix}.attn.query", "output", -1, offset), Site(f"{prefix}.attn.key", "output", -1, offset))
                groups.append(Group(f"{prefix}.attn.qk{h}", head_dim, query_key, query_key_sites))
                groups.append(Group(f"{prefix}.attn.v{h}", head_dim, value, (Site(f"{prefix}.attn.out", "input", -1, offset),)))
            hidden_axes = output_axes(f"{prefix}.mlp.fc1", block.mlp.fc1) + input_axes(f"{prefix}.mlp.fc2", block.mlp.fc2)
            mlp_sites = (Site(f"{prefix}.mlp.fc2", "input", -1),)
            groups.append(Group(f"{prefix}.mlp", block.mlp.fc1.out_features, hidden_axes, mlp_sites))
        stream += output_axes("norm", self.norm) + input_axes("head", self.head)
        stream_sites.append(Site("head", "input", -1))
        return PermutationSpec([Group("stream", dim, tuple(stream), tuple(stream_sites))] + groups)


def build_vit(
    num_classes: int,
    in_channels: int,
    input_shape,
    *,
    patch: int = 4,
    dim: int = 128,
    depth: int = 6,
    heads: int = 4,
    mlp_dim: int = 256,
) -> VisionTransformer:
    if input_shape is None:
        raise ValueError("vit needs input_shape=(channels, height, width) to size its patch grid")
    image_channels("vit", in_channels, input_shape, min_size=1)
    for name, value in (("patch", patch), ("dim", dim), ("depth", depth), ("heads", heads), ("mlp_dim", mlp_dim)):
        positive_int(name, value)
    return VisionTransformer(tuple(input_shape), num_classes, patch, dim, depth, heads, mlp_dim)
