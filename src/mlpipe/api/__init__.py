"""The read API: mlpipe's results, search and cost analytics over HTTP, for services that are
not written in Python (``mlpipe serve``).

=======================================  ======  ==============================================
endpoint                                 token   what
=======================================  ======  ==============================================
``GET /v1/search?q=``                    read    chunks nearest to a text; filters, cursor
``GET /v1/shares/{shareId}/similar``     read    shares nearest to a share; filters, cursor
``GET /v1/shares/{shareId}/results``     read    the share's stored results (``ml_results``)
``GET /v1/shares/{shareId}/workflow``    read    the share's video workflow state and history
``GET /v1/costs/summary``                admin   spend by task type, model, unit kind
``GET /v1/costs``                        admin   ledger entries, newest first; cursor
``GET /v1/tasks/summary``                admin   results by outcome, reservations, workflows
``GET /v1/budgets``                      admin   rolling spend against the ceilings
``GET /healthz``, ``GET /openapi.json``  none    liveness; the OpenAPI 3.1 document
``GET /v1/events``                       read    result events, live (Server-Sent Events)
``GET /docs``                            none    Swagger UI, its files served locally
``/ui``                                  cookie  the ops console (``mlpipe.api.ui``)
=======================================  ======  ==============================================

The JSON endpoints are read-only by construction: their handlers only run SELECTs. The one
write is the console's dead-letter replay (admin, CSRF-checked). Without
configured tokens (loopback only) the read endpoints are open and the admin ones answer 403.
FastAPI routes, validates and documents (``mlpipe.api.v1``); uvicorn serves
(``mlpipe.api.server``).
"""

from mlpipe.api.auth import ApiConfigError
from mlpipe.api.server import ApiConfig, ApiServer

__all__ = ["ApiConfig", "ApiConfigError", "ApiServer"]
