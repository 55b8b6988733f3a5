"""Tensor specs, signatures and the v2 wire conversions, without a server."""

from __future__ import annotations

import numpy as np
import pytest

import apportion as ap
from apportion.serve import DATATYPES, Signature, TensorError, TensorSpec
from apportion.serve.tensors import OutputError, check_header, from_bytes, from_json, to_bytes, to_json


def test_datatypes_are_the_protocols() -> None:
    assert list(DATATYPES) == ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16",
                               "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"]


@pytest.mark.parametrize(("kw", "words"), [
    (dict(name="", datatype="FP32", shape=[1]), ["'name'"]),
    (dict(name="x", datatype="FLOAT", shape=[1]), ["tensor 'x'", "'datatype'", "FP32", "'FLOAT'"]),
    (dict(name="x", datatype="FP32", shape="12"), ["tensor 'x'", "'shape'"]),
    (dict(name="x", datatype="FP32", shape=[2, -2]), ["tensor 'x'", "'shape'", "-1"]),
    (dict(name="x", datatype="FP32", shape=[True]), ["tensor 'x'", "'shape'"]),
    (dict(name="x", datatype="FP32", shape=[1.5]), ["tensor 'x'", "'shape'"]),
])
def test_tensor_spec_is_validated(kw: dict, words: list[str]) -> None:
    with pytest.raises(ap.QuotaError) as info:
        TensorSpec(**kw)
    for w in words:
        assert w in str(info.value)


def test_tensor_spec_normalises_shape() -> None:
    s = TensorSpec("x", "INT8", [np.int64(2), -1])
    assert s.shape == (2, -1) and s.dtype == np.int8
    assert s.matches((2, 7)) and not s.matches((3, 7)) and not s.matches((2,))
    assert TensorSpec("s", "FP32", ()).matches(())


def test_signature_is_validated() -> None:
    x = TensorSpec("x", "FP32", [1])
    with pytest.raises(ap.QuotaError, match="'inputs' must be a non-empty"):
        Signature([], [x])
    with pytest.raises(ap.QuotaError, match="'outputs' must hold TensorSpec"):
        Signature([x], ["y"])  # type: ignore[list-item]
    with pytest.raises(ap.QuotaError, match=r"'inputs' names \['x'\] more than once"):
        Signature([x, x], [x])
    with pytest.raises(ap.QuotaError, match="'tensor' must be 'numpy' or 'torch'"):
        Signature([x], [x], tensor="jax")


def test_check_header() -> None:
    spec = TensorSpec("x", "FP32", [-1, 3])
    assert check_header("m", spec, "FP32", [4, 3]) == (4, 3)
    with pytest.raises(TensorError, match=r"model 'm', input 'x': expected datatype FP32, got 'FP64'"):
        check_header("m", spec, "FP64", [4, 3])
    with pytest.raises(TensorError, match=r"expected shape \[-1, 3\] \(-1: any\), got \[4, 2\]"):
        check_header("m", spec, "FP32", [4, 2])
    with pytest.raises(TensorError, match="'shape' must be a list of dims >= 0"):
        check_header("m", spec, "FP32", [4, -1])


@pytest.mark.parametrize("shape", [[2**63, 0], [2**62, 0], [0, 2**61 + 1], [2**40, 2**40]])
def test_check_header_refuses_shapes_no_array_can_have(shape: list[int]) -> None:
    # with a zero dim there is no element to check the data's length against, but numpy still
    # makes no array whose other dims span more bytes than an index holds
    spec = TensorSpec("x", "FP32", [-1, -1])
    with pytest.raises(TensorError, match=r"model 'm', input 'x': shape .* is too large for any FP32 array"):
        check_header("m", spec, "FP32", shape)


def test_check_header_takes_empty_and_large_shapes_numpy_can_make() -> None:
    spec = TensorSpec("x", "INT8", [-1, -1])
    assert check_header("m", spec, "INT8", [0, 0]) == (0, 0)
    assert check_header("m", spec, "INT8", [2**31, 0]) == (2**31, 0)
    assert np.empty((2**31, 0), np.int8).shape == (2**31, 0)
    shape = check_header("m", spec, "INT8", [2**62, 0])
    assert from_bytes("m", spec, shape, memoryview(b"")).shape == (2**62, 0)


def test_bytes_count_beyond_what_the_bytes_hold_is_refused_before_allocating() -> None:
    spec = TensorSpec("s", "BYTES", [-1])
    with pytest.raises(TensorError, match=r"input 's': shape \[1099511627776\] has 1099511627776 BYTES "
                                          r"elements, but 7 bytes hold at most 1"):
        from_bytes("m", spec, (2**40,), memoryview(b"\0" * 7))  # 8 TiB of object pointers otherwise


