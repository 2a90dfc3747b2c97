"""The DP recipe: each plant's batch size follows from its own record count."""

import pytest

from privacy.recipe import MAX_BATCH, MIN_BATCH, recipe_batch_size


@pytest.mark.parametrize(("records", "batch"), [(10, 10), (63, 16), (64, 16), (420, 64), (1_000, 128), (3_000, 512), (10**7, MAX_BATCH)])
def test_the_largest_power_of_two_that_leaves_four_batches_an_epoch(records, batch):
    assert recipe_batch_size(records) == batch


def test_the_batch_grows_with_the_plant_and_keeps_at_least_four_batches_once_it_can():
    sizes = [recipe_batch_size(n) for n in range(1, 20_000, 37)]
    assert sizes == sorted(sizes)
    assert all(n // b >= 4 for n, b in zip(range(1, 20_000, 37), sizes, strict=True) if n >= 4 * MIN_BATCH)
