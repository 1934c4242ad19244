"""The v2 request decoder and response encoder without HTTP, checked against tritonclient (an
independent implementation of the protocol: it encodes the requests and decodes the answers
here) and against bytes written out by hand with ``struct``. Every refusal is checked for its
HTTP status and for the field its message names."""

from __future__ import annotations

import base64
import io
import json
import math
import struct
from types import SimpleNamespace

import numpy as np
import pytest

from moqe_compile.serving import protocol
from moqe_compile.serving.protocol import (DTYPES, ProtocolError, decode_images, encode_infer_response, json_depth,
                                           load_json, parse_infer_request)

httpclient = pytest.importorskip("tritonclient.http")


def _triton_body(arr, name="input", datatype="FP32", binary=True, outputs=None, rid=""):
    t = httpclient.InferInput(name, list(arr.shape), datatype)
    t.set_data_from_numpy(arr, binary_data=binary)
    outs = [httpclient.InferRequestedOutput(o, binary_data=b) for o, b in outputs] if outputs else None
    body, json_size = httpclient.InferenceServerClient.generate_request_body([t], outs, request_id=rid)
    return body, None if json_size is None else str(json_size)


def _json(req: dict, header=None) -> bytes:
    return json.dumps(req).encode()


def _input(**over):
    t = {"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}
    t.update(over)
    return t


def _refused(body: bytes, match: str, header=None, status=400, **kw):
    with pytest.raises(ProtocolError, match=match) as e:
        parse_infer_request(body, header, **kw)
    assert e.value.status == status
    return e.value


# ---------------------------------------------------------------- numeric tensors
@pytest.mark.parametrize("dt", sorted(DTYPES))
@pytest.mark.parametrize("binary", [True, False])
def test_every_numeric_datatype_decodes_as_tritonclient_encoded_it(dt, binary):
    rng = np.random.default_rng(0)
    a = (rng.integers(0, 2, (2, 3)) if dt == "BOOL" else rng.integers(0, 100, (2, 3))).astype(DTYPES[dt])
    body, header = _triton_body(a, datatype=dt, binary=binary)
    req = parse_infer_request(body, header)
    assert req.input_name == "input" and req.batch_size == 2
    assert req.tensor.dtype == DTYPES[dt] and req.tensor.shape == (2, 3)
    np.testing.assert_array_equal(req.tensor, a)


def test_binary_fp32_is_read_little_endian_from_the_bytes_after_the_header():
    values = [1.5, -2.0, 3.25, 0.0, 7.0, -0.5]
    blob = struct.pack("<6f", *values)  # written by hand, not by numpy
    head = json.dumps({"inputs": [{"name": "input", "shape": [1, 2, 3], "datatype": "FP32",
                                   "parameters": {"binary_data_size": 24}}]}).encode()
    req = parse_infer_request(head + blob, str(len(head)))
    assert req.tensor.shape == (1, 2, 3) and req.tensor.ravel().tolist() == values
    assert req.outputs == list(protocol.OUTPUTS) and req.binary_outputs == set()


def test_json_data_may_be_nested_and_is_reshaped():
    req = parse_infer_request(_json({"inputs": [_input(shape=[2, 1, 2], data=[[1, 2], [3, 4]])]}), None)
    assert req.tensor.shape == (2, 1, 2) and req.tensor.ravel().tolist() == [1, 2, 3, 4]
    assert req.tensor.dtype == np.float32 and req.batch_size == 2


def test_a_zero_length_batch_decodes_to_an_empty_tensor():
    req = parse_infer_request(_json({"inputs": [_input(shape=[0, 3], data=[])]}), None)
    assert req.tensor.shape == (0, 3) and req.batch_size == 0


# ---------------------------------------------------------------- BYTES tensors
def test_binary_bytes_elements_are_split_by_their_length_prefixes():
    items = [b"ab", b"", b"\x00\xffxyz"]
    blob = b"".join(struct.pack("<I", len(x)) + x for x in items)
    head = json.dumps({"inputs": [{"name": "image", "shape": [3], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(blob)}}]}).encode()
    req = parse_infer_request(head + blob, str(len(head)))
    assert req.input_name == "image" and req.tensor == items and req.batch_size == 3


