"""Serve a trained model's predictions over HTTP.

    jaxcls-serve --workdir DIR [--host 127.0.0.1] [--port 8000] [--max-batch 32 |
        --batch-sizes 1,2,4,8,16,32] [--max-wait-ms 5] [--max-body-mb 20] [--step N] [--tta]
        [--workers N]

    curl --data-binary @photo.jpg -H 'Content-Type: image/jpeg' localhost:8000/predict
    curl -F image=@a.jpg -F image=@b.png 'localhost:8000/predict?top_k=2'

The routes, the batching and the error answers are described in `jaxcls/serve/server.py`
and docs/predict_and_export.md. It listens on 127.0.0.1 (this machine only) unless --host
says otherwise; `--port 0` picks a free port. Once the model is compiled it prints
`Serving ... on http://HOST:PORT` on stdout. Ctrl-C (or SIGTERM) stops it after the
requests in flight are answered.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys
from typing import Sequence

from jaxcls.cli import common

DEFAULT_PORT = 8000


def build_parser() -> common.Parser:
  from jaxcls.serve.predictor import DEFAULT_TOP_K
  parser = common.Parser(
      prog="jaxcls-serve",
      description="Serve a jaxcls model over HTTP: POST /predict (an image body, or a "
                  "multipart form with one 'image' file field per image; ?top_k=K, "
                  f"default {DEFAULT_TOP_K}), GET /health, GET /info.")
  parser.add_argument("--workdir", required=True, help="The training run's workdir.")
  parser.add_argument("--host", default="127.0.0.1",
                      help="Address to listen on (default 127.0.0.1: this machine only; "
                           "0.0.0.0 for every interface; there is no authentication).")
  parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                      help=f"Port (default {DEFAULT_PORT}; 0 picks a free one).")
  parser.add_argument("--step", type=int, default=None,
                      help="Checkpoint step to serve (default: the best by val accuracy).")
  common.add_weights_flag(parser)
  parser.add_argument("--max-batch", type=common.positive_int, default=None,
                      help="Most images per model call (default 32). Calls are padded to "
                           "1, 2, 4, ... up to this, each compiled at start-up.")
  parser.add_argument("--batch-sizes", default=None, metavar="N,N,...",
                      help="The padded sizes instead, e.g. 1,8,32: fewer compile faster "
                           "and suit an accelerator; on a CPU, whose compute grows with the "
                           "padded size, they waste more (the largest is the most images "
                           "per call).")
  parser.add_argument("--max-wait-ms", type=float, default=5.0,
                      help="How long an image waits for images not yet received to "
                           "share its model call (default 5 ms). Images of requests "
                           "already received and being decoded are waited for when they "
                           "fit in the call's padding.")
  parser.add_argument("--max-body-mb", type=float, default=20.0,
                      help="Largest request body accepted, in MiB (default 20); larger "
                           "ones get 413.")
  parser.add_argument("--workers", type=int, default=0,
                      help="Decode threads (default 0: one per CPU core).")
  parser.add_argument("--tta", action="store_true",
                      help="Average the probabilities of each image and its mirror image.")
  parser.add_argument("--no-access-log", action="store_true",
                      help="Do not log one line per request.")
  common.add_cache_flags(parser)
  return parser


def batch_sizes(args) -> tuple[int, ...]:
  """The padded batch sizes from --batch-sizes or --max-batch."""
  from jaxcls.serve import server
  if args.batch_sizes is None:
    return server.default_batch_sizes(args.max_batch or server.DEFAULT_MAX_BATCH)
  try:
    sizes = server.check_batch_sizes([int(s) for s in args.batch_sizes.split(",")])
  except ValueError:
    raise common.UsageError(f"--batch-sizes '{args.batch_sizes}': use positive whole "
                            "numbers separated by commas, e.g. 1,8,32.") from None
  if args.max_batch is not None and args.max_batch != sizes[-1]:
    raise common.UsageError(f"--max-batch {args.max_batch} and --batch-sizes "
                            f"'{args.batch_sizes}' disagree: the largest batch size is "
                            "the most images per call; pass one of the two.")
  return sizes


def _check(args) -> None:
  if not 0 <= args.port <= 65535:
    raise common.UsageError(f"--port {args.port}: use 0 to 65535 (0: any free port).")
  if args.max_wait_ms < 0 or args.max_body_mb <= 0 or args.workers < 0:
    raise common.UsageError(
        f"--max-wait-ms {args.max_wait_ms}, --max-body-mb {args.max_body_mb}, --workers "
        f"{args.workers}: use --max-wait-ms >= 0, --max-body-mb > 0 and --workers >= 0.")
  try:
    import fastapi  # noqa: F401
    import python_multipart  # noqa: F401
    import uvicorn  # noqa: F401
  except ImportError as e:
    raise common.UsageError(f"jaxcls-serve needs the serve extra ({e.name} is missing): "
                            "pip install 'jaxcls[serve]'.") from None


def bind(host: str, port: int) -> socket.socket:
  """A socket bound to host:port (IPv4 or IPv6); UsageError naming the problem if not."""
  try:
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
  except OSError as e:
    raise common.UsageError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick "
                            "another --port (0: any free port) or --host.") from None
  return sock


def _is_loopback(host: str) -> bool:
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return host == "localhost"


def _log_to_stderr() -> None:
  """jaxcls.serve's messages (the compile time, failed model calls) next to uvicorn's;
  a handler on jaxcls's logger only, not the root's, so embedding programs keep theirs."""
  logger = logging.getLogger("jaxcls")
  if not logger.handlers:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:    %(message)s"))
    logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  # Not also through the root logger, which a library (absl, through JAX) may have given
  # a handler of its own: each message once.
  logger.propagate = False


def _serve(argv) -> int:
  args, _ = common.parse(build_parser(), argv)
  _check(args)
  sizes = batch_sizes(args)
  common.enable_compilation_cache(args.compilation_cache, args.no_compilation_cache)
  import uvicorn
  from jaxcls.serve import Predictor, server
  predictor = Predictor.from_workdir(args.workdir, step=args.step, weights=args.weights,
                                     tta=args.tta)
  print(f"Loaded {predictor.checkpoint_description} from {args.workdir}", file=sys.stderr)
  sock = bind(args.host, args.port)
  port = sock.getsockname()[1]
  url = f"http://{f'[{args.host}]' if ':' in args.host else args.host}:{port}"
  if not _is_loopback(args.host):
    print(f"warning: listening on {args.host}: other machines can reach {url}, and the "
          "server has no authentication.", file=sys.stderr)
  _log_to_stderr()
  app = server.create_app(predictor, batch_sizes=sizes,
                          max_wait_ms=args.max_wait_ms,
                          max_body_bytes=int(args.max_body_mb * 2**20),
                          decode_workers=args.workers)

  class Server(uvicorn.Server):
    async def startup(self, sockets=None):
      await super().startup(sockets)  # Lifespan first: the model is compiled by now.
      if self.started:
        print(f"Serving {predictor.checkpoint_description} on {url}", flush=True)

  # asyncio's own loop: with uvloop, Ctrl-C ends in a traceback (uvicorn issue #1579).
  config = uvicorn.Config(app, log_level="info", access_log=not args.no_access_log,
                          lifespan="on", loop="asyncio")
  try:
    Server(config).run(sockets=[sock])
  except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it has already handled.
    pass
  print("Stopped.", file=sys.stderr)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  common.configure_process()
  return common.run(lambda: _serve(argv))


def cli() -> None:
  sys.exit(main())


if __name__ == "__main__":
  cli()
