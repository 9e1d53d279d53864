"""Seeded generated MIL bags: positive bags hide a few "signal" instances among noise.

Every instance is Gaussian noise in `dim` dimensions. A positive bag carries `n_signal` instances
shifted by `amplitude` along a fixed unit direction; the bag's other instances, and all instances
of negative bags, are pure noise. Averaging a bag dilutes the shift by n_signal / n_instances, so
attention (which can single the signal out) should beat mean pooling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass
class ToyBags:
    features: dict[str, np.ndarray]  # slide_id -> (N, dim) float16, as features are stored on disk
    signal: dict[str, np.ndarray]  # slide_id -> (N,) bool: which instances carry the signal
    coords: dict[str, np.ndarray]  # slide_id -> (N, 2) level-0 tile corners on a 224 px grid
    labels: pd.DataFrame  # slide_id, patient_id, label (0/1)


def make_bags(
    n_bags: int = 160,
    n_instances: int = 100,
    dim: int = 32,
    n_signal: int = 4,
    amplitude: float = 4.0,
    slides_per_patient: int = 1,
    seed: int = 0,
    prefix: str = "slide",
) -> ToyBags:
    rng = np.random.default_rng(seed)
    direction = np.zeros(dim)
    direction[0] = 1.0  # the same for every seed so that cohorts drawn with different seeds share it
    features, signal, coords, rows = {}, {}, {}, []
    n_patients = -(-n_bags // slides_per_patient)
    patient_labels = rng.permutation(np.arange(n_patients) % 2)
    for i in range(n_bags):
        patient = i // slides_per_patient
        label = int(patient_labels[patient])
        sid = f"{prefix}{i:04d}"
        x = rng.standard_normal((n_instances, dim))
        is_signal = np.zeros(n_instances, dtype=bool)
        if label:
            is_signal[rng.choice(n_instances, n_signal, replace=False)] = True
            x[is_signal] += amplitude * direction
        grid = rng.choice(400, n_instances, replace=False)
        features[sid] = x.astype(np.float16)
        signal[sid] = is_signal
        coords[sid] = np.stack([grid % 20, grid // 20], axis=1) * 224
        rows.append({"slide_id": sid, "patient_id": f"{prefix}-patient{patient:04d}", "label": label})
    return ToyBags(features, signal, coords, pd.DataFrame(rows))
