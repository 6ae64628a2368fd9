"""An in-memory Google Cloud Storage for tests: gs:// workdirs without a network.

One HTTP server on 127.0.0.1 answers, from one in-memory store, every client this project uses
for gs:// paths:

* TensorStore (Orbax's array writes) through `TENSORSTORE_GCS_HTTP_URL`, in plain HTTP;
* TensorFlow's GCS filesystem (`tf.io.gfile`: etils.epath's gs:// backend when TensorFlow is
  installed, and the TensorBoard writer), whose endpoints are fixed to https://www.googleapis.com
  and https://storage.googleapis.com: it reaches this server as its `https_proxy`, which accepts
  the CONNECT and serves the tunnel in TLS with a certificate from a throwaway CA
  (`CURL_CA_BUNDLE`);
* the GCE metadata server (`GCE_METADATA_ROOT`), which hands TensorStore a dummy token.

* google-cloud-storage (Orbax's bucket lookup) through `STORAGE_EMULATOR_HOST`, anonymously.

It implements the part of the JSON API (and the XML API's object GET) that these clients call:
bucket and object metadata, media reads with ranges, listings with prefix/delimiter/offsets,
media and resumable uploads with generation preconditions, rewrite and delete. Any other request
answers 501 and is kept in `unhandled`, which a test asserts empty. `env()` gives a subprocess
the variables that point it here; FAKE_GCS_TRACE=1 prints every request.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import itertools
import json
import os
import ssl
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import trustme

TLS_HOSTS = ("www.googleapis.com", "storage.googleapis.com", "oauth2.googleapis.com")


@dataclass
class _Object:
    data: bytes
    generation: int
    content_type: str = "application/octet-stream"
    updated: str = field(
        default_factory=lambda: datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    )


class FakeGcs:
    """The store and its server; `with FakeGcs(tmp_dir) as gcs:` starts and stops it."""

    def __init__(self, tls_dir: str | os.PathLike):
        self.objects: dict[tuple[str, str], _Object] = {}
        self.uploads: dict[str, dict] = {}
        self.unhandled: list[str] = []
        self.lock = threading.Lock()
        self._generations = itertools.count(1_000_001)
        ca = trustme.CA()
        self.ca_bundle = Path(tls_dir) / "fake_gcs_ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_bundle))
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert(*TLS_HOSTS).configure_cert(self.tls)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.gcs = self
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeGcs:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def env(self, config_dir: str | os.PathLike) -> dict[str, str]:
        """Variables that send a process's gs:// traffic here (and nowhere else: no real credentials)."""
        return {
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            "STORAGE_EMULATOR_HOST": self.url,  # google-cloud-storage (Orbax's bucket lookups): anonymous
            "GCE_METADATA_ROOT": self.url.removeprefix("http://"),
            "https_proxy": self.url,
            "HTTPS_PROXY": self.url,
            "no_proxy": "127.0.0.1,localhost",
            "NO_PROXY": "127.0.0.1,localhost",
            "CURL_CA_BUNDLE": str(self.ca_bundle),
            "NO_GCE_CHECK": "true",  # TensorFlow: an empty bearer token, no metadata server probe
            "CLOUDSDK_CONFIG": str(config_dir),  # an empty gcloud config: no user credentials
            "GOOGLE_APPLICATION_CREDENTIALS": "",
            "GCS_RETRY_CONFIG_MAX_RETRIES": "2",
        }

    def names(self, bucket: str, prefix: str = "") -> list[str]:
        with self.lock:
            return sorted(n for b, n in self.objects if b == bucket and n.startswith(prefix))

    def read(self, bucket: str, name: str) -> bytes:
        with self.lock:
            return self.objects[bucket, name].data

    # -- store operations (called with self.lock held) --

    def _resource(self, bucket: str, name: str, obj: _Object) -> dict:
        return {
            "kind": "storage#object",
            "id": f"{bucket}/{name}/{obj.generation}",
            "bucket": bucket,
            "name": name,
            "size": str(len(obj.data)),
            "generation": str(obj.generation),
            "metageneration": "1",
            "contentType": obj.content_type,
            "updated": obj.updated,
            "timeCreated": obj.updated,
            "md5Hash": base64.b64encode(hashlib.md5(obj.data).digest()).decode(),  # noqa: S324  (GCS's own field)
        }

    def _precondition_failed(self, query: dict, obj: _Object | None) -> bool:
        generation = obj.generation if obj else 0
        if "ifGenerationMatch" in query and int(query["ifGenerationMatch"]) != generation:
            return True
        return "ifGenerationNotMatch" in query and int(query["ifGenerationNotMatch"]) == generation

    def _put(self, bucket: str, name: str, data: bytes, content_type: str | None) -> _Object:
        obj = _Object(data, next(self._generations), content_type or "application/octet-stream")
        self.objects[bucket, name] = obj
        return obj


