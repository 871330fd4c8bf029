"""Remote rasters: URLs GDAL reads in place (``https://``, ``s3://``, ``gs://``, ``/vsi...``).

A remote raster is opened by GDAL through its network file systems (``/vsicurl/``, ``/vsis3/``,
``/vsigs/``...), which fetch only the byte ranges a read needs: the header, then the blocks under the
windows that become tiles (a cloud-optimised GeoTIFF's tiles, by HTTP range requests).

* :func:`is_remote`, :func:`gdal_path`: which paths are URLs, and the GDAL path each opens as.
* :func:`remote_env`: GDAL's HTTP settings while a remote raster is opened and while each window of it
  is read (:class:`gfm.shards.readers.RasterReader`). :data:`HTTP_DEFAULTS` are used for the settings
  the environment leaves unset; any ``GDAL_*``/``CPL_*`` environment variable wins.
* :func:`redact`: credentials never leave the process. ``user:pass@`` and the values of query
  parameters that carry secrets (``X-Amz-Signature``, ``sig``, ``token``...) are replaced by ``***`` in
  every URL gfm writes (``build.json``, tile ``meta.json``) or prints (notices, errors). Credentials
  themselves come from the environment only (``AWS_*``, ``GOOGLE_*``, ``GDAL_HTTP_*``...), read by GDAL.
* :func:`remote_fingerprint`: a URL has no modification time; its fingerprint is the HTTP validators
  (``ETag``, ``Last-Modified``, ``Content-Length`` of a ``HEAD`` request, for ``http(s)`` URLs) plus
  what GDAL reads from its header (size, bands, georeference, block layout and each block's byte count).
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import os
import re
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from gfm.shards.fingerprint import Fingerprint

#: URL schemes and GDAL virtual file system prefixes read in place (never a local file).
_SCHEMES = ("http://", "https://", "s3://", "gs://", "az://", "azure://", "oss://")
_VSI = "/vsi"
# scheme → GDAL virtual file system (http(s) go through /vsicurl/ with the URL kept whole)
_TO_VSI = {"s3://": "/vsis3/", "gs://": "/vsigs/", "az://": "/vsiaz/", "azure://": "/vsiaz/", "oss://": "/vsioss/"}

#: GDAL HTTP settings used when neither the environment nor an enclosing ``rasterio.Env`` sets them.
HTTP_DEFAULTS: dict[str, str] = {
    "GDAL_HTTP_MAX_RETRY": "3",  # retries of a failed request (HTTP 429/5xx, dropped connections)
    "GDAL_HTTP_RETRY_DELAY": "1",  # seconds before the first retry (doubling after)
    "GDAL_HTTP_TIMEOUT": "60",  # seconds for one request
    "GDAL_HTTP_CONNECTTIMEOUT": "15",  # seconds to connect
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",  # never list a bucket "folder" to look for side-car files
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",  # one request for adjacent blocks
    "GDAL_HTTP_MULTIPLEX": "YES",  # HTTP/2 multiplexing where the server offers it
}
# CPL_VSIL_CURL_ALLOWED_EXTENSIONS is not defaulted: signed URLs without a file extension would be refused.

# query parameters whose values are secrets (AWS/GCS signed URLs, Azure SAS, bearer tokens, API keys)
_SECRET_PARAM = re.compile(
    r"(?i)([?&](?:[\w.\-]*(?:signature|credential|token|secret|password|passwd|apikey|api_key|key|auth)[\w.\-]*"
    r"|sig|se|st|sp|sv|code))=([^&#\s'\"]*)"
)
_USERINFO = re.compile(r"(?i)\b((?:https?|s3|gs|az|azure|oss|ftp)://)[^/@\s'\"]+@")


def is_remote(path: str) -> bool:
    """Whether ``path`` is a URL or GDAL virtual path read in place, not a file on the local disk."""
    return path.startswith(_VSI) or path.lower().startswith(_SCHEMES)


def gdal_path(path: str) -> str:
    """The path GDAL opens for ``path``: ``s3://b/k`` → ``/vsis3/b/k``, ``https://h/x`` → ``/vsicurl/https://h/x``.

    Local paths and ``/vsi...`` paths are returned as they are.
    """
    lower = path.lower()
    for scheme, vsi in _TO_VSI.items():
        if lower.startswith(scheme):
            return vsi + path[len(scheme):]
    if lower.startswith(("http://", "https://")):
        return "/vsicurl/" + path
    return path


def redact(text: str) -> str:
    """``text`` with URL credentials replaced by ``***``: ``user:pass@`` and secret query values."""
    text = _USERINFO.sub(r"\1***@", text)
    return _SECRET_PARAM.sub(r"\1=***", text)


def name_of(path: str) -> str:
    """The file name of a path or URL, without query string (``.../T33UUU_B02.tif?sig=..`` → ``T33UUU_B02.tif``)."""
    if is_remote(path):
        inner = path
        while inner.startswith(_VSI):  # /vsicurl/https://h/x.tif, /vsizip//vsicurl/...
            inner = inner.split("/", 2)[2] if inner.count("/") >= 2 else ""
        if "://" in inner:
            inner = urlsplit(inner).path
        return inner.rstrip("/").rsplit("/", 1)[-1]
    return os.path.basename(path)


def http_options() -> dict[str, str]:
    """:data:`HTTP_DEFAULTS` less the settings given in the environment (which GDAL then reads itself)."""
    return {k: v for k, v in HTTP_DEFAULTS.items() if k not in os.environ}


@contextmanager
def remote_env() -> Iterator[None]:
    """GDAL's HTTP settings (:func:`http_options`) for opening and reading remote rasters inside."""
    import rasterio

    with rasterio.Env(**http_options()):
        yield


