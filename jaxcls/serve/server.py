"""An HTTP prediction server: `create_app(predictor)` is a FastAPI app (run it with uvicorn).

    POST /predict[?top_k=K]   one image as the raw body (any image/* type or
                              application/octet-stream), or a multipart/form-data form with
                              one file field named "image" per image
    GET  /health              {"status": "ok"} once the model is compiled
    GET  /info                class names, image size, checkpoint step and description,
                              batching settings and counts

Requests that arrive together share one model call: the `Batcher` lets the first image
wait `max_wait_ms` for others (or until the largest batch is waiting; longer only for
images of requests already received and still being decoded, when they fit in the
padding the call has anyway), and the `ServingModel` pads the batch to the next of a few
fixed sizes (`default_batch_sizes`: 1, 2, 4, ..., 32), all compiled at start-up, so no
request ever waits for a compilation. Decoding
(`jaxcls.data.preprocess.load_image`, training's own) runs in a thread pool and the model
in a thread of its own, so the event loop keeps accepting requests meanwhile.

Bad input gets a JSON error `{"error": "..."}` naming the problem: 400 (empty, truncated
or undecodable image, bad form or top_k), 413 (a body over `max_body_bytes`, or an image
over preprocess.MAX_PIXELS), 415 (not an image, or a Content-Type that is neither an
image nor a form). In a form, each image gets its own entry, and a bad one is an entry
with "error" among the others' results.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import time
from typing import Callable, Sequence

import jax
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from jaxcls.data import preprocess, sources
from jaxcls.errors import JaxclsError
from jaxcls.serve.predictor import DEFAULT_TOP_K, Predictor, predict

DEFAULT_MAX_BATCH = 32
DEFAULT_MAX_WAIT_MS = 5.0
DEFAULT_MAX_BODY_MB = 20.0
IMAGE_FIELD = "image"  # The multipart field name, repeated once per image.
# Besides image/*: "" is no Content-Type, and curl's --data-binary sends the form type
# unless told otherwise, so a bare `curl --data-binary @photo.jpg` works.
RAW_TYPES = ("application/octet-stream", "application/x-www-form-urlencoded", "")

log = logging.getLogger("jaxcls.serve")


class RequestError(JaxclsError):
  """A request the server cannot answer; becomes `{"error": message}` with `status`."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status
    self.message = message


def check_batch_sizes(sizes: Sequence[int]) -> tuple[int, ...]:
  """`sizes` sorted, without repeats; ValueError unless they are positive whole numbers."""
  if not sizes or any(not isinstance(s, (int, np.integer)) or s < 1 for s in sizes):
    raise ValueError(f"batch sizes {tuple(sizes)}: use positive whole numbers, e.g. "
                     "(1, 8, 32).")
  return tuple(sorted({int(s) for s in sizes}))


def default_batch_sizes(max_batch: int) -> tuple[int, ...]:
  """The padded batch sizes: powers of two below max_batch, then max_batch (as the
  Predictor pads).

  One shape per size is compiled at start-up. At most half of a call's rows are
  padding: on a CPU, whose compute grows with the padded size, sparser sizes such as
  1, 8, 32 cost up to twice the CPU time per image when concurrent requests split into
  partial batches (benchmarks/README.md, "Serving over HTTP"); on an accelerator they
  cost little and compile faster (`create_app(batch_sizes=...)`, `--batch-sizes`).
  """
  if max_batch < 1:
    raise ValueError(f"max_batch={max_batch}; use at least 1.")
  sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
  return tuple(sizes + [max_batch])


