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

/* ------------------------------------------------------------------------ */
/* Validation helpers                                                        */
/* ------------------------------------------------------------------------ */

#define ANY_DIM (-1) /* wildcard in an expected shape */

/* An array a kernel can use, with its row stride in elements. */
typedef struct {
    PyArrayObject *arr; /* owned reference, or NULL when the argument was None */
    ptrdiff_t ld;
} KArray;

static void karray_release(KArray *k) { Py_CLEAR(k->arr); }

static const char *dtype_name(int typenum)
{
    switch (typenum) {
    case NPY_FLOAT32: return "float32";
    case NPY_FLOAT64: return "float64";
    case NPY_UINT8: return "uint8";
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
    Py_BEGIN_ALLOW_THREADS
    if (op.typenum == NPY_FLOAT32)
        status = lorac_linear_forward_f32(&L, u_data, ldu, PyArray_DATA((PyArrayObject *)y), ldy);
    else
        status = lorac_linear_forward_f64(&L, u_data, ldu, PyArray_DATA((PyArrayObject *)y), ldy);
    Py_END_ALLOW_THREADS
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
    PyObject *g_obj, *x, *weight, *lora_a, *lora_b, *u_obj, *mask = Py_None;
    PyObject *gw_obj = Py_None, *gbias_obj = Py_None, *ga_obj = Py_None, *gb_obj = Py_None;
    double scaling, keep_scale = 1.0;
    int fan_in_fan_out, need_input_grad = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOOdp|OdpOOOO:linear_backward", kwlist, &g_obj, &x,
                                     &weight, &lora_a, &lora_b, &u_obj, &scaling, &fan_in_fan_out, &mask,
                                     &keep_scale, &need_input_grad, &gw_obj, &gbias_obj, &ga_obj, &gb_obj))
        return NULL;
    if (check_finite(func, "scaling", scaling) < 0 || check_finite(func, "keep_scale", keep_scale) < 0)
        return NULL;
    LinearOperands op;
    if (linear_operands_parse(func, x, weight, Py_None, lora_a, lora_b, mask, fan_in_fan_out, &op) < 0)
        return NULL;
    KArray g = {0}, u = {0}, gw = {0}, gbias = {0}, ga = {0}, gbb = {0};
    PyObject *dx = NULL;
    const int lora = op.a.arr != NULL;
    npy_intp gshape[2] = {op.n, op.out}, ushape[2] = {op.n, op.r};
    npy_intp bshape[1] = {op.out}, ashape[2] = {op.r, op.in}, lbshape[2] = {op.out, op.r};
    npy_intp wshape[2] = {PyArray_DIMS(op.w.arr)[0], PyArray_DIMS(op.w.arr)[1]};
    if (get_array(func, "grad_output", g_obj, op.typenum, 2, gshape, "(N, out)", IN_ARRAY, &g) < 0)
        goto fail;
    if (lora && get_array(func, "u", u_obj, op.typenum, 2, ushape, "(N, r)", IN_ARRAY, &u) < 0)
        goto fail;
    if (get_optional_array(func, "grad_weight", gw_obj, op.typenum, 2, wshape,
                           fan_in_fan_out ? "(in, out)" : "(out, in)", INOUT_ARRAY, &gw) < 0 ||
        get_optional_array(func, "grad_bias", gbias_obj, op.typenum, 1, bshape, "(out,)", INOUT_ARRAY,
                           &gbias) < 0)
        goto fail;
    if (lora && (get_optional_array(func, "grad_lora_A", ga_obj, op.typenum, 2, ashape, "(r, in)",
                                    INOUT_ARRAY, &ga) < 0 ||
                 get_optional_array(func, "grad_lora_B", gb_obj, op.typenum, 2, lbshape, "(out, r)",
                                    INOUT_ARRAY, &gbb) < 0))
        goto fail;
    if (!lora && (ga_obj != Py_None || gb_obj != Py_None)) {
        PyErr_Format(PyExc_ValueError, "%s(): grad_lora_A/grad_lora_B given but lora_A/lora_B are None", func);
        goto fail;
    }
    if (need_input_grad && !(dx = new_matrix(op.typenum, op.n, op.in)))
        goto fail;

    LoraLinear L = linear_kernel_args(&op, fan_in_fan_out, scaling, keep_scale);
    LoraLinearGrads G = {
        .dx = dx ? PyArray_DATA((PyArrayObject *)dx) : NULL, .lddx = op.in > 0 ? op.in : 1,
        .dw = data_or_null(&gw), .lddw = gw.ld,
        .dbias = data_or_null(&gbias),
        .da = data_or_null(&ga), .ldda = ga.ld,
        .db = data_or_null(&gbb), .lddb = gbb.ld,
    };
    const void *u_data = data_or_null(&u);
    int status;
    Py_BEGIN_ALLOW_THREADS
    if (op.typenum == NPY_FLOAT32)
        status = lorac_linear_backward_f32(&L, u_data, u.ld, data_or_null(&g), g.ld, &G);
    else
        status = lorac_linear_backward_f64(&L, u_data, u.ld, data_or_null(&g), g.ld, &G);
    Py_END_ALLOW_THREADS
    if (status != 0) {
        PyErr_NoMemory();
        goto fail;
    }
    karray_release(&g), karray_release(&u), karray_release(&gw), karray_release(&gbias);
    karray_release(&ga), karray_release(&gbb);
    linear_operands_release(&op);
    if (!dx)
        Py_RETURN_NONE;
    return dx;
fail:
    Py_XDECREF(dx);
    karray_release(&g), karray_release(&u), karray_release(&gw), karray_release(&gbias);
    karray_release(&ga), karray_release(&gbb);
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
    Py_BEGIN_ALLOW_THREADS
    if (typenum == NPY_FLOAT32)
        lorac_linear_merge_f32(out, in, r, fan_in_fan_out, alpha, PyArray_DATA(a.arr), a.ld,
                               PyArray_DATA(b.arr), b.ld, PyArray_DATA(w.arr), w.ld);
    else
        lorac_linear_merge_f64(out, in, r, fan_in_fan_out, alpha, PyArray_DATA(a.arr), a.ld,
                               PyArray_DATA(b.arr), b.ld, PyArray_DATA(w.arr), w.ld);
    Py_END_ALLOW_THREADS
    karray_release(&w), karray_release(&a), karray_release(&b);
    Py_RETURN_NONE;
fail:
    karray_release(&w), karray_release(&a), karray_release(&b);
    return NULL;
}

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
