"""A second application on the dispatcher, sharing nothing with the cosmic one.

A shop: placing an order issues an invoice, and every invoice goes into a ledger. It runs
with ``EVENT_HANDLER_MODULES=tests.second_app.handlers`` and proves that ``project`` is a
dispatcher any application can use: no module of ``tasks`` or ``handlers`` is imported by
its router or its workers (``tests/integration/test_second_app.py``).

Like the cosmic application it keeps its modules (``handlers/``) apart from what they share
(``keys.py``, ``imports.py``).
"""
