"""OpenAI's error object for the app: `ApiError`, and FastAPI's / pydantic's validation errors
(FastAPI answers them with a 422 of its own shape) as one 400 naming the field in ``param``:

    {"error": {"message": "temperature: Input should be a valid number", "type":
               "invalid_request_error", "param": "temperature", "code": "invalid_value"}}

Nested fields are named as ``messages[0].content``; a malformed body has ``param`` null.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

__all__ = ["ApiError", "validation_error"]


class ApiError(Exception):
    """An HTTP error as OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code if code is not None or status != 400 else "invalid_value"

    def body(self) -> dict[str, Any]:
        if self.status == 429:
            kind = "rate_limit_error"
        else:
            kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "json-or-python"}

#: union fields: what a valid value is (pydantic's union messages name only the members)
_UNIONS = {
    "prompt": "a string or a list of token ids",
    "stop": "a string or a list of strings",
    "gamma": "an integer >= 1 or 'auto'",
    "content": "a string or a list of text parts",
}


def _param(loc: tuple[Any, ...]) -> tuple[str | None, bool]:
    """``("body", "messages", 0, "content", "str")`` -> (``"messages[0].content"``, union?)."""
    out, union = "", False
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _TYPE_TAGS or not str(part).isidentifier():
            union = True
            break
        else:
            out += f".{part}" if out else str(part)
    return out or None, union


def validation_error(errors: list[dict[str, Any]]) -> ApiError:
    """FastAPI's / pydantic's validation errors -> one 400 naming the (first) field."""
    err = errors[0] if errors else {"msg": "invalid request", "loc": (), "type": ""}
    kind = err.get("type", "")
    if kind == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return ApiError(400, f"malformed JSON body: {detail}".rstrip(": "), None, "invalid_json")
    param, union = _param(tuple(err.get("loc", ())))
    if param is None:
        if kind == "missing":
            return ApiError(400, "request body: a JSON object is required", None, "invalid_request")
        return ApiError(
            400, f"request body: expected a JSON object ({err.get('msg')})", None, "invalid_request"
        )
    last = param.rsplit(".", 1)[-1].split("[", 1)[0]
    if kind == "extra_forbidden":
        return ApiError(400, f"{param}: unknown field (not supported by this server)", param, "unknown_field")
    if kind == "missing":
        return ApiError(400, f"{param}: field required", param, "missing_field")
    msg = str(err.get("msg", "invalid value"))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    elif union and last in _UNIONS:
        msg = f"expected {_UNIONS[last]}"
    return ApiError(400, f"{param}: {msg}", param, "invalid_value")
