"""The federation page and a plant's page in a real browser, during one live local federation.

Debian's headless Chromium, driven through its own chromedriver by selenium (nothing is downloaded: the driver
path is given and Selenium Manager is kept offline). The browser opens the URL `maxfl federate` prints, stays
on the page while a run goes (the page's own script updates it; the test only reads what a person would read),
and after the release opens a plant's page on its edge server. Screenshots go to the test's temporary folder.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from launcher.federation import FederationResult, FederationSettings, LocalFederation, find_app_dir

from .test_local_federation import _assert_nothing_left

pytestmark = pytest.mark.e2e

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
PLANTS = ("plant-1", "plant-2")
ROUNDS = 4
MODEL = "maxfl-defect"
CEILING = 10.0  # the demo plants' own max-epsilon (FederationSettings.max_epsilon)
# What the browser may take to show something that holds already (a live part refreshes every 2 s; the SuperLink's
# node list is re-read every 10 s). A guard against a page that never shows it, not a measure of anything.
SHOWN_WITHIN_S = 120.0
T = TypeVar("T")


def chromium(profile: Path) -> Any:
    """Headless Chromium as root in a container: no sandbox, no GPU, no background traffic, a throw-away profile."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: `apt-get install -y chromium chromium-driver` (`make test` installs them)")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not look for (or download) a browser or a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}", "--window-size=1280,2200"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)


# What the page shows, read in one go in the page itself (a live part may be replaced between two reads).
READ_PAGE = """
const text = (root, id) => { const el = root.querySelector(`[data-testid="${id}"]`); return el ? el.textContent.trim() : null; };
const rows = (id, key, cells) => Object.fromEntries(Array.from(document.querySelectorAll(`[data-testid="${id}"]`))
    .map(r => [r.getAttribute(key), Object.fromEntries(cells.map(c => [c, text(r, c)]))]));
const run = document.querySelector('[data-testid="current-run"]');
return {
  plants: rows("plant-row", "data-plant", ["plant-connection", "plant-registered", "plant-last-seen"]),
  run: run ? {id: run.dataset.runId, status: text(document, "run-status"), round: text(document, "run-round-number"),
              planned: text(document, "run-rounds-planned")} : null,
  epsilon: rows("epsilon-row", "data-plant", ["epsilon-value", "epsilon-ceiling"]),
  edges: rows("edge-row", "data-plant", ["edge-serving", "edge-version", "edge-status"]),
  versions: rows("version-row", "data-version", ["version-gate", "version-aliases"]),
  problems: Array.from(document.querySelectorAll('[data-testid="source-problem"]')).map(p => p.textContent.trim()),
  live: Array.from(document.querySelectorAll("[data-live]")).map(s => s.dataset.state || "loaded"),
};
"""


@dataclass
class Seen:
    """What the browser showed during the run, and the federation still running for the tests after it."""

    federation: LocalFederation
    driver: Any
    shots: Path
    plants: dict[str, dict[str, str]] = field(default_factory=dict)
    readings: list[tuple[str, str, int, int]] = field(default_factory=list)  # (run id, status, round, planned) while the run went
    epsilon: dict[str, dict[str, str]] = field(default_factory=dict)
    result: FederationResult | None = None

    def page(self) -> dict[str, Any]:
        return self.driver.execute_script(READ_PAGE)

    def shot(self, name: str) -> None:
        self.driver.save_screenshot(str(self.shots / f"{name}.png"))


