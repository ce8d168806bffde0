"""The egress opener against real HTTP(S) servers on 127.0.0.1 and 127.0.0.2, and the worker hook
end to end: img2dataset's spawned workers enforce the policy only through ``worker_env``."""

from __future__ import annotations

import io
import json
import os
import socket
import ssl
import struct
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import pytest
from conftest import tar_headers

from unclip import drops
from unclip.config import IngestConfig, UrlPolicyConfig
from unclip.data import egress
from unclip.data.egress import BodyTooLarge, DeadlineExceeded, build_opener, worker_env
from unclip.data.url_policy import UrlPolicy

REPO = Path(__file__).resolve().parents[1]
CAP = 64 * 1024


# -- images -----------------------------------------------------------------------------------
def png(width: int, height: int, level: int = 6, zero: bool = False) -> bytes:
    """A grey PNG, compressed row by row (a zero 12000x12000 one is a ~140 kB decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(level)
    row = b"\x00" + (bytes(width) if zero else bytes(range(256)) * (width // 256) + bytes(range(width % 256)))
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


IMAGE = png(32, 32)


# -- servers ----------------------------------------------------------------------------------
def _send(h, body: bytes, status: int = 200, ctype: str = "image/png") -> None:
    h.send_response(status)
    h.send_header("Content-Type", ctype)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


def _redirect(h, location: str) -> None:
    h.send_response(302)
    h.send_header("Location", location)
    h.send_header("Content-Length", "0")
    h.end_headers()


def route_img(h, q):
    _send(h, IMAGE)


def route_redirect(h, q):
    _redirect(h, q["to"][0])


def route_loop(h, q):  # /loop?n=K&end=E redirects K -> K+1 until E, then serves the image
    n, end = int(q["n"][0]), int(q["end"][0])
    if n >= end:
        return _send(h, IMAGE)
    _redirect(h, f"/loop?n={n + 1}&end={end}")


def route_big(h, q):  # announces 50 MiB, then holds the body back until the test ends
    h.send_response(200)
    h.send_header("Content-Type", "image/png")
    h.send_header("Content-Length", str(50 * 2**20))
    h.end_headers()
    h.wfile.flush()
    h.server.owner.release.wait(30)
    h.server.owner.sent["big"] = 0


def route_chunked(h, q):  # up to 32 MiB, chunked, no Content-Length
    h.send_response(200)
    h.send_header("Content-Type", "image/png")
    h.send_header("Transfer-Encoding", "chunked")
    h.end_headers()
    block = b"x" * 16384
    sent = 0
    try:
        while sent < 32 * 2**20:
            h.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
            sent += len(block)
        h.wfile.write(b"0\r\n\r\n")
    finally:
        h.server.owner.sent["chunked"] = sent


def route_until_close(h, q):  # n bytes, delimited by closing the connection (no length, not chunked)
    h.send_response(200)
    h.send_header("Content-Type", "image/png")
    h.send_header("Connection", "close")
    h.end_headers()
    h.wfile.write(b"y" * int(q["n"][0]))


def route_trickle(h, q):  # 30 bytes, one every 0.3 s; with ?headers=1 the headers trickle instead
    if "headers" in q:
        h.wfile.write(b"HTTP/1.1 200 OK\r\n")
        for byte in b"X-Slow: " + b"z" * 28 + b"\r\n\r\n":
            h.wfile.write(bytes([byte]))
            h.wfile.flush()
            time.sleep(0.3)
        return
    h.send_response(200)
    h.send_header("Content-Type", "image/png")
    h.send_header("Content-Length", "30")
    h.end_headers()
    for _ in range(30):
        h.wfile.write(b"t")
        h.wfile.flush()
        time.sleep(0.3)


BOMB: list[bytes] = []


def route_bomb(h, q):
    if not BOMB:
        BOMB.append(png(12000, 12000, level=9, zero=True))
    _send(h, BOMB[0])


ROUTES = {"/img.png": route_img, "/redirect": route_redirect, "/loop": route_loop, "/big": route_big,
          "/chunked": route_chunked, "/until-close": route_until_close, "/trickle": route_trickle,
          "/bomb.png": route_bomb}


class Server:
    """A threaded HTTP(S) server that counts every TCP connection it accepts and every request."""

    def __init__(self, host: str, port: int = 0, tls: ssl.SSLContext | None = None):
        self.connections = 0
        self.requests: list[str] = []
        self.sent: dict[str, int] = {}
        self.release = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                owner.requests.append(self.path)
                parts = urlsplit(self.path)
                self.close_connection = True
                route = ROUTES.get(parts.path)
                try:
                    if route is None:
                        _send(self, b"not found", 404, "text/plain")
                    else:
                        route(self, parse_qs(parts.query))
                except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                    pass

        class Httpd(ThreadingHTTPServer):
            daemon_threads = True

            def get_request(self):
                conn, addr = super().get_request()
                owner.connections += 1
                if tls is not None:
                    conn = tls.wrap_socket(conn, server_side=True)
                return conn, addr

            def handle_error(self, request, client_address):
                pass

        self.httpd = Httpd((host, port), Handler)
        self.httpd.owner = self
        self.host, self.port = host, self.httpd.server_address[1]
        self.base = f"{'https' if tls else 'http'}://{host}:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def main_server():
    server = Server("127.0.0.1")
    yield server
    server.close()


@pytest.fixture
def recorder(main_server):
    """The server that must never be reached: on 127.0.0.2, on the main server's port if free."""
    try:
        server = Server("127.0.0.2", main_server.port)
    except OSError:
        server = Server("127.0.0.2")
    yield server
    server.close()