def test_bytes_from_tritonclient_binary_and_json():
    items = np.array([b"first", b"", b"third"], dtype=object)
    body, header = _triton_body(items, name="image", datatype="BYTES", binary=True)
    assert parse_infer_request(body, header).tensor == list(items)
    req = {"inputs": [{"name": "image", "shape": [3], "datatype": "BYTES",
                       "data": [base64.b64encode(x).decode() for x in items]}]}
    assert parse_infer_request(_json(req), None).tensor == list(items)


def test_json_bytes_may_be_nested_like_the_shape():
    data = [[base64.b64encode(b"a").decode()], [base64.b64encode(b"bc").decode()]]
    req = {"inputs": [{"name": "image", "shape": [2, 1], "datatype": "BYTES", "data": data}]}
    assert parse_infer_request(_json(req), None).tensor == [b"a", b"bc"]


def _bytes_head(size, shape=(1,)):
    return json.dumps({"inputs": [{"name": "image", "shape": list(shape), "datatype": "BYTES",
                                   "parameters": {"binary_data_size": size}}]}).encode()


@pytest.mark.parametrize("blob,size,match", [
    (b"\x05\x00\x00", 3, "truncated BYTES element length at byte 0"),
    (struct.pack("<I", 1) + b"a" + b"\x01\x00", 7, "truncated BYTES element length at byte 5"),
    (struct.pack("<I", 3) + b"ab", 6, "BYTES element at byte 0 claims 3 bytes past the end"),
])
def test_malformed_binary_bytes_are_refused(blob, size, match):
    head = _bytes_head(size)
    _refused(head + blob, match, str(len(head)))


def test_binary_bytes_element_ending_exactly_at_the_end_is_accepted():
    blob = struct.pack("<I", 0) + struct.pack("<I", 2) + b"xy"
    head = _bytes_head(len(blob), (2,))
    assert parse_infer_request(head + blob, str(len(head))).tensor == [b"", b"xy"]


def test_binary_bytes_shorter_than_declared_are_refused():
    # The header promises 8 bytes; only 6 follow it (and the body check comes after the decode).
    head = _bytes_head(8)
    _refused(head + struct.pack("<I", 2) + b"ab", r"inputs\[0\] \(image\): binary data is 6 bytes, expected 8",
             str(len(head)))


@pytest.mark.parametrize("data,match", [
    ("aGk=", r"inputs\[0\] \(image\)\.data must be a list of base64 strings"),
    ([1], r"inputs\[0\] \(image\)\.data\[0\] must be a base64 string"),
    (["aGk=", "not base64!"], r"inputs\[0\] \(image\)\.data\[1\] is not valid base64"),
])
def test_malformed_json_bytes_are_refused(data, match):
    req = {"inputs": [{"name": "image", "shape": [len(data) if isinstance(data, list) else 1], "datatype": "BYTES",
                       "data": data}]}
    _refused(_json(req), match)


def test_bytes_count_must_match_the_shape():
    req = {"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": ["aGk="]}]}
    _refused(_json(req), r"has 1 BYTES elements but shape \[2\] needs 2")


# ---------------------------------------------------------------- refusals of the envelope
def test_header_length_must_be_an_integer_inside_the_body():
    body, _ = _triton_body(np.zeros((1, 2), np.float32))
    _refused(body, "Inference-Header-Content-Length 'x1' is not an integer", "x1")
    _refused(body, f"Inference-Header-Content-Length 0 is outside the body's {len(body)} bytes", "0")
    _refused(body, f"Inference-Header-Content-Length {len(body) + 1} is outside the body's {len(body)} bytes",
             str(len(body) + 1))


def test_header_length_equal_to_the_body_means_no_binary_part():
    body = _json({"inputs": [_input()]})
    assert parse_infer_request(body, str(len(body))).tensor.tolist() == [[1.0, 2.0]]


def test_binary_bytes_beyond_what_the_input_declares_are_refused():
    head = _json({"inputs": [_input()]})
    _refused(head + b"abc", "the body has 3 binary bytes after the JSON header but "
                            r"inputs\[0\]\.parameters\.binary_data_size says 0", str(len(head)))


