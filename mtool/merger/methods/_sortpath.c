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
 * follow(values, index, boundaries, descending): values is a writable float32 buffer, index a writable uint32
 * buffer of the same length (permuted alongside), boundaries a sequence of ints. Runs without the GIL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 128
#define RUN 16

typedef struct {
    float *v;
    uint32_t *ix;
    int descending;
    const int64_t *bounds;
    int64_t nbounds;
} Sorter;

static inline int before(const Sorter *s, float a, float b) { return s->descending ? a > b : a < b; }

static inline void swap_items(Sorter *s, int64_t i, int64_t j) {
    float t = s->v[i]; s->v[i] = s->v[j]; s->v[j] = t;
    uint32_t u = s->ix[i]; s->ix[i] = s->ix[j]; s->ix[j] = u;
}

/* Whether some boundary b satisfies first < b < last. */
static int holds_boundary(const Sorter *s, int64_t first, int64_t last) {
    int64_t lo = 0, hi = s->nbounds;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if (s->bounds[mid] <= first) lo = mid + 1; else hi = mid;
    }
    return lo < s->nbounds && s->bounds[lo] < last;
}

/* std::__unguarded_partition_pivot: the median of first+1, middle and last-1 moves to first and is the pivot;
 * returns the cut. */
static int64_t partition_pivot(Sorter *s, int64_t first, int64_t last) {
    float *v = s->v;
    int64_t a = first + 1, b = first + (last - first) / 2, c = last - 1, median;
    if (before(s, v[a], v[b])) {
        if (before(s, v[b], v[c])) median = b; else if (before(s, v[a], v[c])) median = c; else median = a;
    } else if (before(s, v[a], v[c])) median = a; else if (before(s, v[b], v[c])) median = c; else median = b;
    swap_items(s, first, median);
    const float p = v[first];
    const int desc = s->descending;
    int64_t lo = first + 1, hi = last, last_left = -1, last_right = -1;
    unsigned char left[BLOCK], right[BLOCK];
    int nleft = 0, nright = 0, sleft = 0, sright = 0;
    /* Left stoppers (not before the pivot) in increasing positions pair with right stoppers (the pivot not
       before them) in decreasing positions, as in Hoare's loop, while the two blocks do not overlap. */
    while (hi - lo > 2 * BLOCK) {
        if (nleft == 0) {
            sleft = 0;
            if (desc) for (int i = 0; i < BLOCK; i++) { left[nleft] = (unsigned char)i; nleft += !(v[lo + i] > p); }
            else for (int i = 0; i < BLOCK; i++) { left[nleft] = (unsigned char)i; nleft += !(v[lo + i] < p); }
        }
        if (nright == 0) {
            sright = 0;
            if (desc) for (int i = 0; i < BLOCK; i++) { right[nright] = (unsigned char)i; nright += !(p > v[hi - 1 - i]); }
            else for (int i = 0; i < BLOCK; i++) { right[nright] = (unsigned char)i; nright += !(p < v[hi - 1 - i]); }
        }
        int pairs = nleft < nright ? nleft : nright;
        for (int j = 0; j < pairs; j++) swap_items(s, lo + left[sleft + j], hi - 1 - right[sright + j]);
        if (pairs) {
            last_left = lo + left[sleft + pairs - 1];
            last_right = hi - 1 - right[sright + pairs - 1];
        }
        nleft -= pairs; nright -= pairs; sleft += pairs; sright += pairs;
        if (nleft == 0) lo += BLOCK;
        if (nright == 0) hi -= BLOCK;
    }
    /* The rest as Hoare's loop does it, from the state after the pairs swapped so far. */
    if (last_left >= 0) { lo = last_left + 1; hi = last_right; } else { lo = first + 1; hi = last; }
    for (;;) {
        while (before(s, v[lo], p)) lo++;
        hi--;
        while (before(s, p, v[hi])) hi--;
        if (!(lo < hi)) return lo;
        swap_items(s, lo, hi);
        lo++;
    }
}