@pytest.fixture
def connects(monkeypatch):
    """Every address this process connects a socket to."""
    seen: list[str] = []
    real = socket.socket.connect

    def spy(self, address):
        seen.append(address[0])
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", spy)
    return seen


def opener(allow=("127.0.0.1",), *, max_redirects=5, max_body_bytes=CAP, timeout_s=5.0, resolver=None, **kw):
    policy = UrlPolicy(allow_hosts=allow, max_redirects=max_redirects, resolver=resolver)
    return build_opener(policy, max_body_bytes=max_body_bytes, timeout_s=timeout_s, **kw)


def assert_reason(err: BaseException, code: str) -> str:
    text = str(err)
    assert drops.reason_from_img2dataset("failed_to_download", text) == code, text
    return text


# -- fetching through the policy ------------------------------------------------------------------
def test_image_fetch_works(main_server):
    with opener().open(f"{main_server.base}/img.png", timeout=5) as r:
        assert r.status == 200 and r.read() == IMAGE


def test_install_makes_urlopen_enforce(main_server, recorder, monkeypatch):
    monkeypatch.setattr(urllib.request, "_opener", None)
    egress.install(UrlPolicy(allow_hosts=("127.0.0.1",)), max_body_bytes=CAP, timeout_s=5)
    assert urllib.request.urlopen(f"{main_server.base}/img.png", timeout=5).read() == IMAGE
    with pytest.raises(urllib.error.URLError) as err:
        urllib.request.urlopen(f"{recorder.base}/img.png", timeout=5)
    assert_reason(err.value, drops.URL_LOOPBACK)
    assert recorder.connections == 0


def test_redirect_to_other_loopback_refused_at_the_hop(main_server, recorder, connects):
    url = f"{main_server.base}/redirect?to={quote(recorder.base + '/img.png')}"
    with pytest.raises(urllib.error.URLError) as err:
        opener().open(url, timeout=5)
    text = assert_reason(err.value, drops.URL_LOOPBACK)
    assert "url_policy:loopback 127.0.0.2 (redirect hop 1)" in text
    assert recorder.connections == 0 and recorder.requests == []
    assert "127.0.0.2" not in connects


def test_redirect_to_name_resolving_to_refused_address_is_refused_at_connect(main_server, recorder, connects):
    def dns(host, port, *args):
        if host == "evil.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.2", port))]
        return socket.getaddrinfo(host, port, *args)

    url = f"{main_server.base}/redirect?to={quote(f'http://evil.test:{recorder.port}/img.png')}"
    with pytest.raises(urllib.error.URLError) as err:
        opener(resolver=dns).open(url, timeout=5)
    assert "url_policy:loopback evil.test -> 127.0.0.2 (redirect hop 1)" in assert_reason(err.value, drops.URL_LOOPBACK)
    assert recorder.connections == 0 and "127.0.0.2" not in connects


