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
import hmac
import ipaddress
import json
import logging
import os
import sys

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from retrieval_service.index import SearchIndex, load_index

logger = logging.getLogger(__name__)

TOKEN_ENV_VAR = "DGPO_RETRIEVAL_TOKEN"


class RetrieveRequest(BaseModel):
    """Body of ``POST /retrieve`` (unknown fields are ignored, as in the reference)."""

    model_config = ConfigDict(extra="ignore")
    queries: list[StrictStr] = Field(description="one search query per entry")
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


class RequestGuard:
    """ASGI middleware: bearer-token check and a request-body size limit, before any parsing.

    The body is read here (stopping as soon as it passes `max_body_bytes`) and handed on whole.
    """

    def __init__(
        self, app, max_body_bytes: int, token: str | None, protected_paths: tuple[str, ...]
    ):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.token = token
        self.protected_paths = protected_paths

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
            if not declared.isdigit():
                await _error_response(400, f"invalid Content-Length {declared!r}")(
                    scope, receive, send
                )
                return
            if int(declared) > self.max_body_bytes:
                await self._too_large(int(declared))(scope, receive, send)
                return
        chunks, size, more_body = [], 0, True
        while more_body:
            message = await receive()
            if message["type"] != "http.request":
                return  # client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._too_large(size, at_least=True)(scope, receive, send)
                return
            chunks.append(chunk)
            more_body = message.get("more_body", False)
        body = b"".join(chunks)
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _too_large(self, size: int, at_least: bool = False) -> JSONResponse:
        amount = f"at least {size}" if at_least else f"{size}"
        return _error_response(
            413, f"request body of {amount} bytes exceeds the limit of {self.max_body_bytes} bytes"
        )


def _describe_validation_errors(errors, content_type: str) -> str:
    parts = []
    for error in errors:
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
    return "; ".join(parts)


def create_app(
    index: SearchIndex,
    *,
    default_topk: int = 3,
    max_topk: int = 100,
    max_queries: int = 1024,
    max_query_chars: int = 4096,
    max_body_bytes: int = 4 * 1024 * 1024,
    token: str | None = None,
) -> FastAPI:
    """The FastAPI application serving `index`.

    Args:
      default_topk: documents per query when a request gives no topk (reference: 3).
      max_topk: the largest topk a request may ask for.
      max_queries: the most queries one request may hold.
      max_query_chars: the longest query accepted.
      max_body_bytes: larger request bodies get 413 before they are parsed.
      token: when set, /retrieve needs ``Authorization: Bearer <token>``.
    """
    if not 1 <= default_topk <= max_topk:
        raise ValueError(f"default topk {default_topk} must be between 1 and max topk {max_topk}")
    app = FastAPI(
        title="dgpo_jax retrieval server",
        description="Search-R1-compatible retrieval API over one index.",
        version="1",
    )
    app.add_middleware(
        RequestGuard, max_body_bytes=max_body_bytes, token=token, protected_paths=("/retrieve",)
    )

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request, exc: RequestValidationError):
        errors = exc.errors()
        status = 400 if any(error.get("type") == "json_invalid" for error in errors) else 422
        content_type = request.headers.get("content-type", "")
        return _error_response(
            status, f"invalid request: {_describe_validation_errors(errors, content_type)}"
        )

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
        results = index.search_documents(request.queries, topk)
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
        with open(token_file, encoding="utf-8") as handle:
            token = handle.read().strip()
        if not token:
            raise ValueError(f"token file {token_file} is empty")
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
        )
    except (OSError, ValueError) as exc:  # IndexFormatError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
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


if __name__ == "__main__":
    sys.exit(main())
