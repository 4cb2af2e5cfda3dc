"""The cosmic application's work: what its modules do when their events arrive.

Also its periodic checks (``cosmic``), its tables, settings and Redis keys, and its
``eventbus demo`` command. It may import ``project``, never ``handlers`` (import-linter).
"""
