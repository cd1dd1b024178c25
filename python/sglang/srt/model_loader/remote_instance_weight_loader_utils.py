"""R-Fork client side: HTTP calls to the seed, each bounded by a timeout and turned into a clear error."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import requests


class RemoteInstanceError(RuntimeError):
    """A fork step failed; the message names the seed, the step and what to do."""

    def __init__(self, seed: str, step: str, message: str) -> None:
        super().__init__(f"R-Fork from seed {seed} failed at step '{step}': {message}")
        self.seed = seed
        self.step = step
        self.detail = message

    def at_step(self, step: str) -> RemoteInstanceError:
        """The same failure, reported at the step the caller was in when it surfaced."""
        return self if step == self.step else RemoteInstanceError(self.seed, step, self.detail)


@dataclass(frozen=True)
class SeedClient:
    """HTTP access to one seed's control plane."""

    ip: str
    port: int
    timeout: float
    api_key: str | None = None

    @property
    def name(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.name}"

    def request(
        self,
        step: str,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
        retry_busy_until: float | None = None,
    ) -> Any:
        """Call the seed; on HTTP 409 retry with backoff until retry_busy_until (a monotonic deadline)."""
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        delay = 0.2
        while True:
            try:
                resp = requests.request(
                    method,
                    self.url + path,
                    json=json,
                    params=params,
                    headers=headers,
                    timeout=timeout or self.timeout,
                )
            except requests.Timeout:
                raise RemoteInstanceError(
                    self.name,
                    step,
                    f"no answer within {timeout or self.timeout:.0f} s "
                    "(raise --remote-instance-weight-loader-timeout if the seed is just slow)",
                ) from None
            except requests.ConnectionError as e:
                if "Connection aborted" in str(e):  # connected, then the seed hung up without an answer
                    raise RemoteInstanceError(
                        self.name,
                        step,
                        f"the seed closed the connection before answering ({_short(e)}); it died or restarted "
                        "mid-request: check its log",
                    ) from None
                raise RemoteInstanceError(
                    self.name,
                    step,
                    f"cannot reach the seed's HTTP server ({_short(e)}); "
                    "check --remote-instance-weight-loader-seed-instance-ip/-service-port and that the seed is up",
                ) from None
            if resp.status_code == 409 and retry_busy_until is not None and time.monotonic() < retry_busy_until:
                time.sleep(min(delay, max(0.0, retry_busy_until - time.monotonic())))
                delay = min(delay * 2, 5.0)
                continue
            if resp.status_code == 401:
                raise RemoteInstanceError(
                    self.name,
                    step,
                    "the seed rejected the API key (HTTP 401); pass the seed's key with "
                    "--remote-instance-weight-loader-seed-api-key",
                )
            if resp.status_code == 409:
                raise RemoteInstanceError(self.name, step, f"the seed stayed busy with another fork: {_body(resp)}")
            if resp.status_code == 404:
                raise RemoteInstanceError(
                    self.name,
                    step,
                    f"{path} is not served there (HTTP 404): is an SGLang server listening on that port? Check "
                    "--remote-instance-weight-loader-seed-instance-ip/-service-port",
                )
            if resp.status_code != 200:
                raise RemoteInstanceError(self.name, step, f"HTTP {resp.status_code}: {_body(resp)}")
            try:
                return resp.json()
            except ValueError:
                kind = resp.headers.get("content-type", "no content type")
                raise RemoteInstanceError(
                    self.name,
                    step,
                    f"{path} answered with something that is not JSON ({kind}: {resp.text[:80]!r}): that is not an "
                    "SGLang server; check --remote-instance-weight-loader-seed-instance-ip/-service-port",
                ) from None


def _body(resp: requests.Response) -> str:
    try:
        data = resp.json()
    except ValueError:
        return resp.text[:300]
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict):
            return str(err.get("message", err))
        return str(data.get("message") or err or data)
    return str(data)[:300]


def _short(e: Exception) -> str:
    text = str(e)
    return text if len(text) < 160 else text[:160] + "..."
