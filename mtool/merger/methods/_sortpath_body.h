/* The body of _sortpath.c, included once per key type: KEY is the element type compared (float for float32
 * magnitudes, uint16_t for the bit patterns of non-negative 16-bit floats, which order like their values) and
 * NAME(x) names this copy's functions. */
typedef struct {
    KEY *v;
    uint32_t *ix;
    int descending;
    const int64_t *bounds;
    int64_t nbounds;
} NAME(Sorter);

static inline int NAME(before)(const NAME(Sorter) *s, KEY a, KEY b) { return s->descending ? a > b : a < b; }

static inline void NAME(swap_items)(NAME(Sorter) *s, int64_t i, int64_t j) {
    KEY t = s->v[i]; s->v[i] = s->v[j]; s->v[j] = t;
    uint32_t u = s->ix[i]; s->ix[i] = s->ix[j]; s->ix[j] = u;
}

/* Whether some boundary b satisfies first < b < last. */
static int NAME(holds_boundary)(const NAME(Sorter) *s, int64_t first, int64_t last) {
    int64_t lo = 0, hi = s->nbounds;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if (s->bounds[mid] <= first) lo = mid + 1; else hi = mid;
    }
    return lo < s->nbounds && s->bounds[lo] < last;
}

/* std::__unguarded_partition_pivot: the median of first+1, middle and last-1 moves to first and is the pivot;
 * returns the cut. */
static int64_t NAME(partition_pivot)(NAME(Sorter) *s, int64_t first, int64_t last) {
    KEY *v = s->v;
    int64_t a = first + 1, b = first + (last - first) / 2, c = last - 1, median;
    if (NAME(before)(s, v[a], v[b])) {
        if (NAME(before)(s, v[b], v[c])) median = b; else if (NAME(before)(s, v[a], v[c])) median = c; else median = a;
    } else if (NAME(before)(s, v[a], v[c])) median = a; else if (NAME(before)(s, v[b], v[c])) median = c; else median = b;
    NAME(swap_items)(s, first, median);
    const KEY p = v[first];
    const int desc = s->descending;
    int64_t lo = first + 1, hi = last, last_left = -1, last_right = -1;
    unsigned char left[BLOCK], right[BLOCK];
    int nleft = 0, nright = 0, sleft = 0, sright = 0;
    /* Left stoppers (not NAME(before) the pivot) in increasing positions pair with right stoppers (the pivot not
       NAME(before) them) in decreasing positions, as in Hoare's loop, while the two blocks do not overlap. */
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
        for (int j = 0; j < pairs; j++) NAME(swap_items)(s, lo + left[sleft + j], hi - 1 - right[sright + j]);
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
        while (NAME(before)(s, v[lo], p)) lo++;
        hi--;
        while (NAME(before)(s, p, v[hi])) hi--;
        if (!(lo < hi)) return lo;
        NAME(swap_items)(s, lo, hi);
        lo++;
    }
}

static void NAME(push_heap)(NAME(Sorter) *s, int64_t base, int64_t hole, int64_t top, KEY value, uint32_t index) {
    int64_t parent = (hole - 1) / 2;
    while (hole > top && NAME(before)(s, s->v[base + parent], value)) {
        s->v[base + hole] = s->v[base + parent]; s->ix[base + hole] = s->ix[base + parent];
        hole = parent; parent = (hole - 1) / 2;
    }
    s->v[base + hole] = value; s->ix[base + hole] = index;
}

static void NAME(adjust_heap)(NAME(Sorter) *s, int64_t base, int64_t hole, int64_t len, KEY value, uint32_t index) {
    int64_t top = hole, child = hole;
    while (child < (len - 1) / 2) {
        child = 2 * (child + 1);
        if (NAME(before)(s, s->v[base + child], s->v[base + child - 1])) child--;
        s->v[base + hole] = s->v[base + child]; s->ix[base + hole] = s->ix[base + child];
        hole = child;
    }
    if ((len & 1) == 0 && child == (len - 2) / 2) {
        child = 2 * (child + 1);
        s->v[base + hole] = s->v[base + child - 1]; s->ix[base + hole] = s->ix[base + child - 1];
        hole = child - 1;
    }
    NAME(push_heap)(s, base, hole, top, value, index);
}

/* std::partial_sort(first, last, last): what NAME(introsort) falls back to when its depth budget is spent. */
static void NAME(heap_sort)(NAME(Sorter) *s, int64_t first, int64_t last) {
    int64_t len = last - first;
    if (len < 2) return;
    for (int64_t parent = (len - 2) / 2;; parent--) {
        NAME(adjust_heap)(s, first, parent, len, s->v[first + parent], s->ix[first + parent]);
        if (parent == 0) break;
    }
    while (last - first > 1) {
        last--;
        KEY value = s->v[last]; uint32_t index = s->ix[last];
        s->v[last] = s->v[first]; s->ix[last] = s->ix[first];
        NAME(adjust_heap)(s, first, 0, last - first, value, index);
    }
}

/* The final insertion sort, restricted to one run (elements never cross a partition cut): stable. */
static void NAME(insertion_sort)(NAME(Sorter) *s, int64_t first, int64_t last) {
    for (int64_t i = first + 1; i < last; i++) {
        KEY value = s->v[i]; uint32_t index = s->ix[i];
        int64_t j = i;
        while (j > first && NAME(before)(s, value, s->v[j - 1])) { s->v[j] = s->v[j - 1]; s->ix[j] = s->ix[j - 1]; j--; }
        s->v[j] = value; s->ix[j] = index;
    }
}

static void NAME(introsort)(NAME(Sorter) *s, int64_t first, int64_t last, int64_t depth) {
    while (last - first > RUN) {
        if (!NAME(holds_boundary)(s, first, last)) return;
        if (depth == 0) { NAME(heap_sort)(s, first, last); return; }
        depth--;
        int64_t cut = NAME(partition_pivot)(s, first, last);
        NAME(introsort)(s, cut, last, depth);
        last = cut;
    }
    if (NAME(holds_boundary)(s, first, last)) NAME(insertion_sort)(s, first, last);
}