def _http_validators(url: str) -> dict[str, str]:
    """``ETag``, ``Last-Modified`` and ``Content-Length`` of a ``HEAD`` request; {} when it fails."""
    parts = urlsplit(url)
    headers = {}
    if parts.username is not None:  # user:pass@ in the URL: send it as HTTP basic auth, as curl does
        import base64

        token = f"{parts.username}:{parts.password or ''}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(token).decode()
        netloc = parts.hostname or ""
        if parts.port is not None:
            netloc += f":{parts.port}"
        url = parts._replace(netloc=netloc).geturl()
    timeout = float(os.environ.get("GDAL_HTTP_TIMEOUT", HTTP_DEFAULTS["GDAL_HTTP_TIMEOUT"]))
    try:
        req = urllib.request.Request(url, method="HEAD", headers=headers)
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 (http(s) only, checked by the caller)
            return {k: r.headers[k] for k in ("ETag", "Last-Modified", "Content-Length") if r.headers.get(k)}
    except Exception:  # signed URLs refuse HEAD, some servers don't answer it: GDAL's view alone then
        return {}


def _header_view(ds: Any) -> dict[str, Any]:
    """What GDAL read from a raster's header: shape, types, georeference, tags, and block byte counts."""
    view: dict[str, Any] = {
        "driver": ds.driver, "size": [ds.width, ds.height, ds.count], "dtypes": list(ds.dtypes),
        "nodata": ds.nodata, "transform": list(ds.transform)[:6], "crs": ds.crs.to_wkt() if ds.crs else None,
        "blocks": [list(b) for b in ds.block_shapes], "descriptions": list(ds.descriptions), "tags": ds.tags(),
        "overviews": ds.overviews(1) if ds.count else [],
    }
    if ds.driver == "GTiff" and ds.count:
        # every block's byte count (from the tile index in the header): compressed content changes show here
        bh, bw = ds.block_shapes[0]
        rows, cols = -(-ds.height // bh), -(-ds.width // bw)
        if rows * cols <= 65_536:
            view["block_bytes"] = [ds.get_tag_item(f"BLOCK_SIZE_{c}_{r}", "TIFF", bidx=1)
                                   for r in range(rows) for c in range(cols)]
    return view


def remote_fingerprint(path: str, ds: Any) -> Fingerprint:
    """The fingerprint of a remote raster (see the module docstring), ``ds`` being it opened by rasterio.

    ``size`` and ``mtime_ns`` are the HTTP ``Content-Length`` and ``Last-Modified`` (0 when not known);
    ``sha256`` covers them, the ``ETag`` and GDAL's header view; ``full`` is True (the hash covers all that
    is compared).
    """
    validators = _http_validators(path) if path.lower().startswith(("http://", "https://")) else {}
    size = int(validators.get("Content-Length", 0) or 0)
    mtime_ns = 0
    if "Last-Modified" in validators:
        try:
            mtime_ns = int(email.utils.parsedate_to_datetime(validators["Last-Modified"]).timestamp()) * 10**9
        except (TypeError, ValueError):
            pass
    doc = {"http": validators, "gdal": _header_view(ds)}
    digest = hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()
    return Fingerprint(size, mtime_ns, digest, True)