@pytest.mark.parametrize("req,match", [
    ([1, 2], "request body must be a JSON object, got list"),
    ({"id": 5, "inputs": [_input()]}, "id must be a string, got int"),
    ({"parameters": [1], "inputs": [_input()]}, "parameters must be an object"),
    ({}, r"request\.inputs is missing"),
    ({"inputs": {"name": "input"}}, r"request\.inputs must be a list, got dict"),
    ({"inputs": []}, r"inputs must hold exactly one tensor \(named one of \['input', 'image'\]\), got 0"),
    ({"inputs": [_input(), _input()]}, "exactly one tensor .*got 2"),
    ({"inputs": ["input"]}, r"inputs\[0\] must be an object"),
    ({"inputs": [{"shape": [1]}]}, r"inputs\[0\]\.name is missing"),
    ({"inputs": [_input(name=3)]}, r"inputs\[0\]\.name must be a str, got int"),
    ({"inputs": [_input(name="pixels")]}, r"inputs\[0\]\.name 'pixels' is not an input of this model; use one of "
                                          r"\['input', 'image'\]"),
    ({"inputs": [_input(parameters=[1])]}, r"inputs\[0\]\.parameters must be an object"),
    ({"inputs": [_input(parameters={"binary_data_size": -1})]}, "binary_data_size must be a non-negative integer, "
                                                                "got -1"),
    ({"inputs": [_input(parameters={"binary_data_size": True})]}, "non-negative integer, got True"),
    ({"inputs": [_input(parameters={"binary_data_size": "8"})]}, "non-negative integer, got '8'"),
])
def test_malformed_envelopes_are_400_naming_the_field(req, match):
    _refused(_json(req), match)


def test_a_null_parameters_object_means_none():
    req = parse_infer_request(_json({"parameters": None, "inputs": [_input(parameters=None)]}), None)
    assert req.parameters == {} and req.tensor.shape == (1, 2)


def test_id_is_bounded_at_its_limit():
    ok = parse_infer_request(_json({"id": "r" * 256, "inputs": [_input()]}), None)
    assert ok.id == "r" * 256
    _refused(_json({"id": "r" * 257, "inputs": [_input()]}), "id is 257 characters; this server echoes at most 256")
    assert parse_infer_request(_json({"id": "abc", "inputs": [_input()]}), None, max_id_chars=3).id == "abc"
    _refused(_json({"id": "abcd", "inputs": [_input()]}), "id is 4 characters; this server echoes at most 3",
             max_id_chars=3)
    assert parse_infer_request(_json({"inputs": [_input()]}), None).id is None


# ---------------------------------------------------------------- refusals of the tensor
@pytest.mark.parametrize("over,match", [
    ({"shape": []}, r"inputs\[0\] \(input\)\.shape \[\] must be a non-empty list of non-negative integers"),
    ({"shape": [1, -2]}, r"shape \[1, -2\] must be"),
    ({"shape": [1, True]}, r"shape \[1, True\] must be"),
    ({"shape": [1, 2.0]}, r"shape \[1, 2.0\] must be"),
    ({"shape": "1,2"}, r"inputs\[0\] \(input\)\.shape must be a list, got str"),
    ({"datatype": None}, r"inputs\[0\] \(input\)\.datatype must be a str, got NoneType"),
    ({"datatype": "BF16"}, r"inputs\[0\] \(input\)\.datatype BF16 is not decoded here; send input as FP32 or image "
                           "as BYTES"),
    ({"datatype": "FP8"}, r"datatype 'FP8' is not a v2 datatype \(\['BF16', 'BOOL', 'BYTES', 'FP16', 'FP32', "
                          r"'FP64', 'INT16', 'INT32', 'INT64', 'INT8', 'UINT16', 'UINT32', 'UINT64', 'UINT8'\]\)"),
    ({"data": {"a": 1}}, r"inputs\[0\] \(input\)\.data cannot be read as FP32"),
    ({"data": ["a", "b"]}, r"data cannot be read as FP32"),
    ({"data": [1.0, 2.0, 3.0]}, r"inputs\[0\] \(input\)\.data has 3 elements but shape \[1, 2\] needs 2"),
    ({"data": [1.0]}, r"data has 1 elements but shape \[1, 2\] needs 2"),
    ({"datatype": "UINT8", "data": [1, 300]}, "cannot be read as UINT8"),
])
def test_malformed_tensors_are_400_naming_the_field(over, match):
    _refused(_json({"inputs": [_input(**over)]}), match)


