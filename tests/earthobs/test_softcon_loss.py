"""SoftCon loss against formulas written out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from earthobs.softcon_loss import SoftConLoss, soft_targets


def embeddings(batch: int = 6, dim: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, dim, generator=gen), torch.randn(batch, dim, generator=gen)


def cosine_matrix(a, b):
    """S_ij written out element by element."""
    out = torch.empty(a.shape[0], b.shape[0])
    for i in range(a.shape[0]):
        for j in range(b.shape[0]):
            out[i, j] = (a[i] @ b[j]) / (a[i].norm() * b[j].norm())
    return out


def handwritten_info_nce(sim, temperature):
    """-1/B sum_i log( exp(S_ii / t) / sum_j exp(S_ij / t) ), rows only."""
    total = 0.0
    for i in range(sim.shape[0]):
        row = [math.exp(sim[i, j].item() / temperature) for j in range(sim.shape[1])]
        total += -math.log(row[i] / sum(row))
    return total / sim.shape[0]


def test_soft_target_matrix_by_hand():
    labels = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0], [0, 1, 1]], dtype=torch.float)
    expected = torch.tensor(
        [
            [1.0, 1 / math.sqrt(2), 0.0, 0.5],
            [1 / math.sqrt(2), 1.0, 0.0, 0.0],
            [0.0, 0.0, 1.0, 0.0],  # unlabelled row: identity
            [0.5, 0.0, 0.0, 1.0],
        ]
    )
    torch.testing.assert_close(soft_targets(labels), expected)


@pytest.mark.parametrize("labels", [None, torch.eye(6), torch.eye(6)[[2, 0, 5, 1, 3, 4]]])
def test_ce_soft_term_equals_info_nce_with_identity_targets(labels):
    student, teacher = embeddings()
    loss_fn = SoftConLoss(temperature=0.2, soft_mode="ce", symmetric=False)
    out = loss_fn(student, teacher, labels)
    expected = handwritten_info_nce(cosine_matrix(student, teacher), 0.2)
    assert out["instance"].item() == pytest.approx(expected, rel=1e-5)
    assert out["soft"].item() == pytest.approx(expected, rel=1e-5)
    assert out["loss"].item() == pytest.approx(2 * expected, rel=1e-5)


def test_symmetric_instance_term_averages_both_directions():
    student, teacher = embeddings()
    sim = cosine_matrix(student, teacher)
    expected = 0.5 * (handwritten_info_nce(sim, 0.1) + handwritten_info_nce(sim.T, 0.1))
    out = SoftConLoss(temperature=0.1, symmetric=True)(student, teacher)
    assert out["instance"].item() == pytest.approx(expected, rel=1e-5)


def test_bce_soft_term_matches_explicit_formula():
    student, teacher = embeddings(batch=4)
    labels = torch.tensor([[1, 0, 1], [1, 0, 0], [0, 0, 0], [0, 1, 1]], dtype=torch.float)
    a, b = 7.0, -3.0
    out = SoftConLoss(soft_mode="bce", bce_scale=a, bce_bias=b, soft_weight=0.5)(student, teacher, labels)
    sim = cosine_matrix(student, teacher)
    targets = soft_targets(labels)
    total = 0.0
    for i in range(4):
        for j in range(4):
            p = 1 / (1 + math.exp(-(a * sim[i, j].item() + b)))
            t = targets[i, j].item()
            total += -(t * math.log(p) + (1 - t) * math.log(1 - p))
    assert out["soft"].item() == pytest.approx(total / 16, rel=1e-5)
    assert out["loss"].item() == pytest.approx(out["instance"].item() + 0.5 * total / 16, rel=1e-5)


def test_soft_labels_change_the_ce_term():
    """Control for the identity test: shared labels move mass off the diagonal and change the loss."""
    student, teacher = embeddings()
    labels = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1], [1, 1], [0, 0]], dtype=torch.float)
    loss_fn = SoftConLoss(soft_mode="ce")
    with_labels = loss_fn(student, teacher, labels)["soft"]
    without = loss_fn(student, teacher, None)["soft"]
    assert not torch.isclose(with_labels, without)


@pytest.mark.parametrize("mode", ["bce", "ce"])
def test_permuting_the_batch_leaves_the_loss_unchanged(mode):
    student, teacher = embeddings(batch=8)
    labels = (torch.rand(8, 9, generator=torch.Generator().manual_seed(1)) > 0.6).float()
    labels[3] = 0
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(2))
    loss_fn = SoftConLoss(soft_mode=mode)
    a = loss_fn(student, teacher, labels)
    b = loss_fn(student[perm], teacher[perm], labels[perm])
    for key in ("loss", "instance", "soft"):
        torch.testing.assert_close(a[key], b[key])
    # Control: permuting only the teacher breaks the positives and changes the loss.
    c = loss_fn(student, teacher[perm], labels)
    assert not torch.isclose(c["instance"], a["instance"])


@pytest.mark.parametrize("mode", ["bce", "ce"])
def test_gradients_are_finite_with_empty_label_rows(mode):
    student, teacher = embeddings()
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    labels = torch.zeros(6, 9)
    labels[0, 2] = 1
    loss_fn = SoftConLoss(soft_mode=mode, learnable_bce=True)
    loss_fn(student, teacher, labels)["loss"].backward()
    assert student.grad is not None and student.grad.isfinite().all() and student.grad.abs().sum() > 0
    assert teacher.grad is None  # the teacher branch gets no gradient
    if mode == "bce":
        assert loss_fn.log_bce_scale.grad.isfinite() and loss_fn.bce_bias.grad.isfinite()


def test_bad_inputs_are_refused():
    student, teacher = embeddings()
    with pytest.raises(ValueError, match="soft_mode"):
        SoftConLoss(soft_mode="kl")
    with pytest.raises(ValueError, match="rows"):
        SoftConLoss()(student, teacher, torch.zeros(5, 9))
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        SoftConLoss()(student, teacher[:4])


def test_similarities_stay_fp32_under_bf16_autocast():
    """Autocast would run the similarity matmul in bf16 (errors ~1e-2 after / temperature)."""
    student, teacher = embeddings(batch=32, dim=64)
    loss_fn = SoftConLoss(soft_mode="ce")
    reference = loss_fn(student, teacher)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss_fn(student, teacher)
    for key in ("instance", "soft"):
        torch.testing.assert_close(out[key], reference[key], atol=1e-5, rtol=1e-5)


def handwritten_soft_cross_entropy(sim, targets, temperature):
    """-1/B sum_i sum_j P_ij log softmax_j(S_ij / t), with P_ij = T_ij / sum_k T_ik (rows of T sum to 1)."""
    total = 0.0
    for i in range(sim.shape[0]):
        row_sum = sum(targets[i, k].item() for k in range(targets.shape[1]))
        logits = [sim[i, j].item() / temperature for j in range(sim.shape[1])]
        log_norm = math.log(sum(math.exp(v) for v in logits))
        for j in range(sim.shape[1]):
            total += -(targets[i, j].item() / row_sum) * (logits[j] - log_norm)
    return total / sim.shape[0]


@pytest.mark.parametrize("symmetric", [False, True])
def test_ce_soft_term_with_overlapping_labels_matches_handwritten_loop(symmetric):
    """With shared labels the `ce` term is cross-entropy against the ROW-NORMALISED label similarities;
    symmetric averages the row direction (S) and the column direction (S.T) against the same rows,
    as the docstring of soft_cross_entropy says. Raw, unnormalised targets would not match."""
    student, teacher = embeddings(batch=5)
    labels = torch.tensor(
        [[1, 1, 0, 0], [1, 0, 0, 0], [0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 1, 1]], dtype=torch.float
    )
    targets = soft_targets(labels)
    assert (targets.sum(dim=1) > 1.5).all()  # every row overlaps another: normalising matters
    sim = cosine_matrix(student, teacher)
    expected = handwritten_soft_cross_entropy(sim, targets, 0.3)
    if symmetric:
        expected = 0.5 * (expected + handwritten_soft_cross_entropy(sim.T, targets, 0.3))
    loss_fn = SoftConLoss(temperature=0.1, soft_temperature=0.3, soft_mode="ce", symmetric=symmetric)
    out = loss_fn(student, teacher, labels)
    assert out["soft"].item() == pytest.approx(expected, rel=1e-5, abs=1e-5)
