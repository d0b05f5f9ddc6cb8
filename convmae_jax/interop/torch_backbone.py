"""Self-contained PyTorch twins of the three official ConvMAE backbones (spec §5.1–§5.3).

Written from the documented behaviour of the official code, in its own formulation (NCHW conv
stages; BEiT-style `relative_position_index` buffers gathered into a bias; the detection backbone
running whole blocks on 16×16 token windows; ViTDet's NHWC blocks with `window_partition` padding
and `add_decomposed_rel_pos`), so that the JAX model is tested against an independent definition.
Module and attribute names give exactly the official state-dict keys (`backbone_facts.json`), so an
exported backbone loads here, and in the official classes, with `strict=True`.

    tb = torch_backbone("convvit_det_base")      # same registry names and config fields as JAX
    maps = tb(images_nchw)                       # {"stride4": (N, C1, H/4, W/4), ...}

The conv stages reuse `torch_reference`'s PatchEmbed and CBlock. This module imports torch.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from convmae_jax.interop.torch_reference import CBlock, DropPath, Mlp, PatchEmbed, sincos_pos_embed_2d

__all__ = ["torch_backbone", "ConvViTBackboneTorch", "RelativePositionBias", "BeitBlock",
           "ViTDetBlock", "window_partition", "window_unpartition", "get_rel_pos",
           "add_decomposed_rel_pos"]


# ----------------------------------------------------------------------------------------------
# BEiT-style relative position bias (§5.1 shared tables, §5.2 per-block tables)

def _beit_index(window: tuple[int, int]) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(window[0]), torch.arange(window[1]),
                                        indexing="ij"))
    flat = torch.flatten(coords, 1)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += window[0] - 1
    rel[:, :, 1] += window[1] - 1
    rel[:, :, 0] *= 2 * window[1] - 1
    return rel.sum(-1)


class RelativePositionBias(nn.Module):
    """A table shared by several blocks; forward() -> (heads, L, L)."""

    def __init__(self, window: tuple[int, int], num_heads: int):
        super().__init__()
        self.window_size = tuple(window)
        n = (2 * window[0] - 1) * (2 * window[1] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(n, num_heads))
        self.register_buffer("relative_position_index", _beit_index(self.window_size))

    def forward(self) -> torch.Tensor:
        length = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(length, length, -1).permute(2, 0, 1).contiguous()


class BeitAttention(nn.Module):
    """qkv/proj attention; an own table when `window_size` is given (§5.2), or a bias passed in."""

    def __init__(self, dim: int, num_heads: int, window_size: tuple[int, int] | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        if window_size is not None:
            self.window_size = tuple(window_size)
            n = (2 * window_size[0] - 1) * (2 * window_size[1] - 1)
            self.relative_position_bias_table = nn.Parameter(torch.zeros(n, num_heads))
            self.register_buffer("relative_position_index", _beit_index(self.window_size))
        else:
            self.window_size = None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.window_size is not None:
            length = self.window_size[0] * self.window_size[1]
            table = self.relative_position_bias_table[self.relative_position_index.view(-1)]
            attn = attn + table.view(length, length, -1).permute(2, 0, 1).unsqueeze(0)
        if rel_pos_bias is not None:
            attn = attn + rel_pos_bias
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class BeitBlock(nn.Module):
    """Pre-norm block with optional layer scale (gamma_1, gamma_2) and optional windows.

    A windowed block whose window tiles the grid runs entirely on the windows (§5.1: tokens
    partitioned, the block applied, windows merged back); with padding the windows are taken after
    norm1 (zero tokens), as ViTDet does.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, *, window: int = 0,
                 own_table: tuple[int, int] | None = None, layer_scale: float | None = None,
                 drop_path: float = 0.0):
        super().__init__()
        self.window = window
        if layer_scale is not None:
            self.gamma_1 = nn.Parameter(layer_scale * torch.ones(dim))
            self.gamma_2 = nn.Parameter(layer_scale * torch.ones(dim))
        else:
            self.gamma_1 = self.gamma_2 = None
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = BeitAttention(dim, num_heads, own_table)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def _block(self, x, bias, attn_fn=None):
        y = self.attn(self.norm1(x), bias) if attn_fn is None else attn_fn(self.norm1(x))
        if self.gamma_1 is not None:
            y = self.gamma_1 * y
        x = x + self.drop_path(y)
        y = self.mlp(self.norm2(x))
        if self.gamma_2 is not None:
            y = self.gamma_2 * y
        return x + self.drop_path(y)

    def forward(self, x: torch.Tensor, hw: tuple[int, int], bias=None) -> torch.Tensor:
        if not self.window:
            return self._block(x, bias)
        h, w = hw
        b, _, c = x.shape
        ws = self.window
        if h % ws == 0 and w % ws == 0:
            t = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
            t = self._block(t.reshape(-1, ws * ws, c), bias)
            t = t.view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
            return t.reshape(b, h * w, c)

        def windowed(y):
            win, pad_hw = window_partition(y.view(b, h, w, c), ws)
            out = self.attn(win.view(-1, ws * ws, c), bias).view(-1, ws, ws, c)
            return window_unpartition(out, ws, pad_hw, (h, w)).reshape(b, h * w, c)

        return self._block(x, bias, windowed)


