"""The application's modules: which event triggers which work, on which queue.

Loaded by ``EVENT_HANDLER_MODULES`` (default ``handlers``): every submodule is imported, so
decorator subscriptions register, and every ``BaseModule`` subclass is initialized once.
No module imports another (import-linter): they talk only through events, and share only
the work in ``tasks``.
"""