def test_missing_data_says_how_to_send_it():
    t = _input()
    del t["data"]
    _refused(_json({"inputs": [t]}), r"inputs\[0\] \(input\)\.data is missing \(or send it binary with "
                                     r"parameters\.binary_data_size\)")
    del t["datatype"]
    _refused(_json({"inputs": [t]}), r"inputs\[0\] \(input\)\.datatype is missing")
    del t["shape"]
    _refused(_json({"inputs": [t]}), r"inputs\[0\] \(input\)\.shape is missing")


def _binary_head(size, shape=(1, 2), dt="FP32"):
    return json.dumps({"inputs": [{"name": "input", "shape": list(shape), "datatype": dt,
                                   "parameters": {"binary_data_size": size}}]}).encode()


def test_binary_size_must_be_the_shapes_bytes():
    head = _binary_head(7)
    _refused(head + bytes(7), r"binary_data_size 7 != 2 elements x 4 bytes for shape \[1, 2\] FP32", str(len(head)))
    head = _binary_head(4, (2,), "INT16")
    req = parse_infer_request(head + struct.pack("<2h", -3, 9), str(len(head)))
    assert req.tensor.dtype == np.int16 and req.tensor.tolist() == [-3, 9]
    head = _binary_head(8)
    _refused(head + bytes(5), r"inputs\[0\] \(input\): binary data is 5 bytes, expected 8", str(len(head)))


# ---------------------------------------------------------------- JSON limits
def test_json_depth_counts_brackets_outside_strings_only():
    assert json_depth(b"1") == 0 and json_depth(b"[]") == 1 and json_depth(b'{"a": [[1], {}]}') == 3
    assert json_depth(b'["[[[{{{", "\\"]]]"]') == 1  # brackets in strings, an escaped quote
    assert json_depth(b"[[]][[[]]]") == 3


def test_nesting_at_the_limit_passes_and_one_deeper_is_refused():
    at = b"[" * 32 + b"]" * 32
    assert load_json(at) == json.loads(at)
    with pytest.raises(ProtocolError, match="request JSON nests 33 levels deep; this server takes at most 32") as e:
        load_json(b"[" + at + b"]")
    assert e.value.status == 400
    assert load_json(b"[[1]]", max_depth=2) == [[1]]
    with pytest.raises(ProtocolError, match="nests 3 levels deep; this server takes at most 2"):
        load_json(b"[[[1]]]", max_depth=2)


def test_deep_json_under_a_huge_limit_is_a_protocol_error_not_a_crash():
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(ProtocolError, match="request JSON nests deeper than 1000000 levels") as e:
        load_json(deep, max_depth=1_000_000)
    assert e.value.status == 400


@pytest.mark.parametrize("text", [b"{", b"\xff\xfe", b'{"a": nan1}'])
def test_not_json_is_a_400(text):
    with pytest.raises(ProtocolError, match="request body is not valid JSON") as e:
        load_json(text)
    assert e.value.status == 400


def test_a_body_that_nests_too_deep_is_refused_by_the_parser():
    req = {"inputs": [_input(data=[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]])]}
    _refused(_json(req), "request JSON nests 35 levels deep")


# ---------------------------------------------------------------- requested outputs
def test_no_outputs_means_all_json_or_all_binary_with_binary_data_output():
    req = parse_infer_request(_json({"inputs": [_input()]}), None)
    assert req.outputs == ["logits", "expert", "expert_name", "router_confidence"] and req.binary_outputs == set()
    req = parse_infer_request(_json({"inputs": [_input()], "parameters": {"binary_data_output": True}}), None)
    assert req.binary_outputs == set(protocol.OUTPUTS) and req.parameters == {"binary_data_output": True}


