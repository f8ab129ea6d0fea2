"""The ops console at ``/ui``: server-rendered pages (Jinja2), every asset served from
``static/`` here, usable without JavaScript except the live event feed.

=================  ======  ===========================================================
page               token   what
=================  ======  ===========================================================
``/ui``            read    queues (depth, consumers), tasks done / failed / dead-lettered
                           in the last hour and day, spend against budgets (admin), live
                           event feed
``/ui/dead-letters``  admin  list, filter, replay one / a selection / all of a reason
``/ui/workflows``  read    video shares by state; ``/ui/workflows/{shareId}`` a timeline
``/ui/search``     read    a query box over the stored embeddings
``/ui/costs``      admin   spend by task type and model over a window; the ledger, paged
=================  ======  ===========================================================
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from .common import HERE
from .deadletters import router as dead_letters_router
from .pages import router as pages_router

STATIC = "/ui/static"


def install(app: FastAPI) -> None:
    app.include_router(pages_router)
    app.include_router(dead_letters_router)
    app.mount(STATIC, StaticFiles(directory=HERE / "static"), name="ui-static")
