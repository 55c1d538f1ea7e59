"""Fetching an http(s) image_url for `vlm serve --allow-remote-images`.

One GET with limits: http and https only (redirects included), at most MAX_REDIRECTS redirects, one
deadline for the whole fetch (connect, headers, body), a byte cap (the server's --max-body), and
the bytes sniffed as an image before a worker sees them (the worker then decodes them with the
pixel cap, as any image). urllib from the standard library does this in a few lines, so the serve
extra needs no HTTP client; the route runs it in a thread, off the event loop.
"""

from __future__ import annotations

import http.client
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from vlmcli.image_magic import HEAD_BYTES, is_image_header

MAX_REDIRECTS = 3
FETCH_TIMEOUT = 15.0  # seconds for the whole fetch
SCHEMES = ("http", "https")
_CHUNK = 64 * 1024


class FetchError(Exception):
    """The image could not be fetched or is not acceptable; `code` is the OpenAI error code."""

    def __init__(self, message: str, code: str = "invalid_image_url"):
        super().__init__(message)
        self.message, self.code = message, code


class _Redirects(urllib.request.HTTPRedirectHandler):
    max_redirections = MAX_REDIRECTS

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        # urllib would also follow ftp:// redirects.
        if urllib.parse.urlsplit(newurl).scheme.lower() not in SCHEMES:
            raise FetchError("the image URL redirects to a URL that is not http(s)", "remote_image_refused")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener() -> urllib.request.OpenerDirector:
    """Only the handlers an http(s) GET needs: no file:, ftp: or data: handlers to redirect into."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(),
        _Redirects(),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


def fetch_image(url: str, max_bytes: int, timeout: float = FETCH_TIMEOUT) -> bytes:
    """The image at `url`; raises FetchError with the reason (and an OpenAI error code)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in SCHEMES or not parts.hostname:
        raise FetchError("remote image URLs must be http:// or https:// with a host", "remote_image_refused")
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(url, headers={"User-Agent": "vlmcli-serve", "Accept": "image/*"})
    try:
        with _opener().open(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise FetchError(
                    f"the remote image is {int(length):,} bytes, over {max_bytes:,} (vlm serve --max-body)",
                    "image_too_large",
                )
            data = _read_capped(response, max_bytes, deadline, timeout)
    except FetchError:
        raise
    except urllib.error.HTTPError as e:
        if 300 <= e.code < 400:  # urllib gave up following them
            raise FetchError(
                f"fetching the image URL failed: more than {MAX_REDIRECTS} redirects (HTTP {e.code})"
            ) from None
        raise FetchError(f"fetching the image URL failed: HTTP {e.code} {e.reason}") from None
    except TimeoutError:
        raise FetchError(f"fetching the image URL took more than {timeout:g} s") from None
    except urllib.error.URLError as e:
        raise FetchError(f"fetching the image URL failed: {e.reason}") from None
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise FetchError(f"fetching the image URL failed: {type(e).__name__}: {e}") from None
    if not is_image_header(data[:HEAD_BYTES]):
        raise FetchError("the image URL's content is not an image (JPEG, PNG, WebP, GIF, BMP or TIFF)", "invalid_image")
    return data


def _read_capped(response: Any, max_bytes: int, deadline: float, timeout: float) -> bytes:
    """The body, refused past max_bytes or the deadline. The socket timeout bounds each read, not the
    whole (a server trickling bytes would hold the fetch forever), so read1 returns what one read
    got and the deadline is checked between reads."""
    chunks: list[bytes] = []
    size = 0
    while True:
        if time.monotonic() > deadline:
            raise FetchError(f"fetching the image URL took more than {timeout:g} s")
        chunk = response.read1(min(_CHUNK, max_bytes + 1 - size))
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > max_bytes:
            raise FetchError(f"the remote image is over {max_bytes:,} bytes (vlm serve --max-body)", "image_too_large")
        chunks.append(chunk)
