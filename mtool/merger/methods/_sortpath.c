/* The part of libstdc++'s std::sort that decides which elements land before a given position.
 *
 * torch's CPU sort (torch.sort / torch.argsort with stable=False) runs libstdc++'s std::sort over (value, index)
 * pairs, comparing values only, so equal values end up in an order that only the algorithm itself decides.
 * mergekit keeps ``argsort(|delta|, descending)[:k]`` (TIES) and a window of the ascending order (Model
 * Breadcrumbs); to keep exactly the same entries, this module replays std::sort (GCC's introsort: median-of-three
 * pivot moved to the front, Hoare partition, recursion on the right part and a loop on the left, a heap sort
 * when the depth budget 2*floor(log2 n) is spent, a final insertion sort of runs of at most 16) on the ranges
 * that contain a requested boundary, and nothing else: afterwards, for every boundary b, positions [0, b) hold
 * exactly the elements std::sort would put there (in some order). That is about 2.3 n element visits instead of
 * n log n. The partition finds its stoppers a block at a time without branches (Edelkamp and Weiss's
 * BlockQuicksort) and pairs them as Hoare's loop does, so the result is the same as the scalar loop's.
 *
 * follow(values, index, boundaries, descending, number=False): values is a writable float32 buffer (or uint16:
 * the bits of non-negative bfloat16/float16 values), index a
 * writable uint32 buffer of the same length (permuted alongside; with number=True it is first set to 0, 1, ...),
 * boundaries a sorted sequence of ints. Runs without the GIL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 128
#define RUN 16

#define KEY float
#define NAME(x) x##_f32
#include "_sortpath_body.h"
#undef KEY
#undef NAME
#define KEY uint16_t
#define NAME(x) x##_u16
#include "_sortpath_body.h"
#undef KEY
#undef NAME

static PyObject *follow(PyObject *self, PyObject *args) {
    PyObject *values_obj, *index_obj, *bounds_obj;
    int descending, number = 0;
    if (!PyArg_ParseTuple(args, "OOOp|p", &values_obj, &index_obj, &bounds_obj, &descending, &number)) return NULL;
    Py_buffer values, index;
    if (PyObject_GetBuffer(values_obj, &values, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return NULL;
    if (PyObject_GetBuffer(index_obj, &index, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        PyBuffer_Release(&values);
        return NULL;
    }
    PyObject *result = NULL;
    int64_t *bounds = NULL;
    char kind = values.format ? values.format[strlen(values.format) - 1] : 'B';
    Py_ssize_t n = values.itemsize ? values.len / values.itemsize : 0;
    int wide = values.itemsize == 4 && kind == 'f', narrow = values.itemsize == 2 && kind == 'H';
    if (!(wide || narrow) || index.itemsize != 4 || index.len / 4 != n) {
        PyErr_SetString(PyExc_TypeError, "follow() needs float32 or uint16 values and a uint32 index of the "
                                         "same length");
        goto done;
    }
    PyObject *seq = PySequence_Fast(bounds_obj, "boundaries must be a sequence of ints");
    if (!seq) goto done;
    Py_ssize_t nb = PySequence_Fast_GET_SIZE(seq);
    bounds = PyMem_Malloc(sizeof(int64_t) * (nb ? nb : 1));
    for (Py_ssize_t i = 0; bounds && i < nb; i++) {
        bounds[i] = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(seq, i));
        if (i && bounds[i] < bounds[i - 1]) { PyErr_SetString(PyExc_ValueError, "boundaries must be sorted"); }
    }
    Py_DECREF(seq);
    if (!bounds) { PyErr_NoMemory(); goto done; }
    if (PyErr_Occurred()) goto done;
    Py_BEGIN_ALLOW_THREADS
    uint32_t *ix = (uint32_t *)index.buf;
    if (number) for (Py_ssize_t i = 0; i < n; i++) ix[i] = (uint32_t)i;
    int64_t log2n = 0;
    while (((int64_t)1 << (log2n + 1)) <= (int64_t)n) log2n++;
    if (n > 0 && wide) {
        Sorter_f32 s = {(float *)values.buf, ix, descending, bounds, nb};
        introsort_f32(&s, 0, n, 2 * log2n);
    } else if (n > 0) {
        Sorter_u16 s = {(uint16_t *)values.buf, ix, descending, bounds, nb};
        introsort_u16(&s, 0, n, 2 * log2n);
    }
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    PyMem_Free(bounds);
    PyBuffer_Release(&values);
    PyBuffer_Release(&index);
    return result;
}

static PyMethodDef methods[] = {
    {"follow", follow, METH_VARARGS,
     "follow(values, index, boundaries, descending, number=False): replay std::sort on the ranges holding a "
     "boundary."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_sortpath", NULL, -1, methods};

PyMODINIT_FUNC PyInit__sortpath(void) { return PyModule_Create(&module); }
