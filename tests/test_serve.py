"""`--mode serve`: the JSON API through Starlette's test client and a live server, and the page
in headless Chromium (skipped where Chromium, its driver or Selenium is missing)."""

import concurrent.futures
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")
from starlette.testclient import TestClient  # noqa: E402

from fgir_jax.commands import search, serve  # noqa: E402
from fgir_jax.commands.service import SearchService  # noqa: E402
from test_pipeline import REPO, tiny_config  # noqa: E402
from test_rundir import snapshot  # noqa: E402
from test_search import _write_queries  # noqa: E402


@pytest.fixture(scope="module")
def service(tiny_run):
  # The shared run itself: serving must leave it exactly as it was (checked at the end).
  before = snapshot(tiny_run)
  svc = SearchService(tiny_config(), tiny_run)
  serve.warm_up(svc)
  yield svc
  assert snapshot(tiny_run) == before, "serving wrote into the work directory"


@pytest.fixture(scope="module")
def client(service):
  return TestClient(serve.create_app(service), base_url="http://localhost")


@pytest.fixture(scope="module")
def queries(tmp_path_factory):
  paths, labels, _ = _write_queries(tiny_config(), str(tmp_path_factory.mktemp("q")), [0, 1, 2, 3])
  return paths, labels


def post(client, path, **fields):
  with open(path, "rb") as f:
    return client.post("/api/search", files={"image": ("q.png", f.read(), "image/png")},
                       data={k: str(v) for k, v in fields.items()})


def test_health(client, tiny_run):
  assert client.get("/api/health").json() == {"status": "ok", "bits": [8, 12], "database": 24}


@pytest.mark.parametrize("bits", [None, 8])
def test_search_equals_the_search_command(client, queries, tmp_path, bits):
  path = queries[0][1]
  answer = post(client, path, k=5, **({"bits": bits} if bits else {})).json()
  expected = search.search_command(tiny_config(), _workdir(client), [path], k=5, bits=bits,
                                   echo=lambda _: None, out_dir=str(tmp_path))
  assert answer["bits"] == expected["bits"] == (bits or 12)
  rows = expected["queries"][0]["results"]
  assert [r["id"] for r in answer["results"]] == [r["item"] for r in rows]
  assert [r["distance"] for r in answer["results"]] == [r["distance"] for r in rows]
  assert [r["rank"] for r in answer["results"]] == [1, 2, 3, 4, 5]
  assert [r["class_name"] for r in answer["results"]] == [r["class_name"] for r in rows]
  first = answer["results"][0]
  assert first["image_url"] == f"/api/images/{first['id']}?bits={answer['bits']}"
  ymin, xmin, ymax, xmax = answer["box"]
  assert 0 <= ymin < ymax <= 1 and 0 <= xmin < xmax <= 1


def _workdir(client):
  return client.app.state.service.searcher.run.wd.path


def test_every_bad_request_gets_a_4xx_and_the_server_keeps_serving(client, queries, tmp_path,
                                                                     monkeypatch):
  path = queries[0][0]
  not_image = tmp_path / "notes.txt"
  not_image.write_text("not an image")
  cases = [
      (post(client, str(not_image)), 400, "not an image"),
      (client.post("/api/search", files={"image": ("e.png", b"", "image/png")}), 400, "empty"),
      (post(client, path, k=0), 400, "k must be a whole number from 1 to 24"),
      (post(client, path, k=25), 400, "k must be"),
      (post(client, path, k="ten"), 400, "k must be"),
      (post(client, path, bits=16), 400, "bits must be one of the trained code lengths 8, 12"),
      (client.post("/api/search", data={"k": "3"}), 400, "no image"),
      (client.post("/api/search", content=b"raw", headers={"content-type": "text/plain"}), 400,
       "no image"),
      (client.get("/api/search"), 405, "not allowed"),
      (client.get("/api/images/24"), 404, "image id must be a whole number from 0 to 23"),
      (client.get("/api/images/-1"), 404, "image id"),
      (client.get("/api/images/abc"), 404, "image id"),
      (client.get("/api/images/3?bits=9"), 400, "bits must be"),
      (client.get("/api/images/..%2F..%2Fetc%2Fpasswd"), 404, ""),
      (client.get("/api/queries/999"), 404, "query id"),
      (client.get("/report/plots/..%2Fconfig.json"), 404, ""),
      (client.get("/report/plots/nothing.png"), 404, "no plot named"),
  ]
  service = client.app.state.service
  monkeypatch.setattr(service, "max_upload_bytes", 100)
  cases.append((post(client, path), 413, "over the 9.53674e-05 MB limit"))
  big = b"x" * (service.max_upload_bytes + (1 << 17))
  cases.append((client.post("/api/search", files={"image": ("b.png", big, "image/png")}), 413,
                "limit"))
  monkeypatch.undo()
  for response, status, words in cases:
    assert response.status_code == status, (response.request.url, response.text)
    assert words in response.json()["error"], response.json()
  assert client.get("/api/health").json()["status"] == "ok"
  assert post(client, path, k=3).status_code == 200


