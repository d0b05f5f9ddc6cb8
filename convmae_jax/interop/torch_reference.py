"""Self-contained PyTorch reference of ConvMAE (pretraining) and ConvViT (classifier).

Written from the documented behaviour of the official model, for parity tests and for exporting
weights: the modules and attribute names are chosen so that ``state_dict()`` has exactly the key names and shapes of the
official checkpoints (313 keys for the Base pretraining model, 207 for the Base classifier), and
an exported state dict therefore loads with ``strict=True`` into the official classes too.

Differences from the official code are deliberate generalisations only: every size is a parameter
(embed dims, depths, heads, mlp ratios, decoder, ``img_size`` any multiple of 16, ``in_chans``),
the mask upsampling and patchify use the configured grid instead of the literals 14/56/28/16, and
``forward`` accepts the masking ``noise`` so a run can be compared exactly with the JAX model.

This module imports torch; nothing in training imports it.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

__all__ = [
    "torch_model",
    "ConvMAETorch",
    "ConvViTTorch",
    "PatchEmbed",
    "CBlock",
    "Block",
    "sincos_pos_embed_2d",
    "patchify",
    "unpatchify",
]

PATCH_SIZES = (4, 2, 2)  # official per-stage patch sizes; total stride 16


# ----------------------------------------------------------------------------------------------
# helpers

def sincos_pos_embed_2d(dim: int, grid: int) -> np.ndarray:
    """(grid*grid, dim) float32 fixed 2-D sin-cos embedding.

    Token t = i*grid + j; channels [0, dim/2) encode the column j, [dim/2, dim) the row i. Each half
    is [sin(p*w_k), cos(p*w_k)] with w_k = 10000^(-k/(dim/4)). Computed in float64, cast to float32.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim % 4 == 0, got {dim}")

    def emb_1d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = np.arange(d // 2, dtype=np.float64) / (d / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32),
                             indexing="ij")
    emb = np.concatenate([emb_1d(dim // 2, cols), emb_1d(dim // 2, rows)], axis=1)
    return emb.astype(np.float32)


def patchify(imgs: torch.Tensor, p: int = 16) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C); token h*w_grid + w, feature (pp*p + qq)*C + c."""
    n, c, h, w = imgs.shape
    assert h % p == 0 and w % p == 0
    gh, gw = h // p, w // p
    x = imgs.reshape(n, c, gh, p, gw, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, gh * gw, p * p * c)


def unpatchify(x: torch.Tensor, p: int = 16, channels: int = 3) -> torch.Tensor:
    """(N, L, p*p*C) -> (N, C, H, W), inverse of :func:`patchify` (square grid)."""
    n, l, _ = x.shape
    g = int(round(math.sqrt(l)))
    assert g * g == l
    x = x.reshape(n, g, g, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, channels, g * p, g * p)


class DropPath(nn.Module):
    """Per-sample stochastic depth (timm semantics: keep = floor(keep_prob + U), x / keep_prob * keep)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        keep = torch.floor(keep_prob + torch.rand(shape, dtype=x.dtype, device=x.device))
        return x.div(keep_prob) * keep


# ----------------------------------------------------------------------------------------------
# building blocks (names match the official state-dict keys)

class PatchEmbed(nn.Module):
    """Conv(k = s = patch) -> LayerNorm over channels (eps 1e-5) -> exact GELU."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-5)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.act(x)


class CMlp(nn.Module):
    """1x1 conv -> GELU -> 1x1 conv."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CBlock(nn.Module):
    """Convolutional block of stages 1-2. ``mask`` (N,1,H,W), 1 = visible, applied after conv1."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.conv2 = nn.Conv2d(dim, dim, 1)
        self.attn = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = CMlp(dim, int(dim * mlp_ratio))

    @staticmethod
    def _ln(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.conv1(self._ln(self.norm1, x))
        if mask is not None:
            y = y * mask
        y = self.conv2(self.attn(y))
        x = x + self.drop_path(y)
        x = x + self.drop_path(self.mlp(self._ln(self.norm2, x)))
        return x


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(n, t, c)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block, LayerNorm eps 1e-6."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


def _check_sizes(img_size, patch_sizes, embed_dims, depths, mlp_ratios):
    if len(patch_sizes) != 3 or len(embed_dims) != 3 or len(depths) != 3 or len(mlp_ratios) != 3:
        raise ValueError("patch_sizes, embed_dims, depths and mlp_ratios need 3 entries (one per stage)")
    stride = math.prod(patch_sizes)
    if img_size % stride:
        raise ValueError(f"img_size must be a multiple of the total stride {stride}, got {img_size}")


def _default_conv_init(conv: nn.Conv2d) -> None:
    """PyTorch's own Conv2d init (kaiming_uniform(a=sqrt 5) == U(+-1/sqrt(fan_in)), same for bias)."""
    conv.reset_parameters()


# ----------------------------------------------------------------------------------------------
# pretraining model

class ConvMAETorch(nn.Module):
    """ConvMAE pretraining model (``MaskedAutoencoderConvViT``), any size.

    ``forward(imgs_nchw, noise=None, mask_ratio=None) -> (loss, pred, mask)`` with ``noise`` (N, L)
    (argsort ascending: smallest noise is kept), ``pred`` (N, L, 256*in_chans), ``mask`` (N, L) with
    1 = removed.
    """

    def __init__(
        self,
        img_size: int = 224,
        in_chans: int = 3,
        patch_sizes: Sequence[int] = PATCH_SIZES,
        embed_dims: Sequence[int] = (256, 384, 768),
        depths: Sequence[int] = (2, 2, 11),
        num_heads: int = 12,
        mlp_ratios: Sequence[float] = (4.0, 4.0, 4.0),
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        decoder_mlp_ratio: float | None = None,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = False,
    ):
        super().__init__()
        embed_dims, depths, mlp_ratios = list(embed_dims), list(depths), list(mlp_ratios)
        patch_sizes = tuple(int(p) for p in patch_sizes)
        _check_sizes(img_size, patch_sizes, embed_dims, depths, mlp_ratios)
        p1, p2, p3 = self.patch_sizes = patch_sizes
        self.img_size, self.in_chans = img_size, in_chans
        self.patch_size = p1 * p2 * p3
        self.grid_size = img_size // self.patch_size
        self.num_patches = self.grid_size**2
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        c1, c2, d = embed_dims
        dec_ratio = mlp_ratios[0] if decoder_mlp_ratio is None else decoder_mlp_ratio

        # own parameters first (official state_dict order: pos_embed, mask_token, decoder_pos_embed)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, d), requires_grad=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, decoder_embed_dim),
                                              requires_grad=False)
        # encoder
        self.patch_embed1 = PatchEmbed(p1, in_chans, c1)
        self.patch_embed2 = PatchEmbed(p2, c1, c2)
        self.patch_embed3 = PatchEmbed(p3, c2, d)
        self.patch_embed4 = nn.Linear(d, d)
        self.stage1_output_decode = nn.Conv2d(c1, d, p2 * p3, stride=p2 * p3)
        self.stage2_output_decode = nn.Conv2d(c2, d, p3, stride=p3)
        self.blocks1 = nn.ModuleList([CBlock(c1, mlp_ratios[0]) for _ in range(depths[0])])
        self.blocks2 = nn.ModuleList([CBlock(c2, mlp_ratios[1]) for _ in range(depths[1])])
        self.blocks3 = nn.ModuleList([Block(d, num_heads, mlp_ratios[2]) for _ in range(depths[2])])
        self.norm = nn.LayerNorm(d, eps=1e-6)
        # decoder
        self.decoder_embed = nn.Linear(d, decoder_embed_dim)
        self.decoder_blocks = nn.ModuleList(
            [Block(decoder_embed_dim, decoder_num_heads, dec_ratio) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_size**2 * in_chans)

        self.initialize_weights()

  
    @torch.no_grad()
    def initialize_weights(self) -> None:
        g = self.grid_size
        self.pos_embed.copy_(torch.from_numpy(sincos_pos_embed_2d(self.pos_embed.shape[-1], g))[None])
        self.decoder_pos_embed.copy_(
            torch.from_numpy(sincos_pos_embed_2d(self.decoder_pos_embed.shape[-1], g))[None])
        w = self.patch_embed3.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

  
    def random_masking(self, noise: torch.Tensor, mask_ratio: float):
        n, l = noise.shape
        if l != self.num_patches:
            raise ValueError(f"noise has {l} entries per sample, model has {self.num_patches} patches")
        len_keep = int(l * (1 - mask_ratio))
        ids_shuffle = torch.argsort(noise, dim=1, stable=True)
        ids_restore = torch.argsort(ids_shuffle, dim=1, stable=True)
        ids_keep = ids_shuffle[:, :len_keep]
        mask = torch.ones(n, l, dtype=noise.dtype, device=noise.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return ids_keep, mask, ids_restore

    def _upsample_mask(self, mask: torch.Tensor, factor: int) -> torch.Tensor:
        """(N, L) -> (N, 1, g*factor, g*factor) nearest upsampling."""
        g = self.grid_size
        m = mask.reshape(-1, g, g)
        m = m.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)
        return m.unsqueeze(1)

    @staticmethod
    def _gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

    def forward_encoder(self, imgs: torch.Tensor, noise: torch.Tensor | None = None,
                        mask_ratio: float | None = None):
        n = imgs.shape[0]
        if imgs.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"expected {self.img_size}x{self.img_size} input, got {tuple(imgs.shape)}")
        mask_ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        if noise is None:
            noise = torch.rand(n, self.num_patches, device=imgs.device)
        ids_keep, mask, ids_restore = self.random_masking(noise.to(imgs.dtype), mask_ratio)
        p1, p2, p3 = self.patch_sizes
        vis1 = 1 - self._upsample_mask(mask, p2 * p3)
        vis2 = 1 - self._upsample_mask(mask, p3)

        x = self.patch_embed1(imgs)
        for blk in self.blocks1:
            x = blk(x, vis1)
        s1 = self.stage1_output_decode(x).flatten(2).transpose(1, 2)
        x = self.patch_embed2(x)
        for blk in self.blocks2:
            x = blk(x, vis2)
        s2 = self.stage2_output_decode(x).flatten(2).transpose(1, 2)
        x = self.patch_embed3(x)
        x = x.flatten(2).transpose(1, 2)
        x = self.patch_embed4(x)
        x = x + self.pos_embed
        x = self._gather_tokens(x, ids_keep)
        s1 = self._gather_tokens(s1, ids_keep)
        s2 = self._gather_tokens(s2, ids_keep)
        for blk in self.blocks3:
            x = blk(x)
        x = x + s1 + s2
        x = self.norm(x)
        return x, mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(x)
        n, k, c = x.shape
        mask_tokens = self.mask_token.expand(n, ids_restore.shape[1] - k, c)
        x = torch.cat([x, mask_tokens], dim=1)
        x = self._gather_tokens(x, ids_restore)
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        return self.decoder_pred(x)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        target = patchify(imgs, self.patch_size)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True, unbiased=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, noise: torch.Tensor | None = None,
                mask_ratio: float | None = None):
        latent, mask, ids_restore = self.forward_encoder(imgs, noise, mask_ratio)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask


