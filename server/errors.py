"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

Every failure the gateway reports to a client goes through APIError, so the status, the
type and the field at fault are decided in one place and never leak a 500 for bad input.
"""

from http import HTTPStatus

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    499: "cancelled",
    500: "internal_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    @property
    def type(self) -> str:
        if self.status in _TYPES:  # 499 is no HTTPStatus: never look it up there
            return _TYPES[self.status]
        return HTTPStatus(self.status).phrase.lower().replace(" ", "_")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def invalid(param: str | None, message: str) -> APIError:
    """A 400 naming the request field at fault."""
    return APIError(400, message, param=param, code="invalid_value")
