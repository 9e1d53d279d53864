"""DINO head: MLP -> L2 norm -> weight-normalised prototypes, with Meta's parameter names."""

from __future__ import annotations

import torch
from torch import nn

from fm.heads import DINOHead, WeightNormLinear


def _head(**kw) -> DINOHead:
    torch.manual_seed(0)
    args = {"in_dim": 24, "out_dim": 50, "hidden_dim": 32, "bottleneck_dim": 8, "nlayers": 3} | kw
    return DINOHead(**args)


def test_output_shape_and_meta_parameter_names():
    head = _head()
    assert head(torch.randn(5, 24)).shape == (5, 50)
    keys = set(head.state_dict())
    # Meta's dino_head keys: mlp.0/2/4 linear layers (GELU between), weight-normed last layer, no bias
    assert keys == {
        "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight", "mlp.4.bias",
        "last_layer.weight_g", "last_layer.weight_v",
    }
    assert head.state_dict()["mlp.0.weight"].shape == (32, 24)
    assert head.state_dict()["mlp.4.weight"].shape == (8, 32)
    assert head.state_dict()["last_layer.weight_v"].shape == (50, 8)
    assert head.state_dict()["last_layer.weight_g"].shape == (50, 1)


def test_mlp_structure_gelu_between_layers_only():
    head = _head()
    kinds = [type(m) for m in head.mlp]
    assert kinds == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    single = _head(nlayers=1)
    assert [type(m) for m in single.mlp] == [nn.Linear]
    assert single.mlp[0].weight.shape == (8, 24)


def test_prototype_rows_have_norm_g():
    head = _head()
    v = head.last_layer.weight_v.detach()
    g = head.last_layer.weight_g.detach()
    effective = g * v / v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(effective.norm(dim=1), torch.ones(50))
    # the forward uses that effective weight: compare with an explicit matrix product
    x = torch.randn(3, 8)
    torch.testing.assert_close(head.last_layer(x), x @ effective.t())
    # and g really scales the rows
    with torch.no_grad():
        head.last_layer.weight_g[:5] = 2.5
    out = head.last_layer(x)
    torch.testing.assert_close(out[:, :5], 2.5 * (x @ effective.t())[:, :5])
    torch.testing.assert_close(out[:, 5:], (x @ effective.t())[:, 5:])


def test_bottleneck_is_l2_normalised_so_logits_are_bounded():
    head = _head()
    x = 1000.0 * torch.randn(16, 24)
    with torch.no_grad():
        z = head.mlp(x)
        expected = (z / z.norm(dim=1, keepdim=True)) @ (
            head.last_layer.weight_v / head.last_layer.weight_v.norm(dim=1, keepdim=True)
        ).t()
        logits = head(x)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    assert logits.abs().max() <= 1.0 + 1e-5  # |cos| <= 1 with unit prototypes at init
    assert logits.abs().max() > 0.1  # and not trivially zero


def test_weight_norm_gradient_is_orthogonal_to_v():
    """A property of weight normalisation: d loss / d v is orthogonal to v in every row."""
    torch.manual_seed(1)
    layer = WeightNormLinear(6, 4)
    layer(torch.randn(10, 6)).pow(2).sum().backward()
    v, grad = layer.weight_v.detach(), layer.weight_v.grad
    assert grad.abs().sum() > 0
    cosine = (v * grad).sum(dim=1) / (v.norm(dim=1) * grad.norm(dim=1))
    assert cosine.abs().max() < 1e-4
    assert layer.weight_g.grad is not None and layer.weight_g.grad.abs().sum() > 0
