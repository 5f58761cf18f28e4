"""Codec round trips within their stated error bounds, and rejection of what they cannot hold."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from storage.codecs import FP16_MAX, Codec, CodecError

finite32 = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False, width=32)


def vectors(max_dim=64):
    return st.tuples(st.integers(1, 8), st.integers(1, max_dim)).flatmap(
        lambda shape: arrays(np.float32, shape, elements=finite32)
    )


@given(vectors())
def test_fp32_is_exact(x):
    codec = Codec("fp32")
    payload = codec.encode(x)
    assert payload.shape == (x.shape[0], codec.payload_bytes(x.shape[1]))
    np.testing.assert_array_equal(codec.decode(payload, x.shape[1]), x)


@given(vectors())
def test_fp16_relative_error_bound(x):
    codec = Codec("fp16")
    y = codec.decode(codec.encode(x), x.shape[1])
    # half an ulp: 2**-11 relative in the normal range, 2**-25 absolute in the subnormal range
    bound = np.maximum(np.abs(x) * 2.0**-11, 2.0**-25)
    assert (np.abs(y - x) <= bound * 1.0001).all()


@given(vectors())
def test_int8_error_bound_per_vector_scale(x):
    codec = Codec("int8")
    payload = codec.encode(x)
    assert payload.shape[1] == x.shape[1] + 4  # d bytes + float32 scale
    y = codec.decode(payload, x.shape[1])
    scale = np.abs(x).max(axis=1, keepdims=True) / 127.0
    assert (np.abs(y - x) <= scale / 2 * 1.001 + 1e-30).all()


def test_int8_zero_vector_decodes_to_zero():
    codec = Codec("int8")
    np.testing.assert_array_equal(codec.decode(codec.encode(np.zeros((2, 5), np.float32)), 5), 0)


@pytest.mark.parametrize("name", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_rejected(name, bad):
    x = np.ones((3, 4), np.float32)
    x[2, 1] = bad
    with pytest.raises(CodecError, match="row 2 has a NaN or inf"):
        Codec(name).encode(x)


def test_fp16_out_of_range_rejected():
    with pytest.raises(CodecError, match="fp16 range"):
        Codec("fp16").encode(np.array([[FP16_MAX * 2]], np.float32))


def test_sizes_for_d64():
    assert [Codec(n).payload_bytes(64) for n in ("fp32", "fp16", "int8")] == [256, 128, 68]


def test_unknown_codec_named():
    with pytest.raises(ValueError, match="codec: unknown codec 'bf16'"):
        Codec("bf16")
