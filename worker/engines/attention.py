"""SwinUNETR window attention as one opaque operator: the experiment behind docs/BENCHMARKS.md.

MONAI's fused window attention (``use_flash_attention``) hands ``scaled_dot_product_attention`` an
additive bias: the relative-position bias plus, in shifted windows, the -100 mask. Eager PyTorch
runs it to the fp32 masks' agreement (99.95% in fp16 on an H100), but under torch.compile the same
code lost 2.4% of the voxels. Registered as a custom operator, the attention stays the eager kernel
while inductor fuses the rest; on the H100 (PyTorch 2.11) the masks still lost 2.4%, so the fault
lies outside the attention (bench/attention_bisect.py). Compiled engines therefore use this module
only when asked for fused attention; it stays for the benchmark and for re-testing newer PyTorch.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from monai.networks.nets.swin_unetr import BasicLayer, WindowAttention, compute_mask, get_window_size
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

# None: PyTorch picks the kernel. Read when the operator runs, so it applies to compiled graphs too.
_backends: list[SDPBackend] | None = None


@contextlib.contextmanager
def attention_backends(backends: list[SDPBackend] | None) -> Iterator[None]:
    """Restrict :func:`window_attention` to these SDPA kernels (a diagnostic and benchmark switch)."""
    global _backends
    previous, _backends = _backends, backends
    try:
        yield
    finally:
        _backends = previous


@torch.library.custom_op("segq::window_attention", mutates_args=())
def window_attention(q: Tensor, k: Tensor, v: Tensor, relative_bias: Tensor, mask: Tensor | None,
                     scale: float) -> Tensor:
    """MONAI's flash branch of ``WindowAttention.forward``, from q/k/v (b, heads, n, d) to (b, n, heads*d)."""
    b, heads, n, d = q.shape
    if mask is not None:
        nw = mask.shape[0]
        bias = relative_bias.view(1, 1, heads, n, n) + mask.reshape(1, nw, 1, n, n)
        bias = bias.expand(b // nw, nw, heads, n, n).reshape(b, heads, n, n)
    else:
        bias = relative_bias.unsqueeze(0)
    with sdpa_kernel(_backends) if _backends else contextlib.nullcontext():
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=0.0, scale=scale)
    return x.transpose(1, 2).reshape(b, n, heads * d).contiguous()


@window_attention.register_fake
def _window_attention_shape(q: Tensor, k: Tensor, v: Tensor, relative_bias: Tensor, mask: Tensor | None,
                            scale: float) -> Tensor:
    b, heads, n, d = q.shape
    return q.new_empty((b, n, heads * d))


class OpaqueWindowAttention(WindowAttention):
    """``WindowAttention`` whose attention is :func:`window_attention`; same parameters and buffers."""

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        b, n, c = x.shape
        heads = self.num_heads
        qkv = self.qkv(x).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        index = self.relative_position_index[:n, :n].reshape(-1)  # type: ignore[index]
        relative_bias = self.relative_position_bias_table[index].reshape(n, n, -1).permute(2, 0, 1).contiguous()
        out = window_attention(qkv[0], qkv[1], qkv[2], relative_bias, mask, float(self.scale))
        return self.proj_drop(self.proj(out))


@torch.compiler.disable
@functools.lru_cache(maxsize=16)
def shifted_window_mask(dims: tuple[int, ...], window: tuple[int, ...], shift: tuple[int, ...],
                        device: torch.device) -> Tensor:
    """MONAI's shifted-window mask, built eagerly once per padded size and kept.

    Out of the graph it is an ordinary input, and the 27 slice writes that build it run once, not per
    batch. It was tried as the cause of the compiled stage's NaNs on an H100 and ruled out
    (bench/attention_bisect.py: the first stage gave NaNs with the mask built either way).
    """
    return compute_mask(list(dims), window, shift, device)


class EagerMaskBasicLayer(BasicLayer):
    """``BasicLayer`` whose shifted-window mask comes from :func:`shifted_window_mask`."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 5 or self.use_hyena:
            return super().forward(x)  # type: ignore[no-any-return,unused-ignore]
        b, _, d, h, w = x.shape
        window, shift = get_window_size((d, h, w), self.window_size, self.shift_size)
        padded = tuple(math.ceil(size / win) * win for size, win in zip((d, h, w), window, strict=True))
        mask = shifted_window_mask(padded, tuple(window), tuple(shift), x.device)
        x = x.permute(0, 2, 3, 4, 1)
        for block in self.blocks:
            x = block(x, mask)
        x = x.view(b, d, h, w, -1)
        if self.downsample is not None:
            x = self.downsample(x)
        return x.permute(0, 4, 1, 2, 3)


def use_opaque_attention(model: nn.Module) -> int:
    """Route every MONAI window attention of ``model`` through :func:`window_attention`; returns how many.

    Stages also take their shifted-window masks from :func:`shifted_window_mask`. Classes are
    swapped rather than ``forward`` patched on instances: torch.compile guards on classes, and a
    bound method would tie a compiled graph to the first module it saw.
    """
    changed = 0
    for module in model.modules():
        if type(module) is WindowAttention:
            module.__class__ = OpaqueWindowAttention
            changed += 1
        elif type(module) is BasicLayer:
            module.__class__ = EagerMaskBasicLayer
    return changed
