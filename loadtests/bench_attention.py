"""The attention layouts of artifact formats 4 and 5 against those before them, measured alone on ONNX Runtime's
CPU kernels (engine/contract.py: both are now what the decoder step runs).

    .venv/bin/python -m loadtests.bench_attention --threads 1      # about 20 s

Two levers of issue 12, each timed against the layout before it (one layer, d_model 256, 4 heads):
1. Self-attention: format 4's Concat of the cache (a copy of the whole cache every step) then masked
   MatMul/Softmax/MatMul, against com.microsoft.GroupQueryAttention writing the new key/value in place into a
   preallocated cache (past and present bound to one buffer through I/O binding, per-row ``seqlens_k``).
2. Cross-attention: K/V repeated per beam row (format 3) against K/V once per sentence with the beams folded into the
   query (CTranslate2's layout): MatMul [rows, heads, 1, d_head] x [rows, heads, d_head, src_len] against
   [sentences, heads, beam, d_head] x [sentences, heads, d_head, src_len].
Each pair is also checked to compute the same values (max abs difference printed). Prints ms per call, best of 5
runs of 50 calls.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

N_HEADS, D_HEAD = 4, 64
F = TensorProto.FLOAT


def _model(nodes, inputs, outputs, initializers=()) -> bytes:
    graph = helper.make_graph(nodes, "bench", inputs, outputs, list(initializers))
    return helper.make_model(graph, ir_version=10, opset_imports=[
        helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]).SerializeToString()


def _info(name, elem_type, shape):
    return helper.make_tensor_value_info(name, elem_type, shape)


def gqa_graph() -> bytes:
    """query/key/value [rows, 1, heads x d_head]; past_key/past_value [rows, heads, capacity, d_head] shared with
    present_*; seqlens_k int32 [rows] (each row's past length); total_sequence_length int32 scalar."""
    node = helper.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "seqlens_k", "total"],
                            ["out", "present_k", "present_v"], domain="com.microsoft", num_heads=N_HEADS,
                            kv_num_heads=N_HEADS)
    hidden = N_HEADS * D_HEAD
    cache = ["rows", N_HEADS, "capacity", D_HEAD]
    return _model([node], [_info("q", F, ["rows", 1, hidden]), _info("k", F, ["rows", 1, hidden]),
                           _info("v", F, ["rows", 1, hidden]), _info("pk", F, cache), _info("pv", F, cache),
                           _info("seqlens_k", TensorProto.INT32, ["rows"]), _info("total", TensorProto.INT32, [])],
                  [_info("out", F, ["rows", 1, hidden]), _info("present_k", F, cache),
                   _info("present_v", F, cache)])


def concat_graph() -> bytes:
    """Today's step: new K/V [rows, heads, 1, d_head] appended to the past [rows, heads, past, d_head], then
    softmax(q k^T / sqrt(d_head) + bias) v with an additive bias [rows, 1, 1, past + 1]."""
    nodes = [helper.make_node("Concat", ["pk", "k"], ["new_k"], axis=2),
             helper.make_node("Concat", ["pv", "v"], ["new_v"], axis=2),
             helper.make_node("Transpose", ["new_k"], ["kt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q", "kt"], ["s"]), helper.make_node("Mul", ["s", "scale"], ["s2"]),
             helper.make_node("Add", ["s2", "bias"], ["s3"]), helper.make_node("Softmax", ["s3"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "new_v"], ["out"])]
    step = ["rows", N_HEADS, 1, D_HEAD]
    past = ["rows", N_HEADS, "past", D_HEAD]
    return _model(nodes, [_info("q", F, step), _info("k", F, step), _info("v", F, step), _info("pk", F, past),
                          _info("pv", F, past), _info("bias", F, ["rows", 1, 1, "total"])],
                  [_info("out", F, step), _info("new_k", F, ["rows", N_HEADS, "total", D_HEAD]),
                   _info("new_v", F, ["rows", N_HEADS, "total", D_HEAD])],
                  [helper.make_tensor("scale", F, [], [D_HEAD ** -0.5])])


def cross_graph() -> bytes:
    """softmax(q k^T / sqrt(d_head) + bias) v; q [b, heads, m, d_head], k/v [b, heads, src_len, d_head], bias
    [b, 1, 1, src_len]: m = 1 with K/V per row, m = beam with K/V per sentence."""
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q", "kt"], ["s"]), helper.make_node("Mul", ["s", "scale"], ["s2"]),
             helper.make_node("Add", ["s2", "bias"], ["s3"]), helper.make_node("Softmax", ["s3"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["out"])]
    kv = ["b", N_HEADS, "src", D_HEAD]
    return _model(nodes, [_info("q", F, ["b", N_HEADS, "m", D_HEAD]), _info("k", F, kv), _info("v", F, kv),
                          _info("bias", F, ["b", 1, 1, "src"])], [_info("out", F, ["b", N_HEADS, "m", D_HEAD])],
                  [helper.make_tensor("scale", F, [], [D_HEAD ** -0.5])])


def best_ms(fn, calls: int = 50, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - started) / calls)
    return best * 1e3


