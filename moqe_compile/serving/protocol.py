"""The Open Inference Protocol (KServe v2) request/response bodies, HTTP-free.

Covers the JSON form and the binary tensor data extension Triton and ``tritonclient``
use by default (a JSON header of ``Inference-Header-Content-Length`` bytes, then each
binary tensor's raw little-endian bytes in order; BYTES elements as 4-byte length + data).
Every malformed request raises ``ProtocolError`` with the HTTP status and a message
naming the offending field, so the server never answers bad input with a 500.

Inputs this server takes (one of them per request):
  ``input``  FP32 [N, C, H, W]: preprocessed images, as the bundle's FP model takes them.
  ``image``  BYTES [N]: encoded image files (JPEG/PNG/...), preprocessed by the bundle's
             own recipe. In the JSON form each element is the file base64-encoded.
Outputs (all by default; a request may name a subset):
  ``logits``             FP32 [N, classes]
  ``expert``             INT32 [N]  index of the expert that served each sample
  ``expert_name``        BYTES [N]  its name
  ``router_confidence``  FP32 [N]   the router's max probability (1.0 when not routed)
"""

from __future__ import annotations

import base64
import io
import json
import math
import struct
from dataclasses import dataclass, field

import numpy as np

from moqe_compile.errors import InputError

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(bool), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
}
# v2 datatypes numpy has no dtype for: known (so the message names what this input takes
# instead of calling them unknown), never decoded.
UNDECODED_DTYPES = ("BF16",)
MAX_JSON_DEPTH = 32  # a v2 body nests about 10 deep (nested "data" adds one per dimension)
MAX_ID_CHARS = 256
OUTPUTS = ("logits", "expert", "expert_name", "router_confidence")
INPUTS = ("input", "image")


class ProtocolError(InputError):
    """A request the protocol or this model cannot take; ``status`` is the HTTP code to send."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class InferRequest:
    id: str | None
    input_name: str  # "input" or "image"
    tensor: np.ndarray | list[bytes]
    outputs: list[str]  # requested output names, in order
    binary_outputs: set[str] = field(default_factory=set)
    parameters: dict = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return len(self.tensor)


def _object(obj: dict, key: str, where: str) -> dict:
    """``obj[key]`` as an object; absent or null is ``{}`` (an empty list or 0 is refused, as
    any other non-object is)."""
    v = obj.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ProtocolError(f"{where}{key} must be an object.")
    return v


def _flag(params: dict, key: str, default: bool, where: str) -> bool:
    # Only JSON booleans: the string "false" would otherwise count as true.
    v = params.get(key, default)
    if not isinstance(v, bool):
        raise ProtocolError(f"{where}parameters.{key} must be true or false, got {v!r}.")
    return v


def _need(obj: dict, key: str, kind: type, where: str):
    if key not in obj:
        raise ProtocolError(f"{where}.{key} is missing.")
    v = obj[key]
    if not isinstance(v, kind):  # called with list and str only: no int/bool ambiguity
        raise ProtocolError(f"{where}.{key} must be a {kind.__name__}, got {type(v).__name__}.")
    return v


_NESTING = np.zeros(256, np.int8)
_NESTING[[ord("["), ord("{")]] = 1
_NESTING[[ord("]"), ord("}")]] = -1
_QUOTE, _BACKSLASH = ord('"'), ord("\\")
# Backslashes appear in a v2 request inside escaped strings (ids, parameters), and in base64 data
# from JSON encoders that write "/" as "\/" (about one per 64 characters: 1 Mi at the 64 MiB body
# limit). Bounding them bounds the index arrays of the escape scan (8 bytes each).
MAX_BACKSLASHES = 1 << 22


def json_depth(text: bytes) -> int:
    """How deep ``text``'s arrays and objects nest. The standard library's parser has no depth
    limit (it recurses until ``RecursionError``), so this scan runs first: brackets inside
    strings are masked out and the rest counted, all in numpy passes over the bytes. (A regex
    blanking each string cost seconds for a body of millions of short strings.)"""
    b = np.frombuffer(text, dtype=np.uint8)
    nest = _NESTING[b]
    np.putmask(nest, np.bitwise_xor.accumulate(_string_quotes(b)).view(bool), 0)
    return _max_prefix_sum(nest[nest != 0])  # the brackets alone, one byte each


def _string_quotes(b: np.ndarray) -> np.ndarray:
    """1 at each quote that opens or closes a string, else 0: a quote after an odd run of
    backslashes is escaped. Works on the backslashes' positions only (at most MAX_BACKSLASHES)."""
    marks = (b == _QUOTE).view(np.uint8)
    is_bs = b == _BACKSLASH
    n = int(np.count_nonzero(is_bs))
    if n > MAX_BACKSLASHES:
        raise ProtocolError(f"the request body holds {n} backslashes; at most {MAX_BACKSLASHES} are read "
                            "(numbers need none; base64 has one per escaped '/').")
    if n:
        bs = np.flatnonzero(is_bs)
        run_starts = bs[np.r_[True, np.diff(bs) != 1]]
        after = bs[bs + 1 < b.size] + 1
        quoted = after[b[after] == _QUOTE]  # quotes right after a backslash
        run_len = quoted - run_starts[np.searchsorted(run_starts, quoted - 1, side="right") - 1]
        marks[quoted[run_len % 2 == 1]] = 0
    return marks


