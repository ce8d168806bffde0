"""The URL policy on its own: URL text, address classes, allow lists, and resolution (fake DNS at
``getaddrinfo``, plus the real ``localhost``)."""

from __future__ import annotations

import socket

import pytest

from unclip import drops
from unclip.config import UrlPolicyConfig
from unclip.data.url_policy import KINDS, UrlPolicy, UrlRefused, classify_address


def fake_dns(table: dict[str, list[str]]):
    """A getaddrinfo stand-in answering from ``table``; unknown names fail like real DNS."""
    calls: list[str] = []

    def resolver(host, port, family=0, type=0, proto=0, flags=0):
        calls.append(host)
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        out = []
        for addr in table[host]:
            if ":" in addr:
                out.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (addr, port, 0, 0)))
            else:
                out.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (addr, port)))
        return out

    resolver.calls = calls
    return resolver


def refusal_kind(policy: UrlPolicy, url: str) -> str | None:
    try:
        policy.check_url(url)
    except UrlRefused as err:
        assert drops.reason_from_img2dataset("failed_to_download", str(err)) == err.reason
        return err.kind
    return None


@pytest.mark.parametrize("url", ["http://example.com/a.jpg", "https://example.com/a.jpg", "HTTP://Example.COM:8080/x",
                                 "http://8.8.8.8/x.png", "http://[2606:4700::1]/x.png"])
def test_public_http_urls_pass(url):
    assert refusal_kind(UrlPolicy(), url) is None
    assert UrlPolicy().precheck(url) is None


@pytest.mark.parametrize("url", ["ftp://example.com/a.jpg", "file:///etc/passwd", "data:image/png;base64,AAAA",
                                 "gopher://example.com/", "example.com/a.jpg", "javascript:alert(1)"])
def test_other_schemes_refused(url):
    assert refusal_kind(UrlPolicy(), url) == "scheme"


def test_allowed_schemes_narrow_to_https():
    policy = UrlPolicy.from_config(UrlPolicyConfig(allowed_schemes=("https",)))
    assert refusal_kind(policy, "http://example.com/") == "scheme"
    assert refusal_kind(policy, "https://example.com/") is None


@pytest.mark.parametrize("url", ["http:///x.jpg", "http://", "https://:80/x", "http://[::1/x", "http://host:99999/",
                                 "http://host:port/"])
def test_hostless_or_malformed_urls_refused(url):
    assert refusal_kind(UrlPolicy(), url) == "invalid_url"


@pytest.mark.parametrize(
    "host, kind",
    [
        ("127.0.0.1", "loopback"), ("127.0.0.2", "loopback"), ("[::1]", "loopback"),
        ("[::ffff:127.0.0.1]", "loopback"), ("127.1", "loopback"), ("0x7f.1", "loopback"), ("2130706433", "loopback"),
        ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"), ("[fc00::1]", "private"),
        ("[fd12:3456::1]", "private"), ("[::ffff:10.0.0.1]", "private"), ("[64:ff9b::a00:1]", "private"),
        ("169.254.169.254", "link_local"), ("[fe80::1]", "link_local"), ("[::ffff:169.254.169.254]", "link_local"),
        ("0.0.0.0", "reserved"), ("[::]", "reserved"), ("224.0.0.1", "reserved"), ("[ff02::1]", "reserved"),
        ("100.64.0.1", "reserved"), ("255.255.255.255", "reserved"), ("240.0.0.1", "reserved"),
        ("192.0.2.1", "reserved"), ("[2001:db8::1]", "reserved"), ("[2002:7f00:1::]", "loopback"),
    ],
)
def test_ip_literals_refused_by_class(host, kind):
    assert refusal_kind(UrlPolicy(), f"http://{host}/img.png") == kind
    reason, message = UrlPolicy().precheck(f"http://{host}/img.png")
    assert reason == f"url_policy:{kind}" and message.startswith(reason)
    assert drops.reason_from_img2dataset("failed_to_download", message) == reason


def test_every_kind_is_a_drop_reason():
    codes = {getattr(drops, name) for name in dir(drops) if name.startswith("URL_")}
    assert {f"url_policy:{k}" for k in KINDS} == codes


