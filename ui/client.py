"""The UI's one HTTP client for the recommender service (docs/ARCHITECTURE.md, seams), with timeouts.

Every failure becomes a `ServiceError` whose message is fit to show a visitor as is: the page
renders it with `st.error` / `st.warning`, never a traceback.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

import httpx

TIMEOUT = httpx.Timeout(5.0, connect=1.5)
_METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


class ServiceError(Exception):
    """The service could not answer; `message` says why in plain words."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.message = message
        self.status = status


class NotFound(ServiceError):
    pass


class ServiceClient:
    def __init__(self, base_url: str, timeout: httpx.Timeout = TIMEOUT, api_key: str = ""):
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout)
        self._write_headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    # -- queries --------------------------------------------------------------------------------
    def recommendations(self, user_id: str, k: int = 10) -> dict:
        return self._get(f"/users/{_segment(user_id, 'user id')}/recommendations", k=k)

    def similar(self, item_id: str, k: int = 10) -> dict:
        return self._get(f"/items/{_segment(item_id, 'book id')}/similar", k=k)

    def health(self) -> dict:
        return self._get("/health", ok_statuses=(200, 503))

    def stats(self, window_s: float = 60.0) -> dict:
        return self._get("/stats", window_s=window_s)

    def metrics(self) -> dict[str, float]:
        """The Prometheus text of /metrics as {'name{labels}': value}."""
        text = self._request("GET", "/metrics").text
        out = {}
        for line in text.splitlines():
            match = _METRIC_LINE.match(line.strip())
            if match and not line.startswith("#"):
                try:
                    out[match.group(1) + (match.group(2) or "")] = float(match.group(3))
                except ValueError:
                    continue
        return out

    # -- events ---------------------------------------------------------------------------------
    def send_event(self, event: dict[str, Any]) -> dict:
        return self._request("POST", "/events", json=event, headers=self._write_headers).json()

    def interaction(self, user_id: str, item_id: str, kind: str = "want_to_read") -> dict:
        return self.send_event({"type": "interaction", "user_id": user_id, "item_id": item_id, "kind": kind})

    def close(self) -> None:
        self._http.close()

    # -- plumbing -------------------------------------------------------------------------------
    def _get(self, path: str, ok_statuses: tuple[int, ...] = (200,), **params) -> dict:
        return self._request("GET", path, ok_statuses=ok_statuses, params=params or None).json()

    def _request(self, method: str, path: str, ok_statuses: tuple[int, ...] = (200, 202), **kwargs) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise ServiceError(f"The recommender at {self.base_url} did not answer in time.") from None
        except httpx.HTTPError as exc:
            raise ServiceError(f"The recommender at {self.base_url} is not reachable ({_reason(exc)}). "
                               "Is it running?") from None
        if response.status_code in ok_statuses:
            try:
                response.json() if "json" in response.headers.get("content-type", "") else None
            except ValueError:
                raise ServiceError(f"The recommender sent an unreadable answer for {path}.") from None
            return response
        detail = _detail(response)
        if response.status_code == 404:
            raise NotFound(detail or "not found", 404)
        raise ServiceError(f"The recommender refused {method} {path} ({response.status_code}): {detail}",
                           response.status_code)


def _segment(value: str, what: str) -> str:
    value = (value or "").strip()
    if not value:
        raise ServiceError(f"Enter a {what}.")
    return quote(value, safe="")


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    # Every error of the service is an ErrorBody: {"detail": "<reason>"}.
    return str(body.get("detail") if isinstance(body, dict) else body)


def _reason(exc: httpx.HTTPError) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 120 else text[:117] + "..."
