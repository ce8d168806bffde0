"""The download workers' only way out (stage 1, ingest): a urllib opener that enforces the URL policy.

img2dataset 1.47 fetches each image with ``urllib.request.urlopen`` from threads inside worker
processes that its distributor starts with ``spawn``, so nothing installed in the calling process
reaches them. ``worker_env`` returns the environment that makes every such worker enforce the
policy: ``workerboot/sitecustomize.py`` runs at interpreter start-up and calls ``install_from_env``,
which installs the opener of ``build_opener`` as urllib's global one. That opener:

- has only HTTP(S) handlers (no file, ftp or data), so other schemes are refused, not fetched;
- checks the URL text of the request and of every redirect hop before following it, and refuses
  more than ``max_redirects`` hops;
- resolves the host itself, checks every address, and connects to a checked address (TLS then
  verifies the certificate against the original host name), so a refused address is never
  contacted and a second DNS answer cannot swap one in;
- refuses a body over ``max_body_bytes`` (early on Content-Length, else while streaming);
- ends the whole fetch, redirects included, ``timeout_s`` after it started, however slowly the
  server trickles (urllib's own timeout is per socket operation).

The decompression-bomb cap is OpenCV's: ``OPENCV_IO_MAX_IMAGE_PIXELS`` in the same environment. The
same start-up hooks also set the tar format the workers write their shards in (``set_tar_format_from_env``).
Error texts carry ``url_policy:<kind>``, ``body_too_large`` or ``deadline_exceeded``, which
``unclip.drops.reason_from_img2dataset`` maps to reason codes. Proxy settings are ignored.
"""

from __future__ import annotations

import functools
import http.client
import io
import json
import os
import socket
import ssl
import string
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, urljoin, urlsplit

from unclip.data.url_policy import INVALID_URL, SCHEME, TOO_MANY_REDIRECTS, UrlPolicy, UrlRefused

if TYPE_CHECKING:  # workers import this module at start-up: keep pydantic out of it
    from unclip.config import IngestConfig