@pytest.mark.parametrize("ip", ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"])
def test_classify_public(ip):
    assert classify_address(ip) is None


def test_refusal_text_names_the_host():
    with pytest.raises(UrlRefused) as err:
        UrlPolicy().check_url("http://0x7f.1/x")
    assert str(err.value) == "url_policy:loopback 0x7f.1 (127.0.0.1)"
    assert isinstance(err.value, OSError)  # so urllib wraps it in URLError like any connect error


def test_allow_hosts_by_name_ip_and_cidr():
    policy = UrlPolicy(allow_hosts=("Images.Internal", "127.0.0.1", "10.0.0.0/8", "::1"))
    assert refusal_kind(policy, "http://127.0.0.1:8000/x") is None
    assert refusal_kind(policy, "http://127.0.0.2/x") == "loopback"
    assert refusal_kind(policy, "http://10.20.30.40/x") is None
    assert refusal_kind(policy, "http://[::ffff:10.0.0.1]/x") is None  # the mapped IPv4 address matches
    assert refusal_kind(policy, "http://[::1]/x") is None
    assert refusal_kind(policy, "http://192.168.0.1/x") == "private"
    assert policy.refusal("192.168.0.1", host="IMAGES.internal.") is None  # names match case-insensitively


def test_bad_cidr_rejected():
    with pytest.raises(ValueError, match="CIDR"):
        UrlPolicy(allow_hosts=("10.0.0.0/99",))


def test_name_resolving_to_private_refused():
    dns = fake_dns({"cdn.example": ["10.0.0.7"]})
    policy = UrlPolicy(resolver=dns)
    assert policy.precheck("http://cdn.example/x.jpg") is None  # text only: no lookup in the parent
    assert dns.calls == []
    with pytest.raises(UrlRefused) as err:
        policy.resolve("cdn.example", 80)
    assert str(err.value) == "url_policy:private cdn.example -> 10.0.0.7"


def test_name_resolving_to_private_and_public_keeps_only_public():
    dns = fake_dns({"mixed.example": ["169.254.169.254", "93.184.216.34", "fd00::5", "2606:2800::1"]})
    addrs = UrlPolicy(resolver=dns).resolve("mixed.example", 443)
    assert addrs == [(socket.AF_INET, ("93.184.216.34", 443)), (socket.AF_INET6, ("2606:2800::1", 443, 0, 0))]


def test_allow_hosts_name_exempts_every_address():
    dns = fake_dns({"minio.internal": ["10.1.1.1", "10.1.1.2"]})
    assert len(UrlPolicy(allow_hosts=("minio.internal",), resolver=dns).resolve("minio.internal", 9000)) == 2
    assert UrlPolicy(allow_hosts=("10.1.1.2/32",), resolver=dns).resolve("minio.internal", 9000) == [
        (socket.AF_INET, ("10.1.1.2", 9000))]


def test_dns_failure_is_a_gaierror_not_a_refusal():
    with pytest.raises(socket.gaierror) as err:
        UrlPolicy(resolver=fake_dns({})).resolve("nope.example", 80)
    assert not isinstance(err.value, UrlRefused)
    assert drops.reason_from_img2dataset("failed_to_download", f"<urlopen error {err.value}>") == drops.DNS_ERROR


def test_real_localhost_resolution():
    with pytest.raises(UrlRefused) as err:
        UrlPolicy().resolve("localhost", 80)
    assert err.value.kind == "loopback"
    for allow in (("127.0.0.1", "::1"), ("localhost",), ("LOCALHOST",)):
        addrs = UrlPolicy(allow_hosts=allow).resolve("localhost", 80)
        assert addrs and all(sockaddr[0] in ("127.0.0.1", "::1") for _, sockaddr in addrs)


def test_from_config_round_trip():
    cfg = UrlPolicyConfig(allow_hosts=("127.0.0.1", "Foo.Example"), max_redirects=2)
    policy = UrlPolicy.from_config(cfg)
    assert policy.to_dict() == {"allowed_schemes": ["http", "https"], "allow_hosts": ["127.0.0.1", "foo.example"],
                                "max_redirects": 2}
    assert UrlPolicyConfig(**policy.to_dict()) == cfg


def test_cached_verdicts_never_cache_dns():
    """Verdicts are cached per host text and per (address, host), never the lookup: a name that
    answers with a public address first and a private one later (DNS rebinding) is refused the
    second time, and the same literal is judged the same every time."""
    table = {"rebind.example": ["93.184.216.34"]}
    dns = fake_dns(table)
    policy = UrlPolicy(resolver=dns)
    assert policy.resolve("rebind.example", 80) == [(socket.AF_INET, ("93.184.216.34", 80))]
    table["rebind.example"] = ["127.0.0.1"]
    with pytest.raises(UrlRefused, match="loopback rebind.example -> 127.0.0.1"):
        policy.resolve("rebind.example", 80)
    assert dns.calls == ["rebind.example", "rebind.example"]
    for _ in range(3):
        assert refusal_kind(policy, "http://127.0.0.1/x.jpg") == "loopback"
        assert refusal_kind(policy, "http://0x7f.1/x.jpg") == "loopback"
        assert refusal_kind(policy, "http://8.8.8.8/x.jpg") is None
    # The cache is per policy: another policy's allow list is not consulted.
    assert refusal_kind(UrlPolicy(allow_hosts=("127.0.0.1",)), "http://127.0.0.1/x.jpg") is None
    assert refusal_kind(policy, "http://127.0.0.1/x.jpg") == "loopback"


def test_policy_pickles_without_its_caches():
    import pickle

    policy = UrlPolicy(allow_hosts=("10.0.0.0/8",))
    assert refusal_kind(policy, "http://10.1.2.3/x.jpg") is None
    copy = pickle.loads(pickle.dumps(policy))
    assert copy.to_dict() == policy.to_dict()
    assert refusal_kind(copy, "http://10.1.2.3/x.jpg") is None
    assert refusal_kind(copy, "http://192.168.0.1/x.jpg") == "private"
