"""`launch.py --mode serve`: a local web page and JSON API over a trained run.

    python launch.py --config configs/demo.py --workdir runs/demo --mode serve [--port 8000]

Routes (contracts, ../shared/DESIGN.md):
  GET  /                  the search page (serve_page.html: plain HTML and a little
                          JavaScript, nothing loaded from the internet)
  GET  /report            the run's report.md as HTML, with its plots
  POST /api/search        multipart field `image`, optional `k` and `bits` ->
                          {"bits", "box", "results": [{"rank", "distance", "id",
                          "label", "class_name", "image_url"}]}
  GET  /api/health        {"status": "ok", "bits": [...], "database": N}
  GET  /api/images/{id}   a database image by its index id (optional ?bits=)
  GET  /api/random_query  a random test-split image: {"id", "image_url", "label", "class_name"}
  GET  /api/queries/{id}  that image's file
Bad input gets a 4xx with {"error": "..."}, any other failure a 500 with
{"error": ...} (the traceback goes to the log); the server keeps serving. An
upload is counted while it streams in, chunked or not, and refused (413) as
soon as it passes --max_upload_mb, without reading the rest. Requests must
name this server in their Host header (localhost by default, --allowed_hosts
for more), so a web page elsewhere cannot reach it by rebinding its DNS name.
Searches, image routes and health run apart: /api/health answers on the event
loop, images in threads of their own, so neither waits behind searches.
Built on Starlette and uvicorn (`pip install -e ".[serve]"`); only this module
imports them, and only `--mode serve` imports this module.
"""

from __future__ import annotations

import asyncio
import functools
import html
import importlib.resources
import logging
import re
import warnings

from fgir_jax.commands.service import (DEFAULT_MAX_MEGAPIXELS, DEFAULT_MAX_UPLOAD_MB,
                                       RequestError, SearchService)

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")
_LOG = logging.getLogger("fgir_jax.serve")
# Threads that may wait for searches, and threads for images and the report: apart, so that
# a crowd of searches never holds the threads the image routes need.
_SEARCH_THREADS = 64
_IMAGE_THREADS = 8

_SERVE_HINT = ('--mode serve needs the web server packages: pip install -e ".[serve]" '
               "(starlette, uvicorn, python-multipart, markdown).")


def _imports():
  try:
    import markdown  # pylint: disable=g-import-not-at-top
    import starlette  # pylint: disable=g-import-not-at-top,unused-import
    import uvicorn  # pylint: disable=g-import-not-at-top,unused-import
    import python_multipart  # pylint: disable=g-import-not-at-top,unused-import  (form parsing)
  except ImportError as e:
    raise ImportError(_SERVE_HINT) from e
  return markdown


