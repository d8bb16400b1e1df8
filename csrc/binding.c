/* binding.c - lorac._C: the CPython / NumPy binding of the C kernels.
 *
 * The one file that knows about Python.  Each entry point
 *   1. parses its arguments,
 *   2. validates every array (type, dtype, shape, strides, writability) and
 *      every size against BLAS's 32-bit integers BEFORE anything is written,
 *   3. converts inputs whose memory layout a kernel cannot take (copies only
 *      when needed: Fortran order, non-unit inner stride, byte-swapped, ...),
 *   4. releases the GIL and calls the kernel of the array's dtype.
 * Errors: TypeError for types and dtypes, ValueError for shapes and values,
 * each naming the function, the argument, what was expected and what came.
 * The binding knows nothing of the math: shapes come from DESIGN.md.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_2_0_API_VERSION
#include <numpy/arrayobject.h>

#include <math.h>
#include <stdio.h>

#include "blas.h"
#include "blas_info.h"
#include "lora_linear.h"
#include "lora_embedding.h"     /* ---- Embedding ---- */
#include "lora_merged_linear.h" /* ---- MergedLinear ---- */
/* training toolkit (issue 5) */
#include "activation.h"
#include "layernorm.h"
#include "loss.h"
#include "optim.h"
/* many adapters (issue 6) */
#include "lora_multi.h"
#include "lora_moe.h"

/* ------------------------------------------------------------------------ */
/* Validation helpers                                                        */
/* ------------------------------------------------------------------------ */

#define ANY_DIM (-1) /* wildcard in an expected shape */

/* Longest list argument the binding expands into a Python list (enable_lora
 * when out_features is 0, the adapter lists of a mixed batch): a lazy
 * sequence such as range(10**12) is refused instead of exhausting memory. */
#define LORAC_MAX_LIST_LEN (1 << 20)

/* An array a kernel can use, with its row stride in elements. */
typedef struct {
    PyArrayObject *arr; /* owned reference, or NULL when the argument was None */
    ptrdiff_t ld;
} KArray;

/* Runs kernel name##_f32 or name##_f64, chosen by typenum, with the GIL
 * released (kernels touch no Python object); the _INTO form stores the
 * kernel's return value in `result`. */
#define CALL_KERNEL_INTO(result, typenum, name, ...) \
    do {                                             \
        Py_BEGIN_ALLOW_THREADS                       \
        if ((typenum) == NPY_FLOAT32)                \
            (result) = name##_f32(__VA_ARGS__);      \
        else                                         \
            (result) = name##_f64(__VA_ARGS__);      \
        Py_END_ALLOW_THREADS                         \
    } while (0)

#define CALL_KERNEL_VOID(typenum, name, ...) \
    do {                                     \
        Py_BEGIN_ALLOW_THREADS               \
        if ((typenum) == NPY_FLOAT32)        \
            name##_f32(__VA_ARGS__);         \
        else                                 \
            name##_f64(__VA_ARGS__);         \
        Py_END_ALLOW_THREADS                 \
    } while (0)

static void karray_release(KArray *k) { Py_CLEAR(k->arr); }

static const char *dtype_name(int typenum)
{
    switch (typenum) {
    case NPY_FLOAT32: return "float32";
    case NPY_FLOAT64: return "float64";
    case NPY_UINT8: return "uint8";
    case NPY_INT64: return "int64";
    default: return "?";
    }
}

/* "(4, 16)"; ANY_DIM prints as "N" */
static void format_shape(char *buf, size_t size, int ndim, const npy_intp *dims)
{
    size_t pos = 0;
    pos += (size_t)snprintf(buf + pos, size - pos, "(");
    for (int i = 0; i < ndim && pos < size; i++) {
        const char *sep = i ? ", " : "";
        if (dims[i] == ANY_DIM)
            pos += (size_t)snprintf(buf + pos, size - pos, "%sN", sep);
        else
            pos += (size_t)snprintf(buf + pos, size - pos, "%s%lld", sep, (long long)dims[i]);
    }
    if (pos < size)
        snprintf(buf + pos, size - pos, ndim == 1 ? ",)" : ")");
}

/* Can a kernel read/write this array in place?  Needs native byte order,
 * alignment, unit stride along the last axis and a positive row stride that
 * is a whole number of elements (>= the row length). */
static int kernel_layout_ok(PyArrayObject *arr, ptrdiff_t *ld)
{
    const int ndim = PyArray_NDIM(arr);
    const npy_intp *dims = PyArray_DIMS(arr), *strides = PyArray_STRIDES(arr);
    const npy_intp item = PyArray_ITEMSIZE(arr);
    if (!PyArray_ISALIGNED(arr) || !PyArray_ISNOTSWAPPED(arr))
        return 0;
    const npy_intp cols = ndim == 2 ? dims[1] : (ndim == 1 ? dims[0] : 1);
    if (PyArray_SIZE(arr) == 0) { /* empty: strides are meaningless (often 0) */
        *ld = cols > 0 ? cols : 1;
        return *ld <= LORAC_BLAS_INT_MAX;
    }
    if (cols > 1 && strides[ndim - 1] != item)
        return 0;
    *ld = cols > 0 ? cols : 1;
    if (ndim == 2 && dims[0] > 1) {
        if (strides[0] <= 0 || strides[0] % item != 0 || strides[0] / item < cols)
            return 0;
        *ld = strides[0] / item;
    }
    return *ld <= LORAC_BLAS_INT_MAX;
}

enum { IN_ARRAY = 0, INOUT_ARRAY = 1 };

/* Validate obj as an array of dtype `typenum`, `ndim` dimensions and the
 * expected shape (ANY_DIM entries match anything), for argument `name` of
 * function `func`.  IN_ARRAY: copied into a kernel-friendly layout if needed.
 * INOUT_ARRAY: must be writable and usable in place (never copied).
 * `shape_hint` names the expected dimensions for messages, e.g. "(r, in)".
 * Returns 0 and fills *out, or -1 with an exception set. */
static int get_array(const char *func, const char *name, PyObject *obj, int typenum, int ndim,
                     const npy_intp *expected, const char *shape_hint, int mode, KArray *out)
{
    char want[96], got[96];
    out->arr = NULL;
    out->ld = 1;
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s(): '%s' must be a numpy.ndarray of dtype %s, got %s", func,
                     name, dtype_name(typenum), Py_TYPE(obj)->tp_name);
        return -1;
    }
    PyArrayObject *arr = (PyArrayObject *)obj;
    if (PyArray_TYPE(arr) != typenum) {
        PyObject *got_dtype = PyObject_Str((PyObject *)PyArray_DESCR(arr));
        PyErr_Format(PyExc_TypeError, "%s(): '%s' must have dtype %s, got %S", func, name,
                     dtype_name(typenum), got_dtype ? got_dtype : Py_None);
        Py_XDECREF(got_dtype);
        return -1;
    }
    int shape_ok = PyArray_NDIM(arr) == ndim;
    for (int i = 0; shape_ok && i < ndim; i++)
        shape_ok = expected[i] == ANY_DIM || expected[i] == PyArray_DIMS(arr)[i];
    if (!shape_ok) {
        format_shape(want, sizeof want, ndim, expected);
        format_shape(got, sizeof got, PyArray_NDIM(arr), PyArray_DIMS(arr));
        PyErr_Format(PyExc_ValueError, "%s(): '%s' must have shape %s = %s, got shape %s", func, name,
                     shape_hint, want, got);
        return -1;
    }
    for (int i = 0; i < ndim; i++) {
        if (PyArray_DIMS(arr)[i] > LORAC_BLAS_INT_MAX) {
            PyErr_Format(PyExc_ValueError,
                         "%s(): '%s' has a dimension of %lld; BLAS's 32-bit integers allow at most %d",
                         func, name, (long long)PyArray_DIMS(arr)[i], LORAC_BLAS_INT_MAX);
            return -1;
        }
    }
    if (mode == INOUT_ARRAY) {
        if (!PyArray_ISWRITEABLE(arr)) {
            PyErr_Format(PyExc_ValueError, "%s(): '%s' is updated in place but is read-only", func, name);
            return -1;
        }
        if (!kernel_layout_ok(arr, &out->ld)) {
            PyErr_Format(PyExc_ValueError,
                         "%s(): '%s' is updated in place and must be aligned, native-endian and "
                         "row-major with unit inner stride (e.g. C-contiguous)",
                         func, name);
            return -1;
        }
        Py_INCREF(arr);
        out->arr = arr;
        return 0;
    }
    if (kernel_layout_ok(arr, &out->ld)) {
        Py_INCREF(arr);
        out->arr = arr;
        return 0;
    }
    PyArrayObject *copy = (PyArrayObject *)PyArray_FROMANY(obj, typenum, ndim, ndim,
                                                           NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED |
                                                               NPY_ARRAY_FORCECAST);
    if (!copy)
        return -1;
    if (!kernel_layout_ok(copy, &out->ld)) { /* cannot happen for a fresh C array */
        Py_DECREF(copy);
        PyErr_Format(PyExc_ValueError, "%s(): could not lay out '%s' for the kernel", func, name);
        return -1;
    }
    out->arr = copy;
    return 0;
}

/* Same, but None is accepted and leaves out->arr NULL. */
static int get_optional_array(const char *func, const char *name, PyObject *obj, int typenum, int ndim,
                              const npy_intp *expected, const char *shape_hint, int mode, KArray *out)
{
    out->arr = NULL;
    out->ld = 1;
    if (obj == NULL || obj == Py_None)
        return 0;
    return get_array(func, name, obj, typenum, ndim, expected, shape_hint, mode, out);
}

/* The float dtype of the layer, taken from its base weight. */
static int float_typenum(const char *func, const char *name, PyObject *obj, int *typenum)
{
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s(): '%s' must be a numpy.ndarray of dtype float32 or float64, got %s",
                     func, name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    int t = PyArray_TYPE((PyArrayObject *)obj);
    if (t != NPY_FLOAT32 && t != NPY_FLOAT64) {
        PyObject *got = PyObject_Str((PyObject *)PyArray_DESCR((PyArrayObject *)obj));
        PyErr_Format(PyExc_TypeError, "%s(): '%s' must have dtype float32 or float64, got %S", func, name,
                     got ? got : Py_None);
        Py_XDECREF(got);
        return -1;
    }
    if (PyArray_NDIM((PyArrayObject *)obj) != 2) {
        PyErr_Format(PyExc_ValueError, "%s(): '%s' must be 2-D, got %d-D", func, name,
                     PyArray_NDIM((PyArrayObject *)obj));
        return -1;
    }
    *typenum = t;
    return 0;
}

static int check_finite(const char *func, const char *name, double v)
{
    if (!isfinite(v)) {
        PyErr_Format(PyExc_ValueError, "%s(): '%s' must be finite, got %s", func, name,
                     isnan(v) ? "nan" : (v > 0 ? "inf" : "-inf"));
        return -1;
    }
    return 0;
}

static void *data_or_null(const KArray *k) { return k->arr ? PyArray_DATA(k->arr) : NULL; }

/* ---- Aliasing (issue 7) -------------------------------------------------- */

/* The bytes [*lo, *hi) an array can touch, from its data pointer, shape and
 * strides (negative strides included).  An empty array touches nothing. */
static void byte_extent(PyArrayObject *arr, uintptr_t *lo, uintptr_t *hi)
{
    const uintptr_t start = (uintptr_t)PyArray_BYTES(arr);
    *lo = *hi = start;
    if (PyArray_SIZE(arr) == 0)
        return;
    npy_intp below = 0, above = PyArray_ITEMSIZE(arr);
    for (int i = 0; i < PyArray_NDIM(arr); i++) {
        const npy_intp span = (PyArray_DIMS(arr)[i] - 1) * PyArray_STRIDES(arr)[i];
        if (span < 0)
            below += span;
        else
            above += span;
    }
    *lo = start - (uintptr_t)(-below);
    *hi = start + (uintptr_t)above;
}

/* 1 when the byte extents of a and b intersect (a quick, conservative test). */
static int extents_overlap(PyArrayObject *a, PyArrayObject *b)
{
    uintptr_t alo, ahi, blo, bhi;
    byte_extent(a, &alo, &ahi);
    byte_extent(b, &blo, &bhi);
    return alo < ahi && blo < bhi && alo < bhi && blo < ahi;
}

/* 1 when a and b share at least one byte, 0 when not, -1 with an exception.
 * Extents that intersect are settled exactly by numpy.shares_memory (views
 * interleaved in one buffer, e.g. two column blocks, do not share); a problem
 * too hard for it (TooHardError, a RuntimeError) counts as sharing. */
static int arrays_share_memory(PyArrayObject *a, PyArrayObject *b)
{
    if (!extents_overlap(a, b))
        return 0;
    PyObject *numpy = PyImport_ImportModule("numpy");
    if (!numpy)
        return -1;
    PyObject *res = PyObject_CallMethod(numpy, "shares_memory", "OO", (PyObject *)a, (PyObject *)b);
    Py_DECREF(numpy);
    if (!res) {
        if (!PyErr_ExceptionMatches(PyExc_RuntimeError))
            return -1;
        PyErr_Clear();
        return 1;
    }
    const int shared = PyObject_IsTrue(res);
    Py_DECREF(res);
    return shared;
}

/* An operand of resolve_aliasing: the caller's reference to a validated array
 * (*arr NULL: argument absent) and, for a KArray, its row stride to update
 * when the array is replaced by a copy. */
typedef struct {
    const char *name;
    PyArrayObject **arr;
    ptrdiff_t *ld;
} AliasArg;

#define ALIAS_KARRAY(name, karray) {(name), &(karray).arr, &(karray).ld}
#define ALIAS_ARRAY(name, array) {(name), &(array), NULL}
#define ALIAS_COUNT(list) ((int)(sizeof(list) / sizeof((list)[0])))

/* Every entry point that writes into arrays the caller passed calls this once,
 * after validating its arguments and before its kernel runs:
 *  - two in-place outputs that share memory: ValueError (no order of updates
 *    makes that right);
 *  - an input whose bytes overlap an in-place output is replaced by a private
 *    C-contiguous copy, so the kernel reads the values the input had when the
 *    call began (NumPy's rule for ufuncs with out=).
 * Returns 0, or -1 with an exception set (nothing has been written). */
static int resolve_aliasing(const char *func, AliasArg *inputs, int n_inputs, const AliasArg *outputs,
                            int n_outputs)
{
    for (int i = 0; i < n_outputs; i++) {
        for (int j = i + 1; j < n_outputs; j++) {
            PyArrayObject *a = *outputs[i].arr, *b = *outputs[j].arr;
            if (!a || !b)
                continue;
            const int shared = arrays_share_memory(a, b);
            if (shared < 0)
                return -1;
            if (shared) {
                PyErr_Format(PyExc_ValueError, "%s(): '%s' and '%s' are both updated in place and must not "
                             "share memory, got overlapping arrays", func, outputs[i].name, outputs[j].name);
                return -1;
            }
        }
    }
    for (int i = 0; i < n_inputs; i++) {
        PyArrayObject *in = *inputs[i].arr;
        for (int j = 0; in && j < n_outputs; j++) {
            if (!*outputs[j].arr || !extents_overlap(in, *outputs[j].arr))
                continue;
            PyArrayObject *copy = (PyArrayObject *)PyArray_NewCopy(in, NPY_CORDER);
            if (!copy)
                return -1;
            ptrdiff_t ld = 1;
            if (inputs[i].ld && !kernel_layout_ok(copy, &ld)) { /* cannot happen for a fresh C array */
                Py_DECREF(copy);
                PyErr_Format(PyExc_ValueError, "%s(): could not copy '%s' away from '%s'", func, inputs[i].name,
                             outputs[j].name);
                return -1;
            }
            Py_SETREF(*inputs[i].arr, copy);
            if (inputs[i].ld)
                *inputs[i].ld = ld;
            break;
        }
    }
    return 0;
}
/* ---- end of aliasing ---- */

/* ------------------------------------------------------------------------ */
/* LoRA Linear                                                               */
/* ------------------------------------------------------------------------ */

/* Validated operands of a LoRA Linear call (see lora_linear.h). */
typedef struct {
    int typenum;
    npy_intp n, in, out, r;
    KArray x, w, bias, a, b, mask;
} LinearOperands;