def test_named_outputs_keep_their_order_and_their_own_binary_flag():
    body, header = _triton_body(np.zeros((1, 2), np.float32),
                                outputs=[("expert_name", True), ("logits", False)], rid="q")
    req = parse_infer_request(body, header)
    assert req.id == "q" and req.outputs == ["expert_name", "logits"] and req.binary_outputs == {"expert_name"}
    req = parse_infer_request(_json({"inputs": [_input()], "parameters": {"binary_data_output": True},
                                     "outputs": [{"name": "expert"}, {"name": "logits",
                                                                      "parameters": {"binary_data": False}}]}), None)
    assert req.outputs == ["expert", "logits"] and req.binary_outputs == {"expert"}
    req = parse_infer_request(_json({"inputs": [_input()], "outputs": [{"name": "expert", "parameters": None}]}),
                              None)
    assert req.binary_outputs == set()


@pytest.mark.parametrize("outputs,match", [
    ([], r"outputs must be a non-empty list of \{\"name\": \.\.\.\} objects"),
    ({"name": "logits"}, "outputs must be a non-empty list"),
    (["logits"], r"outputs\[0\] must be an object"),
    ([{"name": "logits"}, {}], r"outputs\[1\]\.name is missing"),
    ([{"name": "probs"}], r"outputs\[0\]\.name 'probs' is not an output of this model; use any of \['logits', "
                          r"'expert', 'expert_name', 'router_confidence'\]"),
    ([{"name": "logits"}, {"name": "expert", "parameters": 1}], r"outputs\[1\]\.parameters must be an object"),
])
def test_malformed_outputs_are_refused(outputs, match):
    _refused(_json({"inputs": [_input()], "outputs": outputs}), match)


# ---------------------------------------------------------------- the answer
def _result():
    return SimpleNamespace(logits=np.array([[0.5, -1.25], [2.0, 3.5]], np.float64),
                           expert_index=np.array([1, 0], np.int64), experts=["w4", "w8-long-name"],
                           confidence=np.array([0.75, 1.0], np.float64))


def _request(outputs, binary=(), rid=None):
    return protocol.InferRequest(rid, "input", np.zeros((2, 2), np.float32), list(outputs), set(binary))


def test_json_answer_holds_every_output_as_tritonclient_reads_it():
    body, header = encode_infer_response("m", "3", _request(protocol.OUTPUTS, rid="r7"), _result())
    assert header is None
    doc = json.loads(body)
    assert doc["model_name"] == "m" and doc["model_version"] == "3" and doc["id"] == "r7"
    outs = {o["name"]: o for o in doc["outputs"]}
    assert [o["name"] for o in doc["outputs"]] == list(protocol.OUTPUTS)
    assert outs["logits"] == {"name": "logits", "datatype": "FP32", "shape": [2, 2], "data": [0.5, -1.25, 2.0, 3.5]}
    assert outs["expert"] == {"name": "expert", "datatype": "INT32", "shape": [2], "data": [1, 0]}
    assert outs["expert_name"] == {"name": "expert_name", "datatype": "BYTES", "shape": [2],
                                   "data": ["w4", "w8-long-name"]}
    assert outs["router_confidence"]["datatype"] == "FP32" and outs["router_confidence"]["data"] == [0.75, 1.0]
    res = httpclient.InferResult.from_response_body(body)
    np.testing.assert_array_equal(res.as_numpy("logits"), np.array([[0.5, -1.25], [2.0, 3.5]], np.float32))
    assert res.as_numpy("expert").dtype == np.int32


