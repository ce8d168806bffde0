"""Which URLs the downloader may contact (stage 1, ingest): the pure part of the egress policy.

A URL is refused for its scheme, for a missing or malformed host, or for an address outside the
public internet (loopback, private, link-local, multicast, carrier-grade NAT, reserved space, and
IPv6 forms that embed such an IPv4 address) unless ``allow_hosts`` exempts it. The checks come in
two strengths:

- ``check_url`` / ``precheck`` read the URL text only (no DNS), so the parent can drop hundreds of
  millions of rows without a lookup;
- ``resolve`` resolves a host name and keeps only the addresses that pass; the download workers
  (``unclip.data.egress``) connect to one of those very addresses, so a second DNS answer cannot
  swap in a private one between the check and the connect.

Refusals raise ``UrlRefused``, an ``OSError`` whose text ``url_policy:<kind> <host>`` parses back to
the ``unclip.drops`` reason code ``url_policy:<kind>``.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:  # the download workers import this module at start-up: keep pydantic out of it
    from unclip.config import UrlPolicyConfig

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[..., list]

# Refusal kinds; "url_policy:<kind>" is the reason code in unclip.drops.
SCHEME = "scheme"
INVALID_URL = "invalid_url"
PRIVATE = "private"
LOOPBACK = "loopback"
LINK_LOCAL = "link_local"
RESERVED = "reserved"
TOO_MANY_REDIRECTS = "too_many_redirects"
KINDS = (SCHEME, INVALID_URL, PRIVATE, LOOPBACK, LINK_LOCAL, RESERVED, TOO_MANY_REDIRECTS)

_PRIVATE_NETS = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
VERDICT_CACHE_SIZE = 65536
# Forms that inet_aton (and so getaddrinfo) reads as IPv4 without DNS: "127.1", "0x7f.1", "2130706433".
_LEGACY_V4 = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}$")


class UrlRefused(OSError):
    """The URL policy refused a URL or address. ``str()`` is ``url_policy:<kind> <detail>``."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"url_policy:{kind} {detail}")
        self.kind = kind
        self.detail = detail

    @property
    def reason(self) -> str:
        """The ``unclip.drops`` reason code."""
        return f"url_policy:{self.kind}"

    def at(self, where: str) -> "UrlRefused":
        """The same refusal with context appended, e.g. ``" (redirect hop 2)"``."""
        return UrlRefused(self.kind, self.detail + where) if where else self