# ----------------------------------------------------------------------------------------------
# classifier

class ConvViTTorch(nn.Module):
    """ConvViT classifier (``models_convvit.ConvViT``), any size.

    global_pool=True: mean of the stage-3 tokens -> ``fc_norm`` -> ``head``;
    global_pool=False: ``norm`` -> token 0 -> ``head``. No masking, no stage decodes.
    """

    def __init__(
        self,
        img_size: int = 224,
        in_chans: int = 3,
        patch_sizes: Sequence[int] = PATCH_SIZES,
        num_classes: int = 1000,
        embed_dims: Sequence[int] = (256, 384, 768),
        depths: Sequence[int] = (2, 2, 11),
        num_heads: int = 12,
        mlp_ratios: Sequence[float] = (4.0, 4.0, 4.0),
        drop_path_rate: float = 0.0,
        global_pool: bool = True,
    ):
        super().__init__()
        embed_dims, depths, mlp_ratios = list(embed_dims), list(depths), list(mlp_ratios)
        patch_sizes = tuple(int(p) for p in patch_sizes)
        _check_sizes(img_size, patch_sizes, embed_dims, depths, mlp_ratios)
        p1, p2, p3 = self.patch_sizes = patch_sizes
        self.img_size, self.in_chans = img_size, in_chans
        self.patch_size = p1 * p2 * p3
        self.grid_size = img_size // self.patch_size
        self.num_patches = self.grid_size**2
        self.global_pool = global_pool
        c1, c2, d = embed_dims
        dpr = np.linspace(0.0, drop_path_rate, sum(depths)).tolist()

        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, d))
        self.patch_embed1 = PatchEmbed(p1, in_chans, c1)
        self.patch_embed2 = PatchEmbed(p2, c1, c2)
        self.patch_embed3 = PatchEmbed(p3, c2, d)
        self.patch_embed4 = nn.Linear(d, d)
        self.blocks1 = nn.ModuleList(
            [CBlock(c1, mlp_ratios[0], dpr[i]) for i in range(depths[0])])
        self.blocks2 = nn.ModuleList(
            [CBlock(c2, mlp_ratios[1], dpr[depths[0] + i]) for i in range(depths[1])])
        self.blocks3 = nn.ModuleList(
            [Block(d, num_heads, mlp_ratios[2], dpr[depths[0] + depths[1] + i])
             for i in range(depths[2])])
        if global_pool:
            self.fc_norm = nn.LayerNorm(d, eps=1e-6)
        else:
            self.norm = nn.LayerNorm(d, eps=1e-6)
        self.head = nn.Linear(d, num_classes) if num_classes > 0 else nn.Identity()

        self.initialize_weights()

    # (the official class's own init; main_finetune re-inits head.weight with std 2e-5 after loading)
    @torch.no_grad()
    def initialize_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-2.0, b=2.0)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, imgs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Multi-scale features, NCHW: stride4 (N,C1,H/4,W/4), stride8, stride16 (after blocks3)."""
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
        x = x.flatten(2).transpose(1, 2)
        x = self.patch_embed4(x)
        x = x + self.pos_embed
        for blk in self.blocks3:
            x = blk(x)
        n, _, d = x.shape
        f16 = x.transpose(1, 2).reshape(n, d, self.grid_size, self.grid_size)
        return {"stride4": f4, "stride8": f8, "stride16": f16}

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(imgs)["stride16"].flatten(2).transpose(1, 2)
        if self.global_pool:
            x = self.fc_norm(x.mean(dim=1))
        else:
            x = self.norm(x)[:, 0]
        return self.head(x)


# ----------------------------------------------------------------------------------------------
# factory sharing the JAX size table

def torch_model(name: str, **overrides) -> nn.Module:
    """PyTorch twin of ``models.create(name, **overrides)``: same registry names, same size table
    and config fields (``convmae_*`` -> :class:`ConvMAETorch`, ``convvit_*`` -> :class:`ConvViTTorch`).

    JAX-only fields (``dtype``, ``dwconv_impl``, ``attention_impl``) are validated and then ignored:
    the PyTorch model computes in float32. Initialization draws from torch's global RNG
    (``torch.manual_seed``).
    """
    from convmae_jax import models  # no torch in there; jax is imported lazily by this call only

    cfg = models.config_for(name, **overrides)
    common = dict(img_size=cfg.img_size, in_chans=cfg.in_chans, patch_sizes=tuple(cfg.patch_sizes),
                  embed_dims=tuple(cfg.embed_dims), depths=tuple(cfg.depths),
                  num_heads=cfg.num_heads, mlp_ratios=tuple(cfg.mlp_ratios))
    if isinstance(cfg, models.ConvMAEConfig):
        return ConvMAETorch(**common, decoder_embed_dim=cfg.decoder_embed_dim,
                            decoder_depth=cfg.decoder_depth, decoder_num_heads=cfg.decoder_num_heads,
                            decoder_mlp_ratio=cfg.decoder_mlp_ratio, mask_ratio=cfg.mask_ratio,
                            norm_pix_loss=cfg.norm_pix_loss)
    if isinstance(cfg, models.ConvViTConfig):
        return ConvViTTorch(**common, num_classes=cfg.num_classes,
                            drop_path_rate=cfg.drop_path_rate, global_pool=cfg.global_pool)
    raise TypeError(f"no PyTorch twin for config {type(cfg).__name__}")
