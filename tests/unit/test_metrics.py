"""The metric set: off until enabled, Prometheus names, labels that never carry ids."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from project.observability import metrics
from project.settings import Settings


@pytest.fixture
def registry() -> Iterator[CollectorRegistry]:
    reg = CollectorRegistry()
    metrics.disable()
    metrics.enable(reg)
    yield reg
    metrics.disable()


def test_metrics_are_off_by_default_and_recording_then_does_nothing() -> None:
    assert Settings().metrics_enabled is False
    assert metrics.enabled() is None
    metrics.record_published("user.created")  # no metric objects exist: nothing to fail
    metrics.record_delivery("h", "succeeded")


def test_counters_end_in_total_and_durations_are_in_seconds(registry: CollectorRegistry) -> None:
    metrics.record_published("user.created")
    metrics.record_dispatch({"dispatched": 2, "skipped": 0}, ["user.created", "user.created"], ["alpha", "beta"])
    metrics.record_delivery("mod.handler", "retried")
    metrics.record_handler_run("mod.handler", 0.02, 0.5)
    metrics.record_log_written(3, 7, 1)
    get = registry.get_sample_value
    assert get("eventbus_events_published_total", {"event_type": "user.created"}) == 1
    assert get("eventbus_events_dispatched_total", {"event_type": "user.created"}) == 2
    assert get("eventbus_router_entries_total", {"outcome": "dispatched"}) == 2
    assert get("eventbus_router_entries_total", {"outcome": "skipped"}) is None  # zero is not reported
    assert get("eventbus_tasks_sent_total", {"queue": "beta"}) == 1
    assert get("eventbus_deliveries_total", {"handler": "mod.handler", "outcome": "retried"}) == 1
    assert get("eventbus_handler_duration_seconds_count", {"handler": "mod.handler"}) == 1
    assert get("eventbus_delivery_start_delay_seconds_bucket", {"handler": "mod.handler", "le": "0.5"}) == 1
    assert get("eventbus_log_writer_rows_written_total", {"table": "event_deliveries"}) == 7
    assert get("eventbus_log_writer_rows_set_aside_total") == 1


def test_no_metric_is_labelled_by_an_event_or_user_id(registry: CollectorRegistry) -> None:
    labels = {label for family in registry.collect() for s in family.samples for label in s.labels}
    metrics.record_published("user.created")
    labels |= {label for family in registry.collect() for s in family.samples for label in s.labels}
    assert not labels & {"event_id", "user_id", "task_id", "correlation_id"}
    for family in registry.collect():
        assert family.name.startswith("eventbus_")


def test_task_names_of_rejected_messages_are_few_labels_however_many_arrive(registry: CollectorRegistry) -> None:
    for n in range(metrics.MAX_UNKNOWN_TASK_LABELS + 50):
        metrics.record_rejected(f"made.up.task{n}")
    metrics.record_rejected("made.up.task0")  # one already labelled keeps its label
    metrics.record_rejected("x" * 10_000)
    samples = [s for f in registry.collect() for s in f.samples if s.name == "eventbus_deliveries_total"]
    labels = {s.labels["handler"] for s in samples}
    assert len(labels) == metrics.MAX_UNKNOWN_TASK_LABELS + 1
    by_label = {s.labels["handler"]: s.value for s in samples}
    assert by_label["made.up.task0"] == 2
    assert by_label["other"] == 51
    assert all(s.labels["outcome"] == "rejected" for s in samples)
