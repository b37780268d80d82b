"""A thin client over the Kubernetes REST API (the kubernetes package's auth and transport),
returning plain dicts: what the operator creates is plain manifests, validated in tests against
the official schemas, so there is no model layer to keep in sync."""

from __future__ import annotations

import json
import os
from typing import Any

import kubernetes
from kubernetes.client.rest import ApiException

SERVER_ENV = "LLMFACTORY_KUBE_SERVER"  # tests and local development: an API server URL, no auth


class NotFound(Exception):
    pass


class Conflict(Exception):
    pass


def configure() -> kubernetes.client.ApiClient:
    server = os.environ.get(SERVER_ENV)
    config = kubernetes.client.Configuration()
    if server:
        config.host, config.verify_ssl = server, False
    else:
        try:
            kubernetes.config.load_incluster_config(client_configuration=config)
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config(client_configuration=config)
    return kubernetes.client.ApiClient(config)


class Kube:
    def __init__(self, api: kubernetes.client.ApiClient | None = None):
        self.api = api or configure()

    def _call(self, method: str, path: str, body: Any = None, query: list | None = None,
              content_type: str = "application/json") -> dict[str, Any]:
        try:
            resp = self.api.call_api(path, method, query_params=query or [], body=body,
                                     header_params={"Content-Type": content_type, "Accept": "application/json"},
                                     auth_settings=["BearerToken"], _preload_content=False, _return_http_data_only=True,
                                     _request_timeout=(10, 60))
        except ApiException as exc:
            if exc.status == 404:
                raise NotFound(path) from None
            if exc.status == 409:
                raise Conflict(path) from None
            raise
        data = resp.data
        return json.loads(data) if data else {}

    def get(self, path: str) -> dict[str, Any]:
        return self._call("GET", path)

    def get_or_none(self, path: str) -> dict[str, Any] | None:
        try:
            return self.get(path)
        except NotFound:
            return None

    def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", path, body)

    def ensure(self, path: str, body: dict[str, Any]) -> bool:
        """Create unless it exists; True when this call created it. Deterministic names make a
        restarted operator find its children instead of creating second ones."""
        try:
            self.create(path, body)
            return True
        except Conflict:
            return False

    def patch(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._call("PATCH", path, body, content_type="application/merge-patch+json")

    def delete(self, path: str, propagation: str | None = None) -> None:
        """Delete if present. `propagation` Background has a Job's pods deleted with it (the API's
        default for Jobs orphans them)."""
        try:
            self._call("DELETE", path, query=[("propagationPolicy", propagation)] if propagation else None)
        except NotFound:
            pass

    def list(self, path: str, labels: dict[str, str]) -> list[dict[str, Any]]:
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        items = self._call("GET", path, query=[("labelSelector", selector)]).get("items", [])
        # Filter here as well: a server that ignores the selector must not hand us strangers.
        return [i for i in items if all((i.get("metadata", {}).get("labels") or {}).get(k) == v
                                        for k, v in labels.items())]


def custom_path(plural: str, namespace: str, name: str | None = None) -> str:
    from .. import API_VERSION

    base = f"/apis/{API_VERSION}/namespaces/{namespace}/{plural}"
    return f"{base}/{name}" if name else base
