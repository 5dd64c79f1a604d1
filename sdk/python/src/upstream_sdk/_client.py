"""HTTP transport, sandboxes, commands and streams of the upstream API."""

import base64
import http.client
import json
import socket
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Union

Bytes = Union[bytes, str]


class UpstreamError(Exception):
    """An error answer of the server, or a failure to reach it.

    ``status`` is the HTTP status (0 when the server could not be reached), ``code`` the
    API's stable error code such as ``command_not_found``, and ``field`` the request field
    at fault, when there is one.
    """

    def __init__(self, status: int, code: str, message: str, field: Optional[str] = None):
        super().__init__(f"{status}: {message} ({code})")
        self.status = status
        self.code = code
        self.message = message
        self.field = field


def _decode(text: str, encoding: str) -> bytes:
    if encoding == "base64":
        return base64.b64decode(text)
    return text.encode("utf-8")


def _as_bytes(data: Bytes) -> bytes:
    return data.encode("utf-8") if isinstance(data, str) else data


@dataclass
class ExecResult:
    """Output and exit of a command. ``exit_code`` is ``None`` while it runs, when a
    signal ended it (then ``signal`` is set) or when it failed. ``state`` is
    ``running``, ``exited`` or ``failed``. A failed command could not start or lost
    its guest connection, and ``error`` (code, message) gives the reason."""

    process_id: str
    stdout: bytes
    stderr: bytes
    exit_code: Optional[int]
    signal: Optional[int]
    timed_out: bool
    duration_secs: Optional[float]
    dropped_bytes: int
    running: bool
    state: str
    error: Optional[Dict[str, Any]]

    @classmethod
    def from_json(cls, body: Dict[str, Any]) -> "ExecResult":
        exit_info = body.get("exit") or {}
        return cls(
            process_id=body["process_id"],
            stdout=_decode(body["stdout"], body["stdout_encoding"]),
            stderr=_decode(body["stderr"], body["stderr_encoding"]),
            exit_code=exit_info.get("exit_code"),
            signal=exit_info.get("signal"),
            timed_out=bool(exit_info.get("timed_out", False)),
            duration_secs=exit_info.get("duration_secs"),
            dropped_bytes=body["dropped_bytes"],
            running=body["state"] == "running",
            state=body["state"],
            error=body.get("error"),
        )


@dataclass
class Process:
    """A command started by exec, as the process list reports it."""

    id: str
    command: List[str]
    background: bool
    state: str
    exit: Optional[Dict[str, Any]]
    error: Optional[Dict[str, Any]]
    last_seq: int

    @classmethod
    def from_json(cls, body: Dict[str, Any]) -> "Process":
        return cls(
            id=body["id"],
            command=body["command"],
            background=body["background"],
            state=body["state"],
            exit=body.get("exit"),
            error=body.get("error"),
            last_seq=body["last_seq"],
        )