def test_redirect_to_metadata_address_never_contacted(main_server, connects):
    url = f"{main_server.base}/redirect?to={quote('http://169.254.169.254/latest/meta-data/')}"
    t0 = time.monotonic()
    with pytest.raises(urllib.error.URLError) as err:
        opener().open(url, timeout=5)
    assert time.monotonic() - t0 < 1
    assert "169.254.169.254 (redirect hop 1)" in assert_reason(err.value, drops.URL_LINK_LOCAL)
    assert connects == ["127.0.0.1"]


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/x", "data:text/plain,hello"])
def test_other_schemes_refused_directly(url, connects):
    with pytest.raises(urllib.error.URLError) as err:
        opener().open(url, timeout=5)
    assert_reason(err.value, drops.URL_SCHEME)
    assert connects == []


def test_redirect_to_file_scheme_refused(main_server):
    with pytest.raises(urllib.error.URLError) as err:
        opener().open(f"{main_server.base}/redirect?to={quote('file:///etc/passwd')}", timeout=5)
    assert "(redirect hop 1)" in assert_reason(err.value, drops.URL_SCHEME)


def test_redirect_limit(main_server):
    with opener(max_redirects=3).open(f"{main_server.base}/loop?n=0&end=3", timeout=5) as r:
        assert r.read() == IMAGE
    main_server.requests.clear()
    with pytest.raises(urllib.error.URLError) as err:
        opener(max_redirects=3).open(f"{main_server.base}/loop?n=0&end=4", timeout=5)
    assert "(redirect hop 4) > max_redirects=3" in assert_reason(err.value, drops.URL_REDIRECTS)
    assert main_server.requests == [f"/loop?n={n}&end=4" for n in range(4)]  # hop 4 was never requested
    with pytest.raises(urllib.error.URLError) as err:
        opener(max_redirects=0).open(f"{main_server.base}/loop?n=0&end=1", timeout=5)
    assert_reason(err.value, drops.URL_REDIRECTS)


def test_content_length_over_cap_refused_before_the_body(main_server):
    t0 = time.monotonic()
    with pytest.raises(BodyTooLarge) as err:
        opener().open(f"{main_server.base}/big", timeout=10)
    assert time.monotonic() - t0 < 1  # the server is still holding its body back
    assert "Content-Length 52428800 > max_body_bytes=65536" in assert_reason(err.value, drops.BODY_TOO_LARGE)
    assert err.value.bytes_read < 1024  # the headers only


def test_chunked_body_over_cap_refused_while_streaming(main_server):
    with opener().open(f"{main_server.base}/chunked", timeout=10) as r:
        with pytest.raises(BodyTooLarge) as err:
            r.read()
    assert_reason(err.value, drops.BODY_TOO_LARGE)
    assert CAP < err.value.bytes_read <= CAP + 1024  # headers + the cap + one byte
    deadline = time.monotonic() + 5
    while "chunked" not in main_server.sent and time.monotonic() < deadline:
        time.sleep(0.05)
    assert main_server.sent["chunked"] < 32 * 2**20  # the server was cut off, not drained


def test_cap_is_exact_on_a_close_delimited_body(main_server):
    with opener().open(f"{main_server.base}/until-close?n={CAP}", timeout=5) as r:
        assert len(r.read()) == CAP
    with opener().open(f"{main_server.base}/until-close?n={CAP + 1}", timeout=5) as r:
        with pytest.raises(BodyTooLarge):
            r.read()


@pytest.mark.parametrize("query", ["", "?headers=1"], ids=["body", "headers"])
def test_trickling_server_hits_the_deadline(main_server, query):
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded) as err:
        with opener(timeout_s=1.0).open(f"{main_server.base}/trickle{query}", timeout=10) as r:
            r.read()
    elapsed = time.monotonic() - t0
    assert 0.9 < elapsed < 3.0, elapsed  # about 1 s; slack for a loaded CI machine
    assert "deadline_exceeded" in assert_reason(err.value, drops.TIMEOUT)


def test_per_operation_timeout_still_applies(main_server):
    with pytest.raises(TimeoutError) as err:
        with opener(timeout_s=10.0).open(f"{main_server.base}/trickle?headers=1", timeout=0.2) as r:
            r.read()
    assert not isinstance(err.value, DeadlineExceeded)
    assert_reason(err.value, drops.TIMEOUT)


def test_mixed_dns_answer_connects_only_to_the_allowed_address(main_server, recorder, connects):
    assert recorder.port == main_server.port, "127.0.0.2:port was taken"

    def dns(host, port, *args):
        assert host == "mixed.test"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in ("127.0.0.2", "127.0.0.1")]

    with opener(resolver=dns).open(f"http://mixed.test:{main_server.port}/img.png", timeout=5) as r:
        assert r.read() == IMAGE
    assert connects == ["127.0.0.1"] and recorder.connections == 0


