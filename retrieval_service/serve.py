"""The retrieval server: ``POST /retrieve`` as the Search-R1 reference server, plus ``GET /health``.

    python -m retrieval_service.serve --index INDEX_DIR [--host 127.0.0.1] [--port 8000]

Request ``{"queries": [...], "topk": 3, "return_scores": true}``; answer
``{"result": [[{"document": {"id", "contents"}, "score": s}, ...] per query]}``, or bare
documents per query when ``return_scores`` is false (its default, as in the reference).

Bad requests get a 4xx JSON answer ``{"error": message}`` and the server stays up. With
$DGPO_RETRIEVAL_TOKEN (or --token-file) set, ``/retrieve`` needs ``Authorization: Bearer TOKEN``.
The OpenAPI schema is at ``/openapi.json`` (browsable at ``/docs``).
"""

from __future__ import annotations

import argparse
import gc
import hmac
import ipaddress
import json
import logging
import os

import anyio
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from dgpo_jax.errors import InvalidArgumentError, MissingFileError, UserError, run_cli
from retrieval_service.index import SearchIndex, load_index

logger = logging.getLogger(__name__)

TOKEN_ENV_VAR = "DGPO_RETRIEVAL_TOKEN"


class RetrieveRequest(BaseModel):
    """Body of ``POST /retrieve`` (unknown fields are ignored, as in the reference)."""

    model_config = ConfigDict(extra="ignore")
    # fail_fast: a list of a million non-strings gets one error, not a million.
    queries: list[StrictStr] = Field(description="one search query per entry", fail_fast=True)
    topk: StrictInt | None = Field(
        default=None, description="documents per query (default: the server's)"
    )
    return_scores: StrictBool = Field(
        default=False, description="wrap each document with its score"
    )


class RetrievedDocument(BaseModel):
    id: str
    contents: str


class ScoredDocument(BaseModel):
    document: RetrievedDocument
    score: float


class RetrieveResponse(BaseModel):
    result: list[list[ScoredDocument]] | list[list[RetrievedDocument]]


class ApiError(Exception):
    def __init__(self, status_code: int, message: str):
        super().__init__(message)
        self.status_code = status_code
        self.message = message


def _error_response(status_code: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status_code, headers=headers)


_CLOSE = {"Connection": "close"}  # uvicorn then closes the connection after the answer


class RequestGuard:
    """ASGI middleware: bearer-token check, body size limit and body deadline, before parsing.

    A declared Content-Length over `max_body_bytes` is answered 413 at once, without reading
    the body; otherwise the body (chunked or not) is read here, stopping with 413 as soon as
    it passes `max_body_bytes`, and with 408 (and the connection closed) when it has not all
    arrived `body_timeout_s` seconds after the headers (a slow sender). Then it is handed on
    whole. A client that goes away mid-body gets nothing.
    """

    def __init__(
        self,
        app,
        max_body_bytes: int,
        token: str | None,
        protected_paths: tuple[str, ...],
        body_timeout_s: float | None = None,
    ):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.token = token
        self.protected_paths = protected_paths
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {
            name.decode("latin-1").lower(): value.decode("latin-1")
            for name, value in scope.get("headers", [])
        }
        if self.token is not None and scope.get("path") in self.protected_paths:
            supplied = headers.get("authorization", "")
            expected = f"Bearer {self.token}"
            if not hmac.compare_digest(supplied.encode(), expected.encode()):
                response = _error_response(
                    401,
                    "missing or wrong bearer token (Authorization: Bearer ...)",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, send)
                return
        declared = headers.get("content-length")
        if declared is not None:
            declared = declared.strip()
            if not (declared.isascii() and declared.isdigit()):
                await _error_response(
                    400, f"invalid Content-Length {declared[:40]!r}", headers=_CLOSE
                )(scope, receive, send)
                return
            if int(declared) > self.max_body_bytes:
                # Not read: the server discards whatever of it the client still sends.
                await self._too_large(int(declared))(scope, receive, send)
                return
        try:
            with anyio.fail_after(self.body_timeout_s):
                body = await self._read_body(receive)
        except TimeoutError:
            message = (
                f"the request body did not arrive within {self.body_timeout_s:g} s of the headers"
            )
            await _error_response(408, message, headers=_CLOSE)(scope, receive, send)
            return
        if isinstance(body, int):
            await self._too_large(body, at_least=True)(scope, receive, send)
            return
        if body is None:
            return  # the client went away
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _read_body(self, receive) -> bytes | int | None:
        """The whole body; or the size reached when it passed the limit; None on a disconnect."""
        body, more_body = bytearray(), True
        while more_body:
            message = await receive()
            if message["type"] != "http.request":
                return None
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                return len(body)
            more_body = message.get("more_body", False)
        return bytes(body)

    def _too_large(self, size: int, at_least: bool = False) -> JSONResponse:
        amount = f"at least {size}" if at_least else f"{size}"
        return _error_response(
            413, f"request body of {amount} bytes exceeds the limit of {self.max_body_bytes} bytes"
        )