static void linear_operands_release(LinearOperands *op)
{
    karray_release(&op->x);
    karray_release(&op->w);
    karray_release(&op->bias);
    karray_release(&op->a);
    karray_release(&op->b);
    karray_release(&op->mask);
}

/* Validates weight, x, bias, lora_A/lora_B and mask; sizes n/in/out/r from them. */
static int linear_operands_parse(const char *func, PyObject *x, PyObject *weight, PyObject *bias,
                                 PyObject *lora_a, PyObject *lora_b, PyObject *mask, int fan_in_fan_out,
                                 LinearOperands *op)
{
    memset(op, 0, sizeof *op);
    if (float_typenum(func, "weight", weight, &op->typenum) < 0)
        return -1;
    const npy_intp *wd = PyArray_DIMS((PyArrayObject *)weight);
    op->out = fan_in_fan_out ? wd[1] : wd[0];
    op->in = fan_in_fan_out ? wd[0] : wd[1];
    npy_intp wshape[2] = {wd[0], wd[1]};
    if (get_array(func, "weight", weight, op->typenum, 2, wshape,
                  fan_in_fan_out ? "(in, out)" : "(out, in)", IN_ARRAY, &op->w) < 0)
        goto fail;
    npy_intp xshape[2] = {ANY_DIM, op->in};
    if (get_array(func, "x", x, op->typenum, 2, xshape, "(N, in)", IN_ARRAY, &op->x) < 0)
        goto fail;
    op->n = PyArray_DIMS(op->x.arr)[0];
    npy_intp bshape[1] = {op->out};
    if (get_optional_array(func, "bias", bias, op->typenum, 1, bshape, "(out,)", IN_ARRAY, &op->bias) < 0)
        goto fail;
    if ((lora_a == Py_None) != (lora_b == Py_None)) {
        PyErr_Format(PyExc_ValueError, "%s(): 'lora_A' and 'lora_B' must both be arrays or both be None",
                     func);
        goto fail;
    }
    if (lora_a != Py_None) {
        npy_intp ashape[2] = {ANY_DIM, op->in};
        if (get_array(func, "lora_A", lora_a, op->typenum, 2, ashape, "(r, in)", IN_ARRAY, &op->a) < 0)
            goto fail;
        op->r = PyArray_DIMS(op->a.arr)[0];
        npy_intp lbshape[2] = {op->out, op->r};
        if (get_array(func, "lora_B", lora_b, op->typenum, 2, lbshape, "(out, r)", IN_ARRAY, &op->b) < 0)
            goto fail;
    }
    npy_intp mshape[2] = {op->n, op->in};
    if (get_optional_array(func, "mask", mask, NPY_UINT8, 2, mshape, "(N, in)", IN_ARRAY, &op->mask) < 0)
        goto fail;
    if (op->mask.arr && !PyArray_IS_C_CONTIGUOUS(op->mask.arr)) { /* kernels read it densely */
        PyArrayObject *dense = (PyArrayObject *)PyArray_NewCopy(op->mask.arr, NPY_CORDER);
        if (!dense)
            goto fail;
        Py_SETREF(op->mask.arr, dense);
    }
    return 0;
fail:
    linear_operands_release(op);
    return -1;
}

static LoraLinear linear_kernel_args(const LinearOperands *op, int fan_in_fan_out, double scaling,
                                     double keep_scale)
{
    LoraLinear L = {
        .n = op->n, .in = op->in, .out = op->out, .r = op->r,
        .w_in_out = fan_in_fan_out, .scaling = scaling, .keep_scale = keep_scale,
        .x = data_or_null(&op->x), .ldx = op->x.ld,
        .w = data_or_null(&op->w), .ldw = op->w.ld,
        .bias = data_or_null(&op->bias),
        .a = data_or_null(&op->a), .lda = op->a.ld,
        .b = data_or_null(&op->b), .ldb = op->b.ld,
        .mask = data_or_null(&op->mask),
    };
    return L;
}

static PyObject *new_matrix(int typenum, npy_intp rows, npy_intp cols)
{
    npy_intp dims[2] = {rows, cols};
    return PyArray_EMPTY(2, dims, typenum, 0);
}

/* ---- The gradient side of a Linear-family backward (Linear, MergedLinear,
 * MoLoRA): grad_output, the forward's u, and the parameter gradients. ---- */

/* The arguments as passed (borrowed; Py_None where absent). */
typedef struct {
    PyObject *g, *u, *gw, *gbias, *ga, *gb;
} GradArgs;

/* The validated arrays: g (N, out), u (N, rows of lora_A), and the gradients
 * of weight, bias, lora_A, lora_B (arr NULL: frozen, nothing computed). */
typedef struct {
    KArray g, u, gw, gbias, ga, gb;
} GradArrays;

static void grad_arrays_release(GradArrays *ga)
{
    karray_release(&ga->g);
    karray_release(&ga->u);
    karray_release(&ga->gw);
    karray_release(&ga->gbias);
    karray_release(&ga->ga);
    karray_release(&ga->gb);
}

/* Shape words for a family member's error messages. */
typedef struct {
    const char *u, *lora_a, *lora_b;
} GradShapeWords;

/* Validates args against the forward operands lin (x, weight) and the
 * adapter a / b (arr NULL: no adapter, so u and the adapter's gradients must
 * be None); the gradient of each parameter must have that parameter's shape. */
static int grad_arrays_parse(const char *func, const LinearOperands *lin, const KArray *a, const KArray *b,
                             int fan_in_fan_out, const GradShapeWords *words, const GradArgs *args,
                             GradArrays *out)
{
    memset(out, 0, sizeof *out);
    const int typenum = lin->typenum, lora = a->arr != NULL;
    npy_intp gshape[2] = {lin->n, lin->out}, bshape[1] = {lin->out};
    npy_intp wshape[2] = {PyArray_DIMS(lin->w.arr)[0], PyArray_DIMS(lin->w.arr)[1]};
    if (get_array(func, "grad_output", args->g, typenum, 2, gshape, "(N, out)", IN_ARRAY, &out->g) < 0 ||
        get_optional_array(func, "grad_weight", args->gw, typenum, 2, wshape,
                           fan_in_fan_out ? "(in, out)" : "(out, in)", INOUT_ARRAY, &out->gw) < 0 ||
        get_optional_array(func, "grad_bias", args->gbias, typenum, 1, bshape, "(out,)", INOUT_ARRAY,
                           &out->gbias) < 0)
        goto fail;
    if (!lora) {
        if (args->ga != Py_None || args->gb != Py_None) {
            PyErr_Format(PyExc_ValueError, "%s(): grad_lora_A/grad_lora_B given but lora_A/lora_B are None",
                         func);
            goto fail;
        }
        return 0;
    }
    const npy_intp *ad = PyArray_DIMS(a->arr), *bd = PyArray_DIMS(b->arr);
    npy_intp ushape[2] = {lin->n, ad[0]}, ashape[2] = {ad[0], ad[1]}, lbshape[2] = {bd[0], bd[1]};
    if (get_array(func, "u", args->u, typenum, 2, ushape, words->u, IN_ARRAY, &out->u) < 0 ||
        get_optional_array(func, "grad_lora_A", args->ga, typenum, 2, ashape, words->lora_a, INOUT_ARRAY,
                           &out->ga) < 0 ||
        get_optional_array(func, "grad_lora_B", args->gb, typenum, 2, lbshape, words->lora_b, INOUT_ARRAY,
                           &out->gb) < 0)
        goto fail;
    return 0;
fail:
    grad_arrays_release(out);
    return -1;
}

/* resolve_aliasing over a Linear-family backward's arrays: the forward
 * operands, a / b and the gradient side (grad_* are the in-place outputs). */
static int grad_arrays_resolve_aliasing(const char *func, LinearOperands *lin, KArray *a, KArray *b,
                                        GradArrays *ga)
{
    AliasArg alias_in[] = {ALIAS_KARRAY("grad_output", ga->g), ALIAS_KARRAY("x", lin->x),
                           ALIAS_KARRAY("weight", lin->w), ALIAS_KARRAY("lora_A", *a), ALIAS_KARRAY("lora_B", *b),
                           ALIAS_KARRAY("u", ga->u), ALIAS_KARRAY("mask", lin->mask)};
    AliasArg alias_out[] = {ALIAS_KARRAY("grad_weight", ga->gw), ALIAS_KARRAY("grad_bias", ga->gbias),
                            ALIAS_KARRAY("grad_lora_A", ga->ga), ALIAS_KARRAY("grad_lora_B", ga->gb)};
    return resolve_aliasing(func, alias_in, ALIAS_COUNT(alias_in), alias_out, ALIAS_COUNT(alias_out));
}

/* The kernels' gradient struct: dx (N, in) into the new array dx (or NULL). */
static LoraLinearGrads linear_grads_args(const GradArrays *ga, PyObject *dx, npy_intp in)
{
    LoraLinearGrads G = {
        .dx = dx ? PyArray_DATA((PyArrayObject *)dx) : NULL, .lddx = in > 0 ? in : 1,
        .dw = data_or_null(&ga->gw), .lddw = ga->gw.ld,
        .dbias = data_or_null(&ga->gbias),
        .da = data_or_null(&ga->ga), .ldda = ga->ga.ld,
        .db = data_or_null(&ga->gb), .lddb = ga->gb.ld,
    };
    return G;
}

PyDoc_STRVAR(linear_forward_doc,
"linear_forward(x, weight, bias, lora_A, lora_B, scaling, fan_in_fan_out, mask, keep_scale)\n"
"-> (y, u)\n\n"
"y = x W0^T + bias + scaling * (drop(x) A^T) B^T for x (N, in), W0 (out, in)\n"
"(or (in, out) with fan_in_fan_out), bias (out,) or None, A (r, in), B (out, r)\n"
"(both None: no adapter), mask (N, in) uint8 or None with drop(x) = x*mask*keep_scale.\n"
"Returns y (N, out) and u = drop(x) A^T (N, r) (None without adapter).");

static PyObject *py_linear_forward(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static const char *func = "linear_forward";
    static char *kwlist[] = {"x", "weight", "bias", "lora_A", "lora_B", "scaling", "fan_in_fan_out",
                             "mask", "keep_scale", NULL};
    PyObject *x, *weight, *bias, *lora_a, *lora_b, *mask = Py_None;
    double scaling, keep_scale = 1.0;
    int fan_in_fan_out;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOdp|Od:linear_forward", kwlist, &x, &weight, &bias,
                                     &lora_a, &lora_b, &scaling, &fan_in_fan_out, &mask, &keep_scale))
        return NULL;
    if (check_finite(func, "scaling", scaling) < 0 || check_finite(func, "keep_scale", keep_scale) < 0)
        return NULL;
    LinearOperands op;
    if (linear_operands_parse(func, x, weight, bias, lora_a, lora_b, mask, fan_in_fan_out, &op) < 0)
        return NULL;
    PyObject *y = new_matrix(op.typenum, op.n, op.out);
    PyObject *u = op.a.arr ? new_matrix(op.typenum, op.n, op.r) : (Py_INCREF(Py_None), Py_None);
    if (!y || !u)
        goto fail;
    LoraLinear L = linear_kernel_args(&op, fan_in_fan_out, scaling, keep_scale);
    void *u_data = op.a.arr ? PyArray_DATA((PyArrayObject *)u) : NULL;
    ptrdiff_t ldu = op.r > 0 ? op.r : 1, ldy = op.out > 0 ? op.out : 1;
    int status;
    CALL_KERNEL_INTO(status, op.typenum, lorac_linear_forward, &L, u_data, ldu, PyArray_DATA((PyArrayObject *)y),
                     ldy);
    if (status != 0) {
        PyErr_NoMemory();
        goto fail;
    }
    linear_operands_release(&op);
    return Py_BuildValue("(NN)", y, u);
fail:
    Py_XDECREF(y);
    Py_XDECREF(u);
    linear_operands_release(&op);
    return NULL;
}

PyDoc_STRVAR(linear_backward_doc,
"linear_backward(grad_output, x, weight, lora_A, lora_B, u, scaling, fan_in_fan_out, mask,\n"
"                keep_scale, need_input_grad, grad_weight, grad_bias, grad_lora_A, grad_lora_B)\n"
"-> grad_input or None\n\n"
"Backward of linear_forward for grad_output (N, out).  Each grad_* is None (frozen:\n"
"nothing computed) or an array of its parameter's shape, accumulated in place.\n"
"u is the (N, r) array linear_forward returned.");

static PyObject *py_linear_backward(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static const char *func = "linear_backward";
    static char *kwlist[] = {"grad_output", "x", "weight", "lora_A", "lora_B", "u", "scaling",
                             "fan_in_fan_out", "mask", "keep_scale", "need_input_grad", "grad_weight",
                             "grad_bias", "grad_lora_A", "grad_lora_B", NULL};
    PyObject *x, *weight, *lora_a, *lora_b, *mask = Py_None;
    GradArgs grad_args = {.gw = Py_None, .gbias = Py_None, .ga = Py_None, .gb = Py_None};
    double scaling, keep_scale = 1.0;
    int fan_in_fan_out, need_input_grad = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOOdp|OdpOOOO:linear_backward", kwlist, &grad_args.g, &x,
                                     &weight, &lora_a, &lora_b, &grad_args.u, &scaling, &fan_in_fan_out, &mask,
                                     &keep_scale, &need_input_grad, &grad_args.gw, &grad_args.gbias,
                                     &grad_args.ga, &grad_args.gb))
        return NULL;
    if (check_finite(func, "scaling", scaling) < 0 || check_finite(func, "keep_scale", keep_scale) < 0)
        return NULL;
    LinearOperands op;
    if (linear_operands_parse(func, x, weight, Py_None, lora_a, lora_b, mask, fan_in_fan_out, &op) < 0)
        return NULL;
    static const GradShapeWords words = {"(N, r)", "(r, in)", "(out, r)"};
    GradArrays ga;
    PyObject *dx = NULL;
    if (grad_arrays_parse(func, &op, &op.a, &op.b, fan_in_fan_out, &words, &grad_args, &ga) < 0) {
        linear_operands_release(&op);
        return NULL;
    }
    if (grad_arrays_resolve_aliasing(func, &op, &op.a, &op.b, &ga) < 0)
        goto fail;
    if (need_input_grad && !(dx = new_matrix(op.typenum, op.n, op.in)))
        goto fail;

    LoraLinear L = linear_kernel_args(&op, fan_in_fan_out, scaling, keep_scale);
    LoraLinearGrads G = linear_grads_args(&ga, dx, op.in);
    const void *u_data = data_or_null(&ga.u), *g_data = data_or_null(&ga.g);
    int status;
    CALL_KERNEL_INTO(status, op.typenum, lorac_linear_backward, &L, u_data, ga.u.ld, g_data, ga.g.ld, &G);
    if (status != 0) {
        PyErr_NoMemory();
        goto fail;
    }
    grad_arrays_release(&ga);
    linear_operands_release(&op);
    if (!dx)
        Py_RETURN_NONE;
    return dx;
fail:
    Py_XDECREF(dx);
    grad_arrays_release(&ga);
    linear_operands_release(&op);
    return NULL;
}

PyDoc_STRVAR(linear_merge_doc,
"linear_merge(weight, lora_A, lora_B, alpha, fan_in_fan_out) -> None\n\n"
"In place: W0 (out, in) += alpha * B A, or W0 (in, out) += alpha * (B A)^T with\n"
"fan_in_fan_out.  alpha = scaling merges, -scaling unmerges.");