# ----------------------------------------------------------------------------------------------
# ViTDet-style blocks (§5.3)

def window_partition(x: torch.Tensor, ws: int):
    b, h, w, c = x.shape
    pad_h, pad_w = (ws - h % ws) % ws, (ws - w % ws) % ws
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // ws, ws, wp // ws, ws, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws, ws, c), (hp, wp)


def window_unpartition(windows: torch.Tensor, ws: int, pad_hw, hw) -> torch.Tensor:
    hp, wp = pad_hw
    h, w = hw
    b = windows.shape[0] // (hp * wp // ws // ws)
    x = windows.view(b, hp // ws, wp // ws, ws, ws, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, hp, wp, -1)
    return x[:, :h, :w, :].contiguous()


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:
        resized = F.interpolate(rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1),
                                size=max_rel_dist, mode="linear")
        resized = resized.reshape(-1, max_rel_dist).permute(1, 0)
    else:
        resized = rel_pos
    q_coords = torch.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
    rel = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return resized[rel.long()]


def add_decomposed_rel_pos(attn, q, rel_pos_h, rel_pos_w, q_size, k_size):
    q_h, q_w = q_size
    k_h, k_w = k_size
    rh = get_rel_pos(q_h, k_h, rel_pos_h)
    rw = get_rel_pos(q_w, k_w, rel_pos_w)
    b, _, dim = q.shape
    r_q = q.reshape(b, q_h, q_w, dim)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw)
    attn = (attn.view(b, q_h, q_w, k_h, k_w) + rel_h[:, :, :, :, None]
            + rel_w[:, :, :, None, :]).view(b, q_h * q_w, k_h * k_w)
    return attn


class ViTDetAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, input_size: tuple[int, int]):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * self.num_heads, h * w, -1).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = add_decomposed_rel_pos(attn, q, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w))
        attn = attn.softmax(dim=-1)
        x = (attn @ v).view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return self.proj(x)


