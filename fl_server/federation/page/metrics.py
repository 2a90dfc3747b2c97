"""The federation page's `/metrics`: what the page shows, as Prometheus gauges, in the app's own registry.

Collected from the page's cached sources (fl_server.federation.page.app refreshes them, bounded, before each
scrape), so a scrape costs the sources no more than a page view. A source that cannot be read is
`maxfl_page_source_up{source=...} 0` and its gauges are left out, never reported as zeros.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fl_server.federation.page.cached import Fetched
from fl_server.federation.page.data import FederationView, RunDetail, RunsView, SpendRow


@dataclass(frozen=True)
class Readings:
    """The cached sources at scrape time (None: this page has no such source)."""

    federation: Fetched[FederationView] | None
    runs: Fetched[RunsView]
    current: Fetched[RunDetail] | None  # the run the page follows
    spend: Fetched[list[SpendRow]] | None


class PageCollector(Collector):
    def __init__(self, readings: Callable[[], Readings]) -> None:
        self.readings = readings

    def collect(self) -> Iterator[Metric]:
        r = self.readings()
        up = GaugeMetricFamily("maxfl_page_source_up", "1 when the page could read this source at its last try", labels=["source"])
        sources = {"mlflow": r.runs, "federation": r.federation, "privacy_record": r.spend}
        for name, fetched in sources.items():
            if fetched is not None:
                up.add_metric([name], float(fetched.ok))
        fed = r.federation.value if r.federation is not None else None
        if r.federation is not None:
            up.add_metric(["superlink"], float(fed is not None and fed.superlink_asked))
        yield up
        if fed is not None:
            registered = GaugeMetricFamily("maxfl_plants_registered", "Plants in the federation's plants.json, by status", labels=["status"])
            registered.add_metric(["active"], float(fed.active))
            registered.add_metric(["revoked"], float(fed.revoked))
            yield registered
            if (connected := fed.connected()) is not None:
                yield GaugeMetricFamily("maxfl_plants_connected", "Active plants whose SuperNode the SuperLink counts online", value=float(connected))
        runs = r.runs.value
        if runs is not None:
            by_status = GaugeMetricFamily("maxfl_runs", f"MLflow runs by status, among the {runs.window} most recent", labels=["status"])
            for status in sorted(set(runs.counts) | {"RUNNING", "FINISHED", "FAILED", "KILLED"}):
                by_status.add_metric([status], float(runs.counts.get(status, 0)))
            yield by_status
        detail = r.current.value if r.current is not None else None
        if detail is not None:
            labels = ["run_id", "run_name"]
            values = [detail.run.run_id, detail.run.name]
            round_ = GaugeMetricFamily("maxfl_run_round", "The followed run's last round in MLflow (the newest training run still going, else the newest)", labels=labels)
            round_.add_metric(values, float(detail.run.round))
            yield round_
            if detail.run.rounds_planned is not None:
                planned = GaugeMetricFamily("maxfl_run_rounds_planned", "The followed run's planned rounds", labels=labels)
                planned.add_metric(values, float(detail.run.rounds_planned))
                yield planned
            running = GaugeMetricFamily("maxfl_run_running", "1 while the followed run is going", labels=labels)
            running.add_metric(values, float(detail.run.running))
            yield running
            eps = GaugeMetricFamily("maxfl_plant_epsilon", "A plant's lifetime epsilon on its data set, as it reported it in the followed run's last round", labels=["plant"])
            ceiling = GaugeMetricFamily("maxfl_plant_epsilon_ceiling", "A plant's own privacy ceiling, as it reported it (+Inf: it allows training without DP)",
                                        labels=["plant"])
            for plant in detail.epsilon:
                if plant.latest is not None:
                    eps.add_metric([plant.plant], plant.latest)
                if plant.ceiling is not None:
                    ceiling.add_metric([plant.plant], plant.ceiling)
            yield eps
            yield ceiling
        spend = r.spend.value if r.spend is not None else None
        if spend is not None:
            recorded = GaugeMetricFamily("maxfl_plant_epsilon_recorded", "The highest lifetime epsilon a plant reported on a data set (the anchor's spend record)",
                                         labels=["plant", "data_set"])
            for row in spend:
                recorded.add_metric([row.plant, row.data_set[:12]], row.epsilon)
            yield recorded


def page_registry(readings: Callable[[], Readings]) -> CollectorRegistry:
    """A registry of this app's own (not the process-wide default one): two pages in one process stay apart."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PageCollector(readings))
    return registry