static void push_heap(Sorter *s, int64_t base, int64_t hole, int64_t top, float value, uint32_t index) {
    int64_t parent = (hole - 1) / 2;
    while (hole > top && before(s, s->v[base + parent], value)) {
        s->v[base + hole] = s->v[base + parent]; s->ix[base + hole] = s->ix[base + parent];
        hole = parent; parent = (hole - 1) / 2;
    }
    s->v[base + hole] = value; s->ix[base + hole] = index;
}

static void adjust_heap(Sorter *s, int64_t base, int64_t hole, int64_t len, float value, uint32_t index) {
    int64_t top = hole, child = hole;
    while (child < (len - 1) / 2) {
        child = 2 * (child + 1);
        if (before(s, s->v[base + child], s->v[base + child - 1])) child--;
        s->v[base + hole] = s->v[base + child]; s->ix[base + hole] = s->ix[base + child];
        hole = child;
    }
    if ((len & 1) == 0 && child == (len - 2) / 2) {
        child = 2 * (child + 1);
        s->v[base + hole] = s->v[base + child - 1]; s->ix[base + hole] = s->ix[base + child - 1];
        hole = child - 1;
    }
    push_heap(s, base, hole, top, value, index);
}

/* std::partial_sort(first, last, last): what introsort falls back to when its depth budget is spent. */
static void heap_sort(Sorter *s, int64_t first, int64_t last) {
    int64_t len = last - first;
    if (len < 2) return;
    for (int64_t parent = (len - 2) / 2;; parent--) {
        adjust_heap(s, first, parent, len, s->v[first + parent], s->ix[first + parent]);
        if (parent == 0) break;
    }
    while (last - first > 1) {
        last--;
        float value = s->v[last]; uint32_t index = s->ix[last];
        s->v[last] = s->v[first]; s->ix[last] = s->ix[first];
        adjust_heap(s, first, 0, last - first, value, index);
    }
}

/* The final insertion sort, restricted to one run (elements never cross a partition cut): stable. */
static void insertion_sort(Sorter *s, int64_t first, int64_t last) {
    for (int64_t i = first + 1; i < last; i++) {
        float value = s->v[i]; uint32_t index = s->ix[i];
        int64_t j = i;
        while (j > first && before(s, value, s->v[j - 1])) { s->v[j] = s->v[j - 1]; s->ix[j] = s->ix[j - 1]; j--; }
        s->v[j] = value; s->ix[j] = index;
    }
}

static void introsort(Sorter *s, int64_t first, int64_t last, int64_t depth) {
    while (last - first > RUN) {
        if (!holds_boundary(s, first, last)) return;
        if (depth == 0) { heap_sort(s, first, last); return; }
        depth--;
        int64_t cut = partition_pivot(s, first, last);
        introsort(s, cut, last, depth);
        last = cut;
    }
    if (holds_boundary(s, first, last)) insertion_sort(s, first, last);
}

static PyObject *follow(PyObject *self, PyObject *args) {
    PyObject *values_obj, *index_obj, *bounds_obj;
    int descending;
    if (!PyArg_ParseTuple(args, "OOOp", &values_obj, &index_obj, &bounds_obj, &descending)) return NULL;
    Py_buffer values, index;
    if (PyObject_GetBuffer(values_obj, &values, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return NULL;
    if (PyObject_GetBuffer(index_obj, &index, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        PyBuffer_Release(&values);
        return NULL;
    }
    PyObject *result = NULL;
    int64_t *bounds = NULL;
    Py_ssize_t n = values.len / (Py_ssize_t)sizeof(float);
    if (values.itemsize != 4 || index.itemsize != 4 || index.len != values.len
            || (values.format && values.format[strlen(values.format) - 1] != 'f')) {
        PyErr_SetString(PyExc_TypeError, "follow() needs float32 values and a uint32 index of the same length");
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
    Sorter s = {(float *)values.buf, (uint32_t *)index.buf, descending, bounds, nb};
    Py_BEGIN_ALLOW_THREADS
    if (n > 0) {
        int64_t log2n = 0;
        while (((int64_t)1 << (log2n + 1)) <= (int64_t)n) log2n++;
        introsort(&s, 0, n, 2 * log2n);
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
     "follow(values, index, boundaries, descending): replay std::sort on the ranges holding a boundary."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_sortpath", NULL, -1, methods};

PyMODINIT_FUNC PyInit__sortpath(void) { return PyModule_Create(&module); }
