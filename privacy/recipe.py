"""A DP-SGD recipe each plant derives from its own record count, so the anchor does not hand-tune plants.

DP-SGD's noise is added once per step to the sum of a batch's clipped gradients; averaged over the batch, its
standard deviation is sigma x clip / B. Over the run's steps the signal adds up linearly and the noise as a
square root, so for a fixed number of epochs large batches win (De et al. 2022, "Unlocking high-accuracy
differentially private image classification through scale"), until too few steps are left to optimise. The
recipe takes the largest power of two that still gives `MIN_BATCHES` batches per epoch; the accountant then
sets the noise multiplier for the plant's target epsilon over all of the run's steps (privacy.budget).
"""

from __future__ import annotations

MIN_BATCH = 16
MAX_BATCH = 1024
MIN_BATCHES = 4  # batches per epoch: few enough for a large batch, enough steps to optimise in every round


def recipe_batch_size(records: int) -> int:
    """The plant's expected DP-SGD batch size (Poisson sampling, rate 1 / batches per epoch)."""
    batch = MIN_BATCH
    while batch * 2 <= min(MAX_BATCH, records // MIN_BATCHES):
        batch *= 2
    return min(batch, max(records, 1))
