"""Every Redis key, stream, channel and Celery queue name of the dispatcher, built in one place under the prefix.

An application builds its own keys under the same prefix (the cosmic one in ``tasks.keys``).

On a Redis Cluster (``project.redis_conn``) the events of each scope, the first segment of
their type (``user`` in ``user.birth_data.updated``), have their own stream. Its log buffer,
dead-letter stream, dedup keys and the state of its deliveries are named under the hash tag
``{<prefix>:<scope>}``, so they live in one slot and each script touches one slot.
:meth:`Keys.scoped` gives those names; in one Redis it returns the same ``Keys``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LOG_GROUP", "PUBLISHED_FIELD", "ROUTER_GROUP", "Keys", "scope_of"]

ROUTER_GROUP = "router"
LOG_GROUP = "log-writer"
# A stream entry holds its envelope in field 'e'. The publish script adds this field ('1'):
# it keeps each event_id to one entry in the dedup window, so the router need not look at
# the event_id's dedup key for that entry. An entry added by anything else has 'e' alone
# and is checked against the key (an event added twice is dispatched once).
PUBLISHED_FIELD = "p"


def scope_of(event_type: str) -> str:
    """An event type's scope: its first segment (``cosmic`` for ``cosmic.solar_storm.detected``)."""
    return event_type.split(".", 1)[0]


@dataclass(frozen=True, slots=True)
class Keys:
    """Names for one environment, all under ``prefix``.

    ``cluster``: the events live on a Redis Cluster, a stream per scope (:meth:`scoped`).
    ``root``: the environment's own prefix, which channels and the process-wide keys (locks,
    rejected tasks) stay under; a scope's ``Keys`` has the hash tag as its ``prefix``.
    """

    prefix: str
    cluster: bool = False
    root: str = ""

    def __post_init__(self) -> None:
        if not self.root:
            object.__setattr__(self, "root", self.prefix)

    def scoped(self, event_type: str) -> Keys:
        """The keys of ``event_type``'s scope: ``self`` in one Redis, its hash tag on a cluster."""
        if not self.cluster:
            return self
        return self.of_scope(scope_of(event_type))

    def of_scope(self, scope: str) -> Keys:
        """The keys of one scope on a cluster (in one Redis, every scope shares ``self``'s)."""
        if not self.cluster:
            return self
        return Keys(f"{{{self.root}:{scope}}}", cluster=True, root=self.root)

    def scope_pattern(self, suffix: str = "stream") -> str:
        """A SCAN pattern matching every scope's ``suffix`` key (``stream``, ``log``) on a cluster."""
        escaped = "".join("\\" + c if c in "*?[]\\" else c for c in self.root)
        return f"{{{escaped}:*}}:{suffix}"

    def scope_of_key(self, key: str, suffix: str = "stream") -> str:
        """Invert ``of_scope(scope)``'s ``suffix`` key: the scope it belongs to."""
        return key[len(self.root) + 2 : -len("}:" + suffix)]

    @property
    def stream(self) -> str:
        """The capped stream every published event is appended to."""
        return f"{self.prefix}:stream"

    @property
    def dead_letter(self) -> str:
        """Stream entries the router could not accept, with the reason."""
        return f"{self.prefix}:dead-letter"

    @property
    def log_buffer(self) -> str:
        """The durable buffer of event and delivery records on their way to PostgreSQL."""
        return f"{self.prefix}:log"

    @property
    def log_rejected(self) -> str:
        """Log records PostgreSQL refused or that could not be parsed, with the reason."""
        return f"{self.prefix}:log-rejected"

    @property
    def channel_pattern(self) -> str:
        """The PSUBSCRIBE pattern that receives every live event."""
        return f"{self.root}:*"

    def channel(self, event_type: str) -> str:
        """The pub/sub channel an event is broadcast on (channels and keys do not collide)."""
        return f"{self.root}:{event_type}"

    def event_type_of_channel(self, channel: str) -> str:
        """Invert :meth:`channel`."""
        return channel[len(self.root) + 1 :]

    @property
    def celery_keyprefix(self) -> str:
        """kombu's ``global_keyprefix``: Celery's queues and bookkeeping live under it."""
        return f"{self.root}:celery:"

    def celery_queue(self, queue: str) -> str:
        """The Redis list kombu reads a Celery queue from (priority 0)."""
        return f"{self.celery_keyprefix}{queue}"

    def delivery(self, task_id: str) -> str:
        """A delivery's state on the workers: a hash of ``attempts`` and ``state``.

        ``state`` is ``running``, ``retrying``, ``redriven``, ``done`` or ``dead``; a copy of a
        delivery whose state is ``done`` or ``dead`` is skipped. Written by every copy but
        the router's first (see :meth:`lease`). Expires ``DELIVERY_DONE_TTL_S`` (plus the
        hard time limit) after its last change.
        """
        return f"{self.prefix}:dlv:{task_id}"

    def lease(self, task_id: str) -> str:
        """Held (and renewed) by the one worker process running a delivery's handler.

        Also the delivery's gate: ``retrying`` between attempts, ``done`` or ``dead`` for
        ``DELIVERY_DONE_TTL_S`` once settled, so one ``SET NX`` starts a first copy.
        """
        return f"{self.prefix}:lease:{task_id}"

    def published(self, event_id: str) -> str:
        """The stream entry id an event_id was published as, for the dedup window."""
        return f"{self.prefix}:pub:{event_id}"

    def replayed(self, event_id: str) -> str:
        """Set once a replay sent the copy ``event_id`` of a past event: never sent twice."""
        return f"{self.prefix}:replayed:{event_id}"

    @property
    def rejected_tasks(self) -> str:
        """Celery task messages a worker refused (unknown task), kept whole to be sent again."""
        return f"{self.root}:rejected-tasks"

    @property
    def reconcile_lock(self) -> str:
        """Held by the one router running a reconciliation pass."""
        return f"{self.root}:reconcile:lock"

    @property
    def log_shed(self) -> str:
        """A hash counting records not buffered because the log buffer was full, by kind."""
        return f"{self.prefix}:log-shed"

    @property
    def beat_lock(self) -> str:
        """Held by the one beat process that schedules."""
        return f"{self.root}:beat:leader"