static PyObject *py_linear_merge(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static const char *func = "linear_merge";
    static char *kwlist[] = {"weight", "lora_A", "lora_B", "alpha", "fan_in_fan_out", NULL};
    PyObject *weight, *lora_a, *lora_b;
    double alpha;
    int fan_in_fan_out;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOdp:linear_merge", kwlist, &weight, &lora_a, &lora_b,
                                     &alpha, &fan_in_fan_out))
        return NULL;
    if (check_finite(func, "alpha", alpha) < 0)
        return NULL;
    int typenum;
    if (float_typenum(func, "weight", weight, &typenum) < 0)
        return NULL;
    const npy_intp *wd = PyArray_DIMS((PyArrayObject *)weight);
    npy_intp out = fan_in_fan_out ? wd[1] : wd[0], in = fan_in_fan_out ? wd[0] : wd[1];
    npy_intp wshape[2] = {wd[0], wd[1]}, ashape[2] = {ANY_DIM, in};
    KArray w = {0}, a = {0}, b = {0};
    if (get_array(func, "weight", weight, typenum, 2, wshape, fan_in_fan_out ? "(in, out)" : "(out, in)",
                  INOUT_ARRAY, &w) < 0 ||
        get_array(func, "lora_A", lora_a, typenum, 2, ashape, "(r, in)", IN_ARRAY, &a) < 0)
        goto fail;
    npy_intp r = PyArray_DIMS(a.arr)[0];
    npy_intp bshape[2] = {out, r};
    if (get_array(func, "lora_B", lora_b, typenum, 2, bshape, "(out, r)", IN_ARRAY, &b) < 0)
        goto fail;
    AliasArg alias_in[] = {ALIAS_KARRAY("lora_A", a), ALIAS_KARRAY("lora_B", b)};
    AliasArg alias_out[] = {ALIAS_KARRAY("weight", w)};
    if (resolve_aliasing(func, alias_in, ALIAS_COUNT(alias_in), alias_out, ALIAS_COUNT(alias_out)) < 0)
        goto fail;
    CALL_KERNEL_VOID(typenum, lorac_linear_merge, out, in, r, fan_in_fan_out, alpha, PyArray_DATA(a.arr), a.ld,
                     PyArray_DATA(b.arr), b.ld, PyArray_DATA(w.arr), w.ld);
    karray_release(&w), karray_release(&a), karray_release(&b);
    Py_RETURN_NONE;
fail:
    karray_release(&w), karray_release(&a), karray_release(&b);
    return NULL;
}

/* ======================================================================== */
/* Training toolkit (issue 5): optimizers, losses, activations, LayerNorm    */
/* Kernels: optim.h, loss.h, activation.h, layernorm.h.                      */
/* ======================================================================== */

/* The float dtype of `obj`, which must be an ndarray of `ndim` dimensions. */
static int train_float_typenum(const char *func, const char *name, PyObject *obj, int ndim, int *typenum)
{
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s(): '%s' must be a numpy.ndarray of dtype float32 or float64, got %s",
                     func, name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    int t = PyArray_TYPE((PyArrayObject *)obj);
    if (t != NPY_FLOAT32 && t != NPY_FLOAT64) {
        PyObject *got = PyObject_Str((PyObject *)PyArray_DESCR((PyArrayObject *)obj));
        PyErr_Format(PyExc_TypeError, "%s(): '%s' must have dtype float32 or float64, got %S", func, name,
                     got ? got : Py_None);
        Py_XDECREF(got);
        return -1;
    }
    if (PyArray_NDIM((PyArrayObject *)obj) != ndim) {
        PyErr_Format(PyExc_ValueError, "%s(): '%s' must be %d-D, got %d-D", func, name, ndim,
                     PyArray_NDIM((PyArrayObject *)obj));
        return -1;
    }
    *typenum = t;
    return 0;
}

/* A finite hyper-parameter in [lo, hi) (hi_open) or [lo, hi]. */
static int check_range(const char *func, const char *name, double v, double lo, double hi, int hi_open)
{
    if (check_finite(func, name, v) < 0)
        return -1;
    if (v < lo || (hi_open ? v >= hi : v > hi)) { /* PyErr_Format has no %g */
        char msg[160];
        PyOS_snprintf(msg, sizeof msg, "must be in [%g, %g%s, got %g", lo, hi, hi_open ? ")" : "]", v);
        PyErr_Format(PyExc_ValueError, "%s(): '%s' %s", func, name, msg);
        return -1;
    }
    return 0;
}

static PyObject *new_vector(int typenum, npy_intp n)
{
    npy_intp dims[1] = {n};
    return PyArray_EMPTY(1, dims, typenum, 0);
}

/* -- optimizers ----------------------------------------------------------- */

PyDoc_STRVAR(sgd_step_doc,
"sgd_step(param, grad, momentum_buffer, lr, momentum, dampening, weight_decay, nesterov,\n"
"         maximize, init_buffer) -> None\n\n"
"One fused torch.optim.SGD update of param (n,) in place from grad (n,).\n"
"momentum_buffer (n,) is updated in place; it must be None exactly when momentum == 0.\n"
"init_buffer: first step (the buffer is set to the gradient).");

static PyObject *py_sgd_step(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static const char *func = "sgd_step";
    static char *kwlist[] = {"param", "grad", "momentum_buffer", "lr", "momentum", "dampening",
                             "weight_decay", "nesterov", "maximize", "init_buffer", NULL};
    PyObject *param_obj, *grad_obj, *buf_obj;
    double lr, momentum, dampening, weight_decay;
    int nesterov, maximize, init_buffer;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOddddppp:sgd_step", kwlist, &param_obj, &grad_obj,
                                     &buf_obj, &lr, &momentum, &dampening, &weight_decay, &nesterov,
                                     &maximize, &init_buffer))
        return NULL;
    if (check_finite(func, "lr", lr) < 0 || check_finite(func, "momentum", momentum) < 0 ||
        check_finite(func, "dampening", dampening) < 0 || check_finite(func, "weight_decay", weight_decay) < 0)
        return NULL;
    if ((buf_obj == Py_None) != (momentum == 0)) {
        char got[64];
        PyOS_snprintf(got, sizeof got, "momentum=%g, got %s", momentum, buf_obj == Py_None ? "None" : "an array");
        PyErr_Format(PyExc_ValueError, "%s(): 'momentum_buffer' must be None exactly when momentum == 0 (%s)",
                     func, got);
        return NULL;
    }
    int typenum;
    if (train_float_typenum(func, "param", param_obj, 1, &typenum) < 0)
        return NULL;
    npy_intp shape[1] = {PyArray_DIMS((PyArrayObject *)param_obj)[0]};
    KArray p = {0}, g = {0}, buf = {0};
    if (get_array(func, "param", param_obj, typenum, 1, shape, "(n,)", INOUT_ARRAY, &p) < 0 ||
        get_array(func, "grad", grad_obj, typenum, 1, shape, "(n,)", IN_ARRAY, &g) < 0 ||
        get_optional_array(func, "momentum_buffer", buf_obj, typenum, 1, shape, "(n,)", INOUT_ARRAY, &buf) < 0)
        goto fail;
    AliasArg alias_in[] = {ALIAS_KARRAY("grad", g)};
    AliasArg alias_out[] = {ALIAS_KARRAY("param", p), ALIAS_KARRAY("momentum_buffer", buf)};
    if (resolve_aliasing(func, alias_in, ALIAS_COUNT(alias_in), alias_out, ALIAS_COUNT(alias_out)) < 0)
        goto fail;
    SgdHyper h = {.lr = lr, .momentum = momentum, .dampening = dampening, .weight_decay = weight_decay,
                  .nesterov = nesterov, .maximize = maximize, .init_buffer = init_buffer};
    CALL_KERNEL_VOID(typenum, lorac_sgd_step, shape[0], PyArray_DATA(p.arr), data_or_null(&g), data_or_null(&buf),
                     &h);
    karray_release(&p), karray_release(&g), karray_release(&buf);
    Py_RETURN_NONE;
fail:
    karray_release(&p), karray_release(&g), karray_release(&buf);
    return NULL;
}

PyDoc_STRVAR(adam_step_doc,
"adam_step(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step, lr, beta1, beta2, eps,\n"
"          weight_decay, decoupled, amsgrad, maximize) -> None\n\n"
"One fused torch.optim.Adam (decoupled=False) or AdamW (decoupled=True) update of\n"
"param (n,) in place from grad (n,); exp_avg, exp_avg_sq (and max_exp_avg_sq, which\n"
"must be an array exactly when amsgrad) are (n,) and updated in place.  step >= 1 is\n"
"the number of the step being taken (bias correction 1 - beta^step).");

static PyObject *py_adam_step(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static const char *func = "adam_step";
    static char *kwlist[] = {"param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step", "lr",
                             "beta1", "beta2", "eps", "weight_decay", "decoupled", "amsgrad", "maximize",
                             NULL};
    PyObject *param_obj, *grad_obj, *m_obj, *v_obj, *vmax_obj;
    long long step;
    double lr, beta1, beta2, eps, weight_decay;
    int decoupled, amsgrad, maximize;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOLdddddppp:adam_step", kwlist, &param_obj, &grad_obj,
                                     &m_obj, &v_obj, &vmax_obj, &step, &lr, &beta1, &beta2, &eps,
                                     &weight_decay, &decoupled, &amsgrad, &maximize))
        return NULL;
    if (step < 1) {
        PyErr_Format(PyExc_ValueError, "%s(): 'step' must be >= 1, got %lld", func, step);
        return NULL;
    }
    if (check_finite(func, "lr", lr) < 0 || check_range(func, "beta1", beta1, 0, 1, 1) < 0 ||
        check_range(func, "beta2", beta2, 0, 1, 1) < 0 || check_finite(func, "eps", eps) < 0 ||
        check_finite(func, "weight_decay", weight_decay) < 0)
        return NULL;
    if ((vmax_obj == Py_None) == amsgrad) {
        PyErr_Format(PyExc_ValueError, "%s(): 'max_exp_avg_sq' must be an array exactly when amsgrad "
                     "(amsgrad=%s, got %s)", func, amsgrad ? "True" : "False",
                     vmax_obj == Py_None ? "None" : "an array");
        return NULL;
    }
    int typenum;
    if (train_float_typenum(func, "param", param_obj, 1, &typenum) < 0)
        return NULL;
    npy_intp shape[1] = {PyArray_DIMS((PyArrayObject *)param_obj)[0]};
    KArray p = {0}, g = {0}, m = {0}, v = {0}, vmax = {0};
    if (get_array(func, "param", param_obj, typenum, 1, shape, "(n,)", INOUT_ARRAY, &p) < 0 ||
        get_array(func, "grad", grad_obj, typenum, 1, shape, "(n,)", IN_ARRAY, &g) < 0 ||
        get_array(func, "exp_avg", m_obj, typenum, 1, shape, "(n,)", INOUT_ARRAY, &m) < 0 ||
        get_array(func, "exp_avg_sq", v_obj, typenum, 1, shape, "(n,)", INOUT_ARRAY, &v) < 0 ||
        get_optional_array(func, "max_exp_avg_sq", vmax_obj, typenum, 1, shape, "(n,)", INOUT_ARRAY, &vmax) < 0)
        goto fail;
    AliasArg alias_in[] = {ALIAS_KARRAY("grad", g)};
    AliasArg alias_out[] = {ALIAS_KARRAY("param", p), ALIAS_KARRAY("exp_avg", m), ALIAS_KARRAY("exp_avg_sq", v),
                            ALIAS_KARRAY("max_exp_avg_sq", vmax)};
    if (resolve_aliasing(func, alias_in, ALIAS_COUNT(alias_in), alias_out, ALIAS_COUNT(alias_out)) < 0)
        goto fail;
    AdamHyper h = {.lr = lr, .beta1 = beta1, .beta2 = beta2, .eps = eps, .weight_decay = weight_decay,
                   .step = (int64_t)step, .decoupled = decoupled, .amsgrad = amsgrad, .maximize = maximize};
    CALL_KERNEL_VOID(typenum, lorac_adam_step, shape[0], PyArray_DATA(p.arr), data_or_null(&g),
                     PyArray_DATA(m.arr), PyArray_DATA(v.arr), data_or_null(&vmax), &h);
    karray_release(&p), karray_release(&g), karray_release(&m), karray_release(&v), karray_release(&vmax);
    Py_RETURN_NONE;
fail:
    karray_release(&p), karray_release(&g), karray_release(&m), karray_release(&v), karray_release(&vmax);
    return NULL;
}

/* -- losses --------------------------------------------------------------- */

/* Every target must be ignore_index or a class in [0, c). */
static int check_targets(const char *func, const KArray *target, npy_intp c, long long ignore_index)
{
    const npy_intp n = PyArray_DIMS(target->arr)[0];
    const int64_t *t = PyArray_DATA(target->arr);
    for (npy_intp i = 0; i < n; i++) {
        if (t[i] != ignore_index && (t[i] < 0 || t[i] >= c)) {
            PyErr_Format(PyExc_ValueError, "%s(): 'target' must hold class indices in [0, %lld) or "
                         "ignore_index=%lld, got %lld at position %lld", func, (long long)c, ignore_index,
                         (long long)t[i], (long long)i);
            return -1;
        }
    }
    return 0;
}

/* Validated operands of a cross-entropy call: logits (N, C), target (N,). */
typedef struct {
    int typenum;
    npy_intp n, c;
    KArray logits, target;
} CrossEntropyOperands;

static void ce_operands_release(CrossEntropyOperands *op)
{
    karray_release(&op->logits);
    karray_release(&op->target);
}

static int ce_operands_parse(const char *func, PyObject *logits, PyObject *target, long long ignore_index,
                             CrossEntropyOperands *op)
{
    memset(op, 0, sizeof *op);
    if (train_float_typenum(func, "logits", logits, 2, &op->typenum) < 0)
        return -1;
    const npy_intp *dims = PyArray_DIMS((PyArrayObject *)logits);
    op->n = dims[0];
    op->c = dims[1];
    npy_intp lshape[2] = {op->n, op->c}, tshape[1] = {op->n};
    if (get_array(func, "logits", logits, op->typenum, 2, lshape, "(N, C)", IN_ARRAY, &op->logits) < 0 ||
        get_array(func, "target", target, NPY_INT64, 1, tshape, "(N,)", IN_ARRAY, &op->target) < 0 ||
        check_targets(func, &op->target, op->c, ignore_index) < 0) {
        ce_operands_release(op);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(cross_entropy_forward_doc,
"cross_entropy_forward(logits, target, ignore_index) -> (loss, lse, total, count)\n\n"
"logits (N, C) float, target (N,) int64 class indices (or ignore_index).\n"
"loss (N,) = logsumexp(logits_i) - logits_i,target_i (0 where ignored), lse (N,) float64\n"
"the row log-sum-exps (kept for backward), total = sum of loss (float, accumulated in\n"
"double), count = number of rows not ignored.");

static PyObject *py_cross_entropy_forward(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static const char *func = "cross_entropy_forward";
    static char *kwlist[] = {"logits", "target", "ignore_index", NULL};
    PyObject *logits, *target;
    long long ignore_index;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOL:cross_entropy_forward", kwlist, &logits, &target,
                                     &ignore_index))
        return NULL;
    CrossEntropyOperands op;
    if (ce_operands_parse(func, logits, target, ignore_index, &op) < 0)
        return NULL;
    PyObject *loss = new_vector(op.typenum, op.n), *lse = new_vector(NPY_FLOAT64, op.n);
    if (!loss || !lse)
        goto fail;
    double total = 0;
    ptrdiff_t count;
    const void *x = PyArray_DATA(op.logits.arr);
    const int64_t *t = PyArray_DATA(op.target.arr);
    void *loss_data = PyArray_DATA((PyArrayObject *)loss), *lse_data = PyArray_DATA((PyArrayObject *)lse);
    CALL_KERNEL_INTO(count, op.typenum, lorac_cross_entropy_forward, op.n, op.c, x, op.logits.ld, t, ignore_index,
                     loss_data, lse_data, &total);
    if (count < 0) { /* cannot happen: check_targets ran first */
        PyErr_Format(PyExc_ValueError, "%s(): target out of range at position %lld", func,
                     (long long)(-count - 1));
        goto fail;
    }
    ce_operands_release(&op);
    return Py_BuildValue("(NNdn)", loss, lse, total, (Py_ssize_t)count);
fail:
    Py_XDECREF(loss);
    Py_XDECREF(lse);
    ce_operands_release(&op);
    return NULL;
}

PyDoc_STRVAR(cross_entropy_backward_doc,
"cross_entropy_backward(logits, target, lse, ignore_index, scale, grad=None) -> dlogits\n\n"
"dlogits (N, C) = w_i * (softmax(logits_i) - onehot(target_i)) with\n"
"w_i = scale * grad_i (grad (N,) or None for 1); rows with target == ignore_index are 0.\n"
"lse (N,) float64 is what cross_entropy_forward returned for the same logits.");

