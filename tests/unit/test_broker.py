"""Choosing the broker: settings, the queues' declarations, and the deployment files agree."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from project.broker import celery_queue
from project.messages import task_message
from project.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_the_broker_is_the_event_redis_unless_an_amqp_url_is_given() -> None:
    s = Settings(redis_url="redis://10.0.0.5:6379/2")
    assert (s.broker_url, s.broker_is_amqp) == ("redis://10.0.0.5:6379/2", False)
    s = Settings(celery_broker_url="amqp://u:p@rabbit:5672/prod")
    assert (s.broker_url, s.broker_is_amqp) == ("amqp://u:p@rabbit:5672/prod", True)
    assert Settings(celery_broker_url="").broker_is_amqp is False  # docker-compose's empty default


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("kafka://broker:9092", "must be an AMQP URL"),
        ("rabbit:5672", "must be an AMQP URL"),
        ("redis://elsewhere:6379/0", "a Redis other than REDIS_URL's"),
    ],
)
def test_a_broker_url_the_dispatcher_cannot_keep_its_promises_on_is_refused(url: str, says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        Settings(celery_broker_url=url)


def test_queues_are_declared_durable_as_a_celery_worker_declares_a_missing_one() -> None:
    classic = celery_queue(Settings(celery_broker_url="amqp://x"), "solar")
    assert (classic.name, classic.routing_key, classic.exchange.name, classic.exchange.type) == (
        "solar",
        "solar",
        "solar",
        "direct",
    )
    assert classic.durable and classic.exchange.durable and not classic.queue_arguments
    quorum = celery_queue(Settings(celery_broker_url="amqp://x", broker_quorum_queues=True), "solar")
    assert quorum.queue_arguments == {"x-queue-type": "quorum"} and quorum.exchange.type == "topic"


@pytest.mark.parametrize("quorum", [False, True])
def test_celeryconfig_declares_the_queues_the_router_declares(quorum: bool) -> None:
    # celeryconfig reads the environment when imported: a fresh interpreter per setting.
    code = (
        "import json; from celery import Celery; app = Celery(); app.config_from_object('celeryconfig'); "
        "q = app.amqp.queues['solar']; "
        "print(json.dumps([app.conf.broker_url, app.conf.broker_transport_options, q.exchange.type, "
        "q.queue_arguments, q.durable]))"
    )
    env = {"CELERY_BROKER_URL": "amqp://u:p@rabbit:5672/v", "BROKER_QUORUM_QUEUES": str(quorum), "PATH": "/usr/bin"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    url, options, exchange_type, arguments, durable = json.loads(out.stdout)
    router_side = celery_queue(Settings(celery_broker_url=url, broker_quorum_queues=quorum), "solar")
    assert url == "amqp://u:p@rabbit:5672/v"
    assert options == {"confirm_publish": True}
    assert (exchange_type, arguments or {}, durable) == (
        router_side.exchange.type,
        router_side.queue_arguments or {},
        True,
    )


def test_an_amqp_task_message_carries_what_celery_sends() -> None:
    m = task_message(
        task_name="h", task_id="t-1", queue="q", envelope_json='{"event_id":"e"}', event_type="a.b", event_id="e"
    )
    assert m.amqp_properties() == {
        "correlation_id": "t-1",
        "reply_to": m.amqp_properties()["reply_to"],
        "delivery_mode": 2,
    }
    assert m.headers["id"] == "t-1" and m.headers["task"] == "h"
    assert json.loads(m.body)[0] == [{"event_id": "e"}]
    assert json.loads(m.redis_form())["properties"]["delivery_info"]["routing_key"] == "q"


def test_the_rabbitmq_profile_runs_the_management_plugin_with_a_consumer_timeout_above_the_time_limits() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    rabbit = compose["services"]["rabbitmq"]
    assert rabbit["profiles"] == ["rabbitmq"]
    assert "management" in rabbit["image"]
    assert any(v.startswith("./deploy/rabbitmq.conf:") for v in rabbit["volumes"])
    assert "CELERY_BROKER_URL" in compose["x-app"]["environment"]
    conf = (ROOT / "deploy" / "rabbitmq.conf").read_text()
    timeout_ms = int(re.search(r"^consumer_timeout\s*=\s*(\d+)", conf, re.M).group(1))  # type: ignore[union-attr]
    defaults = Settings()
    assert timeout_ms / 1000 > max(defaults.delivery_time_limit_s, defaults.delivery_backoff_max_s) * 2