def test_binary_answer_is_the_bytes_written_out_by_hand():
    req = _request(["expert_name", "logits", "expert"], binary={"expert_name", "logits"})
    body, header = encode_infer_response("m", "1", req, _result())
    head = json.loads(body[:header])
    assert "id" not in head
    names = b"".join(struct.pack("<I", len(s)) + s for s in (b"w4", b"w8-long-name"))
    logits = struct.pack("<4f", 0.5, -1.25, 2.0, 3.5)
    assert body[header:] == names + logits
    sizes = {o["name"]: o.get("parameters", {}).get("binary_data_size") for o in head["outputs"]}
    assert sizes == {"expert_name": len(names), "logits": 16, "expert": None}
    assert head["outputs"][2]["data"] == [1, 0] and "data" not in head["outputs"][0]
    res = httpclient.InferResult.from_response_body(body, header_length=header)
    assert res.as_numpy("expert_name").tolist() == [b"w4", b"w8-long-name"]
    np.testing.assert_array_equal(res.as_numpy("logits").ravel(), [0.5, -1.25, 2.0, 3.5])
    np.testing.assert_array_equal(res.as_numpy("expert"), [1, 0])


def test_binary_int32_and_confidence_answers():
    body, header = encode_infer_response("m", "1", _request(["expert", "router_confidence"],
                                                            binary={"expert", "router_confidence"}), _result())
    assert body[header:] == struct.pack("<2i", 1, 0) + struct.pack("<2f", 0.75, 1.0)


# ---------------------------------------------------------------- images
def _png(w=4, h=3):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 100, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_images_are_decoded_and_stacked_as_float32():
    out = decode_images([_png(), _png()], lambda im: np.asarray(im, np.float64).transpose(2, 0, 1) / 100.0)
    assert out.dtype == np.float32 and out.shape == (2, 3, 3, 4) and (out == 1.0).all()


def test_image_limits_are_413_and_unreadable_images_400():
    from moqe_compile.tasks.image.preprocess import InputLimits

    pre = lambda im: np.zeros((1,))  # noqa: E731
    with pytest.raises(ProtocolError, match=r"inputs\[0\] \(image\) holds 3 images; the input limit max_images=2") as e:
        decode_images([_png()] * 3, pre, InputLimits(max_images=2))
    assert e.value.status == 413
    with pytest.raises(ProtocolError) as e:
        decode_images([_png(40, 40)], pre, InputLimits(max_image_pixels=100))
    assert e.value.status == 413 and "element 0" in str(e.value)
    with pytest.raises(ProtocolError, match=r"inputs\[0\] \(image\) element 1") as e:
        decode_images([_png(), b"not an image"], pre)
    assert e.value.status == 400
    assert decode_images([_png()], pre, InputLimits(max_images=1)).shape == (1, 1)


# ---------------------------------------------------------------- boundaries found by mutation testing
@pytest.mark.parametrize("req,message", [
    ({"parameters": [1], "inputs": [_input()]}, "parameters must be an object."),
    ({"inputs": [1]}, "inputs[0] must be an object."),
    ({"inputs": [_input()], "outputs": []}, 'outputs must be a non-empty list of {"name": ...} objects.'),
    ({"inputs": [_input(parameters=[1])]}, "inputs[0].parameters must be an object."),
])
def test_whole_messages(req, message):
    assert str(_refused(_json(req), ".")) == message


def test_a_one_byte_json_header_is_inside_the_body():
    _refused(b"7xyz", "request body must be a JSON object, got int", "1")


def test_a_zero_byte_binary_tensor_is_accepted():
    head = _binary_head(0, (0, 2))
    req = parse_infer_request(head, str(len(head)))
    assert req.tensor.shape == (0, 2) and req.tensor.dtype == np.float32


def test_an_empty_bytes_element_may_end_the_binary_data():
    blob = struct.pack("<I", 2) + b"xy" + struct.pack("<I", 0)
    head = _bytes_head(len(blob), (2,))
    assert parse_infer_request(head + blob, str(len(head))).tensor == [b"xy", b""]


def test_bytes_element_lengths_are_unsigned():
    head = _bytes_head(4)
    _refused(head + b"\xff\xff\xff\xff", "BYTES element at byte 0 claims 4294967295 bytes past the end",
             str(len(head)))


@pytest.mark.parametrize("data,match", [
    (["aGk=", 1], r"data\[1\] must be a base64 string"),  # not read as the string "1"
    (["aGk=!"], r"data\[0\] is not valid base64"),  # characters outside the alphabet are not skipped
])
def test_json_bytes_elements_are_strict(data, match):
    _refused(_json({"inputs": [{"name": "image", "shape": [len(data)], "datatype": "BYTES", "data": data}]}), match)


