/* Two loops of the engine's host work per decoder step, in C: the beam search's selection (engine/search.py,
 * _select) and the copies of cache rows when beams reorder (engine/state_ops.py, NumpyOps.move_rows). Each has a
 * numpy path that computes the same, which the engine takes where setup.py could not build this module, and the
 * tests hold the two to the same results bit for bit.
 *
 * Why C: at beam 4 a step's selection is a few dozen numbers per sentence and a moved row a few kB per tensor, so
 * numpy's cost per call (about 25 calls a step for the selection, one per tensor and moved row for the copies)
 * outweighs the work; CTranslate2 runs these loops in C++. Plain C over the buffer protocol: no numpy headers, no
 * compiler flags that change float arithmetic (a candidate's score is one float32 addition, as in numpy). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* a ranks before b: higher score first, NaN after everything (numpy sorts NaN last), ties by lower flat index. */
static inline int ranks_before(float ca, int64_t fa, float cb, int64_t fb) {
    int na = isnan(ca), nb = isnan(cb);
    if (na || nb)
        return na && nb ? fa < fb : nb;
    if (ca != cb)
        return ca > cb;
    return fa < fb;
}

/* The caller (engine/search.py) passes C-contiguous arrays of the documented dtypes; this checks their sizes. */
static int check(Py_buffer *b, Py_ssize_t items, Py_ssize_t itemsize, const char *name) {
    if (b->len != items * itemsize) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes, not %zd items of %zd", name, b->len, items, itemsize);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(select_doc,
"select(values, ids, rows, width, starts, live_scores, early, eos, n, vocab, beam_size, cand, flats, parents, "
"tokens, scores, common)\n\n"
"For m sentences of n live beams each, sentence j's rows starts[j] .. starts[j] + n - 1 of the step's top-k:\n"
"values float32 [rows, width] and ids int64 [rows, width]; live_scores float32 [m, n]; early uint8 [m] (eos banned:\n"
"before min_length); eos int64 [m]. Writes, C-contiguous: cand float32 and flats int64 [m, k] (k = cand's width, at\n"
"most n x width), the k best candidates live score + value, best first, NaN last, ties by lower flat index (beam x\n"
"vocab + token); parents, tokens int64 and scores float32 [m, beam_size], the first beam_size candidates that are\n"
"neither eos nor -inf in rank order, then the others in rank order; common uint8 [m], whether the step is a plain\n"
"beam step (beam_size such continuations and no eos among the first beam_size candidates that is not -inf).\n"
"Raises ValueError when a buffer is too small or of the wrong item size.");

static PyObject *select_candidates(PyObject *self, PyObject *args) {
    Py_buffer values, ids, starts, live, early, eos, cand, flats, parents, tokens, scores, common;
    Py_ssize_t rows, width, n, vocab, beam_size;
    if (!PyArg_ParseTuple(args, "y*y*nny*y*y*y*nnnw*w*w*w*w*w*", &values, &ids, &rows, &width, &starts, &live, &early,
                          &eos, &n, &vocab, &beam_size, &cand, &flats, &parents, &tokens, &scores, &common))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t m = starts.len / (Py_ssize_t)sizeof(int64_t);
    Py_ssize_t k = m ? cand.len / (Py_ssize_t)sizeof(float) / m : 1;
    if (n < 1 || beam_size < 1 || vocab < 1 || k < 1 || k > n * width || beam_size > k) {
        PyErr_SetString(PyExc_ValueError, "needs 1 <= beam_size <= k <= n x width");
        goto done;
    }
    if (check(&values, rows * width, 4, "values") || check(&ids, rows * width, 8, "ids")
        || check(&starts, m, 8, "starts") || check(&live, m * n, 4, "live_scores") || check(&early, m, 1, "early")
        || check(&eos, m, 8, "eos") || check(&cand, m * k, 4, "cand") || check(&flats, m * k, 8, "flats")
        || check(&parents, m * beam_size, 8, "parents") || check(&tokens, m * beam_size, 8, "tokens")
        || check(&scores, m * beam_size, 4, "scores") || check(&common, m, 1, "common"))
        goto done;
    const float *v = values.buf, *ls = live.buf;
    const int64_t *id = ids.buf, *st = starts.buf, *eo = eos.buf;
    const uint8_t *ea = early.buf;
    float *cd = cand.buf, *sc = scores.buf;
    int64_t *fl = flats.buf, *pa = parents.buf, *to = tokens.buf;
    uint8_t *co = common.buf;
    for (Py_ssize_t j = 0; j < m; j++) {
        if (st[j] < 0 || st[j] + n > rows) {
            PyErr_Format(PyExc_ValueError, "sentence %zd: rows %lld + %zd past %zd", j, (long long)st[j], n, rows);
            goto done;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t j = 0; j < m; j++) {
        float *c = cd + j * k;
        int64_t *f = fl + j * k;
        Py_ssize_t have = 0;
        /* Insertion into the sorted first k: n x width is a few dozen at beam 4. */
        for (Py_ssize_t b = 0; b < n; b++) {
            const float *row = v + (st[j] + b) * width;
            const int64_t *row_ids = id + (st[j] + b) * width;
            for (Py_ssize_t w = 0; w < width; w++) {
                float value = ea[j] && row_ids[w] == eo[j] ? -INFINITY : row[w];
                float s = ls[j * n + b] + value;
                int64_t flat = b * vocab + row_ids[w];
                if (have == k && !ranks_before(s, flat, c[k - 1], f[k - 1]))
                    continue;
                Py_ssize_t i = have < k ? have++ : k - 1;
                while (i > 0 && ranks_before(s, flat, c[i - 1], f[i - 1])) {
                    c[i] = c[i - 1];
                    f[i] = f[i - 1];
                    i--;
                }
                c[i] = s;
                f[i] = flat;
            }
        }
        /* The continuations: candidates neither eos nor -inf, in rank order, then the others in rank order (numpy's
         * stable argsort of ~beams). A plain step: beam_size continuations, no eos (not -inf) in the first
         * beam_size ranks, where it would finish a hypothesis. */
        int eos_early = 0;
        for (Py_ssize_t r = 0; r < beam_size; r++)
            eos_early |= c[r] != -INFINITY && f[r] % vocab == eo[j];
        Py_ssize_t filled = 0, continuing = 0;
        for (int pass = 0; pass < 2 && filled < beam_size; pass++) {
            for (Py_ssize_t r = 0; r < k && filled < beam_size; r++) {
                int64_t token = f[r] % vocab;
                if ((c[r] != -INFINITY && token != eo[j]) != (pass == 0))
                    continue;
                pa[j * beam_size + filled] = f[r] / vocab;
                to[j * beam_size + filled] = token;
                sc[j * beam_size + filled] = c[r];
                filled++;
                continuing += pass == 0;
            }
        }
        co[j] = continuing >= beam_size && !eos_early;
    }
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&values);
    PyBuffer_Release(&ids);
    PyBuffer_Release(&starts);
    PyBuffer_Release(&live);
    PyBuffer_Release(&early);
    PyBuffer_Release(&eos);
    PyBuffer_Release(&cand);
    PyBuffer_Release(&flats);
    PyBuffer_Release(&parents);
    PyBuffer_Release(&tokens);
    PyBuffer_Release(&scores);
    PyBuffer_Release(&common);
    return result;
}

