"""The event catalog: every event type, its contracts, publishers and handlers, as configured.

``eventbus catalog`` writes it as an AsyncAPI 3.0 document (:mod:`project.catalog.asyncapi`)
or, with ``--format markdown``, as a readable page (:mod:`project.catalog.markdown`); both
render the same :class:`Catalog`, gathered from a loaded bus by :func:`collect`.
"""

from __future__ import annotations

from project.catalog.asyncapi import asyncapi_document, render_yaml
from project.catalog.markdown import markdown_page
from project.catalog.model import Catalog, Channel, Handler, Publisher, Upcast, collect

__all__ = [
    "Catalog",
    "Channel",
    "Handler",
    "Publisher",
    "Upcast",
    "asyncapi_document",
    "collect",
    "markdown_page",
    "render_yaml",
]