def test_json_depth_of_nothing_is_zero():
    assert json_depth(b"") == 0 and json_depth(b'"[["') == 0


def test_the_answers_json_header_is_compact():
    body, _ = encode_infer_response("m", "1", _request(["expert"]), _result())
    assert body == b'{"model_name":"m","model_version":"1","outputs":[{"name":"expert","datatype":"INT32",' \
                   b'"shape":[2],"data":[1,0]}]}'


def test_the_pixel_total_is_over_all_images_of_a_request():
    from moqe_compile.tasks.image.preprocess import InputLimits

    limits = InputLimits(max_total_pixels=30)  # each 4x3 image fits, three do not
    pre = lambda im: np.zeros((1,))  # noqa: E731
    assert decode_images([_png(), _png()], pre, limits).shape == (2, 1)
    with pytest.raises(ProtocolError, match=r"inputs\[0\] \(image\)") as e:
        decode_images([_png()] * 3, pre, limits)
    assert e.value.status == 413


def test_a_decompression_bomb_header_is_413_naming_the_limit():
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 40_000, 40_000, 8, 2, 0, 0, 0)  # claims 1.6 G pixels, holds none
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")
    with pytest.raises(ProtocolError, match=r"element 0 is a decompression bomb .*max_image_pixels=50000000") as e:
        decode_images([png], lambda im: np.zeros((1,)))
    assert e.value.status == 413


# ---------------------------------------------------------------- hostile counts and lenient types
def test_a_bytes_count_over_max_images_is_413_before_any_element_is_read():
    from moqe_compile.tasks.image.preprocess import InputLimits

    # Not base64 at all: refused for the count, so no element was looked at.
    req = {"inputs": [{"name": "image", "shape": [3], "datatype": "BYTES", "data": [5, 5, 5]}]}
    _refused(_json(req), r"inputs\[0\] \(image\) holds 3 images; the input limit max_images=2", status=413,
             limits=InputLimits(max_images=2))
    blob = struct.pack("<I", 0) * 257
    head = _bytes_head(len(blob), (257,))
    _refused(head + blob, "holds 257 images; the input limit max_images=256", str(len(head)), status=413)


def test_binary_bytes_past_the_declared_count_stop_the_read():
    blob = struct.pack("<I", 0) * 10_000  # ten thousand empty elements under shape [1]
    head = _bytes_head(len(blob))
    _refused(head + blob, r"inputs\[0\] \(image\) has more than 1 BYTES elements but shape \[1\] needs 1",
             str(len(head)))


def test_json_bytes_are_counted_before_they_are_decoded():
    req = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["not base64!"] * 1000}]}
    _refused(_json(req), r"inputs\[0\] \(image\)\.data has 1000 BYTES elements but shape \[1\] needs 1")


@pytest.mark.parametrize("shape", [[1, 2**40, 2**40, 1], [1, 2**32, 2**32, 1], [1, 10**30]])
def test_a_huge_shape_is_refused_naming_its_true_element_count(shape):
    # numpy's int64 product wrapped to 0, so the first two "needed 0" (and then failed to reshape).
    _refused(_json({"inputs": [_input(shape=shape, data=[])]}),
             rf"inputs\[0\] \(input\)\.data has 0 elements but shape .* needs {math.prod(shape)}\.$")
    head = _binary_head(0, shape)
    _refused(head, rf"binary_data_size 0 != {math.prod(shape)} elements x 4 bytes", str(len(head)))


@pytest.mark.parametrize("dt,data,match", [
    ("FP32", ["1.5", "2"], r"data cannot be read as FP32: it holds str; send JSON numbers"),
    ("FP32", [True, False], r"data cannot be read as FP32: it holds bool; send JSON numbers"),
    ("FP32", [1.5, True], "it holds bool"),  # numpy would read the mix as [1.5, 1.0]
    ("INT32", ["1", 2], r"data cannot be read as INT32: it holds str; send JSON numbers"),
    ("BOOL", [1, 0], r"data cannot be read as BOOL: it holds int; send JSON true/false"),
    ("FP32", [[1.0], 2.0], r"it holds list \(a list: data nested unlike its shape\)"),
    ("FP32", 1.5, r"data cannot be read as FP32: send a list, not float"),
])
def test_json_data_of_the_wrong_json_type_is_refused(dt, data, match):
    _refused(_json({"inputs": [_input(datatype=dt, data=data)]}), match)


