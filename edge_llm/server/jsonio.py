"""JSON out, safe for any text a model or a client can produce.

A JSON string may carry a lone surrogate ("\\ud800"); Python keeps it, UTF-8 cannot encode it,
and starlette's JSONResponse would fail with a 500. Such characters become "?" instead.
NaN and infinities are refused by the JSON spec; they never reach here (logprobs are clamped).
"""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import JSONResponse as _StarletteJSONResponse


def dumps(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.encode("utf-8", errors="replace").decode("utf-8")


class JSONResponse(_StarletteJSONResponse):
    def render(self, content: Any) -> bytes:
        return dumps(content).encode("utf-8")