def test_database_and_test_images_are_served_by_id(client):
  response = client.get("/api/images/0")
  assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
  assert Image.open(io.BytesIO(response.content)).size == (32, 32)
  query = client.get("/api/random_query").json()
  assert set(query) == {"id", "image_url", "label", "class_name"}
  image = client.get(query["image_url"])
  assert image.status_code == 200 and Image.open(io.BytesIO(image.content)).size == (32, 32)


def test_report_page_renders_the_report_with_its_plots(client):
  page = client.get("/report")
  assert page.status_code == 200 and "<table>" in page.text
  plots = [part.split('"')[0] for part in page.text.split('src="')[1:]]
  assert plots and all(p.startswith("/report/plots/") for p in plots)
  image = client.get(plots[0])
  assert image.status_code == 200 and image.content[:4] == b"\x89PNG"


def test_page_is_self_contained(client):
  page = client.get("/").text
  assert 'id="file"' in page and "/api/search" in page
  assert "http://" not in page and "https://" not in page  # nothing from the internet


# --------------------------------------------------------------------------
# A live server: concurrency, and the page in a real browser.

@pytest.fixture(scope="module")
def live(service):
  with serve.Background(service) as server:
    yield server.url


def _live_search(url, path, k, bits):
  import httpx  # pylint: disable=g-import-not-at-top
  with open(path, "rb") as f:
    response = httpx.post(url + "/api/search", files={"image": ("q.png", f.read())},
                          data={"k": str(k), "bits": str(bits)}, timeout=120)
  assert response.status_code == 200, response.text
  return response.json()


def test_fifty_concurrent_searches_are_batched_and_equal_the_same_searches_alone(service, live,
                                                                                 queries):
  jobs = [(queries[0][i % 4], 3 + i % 5, (8, 12)[i % 2]) for i in range(50)]
  alone = {job: _live_search(live, *job) for job in set(jobs)}
  service.largest_batch = 0
  with concurrent.futures.ThreadPoolExecutor(50) as pool:
    together = list(pool.map(lambda job: _live_search(live, *job), jobs))
  for job, answer in zip(jobs, together):
    assert answer == alone[job], job
  assert service.largest_batch > 1  # concurrent searches shared forward passes