def until(read: Callable[[], T], holds: Callable[[T], bool], what: str, shot: Callable[[str], None] | None = None) -> T:
    """Read the page again until what it shows satisfies `holds`; fails (with a screenshot) if it never does."""
    deadline = time.monotonic() + SHOWN_WITHIN_S
    while True:
        value = read()
        if holds(value):
            return value
        if time.monotonic() > deadline:
            if shot is not None:
                shot(f"never-{re.sub(r'[^a-z0-9]+', '-', what.lower())[:40]}")
            raise AssertionError(f"the page never showed {what}; last read: {value}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seen]:
    work = tmp_path_factory.mktemp("pages")
    shots = work / "screenshots"
    shots.mkdir()
    settings = FederationSettings(
        app_dir=find_app_dir(), workdir=work / "work", plants=len(PLANTS), examples_per_plant=80,
        # a first model with no champion to beat: released whatever DP noise does to it (tests/e2e/test_release.py)
        run_overrides={"num-server-rounds": ROUNDS, "gate-trivial-margin": -1.0}, page=True,  # as `maxfl federate` does
    )
    federation = LocalFederation(settings, echo=print)
    with federation, tempfile.TemporaryDirectory(prefix="maxfl-chromium-") as profile:
        driver = chromium(Path(profile))
        seen = Seen(federation, driver, shots)
        try:
            assert federation.page_url.startswith("http://127.0.0.1:") and "?token=" in federation.page_url
            driver.get(federation.page_url)
            assert driver.current_url.rstrip("/") == federation.page_url.split("/?")[0], "the token leaves the address bar"
            seen.plants = until(seen.page, lambda p: all((p["plants"].get(x) or {}).get("plant-connection") == "online" for x in PLANTS),
                                "both plants connected", seen.shot)["plants"]
            seen.shot("plants-connected")
            box: list[Any] = []
            runner = threading.Thread(target=lambda: box.append(_submit(federation)), daemon=True)
            runner.start()
            while runner.is_alive():  # read the round as the page updates itself, until it went up while the run went
                page = seen.page()
                run = page["run"]
                if run and run["status"] == "running" and (run["round"] or "").isdigit() and (run["planned"] or "").isdigit():
                    reading = (run["id"], run["status"], int(run["round"]), int(run["planned"]))
                    if not seen.readings or seen.readings[-1] != reading:
                        seen.readings.append(reading)
                        seen.shot(f"run-round-{reading[2]}")
                    if page["epsilon"] and reading[2] >= 1:
                        seen.epsilon = page["epsilon"]
                    if len({r[2] for r in seen.readings if r[2] >= 1}) >= 2:  # two rounds done, read while the run went
                        break
                time.sleep(0.2)
            runner.join()
            seen.result = box[0] if box and isinstance(box[0], FederationResult) else None
            if seen.result is None:
                raise AssertionError(f"the run failed: {box[0] if box else 'no result'}")
            yield seen
        finally:
            driver.quit()
    _assert_nothing_left(federation)


def _submit(federation: LocalFederation) -> FederationResult | BaseException:
    try:
        return federation.submit_run()
    except BaseException as exc:  # noqa: BLE001 - handed to the fixture, which fails with it
        return exc


def test_the_federation_page_lists_the_plants_registered_and_connected(live: Seen) -> None:
    assert set(live.plants) == set(PLANTS)
    for plant in PLANTS:
        assert live.plants[plant]["plant-registered"] == "active"
        assert live.plants[plant]["plant-connection"] == "online" and live.plants[plant]["plant-last-seen"] == "now"


def test_the_round_goes_up_on_the_page_while_the_run_goes(live: Seen) -> None:
    assert live.result is not None and live.result.status == "finished:completed"
    runs = {r[0] for r in live.readings}
    assert runs == {live.result.mlflow_run_id}, live.readings
    rounds = [r[2] for r in live.readings]
    assert rounds == sorted(rounds), live.readings
    assert len({r for r in rounds if r >= 1}) >= 2, live.readings  # a round read, then a later one, while the run went
    assert all(r[1] == "running" and r[3] == ROUNDS for r in live.readings)


def test_the_page_shows_each_plants_epsilon_against_its_ceiling(live: Seen) -> None:
    assert set(live.epsilon) == set(PLANTS), live.epsilon
    for plant, cells in live.epsilon.items():
        assert 0.0 < float(cells["epsilon-value"]) <= CEILING, (plant, cells)
        assert float(cells["epsilon-ceiling"]) == CEILING


def test_after_the_release_the_page_shows_the_version_each_plant_serves(live: Seen) -> None:
    federation = live.federation
    assert f"champion: {MODEL} v1" in live.result.release  # type: ignore[union-attr]
    federation.wait_for_edge(1, MODEL)
    live.driver.get(federation.page_url)  # a person comes back to the page
    page = until(live.page, lambda p: all((p["edges"].get(x) or {}).get("edge-serving") == "v1" for x in PLANTS), "v1 served at every plant", live.shot)
    live.shot("released")
    for plant in PLANTS:
        assert page["edges"][plant] == {"edge-serving": "v1", "edge-version": "v1", "edge-status": "installed"}
    assert page["versions"]["1"] == {"version-gate": "passed", "version-aliases": "champion"}
    finished = until(live.page, lambda p: bool(p["run"]) and p["run"]["status"] == "finished", "the run finished", live.shot)["run"]
    assert finished["round"] == finished["planned"] == str(ROUNDS)
    assert not page["problems"] and set(page["live"]) <= {"loaded", "live"}


def test_a_plants_page_on_its_edge_server_shows_what_it_serves_and_its_ledger(live: Seen) -> None:
    """`GET /plant` on the plant's edge server (edge/, with its own token in <edge store>/page-token)."""
    federation = live.federation
    plant = next(p for p in federation.plants if p.plant_id == PLANTS[0])
    live.driver.get(federation.page_url)  # what the anchor's page says the plant reported in the run's last round
    final = until(live.page, lambda p: bool(p["run"]) and p["run"]["status"] == "finished" and plant.plant_id in p["epsilon"],
                  "the finished run's epsilon", live.shot)["epsilon"][plant.plant_id]
    token_file = plant.edge_store_path() / "page-token"
    assert token_file.is_file(), f"the edge server keeps its page's token in {token_file}"
    live.driver.get(f"{federation.edge_urls[plant.plant_id]}/plant?token={token_file.read_text().strip()}")
    read = """
const text = (root, id) => { const el = root.querySelector(`[data-testid="${id}"]`); return el ? el.textContent.trim() : null; };
return {model: text(document, "served-model"), version: text(document, "served-version"), variant: text(document, "served-variant"),
        requests: text(document, "requests-total"), apps: document.querySelectorAll('[data-testid="app-row"]').length,
        ledger: Array.from(document.querySelectorAll('[data-testid="ledger-row"]')).map(r => ({
          spent: text(r, "epsilon-spent"), ceiling: text(r, "epsilon-ceiling"), remaining: text(r, "epsilon-remaining")}))};
"""
    shown = until(lambda: live.driver.execute_script(read), lambda p: p["version"] is not None and bool(p["ledger"]), "the plant page", live.shot)
    live.shot("plant-page")
    assert shown["model"] == MODEL and re.search(r"\b1\b", shown["version"]), shown
    assert shown["variant"], shown
    assert shown["requests"] is not None and re.fullmatch(r"\d+", shown["requests"].replace(",", "")), shown
    (row,) = shown["ledger"]  # one data set: the plant's demo data
    spent, ceiling, remaining = (float(re.sub(r"[^0-9.]", "", row[k])) for k in ("spent", "ceiling", "remaining"))
    assert 0.0 < spent <= ceiling == CEILING and remaining == pytest.approx(ceiling - spent, abs=0.01), row
    # the plant's own ledger says what the anchor's page says it reported (this was its only run)
    assert spent == pytest.approx(float(final["epsilon-value"]), rel=0.01), (row, final)
