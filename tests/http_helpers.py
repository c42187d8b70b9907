"""What the HTTP server tests share: a model served by `r1kit serve`'s app on a free port for the duration of a
fixture, and a JSON request that returns (status, body) for error statuses too.

    with serve(model, api_key="k") as (url, service):        # EngineService + running_server, shut down after
        status, body = request_json(url, "/v1/explain", {...}, key="k")
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from r1kit.api import R1Model
from r1kit.serve.engine_service import EngineService
from r1kit.serve.openai_api import running_server


@contextmanager
def serve(model: R1Model, **server_kw: Any) -> Iterator[tuple[str, EngineService]]:
    """(base url, service) of `model` served over HTTP (``running_server``'s keywords: api_key, sessions, ...);
    the service is shut down, without draining, when the block ends."""
    service = EngineService(model)
    service.start()
    try:
        with running_server(service, **server_kw) as url:
            yield url, service
    finally:
        service.shutdown(drain=False)


def request_json(url: str, path: str, body: dict | None = None, method: str = "POST", key: str | None = None,
                 timeout: float = 300) -> tuple[int, dict]:
    """(status, parsed JSON body) of one request to url + path; an HTTP error status is returned, not raised."""
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