def create_app(service: SearchService, allowed_hosts=()):
  """The Starlette application answering for `service`; `allowed_hosts` adds Host names to
  the local ones it answers."""
  markdown = _imports()
  # pylint: disable=g-import-not-at-top
  import anyio
  from starlette.applications import Starlette
  from starlette.middleware import Middleware
  from starlette.middleware.trustedhost import TrustedHostMiddleware
  from starlette.requests import Request
  from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
  from starlette.routing import Route

  page = importlib.resources.files("fgir_jax.commands").joinpath("serve_page.html").read_text()
  limiters = {}  # made on first use: anyio wants the running event loop

  def in_thread(kind):
    async def run(fn, *args):
      if kind not in limiters:
        limiters[kind] = anyio.CapacityLimiter(_SEARCH_THREADS if kind == "search"
                                               else _IMAGE_THREADS)
      return await anyio.to_thread.run_sync(functools.partial(fn, *args), limiter=limiters[kind])
    return run

  def refusing(handler, kind="images"):
    """Runs the handler with its threads; RequestError -> 4xx {"error": ...}, anything else
    -> 500 {"error": ...} with the traceback in the log."""
    @functools.wraps(handler)
    async def endpoint(request):
      try:
        return await handler(request, in_thread(kind))
      except RequestError as e:
        return JSONResponse({"error": e.message}, status_code=e.status)
      except Exception as e:  # noqa: BLE001 - one failed request must not look like a crash
        _LOG.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse({"error": f"internal error ({type(e).__name__}); the server "
                                      "logged the details and keeps serving."}, status_code=500)
    return endpoint

  async def index_page(request):
    del request
    return HTMLResponse(page)

  @refusing
  async def report(request, threaded):
    del request
    text = await threaded(service.report_markdown)
    body = markdown.markdown(text, extensions=["tables"])
    # Plots are linked as plots/<name>; they are served from /report/plots/<name>.
    body = re.sub(r'src="plots/', 'src="/report/plots/', body)
    return HTMLResponse(_REPORT_PAGE.format(title=html.escape(service.searcher.run.wd.path),
                                            body=body))

  @refusing
  async def plot(request, threaded):
    return FileResponse(await threaded(service.plot_file, request.path_params["name"]))

  @refusing
  async def health(request, threaded):
    del request, threaded  # in-memory numbers: answered on the event loop, never queued
    return JSONResponse(service.health())

  async def search(request, threaded):
    body = await _read_limited(request, service.max_upload_bytes)
    try:
      form = await Request(request.scope, _replay(body)).form()
    except Exception as e:  # noqa: BLE001 - any malformed body is the client's problem
      raise RequestError(400, "the request is not a multipart form; send the image in the "
                              "field 'image' (multipart/form-data).") from e
    upload = form.get("image")
    if upload is None or isinstance(upload, str):
      raise RequestError(400, "no image: send the image file in the multipart field 'image'.")
    data = await upload.read()
    query = await threaded(service.prepare, data, form.get("k", 10), form.get("bits"))
    found = await asyncio.wrap_future(service.submit(query))  # waits without a thread
    return JSONResponse(service.answer(query, found))

  @refusing
  async def database_image(request, threaded):
    data = await threaded(service.database_image, request.path_params["id"],
                          request.query_params.get("bits"))
    return Response(data, media_type="image/jpeg",
                    headers={"Cache-Control": "max-age=3600"})

  @refusing
  async def random_query(request, threaded):
    del request
    return JSONResponse(await threaded(service.random_query))

  @refusing
  async def query_image(request, threaded):
    data = await threaded(service.query_image, request.path_params["id"])
    return Response(data, media_type=_media_type(data))

  async def not_found(request, exc):
    del exc
    return JSONResponse({"error": f"no such page: {request.url.path}"}, status_code=404)

  async def not_allowed(request, exc):
    del exc
    return JSONResponse({"error": f"{request.method} is not allowed on {request.url.path}"},
                        status_code=405)

  routes = [
      Route("/", index_page),
      Route("/report", report),
      Route("/report/plots/{name}", plot),
      Route("/api/health", health),
      Route("/api/search", refusing(search, "search"), methods=["POST"]),
      Route("/api/images/{id}", database_image),
      Route("/api/random_query", random_query),
      Route("/api/queries/{id}", query_image),
  ]
  hosts = list(LOCAL_HOSTS) + [h for h in allowed_hosts if h]
  app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_allowed},
                  middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=hosts)])
  app.state.service = service
  return app


async def _read_limited(request, limit: int) -> bytes:
  """The request body, counted as it streams in: RequestError 413 as soon as it passes the
  limit (plus the form's own bytes), without reading the rest."""
  allowed = limit + (1 << 16)
  declared = request.headers.get("content-length")
  if declared and declared.isdigit() and int(declared) > allowed:
    raise RequestError(413, f"the upload is {int(declared) / 2**20:.1f} MB, over the "
                            f"{limit / 2**20:g} MB limit (--max_upload_mb).")
  chunks, size = [], 0
  async for chunk in request.stream():
    size += len(chunk)
    if size > allowed:
      raise RequestError(413, f"the upload passed {allowed / 2**20:.1f} MB, over the "
                              f"{limit / 2**20:g} MB limit (--max_upload_mb).")
    chunks.append(chunk)
  return b"".join(chunks)