def _max_prefix_sum(steps: np.ndarray, block: int = 1 << 22) -> int:
    # In blocks: one cumulative sum over a 64 MiB body would take 512 MiB more.
    best = level = 0
    for i in range(0, steps.size, block):
        c = np.cumsum(steps[i:i + block], dtype=np.int64) + level
        best, level = max(best, int(c.max())), int(c[-1])
    return best


def load_json(text: bytes, max_depth: int = MAX_JSON_DEPTH):
    """``json.loads`` with a nesting guard; a ``ProtocolError`` for anything that is not JSON."""
    depth = json_depth(text)
    if depth > max_depth:
        raise ProtocolError(f"request JSON nests {depth} levels deep; this server takes at most {max_depth}.")
    try:
        return json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"request body is not valid JSON: {e}.") from None
    except RecursionError:  # the scan above miscounted (it cannot see every malformed string)
        raise ProtocolError(f"request JSON nests deeper than {max_depth} levels.") from None


def parse_infer_request(body: bytes, header_length: str | None, max_id_chars: int = MAX_ID_CHARS,
                        limits=None) -> InferRequest:
    """Parse a v2 infer body; ``header_length`` is the ``Inference-Header-Content-Length``
    header (None: the whole body is JSON). ``id`` is echoed in the answer, so its length is
    bounded by ``max_id_chars``. ``limits`` (an ``InputLimits``; None: its defaults) bounds the
    images a BYTES input may declare, checked before any element is read."""
    if header_length is None:
        head, blob = body, b""
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise ProtocolError(f"Inference-Header-Content-Length {header_length!r} is not an integer.") from None
        if not 0 < n <= len(body):
            raise ProtocolError(f"Inference-Header-Content-Length {n} is outside the body's {len(body)} bytes.")
        head, blob = body[:n], body[n:]
    req = load_json(head)
    if not isinstance(req, dict):
        raise ProtocolError(f"request body must be a JSON object, got {type(req).__name__}.")
    rid = req.get("id")
    if rid is not None and not isinstance(rid, str):
        raise ProtocolError(f"id must be a string, got {type(rid).__name__}.")
    if rid is not None and len(rid) > max_id_chars:
        raise ProtocolError(f"id is {len(rid)} characters; this server echoes at most {max_id_chars}.")
    params = _object(req, "parameters", "")
    inputs = _need(req, "inputs", list, "request")
    if len(inputs) != 1:
        raise ProtocolError(f"inputs must hold exactly one tensor (named one of {list(INPUTS)}), got {len(inputs)}.")
    tensor_req = inputs[0]
    if not isinstance(tensor_req, dict):
        raise ProtocolError("inputs[0] must be an object.")
    name = _need(tensor_req, "name", str, "inputs[0]")
    if name not in INPUTS:
        raise ProtocolError(f"inputs[0].name {name!r} is not an input of this model; use one of {list(INPUTS)}.")
    tensor = _decode_tensor(tensor_req, blob, f"inputs[0] ({name})", limits)
    declared = _binary_size(tensor_req) or 0
    if len(blob) != declared:
        raise ProtocolError(f"the body has {len(blob)} binary bytes after the JSON header but "
                            f"inputs[0].parameters.binary_data_size says {declared}.")

    binary_all = _flag(params, "binary_data_output", False, "")
    wanted = req.get("outputs")
    if wanted is None:
        names, binary = list(OUTPUTS), set(OUTPUTS) if binary_all else set()
    else:
        if not isinstance(wanted, list) or not wanted:
            raise ProtocolError("outputs must be a non-empty list of {\"name\": ...} objects.")
        names, binary = [], set()
        for i, o in enumerate(wanted):
            if not isinstance(o, dict):
                raise ProtocolError(f"outputs[{i}] must be an object.")
            oname = _need(o, "name", str, f"outputs[{i}]")
            if oname not in OUTPUTS:
                raise ProtocolError(f"outputs[{i}].name {oname!r} is not an output of this model; "
                                    f"use any of {list(OUTPUTS)}.")
            names.append(oname)
            op = _object(o, "parameters", f"outputs[{i}].")
            if _flag(op, "binary_data", binary_all, f"outputs[{i}]."):
                binary.add(oname)
    return InferRequest(rid, name, tensor, names, binary, params)


