"""Dropped rows: one schema, one vocabulary of reasons, for every stage.

Every input row ends either in the final embeddings Parquet or in exactly one drop record under
``DIR/drops/<stage>/...``. A reason is a short stable code (``http_404``, ``url_policy:private``,
``duplicate_exact``...) that tables can count; ``detail`` keeps the raw message (the downloader's
error text, the measured size, the duplicate's uid) for whoever debugs a single row.
"""

from __future__ import annotations

import re

import pyarrow as pa

DROP_SCHEMA = pa.schema(
    [
        pa.field("uid", pa.string()),  # the input row's identity: "<source>/<partition>/<row>"
        pa.field("url", pa.string()),
        pa.field("source", pa.string()),
        pa.field("stage", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),
    ]
)

# ingest: refused by the URL policy before or while connecting (never contacted)
URL_SCHEME = "url_policy:scheme"
URL_INVALID = "url_policy:invalid_url"
URL_PRIVATE = "url_policy:private"
URL_LOOPBACK = "url_policy:loopback"
URL_LINK_LOCAL = "url_policy:link_local"
URL_RESERVED = "url_policy:reserved"  # multicast, unspecified, carrier-grade NAT, other non-global space
URL_REDIRECTS = "url_policy:too_many_redirects"
# ingest: the fetch itself
TIMEOUT = "timeout"
BODY_TOO_LARGE = "body_too_large"
OPT_OUT = "opt_out"
DNS_ERROR = "dns_error"
CONNECTION_ERROR = "connection_error"
DOWNLOAD_ERROR = "download_error"
# ingest: decoding / resizing (img2dataset's resizer)
DECODE_ERROR = "decode_error"
PIXEL_CAP = "pixel_cap"
RESIZE_ERROR = "resize_error"
# basic filter
MIN_SIDE = "min_side"
ASPECT_RATIO = "aspect_ratio"
CAPTION_EMPTY = "caption_empty"
CAPTION_TOO_SHORT = "caption_too_short"
CAPTION_TOO_LONG = "caption_too_long"
DUPLICATE_EXACT = "duplicate_exact"
# semantic filter
CLIP_SCORE = "clip_score"
NEAR_DUPLICATE = "near_duplicate"

_POLICY = re.compile(r"url_policy:([a-z_]+)")
_HTTP = re.compile(r"HTTP Error (\d{3})")


def reason_from_img2dataset(status: str, error_message: str | None) -> str:
    """Map one img2dataset status-table row to a reason code.

    img2dataset stores ``str(exception)`` of whatever urllib or OpenCV raised, so the mapping reads
    those texts; the egress layer (``unclip.data.egress``) words its own refusals so that they parse
    here unambiguously.
    """
    msg = error_message or ""
    m = _POLICY.search(msg)
    if m:
        return f"url_policy:{m.group(1)}"
    if "body_too_large" in msg:
        return BODY_TOO_LARGE
    if "deadline_exceeded" in msg or "timed out" in msg.lower():
        return TIMEOUT
    if "X-Robots-Tag" in msg:
        return OPT_OUT
    m = _HTTP.search(msg)
    if m:
        return f"http_{m.group(1)}"
    if status == "failed_to_resize":
        if "CV_IO_MAX_IMAGE_PIXELS" in msg or "image area too large" in msg:
            return PIXEL_CAP
        if "decoding error" in msg.lower() or "imdecode" in msg:
            return DECODE_ERROR
        return RESIZE_ERROR
    low = msg.lower()
    if "name or service not known" in low or "nodename nor servname" in low or "temporary failure in name" in low:
        return DNS_ERROR
    if "connection refused" in low or "connection reset" in low or "remote end closed" in low:
        return CONNECTION_ERROR
    return DOWNLOAD_ERROR


def drop_table(rows: dict[str, list]) -> pa.Table:
    """Build a drop table from column lists (missing ``detail`` is filled with nulls)."""
    n = len(rows["uid"])
    cols = {f.name: rows.get(f.name, [None] * n) for f in DROP_SCHEMA}
    return pa.table(cols, schema=DROP_SCHEMA)


def empty_drop_table() -> pa.Table:
    return DROP_SCHEMA.empty_table()
