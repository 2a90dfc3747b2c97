from __future__ import annotations

import pytest

from privacy.budget import PlantPrivacy
from privacy.ledger import Ledger


@pytest.fixture
def ledger(tmp_path) -> Ledger:
    return Ledger(tmp_path / "ledgers" / "plant-1.json", "plant-1")


@pytest.fixture
def plant(ledger) -> PlantPrivacy:
    return PlantPrivacy(ledger=ledger, max_epsilon=8.0, delta=1e-5)