def bench_self(options, rows: int, past: int, capacity: int = 256) -> dict:
    rng = np.random.default_rng(0)
    gqa = ort.InferenceSession(gqa_graph(), options, providers=["CPUExecutionProvider"])
    concat = ort.InferenceSession(concat_graph(), options, providers=["CPUExecutionProvider"])
    hidden = N_HEADS * D_HEAD
    q, k, v = (rng.standard_normal((rows, 1, hidden), dtype=np.float32) for _ in range(3))
    pk, pv = (rng.standard_normal((rows, N_HEADS, past, D_HEAD), dtype=np.float32) for _ in range(2))
    heads = lambda x: np.ascontiguousarray(x.reshape(rows, 1, N_HEADS, D_HEAD).transpose(0, 2, 1, 3))  # noqa: E731
    feeds = dict(q=heads(q), k=heads(k), v=heads(v), pk=pk, pv=pv, bias=np.zeros((rows, 1, 1, past + 1), np.float32))
    reference = concat.run(None, feeds)[0].transpose(0, 2, 1, 3).reshape(rows, 1, hidden)
    buffers = []
    for x in (pk, pv):
        buffer = np.zeros((rows, N_HEADS, capacity, D_HEAD), np.float32)
        buffer[:, :, :past] = x
        buffers.append(ort.OrtValue.ortvalue_from_numpy(buffer))
    binding = gqa.io_binding()
    for name, x in (("q", q), ("k", k), ("v", v), ("seqlens_k", np.full(rows, past, np.int32)),
                    ("total", np.asarray(past + 1, np.int32))):
        binding.bind_cpu_input(name, x)
    binding.bind_ortvalue_input("pk", buffers[0])
    binding.bind_ortvalue_input("pv", buffers[1])
    binding.bind_output("out", "cpu")
    binding.bind_ortvalue_output("present_k", buffers[0])  # the same buffer: written in place
    binding.bind_ortvalue_output("present_v", buffers[1])
    gqa.run_with_iobinding(binding)
    out = binding.get_outputs()[0].numpy()
    in_place = bool(np.array_equal(buffers[0].numpy()[:, :, past], feeds["k"][:, :, 0]))
    return dict(rows=rows, past=past, max_abs_diff=float(np.abs(out - reference).max()), written_in_place=in_place,
                concat_ms=best_ms(lambda: concat.run(None, feeds)),
                gqa_in_place_ms=best_ms(lambda: gqa.run_with_iobinding(binding)))


def bench_cross(options, sentences: int, beam: int, src_len: int) -> dict:
    rng = np.random.default_rng(1)
    session = ort.InferenceSession(cross_graph(), options, providers=["CPUExecutionProvider"])
    q = rng.standard_normal((sentences, N_HEADS, beam, D_HEAD), dtype=np.float32)
    k, v = (rng.standard_normal((sentences, N_HEADS, src_len, D_HEAD), dtype=np.float32) for _ in range(2))
    folded = dict(q=q, k=k, v=v, bias=np.zeros((sentences, 1, 1, src_len), np.float32))
    per_row = dict(q=np.ascontiguousarray(q.transpose(0, 2, 1, 3).reshape(sentences * beam, N_HEADS, 1, D_HEAD)),
                   k=np.repeat(k, beam, axis=0), v=np.repeat(v, beam, axis=0),
                   bias=np.zeros((sentences * beam, 1, 1, src_len), np.float32))
    a = session.run(None, per_row)[0].reshape(sentences, beam, N_HEADS, D_HEAD).transpose(0, 2, 1, 3)
    b = session.run(None, folded)[0]
    return dict(sentences=sentences, beam=beam, src_len=src_len, max_abs_diff=float(np.abs(a - b).max()),
                per_row_ms=best_ms(lambda: session.run(None, per_row)),
                per_sentence_ms=best_ms(lambda: session.run(None, folded)))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.log_severity_level = 3
    print("self-attention, one layer: Concat + MatMul (today) vs GroupQueryAttention in place")
    for rows, past in ((4, 15), (40, 15), (160, 15), (160, 60)):
        r = bench_self(options, rows, past)
        print(f"  rows {rows:>4} past {past:>3}: concat {r['concat_ms']:.3f} ms, GQA in place "
              f"{r['gqa_in_place_ms']:.3f} ms ({r['concat_ms'] / r['gqa_in_place_ms']:.2f}x), max diff "
              f"{r['max_abs_diff']:.1e}, written in place {r['written_in_place']}", flush=True)
    print("cross-attention, one layer: K/V per beam row (today) vs per sentence, beams folded into the query")
    for sentences, beam, src_len in ((1, 4, 25), (10, 4, 25), (40, 4, 25), (40, 4, 60)):
        r = bench_cross(options, sentences, beam, src_len)
        print(f"  {sentences:>3} sentences x beam {beam}, src {src_len:>3}: per row {r['per_row_ms']:.3f} ms, per "
              f"sentence {r['per_sentence_ms']:.3f} ms ({r['per_row_ms'] / r['per_sentence_ms']:.2f}x), max diff "
              f"{r['max_abs_diff']:.1e}", flush=True)


if __name__ == "__main__":
    main()
