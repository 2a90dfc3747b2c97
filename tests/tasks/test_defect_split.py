import numpy as np
import pytest

from tasks.defect.split import holdout_split, module_blocks, split_plants


def _types(n_mono=300, n_poly=500):
    # ELPV lists cells module by module; runs of one type stand for modules.
    return np.array(["mono"] * 90 + ["poly"] * 200 + ["mono"] * (n_mono - 90) + ["poly"] * (n_poly - 200))


def test_modules_are_consecutive_single_type_blocks():
    types = _types()
    blocks = module_blocks(types, block_size=32)
    assert np.array_equal(np.concatenate(blocks), np.arange(len(types)))
    for b in blocks:
        assert len(b) <= 32 and len(set(types[b])) == 1 and np.all(np.diff(b) == 1)


@pytest.mark.parametrize("n_plants", [1, 2, 3, 5])
def test_every_cell_goes_to_exactly_one_plant(n_plants):
    types = _types()
    parts = split_plants(types, n_plants, seed=0)
    assert len(parts) == n_plants and all(len(p) > 0 for p in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(types)))


def test_split_is_non_iid_by_cell_type_and_reproducible():
    types = _types()
    parts = split_plants(types, 2, seed=3)
    mono_share = [float(np.mean(types[p] == "mono")) for p in parts]
    assert mono_share[0] > 0.6 and mono_share[1] < 0.4
    again = split_plants(types, 2, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_more_plants_than_modules_is_an_error():
    with pytest.raises(ValueError, match="modules"):
        split_plants(np.array(["mono"] * 10), 2, seed=0, block_size=32)


def test_holdout_is_disjoint_stratified_and_fixed_by_seed():
    labels = np.array([0] * 80 + [1] * 20)
    train, test = holdout_split(labels, 0.2, seed=1)
    assert not set(train) & set(test) and len(train) + len(test) == 100
    assert (labels[test] == 1).sum() == 4 and (labels[test] == 0).sum() == 16
    train2, test2 = holdout_split(labels, 0.2, seed=1)
    assert np.array_equal(test, test2)