static PyObject *py_cross_entropy_backward(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static const char *func = "cross_entropy_backward";
    static char *kwlist[] = {"logits", "target", "lse", "ignore_index", "scale", "grad", NULL};
    PyObject *logits, *target, *lse_obj, *grad_obj = Py_None;
    long long ignore_index;
    double scale;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOLd|O:cross_entropy_backward", kwlist, &logits, &target,
                                     &lse_obj, &ignore_index, &scale, &grad_obj))
        return NULL;
    if (check_finite(func, "scale", scale) < 0)
        return NULL;
    CrossEntropyOperands op;
    if (ce_operands_parse(func, logits, target, ignore_index, &op) < 0)
        return NULL;
    KArray lse = {0}, grad = {0};
    PyObject *dlogits = NULL;
    npy_intp vshape[1] = {op.n};
    if (get_array(func, "lse", lse_obj, NPY_FLOAT64, 1, vshape, "(N,)", IN_ARRAY, &lse) < 0 ||
        get_optional_array(func, "grad", grad_obj, op.typenum, 1, vshape, "(N,)", IN_ARRAY, &grad) < 0 ||
        !(dlogits = new_matrix(op.typenum, op.n, op.c)))
        goto fail;
    const ptrdiff_t ldd = op.c > 0 ? op.c : 1;
    const void *x = PyArray_DATA(op.logits.arr), *lse_data = PyArray_DATA(lse.arr), *g = data_or_null(&grad);
    const int64_t *t = PyArray_DATA(op.target.arr);
    void *out = PyArray_DATA((PyArrayObject *)dlogits);
    CALL_KERNEL_VOID(op.typenum, lorac_cross_entropy_backward, op.n, op.c, x, op.logits.ld, t, ignore_index,
                     lse_data, scale, g, out, ldd);
    karray_release(&lse), karray_release(&grad);
    ce_operands_release(&op);
    return dlogits;
fail:
    Py_XDECREF(dlogits);
    karray_release(&lse), karray_release(&grad);
    ce_operands_release(&op);
    return NULL;
}

/* Validates pred (n,) and target (n,) of the same float dtype. */
static int mse_operands_parse(const char *func, PyObject *pred, PyObject *target, int *typenum, KArray *p,
                              KArray *t)
{
    p->arr = t->arr = NULL;
    if (train_float_typenum(func, "pred", pred, 1, typenum) < 0)
        return -1;
    npy_intp shape[1] = {PyArray_DIMS((PyArrayObject *)pred)[0]};
    if (get_array(func, "pred", pred, *typenum, 1, shape, "(n,)", IN_ARRAY, p) < 0 ||
        get_array(func, "target", target, *typenum, 1, shape, "(n,)", IN_ARRAY, t) < 0) {
        karray_release(p), karray_release(t);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(mse_forward_doc,
"mse_forward(pred, target, elementwise=False) -> (total, squares)\n\n"
"pred, target (n,) float: total = sum (pred - target)^2 (accumulated in double);\n"
"squares (n,) = (pred - target)^2 when elementwise, else None.");

static PyObject *py_mse_forward(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static const char *func = "mse_forward";
    static char *kwlist[] = {"pred", "target", "elementwise", NULL};
    PyObject *pred, *target;
    int elementwise = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|p:mse_forward", kwlist, &pred, &target, &elementwise))
        return NULL;
    int typenum;
    KArray p, t;
    if (mse_operands_parse(func, pred, target, &typenum, &p, &t) < 0)
        return NULL;
    const npy_intp n = PyArray_DIMS(p.arr)[0];
    PyObject *squares = elementwise ? new_vector(typenum, n) : (Py_INCREF(Py_None), Py_None);
    if (!squares) {
        karray_release(&p), karray_release(&t);
        return NULL;
    }
    void *out = elementwise ? PyArray_DATA((PyArrayObject *)squares) : NULL;
    double total;
    CALL_KERNEL_INTO(total, typenum, lorac_mse_forward, n, PyArray_DATA(p.arr), PyArray_DATA(t.arr), out);
    karray_release(&p), karray_release(&t);
    return Py_BuildValue("(dN)", total, squares);
}

PyDoc_STRVAR(mse_backward_doc,
"mse_backward(pred, target, scale, grad=None) -> dpred\n\n"
"dpred (n,) = scale * 2 (pred - target) * grad (grad (n,) or None for 1).");

static PyObject *py_mse_backward(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static const char *func = "mse_backward";
    static char *kwlist[] = {"pred", "target", "scale", "grad", NULL};
    PyObject *pred, *target, *grad_obj = Py_None;
    double scale;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOd|O:mse_backward", kwlist, &pred, &target, &scale,
                                     &grad_obj))
        return NULL;
    if (check_finite(func, "scale", scale) < 0)
        return NULL;
    int typenum;
    KArray p, t, grad = {0};
    if (mse_operands_parse(func, pred, target, &typenum, &p, &t) < 0)
        return NULL;
    PyObject *dpred = NULL;
    npy_intp shape[1] = {PyArray_DIMS(p.arr)[0]};
    if (get_optional_array(func, "grad", grad_obj, typenum, 1, shape, "(n,)", IN_ARRAY, &grad) < 0 ||
        !(dpred = new_vector(typenum, shape[0])))
        goto done;
    const void *g = data_or_null(&grad);
    void *out = PyArray_DATA((PyArrayObject *)dpred);
    CALL_KERNEL_VOID(typenum, lorac_mse_backward, shape[0], PyArray_DATA(p.arr), PyArray_DATA(t.arr), scale, g,
                     out);
done:
    karray_release(&p), karray_release(&t), karray_release(&grad);
    return dpred;
}

/* -- activations ---------------------------------------------------------- */

/* "relu", "gelu", "gelu_tanh", "tanh" -> kind. */
static int parse_activation(const char *func, const char *name, LoracActivation *kind)
{
    static const struct { const char *name; LoracActivation kind; } table[] = {
        {"relu", LORAC_ACT_RELU}, {"gelu", LORAC_ACT_GELU},
        {"gelu_tanh", LORAC_ACT_GELU_TANH}, {"tanh", LORAC_ACT_TANH},
    };
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++) {
        if (strcmp(name, table[i].name) == 0) {
            *kind = table[i].kind;
            return 0;
        }
    }
    PyErr_Format(PyExc_ValueError, "%s(): 'kind' must be one of 'relu', 'gelu', 'gelu_tanh', 'tanh', "
                 "got '%s'", func, name);
    return -1;
}

PyDoc_STRVAR(activation_forward_doc,
"activation_forward(kind, x) -> y\n\n"
"y (n,) = f(x) for x (n,) float; kind: 'relu', 'gelu' (exact, erf), 'gelu_tanh'\n"
"(torch's approximate='tanh') or 'tanh'.");

static PyObject *py_activation_forward(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static const char *func = "activation_forward";
    static char *kwlist[] = {"kind", "x", NULL};
    const char *kind_name;
    PyObject *x_obj;
    LoracActivation kind;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "sO:activation_forward", kwlist, &kind_name, &x_obj) ||
        parse_activation(func, kind_name, &kind) < 0)
        return NULL;
    int typenum;
    if (train_float_typenum(func, "x", x_obj, 1, &typenum) < 0)
        return NULL;
    npy_intp shape[1] = {PyArray_DIMS((PyArrayObject *)x_obj)[0]};
    KArray x;
    if (get_array(func, "x", x_obj, typenum, 1, shape, "(n,)", IN_ARRAY, &x) < 0)
        return NULL;
    PyObject *y = new_vector(typenum, shape[0]);
    if (y) {
        const void *xd = PyArray_DATA(x.arr);
        void *yd = PyArray_DATA((PyArrayObject *)y);
        CALL_KERNEL_VOID(typenum, lorac_activation_forward, kind, shape[0], xd, yd);
    }
    karray_release(&x);
    return y;
}

PyDoc_STRVAR(activation_backward_doc,
"activation_backward(kind, saved, grad_output) -> grad_input\n\n"
"grad_input (n,) = grad_output * f'(.) for saved, grad_output (n,) float, where saved\n"
"is the forward's OUTPUT for 'relu' and 'tanh' and its INPUT for 'gelu', 'gelu_tanh'.");

static PyObject *py_activation_backward(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static const char *func = "activation_backward";
    static char *kwlist[] = {"kind", "saved", "grad_output", NULL};
    const char *kind_name;
    PyObject *saved_obj, *g_obj;
    LoracActivation kind;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "sOO:activation_backward", kwlist, &kind_name, &saved_obj,
                                     &g_obj) ||
        parse_activation(func, kind_name, &kind) < 0)
        return NULL;
    int typenum;
    if (train_float_typenum(func, "saved", saved_obj, 1, &typenum) < 0)
        return NULL;
    npy_intp shape[1] = {PyArray_DIMS((PyArrayObject *)saved_obj)[0]};
    KArray saved = {0}, g = {0};
    PyObject *dx = NULL;
    if (get_array(func, "saved", saved_obj, typenum, 1, shape, "(n,)", IN_ARRAY, &saved) < 0 ||
        get_array(func, "grad_output", g_obj, typenum, 1, shape, "(n,)", IN_ARRAY, &g) < 0 ||
        !(dx = new_vector(typenum, shape[0])))
        goto done;
    const void *sd = PyArray_DATA(saved.arr), *gd = PyArray_DATA(g.arr);
    void *out = PyArray_DATA((PyArrayObject *)dx);
    CALL_KERNEL_VOID(typenum, lorac_activation_backward, kind, shape[0], sd, gd, out);
done:
    karray_release(&saved), karray_release(&g);
    return dx;
}

/* -- LayerNorm ------------------------------------------------------------ */

PyDoc_STRVAR(layernorm_forward_doc,
"layernorm_forward(x, weight, bias, eps) -> (y, mean, rstd)\n\n"
"LayerNorm over the last dimension of x (N, D): y (N, D) = (x - mean) * rstd * weight\n"
"+ bias with weight, bias (D,) or None; mean, rstd (N,) are kept for backward.");

static PyObject *py_layernorm_forward(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static const char *func = "layernorm_forward";
    static char *kwlist[] = {"x", "weight", "bias", "eps", NULL};
    PyObject *x_obj, *w_obj, *b_obj;
    double eps;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOd:layernorm_forward", kwlist, &x_obj, &w_obj, &b_obj,
                                     &eps))
        return NULL;
    if (check_range(func, "eps", eps, 0, INFINITY, 1) < 0)
        return NULL;
    int typenum;
    if (train_float_typenum(func, "x", x_obj, 2, &typenum) < 0)
        return NULL;
    const npy_intp n = PyArray_DIMS((PyArrayObject *)x_obj)[0], d = PyArray_DIMS((PyArrayObject *)x_obj)[1];
    npy_intp xshape[2] = {n, d}, dshape[1] = {d};
    KArray x = {0}, w = {0}, b = {0};
    PyObject *y = NULL, *mean = NULL, *rstd = NULL;
    if (get_array(func, "x", x_obj, typenum, 2, xshape, "(N, D)", IN_ARRAY, &x) < 0 ||
        get_optional_array(func, "weight", w_obj, typenum, 1, dshape, "(D,)", IN_ARRAY, &w) < 0 ||
        get_optional_array(func, "bias", b_obj, typenum, 1, dshape, "(D,)", IN_ARRAY, &b) < 0 ||
        !(y = new_matrix(typenum, n, d)) || !(mean = new_vector(typenum, n)) || !(rstd = new_vector(typenum, n)))
        goto fail;
    const void *xd = PyArray_DATA(x.arr), *wd = data_or_null(&w), *bd = data_or_null(&b);
    void *yd = PyArray_DATA((PyArrayObject *)y), *md = PyArray_DATA((PyArrayObject *)mean);
    void *rd = PyArray_DATA((PyArrayObject *)rstd);
    const ptrdiff_t ldy = d > 0 ? d : 1;
    CALL_KERNEL_VOID(typenum, lorac_layernorm_forward, n, d, eps, xd, x.ld, wd, bd, yd, ldy, md, rd);
    karray_release(&x), karray_release(&w), karray_release(&b);
    return Py_BuildValue("(NNN)", y, mean, rstd);
fail:
    Py_XDECREF(y), Py_XDECREF(mean), Py_XDECREF(rstd);
    karray_release(&x), karray_release(&w), karray_release(&b);
    return NULL;
}

PyDoc_STRVAR(layernorm_backward_doc,
"layernorm_backward(grad_output, x, weight, mean, rstd, need_input_grad=True,\n"
"                   grad_weight=None, grad_bias=None) -> grad_input or None\n\n"
"Backward of layernorm_forward for grad_output (N, D).  grad_weight, grad_bias (D,)\n"
"are None (frozen: nothing computed) or accumulated in place.");

static PyObject *py_layernorm_backward(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static const char *func = "layernorm_backward";
    static char *kwlist[] = {"grad_output", "x", "weight", "mean", "rstd", "need_input_grad", "grad_weight",
                             "grad_bias", NULL};
    PyObject *g_obj, *x_obj, *w_obj, *m_obj, *r_obj, *gw_obj = Py_None, *gb_obj = Py_None;
    int need_input_grad = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOO|pOO:layernorm_backward", kwlist, &g_obj, &x_obj,
                                     &w_obj, &m_obj, &r_obj, &need_input_grad, &gw_obj, &gb_obj))
        return NULL;
    int typenum;
    if (train_float_typenum(func, "x", x_obj, 2, &typenum) < 0)
        return NULL;
    const npy_intp n = PyArray_DIMS((PyArrayObject *)x_obj)[0], d = PyArray_DIMS((PyArrayObject *)x_obj)[1];
    npy_intp xshape[2] = {n, d}, dshape[1] = {d}, nshape[1] = {n};
    KArray g = {0}, x = {0}, w = {0}, m = {0}, r = {0}, gw = {0}, gb = {0};
    PyObject *dx = NULL;
    if (get_array(func, "x", x_obj, typenum, 2, xshape, "(N, D)", IN_ARRAY, &x) < 0 ||
        get_array(func, "grad_output", g_obj, typenum, 2, xshape, "(N, D)", IN_ARRAY, &g) < 0 ||
        get_optional_array(func, "weight", w_obj, typenum, 1, dshape, "(D,)", IN_ARRAY, &w) < 0 ||
        get_array(func, "mean", m_obj, typenum, 1, nshape, "(N,)", IN_ARRAY, &m) < 0 ||
        get_array(func, "rstd", r_obj, typenum, 1, nshape, "(N,)", IN_ARRAY, &r) < 0 ||
        get_optional_array(func, "grad_weight", gw_obj, typenum, 1, dshape, "(D,)", INOUT_ARRAY, &gw) < 0 ||
        get_optional_array(func, "grad_bias", gb_obj, typenum, 1, dshape, "(D,)", INOUT_ARRAY, &gb) < 0)
        goto done;
    AliasArg alias_in[] = {ALIAS_KARRAY("grad_output", g), ALIAS_KARRAY("x", x), ALIAS_KARRAY("weight", w),
                           ALIAS_KARRAY("mean", m), ALIAS_KARRAY("rstd", r)};
    AliasArg alias_out[] = {ALIAS_KARRAY("grad_weight", gw), ALIAS_KARRAY("grad_bias", gb)};
    if (resolve_aliasing(func, alias_in, ALIAS_COUNT(alias_in), alias_out, ALIAS_COUNT(alias_out)) < 0)
        goto done;
    if (need_input_grad && !(dx = new_matrix(typenum, n, d)))
        goto done;
    const void *gd = PyArray_DATA(g.arr), *xd = PyArray_DATA(x.arr), *wd = data_or_null(&w);
    const void *md = PyArray_DATA(m.arr), *rd = PyArray_DATA(r.arr);
    void *dxd = dx ? PyArray_DATA((PyArrayObject *)dx) : NULL, *gwd = data_or_null(&gw), *gbd = data_or_null(&gb);
    const ptrdiff_t lddx = d > 0 ? d : 1;
    int status;
    CALL_KERNEL_INTO(status, typenum, lorac_layernorm_backward, n, d, gd, g.ld, xd, x.ld, wd, md, rd, dxd, lddx,
                     gwd, gbd);
    if (status != 0) {
        PyErr_NoMemory();
        Py_CLEAR(dx);
        goto done;
    }
    if (!dx) {
        Py_INCREF(Py_None);
        dx = Py_None;
    }
