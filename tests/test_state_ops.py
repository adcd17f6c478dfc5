"""Device-resident decoder state (engine/state_ops.py): the I/O-binding path gives exactly the numpy path's output."""

import sys

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto

from engine.options import DecodingOptions
from engine.runtime import EngineConfig, cross_slots
from engine.state_ops import NumpyOps, OrtValueOps, lazy_zeros
from engine.translator import Translator

from conftest import SENTENCES, resident_bytes


@pytest.mark.parametrize("elem_type", [TensorProto.FLOAT, TensorProto.FLOAT16])
@pytest.mark.parametrize("start, end", [(0, None), (0, 3), (0, 0), (1, None), (2, 3)])
def test_ortvalue_take_equals_numpy_take(elem_type, start, end):
    dtype = np.float16 if elem_type == TensorProto.FLOAT16 else np.float32
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((5, 2, 4, 3)).astype(dtype) for _ in range(4)]
    rows = np.asarray([3, 3, 0, 4], dtype=np.int64)  # repeats (beams of one parent) and dropped rows
    ops = OrtValueOps(4, elem_type, ["CPUExecutionProvider"], ort.SessionOptions(), "cpu")
    taken = ops.take([ort.OrtValue.ortvalue_from_numpy(x) for x in xs], rows, start, end)
    assert all(isinstance(t, ort.OrtValue) for t in taken)
    for got, x in zip(ops.to_numpy(taken), xs):
        want = x[rows, :, start:end]
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(want, x[rows][:, :, start:end])


@pytest.mark.parametrize("elem_type", [TensorProto.FLOAT, TensorProto.FLOAT16])
@pytest.mark.parametrize("lengths", [(4, 0, 4), (2, 3, 5), (0, 0, 0)])
def test_concat_rows_pads_and_stacks_on_the_device_like_numpy(elem_type, lengths):
    """Sentences joining a running batch on a device: old rows above new ones, both zero-padded on axis 2."""
    dtype = np.float16 if elem_type == TensorProto.FLOAT16 else np.float32
    lx, ly, length = lengths
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((3, 2, lx, 3)).astype(dtype) for _ in range(2)]
    ys = [rng.standard_normal((2, 2, ly, 3)).astype(dtype) for _ in range(2)]
    ops = OrtValueOps(2, elem_type, ["CPUExecutionProvider"], ort.SessionOptions(), "cpu")
    got = ops.to_numpy(ops.concat_rows([ort.OrtValue.ortvalue_from_numpy(x) for x in xs],
                                       [ort.OrtValue.ortvalue_from_numpy(y) for y in ys], length))
    padded = [np.concatenate([np.pad(x, [(0, 0), (0, 0), (0, length - lx), (0, 0)]),
                              np.pad(y, [(0, 0), (0, 0), (0, length - ly), (0, 0)])]) for x, y in zip(xs, ys)]
    for g, want, x, y in zip(got, padded, xs, ys):
        np.testing.assert_array_equal(g, want)
        assert want.shape == (5, 2, length, 3)
        np.testing.assert_array_equal(want[:3, :, :lx], x)
        np.testing.assert_array_equal(want[3:, :, :ly], y)
        assert not want[:3, :, lx:].any() and not want[3:, :, ly:].any()


def test_ortvalue_take_refuses_another_tensor_count():
    ops = OrtValueOps(2, TensorProto.FLOAT, ["CPUExecutionProvider"], ort.SessionOptions(), "cpu")
    with pytest.raises(ValueError, match="expected 2 tensors"):
        ops.take([ort.OrtValue.ortvalue_from_numpy(np.zeros((1, 1, 1, 1), np.float32))], np.zeros(1, np.int64))


