"""A page to look at an index: `vlm search --web` on 127.0.0.1.

One page (no files, no scripts from elsewhere): a query box for text (with + and - as on the command
line), an image to search by (upload, or "similar" under any result), the results as a grid of
thumbnails, and a tab with the duplicate groups side by side. JSON under /api/ serves the page:

    GET  /api/search?q=TEXT&n=N[&in=FOLDER&since=YYYY-MM-DD&until=...]   ranked results
    POST /api/search?q=TEXT&n=N   (body: an image's bytes)                the image (plus any text) as the query
    GET  /api/similar?sha=SHA256&n=N                                      images like an indexed one
    GET  /api/dupes?threshold=T                                           near-duplicate groups
    GET  /thumb/SHA256, /image/SHA256                                     a thumbnail (made once, cached), the file

Only files in the index are ever read, by content hash, never by a path from the request; the
server answers only requests addressed to 127.0.0.1 / localhost (a page elsewhere cannot reach it
through DNS rebinding). The model is not thread-safe and SQLite's connection is shared: requests
that use them run one at a time.
"""

from __future__ import annotations

import json
import mimetypes
import os
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from vlmcli.errors import VlmError
from vlmcli.index.dupes import DEFAULT_THRESHOLD, find_duplicates
from vlmcli.index.search import Filters, Searcher, Term, date_ns, parse_query

THUMB_SIZE = 256
MAX_UPLOAD = 50 << 20


