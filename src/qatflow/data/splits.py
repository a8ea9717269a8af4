"""Deterministic train / validation / test / calibration index sets."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SplitPlan:
    """Sorted example indices per split.

    ``train``, ``validation`` and ``calibration`` index the source's train examples; ``test``
    indexes its own test examples or, when ``test_from_train``, its train examples as well.
    """

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    calibration: np.ndarray
    test_from_train: bool


def plan_splits(
    n_train: int,
    n_test: int | None,
    *,
    validation_split: float,
    test_split: float,
    calibration_size: int,
    seed: int,
    limit: int | None,
) -> SplitPlan:
    """Carve the splits with one seeded permutation of the train examples.

    Without a test set of its own (``n_test`` is None) the test split is carved first. The
    calibration split is a subset of train. ``limit`` keeps a random ``limit`` of each split.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_train)
    if n_test is None:
        n_carved = round(n_train * test_split)
        test, order = order[:n_carved], order[n_carved:]
    else:
        test = rng.permutation(n_test)
    n_validation = round(len(order) * validation_split)
    validation, train = order[:n_validation], order[n_validation:]
    calibration = rng.permutation(train)[:calibration_size]

    def keep(indices: np.ndarray) -> np.ndarray:
        return np.sort(indices[:limit])

    return SplitPlan(
        train=keep(train),
        validation=keep(validation),
        test=keep(test),
        calibration=keep(calibration),
        test_from_train=n_test is None,
    )
