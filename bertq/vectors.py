"""Reading back the vectors the embedding task writes (its ``encoding`` option) as lists of floats, with
the standard library only, so that a producer's install can decode them."""

from __future__ import annotations

import base64
import struct

from bertq.schemas import Vector, VectorEncoding


def decode_vector(value: Vector, encoding: VectorEncoding, dimensions: int | None = None) -> list[float]:
    """The floats ``value`` stands for. int8 steps are divided by 127; binary gives 1.0 for a set bit and
    0.0 otherwise, cut to ``dimensions`` (packed bits are padded to whole bytes)."""
    if encoding in ("float", "int8"):
        if not isinstance(value, list):
            raise ValueError(f"a {encoding} vector is a list, not {type(value).__name__}")
        return [float(x) / 127 for x in value] if encoding == "int8" else [float(x) for x in value]
    if not isinstance(value, str):
        raise ValueError(f"a {encoding} vector is a base64 string, not {type(value).__name__}")
    data = base64.b64decode(value)
    if encoding == "binary":
        bits = [float(byte >> (7 - i) & 1) for byte in data for i in range(8)]
        return bits[:dimensions] if dimensions is not None else bits
    width, code = (4, "f") if encoding == "base64" else (2, "e")
    return list(struct.unpack(f"<{len(data) // width}{code}", data))