done:
    karray_release(&g), karray_release(&x), karray_release(&w), karray_release(&m), karray_release(&r);
    karray_release(&gw), karray_release(&gb);
    return dx;
}

/* ======================== end of training toolkit ======================== */

/* ------------------------------------------------------------------------ */
/* ---- Embedding ----                                                       */
/* ------------------------------------------------------------------------ */

_Static_assert(sizeof(npy_intp) == sizeof(ptrdiff_t), "kernels read indices as ptrdiff_t");

/* Indices of any shape and integer dtype -> a C-contiguous intp array (a copy
 * only when needed), every entry checked to lie in [0, num) before any kernel
 * runs.  TypeError for non-integer dtypes (bool included), IndexError for an
 * index out of range.  *count gets the number of indices. */
static int get_indices(const char *func, PyObject *obj, npy_intp num, PyArrayObject **out, npy_intp *count)
{
    *out = NULL;
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s(): 'indices' must be a numpy.ndarray of an integer dtype, got %s",
                     func, Py_TYPE(obj)->tp_name);
        return -1;
    }
    PyArrayObject *arr = (PyArrayObject *)obj;
    if (!PyArray_ISINTEGER(arr)) {
        PyObject *got = PyObject_Str((PyObject *)PyArray_DESCR(arr));
        PyErr_Format(PyExc_TypeError, "%s(): 'indices' must have an integer dtype, got %S", func,
                     got ? got : Py_None);
        Py_XDECREF(got);
        return -1;
    }
    /* refused before the conversion below allocates anything (issue 7: a
     * zero-stride view can claim 2**32 entries without any memory) */
    const npy_intp n = PyArray_SIZE(arr);
    if (n > LORAC_BLAS_INT_MAX) {
        PyErr_Format(PyExc_ValueError, "%s(): 'indices' has %lld entries; BLAS's 32-bit integers allow at most %d",
                     func, (long long)n, LORAC_BLAS_INT_MAX);
        return -1;
    }
    /* uint64 entries >= 2**63 turn negative in intp: print those unsigned */
    const int wide_unsigned = PyArray_ISUNSIGNED(arr) && PyArray_ITEMSIZE(arr) >= (int)sizeof(npy_intp);
    PyArrayObject *idx = (PyArrayObject *)PyArray_FROMANY(obj, NPY_INTP, 0, 0,
                                                          NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED |
                                                              NPY_ARRAY_FORCECAST);
    if (!idx)
        return -1;
    const npy_intp *v = PyArray_DATA(idx);
    for (npy_intp i = 0; i < n; i++) {
        if (v[i] < 0 || v[i] >= num) {
            if (wide_unsigned && v[i] < 0)
                PyErr_Format(PyExc_IndexError,
                             "%s(): 'indices' must lie in [0, %lld) (num_embeddings), got %llu at flat position %lld",
                             func, (long long)num, (unsigned long long)v[i], (long long)i);
            else
                PyErr_Format(PyExc_IndexError,
                             "%s(): 'indices' must lie in [0, %lld) (num_embeddings), got %lld at flat position %lld",
                             func, (long long)num, (long long)v[i], (long long)i);
            Py_DECREF(idx);
            return -1;
        }
    }
    *out = idx;
    *count = n;
    return 0;
}

/* Validated operands of a LoRA Embedding call (see lora_embedding.h). */
typedef struct {
    int typenum;
    npy_intp n, num, dim, r;
    PyArrayObject *idx;
    KArray w, a, b;
} EmbeddingOperands;

static void embedding_operands_release(EmbeddingOperands *op)
{
    Py_CLEAR(op->idx);
    karray_release(&op->w);
    karray_release(&op->a);
    karray_release(&op->b);
}

/* Validates weight (num, dim), indices, lora_A (r, num) / lora_B (dim, r). */
static int embedding_operands_parse(const char *func, PyObject *indices, PyObject *weight, PyObject *lora_a,
                                    PyObject *lora_b, EmbeddingOperands *op)
{
    memset(op, 0, sizeof *op);
    if (float_typenum(func, "weight", weight, &op->typenum) < 0)
        return -1;
    const npy_intp *wd = PyArray_DIMS((PyArrayObject *)weight);
    op->num = wd[0];
    op->dim = wd[1];
    npy_intp wshape[2] = {wd[0], wd[1]};
    if (get_array(func, "weight", weight, op->typenum, 2, wshape, "(num_embeddings, embedding_dim)", IN_ARRAY,
                  &op->w) < 0)
        goto fail;
    if (get_indices(func, indices, op->num, &op->idx, &op->n) < 0)
        goto fail;
    if ((lora_a == Py_None) != (lora_b == Py_None)) {
        PyErr_Format(PyExc_ValueError, "%s(): 'lora_A' and 'lora_B' must both be arrays or both be None",
                     func);
        goto fail;
    }
    if (lora_a != Py_None) {
        npy_intp ashape[2] = {ANY_DIM, op->num};
        if (get_array(func, "lora_A", lora_a, op->typenum, 2, ashape, "(r, num_embeddings)", IN_ARRAY,
                      &op->a) < 0)
            goto fail;
        op->r = PyArray_DIMS(op->a.arr)[0];
        npy_intp bshape[2] = {op->dim, op->r};
        if (get_array(func, "lora_B", lora_b, op->typenum, 2, bshape, "(embedding_dim, r)", IN_ARRAY,
                      &op->b) < 0)
            goto fail;
    }
    return 0;
fail:
    embedding_operands_release(op);
    return -1;
}

static LoraEmbedding embedding_kernel_args(const EmbeddingOperands *op, double scaling, npy_intp padding_idx)
{
    LoraEmbedding E = {
        .n = op->n, .num = op->num, .dim = op->dim, .r = op->r,
        .scaling = scaling, .padding_idx = padding_idx,
        .idx = PyArray_DATA(op->idx),
        .w = data_or_null(&op->w), .ldw = op->w.ld,
        .a = data_or_null(&op->a), .lda = op->a.ld,
        .b = data_or_null(&op->b), .ldb = op->b.ld,
    };
    return E;
}

PyDoc_STRVAR(embedding_forward_doc,
"embedding_forward(indices, weight, lora_A, lora_B, scaling) -> (y, u)\n\n"
"y[i] = W0[idx[i]] + scaling * A[:, idx[i]]^T B^T for the N = indices.size indices\n"
"(any shape and integer dtype, read flat, each in [0, num_embeddings): IndexError\n"
"otherwise, before anything is computed), W0 (num_embeddings, embedding_dim),\n"
"A (r, num_embeddings), B (embedding_dim, r) (both None: no adapter).\n"
"Returns y (N, embedding_dim) and u = A^T[idx] (N, r) (None without adapter).");

static PyObject *py_embedding_forward(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static const char *func = "embedding_forward";
    static char *kwlist[] = {"indices", "weight", "lora_A", "lora_B", "scaling", NULL};
    PyObject *indices, *weight, *lora_a, *lora_b;
    double scaling;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOd:embedding_forward", kwlist, &indices, &weight,
                                     &lora_a, &lora_b, &scaling))
        return NULL;
    if (check_finite(func, "scaling", scaling) < 0)
        return NULL;
    EmbeddingOperands op;
    if (embedding_operands_parse(func, indices, weight, lora_a, lora_b, &op) < 0)
        return NULL;
    PyObject *y = new_matrix(op.typenum, op.n, op.dim);
    PyObject *u = op.a.arr ? new_matrix(op.typenum, op.n, op.r) : (Py_INCREF(Py_None), Py_None);
    if (!y || !u) {
        Py_XDECREF(y);
        Py_XDECREF(u);
        embedding_operands_release(&op);
        return NULL;
    }
    LoraEmbedding E = embedding_kernel_args(&op, scaling, -1);
    void *u_data = op.a.arr ? PyArray_DATA((PyArrayObject *)u) : NULL;
    ptrdiff_t ldu = op.r > 0 ? op.r : 1, ldy = op.dim > 0 ? op.dim : 1;
    CALL_KERNEL_VOID(op.typenum, lorac_embedding_forward, &E, u_data, ldu, PyArray_DATA((PyArrayObject *)y), ldy);
    embedding_operands_release(&op);
    return Py_BuildValue("(NN)", y, u);
}

/* None -> -1; an int in [0, num) -> itself; anything else: TypeError / ValueError. */
static int parse_padding_idx(const char *func, PyObject *obj, npy_intp num, npy_intp *out)
{
    *out = -1;
    if (obj == Py_None)
        return 0;
    if (!PyLong_Check(obj) || PyBool_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s(): 'padding_idx' must be None or an int, got %s", func,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    long long p = PyLong_AsLongLong(obj);
    if (p == -1 && PyErr_Occurred())
        return -1;
    if (p < 0 || p >= num) {
        PyErr_Format(PyExc_ValueError, "%s(): 'padding_idx' must be None or in [0, %lld), got %lld", func,
                     (long long)num, p);
        return -1;
    }
    *out = (npy_intp)p;
    return 0;
}

PyDoc_STRVAR(embedding_backward_doc,
"embedding_backward(grad_output, indices, weight, lora_A, lora_B, u, scaling, padding_idx,\n"
"                   grad_weight, grad_lora_A, grad_lora_B) -> None\n\n"
"Backward of embedding_forward for grad_output (N, embedding_dim).  Each grad_* is None\n"
"(frozen: nothing computed) or an array of its parameter's shape, accumulated in place:\n"
"repeated indices add up; positions equal to padding_idx (None or an int) add nothing\n"
"to grad_weight or grad_lora_A.  u is the (N, r) array embedding_forward returned.");

static PyObject *py_embedding_backward(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static const char *func = "embedding_backward";
    static char *kwlist[] = {"grad_output", "indices", "weight", "lora_A", "lora_B", "u", "scaling",
                             "padding_idx", "grad_weight", "grad_lora_A", "grad_lora_B", NULL};
    PyObject *g_obj, *indices, *weight, *lora_a, *lora_b, *u_obj, *pad_obj = Py_None;
    PyObject *gw_obj = Py_None, *ga_obj = Py_None, *gb_obj = Py_None;
    double scaling;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOOd|OOOO:embedding_backward", kwlist, &g_obj,
                                     &indices, &weight, &lora_a, &lora_b, &u_obj, &scaling, &pad_obj, &gw_obj,
                                     &ga_obj, &gb_obj))
        return NULL;
    if (check_finite(func, "scaling", scaling) < 0)
        return NULL;
    EmbeddingOperands op;
    if (embedding_operands_parse(func, indices, weight, lora_a, lora_b, &op) < 0)
        return NULL;
    KArray g = {0}, u = {0}, gw = {0}, ga = {0}, gbb = {0};
    npy_intp padding_idx;
    const int lora = op.a.arr != NULL;
    npy_intp gshape[2] = {op.n, op.dim}, ushape[2] = {op.n, op.r};
    npy_intp wshape[2] = {op.num, op.dim}, ashape[2] = {op.r, op.num}, lbshape[2] = {op.dim, op.r};
    if (parse_padding_idx(func, pad_obj, op.num, &padding_idx) < 0)
        goto fail;
    if (get_array(func, "grad_output", g_obj, op.typenum, 2, gshape, "(N, embedding_dim)", IN_ARRAY, &g) < 0)
        goto fail;
    if (lora && get_array(func, "u", u_obj, op.typenum, 2, ushape, "(N, r)", IN_ARRAY, &u) < 0)
        goto fail;
    if (get_optional_array(func, "grad_weight", gw_obj, op.typenum, 2, wshape,
                           "(num_embeddings, embedding_dim)", INOUT_ARRAY, &gw) < 0)
        goto fail;
    if (lora && (get_optional_array(func, "grad_lora_A", ga_obj, op.typenum, 2, ashape, "(r, num_embeddings)",
                                    INOUT_ARRAY, &ga) < 0 ||
                 get_optional_array(func, "grad_lora_B", gb_obj, op.typenum, 2, lbshape, "(embedding_dim, r)",
                                    INOUT_ARRAY, &gbb) < 0))
        goto fail;
    if (!lora && (ga_obj != Py_None || gb_obj != Py_None)) {
        PyErr_Format(PyExc_ValueError, "%s(): grad_lora_A/grad_lora_B given but lora_A/lora_B are None", func);
        goto fail;
    }
    /* the indices too: an index array sharing a gradient's bytes would change under the kernel */
    AliasArg alias_in[] = {ALIAS_KARRAY("grad_output", g), ALIAS_ARRAY("indices", op.idx),
                           ALIAS_KARRAY("weight", op.w), ALIAS_KARRAY("lora_A", op.a), ALIAS_KARRAY("lora_B", op.b),
                           ALIAS_KARRAY("u", u)};
    AliasArg alias_out[] = {ALIAS_KARRAY("grad_weight", gw), ALIAS_KARRAY("grad_lora_A", ga),
                            ALIAS_KARRAY("grad_lora_B", gbb)};
    if (resolve_aliasing(func, alias_in, ALIAS_COUNT(alias_in), alias_out, ALIAS_COUNT(alias_out)) < 0)
        goto fail;

    LoraEmbedding E = embedding_kernel_args(&op, scaling, padding_idx);
    LoraEmbeddingGrads G = {
        .dw = data_or_null(&gw), .lddw = gw.ld,
        .da = data_or_null(&ga), .ldda = ga.ld,
        .db = data_or_null(&gbb), .lddb = gbb.ld,
    };
    const void *u_data = data_or_null(&u);
    int status;
    CALL_KERNEL_INTO(status, op.typenum, lorac_embedding_backward, &E, u_data, u.ld, data_or_null(&g), g.ld, &G);
    if (status != 0) {
        PyErr_NoMemory();
        goto fail;
    }
    karray_release(&g), karray_release(&u), karray_release(&gw), karray_release(&ga), karray_release(&gbb);
    embedding_operands_release(&op);
    Py_RETURN_NONE;
fail:
    karray_release(&g), karray_release(&u), karray_release(&gw), karray_release(&ga), karray_release(&gbb);
    embedding_operands_release(&op);
    return NULL;
}

/* ------------------------------------------------------------------------ */
/* ---- MergedLinear ----                                                    */
/* ------------------------------------------------------------------------ */

/* Validated operands of a LoRA MergedLinear call (see lora_merged_linear.h):
 * the Linear operands without adapter, the groups and the stacked adapter. */
typedef struct {
    LinearOperands lin;   /* x, weight, bias, mask; lin.r stays 0 */
    npy_intp groups, n_enabled, r;
    ptrdiff_t *enabled;   /* (n_enabled) block indices, malloc'ed */
    KArray a, b;
} MergedOperands;

static void merged_operands_release(MergedOperands *op)
{
    linear_operands_release(&op->lin);
    free(op->enabled);
    op->enabled = NULL;
    karray_release(&op->a);
    karray_release(&op->b);
}

/* enable_lora: a non-empty sequence of bools whose length divides out. */
static int parse_enable_lora(const char *func, PyObject *obj, npy_intp out, MergedOperands *op)
{
    /* the length first (issue 7): a lazy sequence (range(10**12), a zero-stride
     * array) must be refused before PySequence_Fast expands it into a list */
    const Py_ssize_t len = PySequence_Check(obj) ? PySequence_Size(obj) : 0;
    if (len < 0)
        return -1;
    if (len > 0 && (out % len != 0 || (out == 0 && len > LORAC_MAX_LIST_LEN))) {
        PyErr_Format(PyExc_ValueError, "%s(): len(enable_lora) = %zd must divide out_features = %lld (and be at "
                     "most %d)", func, len, (long long)out, LORAC_MAX_LIST_LEN);
        return -1;
    }
    PyObject *seq = PySequence_Fast(obj, "");
    if (!seq) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s(): 'enable_lora' must be a sequence of bools, got %s", func,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    const Py_ssize_t groups = PySequence_Fast_GET_SIZE(seq);
    if (groups == 0) {
        PyErr_Format(PyExc_ValueError, "%s(): 'enable_lora' must be a non-empty sequence of bools, got an empty one",
                     func);
        goto fail;
    }
    if (out % groups != 0) {
        PyErr_Format(PyExc_ValueError, "%s(): len(enable_lora) = %zd must divide out_features = %lld", func,
                     groups, (long long)out);
        goto fail;
    }
    op->enabled = malloc(sizeof(ptrdiff_t) * (size_t)groups);
    if (!op->enabled) {
        PyErr_NoMemory();
        goto fail;
    }
    op->groups = groups;
    op->n_enabled = 0;
    for (Py_ssize_t i = 0; i < groups; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyBool_Check(item) && !PyArray_IsScalar(item, Bool)) {
            PyErr_Format(PyExc_TypeError, "%s(): 'enable_lora' must be a sequence of bools, got %s at position %zd",
                         func, Py_TYPE(item)->tp_name, i);
            goto fail;
        }
        if (PyObject_IsTrue(item))
            op->enabled[op->n_enabled++] = i;
    }
    Py_DECREF(seq);
    return 0;
