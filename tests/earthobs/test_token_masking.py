"""Siamese token dropping: shapes, subsets, and equality with the plain forward when nothing is dropped."""

from __future__ import annotations

import pytest
import torch

from earthobs.masking import drop_patch_tokens, masked_forward, num_kept
from fm.backbones import BackboneConfig, build_backbone


def tiny_backbone(num_registers: int = 0):
    torch.manual_seed(0)
    cfg = BackboneConfig(
        arch="vitt", patch_size=14, img_size=56, in_chans=4, embed_dim=32, depth=2, num_heads=2,
        drop_path_rate=0.0, num_registers=num_registers,
    )
    model = build_backbone(cfg).eval()
    with torch.no_grad():  # LayerScale 1e-5 would make the CLS output blind to the patch tokens
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(0.5)
    return model


def test_drop_ratio_zero_equals_plain_forward():
    model = tiny_backbone()
    x = torch.rand(3, 4, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(masked_forward(model, x, 0.0), model(x), rtol=0, atol=0)
        # Control: dropping tokens changes the embedding.
        dropped = masked_forward(model, x, 0.5, torch.Generator().manual_seed(0))
    assert not torch.allclose(dropped, model(x), atol=1e-4)


@pytest.mark.parametrize("registers", [0, 4])
def test_shapes_and_prefix_tokens_kept(registers):
    model = tiny_backbone(registers)
    tokens = model.embed(torch.rand(2, 4, 56, 56)).detach()
    prefix = model.num_prefix_tokens
    assert tokens.shape == (2, prefix + 16, 32)
    out, idx = drop_patch_tokens(tokens, prefix, 0.75, torch.Generator().manual_seed(1), return_indices=True)
    assert out.shape == (2, prefix + 4, 32) and idx.shape == (2, 4)
    torch.testing.assert_close(out[:, :prefix], tokens[:, :prefix])
    with torch.no_grad():
        assert masked_forward(model, torch.rand(2, 4, 56, 56), 0.75).shape == (2, 32)


def test_kept_tokens_are_a_distinct_subset_in_order():
    tokens = torch.randn(5, 1 + 20, 8)
    out, idx = drop_patch_tokens(tokens, 1, 0.6, torch.Generator().manual_seed(2), return_indices=True)
    assert out.shape == (5, 1 + 8, 8)
    for b in range(5):
        assert len(set(idx[b].tolist())) == 8
        assert idx[b].tolist() == sorted(idx[b].tolist())
        for k, patch in enumerate(idx[b].tolist()):
            torch.testing.assert_close(out[b, 1 + k], tokens[b, 1 + patch])
    # Each sample draws its own subset.
    assert not all(torch.equal(idx[0], idx[b]) for b in range(1, 5))


def test_seeded_generator_is_deterministic():
    tokens = torch.randn(2, 17, 8)
    a = drop_patch_tokens(tokens, 1, 0.5, torch.Generator().manual_seed(3))
    b = drop_patch_tokens(tokens, 1, 0.5, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)


def test_gradient_reaches_the_student_through_kept_tokens():
    model = tiny_backbone().train()
    out = masked_forward(model, torch.rand(2, 4, 56, 56), 0.5)
    (out * torch.randn_like(out)).sum().backward()  # a plain sum of a LayerNorm output has no gradient
    assert model.vit.patch_embed.proj.weight.grad.abs().sum() > 0


def test_bad_ratios_are_refused():
    assert num_kept(16, 0.99) == 1
    with pytest.raises(ValueError, match="drop_ratio"):
        num_kept(16, 1.0)
    with pytest.raises(ValueError, match="prefix"):
        drop_patch_tokens(torch.randn(1, 1, 8), 1, 0.5)
