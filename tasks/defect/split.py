"""Non-IID plant split of ELPV: cells come in modules (blocks of consecutive cells) and plants favour a cell type."""

from __future__ import annotations

import numpy as np


def module_blocks(cell_types: np.ndarray, block_size: int) -> list[np.ndarray]:
    """Consecutive cells of one type, at most `block_size` long, stand in for one solar module."""
    blocks: list[np.ndarray] = []
    start = 0
    for i in range(1, len(cell_types) + 1):
        if i == len(cell_types) or cell_types[i] != cell_types[start] or i - start == block_size:
            blocks.append(np.arange(start, i))
            start = i
    return blocks


def split_plants(
    cell_types: np.ndarray, n_plants: int, seed: int, block_size: int = 32, affinity: float = 0.85
) -> list[np.ndarray]:
    """Assign whole modules to plants; plant k favours cell type k mod #types with probability `affinity`.

    Plants end up with similar sizes (each module goes to the emptiest eligible plant) but different
    cell-type mixes and, because defect rates differ between modules, different defect rates.
    """
    if n_plants < 1:
        raise ValueError("n_plants must be at least 1")
    blocks = module_blocks(cell_types, block_size)
    if len(blocks) < n_plants:
        raise ValueError(f"cannot split {len(blocks)} modules across {n_plants} plants")
    types = sorted(set(cell_types.tolist()))
    preferred = {t: [p for p in range(n_plants) if types[p % len(types)] == t] for t in types}
    rng = np.random.default_rng(seed)
    sizes = np.zeros(n_plants, dtype=int)
    assigned: list[list[np.ndarray]] = [[] for _ in range(n_plants)]
    for b in rng.permutation(len(blocks)):
        block = blocks[b]
        eligible = preferred[cell_types[block[0]]]
        if not eligible or rng.random() > affinity:
            eligible = list(range(n_plants))
        plant = min(eligible, key=lambda p: (sizes[p], p))
        assigned[plant].append(block)
        sizes[plant] += len(block)
    return [np.sort(np.concatenate(parts)) for parts in assigned]


def holdout_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/test indices, fixed by seed: the test split is never trained on."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(len(idx) * test_fraction))
        if len(idx) > 1:
            n_test = min(max(n_test, 1), len(idx) - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
