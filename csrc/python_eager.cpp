// Eager entry points of the linear ops for multiflow_kernels/ops.py: the same
// dispatcher call as torch.ops.multiflow.<op>.default, reached without the
// boxed, schema-parsing path a torch.ops call takes from Python. That path costs
// about 0.9 us per call more (2.4 us against 1.45 us for a 16 x 32 bitmap_linear
// on our 2-core CPU, where F.linear takes 1.4 us), which is 4% of a 768 x 768
// one-row bitmap_linear out of cache.
//
// Every call still goes through the dispatcher (autocast, autograd, the
// backend's kernel, dispatch modes such as FakeTensorMode or FlopCounterMode,
// the profiler), exactly as from torch.ops. What is skipped is Python-level
// dispatch: __torch_function__. So these functions take only what has none:
// exact torch.Tensor / nn.Parameter arguments (no subclass), None for an absent
// bias, a plain int, and no TorchFunctionMode active (`with torch.device(...)` is
// one). Anything else returns NotImplemented and ops.py calls torch.ops instead;
// so does code that torch.compile traces (ops.py checks that first). The GIL is
// released around the call, as torch.ops does. A C++ warning (TORCH_WARN, e.g.
// vmap's batching fallback) becomes a Python warning, as in torch's own functions
// (torch.ops from Python only logs it to stderr); under an "error" warnings filter it
// raises, and the result already made is released.
#if defined(MULTIFLOW_PYTHON_MODULE)
#include <Python.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/object_ptr.h>

#include <optional>

#include "python_eager.h"

namespace multiflow {
namespace {

using MaskedLinearFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const std::optional<at::Tensor>&);
using BitmapLinearFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const at::Tensor&, int64_t, const std::optional<at::Tensor>&);
using Sparse24LinearFn = MaskedLinearFn;  // the same signature: each call below keeps its own handle

template <typename Fn>
c10::TypedOperatorHandle<Fn> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").template typed<Fn>();
}

bool tensor_arg(PyObject* o, at::Tensor& out) {
  if (!THPVariable_CheckExact(o)) {
    return false;
  }
  out = THPVariable_Unpack(o);
  return true;
}

bool bias_arg(PyObject* o, std::optional<at::Tensor>& out) {
  if (o == Py_None) {
    out = std::nullopt;
    return true;
  }
  at::Tensor t;
  if (!tensor_arg(o, t)) {
    return false;
  }
  out = std::move(t);
  return true;
}

bool int_arg(PyObject* o, int64_t& out) {
  if (!PyLong_CheckExact(o)) {  // not bool, not a numpy or symbolic integer
    return false;
  }
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
  if (overflow != 0 || (v == -1 && PyErr_Occurred())) {
    PyErr_Clear();
    return false;
  }
  out = v;
  return true;
}

// Whether Python-level dispatch could apply to this call (then torch.ops takes it).
bool python_dispatch_active() {
  return at::impl::torch_function_mode_enabled();
}

PyObject* not_implemented() {
  Py_RETURN_NOTIMPLEMENTED;
}

template <typename Call>
at::Tensor call_released(Call&& call) {
  pybind11::gil_scoped_release no_gil;
  return call();
}

// masked_linear(x, weight, mask_bits, bias)
PyObject* masked_linear(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  THPObjectPtr out;  // outside the handler: released if a warning turned error raises at its end
  HANDLE_TH_ERRORS
  at::Tensor x, w, bits;
  std::optional<at::Tensor> bias;
  if (nargs != 4 || python_dispatch_active() || !tensor_arg(args[0], x) || !tensor_arg(args[1], w) ||
      !tensor_arg(args[2], bits) || !bias_arg(args[3], bias)) {
    return not_implemented();
  }
  static const auto op = find_op<MaskedLinearFn>("multiflow::masked_linear");
  out = THPVariable_Wrap(call_released([&] { return op.call(x, w, bits, bias); }));
  END_HANDLE_TH_ERRORS
  return out.release();
}

// bitmap_linear(x, values, bits, row_ptr, block_ptr, in_features, bias)
PyObject* bitmap_linear(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  THPObjectPtr out;  // outside the handler: released if a warning turned error raises at its end
  HANDLE_TH_ERRORS
  at::Tensor x, values, bits, row_ptr, block_ptr;
  int64_t in_features = 0;
  std::optional<at::Tensor> bias;
  if (nargs != 7 || python_dispatch_active() || !tensor_arg(args[0], x) || !tensor_arg(args[1], values) ||
      !tensor_arg(args[2], bits) || !tensor_arg(args[3], row_ptr) || !tensor_arg(args[4], block_ptr) ||
      !int_arg(args[5], in_features) || !bias_arg(args[6], bias)) {
    return not_implemented();
  }
  static const auto op = find_op<BitmapLinearFn>("multiflow::bitmap_linear");
  out = THPVariable_Wrap(call_released([&] { return op.call(x, values, bits, row_ptr, block_ptr, in_features, bias); }));
  END_HANDLE_TH_ERRORS
  return out.release();
}

// sparse24_linear(x, values, metadata, bias)
PyObject* sparse24_linear(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  THPObjectPtr out;  // outside the handler: released if a warning turned error raises at its end
  HANDLE_TH_ERRORS
  at::Tensor x, values, metadata;
  std::optional<at::Tensor> bias;
  if (nargs != 4 || python_dispatch_active() || !tensor_arg(args[0], x) || !tensor_arg(args[1], values) ||
      !tensor_arg(args[2], metadata) || !bias_arg(args[3], bias)) {
    return not_implemented();
  }
  static const auto op = find_op<Sparse24LinearFn>("multiflow::sparse24_linear");
  out = THPVariable_Wrap(call_released([&] { return op.call(x, values, metadata, bias); }));
  END_HANDLE_TH_ERRORS
  return out.release();
}

PyMethodDef kMethods[] = {
    {"masked_linear", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&masked_linear)), METH_FASTCALL,
     "torch.ops.multiflow.masked_linear.default for plain tensors in eager mode, else NotImplemented."},
    {"bitmap_linear", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&bitmap_linear)), METH_FASTCALL,
     "torch.ops.multiflow.bitmap_linear.default for plain tensors in eager mode, else NotImplemented."},
    {"sparse24_linear", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&sparse24_linear)), METH_FASTCALL,
     "torch.ops.multiflow.sparse24_linear.default for plain tensors in eager mode, else NotImplemented."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

PyMethodDef* eager_methods() {
  return kMethods;
}

}  // namespace multiflow
#endif  // MULTIFLOW_PYTHON_MODULE