def test_from_json_refuses_data_nested_deeper_than_an_array() -> None:
    deep: list = [1.0]
    for _ in range(200):
        deep = [deep]
    with pytest.raises(TensorError, match="model 'm', input 'x': 'data' is not FP32 data"):
        from_json("m", TensorSpec("x", "FP32", [-1]), (1,), deep)


def test_from_bytes_is_zero_copy_over_a_writable_body() -> None:
    body = bytearray(np.arange(6, dtype=np.float32).tobytes())
    arr = from_bytes("m", TensorSpec("x", "FP32", [2, 3]), (2, 3), memoryview(body))
    assert arr.flags.writeable and arr.shape == (2, 3)
    arr[0, 0] = 42
    assert np.frombuffer(body, np.float32)[0] == 42  # the same memory


def test_from_bytes_copies_misaligned_data() -> None:
    body = bytearray(b"\0" + np.arange(3, dtype=np.float64).tobytes())
    arr = from_bytes("m", TensorSpec("x", "FP64", [3]), (3,), memoryview(body)[1:])
    assert arr.flags.aligned and arr.tolist() == [0.0, 1.0, 2.0]
    arr[0] = 5
    assert body[1:9] == b"\0" * 8  # a copy


def test_from_bytes_checks_the_length() -> None:
    with pytest.raises(TensorError, match=r"input 'x': shape \[3\] of INT16 needs 6 bytes, got 5"):
        from_bytes("m", TensorSpec("x", "INT16", [3]), (3,), memoryview(b"\0" * 5))


def test_bytes_round_trip_and_truncation() -> None:
    spec = TensorSpec("s", "BYTES", [-1])
    arr = np.array([b"ab", b"", "é".encode()], dtype=object)
    raw = to_bytes(spec, arr)
    assert from_bytes("m", spec, (3,), memoryview(raw)).tolist() == arr.tolist()
    with pytest.raises(TensorError, match="BYTES data ends at element 3 of 4"):
        from_bytes("m", spec, (4,), memoryview(raw))
    with pytest.raises(TensorError, match="BYTES element 2 says 2 bytes, 1 left"):
        from_bytes("m", spec, (3,), memoryview(raw[:-1]))
    with pytest.raises(TensorError, match="1 bytes after the last of 3"):
        from_bytes("m", spec, (3,), memoryview(raw + b"x"))
    assert to_json("m", spec, arr) == ["ab", "", "é"]
    with pytest.raises(OutputError, match="not UTF-8"):
        to_json("m", spec, np.array([b"\xff"], dtype=object))


@pytest.mark.parametrize(("datatype", "data", "want"), [
    ("FP32", [[1, 2], [3, 4]], np.array([[1, 2], [3, 4]], np.float32)),
    ("INT64", [1, 2, 3, 4], np.array([[1, 2], [3, 4]], np.int64)),
    ("BOOL", [True, False, True, True], np.array([[True, False], [True, True]])),
    ("BYTES", ["a", "b", "c", "d"], np.array([[b"a", b"b"], [b"c", b"d"]], dtype=object)),
    # ints numpy guesses as float64 or object (beyond int64): were refused as "not numbers"
    ("UINT64", [[0, 2**64 - 1], [7, 2**63]], np.array([[0, 2**64 - 1], [7, 2**63]], np.uint64)),
    ("FP64", [10**23, 1.5, 2**64, 0], np.array([[1e23, 1.5], [2.0**64, 0]], np.float64)),
])
def test_from_json(datatype: str, data: list, want: np.ndarray) -> None:
    got = from_json("m", TensorSpec("x", datatype, [2, 2]), (2, 2), data)
    assert got.dtype == want.dtype and got.tolist() == want.tolist()