def test_rebinding_dns_cannot_swap_the_checked_address(main_server, recorder, monkeypatch):
    """One lookup per connection, and the connection goes to the address that lookup approved: a
    second, rebound answer (127.0.0.2) is never asked for, even by a default-resolver policy."""
    assert recorder.port == main_server.port, "127.0.0.2:port was taken"
    answers = iter(["127.0.0.1"] + ["127.0.0.2"] * 10)
    lookups = []

    def rebinding(host, port, *args, **kwargs):
        lookups.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    with opener().open(f"http://rebind.test:{main_server.port}/img.png", timeout=5) as r:
        assert r.read() == IMAGE
    assert lookups == ["rebind.test"] and recorder.connections == 0


def test_dns_failure_maps_to_dns_error():
    def dns(host, port, *args):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with pytest.raises(urllib.error.URLError) as err:
        opener(resolver=dns).open("http://no-such-host.test/x.png", timeout=5)
    assert_reason(err.value, drops.DNS_ERROR)


# -- HTTPS ----------------------------------------------------------------------------------------
@pytest.fixture
def tls_server(tmp_path):
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import datetime

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server = Server("127.0.0.1", tls=server_ctx)
    client_ctx = ssl.create_default_context(cadata=cert_pem.decode())
    yield server, client_ctx
    server.close()


def test_https_connects_to_the_checked_ip_and_verifies_the_host_name(tls_server, connects):
    server, ctx = tls_server
    url = f"https://localhost:{server.port}/img.png"
    with opener(("localhost",), ssl_context=ctx).open(url, timeout=5) as r:
        assert r.read() == IMAGE
    assert set(connects) <= {"127.0.0.1", "::1"}
    # The certificate names localhost, not 127.0.0.1: verification uses the URL's host, not the IP.
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        opener(("127.0.0.1",), ssl_context=ctx).open(f"https://127.0.0.1:{server.port}/img.png", timeout=5)
    before = server.connections
    with pytest.raises(urllib.error.URLError) as err:
        opener((), ssl_context=ctx).open(url, timeout=5)
    assert "url_policy:loopback localhost -> 127.0.0.1" in assert_reason(err.value, drops.URL_LOOPBACK)
    assert server.connections == before


def test_https_deadline_and_cap(tls_server):
    server, ctx = tls_server
    with pytest.raises(BodyTooLarge):
        opener(("localhost",), ssl_context=ctx).open(f"https://localhost:{server.port}/big", timeout=5)
    with pytest.raises(DeadlineExceeded):
        with opener(("localhost",), ssl_context=ctx, timeout_s=0.8).open(
                f"https://localhost:{server.port}/trickle", timeout=5) as r:
            r.read()


# -- the worker hook ------------------------------------------------------------------------------
INGEST = IngestConfig(url_policy=UrlPolicyConfig(allow_hosts=("127.0.0.1",)), timeout_s=2.0,
                      max_body_bytes=2**20, max_image_pixels=2**20)


def test_worker_env_contents():
    env = worker_env(INGEST, {"PYTHONPATH": "/a" + os.pathsep + "/b"})
    assert env["PYTHONPATH"] == os.pathsep.join([egress.WORKERBOOT_DIR, "/a", "/b"])
    assert os.listdir(egress.WORKERBOOT_DIR) in (["sitecustomize.py"], ["sitecustomize.py", "__pycache__"],
                                                 ["__pycache__", "sitecustomize.py"])
    assert worker_env(INGEST, {})["PYTHONPATH"] == egress.WORKERBOOT_DIR
    assert env["OPENCV_IO_MAX_IMAGE_PIXELS"] == str(2**20)
    assert env[egress.TAR_FORMAT_ENV] == "gnu"
    assert egress.ray_runtime_env(INGEST)["env_vars"][egress.TAR_FORMAT_ENV] == "gnu"
    spec = json.loads(env[egress.POLICY_ENV])
    assert spec == {"url_policy": {"allowed_schemes": ["http", "https"], "allow_hosts": ["127.0.0.1"],
                                   "max_redirects": 5}, "max_body_bytes": 2**20, "timeout_s": 2.0}