def test_json_numbers_of_the_right_type_still_decode():
    assert parse_infer_request(_json({"inputs": [_input(data=[1, 2.5])]}), None).tensor.tolist() == [[1.0, 2.5]]
    req = parse_infer_request(_json({"inputs": [_input(datatype="BOOL", data=[True, False])]}), None)
    assert req.tensor.dtype == bool and req.tensor.tolist() == [[True, False]]


@pytest.mark.parametrize("req,match", [
    ({"parameters": {"binary_data_output": "false"}}, r"^parameters\.binary_data_output must be true or false, "
                                                      r"got 'false'\.$"),
    ({"parameters": {"binary_data_output": 1}}, "binary_data_output must be true or false, got 1"),
    ({"outputs": [{"name": "expert", "parameters": {"binary_data": "no"}}]},
     r"^outputs\[0\]\.parameters\.binary_data must be true or false, got 'no'\.$"),
    ({"parameters": []}, "^parameters must be an object.$"),
    ({"parameters": 0}, "^parameters must be an object.$"),
    ({"outputs": [{"name": "expert", "parameters": []}]}, r"^outputs\[0\]\.parameters must be an object\.$"),
])
def test_flags_are_json_booleans_and_parameters_objects(req, match):
    _refused(_json({"inputs": [_input()], **req}), match)


def test_an_empty_inputs_parameters_list_is_refused_too():
    _refused(_json({"inputs": [_input(parameters=[])]}), r"^inputs\[0\]\.parameters must be an object\.$")


def test_json_depth_counts_backslash_runs_before_quotes():
    # An even run escapes itself, not the quote: the string ends there and the bracket after counts.
    assert json_depth(json.dumps(["\\", "]"]).encode()) == 1
    assert json_depth(json.dumps(["\\\\", [["\\\""]]]).encode()) == 3
    assert json_depth(json.dumps({"a": "\\\"[[[", "b": [[]]}).encode()) == 3


@pytest.mark.parametrize("shape", [[2**40, 1, 1, 1], [300, 3, 4, 4]])
def test_fp32_samples_over_the_limit_are_413_before_any_element_is_read(shape):
    """Checked on the declared shape: the body holds no data at all, and that is not what is named."""
    _refused(_json({"inputs": [_input(shape=shape, data=[])]}),
             rf"inputs\[0\] \(input\) holds {shape[0]} images; the input limit max_images=256", status=413)


def test_json_depth_matches_the_parsed_nesting_on_random_documents():
    import random

    def depth(o):
        if isinstance(o, list):
            return 1 + max(map(depth, o), default=0)
        if isinstance(o, dict):
            return 1 + max(map(depth, o.values()), default=0)
        return 0

    rng = random.Random(0)

    def doc(d=0):
        r = rng.random()
        if d > 5 or r < 0.3:
            return "".join(rng.choice('ab"\\[]{}') for _ in range(rng.randint(0, 6)))
        if r < 0.6:
            return [doc(d + 1) for _ in range(rng.randint(0, 3))]
        return {doc(9): doc(d + 1) for _ in range(rng.randint(0, 3))}

    for _ in range(2000):
        o = doc()
        assert json_depth(json.dumps(o).encode()) == depth(o), o


def test_a_body_of_backslashes_is_refused_before_the_escape_scan_indexes_them(monkeypatch):
    """The escape scan keeps 8 bytes per backslash: their number is bounded (none in numbers or base64)."""
    monkeypatch.setattr(protocol, "MAX_BACKSLASHES", 10)
    assert json_depth(json.dumps(["\\" * 5]).encode()) == 1  # 10 backslashes once escaped: still read
    with pytest.raises(protocol.ProtocolError, match="holds 12 backslashes; at most 10 are read") as e:
        json_depth(json.dumps(["\\" * 6]).encode())
    assert e.value.status == 400