POLICY_ENV = "UNCLIP_EGRESS_POLICY"
PIXELS_ENV = "OPENCV_IO_MAX_IMAGE_PIXELS"
TAR_FORMAT_ENV = "UNCLIP_SHARD_TAR_FORMAT"
TAR_FORMATS = {"gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}  # not ustar: no names over 100 characters
SHARD_TAR_FORMAT = "gnu"  # what the ingest's workers write
WORKERBOOT_DIR = str(Path(__file__).resolve().parent / "workerboot")

# Per-fetch state rides on urllib's Request objects, as urllib's own redirect_dict does.
_DEADLINE_ATTR = "_egress_deadline"
_HOP_ATTR = "_egress_hop"


class BodyTooLarge(OSError):
    """The response body exceeds ``max_body_bytes``. ``str()`` starts with ``body_too_large``."""

    def __init__(self, detail: str, bytes_read: int = 0):
        super().__init__(f"body_too_large: {detail}")
        self.bytes_read = bytes_read


class DeadlineExceeded(TimeoutError):
    """The whole fetch outlived ``timeout_s``. ``str()`` starts with ``deadline_exceeded``."""

    def __init__(self, timeout_s: float, during: str):
        super().__init__(f"deadline_exceeded: fetch not complete within {timeout_s:g} s ({during})")


class _Limits:
    def __init__(self, policy: UrlPolicy, max_body_bytes: int, timeout_s: float):
        if max_body_bytes < 1 or timeout_s <= 0:
            raise ValueError("max_body_bytes and timeout_s must be positive")
        self.policy = policy
        self.max_body_bytes = int(max_body_bytes)
        self.timeout_s = float(timeout_s)


def _per_op(timeout) -> float | None:
    """urllib's per-operation timeout (``socket._GLOBAL_DEFAULT_TIMEOUT`` means the process default)."""
    return timeout if isinstance(timeout, (int, float)) else socket.getdefaulttimeout()


def _op_timeout(per_op: float | None, left: float) -> float:
    return left if per_op is None else min(per_op, left)


def _where(req: urllib.request.Request) -> str:
    hop = getattr(req, _HOP_ATTR, 0)
    return f" (redirect hop {hop})" if hop else ""


# -- the socket layer ---------------------------------------------------------------------------
class _DeadlineReader(io.RawIOBase):
    """The raw stream under ``HTTPResponse.fp``: every recv waits at most until the deadline, and
    once ``limit`` is set (after the headers) at most ``limit`` bytes in all are accepted."""

    def __init__(self, sock: socket.socket, per_op: float | None, deadline: float, limits: _Limits):
        self._sock = sock
        self._io = sock.makefile("rb", buffering=0)  # holds a reference: the socket outlives conn.close()
        self._per_op = per_op
        self._deadline = deadline
        self._limits = limits
        self.count = 0
        self.limit: int | None = None

    def readable(self) -> bool:
        return True

    def tell(self) -> int:  # lets BufferedReader.tell() report how many bytes the parser consumed
        return self.count

    def readinto(self, b) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(self._limits.timeout_s, "reading the response")
        timeout = _op_timeout(self._per_op, left)
        view = memoryview(b)
        if self.limit is not None:  # one byte past the limit tells "exactly at the cap" from "over"
            view = view[: max(1, self.limit - self.count + 1)]
        self._sock.settimeout(timeout)
        try:
            n = self._io.readinto(view)
        except TimeoutError:
            if timeout < (self._per_op or float("inf")):
                raise DeadlineExceeded(self._limits.timeout_s, "reading the response") from None
            raise
        self.count += n or 0
        if self.limit is not None and self.count > self.limit:
            cap = self._limits.max_body_bytes
            raise BodyTooLarge(f"more than max_body_bytes={cap} received", self.count)
        return n

    def close(self) -> None:
        if not self.closed:
            self._io.close()
        super().close()


class _GuardedResponse(http.client.HTTPResponse):
    def __init__(self, sock, debuglevel=0, method=None, url=None, *, per_op, deadline, limits):
        super().__init__(sock, debuglevel, method, url)
        self.fp.close()  # the plain makefile() of the base class; ours replaces it
        self._raw = _DeadlineReader(sock, per_op, deadline, limits)
        self.fp = io.BufferedReader(self._raw)
        self._limits = limits

    def begin(self) -> None:
        super().begin()
        cap = self._limits.max_body_bytes
        if self.length is not None and self.length > cap:
            raise BodyTooLarge(f"Content-Length {self.length} > max_body_bytes={cap}", self._raw.count)
        # Bytes the header parser consumed are exact (BufferedReader.tell); what it buffered past
        # them is body and counts. For chunked bodies the chunk framing counts too.
        self._raw.limit = self.fp.tell() + cap


def _connect(conn: http.client.HTTPConnection, limits: _Limits, deadline: float, where: str) -> socket.socket:
    """A TCP connection to an address of ``conn.host`` that the policy allows (never to another)."""
    per_op = _per_op(conn.timeout)
    try:
        addrs = limits.policy.resolve(conn.host, conn.port)
    except UrlRefused as err:
        raise err.at(where) from None
    last_err: OSError | None = None
    for family, sockaddr in addrs:
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(limits.timeout_s, "connecting")
        timeout = _op_timeout(per_op, left)
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            if conn.source_address:
                sock.bind(conn.source_address)
            sock.connect(sockaddr)
        except TimeoutError as err:
            sock.close()
            if timeout < (per_op or float("inf")):
                raise DeadlineExceeded(limits.timeout_s, "connecting") from None
            last_err = err
        except OSError as err:
            sock.close()
            last_err = err
        else:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            return sock
    assert last_err is not None
    raise last_err


class _GuardedConnectionMixin:
    """Carries the limits and the deadline into the connection and its response class."""

    def __init__(self, host, *, limits: _Limits, deadline: float, where: str, **kwargs):
        super().__init__(host, **kwargs)
        self._limits, self._deadline, self._where = limits, deadline, where
        self.response_class = functools.partial(
            _GuardedResponse, per_op=_per_op(self.timeout), deadline=deadline, limits=limits)


class _GuardedHTTPConnection(_GuardedConnectionMixin, http.client.HTTPConnection):
    def connect(self) -> None:
        sys.audit("http.client.connect", self, self.host, self.port)
        self.sock = _connect(self, self._limits, self._deadline, self._where)


class _GuardedHTTPSConnection(_GuardedConnectionMixin, http.client.HTTPSConnection):
    def connect(self) -> None:
        sys.audit("http.client.connect", self, self.host, self.port)
        sock = _connect(self, self._limits, self._deadline, self._where)
        left = self._deadline - time.monotonic()
        if left <= 0:
            sock.close()
            raise DeadlineExceeded(self._limits.timeout_s, "TLS handshake")
        sock.settimeout(min(sock.gettimeout() or left, left))
        # Connected to the checked IP; the certificate is verified against the URL's host name.
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


# -- the urllib layer ---------------------------------------------------------------------------
class _PolicyGuard(urllib.request.BaseHandler):
    """Checks the URL text of every request (redirect hops included) before any handler opens it."""

    def __init__(self, policy: UrlPolicy):
        self._policy = policy

    def default_open(self, req):
        try:
            self._policy.check_url(req.full_url)
        except UrlRefused as err:
            raise urllib.error.URLError(err.at(_where(req))) from None
        return None  # let the scheme's handler open it

    def unknown_open(self, req):  # unreachable while allowed_schemes is http/https; fail closed anyway
        raise urllib.error.URLError(UrlRefused(SCHEME, repr(req.type) + _where(req)))


class _FetchMixin:
    def _open(self, req, conn_class, **conn_args):
        deadline = getattr(req, _DEADLINE_ATTR, None)
        if deadline is None:
            deadline = time.monotonic() + self._limits.timeout_s
            setattr(req, _DEADLINE_ATTR, deadline)
        factory = functools.partial(conn_class, limits=self._limits, deadline=deadline, where=_where(req))
        return self.do_open(factory, req, **conn_args)


class _GuardedHTTPHandler(_FetchMixin, urllib.request.HTTPHandler):
    def __init__(self, limits: _Limits):
        super().__init__()
        self._limits = limits

    def http_open(self, req):
        return self._open(req, _GuardedHTTPConnection)


class _GuardedHTTPSHandler(_FetchMixin, urllib.request.HTTPSHandler):
    def __init__(self, limits: _Limits, context: ssl.SSLContext):
        super().__init__(context=context)
        self._limits = limits

    def https_open(self, req):
        return self._open(req, _GuardedHTTPSConnection, context=self._context)


class _GuardedRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows at most ``max_redirects`` hops, each checked before it is followed, and all within
    the first request's deadline. Replaces the stdlib loop detection and its scheme whitelist."""

    def __init__(self, policy: UrlPolicy):
        self._policy = policy

    def http_error_302(self, req, fp, code, msg, headers):
        location = headers.get("location") or headers.get("uri")
        if location is None:
            return None
        hop = getattr(req, _HOP_ATTR, 0) + 1
        # As the stdlib does: percent-encode what http.client decoded as Latin-1, then make absolute.
        newurl = urljoin(req.full_url, quote(location, encoding="iso-8859-1", safe=string.punctuation))
        try:
            host = urlsplit(newurl).hostname or "(no host)"
        except ValueError:
            host = "(invalid)"
        where = f" (redirect hop {hop})"
        try:
            if hop > self._policy.max_redirects:
                raise UrlRefused(TOO_MANY_REDIRECTS, f"{host}{where} > max_redirects={self._policy.max_redirects}")
            self._policy.check_url(newurl)
        except UrlRefused as err:
            fp.close()
            raise urllib.error.URLError(err if err.kind == TOO_MANY_REDIRECTS else err.at(where)) from None
        try:
            new = self.redirect_request(req, fp, code, msg, headers, newurl)
        except ValueError as err:
            fp.close()
            raise urllib.error.URLError(UrlRefused(INVALID_URL, f"{err}{where}")) from None
        if new is None:
            return None
        setattr(new, _HOP_ATTR, hop)
        setattr(new, _DEADLINE_ATTR, getattr(req, _DEADLINE_ATTR, None))
        fp.close()  # the redirect's body is never read
        return self.parent.open(new, timeout=req.timeout)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def _default_ssl_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def build_opener(
    policy: UrlPolicy, *, max_body_bytes: int, timeout_s: float, ssl_context: ssl.SSLContext | None = None
) -> urllib.request.OpenerDirector:
    """An opener with only policy-enforcing HTTP(S) handlers (no proxy, file, ftp or data handler).

    ``ssl_context`` defaults to the system trust store with host name checking.
    """
    limits = _Limits(policy, max_body_bytes, timeout_s)
    opener = urllib.request.OpenerDirector()
    for handler in (
        _PolicyGuard(policy),
        _GuardedHTTPHandler(limits),
        _GuardedHTTPSHandler(limits, ssl_context or _default_ssl_context()),
        _GuardedRedirectHandler(policy),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


def install(policy: UrlPolicy, *, max_body_bytes: int, timeout_s: float) -> urllib.request.OpenerDirector:
    """Make ``build_opener(...)`` urllib's global opener (what ``urllib.request.urlopen`` uses)."""
    opener = build_opener(policy, max_body_bytes=max_body_bytes, timeout_s=timeout_s)
    urllib.request.install_opener(opener)
    return opener


def policy_json(ingest_cfg: "IngestConfig") -> str:
    return json.dumps({
        "url_policy": ingest_cfg.url_policy.model_dump(mode="json"),
        "max_body_bytes": ingest_cfg.max_body_bytes,
        "timeout_s": ingest_cfg.timeout_s,
    })


def install_from_env(environ: Mapping[str, str] | None = None) -> urllib.request.OpenerDirector | None:
    """Install the opener described by ``$UNCLIP_EGRESS_POLICY``; ``None`` (no-op) when it is unset.

    A malformed value raises: the caller (sitecustomize) must fail closed, not download unguarded.
    """
    raw = (os.environ if environ is None else environ).get(POLICY_ENV)
    if not raw:
        return None
    spec = json.loads(raw)
    p = spec["url_policy"]
    policy = UrlPolicy(p["allowed_schemes"], p["allow_hosts"], p["max_redirects"])
    return install(policy, max_body_bytes=int(spec["max_body_bytes"]), timeout_s=float(spec["timeout_s"]))


def set_tar_format_from_env(environ: Mapping[str, str] | None = None) -> int | None:
    """Make the tar format ``$UNCLIP_SHARD_TAR_FORMAT`` names (``gnu``) this process's default, so the
    shards img2dataset's workers write have one plain header a member; ``None`` (no-op) when unset.

    img2dataset writes its shards with webdataset's ``TarWriter``, which (webdataset 0.2) opens its
    tarfile without the format it is given, so Python's default, PAX, applies; and it stamps every
    member with a float ``mtime``, which PAX keeps in an extended header of the member's own. That is
    1 KiB more a member (3 a pair: about 2 TB at 650M pairs) and twice the time to read a sample back
    (0.16 against 0.08 ms with webdataset; docs/benchmarks.md). GNU headers hold the same members,
    the mtime to the second and names over 100 characters as long-name records. An unknown name raises.
    """
    name = (os.environ if environ is None else environ).get(TAR_FORMAT_ENV)
    if not name:
        return None
    if name not in TAR_FORMATS:
        raise ValueError(f"${TAR_FORMAT_ENV}={name!r}: not one of {sorted(TAR_FORMATS)}")
    tarfile.TarFile.format = TAR_FORMATS[name]  # what tarfile.open uses when not given a format
    return TAR_FORMATS[name]


def worker_env(ingest_cfg: "IngestConfig", environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Variables to merge into ``os.environ.copy()`` for a subprocess that runs img2dataset, so that
    every worker it spawns enforces the policy, the caps and the deadline, and writes GNU tar shards.

    ``PYTHONPATH`` gets the ``workerboot`` directory (it holds only ``sitecustomize.py``) first and
    keeps the existing entries of ``environ`` (default ``os.environ``) after it.
    """
    environ = os.environ if environ is None else environ
    rest = [p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != WORKERBOOT_DIR]
    return {
        POLICY_ENV: policy_json(ingest_cfg),
        PIXELS_ENV: str(ingest_cfg.max_image_pixels),
        TAR_FORMAT_ENV: SHARD_TAR_FORMAT,
        "PYTHONPATH": os.pathsep.join([WORKERBOOT_DIR, *rest]),
    }


def ray_worker_setup() -> None:
    """Ray's ``worker_process_setup_hook`` for img2dataset's ray distributor: every Ray worker of the
    ingest job installs the policy from ``$UNCLIP_EGRESS_POLICY`` (carried by the job's runtime_env)
    before it downloads anything. Fails closed: a policy that cannot be installed refuses every fetch.
    Then it sets the shards' tar format (``set_tar_format_from_env``); if that fails it says so on
    stderr and the worker goes on (its shards are valid tar files, only larger)."""
    try:
        if install_from_env() is None:
            raise RuntimeError(f"${POLICY_ENV} is not set in this Ray worker")
    except Exception as err:  # noqa: BLE001 -- the worker must not download unguarded
        reason = f"{type(err).__name__}: {err}"
        opener = urllib.request.OpenerDirector()
        opener.add_handler(_RefuseAll(reason))
        urllib.request.install_opener(opener)
    try:
        set_tar_format_from_env()
    except ValueError as err:
        print(f"unclip ray_worker_setup: shard tar format not set: {err}", file=sys.stderr)


class _RefuseAll(urllib.request.BaseHandler):
    def __init__(self, reason: str) -> None:
        self.reason = reason

    def default_open(self, req):
        raise urllib.error.URLError(f"egress policy unavailable, nothing is fetched: {self.reason}")


def ray_runtime_env(ingest_cfg: "IngestConfig") -> dict:
    """The runtime_env of the Ray job that runs img2dataset's ray distributor: the policy, the pixel
    cap, the shards' tar format and the setup hook reach every worker process, on this machine or on a
    cluster."""
    return {"env_vars": {POLICY_ENV: policy_json(ingest_cfg), PIXELS_ENV: str(ingest_cfg.max_image_pixels),
                         TAR_FORMAT_ENV: SHARD_TAR_FORMAT,
                         "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"},
            "worker_process_setup_hook": "unclip.data.egress.ray_worker_setup"}
