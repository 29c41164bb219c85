"""The opaque window-attention operator computes what MONAI's attention computes, eager and traced."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from monai.networks.nets.swin_unetr import WindowAttention, compute_mask

from segq.modelspec import ModelSpec
from worker.engines.attention import (
    EagerMaskBasicLayer,
    OpaqueWindowAttention,
    shifted_window_mask,
    use_opaque_attention,
)
from worker.engines.model import build_network


@pytest.mark.parametrize("shifted", [False, True])
def test_opaque_attention_matches_monai_window_attention(shifted: bool) -> None:
    torch.manual_seed(0)
    monai = WindowAttention(24, 3, (7, 7, 7)).eval()
    with torch.no_grad():  # the bias table starts at zero-ish; make the relative bias matter
        monai.relative_position_bias_table.normal_(0, 1)
    opaque = copy.deepcopy(monai)
    opaque.__class__ = OpaqueWindowAttention
    mask = compute_mask([14, 14, 14], (7, 7, 7), (3, 3, 3), torch.device("cpu")) if shifted else None
    x = torch.randn(2 * 8, 343, 24)  # two ROIs of 8 windows each
    with torch.inference_mode():
        expected = monai(x, mask)
        actual = opaque(x, mask)
        traced = torch.compile(opaque, backend="aot_eager", fullgraph=True)(x, mask)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(traced, expected, rtol=1e-5, atol=1e-5)


def test_whole_swinunetr_gives_the_same_probabilities_through_the_opaque_path() -> None:
    spec = ModelSpec("SwinUNETR", 1, 2, 64, 1, checkpoint=Path("unused"), feature_size=12)
    torch.manual_seed(0)
    network = build_network(spec).eval()
    opaque = copy.deepcopy(network)
    assert use_opaque_attention(opaque) == 8
    assert sum(type(m) is EagerMaskBasicLayer for m in opaque.modules()) == 4
    x = torch.randn(1, 1, 64, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(opaque(x), network(x), rtol=1e-4, atol=1e-4)


def test_shifted_window_mask_is_built_once_per_size() -> None:
    args = ((14, 14, 14), (7, 7, 7), (3, 3, 3), torch.device("cpu"))
    first = shifted_window_mask(*args)
    assert shifted_window_mask(*args) is first
    torch.testing.assert_close(first, compute_mask(list(args[0]), args[1], args[2], args[3]))