def _binary_size(t: dict) -> int | None:
    v = _object(t, "parameters", "inputs[0].").get("binary_data_size")
    if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
        raise ProtocolError(f"inputs[0].parameters.binary_data_size must be a non-negative integer, got {v!r}.")
    return v


def _decode_tensor(t: dict, blob: bytes, where: str, limits=None) -> np.ndarray | list[bytes]:
    shape = _need(t, "shape", list, where)
    if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ProtocolError(f"{where}.shape {shape!r} must be a non-empty list of non-negative integers.")
    # Python ints: numpy's int64 product wraps (2**40 x 2**40 -> 0), so a huge shape "needed 0".
    # Nothing is allocated from the count: every use compares it with what the body holds.
    count = math.prod(shape)
    dt = _need(t, "datatype", str, where)
    size = _binary_size(t)
    if dt == "BYTES":
        check_count(limits, count, where)  # before reading any element: each may be a whole image
        return _bytes_elements(t, blob, size, where, shape, count)
    if dt in UNDECODED_DTYPES:
        raise ProtocolError(f"{where}.datatype {dt} is not decoded here; send input as FP32 or image as BYTES.")
    if dt not in DTYPES:
        raise ProtocolError(f"{where}.datatype {dt!r} is not a v2 datatype "
                            f"({sorted([*DTYPES, *UNDECODED_DTYPES, 'BYTES'])}).")
    check_count(limits, shape[0], where)  # samples, before any element is read
    dtype = DTYPES[dt].newbyteorder("<")
    if size is not None:
        if size != count * dtype.itemsize:
            raise ProtocolError(f"{where}.parameters.binary_data_size {size} != {count} elements x "
                                f"{dtype.itemsize} bytes for shape {shape} {dt}.")
        if len(blob) < size:
            raise ProtocolError(f"{where}: binary data is {len(blob)} bytes, expected {size}.")
        arr = np.frombuffer(blob[:size], dtype=dtype)
    else:
        if "data" not in t:
            raise ProtocolError(f"{where}.data is missing (or send it binary with parameters.binary_data_size).")
        if not isinstance(t["data"], list):
            raise ProtocolError(f"{where}.data cannot be read as {dt}: send a list, not {type(t['data']).__name__}.")
        arr = _json_numbers(_json_elements(t["data"], where, shape, count), dt, where)
    return arr.reshape(shape).astype(DTYPES[dt], copy=False)


def _json_elements(data, where: str, shape: list[int], count: int, kind: str = "") -> np.ndarray:
    """JSON ``data`` (flat, or nested like the shape) as a flat object array of ``count`` leaves,
    counted before any leaf is converted."""
    try:
        leaves = np.asarray(data, dtype=object).ravel()
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"{where}.data cannot be read as a tensor: {e}.") from None
    if leaves.size != count:
        raise ProtocolError(f"{where}.data has {leaves.size} {kind}elements but shape {shape} needs {count}.")
    return leaves


def _json_numbers(leaves: np.ndarray, dt: str, where: str) -> np.ndarray:
    dtype = DTYPES[dt]
    # The JSON types checked first: numpy alone parses the string "1.5" and reads true as 1.
    allowed, what = ({bool}, "true/false") if dtype.kind == "b" else ({int, float}, "numbers")
    wrong = set(map(type, leaves)) - allowed
    if wrong:
        got = ", ".join(sorted(c.__name__ for c in wrong))
        hint = " (a list: data nested unlike its shape)" if list in wrong else ""
        raise ProtocolError(f"{where}.data cannot be read as {dt}: it holds {got}{hint}; send JSON {what}.")
    try:
        return leaves.astype(dtype)
    except (TypeError, ValueError, OverflowError) as e:
        raise ProtocolError(f"{where}.data cannot be read as {dt}: {e}.") from None