class ServingModel:
  """The Predictor's model and variables behind the jitted `predict`, at fixed batch sizes.

  `run` is blocking (call it from one thread); `warm_up` compiles every size.
  """

  def __init__(self, predictor: Predictor,
               sizes: Sequence[int] = default_batch_sizes(DEFAULT_MAX_BATCH)):
    self.predictor = predictor
    self.sizes = check_batch_sizes(sizes)
    self.variables = jax.device_put(predictor.variables)  # Once, not per call.
    self.calls = collections.Counter()  # Padded batch size -> model calls.
    self.images = 0

  def warm_up(self) -> float:
    """Compiles `predict` for every batch size; returns the seconds it took."""
    start = time.perf_counter()
    shape = (self.predictor.image_size, self.predictor.image_size, 3)
    for size in self.sizes:
      self._predict(np.zeros((size,) + shape, np.uint8))
    return time.perf_counter() - start

  def _predict(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return jax.device_get(predict(self.variables, batch, model=self.predictor.model,
                                  tta=self.predictor.tta))

  def run(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities [n, C] and labels [n] for n <= max(sizes) preprocessed images."""
    n = len(images)
    size = next(s for s in self.sizes if s >= n)
    batch = np.zeros((size,) + images[0].shape, np.uint8)
    batch[:n] = np.stack(images)
    probs, labels = self._predict(batch)
    self.calls[size] += 1
    self.images += n
    return probs[:n], labels[:n]


class Batcher:
  """Gathers the images of concurrent requests into calls of `run_batch`.

  A call goes when `max_batch` (the largest of `sizes`) images are waiting, or when the
  oldest has waited `max_wait_s` - unless images still being decoded (see `incoming`)
  would fill padding the call has anyway: they arrived together with the others, and
  taking them costs no compute, where leaving them costs them a whole model call.
  `run_batch` is blocking and runs on `executor`; while it runs, new images queue for
  the next call.
  """

  def __init__(self, run_batch: Callable, sizes: Sequence[int], max_wait_s: float,
               executor: concurrent.futures.Executor):
    self.run_batch = run_batch
    self.sizes = tuple(sizes)
    self.max_wait_s = max_wait_s
    self.executor = executor
    self._waiting: list[tuple[float, np.ndarray, asyncio.Future]] = []
    self._decoding = 0
    self._changed = asyncio.Event()

  @property
  def queued(self) -> int:
    """Images waiting for a model call."""
    return len(self._waiting)

  @contextlib.contextmanager
  def incoming(self):
    """Marks one image being decoded for `submit` (an error may end it instead)."""
    self._decoding += 1
    try:
      yield
    finally:
      self._decoding -= 1
      self._changed.set()

  async def submit(self, image: np.ndarray) -> tuple[np.ndarray, int]:
    """(probabilities [C], label) for one preprocessed image."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    self._waiting.append((loop.time(), image, future))
    self._changed.set()
    return await future

  def _wait_s(self, now: float) -> float | None:
    """0 when a call should go now, else how long to wait (None: until a change)."""
    n = len(self._waiting)
    if n == 0:
      return None
    if n >= self.sizes[-1]:
      return 0
    left = self._waiting[0][0] + self.max_wait_s - now
    if left > 0:
      return left
    padded = next(size for size in self.sizes if size >= n)
    return None if self._decoding and n < padded else 0

  async def run(self) -> None:
    """Answers batches until cancelled."""
    loop = asyncio.get_running_loop()
    while True:
      wait = self._wait_s(loop.time())
      if wait == 0:
        batch = self._waiting[:self.sizes[-1]]
        self._waiting = self._waiting[self.sizes[-1]:]
        await self._answer([(x, f) for _, x, f in batch if not f.done()], loop)
        continue
      self._changed.clear()
      with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(wait):
          await self._changed.wait()

  async def _answer(self, batch, loop) -> None:
    if not batch:  # Every request of it was cancelled.
      return
    try:
      probs, labels = await loop.run_in_executor(
          self.executor, self.run_batch, [image for image, _ in batch])
    except Exception as e:  # noqa: BLE001 - the requests fail, the batcher goes on.
      log.exception("model call failed")
      for _, future in batch:
        if not future.done():
          future.set_exception(RequestError(500, f"the model failed: {e}"))
      return
    for (_, future), p, label in zip(batch, probs, labels):
      if not future.done():  # Its request may have been cancelled meanwhile.
        future.set_result((p, int(label)))


def result_json(probs: np.ndarray, label: int, class_names: Sequence[str],
                top_k: int) -> dict:
  """One image's answer, as the Predictor's `Prediction` has it (without a path)."""
  order = np.argsort(-probs, kind="stable")[:top_k]
  return {"label": class_names[label], "probability": float(probs[label]),
          "probabilities": {c: float(p) for c, p in zip(class_names, probs)},
          "top_k": [{"label": class_names[j], "probability": float(probs[j])}
                    for j in order]}


def decode(data: bytes, image_size: int) -> np.ndarray:
  """The model's input for one encoded image; RequestError with the reason otherwise."""
  try:
    return preprocess.load_image(data, image_size)
  except preprocess.NotAnImageError as e:
    raise RequestError(415, e.reason) from None
  except preprocess.TooManyPixelsError as e:
    raise RequestError(413, e.reason) from None
  except preprocess.ImageError as e:
    raise RequestError(400, e.reason) from None
  except Exception as e:  # noqa: BLE001 - one bad image must not take the server down.
    raise RequestError(400, f"cannot decode: {type(e).__name__}: {e}") from None


def parse_top_k(text: str | None, class_count: int) -> int:
  """The `top_k` query parameter: a positive whole number, capped at the class count."""
  if text is None:
    return min(DEFAULT_TOP_K, class_count)
  try:
    k = int(text)
  except ValueError:
    k = 0
  if k < 1:
    raise RequestError(400, f"top_k={text!r}: use a whole number from 1 (the most "
                            f"probable class) to {class_count} (every class).")
  return min(k, class_count)


async def read_body(request: Request, limit: int) -> bytes:
  """The request body, or RequestError 413 if it is over `limit` bytes.

  Never holds more than `limit` bytes. A body known to be too large is still read (and
  dropped) unless the client asked `Expect: 100-continue`: a client that sends its whole
  body before reading the answer gets the 413 instead of a reset connection.
  """
  too_large = RequestError(
      413, f"request body is over the limit of {limit:,} bytes; send smaller images or "
           "fewer per request.")
  declared = request.headers.get("content-length", "")
  expects_continue = "100-continue" in request.headers.get("expect", "").lower()
  if declared.isdigit() and int(declared) > limit and expects_continue:
    raise too_large
  chunks, size = [], 0
  async for chunk in request.stream():
    size += len(chunk)
    if size <= limit:
      chunks.append(chunk)
  if size > limit:
    raise too_large
  return b"".join(chunks)


async def form_images(request: Request, body: bytes) -> list[tuple[str | None, object]]:
  """(filename, bytes or RequestError) for each "image" field of a multipart body."""
  async def stream():
    yield body
  try:
    form = await MultiPartParser(request.headers, stream()).parse()
  except MultiPartException as e:
    raise RequestError(400, f"cannot read the multipart form: {e.message}") from None
  try:
    other = sorted(set(form.keys()) - {IMAGE_FIELD})
    if other:
      raise RequestError(400, f"unexpected form field(s) {other}: send each image as a "
                              f"file in a field named '{IMAGE_FIELD}' (curl -F "
                              f"{IMAGE_FIELD}=@a.jpg -F {IMAGE_FIELD}=@b.jpg).")
    items = form.getlist(IMAGE_FIELD)
    if not items:
      raise RequestError(400, f"the form has no '{IMAGE_FIELD}' field: send each image "
                              f"as a file, e.g. curl -F {IMAGE_FIELD}=@photo.jpg.")
    out = []
    for item in items:
      if isinstance(item, UploadFile):
        out.append((item.filename, await item.read()))
      else:
        out.append((None, RequestError(400, f"an '{IMAGE_FIELD}' field holds text, not "
                                            f"a file: send it as curl -F {IMAGE_FIELD}"
                                            "=@FILE does.")))
    return out
  finally:
    await form.close()


def _error_response(status: int, message: str) -> JSONResponse:
  return JSONResponse({"error": message}, status_code=status)


class _Service:
  """What the routes share: the model, the batcher, the thread pools and the limits."""

  def __init__(self, predictor: Predictor, sizes: Sequence[int], max_wait_ms: float,
               max_body_bytes: int, decode_workers: int):
    if max_wait_ms < 0 or max_body_bytes < 1:
      raise ValueError(f"max_wait_ms={max_wait_ms}, max_body_bytes={max_body_bytes}; "
                       "use max_wait_ms >= 0 and max_body_bytes >= 1.")
    self.predictor = predictor
    self.model = ServingModel(predictor, sizes)
    self.max_wait_ms = max_wait_ms
    self.max_body_bytes = max_body_bytes
    self.model_thread = concurrent.futures.ThreadPoolExecutor(1, "jaxcls-model")
    self.decode_pool = concurrent.futures.ThreadPoolExecutor(
        sources.worker_count(decode_workers), "jaxcls-decode")
    self.batcher = None  # Made in the event loop, by `lifespan`.

  @contextlib.asynccontextmanager
  async def lifespan(self, app: FastAPI):
    loop = asyncio.get_running_loop()
    seconds = await loop.run_in_executor(self.model_thread, self.model.warm_up)
    log.info("Compiled batch sizes %s in %.1f s", list(self.model.sizes), seconds)
    self.batcher = Batcher(self.model.run, self.model.sizes, self.max_wait_ms / 1000,
                           self.model_thread)
    task = asyncio.create_task(self.batcher.run())
    try:
      yield
    finally:
      task.cancel()
      with contextlib.suppress(asyncio.CancelledError):
        await task
      for pool in (self.decode_pool, self.model_thread):
        # Let work already running finish (off the loop), so that no thread reports its
        # result to a closed event loop.
        await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)

  async def classify(self, data: bytes, top_k: int) -> dict:
    """One encoded image's answer; RequestError if it cannot be read."""
    loop = asyncio.get_running_loop()
    with self.batcher.incoming():
      image = await loop.run_in_executor(self.decode_pool, decode, data,
                                         self.predictor.image_size)
    probs, label = await self.batcher.submit(image)
    return result_json(probs, label, self.predictor.class_names, top_k)

  async def classify_entry(self, filename: str | None, item, top_k: int) -> dict:
    """A form image's entry: its filename, then its answer or its error."""
    try:
      if isinstance(item, RequestError):
        raise item
      if not item:
        raise RequestError(400, "empty file (0 bytes)")
      return {"filename": filename, **await self.classify(item, top_k)}
    except RequestError as e:
      return {"filename": filename, "error": e.message}

  async def predict_route(self, request: Request) -> JSONResponse:
    body = await read_body(request, self.max_body_bytes)  # First: see read_body.
    top_k = parse_top_k(request.query_params.get("top_k"),
                        len(self.predictor.class_names))
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
      items = await form_images(request, body)
      entries = await asyncio.gather(*(self.classify_entry(name, item, top_k)
                                       for name, item in items))
      return JSONResponse({"predictions": entries})
    if not (kind.startswith("image/") or kind in RAW_TYPES):
      raise RequestError(415, f"Content-Type '{kind}' is not an image: send the image's "
                              "bytes as image/* or application/octet-stream, or a "
                              f"multipart/form-data form with one '{IMAGE_FIELD}' file "
                              "field per image.")
    if not body:
      raise RequestError(400, "empty body: send an image's bytes, e.g. curl "
                              "--data-binary @photo.jpg.")
    return JSONResponse(await self.classify(body, top_k))

  async def health(self) -> dict:
    return {"status": "ok"}  # Routes answer only once `lifespan` has compiled the model.

  async def info(self) -> dict:
    p = self.predictor
    return {"class_names": list(p.class_names), "image_size": p.image_size,
            "step": p.step, "description": p.checkpoint_description, "tta": p.tta,
            "default_top_k": min(DEFAULT_TOP_K, len(p.class_names)),
            "batch_sizes": list(self.model.sizes), "max_wait_ms": self.max_wait_ms,
            "max_body_bytes": self.max_body_bytes, "queued": self.batcher.queued,
            "images": self.model.images,
            "model_calls": {str(size): self.model.calls[size] for size in self.model.sizes}}


def create_app(predictor: Predictor, *,
               batch_sizes: Sequence[int] = default_batch_sizes(DEFAULT_MAX_BATCH),
               max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
               max_body_bytes: int = int(DEFAULT_MAX_BODY_MB * 2**20),
               decode_workers: int = 0) -> FastAPI:
  """The server for `predictor` (its model, variables, classes and `tta`).

  A model call takes at most max(`batch_sizes`) images, padded to the next of
  `batch_sizes`, each compiled when the server starts (`default_batch_sizes(N)`: powers
  of two up to N; fewer sizes such as (1, 8, 32) start faster, and suit an accelerator,
  where a padded row costs little). An image waits `max_wait_ms` for others (and for images
  still being decoded that fit in its call's padding: `Batcher`). Bodies over
  `max_body_bytes` are refused. `decode_workers` threads decode (0: one per CPU core).
  """
  service = _Service(predictor, batch_sizes, max_wait_ms, max_body_bytes, decode_workers)
  app = FastAPI(title="jaxcls", lifespan=service.lifespan,
                description="Image classification with a jaxcls checkpoint.")
  app.state.service = service
  app.add_api_route("/predict", service.predict_route, methods=["POST"])
  app.add_api_route("/health", service.health, methods=["GET"])
  app.add_api_route("/info", service.info, methods=["GET"])

  @app.exception_handler(RequestError)
  async def request_error(request, e: RequestError):
    return _error_response(e.status, e.message)

  @app.exception_handler(HTTPException)
  async def http_error(request, e: HTTPException):  # 404, 405: the same error shape.
    return _error_response(e.status_code, f"{e.detail}: {request.method} "
                                          f"{request.url.path}; the routes are POST "
                                          "/predict, GET /health and GET /info.")

  @app.exception_handler(Exception)
  async def internal_error(request, e: Exception):
    log.exception("unexpected error")
    return _error_response(500, f"internal error: {type(e).__name__}: {e}")

  return app