@pytest.mark.parametrize(("datatype", "data", "words"), [
    ("FP32", [1, 2, 3], "needs 4 elements, 'data' has 3"),
    ("INT32", [1.5, 2, 3, 4], "not INT32 data"),
    # Out of range: refused by apportion's own check (numpy 1.x converted with a warning:
    # 300 as UINT8 read 44), so the message is its own whatever numpy does.
    ("UINT8", [300, 1, 2, 3], "not UINT8 data: 300 is outside the range of UINT8 \\(0 to 255\\)"),
    ("INT8", [[1, -129], [2, 3]], "-129 is outside the range of INT8 \\(-128 to 127\\)"),
    ("INT32", [2**31, 1, 2, 3], "2147483648 is outside the range of INT32"),
    ("UINT16", [0, 1, -1, 3], "-1 is outside the range of UINT16"),
    ("UINT32", [0, 1, 2, 2**40], "1099511627776 is outside the range of UINT32"),
    ("BOOL", [1, 0, 1, 0], "not BOOL data"),
    ("BYTES", [1, 2, 3, 4], "not BYTES data"),
    ("FP32", [[1, 2], [3]], "not FP32 data"),
    ("UINT64", [2**64, 1, 2, 3], "18446744073709551616 is outside the range of UINT64"),
    ("UINT64", [2**64 - 1, 1.5, 2, 3], "not UINT64 data"),  # a float among them
    ("UINT64", [2**64 - 1, -1, 2, 3], "-1 is outside the range of UINT64"),
    ("INT64", [2**63, 1, 2, 3], "9223372036854775808 is outside the range of INT64"),
    ("UINT64", [2**64 - 1, True, 2, 3], "not UINT64 data"),
    # true and false are BOOL's: they were served as 1.0 and 0.0, 1 and 0
    ("FP32", [True, False, True, True], "not FP32 data: elements must be numbers, got bool"),
    ("INT32", [True, False, True, True], "not INT32 data: elements must be integers, got bool"),
    # a finite number past the type's range was served as inf
    ("FP32", [1e39, 1, 2, 3], r"not FP32 data: element 0 \(1e\+39\) is outside the range of FP32"),
    ("FP16", [1, 70000, 2, 3], r"element 1 \(70000\) is outside the range of FP16 \(at most 65504"),
    # 2**64 as the HTTP front's JSON reader gives it (a float): was "elements must be integers"
    ("UINT64", [2.0**64, 1, 2, 3], r"element 0 \(18446744073709551616, an integer beyond 64 bits\) is outside "
     "the range of UINT64"),
    ("INT64", [[1.0, 2.0], [3.0, -(2.0**64)]], r"element 3 \(-18446744073709551616, an integer beyond 64 bits"),
])
def test_from_json_rejects(datatype: str, data: list, words: str) -> None:
    with pytest.raises(TensorError, match=f"model 'm', input 'x': .*{words}"):
        from_json("m", TensorSpec("x", datatype, [2, 2]), (2, 2), data)


@pytest.mark.parametrize("element", [5, None, 1.5, [b"a"]])
def test_bytes_outputs_hold_bytes_or_text(element: object) -> None:
    sig = Signature([TensorSpec("x", "FP32", [-1])], [TensorSpec("u", "BYTES", [-1])])
    ok = sig.from_model("m", np.array([b"a", "b", np.bytes_(b"c")], dtype=object))["u"]
    assert to_bytes(sig.outputs[0], ok) == b"".join(len(v).to_bytes(4, "little") + v for v in (b"a", b"b", b"c"))
    bad = np.empty(2, dtype=object)
    bad[:] = [b"a", element]
    with pytest.raises(OutputError, match=f"model 'm', output 'u': declared BYTES, got an element of type "
                                          f"{type(element).__name__}"):
        sig.from_model("m", bad)


def test_what_the_model_receives_and_returns() -> None:
    one = Signature([TensorSpec("x", "FP32", [-1])], [TensorSpec("y", "FP32", [-1])])
    x = np.ones(2, np.float32)
    assert one.to_model("m", {"x": x}) is x
    two = Signature([TensorSpec("a", "FP32", [-1]), TensorSpec("b", "INT8", [-1])],
                    [TensorSpec("p", "FP32", [-1]), TensorSpec("q", "INT8", [-1])])
    got = two.to_model("m", {"b": x, "a": x})
    assert list(got) == ["a", "b"]
    with pytest.raises(TensorError, match=r"model 'm': missing input 'b' \(expected INT8 with shape \[-1\]\)"):
        two.to_model("m", {"a": x})
    q = np.ones(2, np.int8)
    assert list(two.from_model("m", {"q": q, "p": x})) == ["p", "q"]
    assert two.from_model("m", (x, q))["q"] is q
    with pytest.raises(OutputError, match=r"returned outputs \['p'\], declared \['p', 'q'\]"):
        two.from_model("m", {"p": x})
    with pytest.raises(OutputError, match="declares 2 outputs"):
        two.from_model("m", x)
    with pytest.raises(OutputError, match="output 'q': declared INT8 .* got dtype float32"):
        two.from_model("m", (x, x))
    with pytest.raises(OutputError, match=r"output 'y': declared shape \[-1\], got \[1, 2\]"):
        one.from_model("m", x.reshape(1, 2))
    assert one.from_model("m", (x,))["y"] is x  # a 1-tuple for one output