class Thumbnails:
    """JPEG thumbnails of indexed images in a folder beside the index, one per content, made on first use."""

    def __init__(self, folder: Path, size: int = THUMB_SIZE):
        self.folder, self.size = folder, size

    def get(self, sha256: str, source: str) -> Path:
        out = self.folder / sha256[:2] / f"{sha256}-{self.size}.jpg"
        if out.exists():
            return out
        from PIL import Image, ImageOps

        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(source) as im:
            im.draft("RGB", (self.size, self.size))
            thumb = ImageOps.exif_transpose(im).convert("RGB")
            thumb.thumbnail((self.size, self.size))
        tmp = out.with_name(f"{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        thumb.save(tmp, "JPEG", quality=85)
        os.replace(tmp, out)  # whole or absent, even with two requests making it at once
        return out


def _date_ns(value: str | None) -> int | None:
    if not value:
        return None
    try:
        return date_ns(value)
    except ValueError:
        raise VlmError(f"not a date: {value} (YYYY-MM-DD)") from None


class SearchPage:
    """What the handler calls: the searcher behind one lock, thumbnails, and the page itself."""

    def __init__(self, searcher: Searcher, thumbnails: Thumbnails):
        self.searcher, self.thumbnails = searcher, thumbnails
        self.lock = threading.Lock()

    def search(self, params: dict[str, str], image: bytes | None = None) -> dict[str, Any]:
        n = max(1, min(int(params.get("n") or 60), 1000))
        words = [params["q"]] if params.get("q", "").strip() else []
        filters = Filters(
            [params["in"]] if params.get("in") else [], _date_ns(params.get("since")), _date_ns(params.get("until"))
        )
        with self.lock:
            terms = parse_query(words, is_image=lambda _: False) if words else []
            if image is not None:
                terms.append(Term(1.0, image=image))
            elif params.get("sha"):
                terms.append(Term(1.0, image=self._path_of(params["sha"])))
            if not terms:
                raise VlmError("the query is empty: type words or choose an image")
            hits = self.searcher.with_captions(self.searcher.search(terms, n, filters))
        return {
            "model": self.searcher.model.name,
            "results": [{**h.record(), "sha256": h.sha256, "name": os.path.basename(h.path)} for h in hits],
        }

    def dupes(self, params: dict[str, str]) -> dict[str, Any]:
        threshold = float(params.get("threshold") or DEFAULT_THRESHOLD)
        with self.lock:
            vectors = self.searcher.rows(Filters())
            groups = find_duplicates(vectors, threshold)
        out = []
        for number, g in enumerate(groups, 1):
            files = g.file_records()
            for f, row in zip(files, g.files):
                f["sha256"], f["name"] = row.sha256, os.path.basename(row.path)
            out.append({**g.record(number), "files": files})
        return {"threshold": threshold, "images": len(vectors), "groups": out}

    def _path_of(self, sha256: str) -> str:
        row = self.searcher.db.conn.execute("SELECT path FROM files WHERE sha256=? LIMIT 1", (sha256,)).fetchone()
        if row is None:
            raise LookupError(sha256)
        return str(row[0])

    def file(self, sha256: str, thumbnail: bool) -> Path:
        with self.lock:
            path = self._path_of(sha256)
        return self.thumbnails.get(sha256, path) if thumbnail else Path(path)


def _handler(page: SearchPage) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "vlm-search"

        def log_message(self, format: str, *args: Any) -> None:
            return None  # a quiet page; errors reach the browser as JSON

        def _local(self) -> bool:
            host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
            return host in ("127.0.0.1", "localhost", "::1")

        def _send(self, status: int, body: bytes, content_type: str, cache: bool = False) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "max-age=86400" if cache else "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, data: Any) -> None:
            self._send(status, json.dumps(data, ensure_ascii=False).encode(), "application/json; charset=utf-8")

        def _params(self) -> tuple[str, dict[str, str]]:
            url = urlsplit(self.path)
            return url.path, {k: v[-1] for k, v in parse_qs(url.query).items()}

        def _answer(self, work: Callable[[], Any]) -> None:
            try:
                self._json(HTTPStatus.OK, work())
            except VlmError as e:
                message = f"{e.path}: {e.message}" if e.path else e.message
                self._json(HTTPStatus.BAD_REQUEST, {"error": message})
            except (ValueError, LookupError) as e:
                self._json(HTTPStatus.BAD_REQUEST, {"error": f"bad request ({e})"})

        def do_GET(self) -> None:
            if not self._local():
                return self._json(HTTPStatus.FORBIDDEN, {"error": "this page answers on 127.0.0.1 only"})
            path, params = self._params()
            if path == "/":
                return self._send(HTTPStatus.OK, PAGE.encode(), "text/html; charset=utf-8")
            if path == "/api/search":
                return self._answer(lambda: page.search(params))
            if path == "/api/similar":
                return self._answer(lambda: page.search({**params, "q": ""}))
            if path == "/api/dupes":
                return self._answer(lambda: page.dupes(params))
            for prefix, thumb in (("/thumb/", True), ("/image/", False)):
                if path.startswith(prefix):
                    sha = path[len(prefix) :]
                    try:
                        f = page.file(sha, thumb)
                        data = f.read_bytes()
                    except (LookupError, OSError, ValueError):
                        return self._json(HTTPStatus.NOT_FOUND, {"error": "no such image in the index"})
                    kind = "image/jpeg" if thumb else (mimetypes.guess_type(f.name)[0] or "application/octet-stream")
                    return self._send(HTTPStatus.OK, data, kind, cache=True)
            return self._json(HTTPStatus.NOT_FOUND, {"error": f"no page {path}"})

        def do_POST(self) -> None:
            if not self._local():
                return self._json(HTTPStatus.FORBIDDEN, {"error": "this page answers on 127.0.0.1 only"})
            path, params = self._params()
            if path != "/api/search":
                return self._json(HTTPStatus.NOT_FOUND, {"error": f"no page {path}"})
            length = int(self.headers.get("Content-Length") or 0)
            if length <= 0 or length > MAX_UPLOAD:
                return self._json(
                    HTTPStatus.BAD_REQUEST, {"error": f"send an image of 1 byte to {MAX_UPLOAD >> 20} MB"}
                )
            body = self.rfile.read(length)
            return self._answer(lambda: page.search(params, image=body))

    return Handler


def make_server(searcher: Searcher, port: int = 0, thumbnails: Thumbnails | None = None) -> ThreadingHTTPServer:
    """The page's server on 127.0.0.1:port (0: a free port; see server.server_address)."""
    thumbs = thumbnails or Thumbnails(searcher.db.path.with_name(searcher.db.path.name + ".thumbs"))
    page = SearchPage(searcher, thumbs)
    server = ThreadingHTTPServer(("127.0.0.1", port), _handler(page))
    server.daemon_threads = True
    return server


def serve_page(searcher: Searcher, port: int = 0, notify: Callable[[str], None] = print) -> None:
    """Serve until Ctrl-C."""
    try:
        server = make_server(searcher, port)
    except OSError as e:
        raise VlmError(f"cannot listen on 127.0.0.1:{port} ({e.strerror or e})") from None
    notify(f"vlm: search page on http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C stops it)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>vlm search</title>
<style>
  :root { --fg: #1d1f21; --muted: #6a6f75; --line: #dde1e5; --accent: #2f6fdb; --keep: #1f9d55; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 15px/1.4 system-ui, sans-serif; color: var(--fg); background: #f7f8f9; }
  header { display: flex; gap: 1.5rem; align-items: center; padding: .8rem 1.2rem; background: #fff;
           border-bottom: 1px solid var(--line); position: sticky; top: 0; z-index: 1; }
  header h1 { font-size: 1.05rem; margin: 0; }
  nav button { border: 0; background: none; padding: .35rem .7rem; font: inherit; cursor: pointer;
               border-radius: 6px; color: var(--muted); }
  nav button.on { background: #e8eefb; color: var(--accent); }
  main { padding: 1rem 1.2rem; }
  form { display: flex; flex-wrap: wrap; gap: .5rem; align-items: center; margin-bottom: .6rem; }
  input[type=search] { flex: 1 1 24rem; padding: .55rem .7rem; font: inherit; border: 1px solid #c4c9cf;
                       border-radius: 8px; }
  input[type=number] { width: 5.5rem; padding: .45rem; font: inherit; border: 1px solid #c4c9cf; border-radius: 8px; }
  button.go { padding: .55rem 1rem; font: inherit; border: 0; border-radius: 8px; background: var(--accent);
              color: #fff; cursor: pointer; }
  label.file { padding: .5rem .8rem; border: 1px dashed #9aa3ad; border-radius: 8px; cursor: pointer;
               color: var(--muted); }
  label.file input { display: none; }
  form.filters { color: var(--muted); font-size: .9rem; gap: 1rem; }
  form.filters input { padding: .3rem .45rem; font: inherit; border: 1px solid #c4c9cf; border-radius: 6px; }
  #status, #dupes-status { color: var(--muted); min-height: 1.4em; margin: .2rem 0 .8rem; }
  #status.error, #dupes-status.error { color: #c0392b; }
  .grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: .8rem; }
  figure { margin: 0; background: #fff; border: 1px solid var(--line); border-radius: 10px; overflow: hidden; }
  figure img { display: block; width: 100%; height: 150px; object-fit: cover; background: #eceff1; }
  figcaption { padding: .4rem .55rem .5rem; font-size: .82rem; }
  figcaption .name { display: block; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
  figcaption .meta { display: flex; justify-content: space-between; color: var(--muted); }
  figcaption .caption { display: block; color: var(--muted); font-style: italic; margin-top: .2rem; }
  figcaption a { color: var(--accent); text-decoration: none; cursor: pointer; }
  .group { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: .7rem; margin-bottom: 1rem; }
  .group h2 { font-size: .95rem; margin: 0 0 .5rem; }
  .row { display: flex; gap: .7rem; overflow-x: auto; }
  .row figure { flex: 0 0 190px; }
  .row figure.keep { border: 2px solid var(--keep); }
  .badge { color: #fff; background: var(--keep); border-radius: 4px; padding: 0 .35rem; font-size: .75rem; }
  [hidden] { display: none !important; }
</style>
</head>
<body>
<header>
  <h1>vlm search</h1>
  <nav><button id="tab-search" class="on">Search</button><button id="tab-dupes">Duplicates</button></nav>
</header>
<main>
  <section id="search">
    <form id="query">
      <input id="q" type="search" name="q" autocomplete="off" autofocus
             placeholder='Describe a photo: a dog on the beach  (or "dog" + "beach" - "night")'>
      <label class="file" title="Search by an image">Image… <input id="image" type="file" accept="image/*"></label>
      <input id="n" type="number" min="1" max="1000" value="60" title="How many results">
      <button class="go" type="submit">Search</button>
    </form>
    <form id="filters" class="filters">
      <label>In folder <input id="in" type="text" placeholder="/photos/2024" size="28"></label>
      <label>Modified from <input id="since" type="date"></label>
      <label>until <input id="until" type="date"></label>
    </form>
    <div id="status"></div>
    <div id="results" class="grid"></div>
  </section>
  <section id="dupes" hidden>
    <form id="dupes-form">
      <label>Threshold <input id="threshold" type="number" min="0.5" max="1" step="0.005" value="0.95"></label>
      <button class="go" type="submit">Find duplicates</button>
    </form>
    <div id="dupes-status"></div>
    <div id="groups"></div>
  </section>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let upload = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "onclick") node.addEventListener("click", v); else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function card(item, extra) {
  const img = el("img", {src: "/thumb/" + item.sha256, alt: item.name, loading: "lazy", title: item.path});
  const meta = el("span", {class: "meta"}, el("span", {}, extra), el("a", {onclick: () => similar(item)}, "similar"));
  const cap = el("figcaption", {}, el("span", {class: "name", title: item.path}, item.name), meta);
  if (item.caption) cap.append(el("span", {class: "caption"}, item.caption));
  return el("figure", {}, el("a", {href: "/image/" + item.sha256, target: "_blank"}, img), cap);
}

function filtered(fields) {
  const params = new URLSearchParams(fields);
  for (const name of ["in", "since", "until"]) if ($(name).value) params.set(name, $(name).value);
  return params;
}

function status(target, text, error) {
  target.textContent = text;
  target.className = error ? "error" : "";
}

async function show(response, label) {
  const data = await response.json();
  const box = $("results");
  box.replaceChildren();
  if (!response.ok) return status($("status"), data.error, true);
  status($("status"), `${data.results.length} results for ${label} (${data.model})`);
  for (const r of data.results) box.append(card(r, r.score.toFixed(4)));
}

async function search(event) {
  if (event) event.preventDefault();
  const q = $("q").value.trim();
  const params = filtered({q, n: $("n").value});
  status($("status"), "searching…");
  if (upload) {
    const r = await fetch("/api/search?" + params, {method: "POST", body: upload,
                          headers: {"Content-Type": upload.type || "application/octet-stream"}});
    return show(r, (q ? `"${q}" + ` : "") + upload.name);
  }
  return show(await fetch("/api/search?" + params), `"${q}"`);
}

async function similar(item) {
  upload = null;
  $("image").value = "";
  pick("search");
  status($("status"), "searching…");
  const params = filtered({sha: item.sha256, n: $("n").value});
  return show(await fetch("/api/similar?" + params), item.name);
}

async function dupes(event) {
  if (event) event.preventDefault();
  status($("dupes-status"), "comparing…");
  const r = await fetch("/api/dupes?" + new URLSearchParams({threshold: $("threshold").value}));
  const data = await r.json();
  const box = $("groups");
  box.replaceChildren();
  if (!r.ok) return status($("dupes-status"), data.error, true);
  status($("dupes-status"), `${data.groups.length} groups among ${data.images} images (threshold ${data.threshold})`);
  for (const g of data.groups) {
    const best = {};
    for (const p of g.pairs) {
      best[p.a] = Math.max(best[p.a] || 0, p.score);
      best[p.b] = Math.max(best[p.b] || 0, p.score);
    }
    const row = el("div", {class: "row"});
    for (const f of g.files) {
      const size = f.width ? `${f.width}×${f.height}` : "";
      const score = `${(best[f.path] || 0).toFixed(3)} ${size}`;
      const fig = card(f, f.keeper ? el("span", {class: "badge"}, "keep") : score);
      if (f.keeper) fig.classList.add("keep");
      row.append(fig);
    }
    box.append(el("div", {class: "group"}, el("h2", {}, `Group ${g.group}: ${g.files.length} images`), row));
  }
}

function pick(name) {
  for (const t of ["search", "dupes"]) {
    $(t).hidden = t !== name;
    $("tab-" + t).classList.toggle("on", t === name);
  }
}

$("query").addEventListener("submit", search);
$("filters").addEventListener("submit", search);
$("dupes-form").addEventListener("submit", dupes);
$("image").addEventListener("change", () => { upload = $("image").files[0] || null; if (upload) search(); });
$("tab-search").addEventListener("click", () => pick("search"));
$("tab-dupes").addEventListener("click", () => { pick("dupes"); if (!$("groups").children.length) dupes(); });
</script>
</body>
</html>
"""