def classify_address(ip: str | IPAddress) -> str | None:
    """``None`` for a public unicast address, else the refusal kind (allow lists aside)."""
    if isinstance(ip, str):
        ip = ipaddress.ip_address(ip)
    if ip.version == 6:
        # IPv6 spellings of an IPv4 address reach that IPv4 address: judge the address they embed.
        if ip.ipv4_mapped is not None:
            return classify_address(ip.ipv4_mapped)
        if ip in _NAT64:
            return classify_address(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip.sixtofour is not None and classify_address(ip.sixtofour) is not None:
            return classify_address(ip.sixtofour)
        if ip.is_site_local:  # deprecated fec0::/10, still routed privately where it exists
            return PRIVATE
    if ip.is_loopback:
        return LOOPBACK
    if ip.is_link_local:  # 169.254/16 holds the cloud metadata services
        return LINK_LOCAL
    if ip.is_unspecified or ip.is_multicast or ip.is_reserved:
        return RESERVED
    if any(ip in net for net in _PRIVATE_NETS if net.version == ip.version):
        return PRIVATE
    if not ip.is_global:  # 100.64/10, 0/8, documentation and benchmarking ranges, 192.0.0/24, ...
        return RESERVED
    return None


def ip_literal(host: str) -> IPAddress | None:
    """The address a URL host denotes without DNS, or None for a name."""
    if ":" not in host and not host[:1].isdigit():  # the common case, a name: skip the parsers
        return None
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _LEGACY_V4.match(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


class UrlPolicy:
    """The URL policy of ``UrlPolicyConfig``; ``resolver`` stands in for ``socket.getaddrinfo``."""

    def __init__(
        self,
        allowed_schemes: Iterable[str] = ("http", "https"),
        allow_hosts: Iterable[str] = (),
        max_redirects: int = 5,
        *,
        resolver: Resolver | None = None,
    ):
        self.allowed_schemes = tuple(s.lower() for s in allowed_schemes)
        self.allow_hosts = tuple(h.strip().lower() for h in allow_hosts)
        self.max_redirects = int(max_redirects)
        self._resolver = resolver
        names, nets = set(), []
        for entry in self.allow_hosts:
            bare = entry.strip("[]")
            try:
                nets.append(ipaddress.ip_network(bare, strict=False))
            except ValueError:
                if "/" in entry:
                    raise ValueError(f"allow_hosts: {entry!r} is not a valid CIDR network") from None
                names.add(entry.rstrip("."))
        self._names = frozenset(names)
        self._nets = tuple(nets)
        # The policy never changes once built, so verdicts on a host's text and on an (address, host)
        # pair are cached per policy: hosts repeat a great deal in image URL lists (CDNs), and the
        # ipaddress checks cost tens of microseconds a request, several percent of a download worker's
        # time (measured, bench/bench_ingest.py). DNS itself is never cached here: every connection
        # resolves afresh and every address it gets is judged (from the cache or not).
        self._make_caches()

    def _make_caches(self) -> None:
        self._host_refusal = functools.lru_cache(maxsize=VERDICT_CACHE_SIZE)(self._host_refusal_uncached)
        self._address_refusal = functools.lru_cache(maxsize=VERDICT_CACHE_SIZE)(self._address_refusal_uncached)

    def __getstate__(self) -> dict:  # the caches stay behind (process and Ray task runners pickle)
        return {k: v for k, v in self.__dict__.items() if k not in ("_host_refusal", "_address_refusal")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._make_caches()

    @classmethod
    def from_config(cls, cfg: "UrlPolicyConfig", *, resolver: Resolver | None = None) -> "UrlPolicy":
        return cls(cfg.allowed_schemes, cfg.allow_hosts, cfg.max_redirects, resolver=resolver)

    def to_dict(self) -> dict:
        """The fields of ``UrlPolicyConfig`` (JSON-able); the resolver is not carried."""
        return {"allowed_schemes": list(self.allowed_schemes), "allow_hosts": list(self.allow_hosts),
                "max_redirects": self.max_redirects}

    def __repr__(self) -> str:
        return f"UrlPolicy({self.to_dict()})"

    # -- checks -------------------------------------------------------------------------------
    def name_allowed(self, host: str) -> bool:
        return host.lower().rstrip(".") in self._names

    def refusal(self, ip: str | IPAddress, host: str | None = None) -> str | None:
        """The refusal kind for connecting to ``ip`` (reached as ``host``), honouring allow_hosts."""
        if isinstance(ip, str):
            ip = ipaddress.ip_address(ip)
        if host is not None and self.name_allowed(host):
            return None
        candidates = [ip]
        if ip.version == 6 and ip.ipv4_mapped is not None:
            candidates.append(ip.ipv4_mapped)
        if any(c in net for c in candidates for net in self._nets if net.version == c.version):
            return None
        return classify_address(ip)

    def check_url(self, url: str) -> None:
        """Refuse ``url`` on its text alone: scheme, host presence and form, IP literals. No DNS."""
        try:
            parts = urlsplit(url)
            host = parts.hostname
            _ = parts.port  # raises ValueError for a malformed or out-of-range port
        except ValueError as err:
            raise UrlRefused(INVALID_URL, f"{err}") from None
        scheme = parts.scheme.lower()
        if scheme not in self.allowed_schemes:
            raise UrlRefused(SCHEME, repr(scheme) if scheme else "(none)")
        if not host:
            raise UrlRefused(INVALID_URL, "(no host)")
        refused = self._host_refusal(host)
        if refused is not None:
            raise UrlRefused(*refused)

    def _host_refusal_uncached(self, host: str) -> tuple[str, str] | None:
        """``(kind, detail)`` when the URL host ``host`` is refused on its text, else None."""
        if any(c.isspace() or ord(c) < 0x20 for c in host):
            return INVALID_URL, repr(host)
        ip = ip_literal(host)
        if ip is not None:
            kind = self.refusal(ip, host)
            if kind is not None:
                legacy = _LEGACY_V4.match(host) and str(ip) != host  # show what "0x7f.1" means
                return kind, f"{host} ({ip})" if legacy else host
        return None

    def _address_refusal_uncached(self, address: str, host: str) -> str | None:
        return self.refusal(ipaddress.ip_address(address), host)

    def precheck(self, url: str) -> tuple[str, str] | None:
        """``None`` when the URL text passes, else ``(reason code, message)`` for the drop table."""
        try:
            self.check_url(url)
        except UrlRefused as err:
            return err.reason, str(err)
        return None

    def resolve(self, host: str, port: int) -> list[tuple[int, tuple]]:
        """Resolve ``host`` and return the ``(family, sockaddr)`` pairs that may be connected to.

        Raises ``UrlRefused`` when every address is refused (naming the first), and lets the
        resolver's ``socket.gaierror`` through when the name does not resolve.
        """
        # Looked up at call time, so that patching socket.getaddrinfo reaches a default policy too.
        resolver = self._resolver or socket.getaddrinfo
        infos = resolver(host, port, 0, socket.SOCK_STREAM)
        allowed: list[tuple[int, tuple]] = []
        refused: list[tuple[str, str]] = []
        for family, _type, _proto, _canon, sockaddr in infos:
            if family not in (socket.AF_INET, socket.AF_INET6):
                continue
            # getaddrinfo writes addresses canonically (no zone id without a scope): the text is the key
            kind = self._address_refusal(sockaddr[0], host)
            if kind is not None:
                refused.append((kind, str(ipaddress.ip_address(sockaddr[0]))))
            elif (family, sockaddr) not in allowed:
                allowed.append((family, sockaddr))
        if allowed:
            return allowed
        if refused:
            kind, addr = refused[0]
            raise UrlRefused(kind, addr if addr == host else f"{host} -> {addr}")
        raise socket.gaierror(socket.EAI_NONAME, f"no IPv4/IPv6 address for {host!r}")