def test_a_search_after_warm_up_compiles_nothing(service, queries):
  import jax  # pylint: disable=g-import-not-at-top
  compiles = []

  def listen(event, duration, **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(event)

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    with open(queries[0][2], "rb") as f:
      service.search(f.read(), k=7, bits=8)
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  assert compiles == []


# --------------------------------------------------------------------------
# Hostile clients, over real HTTP.

class _CountBody:
  """ASGI middleware counting the request body bytes the app read, per path."""

  def __init__(self, app):
    self.app, self.read = app, {}

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    path = scope["path"]
    self.read[path] = 0

    async def counting():
      message = await receive()
      self.read[path] += len(message.get("body", b""))
      return message
    return await self.app(scope, counting, send)


@pytest.fixture(scope="module")
def counted(service):
  holder = {}

  def wrap(app):
    holder["count"] = _CountBody(app)
    return holder["count"]

  with serve.Background(service, wrap=wrap) as server:
    yield server.url, holder["count"]


def _raw_chunked_post(url, total, chunk=1 << 16):
  """POSTs `total` bytes as a chunked multipart body over a raw socket, stopping once the
  server answers; returns (status line, bytes sent)."""
  import select  # pylint: disable=g-import-not-at-top
  import socket  # pylint: disable=g-import-not-at-top
  host, port = url.split("//")[1].split(":")
  head = (f"POST /api/search HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n"
          "Content-Type: multipart/form-data; boundary=XX\r\n\r\n").encode()
  part = b'--XX\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
  sent = 0
  with socket.create_connection((host, int(port)), timeout=30) as sock:
    sock.sendall(head)
    sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
    while sent < total:
      if select.select([sock], [], [], 0)[0]:
        break  # the answer came before the body ended
      try:
        sock.sendall(b"%x\r\n%s\r\n" % (chunk, b"x" * chunk))
      except OSError:
        break
      sent += chunk
    sock.settimeout(30)
    answer = sock.recv(65536).decode("latin-1")
  return answer.split("\r\n")[0], answer, sent


def test_a_chunked_upload_over_the_limit_is_refused_while_it_streams(service, counted,
                                                                     monkeypatch):
  url, count = counted
  monkeypatch.setattr(service, "max_upload_bytes", 1 << 20)
  status, answer, _ = _raw_chunked_post(url, 3 << 20)
  assert status == "HTTP/1.1 413 Request Entity Too Large", answer
  assert "over the 1 MB limit (--max_upload_mb)" in answer
  # The server stopped reading just past the limit (plus the form's 64 KiB and what uvicorn
  # had buffered), not at the end of the 3 MiB.
  assert (1 << 20) < count.read["/api/search"] <= (1 << 20) + (1 << 16) + (1 << 18)


def _png_header(width, height):
  """A tiny PNG file whose header declares width x height pixels."""
  import struct  # pylint: disable=g-import-not-at-top
  import zlib  # pylint: disable=g-import-not-at-top

  def chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
          + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))


def test_an_image_of_too_many_pixels_is_refused_in_a_second_before_decoding(service, live,
                                                                            monkeypatch):
  import httpx  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  serve.refuse_bombs()  # as serve() and Background set it up (pytest resets warning filters)
  for width, height, said in ((12_000, 12_000, "has over 89 million pixels"),  # past Pillow's limit
                              (8_000, 6_000, "is 8000 x 6000 pixels")):
    bomb = _png_header(width, height)  # megapixels in a few hundred bytes
    assert len(bomb) < 2000
    start = time.time()
    response = httpx.post(live + "/api/search", files={"image": ("b.png", bomb)}, timeout=30)
    assert time.time() - start < 1.0
    assert response.status_code == 413
    assert f"{said}, over the 40-megapixel limit (--max_megapixels)" in response.json()["error"]
  # Above Pillow's own limit, its decompression-bomb warning is an error too.
  monkeypatch.setattr(service, "max_pixels", 10**9)
  start = time.time()
  response = httpx.post(live + "/api/search", files={"image": ("b.png", _png_header(12_000, 12_000))},
                        timeout=30)
  assert time.time() - start < 1.0
  assert response.status_code == 400 and "DecompressionBomb" in response.json()["error"]


def test_an_unexpected_failure_is_a_500_in_json_and_the_server_keeps_serving(service, live,
                                                                            queries, monkeypatch,
                                                                            caplog):
  def broken(*args):
    raise RuntimeError("something unforeseen")

  monkeypatch.setattr(service, "answer", broken)
  import httpx  # pylint: disable=g-import-not-at-top
  with open(queries[0][0], "rb") as f:
    response = httpx.post(live + "/api/search", files={"image": ("q.png", f.read())}, timeout=60)
  assert response.status_code == 500
  assert response.json() == {"error": "internal error (RuntimeError); the server logged the "
                                      "details and keeps serving."}
  assert "something unforeseen" in caplog.text
  monkeypatch.undo()
  assert _live_search(live, queries[0][0], 3, 8)["bits"] == 8