class _JsonRequest(Request):
    """A request whose JSON body is parsed by `_parse_json` (see `_json_route_class`)."""

    max_queries: int | None = None

    async def json(self):
        if not hasattr(self, "_json"):
            payload = _parse_json(await self.body())
            queries = payload.get("queries") if isinstance(payload, dict) else None
            if (
                self.max_queries is not None
                and isinstance(queries, list)
                and len(queries) > self.max_queries
            ):  # before validating each one
                raise HTTPException(
                    422, f"queries holds {len(queries)} queries, the limit is {self.max_queries}"
                )
            self._json = payload
        return self._json


def _parse_json(body: bytes):
    """`json.loads` with the garbage collector paused, every failure a `json.JSONDecodeError`.

    The collector is paused because a body of many small containers (``[[],[],...]``, 4 MB)
    otherwise takes seconds instead of 0.2 s to parse, the event loop stalled all along. The
    objects made are freed by reference counting when the request is done.
    """
    paused = gc.isenabled()
    if paused:
        gc.disable()
    try:
        return json.loads(body)
    except json.JSONDecodeError:
        raise
    except UnicodeDecodeError as exc:
        raise json.JSONDecodeError(f"not UTF-8: {exc.reason}", "", exc.start) from exc
    except RecursionError as exc:
        raise json.JSONDecodeError("nested too deeply", "", 0) from exc
    except ValueError as exc:  # an integer of over 4300 digits
        raise json.JSONDecodeError(str(exc).split(";")[0], "", 0) from exc
    finally:
        if paused:
            gc.enable()


def _json_route_class(max_queries: int) -> type[APIRoute]:
    """Routes whose handlers get a `_JsonRequest` that rejects over `max_queries` queries."""

    class JsonRequest(_JsonRequest):
        pass

    JsonRequest.max_queries = max_queries

    class JsonRoute(APIRoute):
        def get_route_handler(self):
            handler = super().get_route_handler()

            async def parse_then_handle(request: Request) -> Response:
                return await handler(JsonRequest(request.scope, request.receive))

            return parse_then_handle

    return JsonRoute