def _replay(body: bytes):
  """An ASGI receive that gives `body` once: the form parser reads the bytes already counted."""
  sent = False

  async def receive():
    nonlocal sent
    if sent:
      return {"type": "http.disconnect"}
    sent = True
    return {"type": "http.request", "body": body, "more_body": False}
  return receive


def serve(config, workdir: str, host: str = "127.0.0.1", port: int = 8000,
          max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
          max_megapixels: float = DEFAULT_MAX_MEGAPIXELS, allowed_hosts=(), echo=print) -> None:
  """Loads the run once, warms the networks up, and serves until interrupted."""
  _imports()
  import uvicorn  # pylint: disable=g-import-not-at-top
  if not 0 < port < 65536:
    raise ValueError(f"--port must be from 1 to 65535, got {port}.")
  refuse_bombs()
  echo(f"loading {workdir} ...")
  service = SearchService(config, workdir, max_upload_mb, max_megapixels)
  echo("compiling the networks (one warm-up search) ...")
  warm_up(service)
  health = service.health()
  echo(f"serving {health['database']} database images, {', '.join(map(str, health['bits']))}"
       f"-bit codes at http://{host}:{port}/  (Ctrl-C stops)")
  hosts = list(allowed_hosts)
  if host not in ("127.0.0.1", "localhost", "::1"):
    echo(f"note: --host {host} makes the page reachable from other machines; they must call it "
         f"by a name in --allowed_hosts (now: {', '.join(LOCAL_HOSTS + tuple(hosts))}).")
    hosts.append(host)
  uvicorn.run(create_app(service, hosts), host=host, port=port, log_level="warning")


def refuse_bombs() -> None:
  """Pillow's decompression-bomb warning becomes an error in this (the server's) process."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  warnings.simplefilter("error", Image.DecompressionBombWarning)


class Background:
  """The app served by uvicorn from a thread of this process, e.g. for a notebook, a test or
  a benchmark: `with Background(service) as server: ... server.url ...`."""

  def __init__(self, service: SearchService, host: str = "127.0.0.1", port: int = 0,
               allowed_hosts=(), wrap=None):
    """wrap: app -> app, e.g. an ASGI middleware that a test puts around the app."""
    _imports()
    refuse_bombs()
    import socket  # pylint: disable=g-import-not-at-top
    import threading  # pylint: disable=g-import-not-at-top
    import uvicorn  # pylint: disable=g-import-not-at-top
    if not port:  # a free port, chosen by the system
      with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    self.url = f"http://{host}:{port}"
    app = create_app(service, allowed_hosts)
    self._server = uvicorn.Server(uvicorn.Config(app if wrap is None else wrap(app), host=host,
                                                 port=port, log_level="warning"))
    self._thread = threading.Thread(target=self._server.run, daemon=True)

  def __enter__(self) -> "Background":
    import time  # pylint: disable=g-import-not-at-top
    self._thread.start()
    for _ in range(600):  # up to a minute
      if self._server.started:
        return self
      if not self._thread.is_alive():
        raise OSError(f"the server could not start at {self.url}")
      time.sleep(0.1)
    raise OSError(f"the server at {self.url} did not start within a minute")

  def __exit__(self, *exc) -> None:
    self._server.should_exit = True
    self._thread.join(timeout=10)


def warm_up(service: SearchService) -> None:
  """One search of a grey image at every code length: later searches skip compiling."""
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  Image.new("RGB", (64, 64), (128, 128, 128)).save(buffer, format="PNG")
  for bits in service.bits:
    service.search(buffer.getvalue(), k=10, bits=bits)


def _media_type(data: bytes) -> str:
  for magic, kind in ((b"\xff\xd8", "image/jpeg"), (b"\x89PNG", "image/png"), (b"GIF8", "image/gif"),
                      (b"BM", "image/bmp"), (b"RIFF", "image/webp")):
    if data.startswith(magic):
      return kind
  return "application/octet-stream"


_REPORT_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>report: {title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 980px; margin: 2em auto; padding: 0 1em;
        color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; }}
img {{ max-width: 100%; }}
code {{ background: #f3f3f3; padding: 0 3px; }}
</style></head>
<body><p><a href="/">&larr; search</a></p>
{body}
</body></html>
"""