def test_only_this_servers_names_are_answered(service, live):
  import httpx  # pylint: disable=g-import-not-at-top
  # A page elsewhere whose DNS name was rebound to 127.0.0.1 sends its own name as the Host.
  response = httpx.get(live + "/api/health", headers={"Host": "attacker.example"})
  assert response.status_code == 400
  assert httpx.get(live + "/api/health").status_code == 200
  named = TestClient(serve.create_app(service, ["search.example"]),
                     base_url="http://search.example")
  assert named.get("/api/health").status_code == 200


def test_health_and_images_never_wait_behind_searches(service, live, queries):
  import httpx  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top
  release, work = threading.Event(), service._batcher._work  # pylint: disable=protected-access

  def stuck(requests):
    release.wait(60)
    return work(requests)

  service._batcher._work = stuck  # pylint: disable=protected-access
  try:
    with concurrent.futures.ThreadPoolExecutor(40) as pool:
      searches = [pool.submit(_live_search, live, queries[0][i % 4], 3, 8) for i in range(40)]
      for route in ("/api/health", "/api/images/3", "/api/random_query", "/report"):
        response = httpx.get(live + route, timeout=5)  # 40 searches stuck: answered all the same
        assert response.status_code == 200, route
      assert not any(s.done() for s in searches)
      release.set()
      assert all(s.result(timeout=120)["bits"] == 8 for s in searches)
  finally:
    release.set()
    service._batcher._work = work  # pylint: disable=protected-access


def _chromium():
  binary = shutil.which("chromium") or shutil.which("chromium-browser")
  driver = shutil.which("chromedriver")
  if not binary or not driver:
    why = "Chromium or chromedriver is not installed (Debian: apt install chromium chromium-driver)"
    if os.environ.get("CI") == "true":  # CI promises the browser test: missing is a failure
      pytest.fail(why)
    pytest.skip(why)
  webdriver = pytest.importorskip("selenium.webdriver")
  options = webdriver.ChromeOptions()
  options.binary_location = binary
  for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
              "--window-size=1200,900"):
    options.add_argument(arg)
  return webdriver.Chrome(options=options, service=webdriver.ChromeService(driver))


def test_page_in_headless_chromium(live, queries):
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.support.ui import Select, WebDriverWait  # pylint: disable=g-import-not-at-top
  browser = _chromium()
  try:
    browser.get(live + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda b: "database images" in b.find_element(By.ID, "info").text)
    Select(browser.find_element(By.ID, "k")).select_by_visible_text("5")
    browser.find_element(By.ID, "file").send_keys(queries[0][0])
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".result")) == 5
               and "nearest" in b.find_element(By.ID, "status").text)
    distances = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".result .distance")]
    expected = _live_search(live, queries[0][0], 5, 12)["results"]
    assert distances == [f"d={r['distance']}" for r in expected]
    thumbs = browser.find_elements(By.CSS_SELECTOR, ".result img")
    wait.until(lambda b: all(t.get_property("naturalWidth") > 0 for t in thumbs))
    # A random test image has a known class: every result is marked right or wrong.
    browser.find_element(By.ID, "random").click()
    wait.until(lambda b: "your image" not in b.find_element(By.ID, "query-caption").text
               and len(b.find_elements(By.CSS_SELECTOR, ".result.right, .result.wrong")) == 5)
  finally:
    browser.quit()


def test_serve_needs_a_trained_run_and_a_valid_port(tmp_path, tiny_run):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    serve.serve(tiny_config(), str(tmp_path / "missing"))
  with pytest.raises(ValueError, match="--port must be from 1 to 65535"):
    serve.serve(tiny_config(), tiny_run, port=70000)


def test_the_library_never_imports_the_web_server():
  code = ("import sys, fgir_jax, fgir_jax.index, fgir_jax.train.pipeline, fgir_jax.commands.search;"
          "print(sorted(m for m in ('starlette', 'uvicorn', 'python_multipart', 'markdown') "
          "if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert json.loads(out.stdout.strip().replace("'", '"')) == []