@dataclass
class StreamEvent:
    """One event of an exec stream.

    ``type`` is ``started`` (``process_id`` set), ``stdout`` or ``stderr`` (``data`` and
    ``seq`` set), ``exit`` (``exit`` set: exit_code, signal, timed_out, duration_secs) or
    ``error`` (``error`` set: code, message).
    """

    type: str
    data: bytes = b""
    seq: int = 0
    process_id: Optional[str] = None
    exit: Optional[Dict[str, Any]] = None
    error: Optional[Dict[str, Any]] = None


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: Optional[float]):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if self.timeout is not None:
            sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class Client:
    """A connection to one upstream server.

    ``base_url`` is the server's address, such as ``http://127.0.0.1:7878``; ``socket``
    a Unix socket path instead. ``timeout`` bounds each socket operation in seconds
    (default: none, because commands and boots may take long).
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:7878",
        api_key: Optional[str] = None,
        socket: Optional[str] = None,
        timeout: Optional[float] = None,
    ):
        parsed = urllib.parse.urlsplit(base_url)
        if socket is None and parsed.scheme != "http":
            raise ValueError(f"unsupported URL {base_url!r}; use http://HOST:PORT or socket=PATH")
        self._host = parsed.hostname or "127.0.0.1"
        self._port = parsed.port or 80
        self._socket = socket
        self._api_key = api_key
        self._timeout = timeout

    def _connection(self) -> http.client.HTTPConnection:
        if self._socket is not None:
            return _UnixConnection(self._socket, self._timeout)
        return http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)

    def _send(
        self,
        method: str,
        path: str,
        query: Optional[Dict[str, Any]] = None,
        body: Optional[bytes] = None,
        content_type: Optional[str] = None,
    ) -> "tuple[http.client.HTTPConnection, http.client.HTTPResponse]":
        if query:
            path += "?" + urllib.parse.urlencode(query)
        headers = {}
        if content_type is not None:
            headers["Content-Type"] = content_type
        if self._api_key is not None:
            headers["Authorization"] = f"Bearer {self._api_key}"
        connection = self._connection()
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
        except OSError as err:
            connection.close()
            raise UpstreamError(0, "unreachable", f"cannot reach the upstream server: {err}")
        if response.status >= 300:
            raw = response.read()
            connection.close()
            raise _error(response.status, raw)
        return connection, response

    def _request(self, method: str, path: str, json_body: Any = None, **kwargs: Any) -> bytes:
        if json_body is not None:
            kwargs["body"] = json.dumps(json_body).encode("utf-8")
            kwargs["content_type"] = "application/json"
        connection, response = self._send(method, path, **kwargs)
        try:
            return response.read()
        finally:
            connection.close()

    def _json(self, method: str, path: str, json_body: Any = None, **kwargs: Any) -> Any:
        return json.loads(self._request(method, path, json_body, **kwargs))

    def _events(self, method: str, path: str, json_body: Any = None, **kwargs: Any) -> Iterator[StreamEvent]:
        if json_body is not None:
            kwargs["body"] = json.dumps(json_body).encode("utf-8")
            kwargs["content_type"] = "application/json"
        connection, response = self._send(method, path, **kwargs)
        try:
            yield from _parse_events(response)
        finally:
            # Closing the connection early stops a foreground command on the server.
            connection.close()

    def health(self) -> None:
        """``GET /healthz``."""
        self._request("GET", "/healthz")

    def create_sandbox(
        self,
        image: Optional[str] = None,
        vcpus: Optional[int] = None,
        memory_mib: Optional[int] = None,
        disk_mib: Optional[int] = None,
        env: Optional[Dict[str, str]] = None,
        timeout_secs: Optional[int] = None,
        metadata: Optional[Dict[str, str]] = None,
    ) -> "Sandbox":
        """``POST /v1/sandboxes``: boot a sandbox; returns once it is ready."""
        request = {
            "image": image,
            "vcpus": vcpus,
            "memory_mib": memory_mib,
            "disk_mib": disk_mib,
            "env": env,
            "timeout_secs": timeout_secs,
            "metadata": metadata,
        }
        body = {key: value for key, value in request.items() if value is not None}
        return Sandbox(self, self._json("POST", "/v1/sandboxes", body))

    def get_sandbox(self, sandbox_id: str) -> "Sandbox":
        """``GET /v1/sandboxes/{id}``."""
        return Sandbox(self, self._json("GET", f"/v1/sandboxes/{_quote(sandbox_id)}"))

    def list_sandboxes(
        self, metadata: Optional[Dict[str, str]] = None, state: Optional[str] = None
    ) -> List["Sandbox"]:
        """``GET /v1/sandboxes``: sandboxes whose metadata contains every given pair."""
        query = {f"metadata.{key}": value for key, value in (metadata or {}).items()}
        if state is not None:
            query["state"] = state
        body = self._json("GET", "/v1/sandboxes", query=query)
        return [Sandbox(self, info) for info in body["sandboxes"]]

    def submit_run(self, document: str, context: Optional[str] = None, new_context: bool = False) -> Dict[str, Any]:
        """``POST /v1/runs``: run a Markdown turn document; returns outcome, context,
        the rewritten document, the turn record and warnings."""
        body: Dict[str, Any] = {"document": document}
        if context is not None:
            body["context"] = context
        if new_context:
            body["new_context"] = True
        return self._json("POST", "/v1/runs", body)

    def contexts(self) -> List[Dict[str, Any]]:
        """``GET /v1/contexts``."""
        return self._json("GET", "/v1/contexts")["contexts"]

    def artifact(self, context: str, name: str) -> bytes:
        """``GET /v1/contexts/{name}/artifacts/{artifact}``: the latest version."""
        path = f"/v1/contexts/{_quote(context)}/artifacts/{urllib.parse.quote(name)}"
        return self._request("GET", path)


class Sandbox:
    """A sandbox of the server. Use it as a context manager to destroy it on exit."""

    def __init__(self, client: Client, info: Dict[str, Any]):
        self._client = client
        self.info = info
        self.id: str = info["id"]

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        try:
            self.destroy()
        except UpstreamError as err:
            if err.status != 404:
                raise

    def __repr__(self) -> str:
        return f"Sandbox({self.id!r})"

    def _path(self, suffix: str = "") -> str:
        return f"/v1/sandboxes/{_quote(self.id)}{suffix}"

    def refresh(self) -> Dict[str, Any]:
        """``GET /v1/sandboxes/{id}``: reload ``info``."""
        self.info = self._client._json("GET", self._path())
        return self.info

    def set_timeout(self, secs: Optional[int]) -> Dict[str, Any]:
        """``POST .../timeout``: destroy the sandbox ``secs`` from now; ``None`` never."""
        self.info = self._client._json("POST", self._path("/timeout"), {"timeout_secs": secs})
        return self.info

    def destroy(self) -> None:
        """``DELETE /v1/sandboxes/{id}``."""
        self._client._request("DELETE", self._path())

    @staticmethod
    def _exec_body(
        command: List[str],
        env: Optional[Dict[str, str]],
        cwd: Optional[str],
        stdin: Optional[Bytes],
        timeout_ms: Optional[int],
    ) -> Dict[str, Any]:
        body: Dict[str, Any] = {"command": list(command)}
        if env:
            body["env"] = env
        if cwd is not None:
            body["cwd"] = cwd
        if stdin is not None:
            body["stdin"] = base64.b64encode(_as_bytes(stdin)).decode("ascii")
            body["stdin_encoding"] = "base64"
        if timeout_ms is not None:
            body["timeout_ms"] = timeout_ms
        return body

    def exec(
        self,
        command: List[str],
        env: Optional[Dict[str, str]] = None,
        cwd: Optional[str] = None,
        stdin: Optional[Bytes] = None,
        timeout_ms: Optional[int] = None,
    ) -> ExecResult:
        """``POST .../exec``: run ``command`` to its end."""
        body = self._exec_body(command, env, cwd, stdin, timeout_ms)
        return ExecResult.from_json(self._client._json("POST", self._path("/exec"), body))

    def exec_stream(
        self,
        command: List[str],
        env: Optional[Dict[str, str]] = None,
        cwd: Optional[str] = None,
        stdin: Optional[Bytes] = None,
        timeout_ms: Optional[int] = None,
    ) -> Iterator[StreamEvent]:
        """``POST .../exec/stream``: run ``command`` and yield its events as they come.
        Stopping the iteration early kills the command."""
        body = self._exec_body(command, env, cwd, stdin, timeout_ms)
        return self._client._events("POST", self._path("/exec/stream"), body)

    def exec_background(
        self,
        command: List[str],
        env: Optional[Dict[str, str]] = None,
        cwd: Optional[str] = None,
        stdin: Optional[Bytes] = None,
        timeout_ms: Optional[int] = None,
        keep_stdin_open: bool = False,
    ) -> Process:
        """``POST .../exec`` with ``background``: start ``command`` and return at once."""
        body = self._exec_body(command, env, cwd, stdin, timeout_ms)
        body["background"] = True
        if keep_stdin_open:
            body["keep_stdin_open"] = True
        return Process.from_json(self._client._json("POST", self._path("/exec"), body))

    def processes(self) -> List[Process]:
        """``GET .../processes``."""
        body = self._client._json("GET", self._path("/processes"))
        return [Process.from_json(process) for process in body["processes"]]

    def process(self, process_id: str) -> ExecResult:
        """``GET .../processes/{pid}``: output kept so far and the exit, if any."""
        return ExecResult.from_json(
            self._client._json("GET", self._path(f"/processes/{_quote(process_id)}"))
        )

    def attach(self, process_id: str, after: int = 0) -> Iterator[StreamEvent]:
        """``GET .../processes/{pid}/events``: kept output after event ``after``, then
        live output, until the process ends."""
        path = self._path(f"/processes/{_quote(process_id)}/events")
        return self._client._events("GET", path, query={"after": after})

    def kill(self, process_id: str, signal: Optional[int] = None) -> Process:
        """``POST .../processes/{pid}/kill``: send ``signal`` (default 9, SIGKILL)."""
        body = {} if signal is None else {"signal": signal}
        path = self._path(f"/processes/{_quote(process_id)}/kill")
        return Process.from_json(self._client._json("POST", path, body))

    def write_stdin(self, process_id: str, data: Bytes, eof: bool = False) -> None:
        """``POST .../processes/{pid}/stdin``: write ``data``; close stdin when ``eof``."""
        path = self._path(f"/processes/{_quote(process_id)}/stdin")
        self._client._request(
            "POST",
            path,
            query={"eof": "true" if eof else "false"},
            body=_as_bytes(data),
            content_type="application/octet-stream",
        )

    def write_file(self, path: str, data: Bytes, mode: Optional[int] = None) -> int:
        """``PUT .../files``: create or replace ``path``; returns the size written."""
        query = {"path": path}
        if mode is not None:
            query["mode"] = format(mode, "o")
        body = self._client._json(
            "PUT",
            self._path("/files"),
            query=query,
            body=_as_bytes(data),
            content_type="application/octet-stream",
        )
        return body["size"]

    def read_file(self, path: str) -> bytes:
        """``GET .../files``: the bytes of ``path``."""
        return self._client._request("GET", self._path("/files"), query={"path": path})

    def list_files(self, path: str) -> List[Dict[str, Any]]:
        """``GET .../files/list``: entries with name, size, mode, is_dir, is_symlink."""
        return self._client._json("GET", self._path("/files/list"), query={"path": path})["entries"]

    def remove(self, path: str) -> None:
        """``DELETE .../files``: remove a file, or a directory with its contents."""
        self._client._request("DELETE", self._path("/files"), query={"path": path})


def _quote(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


def _error(status: int, raw: bytes) -> UpstreamError:
    try:
        detail = json.loads(raw)["error"]
        return UpstreamError(status, detail["code"], detail["message"], detail.get("field"))
    except (ValueError, KeyError, TypeError):
        return UpstreamError(status, "http_error", raw.decode("utf-8", "replace"))


def _parse_events(response: http.client.HTTPResponse) -> Iterator[StreamEvent]:
    """Yields the events of a Server-Sent Events body until the last one."""
    name, data = "message", []
    while True:
        line = response.readline()
        if not line:
            raise UpstreamError(0, "stream_ended", "the event stream ended before the command's exit")
        line = line.decode("utf-8").rstrip("\r\n")
        if line:
            if line.startswith("event:"):
                name = line[len("event:"):].strip()
            elif line.startswith("data:"):
                data.append(line[len("data:"):].lstrip(" "))
            continue
        if data:
            event = _event(name, json.loads("\n".join(data)))
            if event is not None:
                yield event
                if event.type in ("exit", "error"):
                    return
        name, data = "message", []


def _event(name: str, body: Dict[str, Any]) -> Optional[StreamEvent]:
    if name == "started":
        return StreamEvent("started", process_id=body["process_id"])
    if name in ("stdout", "stderr"):
        return StreamEvent(name, data=_decode(body["data"], body["encoding"]), seq=body["seq"])
    if name == "exit":
        return StreamEvent("exit", exit=body)
    if name == "error":
        return StreamEvent("error", error=body)
    return None