def test_install_from_env(monkeypatch, main_server, recorder):
    monkeypatch.setattr(urllib.request, "_opener", None)
    assert egress.install_from_env({}) is None and urllib.request._opener is None
    installed = egress.install_from_env({egress.POLICY_ENV: worker_env(INGEST, {})[egress.POLICY_ENV]})
    assert urllib.request._opener is installed
    assert urllib.request.urlopen(f"{main_server.base}/img.png").read() == IMAGE
    with pytest.raises(urllib.error.URLError, match="url_policy:loopback"):
        urllib.request.urlopen(f"{recorder.base}/img.png")


def test_set_tar_format_from_env(monkeypatch):
    monkeypatch.setattr(tarfile.TarFile, "format", tarfile.PAX_FORMAT)
    assert egress.set_tar_format_from_env({}) is None and tarfile.TarFile.format == tarfile.PAX_FORMAT
    with pytest.raises(ValueError, match="not one of"):
        egress.set_tar_format_from_env({egress.TAR_FORMAT_ENV: "zip"})
    assert egress.set_tar_format_from_env({egress.TAR_FORMAT_ENV: "gnu"}) == tarfile.GNU_FORMAT
    # what webdataset's writer does: a tarfile opened without a format, members with a float mtime
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w|") as tar:
        for name in ("000000001.jpg", "a" * 120 + ".txt"):  # a long name takes a GNU long-name record
            info = tarfile.TarInfo(name)
            info.size, info.mtime = 3, time.time()
            tar.addfile(info, io.BytesIO(b"abc"))
    buf.seek(0)
    with tarfile.open(fileobj=buf) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["000000001.jpg", "a" * 120 + ".txt"]
        assert not any(m.pax_headers for m in members)
        assert [tar.extractfile(m).read() for m in members] == [b"abc", b"abc"]


def test_ray_worker_setup_installs_the_policy_and_the_tar_format(monkeypatch, main_server, recorder, capsys):
    monkeypatch.setattr(urllib.request, "_opener", None)
    monkeypatch.setattr(tarfile.TarFile, "format", tarfile.PAX_FORMAT)
    for key, value in egress.ray_runtime_env(INGEST)["env_vars"].items():
        monkeypatch.setenv(key, value)
    egress.ray_worker_setup()
    assert tarfile.TarFile.format == tarfile.GNU_FORMAT
    assert urllib.request.urlopen(f"{main_server.base}/img.png").read() == IMAGE
    with pytest.raises(urllib.error.URLError, match="url_policy:loopback"):
        urllib.request.urlopen(f"{recorder.base}/img.png")
    # a format it does not know: the policy is installed all the same, the default format stays, one line says so
    monkeypatch.setattr(urllib.request, "_opener", None)
    monkeypatch.setattr(tarfile.TarFile, "format", tarfile.PAX_FORMAT)
    monkeypatch.setenv(egress.TAR_FORMAT_ENV, "zip")
    egress.ray_worker_setup()
    assert tarfile.TarFile.format == tarfile.PAX_FORMAT and urllib.request._opener is not None
    assert "shard tar format not set" in capsys.readouterr().err
    with pytest.raises(urllib.error.URLError, match="url_policy:loopback"):
        urllib.request.urlopen(f"{recorder.base}/img.png")
    # no policy: every fetch refused
    monkeypatch.delenv(egress.POLICY_ENV)
    egress.ray_worker_setup()
    with pytest.raises(urllib.error.URLError, match="egress policy unavailable"):
        urllib.request.urlopen(f"{main_server.base}/img.png")
    assert recorder.connections == 0


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                          cwd="/")


PROBE = """
import urllib.request
print("OPENER", type(urllib.request._opener).__name__ if urllib.request._opener else None)
try:
    urllib.request.urlopen("http://127.0.0.2:9/x", timeout=2)
except Exception as e:
    print("ERR", e)
"""


TAR_PROBE = """
import tarfile
print("TAR", tarfile.TarFile.format)
"""