def _split(path: str) -> tuple[list[str], dict[str, str]]:
    parsed = urllib.parse.urlsplit(path)
    parts = [urllib.parse.unquote(p) for p in parsed.path.split("/")[1:]]
    query = dict(urllib.parse.parse_qsl(parsed.query, keep_blank_values=True))
    return parts, query


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the clients reuse connections
    tunnel_host: str | None = None

    def log_message(self, format, *args):  # noqa: A002  (the base class's name)
        pass

    @property
    def gcs(self) -> FakeGcs:
        return self.server.gcs

    def _base_url(self) -> str:
        return f"https://{self.tunnel_host}" if self.tunnel_host else self.gcs.url

    def _send(self, code: int, body: bytes | dict = b"", headers: dict | None = None) -> None:
        if isinstance(body, dict):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        self.send_response(code)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, code: int, message: str) -> None:
        self._send(code, {"error": {"code": code, "message": message}})

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):  # TensorFlow's uploads (with a Content-Length too)
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def do_CONNECT(self):  # noqa: N802
        host, _, port = self.path.partition(":")
        if host not in TLS_HOSTS or port != "443":
            self._error(403, f"fake GCS: no tunnel to {self.path}")
            return
        self.send_response(200, "Connection established")
        self.end_headers()
        self.wfile.flush()
        self.connection = self.gcs.tls.wrap_socket(self.connection, server_side=True)
        self.rfile = self.connection.makefile("rb", self.rbufsize)
        self.wfile = self.connection.makefile("wb", 0)
        self.tunnel_host = host
        self.close_connection = False

    def do_GET(self):  # noqa: N802
        self._dispatch()

    def do_POST(self):  # noqa: N802
        self._dispatch()

    def do_PUT(self):  # noqa: N802
        self._dispatch()

    def do_DELETE(self):  # noqa: N802
        self._dispatch()

    def _dispatch(self) -> None:
        parts, query = _split(self.path)
        body = self._body() if self.command in ("POST", "PUT") else b""
        if os.environ.get("FAKE_GCS_TRACE"):
            print("FAKE_GCS", self.command, self._base_url() + self.path, dict(self.headers), len(body), flush=True)
        if self.tunnel_host == "storage.googleapis.com":  # the XML API: GET /BUCKET/OBJECT
            if self.command == "GET" and len(parts) >= 2:
                return self._read_media(parts[0], "/".join(parts[1:]), query)
        elif not self.tunnel_host and (parts[:1] == ["computeMetadata"] or parts == [""]):
            return self._metadata_server(parts)
        elif parts[:2] == ["storage", "v1"] and len(parts) >= 4 and parts[2] == "b":
            if self._json_api(parts[3], parts[4:], query):
                return None
        elif parts[:3] == ["upload", "storage", "v1"] and parts[3:4] == ["b"] and parts[5:] == ["o"]:
            if query.get("uploadType") == "media" and self.command == "POST":
                return self._finish_upload(parts[4], query["name"], body, self.headers.get("Content-Type"), query)
            if query.get("uploadType") == "resumable" and self.command in ("POST", "PUT"):
                return self._resumable(parts[4], query, body)
        with self.gcs.lock:
            self.gcs.unhandled.append(f"{self.command} {self._base_url()}{self.path}")
        self._error(501, f"fake GCS: {self.command} {self.path} is not implemented")

    def _metadata_server(self, parts: list[str]) -> None:
        flavor = {"Metadata-Flavor": "Google"}
        if parts[-1:] == ["token"]:
            return self._send(200, {"access_token": "fake", "expires_in": 3600, "token_type": "Bearer"}, flavor)
        if parts[-1:] == ["email"]:
            return self._send(200, b"fake@example.com", flavor)
        if "service-accounts" in parts:
            return self._send(200, {"email": "fake@example.com", "scopes": ["cloud-platform"]}, flavor)
        return self._send(200, b"", flavor)

    def _json_api(self, bucket: str, rest: list[str], query: dict) -> bool:
        """Answers a JSON API call on `bucket`; False when it is not one this fake implements."""
        if not rest and self.command == "GET":  # bucket metadata
            self._send(200, {"kind": "storage#bucket", "name": bucket, "location": "US"})
        elif rest == ["o"] and self.command == "GET":
            self._list(bucket, query)
        elif rest[:1] != ["o"] or len(rest) < 2:
            return False
        elif "rewriteTo" in rest and self.command == "POST":  # o/SRC/rewriteTo/b/DST_BUCKET/o/DST
            i = rest.index("rewriteTo")
            self._rewrite(bucket, "/".join(rest[1:i]), rest[i + 2], "/".join(rest[i + 4 :]), query)
        elif self.command == "GET" and query.get("alt") == "media":
            self._read_media(bucket, "/".join(rest[1:]), query)
        elif self.command in ("GET", "DELETE"):
            self._object(bucket, "/".join(rest[1:]), query)
        else:
            return False
        return True

    def _object(self, bucket: str, name: str, query: dict) -> None:
        """GET (the metadata) or DELETE of one object."""
        gcs = self.gcs
        with gcs.lock:
            obj = gcs.objects.get((bucket, name))
            if obj is None:
                return self._error(404, f"No such object: {bucket}/{name}")
            if gcs._precondition_failed(query, obj):
                return self._error(412, "Precondition Failed")
            if self.command == "DELETE":
                del gcs.objects[bucket, name]
                return self._send(204)
            resource = gcs._resource(bucket, name, obj)
        return self._send(200, resource)

    def _rewrite(self, bucket: str, src: str, dst_bucket: str, dst: str, query: dict) -> None:
        gcs = self.gcs
        with gcs.lock:
            obj = gcs.objects.get((bucket, src))
            if obj is None:
                return self._error(404, f"No such object: {bucket}/{src}")
            if gcs._precondition_failed(query, gcs.objects.get((dst_bucket, dst))):
                return self._error(412, "Precondition Failed")
            resource = gcs._resource(dst_bucket, dst, gcs._put(dst_bucket, dst, obj.data, obj.content_type))
        size = resource["size"]
        rewrite = {"kind": "storage#rewriteResponse", "done": True, "objectSize": size, "totalBytesRewritten": size}
        return self._send(200, {**rewrite, "resource": resource})

    def _read_media(self, bucket: str, name: str, query: dict) -> None:
        gcs = self.gcs
        with gcs.lock:
            obj = gcs.objects.get((bucket, name))
            if obj is None:
                return self._error(404, f"No such object: {bucket}/{name}")
            if "ifGenerationNotMatch" in query and int(query["ifGenerationNotMatch"]) == obj.generation:
                return self._send(304)
            if gcs._precondition_failed({k: v for k, v in query.items() if k == "ifGenerationMatch"}, obj):
                return self._error(412, "Precondition Failed")
            data, generation = obj.data, obj.generation
        headers = {"x-goog-generation": str(generation), "Content-Type": "application/octet-stream"}
        spec = self.headers.get("Range")
        if not spec or not spec.startswith("bytes=") or not data:
            return self._send(200, data, headers)
        first, _, last = spec.removeprefix("bytes=").partition("-")
        if first == "":  # a suffix: the last N bytes
            start, end = max(len(data) - int(last), 0), len(data) - 1
        else:
            start, end = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
        if start > end:  # past the end
            return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
        chunk = data[start : end + 1]
        headers["Content-Range"] = f"bytes {start}-{start + len(chunk) - 1}/{len(data)}"
        return self._send(206, chunk, headers)

    def _list(self, bucket: str, query: dict) -> None:
        prefix, delimiter = query.get("prefix", ""), query.get("delimiter", "")
        start, end = query.get("startOffset", ""), query.get("endOffset")
        token = query.get("pageToken", "")
        limit = int(query.get("maxResults") or 1000)
        items, prefixes = [], []
        with self.gcs.lock:
            names = sorted(n for b, n in self.gcs.objects if b == bucket and n.startswith(prefix))
            entries = []  # (sort key, item or prefix)
            for name in names:
                if name < start or (end is not None and name >= end):
                    continue
                rest = name[len(prefix) :]
                if delimiter and delimiter in rest:
                    sub = prefix + rest[: rest.index(delimiter) + len(delimiter)]
                    if not entries or entries[-1] != (sub, None):
                        entries.append((sub, None))
                else:
                    entries.append((name, self.gcs._resource(bucket, name, self.gcs.objects[bucket, name])))
        entries = [e for e in entries if e[0] > token] if token else entries
        page, more = entries[:limit], len(entries) > limit
        for key, resource in page:
            (prefixes.append(key) if resource is None else items.append(resource))
        out = {"kind": "storage#objects", "items": items, "prefixes": prefixes}
        if more:
            out["nextPageToken"] = page[-1][0]
        return self._send(200, out)

    def _finish_upload(self, bucket: str, name: str, data: bytes, content_type: str | None, query: dict) -> None:
        with self.gcs.lock:
            if self.gcs._precondition_failed(query, self.gcs.objects.get((bucket, name))):
                return self._error(412, "Precondition Failed")
            obj = self.gcs._put(bucket, name, data, content_type)
            resource = self.gcs._resource(bucket, name, obj)
        return self._send(200, resource)

    def _resumable(self, bucket: str, query: dict, body: bytes) -> None:
        gcs = self.gcs
        if "upload_id" not in query:  # start a session
            metadata = json.loads(body or b"{}")
            upload_id = f"u{next(gcs._generations)}"
            with gcs.lock:
                gcs.uploads[upload_id] = {
                    "name": query.get("name") or metadata["name"],
                    "query": query,
                    "data": bytearray(),
                    "content_type": metadata.get("contentType"),
                }
            location = f"{self._base_url()}/upload/storage/v1/b/{bucket}/o?uploadType=resumable&upload_id={upload_id}"
            return self._send(200, b"", {"Location": location})
        with gcs.lock:
            upload = gcs.uploads.get(query["upload_id"])
        if upload is None:
            return self._error(404, "No such upload")
        spec = (self.headers.get("Content-Range") or "").removeprefix("bytes ")
        span, _, total = spec.partition("/")
        if span and span != "*":
            first = int(span.split("-")[0])
            del upload["data"][first:]
            upload["data"] += body
        elif not spec:
            upload["data"] += body
            total = str(len(upload["data"]))
        if total and total != "*" and int(total) == len(upload["data"]):
            with gcs.lock:
                gcs.uploads.pop(query["upload_id"], None)
            return self._finish_upload(
                bucket, upload["name"], bytes(upload["data"]), upload["content_type"], upload["query"]
            )
        headers = {"Range": f"bytes=0-{len(upload['data']) - 1}"} if upload["data"] else {}
        return self._send(308, b"", headers)
