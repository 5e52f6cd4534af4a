/* One left-to-right pass over a POP3 multi-line body in the receive buffer.
 *
 * The optional accelerator of popsync/pop3/reader.py: scan() does what
 * reader._scan_python does (that is the reference; the tests compare the two
 * on random input), in one pass instead of four regex passes:
 *
 *   - find the terminating line, "." CRLF or "." LF at a line start
 *     (RFC 1939 section 3);
 *   - turn each CRLF into LF (bare CR, bare LF and NUL pass through);
 *   - remove the stuffing dot at each line start, counting them;
 *   - stop after the last complete line, or stream an unfinished line once it
 *     is longer than partial_flush (holding a trailing CR back, since its LF
 *     may come in the next receive).
 *
 * The input is whatever a server sent: every index below stays inside
 * [0, len), and every write inside the output buffer, which is as long as the
 * input.  The output is never longer than the input: each input byte is
 * copied at most once, and the only byte ever emitted that is not a copy (the
 * LF that ends a CRLF line) replaces the two input bytes CR LF.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <assert.h>
#include <string.h>

typedef struct {
    const char *in;
    Py_ssize_t len;
    char *out;
    Py_ssize_t out_len;
    Py_ssize_t dots;
} Pass;

/* Copy in[start:end) to the output, dropping a stuffing dot if the range
 * starts a line.  end <= len, so the copy stays inside both buffers. */
static void
copy_line(Pass *p, Py_ssize_t start, Py_ssize_t end, int line_start)
{
    if (line_start && start < end && p->in[start] == '.') {
        start++;
        p->dots++;
    }
    if (start < end) {
        memcpy(p->out + p->out_len, p->in + start, (size_t)(end - start));
        p->out_len += end - start;
    }
}

/* What one pass found besides the output: see scan_doc. */
typedef struct {
    Py_ssize_t cut;      /* input octets that went to the output */
    Py_ssize_t consumed; /* cut, plus the terminating line if done */
    int done;
    int next_line_start;
} Outcome;

/* The pass itself: plain C on plain memory (no Python object is touched, so
 * it may run without the GIL). */
static Outcome
body_pass(Pass *p, int at_line_start, int crlf_to_lf, Py_ssize_t partial_flush)
{
    Outcome o = {0, 0, 0, 1};
    Py_ssize_t pos = 0; /* start of the current line */
    int line_start = at_line_start;

    for (;;) {
        const char *lf = memchr(p->in + pos, '\n', (size_t)(p->len - pos));
        if (lf == NULL) {
            break;
        }
        Py_ssize_t end = lf - p->in; /* the LF, pos <= end < len */
        if (line_start && p->in[pos] == '.' &&
            (end == pos + 1 || (end == pos + 2 && p->in[pos + 1] == '\r'))) {
            o.done = 1; /* the terminating line: consume it, output nothing of it */
            o.cut = pos;
            o.consumed = end + 1;
            return o;
        }
        Py_ssize_t text_end = end;
        if (crlf_to_lf && end > pos && p->in[end - 1] == '\r') {
            text_end = end - 1; /* CR LF -> LF */
        }
        copy_line(p, pos, text_end, line_start);
        p->out[p->out_len++] = '\n';
        pos = end + 1;
        line_start = 1;
    }
    /* pos: the start of an unfinished line (or len).  Keep it for the next
     * receive, unless it is too long to wait for. */
    o.cut = pos;
    o.next_line_start = pos > 0 || at_line_start;
    if (p->len - pos > partial_flush) { /* so len >= 1: in[len - 1] exists */
        o.cut = p->in[p->len - 1] == '\r' ? p->len - 1 : p->len;
        copy_line(p, pos, o.cut, line_start);
        o.next_line_start = 0;
    }
    o.consumed = o.cut;
    return o;
}

/* Inputs at least this long are scanned without the GIL (other threads, such
 * as other accounts' polls, run meanwhile); shorter ones are not worth it. */
#define GIL_FREE_MIN 16384

PyDoc_STRVAR(scan_doc,
"scan(buf, at_line_start, crlf_to_lf, partial_flush)\n"
"--\n\n"
"Return (data, octets, consumed, done, next_line_start) for the body\n"
"in buf; see popsync.pop3.reader._scan_python, the reference.");

static PyObject *
scan(PyObject *module, PyObject *args)
{
    (void)module;
    Py_buffer view;
    int at_line_start, crlf_to_lf;
    Py_ssize_t partial_flush;
    if (!PyArg_ParseTuple(args, "y*ppn:scan", &view, &at_line_start, &crlf_to_lf,
                          &partial_flush)) {
        return NULL;
    }
    if (partial_flush < 0) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "partial_flush must not be negative");
        return NULL;
    }
    PyObject *data = PyBytes_FromStringAndSize(NULL, view.len);
    if (data == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    /* While the GIL is released, the buffer stays exported (it cannot be
     * resized) and data is not yet visible to any other thread. */
    Pass p = {view.buf, view.len, PyBytes_AS_STRING(data), 0, 0};
    Outcome o;
    if (view.len >= GIL_FREE_MIN) {
        Py_BEGIN_ALLOW_THREADS
        o = body_pass(&p, at_line_start, crlf_to_lf, partial_flush);
        Py_END_ALLOW_THREADS
    }
    else {
        o = body_pass(&p, at_line_start, crlf_to_lf, partial_flush);
    }
    PyBuffer_Release(&view);
    assert(p.out_len <= o.cut && o.cut <= o.consumed);
    if (p.out_len > o.cut) { /* cannot happen: see the top of this file */
        Py_DECREF(data);
        PyErr_SetString(PyExc_SystemError, "_bodypass: output longer than input");
        return NULL;
    }
    if (_PyBytes_Resize(&data, p.out_len) < 0) {
        return NULL;
    }
    return Py_BuildValue("(NnnOO)", data, o.cut - p.dots, o.consumed,
                         o.done ? Py_True : Py_False,
                         o.next_line_start ? Py_True : Py_False);
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS, scan_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "_bodypass",
    "One-pass POP3 body reader (optional accelerator of popsync.pop3.reader).",
    0,
    methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC
PyInit__bodypass(void)
{
    return PyModule_Create(&module);
}