@pytest.mark.parametrize("beam_size", [1, 4])
def test_io_binding_translates_exactly_like_the_numpy_path(artifact, beam_size):
    """Same tokens and scores; the batch mixes lengths so rows leave and beams reorder on the "device"."""
    bound = Translator(artifact, EngineConfig(device="cpu", io_binding=True))
    plain = Translator(artifact, EngineConfig(device="cpu", io_binding=False))
    assert isinstance(bound.ops, OrtValueOps) and isinstance(plain.ops, NumpyOps)
    options = DecodingOptions(beam_size=beam_size, n_best=beam_size)
    src = [bound.tokenize(s) for s in SENTENCES]
    for got, want in zip(bound.translate_ids(src, options), plain.translate_ids(src, options)):
        assert [h.tokens for h in got] == [h.tokens for h in want]
        np.testing.assert_allclose([h.score for h in got], [h.score for h in want], atol=1e-5)


@pytest.mark.parametrize("rows_per_sentence", [[1], [3], [1, 4, 2], [2, 2, 2, 2], [16, 1, 1, 5]])
def test_cross_slots_give_every_row_its_own_slot_in_its_sentence_block(rows_per_sentence):
    row_sentence = np.repeat(np.arange(len(rows_per_sentence)), rows_per_sentence)
    slot_rows, row_slot = cross_slots(row_sentence)
    assert slot_rows.shape == (len(rows_per_sentence), max(rows_per_sentence)) and slot_rows.dtype == np.int64
    assert row_slot.shape == (len(row_sentence),) and len(set(row_slot.tolist())) == len(row_sentence)
    # Each row sits in its own sentence's block, in order, and the block reads it back.
    assert np.array_equal(row_slot // slot_rows.shape[1], row_sentence)
    assert np.array_equal(slot_rows.reshape(-1)[row_slot], np.arange(len(row_sentence)))


def _ortvalues(xs):
    return [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x)) for x in xs]


@pytest.mark.parametrize("elem_type", [TensorProto.FLOAT, TensorProto.FLOAT16])
def test_in_place_and_device_ops_agree_on_the_rows_in_use(elem_type):
    """resize, move_rows and write_rows: NumpyOps writes into its buffers, OrtValueOps makes exact-size ones;
    the rows in use (and the positions a move copies) hold the same values."""
    dtype = np.float16 if elem_type == TensorProto.FLOAT16 else np.float32
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal((6, 2, 5, 3)).astype(dtype) for _ in range(2)]
    device = OrtValueOps(2, elem_type, ["CPUExecutionProvider"], ort.SessionOptions(), "cpu")
    # Grow rows and positions keeping 4 used rows; shrink positions.
    for used, rows, capacity in ((4, 9, 8), (4, 4, 3), (6, 6, 5)):
        want = NumpyOps.resize([x.copy() for x in xs], used, rows, capacity)
        got = device.to_numpy(device.resize(_ortvalues(xs), used, rows, capacity))
        for w, g, x in zip(want, got, xs):
            assert w.shape == g.shape == (rows, 2, capacity, 3)
            keep = min(capacity, x.shape[2])
            np.testing.assert_array_equal(w[:used, :, :keep], x[:used, :, :keep])
            assert not w[used:].any() and not w[:, :, keep:].any()
            np.testing.assert_array_equal(g, w)
    # Move: rows 1 and 3 get rows 0 and 5 (5 read before 3 is written), 4 rows in use after; 2 positions copied.
    dst, src = np.asarray([1, 3]), np.asarray([0, 5])
    buffers = [x.copy() for x in xs]
    assert NumpyOps.move_rows(buffers, dst, src, 2, 4) is buffers
    got = device.to_numpy(device.move_rows(_ortvalues(xs), dst, src, 2, 4))
    for b, g, x in zip(buffers, got, xs):
        assert b.shape == xs[0].shape and g.shape == (4, 2, 5, 3)
        np.testing.assert_array_equal(b[[1, 3], :, :2], x[[0, 5], :, :2])
        np.testing.assert_array_equal(b[[1, 3], :, 2:], x[[1, 3], :, 2:])  # positions past the copy: untouched
        np.testing.assert_array_equal(b[[0, 2]], x[[0, 2]])
        np.testing.assert_array_equal(g[:, :, :2], b[:4, :, :2])
    # Write two joiners' rows of 3 positions at row 2: zero-padded to the buffer's 5.
    ys = [rng.standard_normal((2, 2, 3, 3)).astype(dtype) for _ in range(2)]
    buffers = [x.copy() for x in xs]
    NumpyOps.write_rows(buffers, 2, ys)
    got = device.to_numpy(device.write_rows(_ortvalues(xs), 2, _ortvalues(ys)))
    for b, g, x, y in zip(buffers, got, xs, ys):
        np.testing.assert_array_equal(b[2:4, :, :3], y)
        assert not b[2:4, :, 3:].any()
        np.testing.assert_array_equal(b[:2], x[:2])
        np.testing.assert_array_equal(b[4:], x[4:])
        assert g.shape == (4, 2, 5, 3)
        np.testing.assert_array_equal(g, b[:4])