fail:
    Py_DECREF(seq);
    return -1;
}

/* Validates x, weight, bias, mask (as Linear), enable_lora, and lora_A
 * (n_enabled * r, in) / lora_B (n_enabled * out / groups, r) or both None. */
static int merged_operands_parse(const char *func, PyObject *x, PyObject *weight, PyObject *bias,
                                 PyObject *lora_a, PyObject *lora_b, PyObject *enable_lora, PyObject *mask,
                                 int fan_in_fan_out, MergedOperands *op)
{
    memset(op, 0, sizeof *op);
    if (linear_operands_parse(func, x, weight, bias, Py_None, Py_None, mask, fan_in_fan_out, &op->lin) < 0)
        return -1;
    const npy_intp in = op->lin.in, out = op->lin.out;
    if (parse_enable_lora(func, enable_lora, out, op) < 0)
        goto fail;
    if ((lora_a == Py_None) != (lora_b == Py_None)) {
        PyErr_Format(PyExc_ValueError, "%s(): 'lora_A' and 'lora_B' must both be arrays or both be None",
                     func);
        goto fail;
    }
    if (lora_a == Py_None)
        return 0;
    if (op->n_enabled == 0) {
        PyErr_Format(PyExc_ValueError, "%s(): 'lora_A'/'lora_B' given but enable_lora has no True entry", func);
        goto fail;
    }
    npy_intp ashape[2] = {ANY_DIM, in};
    if (get_array(func, "lora_A", lora_a, op->lin.typenum, 2, ashape, "(r * n_enabled, in)", IN_ARRAY,
                  &op->a) < 0)
        goto fail;
    const npy_intp rows = PyArray_DIMS(op->a.arr)[0];
    if (rows % op->n_enabled != 0) {
        PyErr_Format(PyExc_ValueError,
                     "%s(): 'lora_A' must have shape (r * n_enabled, in) with n_enabled = %lld, "
                     "got %lld rows (not a multiple)",
                     func, (long long)op->n_enabled, (long long)rows);
        goto fail;
    }
    op->r = rows / op->n_enabled;
    npy_intp bshape[2] = {op->n_enabled * (out / op->groups), op->r};
    if (get_array(func, "lora_B", lora_b, op->lin.typenum, 2, bshape, "(out / len(enable_lora) * n_enabled, r)",
                  IN_ARRAY, &op->b) < 0)
        goto fail;
    return 0;
fail:
    merged_operands_release(op);
    return -1;
}

static LoraMergedLinear merged_kernel_args(const MergedOperands *op, int fan_in_fan_out, double scaling,
                                           double keep_scale)
{
    const LinearOperands *lin = &op->lin;
    LoraMergedLinear M = {
        .n = lin->n, .in = lin->in, .out = lin->out, .r = op->r,
        .groups = op->groups, .n_enabled = op->n_enabled, .enabled = op->enabled,
        .w_in_out = fan_in_fan_out, .scaling = scaling, .keep_scale = keep_scale,
        .x = data_or_null(&lin->x), .ldx = lin->x.ld,
        .w = data_or_null(&lin->w), .ldw = lin->w.ld,
        .bias = data_or_null(&lin->bias),
        .a = data_or_null(&op->a), .lda = op->a.ld,
        .b = data_or_null(&op->b), .ldb = op->b.ld,
        .mask = data_or_null(&lin->mask),
    };
    return M;
}

PyDoc_STRVAR(merged_linear_forward_doc,
"merged_linear_forward(x, weight, bias, lora_A, lora_B, enable_lora, scaling, fan_in_fan_out,\n"
"                      mask, keep_scale) -> (y, u)\n\n"
"loralib's MergedLinear: y = x W0^T + bias, plus for each enabled group g (enable_lora[g]\n"
"True; out splits into len(enable_lora) blocks of og rows) y[:, block g] += scaling *\n"
"(drop(x) A_e^T) B_e^T, where e counts the enabled groups, A_e = lora_A[e r:(e+1) r]\n"
"and B_e = lora_B[e og:(e+1) og].  lora_A (r * n_enabled, in), lora_B\n"
"(og * n_enabled, r), or both None (no adapter).  mask (N, in) uint8 or None.\n"
"Returns y (N, out) and u = drop(x) A^T (N, r * n_enabled) (None without adapter).");

static PyObject *py_merged_linear_forward(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static const char *func = "merged_linear_forward";
    static char *kwlist[] = {"x", "weight", "bias", "lora_A", "lora_B", "enable_lora", "scaling",
                             "fan_in_fan_out", "mask", "keep_scale", NULL};
    PyObject *x, *weight, *bias, *lora_a, *lora_b, *enable_lora, *mask = Py_None;
    double scaling, keep_scale = 1.0;
    int fan_in_fan_out;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOOdp|Od:merged_linear_forward", kwlist, &x, &weight,
                                     &bias, &lora_a, &lora_b, &enable_lora, &scaling, &fan_in_fan_out, &mask,
                                     &keep_scale))
        return NULL;
    if (check_finite(func, "scaling", scaling) < 0 || check_finite(func, "keep_scale", keep_scale) < 0)
        return NULL;
    MergedOperands op;
    if (merged_operands_parse(func, x, weight, bias, lora_a, lora_b, enable_lora, mask, fan_in_fan_out, &op) < 0)
        return NULL;
    const int typenum = op.lin.typenum;
    const npy_intp rank = op.r * op.n_enabled;
    PyObject *y = new_matrix(typenum, op.lin.n, op.lin.out);
    PyObject *u = op.a.arr ? new_matrix(typenum, op.lin.n, rank) : (Py_INCREF(Py_None), Py_None);
    if (!y || !u)
        goto fail;
    LoraMergedLinear M = merged_kernel_args(&op, fan_in_fan_out, scaling, keep_scale);
    void *u_data = op.a.arr ? PyArray_DATA((PyArrayObject *)u) : NULL;
    ptrdiff_t ldu = rank > 0 ? rank : 1, ldy = op.lin.out > 0 ? op.lin.out : 1;
    int status;
    CALL_KERNEL_INTO(status, typenum, lorac_merged_linear_forward, &M, u_data, ldu,
                     PyArray_DATA((PyArrayObject *)y), ldy);
    if (status != 0) {
        PyErr_NoMemory();
        goto fail;
    }
    merged_operands_release(&op);
    return Py_BuildValue("(NN)", y, u);
fail:
    Py_XDECREF(y);
    Py_XDECREF(u);
    merged_operands_release(&op);
    return NULL;
}

PyDoc_STRVAR(merged_linear_backward_doc,
"merged_linear_backward(grad_output, x, weight, lora_A, lora_B, u, enable_lora, scaling,\n"
"                       fan_in_fan_out, mask, keep_scale, need_input_grad, grad_weight,\n"
"                       grad_bias, grad_lora_A, grad_lora_B) -> grad_input or None\n\n"
"Backward of merged_linear_forward for grad_output (N, out).  Each grad_* is None (frozen:\n"
"nothing computed) or an array of its parameter's shape, accumulated in place.\n"
"u is the (N, r * n_enabled) array merged_linear_forward returned.");

static PyObject *py_merged_linear_backward(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static const char *func = "merged_linear_backward";
    static char *kwlist[] = {"grad_output", "x", "weight", "lora_A", "lora_B", "u", "enable_lora", "scaling",
                             "fan_in_fan_out", "mask", "keep_scale", "need_input_grad", "grad_weight",
                             "grad_bias", "grad_lora_A", "grad_lora_B", NULL};
    PyObject *x, *weight, *lora_a, *lora_b, *enable_lora, *mask = Py_None;
    GradArgs grad_args = {.gw = Py_None, .gbias = Py_None, .ga = Py_None, .gb = Py_None};
    double scaling, keep_scale = 1.0;
    int fan_in_fan_out, need_input_grad = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOOOdp|OdpOOOO:merged_linear_backward", kwlist,
                                     &grad_args.g, &x, &weight, &lora_a, &lora_b, &grad_args.u, &enable_lora,
                                     &scaling, &fan_in_fan_out, &mask, &keep_scale, &need_input_grad,
                                     &grad_args.gw, &grad_args.gbias, &grad_args.ga, &grad_args.gb))
        return NULL;
    if (check_finite(func, "scaling", scaling) < 0 || check_finite(func, "keep_scale", keep_scale) < 0)
        return NULL;
    MergedOperands op;
    if (merged_operands_parse(func, x, weight, Py_None, lora_a, lora_b, enable_lora, mask, fan_in_fan_out,
                              &op) < 0)
        return NULL;
    static const GradShapeWords words = {"(N, r * n_enabled)", "(r * n_enabled, in)",
                                         "(out / len(enable_lora) * n_enabled, r)"};
    const LinearOperands *lin = &op.lin;
    GradArrays ga;
    PyObject *dx = NULL;
    if (grad_arrays_parse(func, lin, &op.a, &op.b, fan_in_fan_out, &words, &grad_args, &ga) < 0) {
        merged_operands_release(&op);
        return NULL;
    }
    if (grad_arrays_resolve_aliasing(func, &op.lin, &op.a, &op.b, &ga) < 0)
        goto fail;
    if (need_input_grad && !(dx = new_matrix(lin->typenum, lin->n, lin->in)))
        goto fail;

    LoraMergedLinear M = merged_kernel_args(&op, fan_in_fan_out, scaling, keep_scale);
    LoraLinearGrads G = linear_grads_args(&ga, dx, lin->in);
    const void *u_data = data_or_null(&ga.u), *g_data = data_or_null(&ga.g);
    int status;
    CALL_KERNEL_INTO(status, lin->typenum, lorac_merged_linear_backward, &M, u_data, ga.u.ld, g_data, ga.g.ld, &G);
    if (status != 0) {
        PyErr_NoMemory();
        goto fail;
    }
    grad_arrays_release(&ga);
    merged_operands_release(&op);
    if (!dx)
        Py_RETURN_NONE;
    return dx;
fail:
    Py_XDECREF(dx);
    grad_arrays_release(&ga);
    merged_operands_release(&op);
    return NULL;
}

PyDoc_STRVAR(merged_linear_merge_doc,
"merged_linear_merge(weight, lora_A, lora_B, enable_lora, alpha, fan_in_fan_out) -> None\n\n"
"In place, per enabled group: the rows of W0 (out, in) of that group's output block\n"
"+= alpha * B_e A_e (its columns with fan_in_fan_out, W0 (in, out)).  alpha = scaling\n"
"merges, -scaling unmerges.");

static PyObject *py_merged_linear_merge(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static const char *func = "merged_linear_merge";
    static char *kwlist[] = {"weight", "lora_A", "lora_B", "enable_lora", "alpha", "fan_in_fan_out", NULL};
    PyObject *weight, *lora_a, *lora_b, *enable_lora;
    double alpha;
    int fan_in_fan_out;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOdp:merged_linear_merge", kwlist, &weight, &lora_a,
                                     &lora_b, &enable_lora, &alpha, &fan_in_fan_out))
        return NULL;
    if (check_finite(func, "alpha", alpha) < 0)
        return NULL;
    int typenum;
    if (float_typenum(func, "weight", weight, &typenum) < 0)
        return NULL;
    /* x is not used by a merge: an empty (0, in) batch stands in for it */
    const npy_intp *wd = PyArray_DIMS((PyArrayObject *)weight);
    npy_intp xdims[2] = {0, fan_in_fan_out ? wd[0] : wd[1]};
    PyObject *x = PyArray_ZEROS(2, xdims, typenum, 0);
    if (!x)
        return NULL;
    MergedOperands op;
    int parsed = merged_operands_parse(func, x, weight, Py_None, lora_a, lora_b, enable_lora, Py_None,
                                       fan_in_fan_out, &op);
    Py_DECREF(x);
    if (parsed < 0)
        return NULL;
    KArray w = {0};
    npy_intp wshape[2] = {wd[0], wd[1]};
    if (get_array(func, "weight", weight, typenum, 2, wshape, fan_in_fan_out ? "(in, out)" : "(out, in)",
                  INOUT_ARRAY, &w) < 0) {
        merged_operands_release(&op);
        return NULL;
    }
    AliasArg alias_in[] = {ALIAS_KARRAY("lora_A", op.a), ALIAS_KARRAY("lora_B", op.b)};
    AliasArg alias_out[] = {ALIAS_KARRAY("weight", w)};
    if (resolve_aliasing(func, alias_in, ALIAS_COUNT(alias_in), alias_out, ALIAS_COUNT(alias_out)) < 0) {
        karray_release(&w);
        merged_operands_release(&op);
        return NULL;
    }
    LoraMergedLinear M = merged_kernel_args(&op, fan_in_fan_out, 0.0, 1.0);
    CALL_KERNEL_VOID(typenum, lorac_merged_linear_merge, &M, alpha, PyArray_DATA(w.arr), w.ld);
    karray_release(&w);
    merged_operands_release(&op);
    Py_RETURN_NONE;
}

/* ======================================================================== */
/* ---- Many adapters (issue 6): mixed batch, MoLoRA ----                    */
/* Kernels: lora_multi.h (one batch, an adapter per row), lora_moe.h.        */
/* ======================================================================== */

/* The k adapters of a mixed-batch call, validated: arrays and kernel refs. */
typedef struct {
    Py_ssize_t k;
    KArray *a, *b;         /* (k) owned references */
    LoraAdapterRef *refs;  /* (k) */
} AdapterList;

static void adapter_list_release(AdapterList *l)
{
    for (Py_ssize_t j = 0; l->a && j < l->k; j++) {
        karray_release(&l->a[j]);
        karray_release(&l->b[j]);
    }
    free(l->a);
    free(l->b);
    free(l->refs);
    memset(l, 0, sizeof *l);
}

/* lora_As / lora_Bs: sequences of k arrays, scalings: a sequence of k finite
 * numbers.  Adapter j: A_j (groups * r_j, fan_in), B_j (groups * fan_out, r_j)
 * where `groups` is the number of stacked blocks (n_enabled; 1 for Linear and
 * Embedding) and fan_out the rows of B per block.  Hints name the shapes. */