PyDoc_STRVAR(move_rows_doc,
"move_rows(tensors, dst, src, lengths, starts, n_heads, capacity, row_bytes)\n\n"
"In each writable C-contiguous buffer of the sequence tensors ([rows, n_heads, capacity, d_head], row_bytes the\n"
"bytes of one position's d_head values), row dst[i] gets positions starts[i] .. min(lengths[i], capacity) - 1 of row\n"
"src[i], for each move i in order (dst, src, lengths, starts: int64 [moves]). A row both read and written by\n"
"different moves reads what earlier moves wrote: the caller passes moves whose rows are disjoint.\n"
"Raises ValueError when a row is out of range or a buffer's size is not rows x n_heads x capacity x row_bytes.");

static PyObject *move_rows(PyObject *self, PyObject *args) {
    PyObject *tensors;
    Py_buffer dst, src, lengths, starts;
    Py_ssize_t n_heads, capacity, row_bytes;
    if (!PyArg_ParseTuple(args, "Oy*y*y*y*nnn", &tensors, &dst, &src, &lengths, &starts, &n_heads, &capacity,
                          &row_bytes))
        return NULL;
    PyObject *result = NULL, *seq = NULL;
    Py_ssize_t moves = dst.len / (Py_ssize_t)sizeof(int64_t);
    if (check(&src, moves, 8, "src") || check(&lengths, moves, 8, "lengths") || check(&starts, moves, 8, "starts"))
        goto done;
    if (n_heads < 1 || capacity < 1 || row_bytes < 1) {
        PyErr_SetString(PyExc_ValueError, "n_heads, capacity and row_bytes must be positive");
        goto done;
    }
    seq = PySequence_Fast(tensors, "tensors: a sequence of buffers");
    if (seq == NULL)
        goto done;
    const int64_t *to = dst.buf, *of = src.buf, *len = lengths.buf, *first = starts.buf;
    Py_ssize_t block = capacity * row_bytes; /* one (row, head) */
    for (Py_ssize_t t = 0; t < PySequence_Fast_GET_SIZE(seq); t++) {
        Py_buffer x;
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, t), &x, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
            goto done;
        Py_ssize_t rows = x.len / (n_heads * block);
        if (x.len != rows * n_heads * block) {
            PyErr_Format(PyExc_ValueError, "tensor %zd: %zd bytes, not rows x %zd x %zd", t, x.len, n_heads, block);
            PyBuffer_Release(&x);
            goto done;
        }
        for (Py_ssize_t i = 0; i < moves; i++) {
            if (to[i] < 0 || to[i] >= rows || of[i] < 0 || of[i] >= rows || first[i] < 0) {
                PyErr_Format(PyExc_ValueError, "move %zd: row %lld <- %lld of %zd", i, (long long)to[i],
                             (long long)of[i], rows);
                PyBuffer_Release(&x);
                goto done;
            }
        }
        char *base = x.buf;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < moves; i++) {
            int64_t end = len[i] < capacity ? len[i] : capacity;
            if (end <= first[i] || to[i] == of[i])
                continue;
            Py_ssize_t offset = first[i] * row_bytes, bytes = (end - first[i]) * row_bytes;
            for (Py_ssize_t h = 0; h < n_heads; h++)
                memmove(base + (to[i] * n_heads + h) * block + offset, base + (of[i] * n_heads + h) * block + offset,
                        bytes);
        }
        Py_END_ALLOW_THREADS
        PyBuffer_Release(&x);
    }
    result = Py_None;
    Py_INCREF(result);
done:
    Py_XDECREF(seq);
    PyBuffer_Release(&dst);
    PyBuffer_Release(&src);
    PyBuffer_Release(&lengths);
    PyBuffer_Release(&starts);
    return result;
}

static PyMethodDef methods[] = {
    {"select", select_candidates, METH_VARARGS, select_doc},
    {"move_rows", move_rows, METH_VARARGS, move_rows_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "engine._kernels",
                                    "The engine's per-step host loops in C (engine/search.py, engine/state_ops.py).",
                                    -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