def test_torch_models_share_the_arrays_memory() -> None:
    torch = pytest.importorskip("torch")
    sig = Signature([TensorSpec("x", "FP32", [-1])], [TensorSpec("y", "FP32", [-1])], tensor="torch")
    x = np.arange(3, dtype=np.float32)
    t = sig.to_model("m", {"x": x})
    assert isinstance(t, torch.Tensor) and t.data_ptr() == x.ctypes.data
    ro = np.frombuffer(bytes(x.tobytes()), np.float32)  # read-only (a gRPC message's bytes)
    t = sig.to_model("m", {"x": ro})
    assert t.data_ptr() != ro.ctypes.data and t.tolist() == [0.0, 1.0, 2.0]
    out = sig.from_model("m", torch.ones(2) * 3)
    assert out["y"].dtype == np.float32 and out["y"].tolist() == [3.0, 3.0]


def test_torch_outputs_become_arrays_with_or_without_autograd() -> None:
    torch = pytest.importorskip("torch")
    sig = Signature([TensorSpec("x", "FP32", [-1])], [TensorSpec("y", "FP32", [-1])], tensor="torch")
    plain = torch.arange(3, dtype=torch.float32)
    out = sig.from_model("m", plain)["y"]
    assert out.ctypes.data == plain.data_ptr()  # a view of the tensor's memory, not a copy
    graded = torch.ones(2, requires_grad=True) * 2  # .numpy() refuses it: detached first
    out = sig.from_model("m", graded)["y"]
    assert out.dtype == np.float32 and out.tolist() == [2.0, 2.0]
    with pytest.raises(OutputError, match=r"output 'y'.*declared FP32.*float64"):
        sig.from_model("m", torch.ones(2, dtype=torch.float64))


def test_the_cost_of_converting_counts_each_object_element() -> None:
    # The fronts convert an answer off the event loop from OFF_LOOP_BYTES of this cost on. By
    # nbytes alone a BYTES answer of 120,000 elements (0.96 MB) was encoded on the loop, one
    # Python object at a time, holding every other request for 200 ms.
    from apportion.serve.tensors import OFF_LOOP_BYTES, PER_ELEMENT_BYTES, conversion_bytes

    words = np.full(120_000, b"ab", dtype=object)
    floats = np.zeros(1000, np.float32)
    assert words.nbytes < OFF_LOOP_BYTES <= conversion_bytes([words]) == 120_000 * PER_ELEMENT_BYTES
    assert conversion_bytes([floats, words[:10]]) == 4000 + 10 * PER_ELEMENT_BYTES
    assert conversion_bytes([]) == 0


def test_json_infinities_and_nan_given_as_such_stay() -> None:
    # (Python's json reads NaN and Infinity: tritonclient writes them so.)
    got = from_json("m", TensorSpec("x", "FP32", [-1]), (3,), [float("inf"), float("nan"), 1e38])
    assert np.isinf(got[0]) and np.isnan(got[1]) and got[2] == np.float32(1e38)


def test_a_bool_byte_other_than_0_or_1_is_refused() -> None:
    # The byte 0x02 made a bool numpy compares and sums as 2.
    spec = TensorSpec("b", "BOOL", [-1])
    assert from_bytes("m", spec, (3,), memoryview(b"\x01\x00\x01")).tolist() == [True, False, True]
    with pytest.raises(TensorError, match=r"model 'm', input 'b': BOOL element 1 is the byte 0x02; a BOOL is "
                       r"the byte 0 or 1"):
        from_bytes("m", spec, (3,), memoryview(b"\x01\x02\x01"))


def test_a_number_literal_past_a_float_is_malformed_json_not_an_infinity() -> None:
    # 1e400 (orjson refuses it, Python's json read it as inf) was served as an infinity.
    from apportion.serve.app import _loads

    with pytest.raises(ValueError, match="the number 1e400 is beyond a 64-bit float"):
        _loads(b"[1e400, 1]")
    assert _loads(b"[Infinity, 1.5]") == [float("inf"), 1.5]  # the token stays what it says


def test_the_http_fronts_json_reader_gives_integers_beyond_64_bits_as_floats() -> None:
    # What the check above is for: orjson reads 2**64 as a float.
    from apportion.serve.app import _loads

    data = _loads(b"[18446744073709551616, 1]")
    assert isinstance(data[0], float)
    with pytest.raises(TensorError, match="an integer beyond 64 bits"):
        from_json("m", TensorSpec("x", "UINT64", [-1]), (2,), data)
