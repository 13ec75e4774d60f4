"""Image sources for chat requests: data: URLs, and http(s) URLs with SSRF protection.

http(s) images are fetched only from hosts listed in --allowed-media-domains (default: none).
Every address the host resolves to must be public (no private, loopback, link-local,
multicast or reserved ranges), and the connection goes to the address that was checked (the
Host header and TLS SNI carry the name), so DNS cannot swap in another address between the
check and the connect. Redirects are followed by hand, only to the same host, a few times.
The body is streamed with a byte cap and the whole fetch has a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import httpx

from server.model.images import ImageError

MAX_REDIRECTS = 3


@dataclass(frozen=True)
class MediaPolicy:
    allowed_domains: frozenset[str] = field(default_factory=frozenset)
    timeout: float = 10.0
    max_bytes: int = 20 * 1024 * 1024
    allow_private_addresses: bool = False  # tests only: lets a fetch reach a local test server


def url_scheme(url: str) -> str:
    head = url[:16].lower()
    return head.split(":", 1)[0] if ":" in head else ""


def _host_of(url: str) -> tuple[str, str, int]:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ImageError(f"malformed image URL: {e}") from e
    if parts.scheme not in ("http", "https"):
        raise ImageError(f"image URL scheme {parts.scheme!r} is not allowed (use data: or https:)")
    if parts.username is not None or parts.password is not None:
        raise ImageError("image URLs must not carry credentials")
    host = (parts.hostname or "").rstrip(".").lower()
    if not host:
        raise ImageError("image URL has no host")
    return parts.scheme, host, port or (443 if parts.scheme == "https" else 80)


def _check_address(addr: str, policy: MediaPolicy) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if policy.allow_private_addresses:
        return ip
    if not ip.is_global or ip.is_multicast:
        raise ImageError("image URL points to a private, loopback, link-local or reserved address; refused")
    return ip


async def _resolve(
    host: str, port: int, policy: MediaPolicy
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address to connect to; every address of the host must pass the check."""
    try:
        return _check_address(host, policy)  # an IP literal
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise ImageError(f"cannot resolve image host {host!r}") from e
    ips = [_check_address(str(info[4][0]), policy) for info in infos]
    if not ips:
        raise ImageError(f"cannot resolve image host {host!r}")
    return ips[0]


def check_allowed(url: str, policy: MediaPolicy) -> None:
    """Cheap checks that need no network: scheme, credentials, allow-list, IP literals."""
    _, host, _ = _host_of(url)
    if host not in policy.allowed_domains:
        raise ImageError(
            f"fetching images from {host!r} is not allowed (the server allows: "
            f"{', '.join(sorted(policy.allowed_domains)) or 'no hosts; send images as data: URLs'})"
        )
    with contextlib.suppress(ValueError):  # ValueError: a name, resolved and checked at fetch time
        _check_address(host, policy)


async def fetch_image(url: str, policy: MediaPolicy, client: httpx.AsyncClient) -> bytes:
    """Fetch an allowed http(s) image; ImageError (HTTP 400) for anything refused or failed."""
    check_allowed(url, policy)
    try:
        return await asyncio.wait_for(_fetch(url, policy, client), policy.timeout)
    except asyncio.TimeoutError:
        raise ImageError(f"fetching the image took longer than {policy.timeout:g} s") from None
    except httpx.HTTPError as e:
        raise ImageError(f"fetching the image failed: {type(e).__name__}") from None


async def _fetch(url: str, policy: MediaPolicy, client: httpx.AsyncClient) -> bytes:
    scheme, host, port = _host_of(url)
    for _ in range(MAX_REDIRECTS + 1):
        ip = await _resolve(host, port, policy)
        parts = urlsplit(url)
        netloc_ip = f"[{ip}]" if ip.version == 6 else str(ip)
        pinned = parts._replace(netloc=f"{netloc_ip}:{port}").geturl()
        default_port = port == (443 if scheme == "https" else 80)
        headers = {"Host": host if default_port else f"{host}:{port}", "Accept": "image/*"}
        extensions = {"sni_hostname": host} if scheme == "https" else {}
        request = client.build_request("GET", pinned, headers=headers, extensions=extensions)
        response = await client.send(request, stream=True, follow_redirects=False)
        try:
            if response.is_redirect:
                location = response.headers.get("location", "")
                url = urljoin(url, location)
                new_scheme, new_host, new_port = _host_of(url)
                if new_host != host:
                    raise ImageError(f"image URL redirects to another host ({new_host!r}); refused")
                scheme, port = new_scheme, new_port
                continue
            if response.status_code != 200:
                raise ImageError(f"fetching the image failed: HTTP {response.status_code}")
            return await _read_capped(response, policy.max_bytes)
        finally:
            await response.aclose()
    raise ImageError(f"image URL redirects more than {MAX_REDIRECTS} times")


async def _read_capped(response: httpx.Response, max_bytes: int) -> bytes:
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise ImageError(f"image is too large: {declared} bytes, the limit is {max_bytes}")
    data = bytearray()
    async for chunk in response.aiter_bytes():
        data += chunk
        if len(data) > max_bytes:
            raise ImageError(f"image is too large: more than {max_bytes} bytes")
    if not data:
        raise ImageError("the image URL returned no data")
    return bytes(data)


def new_http_client(policy: MediaPolicy) -> httpx.AsyncClient:
    # trust_env=False: no proxy or netrc from the environment may redirect image fetches
    return httpx.AsyncClient(timeout=httpx.Timeout(policy.timeout), follow_redirects=False, trust_env=False)
