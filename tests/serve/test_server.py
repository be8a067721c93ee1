"""The HTTP server: the Predictor's answers under concurrent load, batched, never
recompiling; every kind of bad input a 4xx JSON error while the others are answered."""

import asyncio
import concurrent.futures
import contextlib
import http.client
import io
import json
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import tomllib
import zlib

import httpx
import jax
import numpy as np
import pytest
import uvicorn
from PIL import Image

from conftest import ROOT
from jaxcls.cli import serve as serve_cli
from jaxcls.serve import predictor as predict_lib
from jaxcls.serve import server
from numerics import TINY_CNN_FORWARD, assert_normwise_close

LIMIT = 2**20  # The test server's body limit: 1 MiB.
DEADLINE_S = 120  # Generous: a loaded 2-core machine compiles slowly.


@pytest.fixture(scope="module")
def predictor(predict_workdir):
  return predict_lib.Predictor.from_workdir(predict_workdir, batch_size=16)


def _encode(seed: int, fmt: str = "JPEG", size=(40, 30)) -> bytes:
  """An image unlike the others (each seed its own colours and size), encoded."""
  rng = np.random.default_rng(seed)
  pixels = rng.integers(0, 256, (size[1] + seed % 7, size[0] + seed % 5, 3), np.uint8)
  pixels[: size[1] // 3] = rng.integers(0, 256, 3)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format=fmt)
  return buffer.getvalue()


def _bomb_png(width=20_000, height=20_000) -> bytes:
  """A 45-byte PNG whose header claims width x height pixels: a decompression bomb."""
  def chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


JPEG = _encode(0)
BAD = {  # name: (body, Content-Type, status, the error message's start)
    "empty": (b"", "image/jpeg", 400, "empty body: send an image's bytes"),
    "not an image": (b"hello, not an image", "image/png", 415,
                     "not an image file Pillow can identify"),
    "three bytes": (b"abc", "application/octet-stream", 415,
                    "not an image file Pillow can identify"),
    "truncated JPEG": (JPEG[:len(JPEG) // 2], "image/jpeg", 400,
                       "cannot decode: image file is truncated"),
    "decompression bomb": (_bomb_png(), "image/png", 413,
                           "possible decompression bomb (Image size (400000000 pixels)"),
    "text body": (JPEG, "text/plain", 415, "Content-Type 'text/plain' is not an image"),
}


@contextlib.contextmanager
def running(app):
  """`app` served by uvicorn in a thread on a free loopback port; yields its URL."""
  sock = serve_cli.bind("127.0.0.1", 0)
  config = uvicorn.Config(app, log_level="warning", lifespan="on", loop="asyncio")
  uv = uvicorn.Server(config)
  thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
  thread.start()
  deadline = time.monotonic() + DEADLINE_S
  while not uv.started:
    assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
    time.sleep(0.05)
  try:
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
  finally:
    uv.should_exit = True
    thread.join(DEADLINE_S)
    sock.close()
  assert not thread.is_alive()


@pytest.fixture(scope="module")
def served(predictor):
  """(URL, app) of a server for the tiny CNN: batches of 1 or 8, 1 MiB bodies."""
  app = server.create_app(predictor, batch_sizes=(1, 8), max_wait_ms=20,
                          max_body_bytes=LIMIT, decode_workers=2)
  with running(app) as url:
    yield url, app


def _post(url, body, content_type=None, params=None, files=None):
  headers = {"Content-Type": content_type} if content_type else {}
  return httpx.post(url + "/predict", content=body, headers=headers, params=params,
                    files=files, timeout=DEADLINE_S)


def _requests():
  """A shuffled mix: 24 good images, 12 bad bodies, 4 forms of good and bad images."""
  good = [("good", _encode(seed, "PNG" if seed % 3 else "JPEG")) for seed in range(1, 25)]
  bad = [(name, None) for name in BAD] * 2
  forms = [("form", [_encode(100 + i), b"not an image", _encode(200 + i, "PNG")])
           for i in range(4)]
  mixed = good + bad + forms
  order = np.random.default_rng(0).permutation(len(mixed))
  return [mixed[i] for i in order]


def _send(url, kind, payload):
  if kind == "good":
    return _post(url, payload, "image/png" if payload[:4] == b"\x89PNG" else "image/jpeg",
                 params={"top_k": 2})
  if kind == "form":
    files = [("image", (f"{i}.img", data, "application/octet-stream"))
             for i, data in enumerate(payload)]
    return _post(url, None, files=files, params={"top_k": 2})
  body, content_type, _, _ = BAD[kind]
  return _post(url, body, content_type)


class CompileEvents:
  """Counts JAX's trace, lowering and compile events while active (jax.monitoring)."""

  def __init__(self):
    self.events = []

  def __call__(self, event, duration, **kwargs):
    if event.startswith("/jax/core/compile/"):
      self.events.append((event, kwargs.get("fun_name")))

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self)


def test_concurrent_mixed_requests_get_the_predictors_answers_without_compiling(
    served, predictor):
  url, app = served
  requests = _requests()
  compiled = predict_lib.predict._cache_size()
  with CompileEvents() as compiles, concurrent.futures.ThreadPoolExecutor(8) as pool:
    responses = list(pool.map(lambda r: _send(url, *r), requests))
  assert compiles.events == [] and predict_lib.predict._cache_size() == compiled

  answers, expected = {}, {}
  for i, ((kind, payload), response) in enumerate(zip(requests, responses)):
    if kind == "good":
      assert response.status_code == 200, response.text
      answers[i], expected[i] = [response.json()], predictor.predict_images([payload],
                                                                           top_k=2)
    elif kind == "form":
      assert response.status_code == 200, response.text
      entries = response.json()["predictions"]
      assert [e["filename"] for e in entries] == ["0.img", "1.img", "2.img"]
      assert entries[1] == {"filename": "1.img",
                            "error": "not an image file Pillow can identify"}
      answers[i] = [entries[0], entries[2]]
      expected[i] = predictor.predict_images([payload[0], payload[2]], top_k=2)
    else:
      _, _, status, message = BAD[kind]
      assert response.status_code == status, (kind, response.text)
      assert list(response.json()) == ["error"], response.text
      assert response.json()["error"].startswith(message), (kind, response.text)
  _assert_same_answers(answers, expected, predictor.class_names)
  info = httpx.get(url + "/info").json()
  assert info["images"] >= 24 + 8 and sum(info["model_calls"].values()) >= 1


def _assert_same_answers(answers, expected, class_names):
  """Labels and top-k labels equal; probabilities to float32 rounding (the server's
  batches have other sizes than the Predictor's, and the kernels may sum in other
  orders), by tests/numerics.py's bound for the tiny CNN's forward pass."""
  got, want = {}, {}
  for key in answers:
    for n, (a, e) in enumerate(zip(answers[key], expected[key], strict=True)):
      assert a["label"] == e.label
      assert [t["label"] for t in a["top_k"]] == [name for name, _ in e.top_k]
      assert a["probability"] == a["probabilities"][a["label"]]
      got[(key, n)] = np.array([a["probabilities"][c] for c in class_names])
      want[(key, n)] = np.array([e.probabilities[c] for c in class_names])
  assert_normwise_close(got, want, TINY_CNN_FORWARD, "server vs Predictor")


def test_health_and_info(served, predictor):
  url, _ = served
  assert httpx.get(url + "/health").json() == {"status": "ok"}
  info = httpx.get(url + "/info").json()
  assert {k: info[k] for k in ("class_names", "image_size", "step", "description",
                               "batch_sizes", "max_body_bytes", "default_top_k")} == {
      "class_names": ["disc", "stripes"], "image_size": 16, "step": 6,
      "description": predictor.checkpoint_description, "batch_sizes": [1, 8],
      "max_body_bytes": LIMIT, "default_top_k": 1}
  assert predictor.checkpoint_description == "the latest checkpoint: step 6 (mid-epoch 2)"


def test_one_image_answer_has_every_field_and_default_top_k(served, predictor):
  url, _ = served
  answer = _post(url, JPEG, "image/jpeg").json()
  assert list(answer) == ["label", "probability", "probabilities", "top_k"]
  assert answer["top_k"] == [{"label": answer["label"],
                              "probability": answer["probability"]}]
  assert sorted(answer["probabilities"]) == ["disc", "stripes"]
  _assert_same_answers({0: [answer]}, {0: predictor.predict_images([JPEG])},
                       predictor.class_names)
  # A top_k over the class count is capped at it, like the Predictor's.
  assert len(_post(url, JPEG, params={"top_k": 5}).json()["top_k"]) == 2


@pytest.mark.parametrize("params, files, message", [
    ({"top_k": "0"}, None, "top_k='0': use a whole number from 1 (the most probable "
                           "class) to 2 (every class)."),
    ({"top_k": "two"}, None, "top_k='two': use a whole number from 1"),
    (None, [("photo", ("a.jpg", JPEG, "image/jpeg"))],
     "unexpected form field(s) ['photo']: send each image as a file in a field named "
     "'image' (curl -F image=@a.jpg -F image=@b.jpg)."),
])
def test_bad_parameters_and_form_fields_are_400(served, params, files, message):
  url, _ = served
  response = _post(url, None if files else JPEG, None if files else "image/jpeg",
                   params=params, files=files)
  assert response.status_code == 400, response.text
  assert response.json()["error"].startswith(message), response.text


def test_forms_answer_each_image_or_say_why_not(served):
  url, _ = served
  entries = _post(url, None, files=[("image", ("e.jpg", b"", "image/jpeg")),
                                    ("image", (None, "just text")),
                                    ("image", ("a.jpg", JPEG, "image/jpeg"))]).json()
  assert entries["predictions"][:2] == [
      {"filename": "e.jpg", "error": "empty file (0 bytes)"},
      {"filename": None, "error": "an 'image' field holds text, not a file: send it as "
                                  "curl -F image=@FILE does."}]
  assert entries["predictions"][2]["filename"] == "a.jpg"
  assert entries["predictions"][2]["label"] in ("disc", "stripes")
  malformed = _post(url, b"not a form", "multipart/form-data")
  assert malformed.status_code == 400
  assert malformed.json() == {"error": "cannot read the multipart form: Missing "
                                       "boundary in multipart."}
  no_image = _post(url, b"", "multipart/form-data; boundary=x")
  assert no_image.status_code == 400, no_image.text
  assert no_image.json()["error"].startswith("the form has no 'image' field")


def test_unknown_routes_answer_json_errors(served):
  url, _ = served
  missing = httpx.get(url + "/nope")
  assert missing.status_code == 404
  assert missing.json() == {"error": "Not Found: GET /nope; the routes are POST "
                                     "/predict, GET /health and GET /info."}
  assert httpx.get(url + "/predict").status_code == 405


def test_body_limit(served):
  """Bodies over the limit get 413, whether their length is declared, streamed in
  chunks, or declared and never sent (Expect: 100-continue); at the limit, the body is
  read as an image. The server answers the next request."""
  url, _ = served
  message = f"request body is over the limit of {LIMIT:,} bytes"
  over = _post(url, b"\0" * (LIMIT + 1), "image/jpeg")
  assert over.status_code == 413 and over.json()["error"].startswith(message)
  chunks = (b"\0" * (64 * 1024) for _ in range(LIMIT // (64 * 1024) + 1))
  streamed = _post(url, chunks, "image/jpeg")
  assert streamed.request.headers["transfer-encoding"] == "chunked"
  assert streamed.status_code == 413 and streamed.json()["error"].startswith(message)
  status, error = _expect_continue(url, 50 * LIMIT)
  assert status == 413 and error.startswith(message)
  at_limit = _post(url, b"\0" * LIMIT, "image/jpeg")
  assert at_limit.status_code == 415, at_limit.text
  assert _post(url, JPEG, "image/jpeg").status_code == 200


def _expect_continue(url, length):
  """(status, error) for headers declaring `length` bytes, sent without the body."""
  host, port = url.removeprefix("http://").split(":")
  conn = http.client.HTTPConnection(host, int(port), timeout=DEADLINE_S)
  try:
    conn.putrequest("POST", "/predict")
    conn.putheader("Content-Type", "image/jpeg")
    conn.putheader("Content-Length", str(length))
    conn.putheader("Expect", "100-continue")
    conn.endheaders()
    response = conn.getresponse()
    return response.status, json.loads(response.read())["error"]
  finally:
    conn.close()


def test_batch_sizes():
  assert server.default_batch_sizes(1) == (1,)
  assert server.default_batch_sizes(2) == (1, 2)
  assert server.default_batch_sizes(32) == (1, 2, 4, 8, 16, 32)
  assert server.default_batch_sizes(48) == (1, 2, 4, 8, 16, 32, 48)
  assert server.check_batch_sizes([32, 1, 8, 8]) == (1, 8, 32)
  for bad in ([], [0, 8], [2.5]):
    with pytest.raises(ValueError, match="use positive whole numbers"):
      server.check_batch_sizes(bad)


def test_serving_model_pads_to_fixed_sizes_and_matches_the_predictor(predictor):
  model = server.ServingModel(predictor, (8, 1))
  images = np.stack([predictor._load(_encode(seed)) for seed in range(8)])
  want, want_labels = predictor.predict_arrays(images)
  for n in (1, 3, 8):
    probs, labels = model.run(list(images[:n]))
    assert probs.shape == (n, 2)
    np.testing.assert_array_equal(labels, want_labels[:n])
    assert_normwise_close(probs, want[:n], TINY_CNN_FORWARD, f"{n} images")
  assert dict(model.calls) == {1: 1, 8: 2} and model.images == 12


def _batched(model, max_wait_s, scenario):
  """Runs `scenario(batcher)` against a running Batcher for `model`."""
  async def main():
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      batcher = server.Batcher(model.run, model.sizes, max_wait_s, pool)
      worker = asyncio.create_task(batcher.run())
      try:
        async with asyncio.timeout(DEADLINE_S):
          return await scenario(batcher)
      finally:
        worker.cancel()
  return asyncio.run(main())


def test_images_submitted_together_share_one_model_call(predictor):
  """Five requests at once fill a batch of five (no wait: max_wait is a minute); three
  with a 50 ms wait share one padded call; results are the Predictor's."""
  model = server.ServingModel(predictor, (1, 5))
  images = [predictor._load(_encode(seed)) for seed in range(5)]

  async def submit(batcher, items):
    return await asyncio.gather(*(batcher.submit(x) for x in items))

  five = _batched(model, 60.0, lambda b: submit(b, images))
  assert dict(model.calls) == {5: 1}
  three = _batched(model, 0.05, lambda b: submit(b, images[:3]))
  assert dict(model.calls) == {5: 2} and model.images == 8
  want, want_labels = predictor.predict_arrays(np.stack(images))
  for results, n in ((five, 5), (three, 3)):
    assert [label for _, label in results] == list(want_labels[:n])
    assert_normwise_close(np.stack([p for p, _ in results]), want[:n], TINY_CNN_FORWARD)


def test_a_call_with_padding_to_spare_waits_for_images_being_decoded(predictor):
  """With no wait at all (max_wait 0), two images wait while two others are still being
  decoded, since their call is padded to 5 anyway; then all four share that call."""
  model = server.ServingModel(predictor, (1, 5))
  images = [predictor._load(_encode(seed)) for seed in range(4)]

  async def scenario(batcher):
    decoded = asyncio.Event()

    async def decoding(image):
      with batcher.incoming():
        await decoded.wait()
      return await batcher.submit(image)

    late = [asyncio.create_task(decoding(x)) for x in images[2:]]
    first = [asyncio.create_task(batcher.submit(x)) for x in images[:2]]
    for _ in range(50):  # The batcher gets every chance to run a call.
      await asyncio.sleep(0)
    assert batcher.queued == 2 and model.images == 0
    decoded.set()
    return await asyncio.gather(*first, *late)

  results = _batched(model, 0.0, scenario)
  assert dict(model.calls) == {5: 1} and model.images == 4
  _, want_labels = predictor.predict_arrays(np.stack(images))
  assert [label for _, label in results] == list(want_labels)


def test_console_script_is_declared():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  assert project["scripts"]["jaxcls-serve"] == "jaxcls.cli.serve:cli"
  assert callable(serve_cli.cli)
  extra = " ".join(project["optional-dependencies"]["serve"])
  for package in ("fastapi", "uvicorn", "python-multipart"):
    assert package in extra and package in " ".join(
        project["optional-dependencies"]["test"])


def test_help_lists_every_flag():
  text = serve_cli.build_parser().format_help()
  for flag in ("--workdir", "--host", "--port", "--step", "--max-batch", "--batch-sizes",
               "--max-wait-ms", "--max-body-mb", "--workers", "--tta", "--no-access-log",
               "--compilation-cache"):
    assert flag in text, flag
  assert "default 127.0.0.1" in text and "'image' file field per image" in text
  # Anything but these gets a warning that other machines can reach the server.
  assert all(map(serve_cli._is_loopback, ("127.0.0.1", "::1", "localhost")))
  assert not any(map(serve_cli._is_loopback, ("0.0.0.0", "::", "192.168.1.2")))


def test_program_errors_are_one_line_and_status_2(predict_workdir, tmp_path, capsys):
  assert serve_cli.main(["--workdir", str(tmp_path / "none")]) == 2
  assert "error: No checkpoints in" in capsys.readouterr().err
  with socket.socket() as busy:
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    assert serve_cli.main(["--workdir", predict_workdir, "--port", str(port)]) == 2
  err = capsys.readouterr().err
  assert f"error: cannot listen on 127.0.0.1:{port} (Address already in use); pick " \
         "another --port" in err and "Traceback" not in err
  assert serve_cli.main(["--workdir", predict_workdir, "--max-wait-ms", "-1"]) == 2
  assert "use --max-wait-ms >= 0" in capsys.readouterr().err
  assert serve_cli.main(["--workdir", predict_workdir, "--batch-sizes", "1,x"]) == 2
  assert "error: --batch-sizes '1,x': use positive whole numbers separated by commas" \
      in capsys.readouterr().err
  assert serve_cli.main(["--workdir", predict_workdir, "--batch-sizes", "1,4",
                         "--max-batch", "8"]) == 2
  assert "error: --max-batch 8 and --batch-sizes '1,4' disagree" in capsys.readouterr().err


def _lines(stream, into: queue.Queue):
  for line in stream:
    into.put(line)


@pytest.mark.slow
def test_program_serves_until_ctrl_c(predict_workdir, predictor, tmp_path):
  """`python -m jaxcls.cli.serve --port 0`: announces its URL once compiled, answers as
  the Predictor does, stops on SIGINT with status 0."""
  with open(tmp_path / "stderr.txt", "w") as err:
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxcls.cli.serve", "--workdir", predict_workdir,
         "--port", "0", "--batch-sizes", "1,2,8"], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=err, text=True, env={**os.environ, "PYTHONPATH": ROOT})
  lines = queue.Queue()
  threading.Thread(target=_lines, args=(proc.stdout, lines), daemon=True).start()
  try:
    first = lines.get(timeout=DEADLINE_S)
    assert first.startswith(f"Serving {predictor.checkpoint_description} on "
                            "http://127.0.0.1:"), first
    url = first.split()[-1]
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    answer = _post(url, JPEG, "image/jpeg").json()
    _assert_same_answers({0: [answer]}, {0: predictor.predict_images([JPEG])},
                         predictor.class_names)
  finally:
    proc.send_signal(signal.SIGINT)
    code = proc.wait(DEADLINE_S)
  log = (tmp_path / "stderr.txt").read_text()
  assert code == 0, log
  assert log.count("Compiled batch sizes [1, 2, 8]") == 1, log  # Logged once.
  assert log.rstrip().endswith("Stopped.")
  assert "Traceback" not in log