def test_sitecustomize_installs_in_a_fresh_interpreter_and_chains(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "sitecustomize.py").write_text("import os\nos.environ['OTHER_SITECUSTOMIZE_RAN'] = '1'\n")
    base = {k: v for k, v in os.environ.items() if k != egress.POLICY_ENV}
    env = {**base, "PYTHONPATH": str(other)}
    env = {**env, **worker_env(INGEST, env)}
    out = _python(PROBE + "import os; print('OTHER', os.environ.get('OTHER_SITECUSTOMIZE_RAN'))" + TAR_PROBE, env)
    assert "ERR <urlopen error url_policy:loopback 127.0.0.2>" in out.stdout, out.stderr
    assert "OPENER OpenerDirector" in out.stdout and "OTHER 1" in out.stdout and out.stderr == ""
    assert f"TAR {tarfile.GNU_FORMAT}" in out.stdout
    out = _python(TAR_PROBE, {**env, egress.TAR_FORMAT_ENV: "zip"})
    assert f"TAR {tarfile.PAX_FORMAT}" in out.stdout and "shard tar format not set" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_sitecustomize_is_silent_without_the_variable_and_fails_closed_on_a_bad_one():
    base = {k: v for k, v in os.environ.items() if k != egress.POLICY_ENV}
    env = {**base, **worker_env(INGEST, base)}
    del env[egress.POLICY_ENV]
    out = _python(PROBE, env)
    assert "OPENER None" in out.stdout and out.stderr == ""
    out = _python(PROBE, {**env, egress.POLICY_ENV: "{not json"})
    assert out.returncode == 0 and "egress policy unavailable" in out.stdout
    assert len(out.stderr.strip().splitlines()) == 1 and "refusing all urllib fetches" in out.stderr


# -- img2dataset end to end -----------------------------------------------------------------------
IMG2DATASET = """
import sys, img2dataset
img2dataset.download(
    url_list=sys.argv[1], input_format="parquet", url_col="url", caption_col="caption",
    output_format="webdataset", output_folder=sys.argv[2], processes_count=2, thread_count=4,
    distributor="multiprocessing", image_size=16, resize_mode="border", number_sample_per_shard=1000,
    timeout=10, retries=0, enable_wandb=False,
)
"""


def run_img2dataset(tmp_path: Path, urls: list[str], extra_env: dict[str, str]):
    import pyarrow as pa
    import pyarrow.parquet as pq

    inputs, out = tmp_path / "urls.parquet", tmp_path / "out"
    pq.write_table(pa.table({"url": urls, "caption": [f"c{i}" for i in range(len(urls))]}), inputs)
    base = {k: v for k, v in os.environ.items()
            if k not in (egress.POLICY_ENV, egress.PIXELS_ENV, egress.TAR_FORMAT_ENV)}
    env = {**base, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled", **extra_env}
    proc = subprocess.run([sys.executable, "-c", IMG2DATASET, str(inputs), str(out)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = pq.read_table(out / "00000.parquet", columns=["url", "status", "error_message"]).to_pylist()
    return {row["url"]: row for row in status}


@pytest.mark.slow
def test_img2dataset_workers_enforce_policy_caps_and_deadline(tmp_path, main_server, recorder):
    m, r = main_server.base, recorder.base
    expected = {
        **{f"{m}/img.png?i={i}": "success" for i in range(3)},
        f"{m}/redirect?to={quote(r + '/img.png')}": drops.URL_LOOPBACK,
        f"{r}/img.png": drops.URL_LOOPBACK,
        f"{m}/bomb.png": drops.PIXEL_CAP,
        f"{m}/big": drops.BODY_TOO_LARGE,
        f"{m}/chunked": drops.BODY_TOO_LARGE,
        f"{m}/trickle": drops.TIMEOUT,
    }
    status = run_img2dataset(tmp_path, list(expected), worker_env(INGEST))
    got = {url: row["status"] if row["status"] == "success" else
           drops.reason_from_img2dataset(row["status"], row["error_message"]) for url, row in status.items()}
    assert got == expected, {u: status[u]["error_message"] for u in status}
    assert recorder.connections == 0 and recorder.requests == []
    # the workers wrote their shard with one plain header a member (3 images x jpg, txt, json)
    assert tar_headers(str(tmp_path / "out" / "*.tar")) == (9, 0)


@pytest.mark.slow
def test_img2dataset_without_worker_env_reaches_127_0_0_2(tmp_path, main_server, recorder):
    """The control: the same download without the hook contacts the server the policy protects."""
    m, r = main_server.base, recorder.base
    urls = [f"{m}/img.png", f"{m}/redirect?to={quote(r + '/img.png')}", f"{r}/img.png"]
    status = run_img2dataset(tmp_path, urls, {})
    assert recorder.connections >= 2 and len(recorder.requests) == 2
    assert {row["status"] for row in status.values()} == {"success"}
    members, pax = tar_headers(str(tmp_path / "out" / "*.tar"))  # webdataset's writer left as it is: PAX
    assert members == pax == 9