def _valid_unicode(text: str) -> str:
    """`text` with each lone surrogate replaced by U+FFFD (the replacement character)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def _describe_validation_errors(errors, content_type: str, most: int = 5) -> str:
    content_type = content_type[:100]
    parts = []
    for error in errors[:most]:
        location = [part for part in error.get("loc", ()) if part != "body"]
        kind = error.get("type")
        if kind == "json_invalid":
            reason = (error.get("ctx") or {}).get("error", "invalid JSON")
            parts.append(
                f"malformed JSON body ({reason}, at character {location[0] if location else '?'})"
            )
        elif kind == "missing" and not location:
            parts.append("the request body is empty (expected a JSON object)")
        elif not location and "json" not in content_type:
            parts.append(
                f"the body must be a JSON object sent with Content-Type: application/json "
                f"(got Content-Type {content_type or 'none'!r})"
            )
        else:
            where = ".".join(str(part) for part in location) or "body"
            parts.append(f"{where}: {error.get('msg', 'invalid')}")
    if len(errors) > most:
        parts.append(f"and {len(errors) - most} more errors")
    return "; ".join(parts)


def create_app(
    index: SearchIndex,
    *,
    default_topk: int = 3,
    max_topk: int = 100,
    max_queries: int = 1024,
    max_query_chars: int = 4096,
    max_body_bytes: int = 4 * 1024 * 1024,
    body_timeout_s: float | None = 10.0,
    token: str | None = None,
) -> FastAPI:
    """The FastAPI application serving `index`.

    Args:
      default_topk: documents per query when a request gives no topk (reference: 3).
      max_topk: the largest topk a request may ask for.
      max_queries: the most queries one request may hold.
      max_query_chars: the longest query accepted.
      max_body_bytes: larger request bodies get 413 before they are parsed (a declared
        Content-Length at once, a chunked body as soon as it passes the limit).
      body_timeout_s: a request body not all there this many seconds after the headers gets
        408 and its connection is closed (a slow sender); None: no limit.
      token: when set, /retrieve needs ``Authorization: Bearer <token>``.
    """
    if not 1 <= default_topk <= max_topk:
        raise ValueError(f"default topk {default_topk} must be between 1 and max topk {max_topk}")
    app = FastAPI(
        title="dgpo_jax retrieval server",
        description="Search-R1-compatible retrieval API over one index.",
        version="1",
    )
    # Bodies are parsed with `_parse_json`, and too many queries rejected before validation.
    app.router.route_class = _json_route_class(max_queries)
    app.add_middleware(
        RequestGuard,
        max_body_bytes=max_body_bytes,
        token=token,
        protected_paths=("/retrieve",),
        body_timeout_s=body_timeout_s,
    )

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request, exc: RequestValidationError):
        errors = exc.errors()
        status = 400 if any(error.get("type") == "json_invalid" for error in errors) else 422
        content_type = request.headers.get("content-type", "")
        return _error_response(
            status, f"invalid request: {_describe_validation_errors(errors, content_type)}"
        )

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request, exc: StarletteHTTPException):
        # Unknown paths, wrong methods, and FastAPI's own 4xx, in the {"error": ...} form.
        path, method = request.url.path[:200], request.method[:20]
        if exc.status_code == 404:
            message = f"no such path {path!r} (the API: POST /retrieve, GET /health)"
        elif exc.status_code == 405:
            message = f"method {method} is not allowed on {path}"
        else:
            message = str(exc.detail)
        return _error_response(exc.status_code, message, headers=exc.headers)

    @app.exception_handler(ApiError)
    async def on_api_error(request, exc: ApiError):
        return _error_response(exc.status_code, exc.message)

    @app.exception_handler(Exception)
    async def on_unexpected_error(request, exc: Exception):
        logger.exception("retrieval failed")
        return _error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.get("/health")
    def health() -> dict:
        """The loaded index and the request limits."""
        return {
            "status": "ok",
            "index": index.describe(),
            "default_topk": default_topk,
            "max_topk": max_topk,
            "max_queries": max_queries,
            "max_query_chars": max_query_chars,
            "max_body_bytes": max_body_bytes,
            "auth_required": token is not None,
        }

    @app.post("/retrieve", response_model=RetrieveResponse)
    def retrieve(request: RetrieveRequest):
        """Top documents per query, best first (bare documents unless return_scores)."""
        topk = default_topk if request.topk is None else request.topk
        if not 1 <= topk <= max_topk:
            raise ApiError(422, f"topk must be between 1 and {max_topk}, got {topk}")
        if not request.queries:
            raise ApiError(422, "queries must be a non-empty list of strings")
        if len(request.queries) > max_queries:
            raise ApiError(
                422, f"queries holds {len(request.queries)} queries, the limit is {max_queries}"
            )
        for position, query in enumerate(request.queries):
            if len(query) > max_query_chars:
                raise ApiError(
                    422,
                    f"queries[{position}] has {len(query)} characters, "
                    f"the limit is {max_query_chars}",
                )
        # JSON may spell lone surrogates ("\ud800"), which no encoder takes (the dense one
        # raised: a 500): they become U+FFFD, for every index kind alike.
        results = index.search_documents([_valid_unicode(query) for query in request.queries], topk)
        if request.return_scores:
            result = [
                [
                    {"document": {"id": doc_id, "contents": contents}, "score": score}
                    for doc_id, contents, score in documents
                ]
                for documents in results
            ]
        else:
            result = [
                [{"id": doc_id, "contents": contents} for doc_id, contents, _ in documents]
                for documents in results
            ]
        # Built by hand: response_model only documents the shape (validation would cost time).
        return JSONResponse({"result": result})

    return app


def _read_token(token_file: str | None) -> str | None:
    if token_file:
        if not os.path.isfile(token_file):
            raise MissingFileError(f"--token-file {token_file}: no such file")
        with open(token_file, encoding="utf-8") as handle:
            token = handle.read().strip()
        if not token:
            raise InvalidArgumentError(f"--token-file {token_file}: the file is empty")
        return token
    return os.environ.get(TOKEN_ENV_VAR) or None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m retrieval_service.serve", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--index", required=True, help="index directory from build_index")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default loopback only)"
    )
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--topk", type=int, default=3, help="default documents per query")
    parser.add_argument("--max-topk", type=int, default=100)
    parser.add_argument("--max-queries", type=int, default=1024, help="most queries per request")
    parser.add_argument("--max-query-chars", type=int, default=4096)
    parser.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024)
    parser.add_argument(
        "--body-timeout-s",
        type=float,
        default=10.0,
        help="a request body not complete this long after its headers gets 408 (slow senders)",
    )
    parser.add_argument("--device", default=None, help="dense: torch device for the query encoder")
    parser.add_argument(
        "--encode-batch-size", type=int, default=64, help="dense: queries per forward pass"
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="dense: torch CPU threads for the query encoder (default: torch's choice)",
    )
    parser.add_argument(
        "--encoder",
        default=None,
        help="dense: model directory replacing the one recorded in the manifest",
    )
    parser.add_argument(
        "--token-file",
        default=None,
        help=f"file holding the bearer token (default: ${TOKEN_ENV_VAR} if set)",
    )
    parser.add_argument("--access-log", action="store_true", help="log every request")
    parser.add_argument("--log-level", default="info")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    import uvicorn  # noqa: PLC0415 (retrieval extra)

    try:
        token = _read_token(args.token_file)
        index = load_index(
            args.index,
            device=args.device,
            encode_batch_size=args.encode_batch_size,
            torch_threads=args.torch_threads,
            encoder=args.encoder,
        )
        app = create_app(
            index,
            default_topk=args.topk,
            max_topk=args.max_topk,
            max_queries=args.max_queries,
            max_query_chars=args.max_query_chars,
            max_body_bytes=args.max_body_bytes,
            token=token,
            body_timeout_s=args.body_timeout_s,
        )
    except UserError:
        raise
    except (OSError, ValueError) as exc:  # the token file, the limits: the user's arguments
        raise InvalidArgumentError(str(exc)) from exc
    if not _is_loopback(args.host) and token is None:
        logger.warning(
            "binding %s without a bearer token: anyone who can reach it can query", args.host
        )
    logger.info("serving %s", json.dumps(index.describe()))
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level.lower(),
        access_log=args.access_log,
    )
    return 0


def run_main(argv: list[str] | None = None) -> None:
    """The console entry point: an index, token or argument error as one ``error:`` line and
    exit status 2 (``--debug`` or ``DGPO_DEBUG=1``: the traceback)."""
    run_cli(main, argv)


if __name__ == "__main__":
    run_main()