static int adapter_list_parse(const char *func, PyObject *as_obj, PyObject *bs_obj, PyObject *sc_obj, int typenum,
                              npy_intp fan_in, npy_intp fan_out, npy_intp groups, const char *a_hint,
                              const char *b_hint, AdapterList *l)
{
    memset(l, 0, sizeof *l);
    PyObject *as = NULL, *bs = NULL, *sc = NULL;
    const char *names[3] = {"lora_As", "lora_Bs", "scalings"};
    PyObject *objs[3] = {as_obj, bs_obj, sc_obj}, **seqs[3] = {&as, &bs, &sc};
    for (int i = 0; i < 3; i++) {
        if (PyArray_Check(objs[i]) && i < 2) { /* an array is not a list of adapters */
            PyErr_Format(PyExc_TypeError, "%s(): '%s' must be a list of numpy arrays (one per adapter), got %s",
                         func, names[i], Py_TYPE(objs[i])->tp_name);
            goto fail;
        }
        /* the length first (issue 7): range(10**12) must not be expanded into a list */
        const Py_ssize_t len = PySequence_Check(objs[i]) ? PySequence_Size(objs[i]) : 0;
        if (len < 0)
            goto fail;
        if (len > LORAC_MAX_LIST_LEN) {
            PyErr_Format(PyExc_ValueError, "%s(): '%s' has %zd entries; at most %d adapters per call", func,
                         names[i], len, LORAC_MAX_LIST_LEN);
            goto fail;
        }
        /* a private list (issue 7): PySequence_Fast would hand back the caller's
         * own list, which a scalings[j].__float__ could empty while we hold
         * borrowed items of it (a use-after-free) */
        *seqs[i] = PySequence_List(objs[i]);
        if (!*seqs[i]) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "%s(): '%s' must be a sequence (one entry per adapter), got %s", func,
                         names[i], Py_TYPE(objs[i])->tp_name);
            goto fail;
        }
    }
    const Py_ssize_t k = PySequence_Fast_GET_SIZE(as);
    if (PySequence_Fast_GET_SIZE(bs) != k || PySequence_Fast_GET_SIZE(sc) != k) {
        PyErr_Format(PyExc_ValueError, "%s(): 'lora_As', 'lora_Bs' and 'scalings' must have the same length "
                     "(one entry per adapter), got %zd, %zd and %zd", func, k, PySequence_Fast_GET_SIZE(bs),
                     PySequence_Fast_GET_SIZE(sc));
        goto fail;
    }
    l->a = calloc((size_t)(k > 0 ? k : 1), sizeof(KArray));
    l->b = calloc((size_t)(k > 0 ? k : 1), sizeof(KArray));
    l->refs = calloc((size_t)(k > 0 ? k : 1), sizeof(LoraAdapterRef));
    if (!l->a || !l->b || !l->refs) {
        PyErr_NoMemory();
        goto fail;
    }
    l->k = k;
    for (Py_ssize_t j = 0; j < k; j++) {
        char name[48];
        snprintf(name, sizeof name, "lora_As[%zd]", j);
        npy_intp ashape[2] = {ANY_DIM, fan_in};
        if (get_array(func, name, PySequence_Fast_GET_ITEM(as, j), typenum, 2, ashape, a_hint, IN_ARRAY,
                      &l->a[j]) < 0)
            goto fail;
        const npy_intp rows = PyArray_DIMS(l->a[j].arr)[0];
        if (rows % groups != 0) {
            PyErr_Format(PyExc_ValueError, "%s(): '%s' must have shape %s with n_enabled = %lld, got %lld rows "
                         "(not a multiple)", func, name, a_hint, (long long)groups, (long long)rows);
            goto fail;
        }
        const npy_intp r = rows / groups;
        snprintf(name, sizeof name, "lora_Bs[%zd]", j);
        npy_intp bshape[2] = {groups * fan_out, r};
        if (get_array(func, name, PySequence_Fast_GET_ITEM(bs, j), typenum, 2, bshape, b_hint, IN_ARRAY,
                      &l->b[j]) < 0)
            goto fail;
        PyObject *s_item = PySequence_Fast_GET_ITEM(sc, j);
        if (!PyFloat_Check(s_item) && !PyLong_Check(s_item) && !PyArray_IsScalar(s_item, Number)) {
            PyErr_Format(PyExc_TypeError, "%s(): 'scalings[%zd]' must be a real number, got %s", func, j,
                         Py_TYPE(s_item)->tp_name);
            goto fail;
        }
        const double s = PyFloat_AsDouble(s_item);
        if (s == -1.0 && PyErr_Occurred())
            goto fail;
        snprintf(name, sizeof name, "scalings[%zd]", j);
        if (check_finite(func, name, s) < 0)
            goto fail;
        LoraAdapterRef ref = {
            .a = PyArray_DATA(l->a[j].arr), .lda = l->a[j].ld,
            .b = PyArray_DATA(l->b[j].arr), .ldb = l->b[j].ld,
            .r = r, .scaling = s,
        };
        l->refs[j] = ref;
    }
    Py_DECREF(as);
    Py_DECREF(bs);
    Py_DECREF(sc);
    return 0;
fail:
    Py_XDECREF(as);
    Py_XDECREF(bs);
    Py_XDECREF(sc);
    adapter_list_release(l);
    return -1;
}

/* ids: an integer ndarray of shape (n,), every entry in [-1, k) -> a
 * C-contiguous intp copy (or the array itself when already one). */
static int get_adapter_ids(const char *func, PyObject *obj, npy_intp n, npy_intp k, PyArrayObject **out)
{
    *out = NULL;
    if (!PyArray_Check(obj) || !PyArray_ISINTEGER((PyArrayObject *)obj)) {
        PyObject *got = PyArray_Check(obj) ? PyObject_Str((PyObject *)PyArray_DESCR((PyArrayObject *)obj))
                                           : PyUnicode_FromString(Py_TYPE(obj)->tp_name);
        PyErr_Format(PyExc_TypeError, "%s(): 'ids' must be a numpy.ndarray of an integer dtype, got %S", func,
                     got ? got : Py_None);
        Py_XDECREF(got);
        return -1;
    }
    if (PyArray_NDIM((PyArrayObject *)obj) != 1 || PyArray_DIMS((PyArrayObject *)obj)[0] != n) {
        char got[96];
        format_shape(got, sizeof got, PyArray_NDIM((PyArrayObject *)obj), PyArray_DIMS((PyArrayObject *)obj));
        PyErr_Format(PyExc_ValueError, "%s(): 'ids' must have shape (N,) = (%lld,) (one adapter per row), "
                     "got shape %s", func, (long long)n, got);
        return -1;
    }
    PyArrayObject *ids = (PyArrayObject *)PyArray_FROMANY(obj, NPY_INTP, 1, 1,
                                                          NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED |
                                                              NPY_ARRAY_FORCECAST);
    if (!ids)
        return -1;
    const npy_intp *v = PyArray_DATA(ids);
    const int wide_unsigned = PyArray_ISUNSIGNED((PyArrayObject *)obj) &&
                              PyArray_ITEMSIZE((PyArrayObject *)obj) >= (int)sizeof(npy_intp);
    for (npy_intp i = 0; i < n; i++) {
        if (v[i] < -1 || v[i] >= k || (wide_unsigned && v[i] < 0)) {
            if (wide_unsigned && v[i] < 0)
                PyErr_Format(PyExc_ValueError, "%s(): 'ids' must lie in [-1, %lld) (-1: no adapter), got %llu at "
                             "row %lld", func, (long long)k, (unsigned long long)v[i], (long long)i);
            else
                PyErr_Format(PyExc_ValueError, "%s(): 'ids' must lie in [-1, %lld) (-1: no adapter), got %lld at "
                             "row %lld", func, (long long)k, (long long)v[i], (long long)i);
            Py_DECREF(ids);
            return -1;
        }
    }
    *out = ids;
    return 0;
}

PyDoc_STRVAR(multi_linear_forward_doc,
"multi_linear_forward(x, weight, bias, lora_As, lora_Bs, scalings, ids, fan_in_fan_out,\n"
"                     enable_lora=None, contiguous_runs=True, with_base=True) -> y\n\n"
"Mixed batch: row i of x (N, in) gets adapter ids[i] (an integer array (N,), -1 = none):\n"
"y[i] = x[i] W0^T + bias + scalings[k] (x[i] A_k^T) B_k^T.  lora_As / lora_Bs: lists of the\n"
"K adapters' A_k (r_k, in) and B_k (out, r_k) (per-adapter ranks), scalings: K numbers.\n"
"enable_lora (MergedLinear): A_k (r_k * n_enabled, in), B_k (out / len(enable_lora) *\n"
"n_enabled, r_k), each enabled group adding into its output block.  The base GEMM runs once;\n"
"rows are grouped by adapter in C.  contiguous_runs=False forces the gather path.\n"
"with_base=False returns the adapters' part alone (no x W0^T, no bias), to add to a base\n"
"output computed elsewhere.");

static PyObject *py_multi_linear_forward(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static const char *func = "multi_linear_forward";
    static char *kwlist[] = {"x", "weight", "bias", "lora_As", "lora_Bs", "scalings", "ids", "fan_in_fan_out",
                             "enable_lora", "contiguous_runs", "with_base", NULL};
    PyObject *x, *weight, *bias, *as, *bs, *sc, *ids_obj, *enable_lora = Py_None;
    int fan_in_fan_out, contiguous_runs = 1, with_base = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOOOp|Opp:multi_linear_forward", kwlist, &x, &weight, &bias,
                                     &as, &bs, &sc, &ids_obj, &fan_in_fan_out, &enable_lora, &contiguous_runs,
                                     &with_base))
        return NULL;
    MergedOperands op; /* x, weight, bias (op.lin) and the groups (op.enabled); no adapter arrays */
    AdapterList list = {0};
    PyArrayObject *ids = NULL;
    PyObject *y = NULL;
    ptrdiff_t one_group = 0;
    memset(&op, 0, sizeof op);
    if (linear_operands_parse(func, x, weight, bias, Py_None, Py_None, Py_None, fan_in_fan_out, &op.lin) < 0)
        return NULL;
    const LinearOperands *lin = &op.lin;
    if (enable_lora == Py_None) {
        op.groups = op.n_enabled = 1;
    } else if (parse_enable_lora(func, enable_lora, lin->out, &op) < 0) {
        goto fail;
    }
    const npy_intp og = lin->out / op.groups;
    if (op.n_enabled == 0 && PySequence_Check(as) && PySequence_Size(as) > 0) {
        PyErr_Format(PyExc_ValueError, "%s(): adapters given but enable_lora has no True entry", func);
        goto fail;
    }
    if (adapter_list_parse(func, as, bs, sc, lin->typenum, lin->in, og, op.n_enabled > 0 ? op.n_enabled : 1,
                           enable_lora == Py_None ? "(r, in)" : "(r * n_enabled, in)",
                           enable_lora == Py_None ? "(out, r)" : "(out / len(enable_lora) * n_enabled, r)",
                           &list) < 0)
        goto fail;
    if (get_adapter_ids(func, ids_obj, lin->n, list.k, &ids) < 0)
        goto fail;
    if (!(y = new_matrix(lin->typenum, lin->n, lin->out)))
        goto fail;
    LoraMultiLinear M = {
        .n = lin->n, .in = lin->in, .out = lin->out,
        .groups = op.groups, .n_enabled = op.n_enabled, .enabled = op.enabled ? op.enabled : &one_group,
        .w_in_out = fan_in_fan_out, .contiguous_runs = contiguous_runs, .with_base = with_base,
        .x = data_or_null(&lin->x), .ldx = lin->x.ld, .w = data_or_null(&lin->w), .ldw = lin->w.ld,
        .bias = data_or_null(&lin->bias),
        .n_adapters = list.k, .adapters = list.refs, .ids = PyArray_DATA(ids),
    };
    ptrdiff_t ldy = lin->out > 0 ? lin->out : 1;
    int status;
    CALL_KERNEL_INTO(status, lin->typenum, lorac_multi_linear_forward, &M, PyArray_DATA((PyArrayObject *)y), ldy);
    if (status != 0) {
        PyErr_NoMemory();
        goto fail;
    }
    Py_DECREF(ids);
    adapter_list_release(&list);
    merged_operands_release(&op);
    return y;
fail:
    Py_XDECREF(y);
    Py_XDECREF(ids);
    adapter_list_release(&list);
    merged_operands_release(&op);
    return NULL;
}

PyDoc_STRVAR(multi_embedding_forward_doc,
"multi_embedding_forward(indices, weight, lora_As, lora_Bs, scalings, ids) -> y\n\n"
"Mixed batch of N = indices.size lookups (indices read flat, each in [0, num_embeddings):\n"
"IndexError otherwise): y[i] = W0[idx[i]] + scalings[k] A_k[:, idx[i]]^T B_k^T with\n"
"k = ids[i] (an integer array (N,), -1 = none), A_k (r_k, num_embeddings),\n"
"B_k (embedding_dim, r_k).  Returns y (N, embedding_dim).");

static PyObject *py_multi_embedding_forward(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static const char *func = "multi_embedding_forward";
    static char *kwlist[] = {"indices", "weight", "lora_As", "lora_Bs", "scalings", "ids", NULL};
    PyObject *indices, *weight, *as, *bs, *sc, *ids_obj;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOO:multi_embedding_forward", kwlist, &indices, &weight,
                                     &as, &bs, &sc, &ids_obj))
        return NULL;
    EmbeddingOperands op;
    AdapterList list = {0};
    PyArrayObject *ids = NULL;
    PyObject *y = NULL;
    if (embedding_operands_parse(func, indices, weight, Py_None, Py_None, &op) < 0)
        return NULL;
    if (adapter_list_parse(func, as, bs, sc, op.typenum, op.num, op.dim, 1, "(r, num_embeddings)",
                           "(embedding_dim, r)", &list) < 0)
        goto fail;
    if (get_adapter_ids(func, ids_obj, op.n, list.k, &ids) < 0)
        goto fail;
    if (!(y = new_matrix(op.typenum, op.n, op.dim)))
        goto fail;
    LoraMultiEmbedding M = {
        .n = op.n, .num = op.num, .dim = op.dim, .idx = PyArray_DATA(op.idx),
        .w = data_or_null(&op.w), .ldw = op.w.ld,
        .n_adapters = list.k, .adapters = list.refs, .ids = PyArray_DATA(ids),
    };
    ptrdiff_t ldy = op.dim > 0 ? op.dim : 1;
    int status;
    CALL_KERNEL_INTO(status, op.typenum, lorac_multi_embedding_forward, &M, PyArray_DATA((PyArrayObject *)y), ldy);
    if (status != 0) {
        PyErr_NoMemory();
        goto fail;
    }
    Py_DECREF(ids);
    adapter_list_release(&list);
    embedding_operands_release(&op);
    return y;
fail:
    Py_XDECREF(y);
    Py_XDECREF(ids);
    adapter_list_release(&list);
    embedding_operands_release(&op);
    return NULL;
}

/* -- MoLoRA ---------------------------------------------------------------- */

/* Validated operands of a MoLoRA call (see lora_moe.h). */
typedef struct {
    LinearOperands lin;  /* x, weight (out, in), bias, lora_A (r, in), lora_B (out, r), mask */
    npy_intp experts, top_k;
    KArray router;
} MoeOperands;

static void moe_operands_release(MoeOperands *op)
{
    linear_operands_release(&op->lin);
    karray_release(&op->router);
}

/* Validates the Linear operands (lora_A/lora_B required), lora_router (E, in)
 * with E >= 1 dividing r, and top_k in [1, E]. */
static int moe_operands_parse(const char *func, PyObject *x, PyObject *weight, PyObject *bias, PyObject *lora_a,
                              PyObject *lora_b, PyObject *router, long long top_k, PyObject *mask,
                              MoeOperands *op)
{
    memset(op, 0, sizeof *op);
    if (lora_a == Py_None || lora_b == Py_None) {
        PyErr_Format(PyExc_TypeError, "%s(): 'lora_A' and 'lora_B' must be numpy arrays, got None", func);
        return -1;
    }
    if (linear_operands_parse(func, x, weight, bias, lora_a, lora_b, mask, 0, &op->lin) < 0)
        return -1;
    npy_intp rshape[2] = {ANY_DIM, op->lin.in};
    if (get_array(func, "lora_router", router, op->lin.typenum, 2, rshape, "(num_experts, in)", IN_ARRAY,
                  &op->router) < 0)
        goto fail;
    op->experts = PyArray_DIMS(op->router.arr)[0];
    if (op->experts < 1 || op->lin.r % op->experts != 0) {
        PyErr_Format(PyExc_ValueError, "%s(): 'lora_router' must have num_experts >= 1 rows dividing r = %lld, "
                     "got %lld rows", func, (long long)op->lin.r, (long long)op->experts);
        goto fail;
    }
    if (top_k < 1 || top_k > op->experts) {
        PyErr_Format(PyExc_ValueError, "%s(): 'top_k' must lie in [1, num_experts] = [1, %lld], got %lld", func,
                     (long long)op->experts, top_k);
        goto fail;
    }
    op->top_k = (npy_intp)top_k;
    return 0;
fail:
    moe_operands_release(op);
    return -1;
}

