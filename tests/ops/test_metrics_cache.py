"""/metrics: the disk gauges come from a background thread's cache, never from a walk in the scraping thread; and the
prometheus-client internals filefeed patches are the ones it was tested with."""

from __future__ import annotations

import inspect
import re
import threading
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from prometheus_client.parser import text_string_to_metric_families

from filefeed import metrics
from pipeline import rollover
from pipeline.model import Partition
from pipeline.staging import Staging
from tests.conftest import ROOT, wait_for
from tests.rollover.helpers import make_rows, stage_segment


def gauge(payload: bytes, name: str, feed_id: str) -> float | None:
    for family in text_string_to_metric_families(payload.decode()):
        for s in family.samples:
            if s.name == name and s.labels.get("feed_id") == feed_id:
                return s.value
    return None


@pytest.fixture
def staging(tmp_path: Path):
    s = Staging(tmp_path / "staging")
    yield s
    metrics.stop_gauges(s)
    s.close()


def test_scrape_reads_the_cache_and_never_walks_the_disk_in_the_scraping_thread(staging, monkeypatch) -> None:
    for i in range(30):
        stage_segment(staging.root, Partition(f"feed{i % 3}", f"seg{i}", "UPSERT"), "w1-000001.jnl", make_rows(7))
    scraper = threading.get_ident()
    walks: list[int] = []
    real = rollover.iter_partitions

    def watched(root):
        walks.append(threading.get_ident())
        return real(root)

    monkeypatch.setattr(rollover, "iter_partitions", watched)
    gauges = metrics.start_gauges(staging, interval=0.05)
    wait_for(lambda: gauges.passes >= 1, timeout=30, what="the first background pass")
    walks.clear()
    payloads = [metrics.render(staging)[0] for _ in range(20)]
    assert scraper not in walks, "a scrape walked the staging folders in the scraping thread"
    assert all(gauge(p, "filefeed_staged_rows", "feed0") == 70 for p in payloads)
    # a change on disk reaches the scrapes through the background thread
    stage_segment(staging.root, Partition("feed0", "seg0", "UPSERT"), "w1-000002.jnl", make_rows(5))
    wait_for(lambda: gauge(metrics.render(staging)[0], "filefeed_staged_rows", "feed0") == 75, timeout=30,
             what="the new segment in the cached gauges")
    assert scraper not in walks


def test_an_idle_partition_is_not_read_again(staging, monkeypatch) -> None:
    for i in range(5):
        stage_segment(staging.root, Partition("feed0", f"seg{i}", "UPSERT"), "w1-000001.jnl", make_rows(3))
    gauges = metrics.StagingGauges(staging)
    gauges.refresh()
    reads: list[Partition] = []
    real = staging.stats
    monkeypatch.setattr(staging, "stats", lambda p: reads.append(p) or real(p))
    payload = gauges.refresh()
    assert reads == [] and gauge(payload, "filefeed_staged_rows", "feed0") == 15
    stage_segment(staging.root, Partition("feed0", "seg3", "UPSERT"), "w1-000002.jnl", make_rows(4))
    assert gauge(gauges.refresh(), "filefeed_staged_rows", "feed0") == 19
    assert reads == [Partition("feed0", "seg3", "UPSERT")]


def test_prometheus_client_is_within_the_tested_range_and_its_patched_internals_are_there() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d for d in deps if re.match(r"prometheus-client\b", d)]
    allowed = SpecifierSet(spec.removeprefix("prometheus-client"))
    assert any(s.operator == "<" for s in allowed), (
        "prometheus-client must be pinned to a tested range: filefeed/metrics.py swaps its value class")
    assert version("prometheus-client") in allowed
    from prometheus_client import metrics as pm
    from prometheus_client import values

    # what `_switch_to_files` relies on: a module-level ValueClass read each time a child is created, and
    # get_value_class() choosing the multiprocess class from PROMETHEUS_MULTIPROC_DIR
    assert callable(values.get_value_class) and hasattr(values, "ValueClass")
    assert "values.ValueClass(" in inspect.getsource(pm.Counter._metric_init)
    assert "values.ValueClass(" in inspect.getsource(pm.Histogram._metric_init)
    assert "MultiProcessValue" in inspect.getsource(values.get_value_class)


def test_switching_to_files_makes_new_children_count_in_the_shared_folder(tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from filefeed import metrics\n"
        "assert metrics.join_multiprocess_dir(Path(sys.argv[1]))\n"
        "metrics.observe_error('terminal', 'pin-test')\n"
    )
    folder = tmp_path / "run" / "metrics"
    folder.mkdir(parents=True)
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != metrics.ENV} | {"PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, check=True, timeout=60, cwd=str(ROOT))
    assert list(folder.glob("counter_*.db")), "the counter did not go to the multiprocess files"
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(folder))
    assert 'kind="pin-test"' in generate_latest(registry).decode()
