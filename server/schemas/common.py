"""Field types shared by the request schemas: values every database can store and every tokenizer can read.

Both databases store ids, offsets and seeds as 64-bit integers: a larger number is refused here (422), not by the
driver (500). PostgreSQL refuses NUL characters in text and NaN in JSON, and tokenizers refuse lone surrogates
(which Python's JSON decoder lets through), so request strings and free-form JSON objects are checked up front.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from fastapi import Path, Query
from pydantic import AfterValidator, Field

# The largest value of a 64-bit signed integer column (BIGINT in PostgreSQL, INTEGER in SQLite).
DB_INT_MAX = 2**63 - 1
# Lineage and alias names appear in URLs and model names ("km:1+ke:name"): no '/', no '+', no spaces.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,254}$"
# Free-form JSON objects (metadata, training options) nest at most this deep.
JSON_MAX_DEPTH = 32

MSG_NUL = "must not contain NUL characters (\\u0000)"
MSG_SURROGATE = "must be valid Unicode text; a lone surrogate such as \\ud800 is not"
MSG_NOT_FINITE = "must hold finite numbers only; NaN and Infinity are not JSON"
MSG_TOO_DEEP = f"must not nest deeper than {JSON_MAX_DEPTH} levels"


def check_unicode(value: str) -> str:
    """`value` if it is valid Unicode (encodable as UTF-8: no lone surrogate)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(MSG_SURROGATE) from None
    return value


def check_text(value: str) -> str:
    """`value` if it is storable text: valid Unicode without NUL characters."""
    if "\x00" in value:
        raise ValueError(MSG_NUL)
    return check_unicode(value)


def check_json(value: Any, depth: int = 0) -> Any:
    """`value` if every string in it (keys too) is storable text and every number is finite; ValueError if not."""
    if depth > JSON_MAX_DEPTH:
        raise ValueError(MSG_TOO_DEEP)
    if isinstance(value, str):
        check_text(value)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(MSG_NOT_FINITE)
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(str(key))
            check_json(item, depth + 1)
    elif isinstance(value, list | tuple):
        for item in value:
            check_json(item, depth + 1)
    return value


# Text a tokenizer reads (prompts, questions).
Unicode = Annotated[str, AfterValidator(check_unicode)]
# Text that is stored or looked up in the database (titles, names).
Text = Annotated[str, AfterValidator(check_text)]
# A free-form JSON object that is stored as given (document metadata, job payloads).
JsonObject = Annotated[dict[str, Any], AfterValidator(check_json)]
# A row id in a request body.
RowId = Annotated[int, Field(ge=1, le=DB_INT_MAX)]
# A sampling seed: any non-negative 64-bit integer.
Seed = Annotated[int, Field(ge=0, le=DB_INT_MAX)]

# Path and query parameters of the routes.
IdPath = Annotated[int, Path(ge=1, le=DB_INT_MAX, description="A row id (1 .. 2^63-1).")]
NamePath = Annotated[str, Path(pattern=NAME_PATTERN, description="1-255 letters, digits, '.', '_', ':' or '-'.")]
IdQuery = Annotated[int | None, Query(ge=1, le=DB_INT_MAX)]
OffsetQuery = Annotated[int, Query(ge=0, le=DB_INT_MAX, description="Rows to skip.")]
NameQuery = Annotated[Text | None, Query(max_length=255)]
