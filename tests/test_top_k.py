"""The top-k graphs (engine/top_k.py): the two-stage CPU graph returns what ONNX TopK over the whole row returns,
values, ids and the order of ties, for any row; kept bindings follow every change of what they are given."""

import numpy as np
import onnxruntime as ort
import pytest

from engine.top_k import BLOCK, LogSoftmax, TopK


def reference(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k largest, ties by lower index: a stable sort of -x (NaN-free rows)."""
    order = np.argsort(-x, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(x, order, axis=1), order


@pytest.fixture(scope="module")
def options():
    o = ort.SessionOptions()
    o.intra_op_num_threads = 1
    return o


def rows_with_ties(vocab: int, rng: np.random.Generator) -> np.ndarray:
    x = (rng.standard_normal((7, vocab)) * 3 - 9).astype(np.float32)
    x[1] = -4.0                                   # one value everywhere: the first k ids
    x[2, ::BLOCK] = 0.0                           # every block's maximum tied, at its first token
    x[3, BLOCK - 1::BLOCK] = 0.0                  # ... at its last token: the best block is not the lowest id
    x[4] = np.round(x[4])                         # many ties inside and across blocks
    x[5, : vocab // 2] = -np.inf                  # log-probs of tokens a model rules out
    x[6, -3:] = 5.0                               # the best tokens in the last (padded) block
    return x


@pytest.mark.parametrize("vocab", [8000, 1000, 1001, 3 * BLOCK * 8 + 5])
def test_blocked_top_k_is_top_k(vocab, options):
    rng = np.random.default_rng(vocab)
    blocked, plain = TopK(["CPUExecutionProvider"], options, vocab), TopK(["CPUExecutionProvider"], options)
    assert blocked.blocked_max_k == vocab // (8 * BLOCK) > 0 and plain.blocked_max_k == 0
    x = rows_with_ties(vocab, rng)
    for k in sorted({1, 2, 3, blocked.blocked_max_k // 2, blocked.blocked_max_k}):
        got, whole = blocked(x, k), plain(x, k)
        want_values, want_ids = reference(x, k)
        np.testing.assert_array_equal(got.ids, want_ids)
        np.testing.assert_array_equal(got.log_probs, want_values)
        np.testing.assert_array_equal(whole.ids, want_ids)
        assert got.vocab == vocab


def test_blocked_top_k_nan_rows_and_large_k(options):
    """A NaN row still shows as NaN in its top k (how the engine detects a float16 overflow); past blocked_max_k
    the one-node graph answers."""
    blocked, plain = TopK(["CPUExecutionProvider"], options, 8000), TopK(["CPUExecutionProvider"], options)
    x = (np.random.default_rng(0).standard_normal((3, 8000)) - 9).astype(np.float32)
    x[0], x[2, :4000] = np.nan, np.nan
    got, whole = blocked(x, 8), plain(x, 8)
    assert np.isnan(got.log_probs[[0, 2]]).all() and not np.isnan(got.log_probs[1]).any()
    np.testing.assert_array_equal(got.ids, whole.ids)
    k = blocked.blocked_max_k + 1
    np.testing.assert_array_equal(blocked(x[1:2], k).ids, reference(x[1:2], k)[1])
    with pytest.raises(ValueError, match="vocabulary"):
        blocked(x, 8001)


def test_kept_bindings_follow_each_new_input_and_shape(options):
    """TopK and LogSoftmax keep one binding per thread and bind again only an input or output at a new address or
    shape: calls that alternate between arrays, shapes, k and a non-contiguous input each match the reference; a
    top-k result is a kept buffer, rewritten by the next call of its shape."""
    rng = np.random.default_rng(3)
    top_k, log_softmax = TopK(["CPUExecutionProvider"], options, 8000), LogSoftmax(
        ["CPUExecutionProvider"], options, "cpu")
    a, b = (rng.standard_normal((4, 8000)).astype(np.float32) for _ in range(2))
    c = rng.standard_normal((9, 8000)).astype(np.float32)
    for x, k in ((a, 8), (b, 8), (a, 8), (c, 8), (c, 3), (a, 8), (np.asfortranarray(b), 5), (b[::2], 8)):
        got = top_k(x, k)
        want_values, want_ids = reference(np.ascontiguousarray(x), k)
        np.testing.assert_array_equal(got.ids, want_ids)
        np.testing.assert_array_equal(got.log_probs, want_values)
    first = top_k(a, 8)
    second = top_k(b, 8)
    assert first.ids is second.ids  # one buffer, now b's
    np.testing.assert_array_equal(first.ids, reference(b, 8)[1])
    for x in (a, b, a, c):
        expected = x - np.log(np.exp(x.astype(np.float64)).sum(axis=1, keepdims=True))
        assert log_softmax(x) is x  # in place
        np.testing.assert_allclose(x, expected, atol=1e-5)
