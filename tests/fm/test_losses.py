"""DINOv2 losses against independent reference computations written out with numpy loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fm.losses import TeacherCentering, dino_loss, ibot_patch_loss, koleo_loss, sinkhorn_knopp


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _softmax(x: np.ndarray) -> np.ndarray:
    return np.exp(_log_softmax(x))


def _sinkhorn_reference(logits: np.ndarray, temperature: float, n_iterations: int) -> np.ndarray:
    """SwAV / DINOv2 Sinkhorn-Knopp, plain numpy in float64."""
    q = np.exp(logits.astype(np.float64) / temperature).T  # K x B
    k, b = q.shape
    q /= q.sum()
    for _ in range(n_iterations):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= b
    q *= b
    return q.T


def _imbalanced_logits(b: int = 24, k: int = 16, seed: int = 0) -> np.ndarray:
    """Logits where a few prototypes dominate every sample (a collapsed-looking teacher)."""
    rng = np.random.default_rng(seed)
    bias = np.zeros(k)
    bias[:3] = 0.15
    return (rng.normal(0, 0.05, size=(b, k)) + bias).astype(np.float32)


# ---------------------------------------------------------------- Sinkhorn-Knopp


@pytest.mark.parametrize("n_iterations", [1, 3, 10])
def test_sinkhorn_equals_numpy_reference(n_iterations):
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 1, size=(12, 20)).astype(np.float32)
    got = sinkhorn_knopp(torch.from_numpy(logits), 0.07, n_iterations).numpy()
    expected = _sinkhorn_reference(logits, 0.07, n_iterations)
    assert got.shape == (12, 20)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_sinkhorn_rows_are_distributions():
    logits = torch.from_numpy(_imbalanced_logits())
    q = sinkhorn_knopp(logits, 0.04, 3)
    assert torch.all(q >= 0)
    np.testing.assert_allclose(q.sum(dim=1).numpy(), np.ones(q.shape[0]), atol=1e-5)


def test_sinkhorn_balances_prototypes():
    logits_np = _imbalanced_logits()
    b, k = logits_np.shape
    logits = torch.from_numpy(logits_np)
    uniform = np.full(k, b / k)

    softmax_cols = _softmax(logits_np / 0.04).sum(axis=0)
    sk3_cols = sinkhorn_knopp(logits, 0.04, 3).sum(dim=0).numpy()
    sk50_cols = sinkhorn_knopp(logits, 0.04, 50).sum(dim=0).numpy()

    err_softmax = np.abs(softmax_cols - uniform).max()
    err_sk3 = np.abs(sk3_cols - uniform).max()
    assert err_softmax > 0.5  # the test input really is imbalanced
    assert err_sk3 < 0.5 * err_softmax
    np.testing.assert_allclose(sk50_cols, uniform, atol=1e-3)


def test_sinkhorn_invariant_to_constant_shift():
    logits = torch.from_numpy(_imbalanced_logits(seed=3))
    base = sinkhorn_knopp(logits, 0.04, 3)
    shifted = sinkhorn_knopp(logits + 50.0, 0.04, 3)  # exp(50 / 0.04) would overflow without care
    assert torch.isfinite(shifted).all()
    torch.testing.assert_close(shifted, base, rtol=1e-4, atol=1e-6)


def test_centering_module_sinkhorn_mode_matches_reference():
    logits = _imbalanced_logits(seed=5)
    centering = TeacherCentering(logits.shape[1], mode="sinkhorn_knopp", sk_iterations=3)
    got = centering(torch.from_numpy(logits), 0.05).numpy()
    np.testing.assert_allclose(got, _sinkhorn_reference(logits, 0.05, 3), rtol=1e-4, atol=1e-6)


def test_centering_rejects_unknown_mode():
    with pytest.raises(ValueError, match="sinkhorn"):
        TeacherCentering(8, mode="sinkhorn")


# ---------------------------------------------------------------- softmax centering


def test_softmax_centering_and_centre_update_over_two_calls():
    rng = np.random.default_rng(7)
    k, temp, momentum = 9, 0.04, 0.9
    t1 = rng.normal(0, 1, size=(6, k)).astype(np.float32)
    t2 = rng.normal(0.5, 1, size=(6, k)).astype(np.float32)
    centering = TeacherCentering(k, mode="softmax", center_momentum=momentum)

    got1 = centering(torch.from_numpy(t1), temp).numpy()
    c1 = momentum * np.zeros(k) + (1 - momentum) * t1.mean(axis=0)
    got2 = centering(torch.from_numpy(t2), temp).numpy()
    c2 = momentum * c1 + (1 - momentum) * t2.mean(axis=0)

    np.testing.assert_allclose(got1, _softmax(t1 / temp), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got2, _softmax((t2 - c1) / temp), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(centering.center.numpy().ravel(), c2, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- DINO loss


def _dino_reference(sg, sl, t, n_global, batch, student_temp=0.1):
    """Explicit double loop; rows are crop-major (crop c of sample b at row c * batch + b)."""
    def crop(x, c):
        return x[c * batch : (c + 1) * batch]

    total, pairs = 0.0, 0
    for i in range(n_global):
        for j in range(n_global):
            if i == j:
                continue
            logp = _log_softmax(crop(sg, i) / student_temp)
            total += np.mean(-(crop(t, j) * logp).sum(axis=-1))
            pairs += 1
    n_local = 0 if sl is None else sl.shape[0] // batch
    for i in range(n_local):
        for j in range(n_global):
            logp = _log_softmax(crop(sl, i) / student_temp)
            total += np.mean(-(crop(t, j) * logp).sum(axis=-1))
            pairs += 1
    assert pairs == n_global * (n_global - 1) + n_local * n_global
    return total / pairs


@pytest.mark.parametrize("n_global,n_local", [(2, 3), (2, 0), (3, 2)])
def test_dino_loss_equals_explicit_pair_loop(n_global, n_local):
    rng = np.random.default_rng(11)
    batch, k = 4, 7
    sg = rng.normal(0, 1, size=(n_global * batch, k))
    sl = rng.normal(0, 1, size=(n_local * batch, k)) if n_local else None
    t = _softmax(rng.normal(0, 2, size=(n_global * batch, k)))
    expected = _dino_reference(sg, sl, t, n_global, batch)

    sg_t = torch.tensor(sg, dtype=torch.float32, requires_grad=True)
    sl_t = torch.tensor(sl, dtype=torch.float32, requires_grad=True) if n_local else None
    got = dino_loss(sg_t, sl_t, torch.tensor(t, dtype=torch.float32), n_global, student_temp=0.1)
    assert got.ndim == 0
    assert got.item() == pytest.approx(expected, rel=1e-5)
    got.backward()
    assert sg_t.grad.abs().sum() > 0
    if n_local:
        assert sl_t.grad.abs().sum() > 0


def test_dino_loss_is_crop_major_not_sample_major():
    """Swapping to a sample-major layout changes the value, so the layout convention is really tested."""
    rng = np.random.default_rng(12)
    batch, k, n_global = 3, 5, 2
    sg = rng.normal(0, 1, size=(n_global * batch, k))
    t = _softmax(rng.normal(0, 3, size=(n_global * batch, k)))
    crop_major = _dino_reference(sg, None, t, n_global, batch)
    # the same data read sample-major: row b * n_global + c
    order = [b * n_global + c for c in range(n_global) for b in range(batch)]
    sample_major = _dino_reference(sg[order], None, t, n_global, batch)
    got = dino_loss(torch.tensor(sg, dtype=torch.float32), None, torch.tensor(t, dtype=torch.float32), n_global)
    assert abs(crop_major - sample_major) > 1e-3
    assert got.item() == pytest.approx(crop_major, rel=1e-5)


# ---------------------------------------------------------------- iBOT loss


def test_ibot_loss_equals_per_image_loop():
    rng = np.random.default_rng(13)
    k = 6
    masks = np.zeros((4, 3, 3), dtype=bool)
    masks[0, 0, :2] = True  # 2 patches
    masks[2, 1:, 1:] = True  # 4 patches
    masks[2, 0, 0] = True  # 5 patches
    masks[3, 2, 2] = True  # 1 patch; image 1 is unmasked
    m_total = int(masks.sum())
    student = rng.normal(0, 1, size=(m_total, k))
    teacher = _softmax(rng.normal(0, 2, size=(m_total, k)))

    total, row = 0.0, 0
    for n in range(masks.shape[0]):
        m = int(masks[n].sum())
        image_sum = 0.0
        for _ in range(m):  # rows follow the images, then the patches in row-major order
            ce = -(teacher[row] * _log_softmax(student[row] / 0.1)).sum()
            image_sum += ce
            row += 1
        if m:
            total += image_sum / m
    expected = total / masks.shape[0]

    s = torch.tensor(student, dtype=torch.float32, requires_grad=True)
    got = ibot_patch_loss(s, torch.tensor(teacher, dtype=torch.float32), torch.from_numpy(masks), 0.1)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    got.backward()
    assert torch.all(s.grad.abs().sum(dim=1) > 0)


def test_ibot_loss_without_masked_patches_is_zero_with_gradient_path():
    masks = torch.zeros(4, 3, 3, dtype=torch.bool)
    s = torch.zeros(0, 6, requires_grad=True)
    loss = ibot_patch_loss(s, torch.zeros(0, 6), masks)
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()  # must not raise: DDP needs every step to reach the head
    assert s.grad is not None and s.grad.shape == (0, 6)


# ---------------------------------------------------------------- KoLeo


def _koleo_reference(x: np.ndarray, eps: float = 1e-8) -> float:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    logs = []
    for i in range(len(x)):
        best = np.inf
        for j in range(len(x)):
            if j != i:
                best = min(best, np.linalg.norm(x[i] - x[j]))
        logs.append(np.log(best + eps))
    return -float(np.mean(logs))


def test_koleo_equals_nearest_neighbour_loop():
    rng = np.random.default_rng(17)
    x = rng.normal(0, 1, size=(10, 5))
    x[3] = x[7] * 1.0001 + 0.01  # a close pair, so the nearest neighbour is not trivial
    got = koleo_loss(torch.tensor(x * 3.0, dtype=torch.float32))  # scale must not matter
    assert got.item() == pytest.approx(_koleo_reference(x), rel=1e-4, abs=1e-5)


def test_koleo_prefers_spread_out_batch():
    rng = np.random.default_rng(19)
    spread = torch.tensor(rng.normal(0, 1, size=(16, 8)), dtype=torch.float32)
    clustered = torch.ones(16, 8) + 0.05 * torch.tensor(rng.normal(0, 1, size=(16, 8)), dtype=torch.float32)
    assert koleo_loss(spread) < koleo_loss(clustered) - 1.0


def test_koleo_duplicates_stay_finite():
    x = torch.ones(4, 3, requires_grad=True)
    loss = koleo_loss(x)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


# ---------------------------------------------------------------- two ranks (gloo, CPU)


def _two_rank_worker(rank: int, init_file: str, logits: np.ndarray, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        half = logits.shape[0] // 2
        local = torch.from_numpy(logits[rank * half : (rank + 1) * half])
        sk = sinkhorn_knopp(local, 0.05, 3)
        centering = TeacherCentering(logits.shape[1], mode="softmax", center_momentum=0.9)
        centering(local, 0.05)
        np.save(f"{out_dir}/sk{rank}.npy", sk.numpy())
        np.save(f"{out_dir}/center{rank}.npy", centering.center.numpy())
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_balance_over_the_global_batch(tmp_path):
    """Split over two ranks, Sinkhorn-Knopp and the softmax centre equal the single-process result on the
    whole batch (sums are all-reduced)."""
    import torch.multiprocessing as mp

    logits = _imbalanced_logits(b=16, k=10, seed=23)
    mp.spawn(_two_rank_worker, args=(str(tmp_path / "init"), logits, str(tmp_path)), nprocs=2, join=True)
    sk = np.concatenate([np.load(tmp_path / "sk0.npy"), np.load(tmp_path / "sk1.npy")])
    np.testing.assert_allclose(sk, _sinkhorn_reference(logits, 0.05, 3), rtol=1e-4, atol=1e-6)
    expected_center = 0.1 * logits.mean(axis=0)
    for rank in (0, 1):
        np.testing.assert_allclose(np.load(tmp_path / f"center{rank}.npy").ravel(), expected_center, rtol=1e-5, atol=1e-7)
