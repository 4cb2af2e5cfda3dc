"""The shop's modules (``EVENT_HANDLER_MODULES=tests.second_app.handlers``), all on the ``shop`` queue."""
