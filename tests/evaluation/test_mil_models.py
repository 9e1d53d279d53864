"""MIL heads: padding is invisible, attention is a distribution, stacked training equals separate training."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from evaluation.mil_models import (
    GatedAttentionMIL,
    MeanPoolMIL,
    StackedMIL,
    build_mil_model,
    cross_entropy_per_member,
)


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Tiny tensors: OpenMP threads only add sync overhead on a busy CI box."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ["abmil", "mean"])
def test_padding_does_not_change_the_prediction(name):
    model = build_mil_model(name, in_dim=16, n_classes=3).eval()
    bag = torch.randn(7, 16)
    padded = torch.cat([bag, torch.randn(5, 16) * 100]).unsqueeze(0)  # loud garbage in the padding
    mask = torch.arange(12).unsqueeze(0) < 7
    logits_single, attention_single = model(bag)
    logits_padded, attention_padded = model(padded, mask)
    assert logits_single.shape == (3,) and logits_padded.shape == (1, 3)
    torch.testing.assert_close(logits_padded[0], logits_single, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attention_padded[0, :7], attention_single, atol=1e-6, rtol=1e-5)
    assert torch.all(attention_padded[0, 7:] == 0)
    torch.testing.assert_close(attention_single.sum(), torch.tensor(1.0))


def test_batch_of_bags_equals_bags_one_by_one():
    model = GatedAttentionMIL(16, n_classes=2, hidden_dim=32, attention_dim=8).eval()
    bags = [torch.randn(n, 16) for n in (3, 9, 5)]
    x = torch.zeros(3, 9, 16)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    for i, bag in enumerate(bags):
        x[i, : len(bag)] = bag
        mask[i, : len(bag)] = True
    logits, attention = model(x, mask)
    for i, bag in enumerate(bags):
        torch.testing.assert_close(logits[i], model(bag)[0], atol=1e-5, rtol=1e-5)
    assert attention.shape == (3, 9)


def test_attention_follows_the_gated_formula():
    model = GatedAttentionMIL(6, n_classes=2, hidden_dim=None, attention_dim=4, dropout=0.0).eval()
    h = torch.randn(5, 6)
    scores = model.attention_w(
        torch.tanh(model.attention_v(h)) * torch.sigmoid(model.attention_u(h))
    ).squeeze(-1)
    expected = torch.softmax(scores, 0)
    logits, attention = model(h)
    torch.testing.assert_close(attention, expected)
    torch.testing.assert_close(logits, model.classifier(expected @ h))


def test_mean_pool_is_the_masked_mean():
    model = MeanPoolMIL(4, n_classes=2).eval()
    x = torch.randn(1, 6, 4)
    mask = torch.tensor([[True, True, False, True, False, False]])
    logits, weights = model(x, mask)
    torch.testing.assert_close(logits[0], model.classifier(x[0, mask[0]].mean(0)))
    torch.testing.assert_close(weights[0], mask[0].float() / 3)


def test_unknown_model_name_lists_the_choices():
    with pytest.raises(ValueError, match="abmil"):
        build_mil_model("transmil", 8, 2)
    with pytest.raises(ValueError, match=r"\(N, D\) or \(B, N, D\)"):
        GatedAttentionMIL(4)(torch.randn(4))


@pytest.mark.parametrize("name", ["abmil", "mean"])
def test_stacked_training_equals_separate_training(name):
    """One Adam over stacked members with summed losses == each member trained alone."""
    kwargs = {"hidden_dim": 16, "attention_dim": 8, "dropout": 0.0} if name == "abmil" else {}
    members = [build_mil_model(name, 8, 2, **kwargs) for _ in range(3)]
    alone = [copy.deepcopy(m) for m in members]
    stacked = StackedMIL(members)
    opt = torch.optim.Adam(stacked.parameters(), lr=1e-2, weight_decay=1e-4)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2, weight_decay=1e-4) for m in alone]
    for _ in range(5):
        x = torch.randn(3, 2, 10, 8)  # member, bag, instance, dim
        mask = torch.rand(3, 2, 10) < 0.8
        mask[..., 0] = True
        y = torch.randint(0, 2, (3, 2))
        logits, attention = stacked(x, mask)
        assert logits.shape == (3, 2, 2) and attention.shape == (3, 2, 10)
        opt.zero_grad()
        cross_entropy_per_member(logits, y).sum().backward()
        opt.step()
        for j, (model, o) in enumerate(zip(alone, opts)):
            o.zero_grad()
            F.cross_entropy(model(x[j], mask[j])[0], y[j]).backward()
            o.step()
    changed = False
    for j, model in enumerate(alone):
        extracted = stacked.member(j)
        for (key, expected), (_, got) in zip(model.state_dict().items(), extracted.state_dict().items()):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4, msg=key)
            changed |= not torch.allclose(got, members[j].state_dict()[key])
    assert changed  # the members did move: the comparison is not between two untouched copies


def test_stacked_shared_input_runs_every_member_on_the_same_bags():
    members = [GatedAttentionMIL(8, 2, hidden_dim=16, attention_dim=8).eval() for _ in range(2)]
    stacked = StackedMIL(members).eval()
    x = torch.randn(4, 6, 8)
    mask = torch.ones(4, 6, dtype=torch.bool)
    logits, _ = stacked(x, mask, shared_input=True)
    for j, member in enumerate(members):
        torch.testing.assert_close(logits[j], member(x, mask)[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits[0], logits[1])