static LoraMoe moe_kernel_args(const MoeOperands *op, double scaling, double keep_scale)
{
    const LinearOperands *lin = &op->lin;
    LoraMoe L = {
        .n = lin->n, .in = lin->in, .out = lin->out, .r = lin->r,
        .experts = op->experts, .top_k = op->top_k, .scaling = scaling, .keep_scale = keep_scale,
        .x = data_or_null(&lin->x), .ldx = lin->x.ld, .w = data_or_null(&lin->w), .ldw = lin->w.ld,
        .bias = data_or_null(&lin->bias),
        .a = data_or_null(&lin->a), .lda = lin->a.ld, .b = data_or_null(&lin->b), .ldb = lin->b.ld,
        .router = data_or_null(&op->router), .ldrouter = op->router.ld,
        .mask = data_or_null(&lin->mask),
    };
    return L;
}

PyDoc_STRVAR(molora_forward_doc,
"molora_forward(x, weight, bias, lora_A, lora_B, lora_router, scaling, top_k, mask=None,\n"
"               keep_scale=1.0) -> (y, u, probs, gates)\n\n"
"Mixture of LoRA experts: x (N, in), W0 (out, in), bias (out,) or None, A (r, in),\n"
"B (out, r), router R (E, in) with E dividing r, top_k in [1, E] (E: dense gates).\n"
"probs = softmax(x R^T) (N, E); gates = softmax over each row's top_k logits, 0 elsewhere;\n"
"u = drop(x) A^T (N, r); y = x W0^T + bias + scaling * (u * expand(gates)) B^T, expert e\n"
"owning ranks [e r/E, (e+1) r/E).  mask (N, in) uint8 or None: dropout of the adapter input.");

static PyObject *py_molora_forward(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static const char *func = "molora_forward";
    static char *kwlist[] = {"x", "weight", "bias", "lora_A", "lora_B", "lora_router", "scaling", "top_k",
                             "mask", "keep_scale", NULL};
    PyObject *x, *weight, *bias, *lora_a, *lora_b, *router, *mask = Py_None;
    double scaling, keep_scale = 1.0;
    long long top_k;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOOdL|Od:molora_forward", kwlist, &x, &weight, &bias,
                                     &lora_a, &lora_b, &router, &scaling, &top_k, &mask, &keep_scale))
        return NULL;
    if (check_finite(func, "scaling", scaling) < 0 || check_finite(func, "keep_scale", keep_scale) < 0)
        return NULL;
    MoeOperands op;
    if (moe_operands_parse(func, x, weight, bias, lora_a, lora_b, router, top_k, mask, &op) < 0)
        return NULL;
    const LinearOperands *lin = &op.lin;
    PyObject *y = new_matrix(lin->typenum, lin->n, lin->out);
    PyObject *u = new_matrix(lin->typenum, lin->n, lin->r);
    PyObject *probs = new_matrix(lin->typenum, lin->n, op.experts);
    PyObject *gates = new_matrix(lin->typenum, lin->n, op.experts);
    int status = -2;
    if (y && u && probs && gates) {
        LoraMoe L = moe_kernel_args(&op, scaling, keep_scale);
        ptrdiff_t ldy = lin->out > 0 ? lin->out : 1;
        void *yd = PyArray_DATA((PyArrayObject *)y), *ud = PyArray_DATA((PyArrayObject *)u);
        void *pd = PyArray_DATA((PyArrayObject *)probs), *gd = PyArray_DATA((PyArrayObject *)gates);
        CALL_KERNEL_INTO(status, lin->typenum, lorac_moe_forward, &L, ud, pd, gd, yd, ldy);
        if (status != 0)
            PyErr_NoMemory();
    }
    moe_operands_release(&op);
    if (status != 0) {
        Py_XDECREF(y);
        Py_XDECREF(u);
        Py_XDECREF(probs);
        Py_XDECREF(gates);
        return NULL;
    }
    return Py_BuildValue("(NNNN)", y, u, probs, gates);
}

PyDoc_STRVAR(molora_backward_doc,
"molora_backward(grad_output, x, weight, lora_A, lora_B, lora_router, u, probs, gates, scaling,\n"
"                top_k, mask=None, keep_scale=1.0, aux=None, need_input_grad=True,\n"
"                grad_weight=None, grad_bias=None, grad_lora_A=None, grad_lora_B=None,\n"
"                grad_lora_router=None) -> grad_input or None\n\n"
"Backward of molora_forward for grad_output (N, out), router and gating included.  u, probs\n"
"and gates are what molora_forward returned.  aux (E,) float64 or None adds the gradient of\n"
"an auxiliary loss sum_{i,e} aux[e] probs[i, e] (the load-balancing loss).  Each grad_* is\n"
"None (frozen: nothing computed) or an array of its parameter's shape, accumulated in place.");

static PyObject *py_molora_backward(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static const char *func = "molora_backward";
    static char *kwlist[] = {"grad_output", "x", "weight", "lora_A", "lora_B", "lora_router", "u", "probs",
                             "gates", "scaling", "top_k", "mask", "keep_scale", "aux", "need_input_grad",
                             "grad_weight", "grad_bias", "grad_lora_A", "grad_lora_B", "grad_lora_router", NULL};
    PyObject *x, *weight, *lora_a, *lora_b, *router, *p_obj, *gt_obj, *mask = Py_None;
    PyObject *aux_obj = Py_None, *gr_obj = Py_None;
    GradArgs grad_args = {.gw = Py_None, .gbias = Py_None, .ga = Py_None, .gb = Py_None};
    double scaling, keep_scale = 1.0;
    long long top_k;
    int need_input_grad = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOOOOOdL|OdOpOOOOO:molora_backward", kwlist, &grad_args.g,
                                     &x, &weight, &lora_a, &lora_b, &router, &grad_args.u, &p_obj, &gt_obj,
                                     &scaling, &top_k, &mask, &keep_scale, &aux_obj, &need_input_grad,
                                     &grad_args.gw, &grad_args.gbias, &grad_args.ga, &grad_args.gb, &gr_obj))
        return NULL;
    if (check_finite(func, "scaling", scaling) < 0 || check_finite(func, "keep_scale", keep_scale) < 0)
        return NULL;
    MoeOperands op;
    if (moe_operands_parse(func, x, weight, Py_None, lora_a, lora_b, router, top_k, mask, &op) < 0)
        return NULL;
    static const GradShapeWords words = {"(N, r)", "(r, in)", "(out, r)"};
    LinearOperands *lin = &op.lin;
    const int typenum = lin->typenum;
    GradArrays ga;
    KArray probs = {0}, gates = {0}, aux = {0}, gr = {0};
    PyObject *dx = NULL;
    if (grad_arrays_parse(func, lin, &lin->a, &lin->b, 0, &words, &grad_args, &ga) < 0) {
        moe_operands_release(&op);
        return NULL;
    }
    npy_intp pshape[2] = {lin->n, op.experts}, auxshape[1] = {op.experts}, rshape[2] = {op.experts, lin->in};
    if (get_array(func, "probs", p_obj, typenum, 2, pshape, "(N, num_experts)", IN_ARRAY, &probs) < 0 ||
        get_array(func, "gates", gt_obj, typenum, 2, pshape, "(N, num_experts)", IN_ARRAY, &gates) < 0 ||
        get_optional_array(func, "aux", aux_obj, NPY_FLOAT64, 1, auxshape, "(num_experts,)", IN_ARRAY, &aux) < 0 ||
        get_optional_array(func, "grad_lora_router", gr_obj, typenum, 2, rshape, "(num_experts, in)", INOUT_ARRAY,
                           &gr) < 0)
        goto fail;
    AliasArg alias_in[] = {ALIAS_KARRAY("grad_output", ga.g), ALIAS_KARRAY("x", lin->x),
                           ALIAS_KARRAY("weight", lin->w), ALIAS_KARRAY("lora_A", lin->a),
                           ALIAS_KARRAY("lora_B", lin->b), ALIAS_KARRAY("lora_router", op.router),
                           ALIAS_KARRAY("u", ga.u), ALIAS_KARRAY("probs", probs), ALIAS_KARRAY("gates", gates),
                           ALIAS_KARRAY("aux", aux), ALIAS_KARRAY("mask", lin->mask)};
    AliasArg alias_out[] = {ALIAS_KARRAY("grad_weight", ga.gw), ALIAS_KARRAY("grad_bias", ga.gbias),
                            ALIAS_KARRAY("grad_lora_A", ga.ga), ALIAS_KARRAY("grad_lora_B", ga.gb),
                            ALIAS_KARRAY("grad_lora_router", gr)}; /* issue 7: aliasing */
    if (resolve_aliasing(func, alias_in, ALIAS_COUNT(alias_in), alias_out, ALIAS_COUNT(alias_out)) < 0)
        goto fail;
    /* the kernel reads u, probs, gates and aux densely */
    KArray *dense[4] = {&ga.u, &probs, &gates, &aux};
    for (int i = 0; i < 4; i++) {
        if (dense[i]->arr && !PyArray_IS_C_CONTIGUOUS(dense[i]->arr)) {
            PyArrayObject *copy = (PyArrayObject *)PyArray_NewCopy(dense[i]->arr, NPY_CORDER);
            if (!copy)
                goto fail;
            Py_SETREF(dense[i]->arr, copy);
        }
    }
    if (need_input_grad && !(dx = new_matrix(typenum, lin->n, lin->in)))
        goto fail;
    LoraMoe L = moe_kernel_args(&op, scaling, keep_scale);
    LoraMoeGrads G = {
        .lin = linear_grads_args(&ga, dx, lin->in), .drouter = data_or_null(&gr), .lddrouter = gr.ld,
    };
    const void *ud = data_or_null(&ga.u), *pd = data_or_null(&probs), *gd = data_or_null(&gates);
    const void *g_data = data_or_null(&ga.g);
    const double *auxd = data_or_null(&aux);
    int status;
    CALL_KERNEL_INTO(status, typenum, lorac_moe_backward, &L, ud, pd, gd, auxd, g_data, ga.g.ld, &G);
    if (status != 0) {
        PyErr_NoMemory();
        goto fail;
    }
    grad_arrays_release(&ga);
    karray_release(&probs), karray_release(&gates), karray_release(&aux), karray_release(&gr);
    moe_operands_release(&op);
    if (!dx)
        Py_RETURN_NONE;
    return dx;
fail:
    Py_XDECREF(dx);
    grad_arrays_release(&ga);
    karray_release(&probs), karray_release(&gates), karray_release(&aux), karray_release(&gr);
    moe_operands_release(&op);
    return NULL;
}

/* ======================== end of many adapters (issue 6) ================= */

/* ------------------------------------------------------------------------ */
/* BLAS runtime                                                              */
/* ------------------------------------------------------------------------ */

static PyObject *py_blas_info(PyObject *self, PyObject *unused)
{
    (void)self, (void)unused;
    return Py_BuildValue("{s:s,s:s,s:s,s:i,s:i}", "name", lorac_blas_name(), "config", lorac_blas_config(),
                         "corename", lorac_blas_corename(), "num_threads", lorac_blas_get_num_threads(),
                         "num_procs", lorac_blas_get_num_procs());
}

static PyObject *py_get_num_threads(PyObject *self, PyObject *unused)
{
    (void)self, (void)unused;
    return PyLong_FromLong(lorac_blas_get_num_threads());
}

static PyObject *py_set_num_threads(PyObject *self, PyObject *arg)
{
    (void)self;
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < 1 || n > 4096) {
        PyErr_Format(PyExc_ValueError, "set_num_threads(): expected an integer in [1, 4096], got %ld", n);
        return NULL;
    }
    lorac_blas_set_num_threads((int)n);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------ */
/* Module                                                                    */
/* ------------------------------------------------------------------------ */

static PyMethodDef lorac_methods[] = {
    {"linear_forward", (PyCFunction)(void (*)(void))py_linear_forward, METH_VARARGS | METH_KEYWORDS,
     linear_forward_doc},
    {"linear_backward", (PyCFunction)(void (*)(void))py_linear_backward, METH_VARARGS | METH_KEYWORDS,
     linear_backward_doc},
    {"linear_merge", (PyCFunction)(void (*)(void))py_linear_merge, METH_VARARGS | METH_KEYWORDS,
     linear_merge_doc},
    /* training toolkit (issue 5) */
    {"sgd_step", (PyCFunction)(void (*)(void))py_sgd_step, METH_VARARGS | METH_KEYWORDS, sgd_step_doc},
    {"adam_step", (PyCFunction)(void (*)(void))py_adam_step, METH_VARARGS | METH_KEYWORDS, adam_step_doc},
    {"cross_entropy_forward", (PyCFunction)(void (*)(void))py_cross_entropy_forward,
     METH_VARARGS | METH_KEYWORDS, cross_entropy_forward_doc},
    {"cross_entropy_backward", (PyCFunction)(void (*)(void))py_cross_entropy_backward,
     METH_VARARGS | METH_KEYWORDS, cross_entropy_backward_doc},
    {"mse_forward", (PyCFunction)(void (*)(void))py_mse_forward, METH_VARARGS | METH_KEYWORDS, mse_forward_doc},
    {"mse_backward", (PyCFunction)(void (*)(void))py_mse_backward, METH_VARARGS | METH_KEYWORDS,
     mse_backward_doc},
    {"activation_forward", (PyCFunction)(void (*)(void))py_activation_forward, METH_VARARGS | METH_KEYWORDS,
     activation_forward_doc},
    {"activation_backward", (PyCFunction)(void (*)(void))py_activation_backward, METH_VARARGS | METH_KEYWORDS,
     activation_backward_doc},
    {"layernorm_forward", (PyCFunction)(void (*)(void))py_layernorm_forward, METH_VARARGS | METH_KEYWORDS,
     layernorm_forward_doc},
    {"layernorm_backward", (PyCFunction)(void (*)(void))py_layernorm_backward, METH_VARARGS | METH_KEYWORDS,
     layernorm_backward_doc},
    /* end of training toolkit */
    /* ---- Embedding ---- */
    {"embedding_forward", (PyCFunction)(void (*)(void))py_embedding_forward, METH_VARARGS | METH_KEYWORDS,
     embedding_forward_doc},
    {"embedding_backward", (PyCFunction)(void (*)(void))py_embedding_backward, METH_VARARGS | METH_KEYWORDS,
     embedding_backward_doc},
    /* ---- MergedLinear ---- */
    {"merged_linear_forward", (PyCFunction)(void (*)(void))py_merged_linear_forward,
     METH_VARARGS | METH_KEYWORDS, merged_linear_forward_doc},
    {"merged_linear_backward", (PyCFunction)(void (*)(void))py_merged_linear_backward,
     METH_VARARGS | METH_KEYWORDS, merged_linear_backward_doc},
    {"merged_linear_merge", (PyCFunction)(void (*)(void))py_merged_linear_merge, METH_VARARGS | METH_KEYWORDS,
     merged_linear_merge_doc},
    /* ---- many adapters (issue 6) ---- */
    {"multi_linear_forward", (PyCFunction)(void (*)(void))py_multi_linear_forward, METH_VARARGS | METH_KEYWORDS,
     multi_linear_forward_doc},
    {"multi_embedding_forward", (PyCFunction)(void (*)(void))py_multi_embedding_forward,
     METH_VARARGS | METH_KEYWORDS, multi_embedding_forward_doc},
    {"molora_forward", (PyCFunction)(void (*)(void))py_molora_forward, METH_VARARGS | METH_KEYWORDS,
     molora_forward_doc},
    {"molora_backward", (PyCFunction)(void (*)(void))py_molora_backward, METH_VARARGS | METH_KEYWORDS,
     molora_backward_doc},
    /* ---- end of many adapters ---- */
    {"blas_info", py_blas_info, METH_NOARGS, "BLAS name, build config, core, threads, processors."},
    {"get_num_threads", py_get_num_threads, METH_NOARGS, "Number of OpenBLAS threads."},
    {"set_num_threads", py_set_num_threads, METH_O, "Set the number of OpenBLAS threads."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef lorac_module = {
    PyModuleDef_HEAD_INIT, "lorac._C", "lorac's C kernels (see csrc/).", -1, lorac_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__C(void)
{
    import_array();
    return PyModule_Create(&lorac_module);
}
