"""``eventbus publish --cloudevent`` and ``eventbus tail --format cloudevents`` against real Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

from cloudevents.core.formats.json import JSONFormat

from project.cloudevents import derive_event_id, envelope_from_cloudevent
from project.envelope import decode_envelope
from tests.integration.conftest import ROOT, Stack

CAUSE_ID = "1c8e5d2f-3a4b-4c6d-9e7f-8091a2b3c4d5"
ROOT_ID = "2d9f6e3a-4b5c-4d7e-8f80-91a2b3c4d5e6"
SOURCE = "https://sensors.example/station/4"


def _eventbus(stack: Stack, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "project.cli", *args],
        cwd=ROOT,
        env={**os.environ, **stack.env},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _raw_entries(stack: Stack) -> list[bytes]:
    """The envelope JSON of every entry in the test's stream, oldest first."""
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], stack.redis.xrange(stack.bus().keys.stream))
    return [fields[b"e"] for _, fields in entries]


def _stored(stack: Stack) -> list[dict[str, Any]]:
    return [decode_envelope(raw, 65536).model_dump(exclude_none=True) for raw in _raw_entries(stack)]


def test_publish_cloudevent_stores_the_event_once_continuing_its_chain(stack: Stack, tmp_path: Path) -> None:
    cloudevent = {
        "specversion": "1.0",
        "id": "reading-17",  # not a UUID: the event_id is derived from (source, id)
        "source": SOURCE,
        "type": "sensor.reading.taken",
        "subject": "42",
        "time": "2024-05-10T17:04:11Z",
        "datacontenttype": "application/json",
        "causationid": CAUSE_ID,
        "correlationid": ROOT_ID,
        "hops": 2,
        "data": {"celsius": 21.5},
    }
    path = tmp_path / "reading.json"
    path.write_text(json.dumps(cloudevent))

    first = _eventbus(stack, "publish", "--cloudevent", str(path))
    assert first.returncode == 0, first.stderr
    again = _eventbus(stack, "publish", "--cloudevent", "-", stdin=path.read_text())
    assert again.returncode == 0, again.stderr

    event_id = derive_event_id(SOURCE, "reading-17")
    assert first.stdout.strip() == again.stdout.strip() == event_id
    [envelope] = _stored(stack)  # the same CloudEvent twice: stored once
    assert envelope["event_id"] == event_id
    assert (envelope["event_type"], envelope["user_id"], envelope["module"], envelope["data"]) == (
        "sensor.reading.taken",
        42,
        SOURCE,
        {"celsius": 21.5},
    )
    assert (envelope["causation_id"], envelope["correlation_id"], envelope["hops"]) == (CAUSE_ID, ROOT_ID, 2)


def test_tail_prints_each_event_as_a_cloudevent_the_sdk_reads(stack: Stack) -> None:
    tail = stack.start(
        "tail",
        sys.executable,
        "-m",
        "project.cli",
        "tail",
        "user.#",
        "--format",
        "cloudevents",
        "--count",
        "1",
        ready="listening for",
    )
    out = _eventbus(stack, "publish", "user.birth_data.updated", "--data", '{"source": "cli"}', "--user", "u9")
    assert out.returncode == 0, out.stderr
    event_id = out.stdout.strip()
    assert tail.wait(timeout=30) == 0

    [line] = [line for line in stack.log("tail").splitlines() if line.startswith("{")]
    event = JSONFormat().read(None, line)
    assert (event.get_specversion(), event.get_id(), event.get_type()) == ("1.0", event_id, "user.birth_data.updated")
    assert (event.get_source(), event.get_subject(), event.get_datacontenttype()) == (
        "urn:eventbus:module:cli",
        "u9",
        "application/json",
    )
    assert (event.get_extension("correlationid"), event.get_extension("hops")) == (event_id, 0)
    assert event.get_data() == {"source": "cli"}
    # The CloudEvent stands for exactly the envelope in the stream.
    [stored] = _raw_entries(stack)
    assert envelope_from_cloudevent(json.loads(line)) == json.loads(stored)


def test_publish_cloudevent_refuses_bad_input_clearly(stack: Stack, tmp_path: Path) -> None:
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"specversion": "0.3", "id": "1", "source": "/x", "type": "sensor.reading.taken"}))
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    cases = [
        (("--cloudevent", str(old)), "specversion '0.3' is not supported"),
        (("--cloudevent", str(garbage)), "is not a JSON CloudEvent"),
        (("--cloudevent", str(tmp_path / "missing.json")), "cannot read"),
        (("sensor.reading.taken", "--cloudevent", str(old)), "--cloudevent carries the whole event; drop EVENT_TYPE"),
        ((), "give an EVENT_TYPE, or --cloudevent FILE"),
    ]
    for args, message in cases:
        out = _eventbus(stack, "publish", *args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert message in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)
    assert _stored(stack) == []