class ViTDetBlock(nn.Module):
    """NHWC block: window attention (window > 0, padded) or global, decomposed rel pos."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, *, window: int,
                 input_size: tuple[int, int], drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ViTDetAttention(dim, num_heads, (window, window) if window else input_size)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.window_size = window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            h, w = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, self.window_size)
        x = self.attn(x)
        if self.window_size > 0:
            x = window_unpartition(x, self.window_size, pad_hw, (h, w))
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


# ----------------------------------------------------------------------------------------------
# the backbone

class ConvViTBackboneTorch(nn.Module):
    """Any of the three layouts, any size; `forward(imgs NCHW) -> dict of NCHW maps`."""

    def __init__(self, img_size: int = 1024, in_chans: int = 3,
                 patch_sizes: Sequence[int] = (4, 2, 2), embed_dims: Sequence[int] = (256, 384, 768),
                 depths: Sequence[int] = (2, 2, 11), num_heads: int = 12,
                 mlp_ratios: Sequence[float] = (4.0, 4.0, 4.0),
                 global_blocks: Sequence[int] = (0, 3, 6, 10), window_size: int = 16,
                 rel_pos: str = "shared_table", layer_scale: float | None = None,
                 pos_embed: str = "frozen", pretrain_img_size: int = 224,
                 out_stride32: str = "maxpool", cblock_norm_eps: float = 1e-5,
                 drop_path_rate: float = 0.0):
        super().__init__()
        p1, p2, p3 = self.patch_sizes = tuple(int(p) for p in patch_sizes)
        c1, c2, d = embed_dims
        n1, n2, n3 = depths
        stride = p1 * p2 * p3
        self.grid = g = img_size // stride
        self.img_size, self.rel_pos, self.out_stride32 = img_size, rel_pos, out_stride32
        self.pos_mode = pos_embed
        self.pretrain_grid = pretrain_img_size // stride
        dpr = np.linspace(0.0, drop_path_rate, sum(depths)).tolist()
        global_blocks = set(global_blocks)

        pos_grid = self.pretrain_grid if pos_embed == "interpolate" else g
        self.pos_embed = nn.Parameter(
            torch.from_numpy(sincos_pos_embed_2d(d, pos_grid))[None],
            requires_grad=pos_embed != "frozen")
        self.patch_embed1 = PatchEmbed(p1, in_chans, c1)
        self.patch_embed2 = PatchEmbed(p2, c1, c2)
        self.patch_embed3 = PatchEmbed(p3, c2, d)
        self.patch_embed4 = nn.Linear(d, d)
        self.blocks1 = nn.ModuleList([CBlock(c1, mlp_ratios[0], dpr[i]) for i in range(n1)])
        self.blocks2 = nn.ModuleList([CBlock(c2, mlp_ratios[1], dpr[n1 + i]) for i in range(n2)])
        for blk in list(self.blocks1) + list(self.blocks2):
            blk.norm1.eps = blk.norm2.eps = cblock_norm_eps
        blocks = []
        for i in range(n3):
            win = 0 if i in global_blocks else window_size
            dp = dpr[n1 + n2 + i]
            if rel_pos == "decomposed":
                blocks.append(ViTDetBlock(d, num_heads, mlp_ratios[2], window=win, input_size=(g, g),
                                          drop_path=dp))
            else:
                own = ((win, win) if win else (g, g)) if rel_pos == "per_block_table" else None
                blocks.append(BeitBlock(d, num_heads, mlp_ratios[2], window=win, own_table=own,
                                        layer_scale=layer_scale, drop_path=dp))
        self.blocks3 = nn.ModuleList(blocks)
        self.global_blocks = global_blocks
        if rel_pos == "shared_table":
            if len(global_blocks) < n3:
                self.windowed_rel_pos_bias = RelativePositionBias((window_size, window_size), num_heads)
            if global_blocks:
                self.global_rel_pos_bias = RelativePositionBias((g, g), num_heads)
        if out_stride32 == "conv_bn_gelu":
            self.fpn = nn.Sequential(nn.Conv2d(d, d, 3, stride=2), nn.BatchNorm2d(d), nn.GELU())

    def _abs_pos(self) -> torch.Tensor:
        if self.pos_mode != "interpolate" or self.pretrain_grid == self.grid:
            return self.pos_embed
        old = self.pretrain_grid
        p = self.pos_embed.reshape(1, old, old, -1).permute(0, 3, 1, 2)
        p = F.interpolate(p, size=(self.grid, self.grid), mode="bicubic", align_corners=False)
        return p.permute(0, 2, 3, 1).reshape(1, self.grid * self.grid, -1)

    def forward(self, imgs: torch.Tensor) -> dict[str, torch.Tensor]:
        if imgs.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"expected {self.img_size}x{self.img_size} input, got {tuple(imgs.shape)}")
        x = self.patch_embed1(imgs)
        for blk in self.blocks1:
            x = blk(x)
        f4 = x
        x = self.patch_embed2(x)
        for blk in self.blocks2:
            x = blk(x)
        f8 = x
        x = self.patch_embed3(x)
        n, d, g, _ = x.shape
        x = self.patch_embed4(x.flatten(2).transpose(1, 2)) + self._abs_pos()
        if self.rel_pos == "decomposed":
            x = x.view(n, g, g, d)
            for blk in self.blocks3:
                x = blk(x)
            f16 = x.permute(0, 3, 1, 2).contiguous()
        else:
            for i, blk in enumerate(self.blocks3):
                bias = None
                if self.rel_pos == "shared_table":
                    table = self.global_rel_pos_bias if i in self.global_blocks else self.windowed_rel_pos_bias
                    bias = table().unsqueeze(0)
                x = blk(x, (g, g), bias)
            f16 = x.transpose(1, 2).reshape(n, d, g, g)
        out = {"stride4": f4, "stride8": f8, "stride16": f16}
        if self.out_stride32 == "maxpool":
            out["stride32"] = F.max_pool2d(f16, kernel_size=2, stride=2)
        elif self.out_stride32 == "conv_bn_gelu":
            out["stride32"] = self.fpn(f16)
        return out


def torch_backbone(name: str, **overrides) -> ConvViTBackboneTorch:
    """PyTorch twin of `models.create(name, **overrides)` for `convvit_{det,seg,vitdet}_*`.

    JAX-only fields (dtype, dwconv_impl, attention_impl, remat) are validated and ignored;
    window_padding is implied (the twin pads whenever the grid does not divide, which the JAX
    config refuses without it).
    """
    from convmae_jax import models

    cfg = models.config_for(name, **overrides)
    if not isinstance(cfg, models.BackboneConfig):
        raise TypeError(f"{name} is not a backbone; use torch_reference.torch_model")
    return ConvViTBackboneTorch(
        img_size=cfg.img_size, in_chans=cfg.in_chans, patch_sizes=cfg.patch_sizes,
        embed_dims=cfg.embed_dims, depths=cfg.depths, num_heads=cfg.num_heads,
        mlp_ratios=cfg.mlp_ratios, global_blocks=cfg.global_blocks, window_size=cfg.window_size,
        rel_pos=cfg.rel_pos, layer_scale=cfg.layer_scale, pos_embed=cfg.pos_embed,
        pretrain_img_size=cfg.pretrain_img_size, out_stride32=cfg.out_stride32,
        cblock_norm_eps=cfg.cblock_norm_eps, drop_path_rate=cfg.drop_path_rate)
