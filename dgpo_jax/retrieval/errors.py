"""Errors raised by retrievers, one class per way a retrieval can fail."""

from __future__ import annotations

from dgpo_jax.errors import UserError


class RetrievalError(UserError, RuntimeError):
    """Base class: a retrieval did not produce documents."""

    hint = "check the retrieval server(s) (retrieval.urls) or index (retrieval.index_dir)"


class RetrievalRequestError(RetrievalError):
    """The server rejected the request (a 4xx answer); retrying the same request cannot help."""

    def __init__(self, message: str, status_code: int | None = None):
        super().__init__(message)
        self.status_code = status_code


class RetrievalResponseError(RetrievalError):
    """The server answered, but the answer does not follow the retrieval API."""


class RetrievalUnavailableError(RetrievalError):
    """No server answered in time: retries were used up or the deadline passed.

    Attributes:
      attempts: how many HTTP requests were sent.
      errors: one line per failed attempt, oldest first.
    """

    def __init__(self, message: str, attempts: int, errors: list[str]):
        super().__init__(message)
        self.attempts = attempts
        self.errors = list(errors)