def _bytes_elements(t: dict, blob: bytes, size: int | None, where: str, shape: list[int], count: int) -> list[bytes]:
    if size is not None:
        return _binary_bytes(blob, size, where, shape, count)
    data = t.get("data")
    if not isinstance(data, list):
        raise ProtocolError(f"{where}.data must be a list of base64 strings.")
    out = []
    for i, s in enumerate(_json_elements(data, where, shape, count, "BYTES ")):
        if not isinstance(s, str):
            raise ProtocolError(f"{where}.data[{i}] must be a base64 string.")
        try:
            out.append(base64.b64decode(s, validate=True))
        except ValueError:
            raise ProtocolError(f"{where}.data[{i}] is not valid base64.") from None
    return out


def _binary_bytes(blob: bytes, size: int, where: str, shape: list[int], count: int) -> list[bytes]:
    """The length-prefixed BYTES elements; reading stops past ``count``, so a blob of millions
    of empty elements under a small shape costs no more than the shape."""
    if len(blob) < size:
        raise ProtocolError(f"{where}: binary data is {len(blob)} bytes, expected {size}.")
    buf, out, off = memoryview(blob[:size]), [], 0
    while off < size:
        if off + 4 > size:
            raise ProtocolError(f"{where}: truncated BYTES element length at byte {off}.")
        (n,) = struct.unpack_from("<I", buf, off)
        if off + 4 + n > size:
            raise ProtocolError(f"{where}: BYTES element at byte {off} claims {n} bytes past the end.")
        if len(out) == count:
            raise ProtocolError(f"{where} has more than {count} BYTES elements but shape {shape} needs {count}.")
        out.append(bytes(buf[off + 4: off + 4 + n]))
        off += 4 + n
    if len(out) != count:
        raise ProtocolError(f"{where} has {len(out)} BYTES elements but shape {shape} needs {count}.")
    return out


def check_count(limits, n: int, where: str) -> None:
    """``limits.check_count`` (an ``InputLimits``; None: its defaults) as a 413 ``ProtocolError``
    (a client cannot raise a server's limit: it splits the request)."""
    from moqe_compile.errors import InputLimitError
    from moqe_compile.tasks.image.preprocess import DEFAULT_LIMITS

    limits = limits or DEFAULT_LIMITS
    try:
        limits.check_count(n, where)
    except InputLimitError:
        raise ProtocolError(f"{where} holds {n} images; the input limit max_images={limits.max_images} bounds one "
                            "request: split it into smaller requests.", status=413) from None


def decode_images(items: list[bytes], preprocess, limits=None) -> np.ndarray:
    """Encoded image files -> the bundle's preprocessed float32 batch, within ``limits`` (an
    ``InputLimits``; None: its defaults). The count is checked before any image is decoded,
    each image's size from its header before it is decoded. A broken limit is a
    ``ProtocolError`` with status 413, an unreadable or empty image one with status 400."""
    from moqe_compile.errors import InputLimitError
    from moqe_compile.tasks.image.preprocess import DEFAULT_LIMITS, PixelBudget, decode_image

    limits = limits or DEFAULT_LIMITS
    where = "inputs[0] (image)"
    check_count(limits, len(items), where)
    try:
        budget, out = PixelBudget(limits, where), []
        for i, b in enumerate(items):
            with decode_image(io.BytesIO(b), f"{where} element {i}", limits, budget) as im:
                out.append(preprocess(im))
    except InputLimitError as e:
        raise ProtocolError(str(e), status=413) from None
    except InputError as e:
        raise ProtocolError(str(e)) from None
    return np.stack(out).astype(np.float32, copy=False)


def _bytes_payload(items: list[str]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in (s.encode() for s in items))


def encode_infer_response(model: str, version: str, req: InferRequest, result) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, its JSON header length."""
    values = {
        "logits": ("FP32", result.logits.astype(np.float32, copy=False)),
        "expert": ("INT32", result.expert_index.astype(np.int32)),
        "expert_name": ("BYTES", list(result.experts)),
        "router_confidence": ("FP32", result.confidence.astype(np.float32, copy=False)),
    }
    outs, blobs = [], []
    for name in req.outputs:
        dt, v = values[name]
        shape = list(v.shape) if isinstance(v, np.ndarray) else [len(v)]
        o = {"name": name, "datatype": dt, "shape": shape}
        if name in req.binary_outputs:
            raw = _bytes_payload(v) if dt == "BYTES" else np.ascontiguousarray(v).astype(v.dtype.newbyteorder("<")).tobytes()
            o["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            o["data"] = v if dt == "BYTES" else v.ravel().tolist()
        outs.append(o)
    body = {"model_name": model, "model_version": version, "outputs": outs}
    if req.id is not None:
        body["id"] = req.id
    head = json.dumps(body, separators=(",", ":")).encode()
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)