def test_cross_slots_take_a_sentences_rows_wherever_they_are():
    """The engine core leaves rows where they are: sentence 1's rows are 0 and 3, sentence 0's 4 and 1."""
    row_sentence = np.asarray([1, 0, 2, 1, 0])
    slot_rows, row_slot = cross_slots(row_sentence)
    assert slot_rows.tolist() == [[1, 4], [0, 3], [2, 0]]
    assert np.array_equal(row_slot // 2, row_sentence)
    assert np.array_equal(slot_rows.reshape(-1)[row_slot], np.arange(5))


@pytest.mark.parametrize("dst,src", [([1, 3], [0, 5]), ([0, 1], [1, 0]), ([2, 4, 0], [4, 0, 5]), ([3], [3])])
@pytest.mark.parametrize("length", [2, 5, 9])
def test_moved_rows_read_as_before_any_row_is_written(dst, src, length):
    """NumpyOps.move_rows: each dst row gets src's first ``length`` positions as they were before the call, whether
    the rows are disjoint (copied one by one) or some row is both read and written (a swap, a chain, itself)."""
    rng = np.random.default_rng(len(dst) * 10 + length)
    xs = [rng.standard_normal((6, 2, 5, 3)).astype(np.float32) for _ in range(2)]
    moved = NumpyOps.move_rows([x.copy() for x in xs], np.asarray(dst), np.asarray(src), length)
    for got, x in zip(moved, xs):
        want = x.copy()
        want[dst, :, :length] = x[src, :, :length]
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dst,src", [([1, 3], [0, 5]), ([0, 1], [1, 0]), ([2, 4, 0], [4, 0, 5])])
def test_moved_rows_take_each_its_own_length(dst, src):
    """NumpyOps.move_rows with a length per move: each dst row gets its src row's first length[i] positions (as they
    were before the call) and keeps its own past them; lengths past the capacity copy it whole."""
    lengths = [1, 7, 3][:len(dst)]
    rng = np.random.default_rng(len(dst))
    xs = [rng.standard_normal((6, 2, 5, 3)).astype(np.float32) for _ in range(2)]
    moved = NumpyOps.move_rows([x.copy() for x in xs], np.asarray(dst), np.asarray(src), lengths)
    disjoint = set(dst).isdisjoint(src)
    for got, x in zip(moved, xs):
        want = x.copy()
        for a, b, n in zip(dst, src, lengths):
            n = n if disjoint else max(lengths)  # rows both read and written: one gather of the longest
            want[a, :, :n] = x[b, :, :n]
        np.testing.assert_array_equal(got, want)
    # One count given as a numpy integer is one count for every move.
    x = rng.standard_normal((6, 2, 5, 3)).astype(np.float32)
    want = NumpyOps.move_rows([x.copy()], np.asarray(dst), np.asarray(src), 2)[0]
    got = NumpyOps.move_rows([x.copy()], np.asarray(dst), np.asarray(src), np.int64(2))[0]
    np.testing.assert_array_equal(got, want)


def test_a_resize_with_unread_tails_copies_only_the_cached_positions(monkeypatch):
    """NumpyOps.resize(unread_tail=True, cached=n): the used rows' first n positions, nothing past them (left as
    the allocator gave them: NaN here); zeroed and whole without unread_tail."""
    import engine.state_ops

    monkeypatch.setattr(engine.state_ops, "_uninitialized", lambda shape, dtype: np.full(shape, np.nan, dtype))
    x = np.arange(5 * 2 * 8 * 3, dtype=np.float32).reshape(5, 2, 8, 3) + 1
    grown = NumpyOps.resize([x], used=4, rows=6, capacity=16, unread_tail=True, cached=5)[0]
    assert grown.shape == (6, 2, 16, 3)
    np.testing.assert_array_equal(grown[:4, :, :5], x[:4, :, :5])
    assert np.isnan(grown[:4, :, 5:]).all() and np.isnan(grown[4:]).all()
    whole = NumpyOps.resize([x], used=4, rows=6, capacity=16, cached=5)[0]  # cached counts only with unread_tail
    np.testing.assert_array_equal(whole[:4, :, :8], x[:4, :, :8])
    assert not whole[:4, :, 8:].any() and not whole[4:].any()
    shrunk = NumpyOps.resize([x], used=3, rows=3, capacity=8, unread_tail=True, cached=8)[0]
    np.testing.assert_array_equal(shrunk, x[:3])


def test_a_resize_with_unread_rows_zeroes_only_what_the_used_rows_gained(monkeypatch):
    """NumpyOps.resize(unread_rows=True) (the cross K/V): the used rows whole, zero at their new positions (a step
    reads those, masked: a NaN there would survive the softmax's 0 weight), the spare rows as the allocator gave
    them (NaN here), which write_rows fills whole before a step reads them."""
    import engine.state_ops

    monkeypatch.setattr(engine.state_ops, "_uninitialized", lambda shape, dtype: np.full(shape, np.nan, dtype))
    x = np.arange(5 * 2 * 8 * 3, dtype=np.float32).reshape(5, 2, 8, 3) + 1
    grown = NumpyOps.resize([x], used=4, rows=6, capacity=12, unread_rows=True)[0]
    assert grown.shape == (6, 2, 12, 3)
    np.testing.assert_array_equal(grown[:4, :, :8], x[:4])
    assert not grown[:4, :, 8:].any() and np.isnan(grown[4:]).all()
    joined = NumpyOps.write_rows([grown], 4, [np.ones((2, 2, 7, 3), np.float32)])[0]
    assert not np.isnan(joined).any() and not joined[4:, :, 7:].any()
    narrowed = NumpyOps.resize([x], used=3, rows=4, capacity=6, unread_rows=True)[0]
    np.testing.assert_array_equal(narrowed[:3], x[:3, :, :6])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm (Linux)")
def test_lazy_buffers_are_zero_and_take_memory_only_where_written():
    """state_ops.lazy_zeros: a zeroed, writable, C-contiguous array of the shape and dtype asked for; a large one
    gets its memory page by page as it is written, in base pages: 16 writes 4 MB apart into 64 MB make at most 1 MB
    resident (transparent huge pages, which numpy asks for from 4 MB up, would make 32 MB resident)."""
    small = lazy_zeros((4, 2, 8, 3), np.float16)
    assert small.shape == (4, 2, 8, 3) and small.dtype == np.float16 and not small.any()
    large = lazy_zeros((16, 4, 256, 1024), np.float32)  # 64 MB
    assert large.flags.c_contiguous and large.flags.writeable and large.dtype == np.float32
    before = resident_bytes()
    large[:, 0, 0, 0] = 1.0  # one value every 4 MB
    grew = resident_bytes() - before
    assert grew < 2**20, f"{grew} bytes resident for 16 values"
    assert large.sum() == 16.0  # the rest reads as zero (this touches every page, read-only)
