// The schema of every multiflow op, in one place.
//
// Backends register their kernels beside their code (csrc/cpu/, csrc/cuda/,
// multiflow_kernels/triton/); the Python entry points, fake kernels and
// autograd live in multiflow_kernels/ops.py.

#if defined(MULTIFLOW_PYTHON_MODULE)
// Python.h first, as Python asks. Only setup.py defines MULTIFLOW_PYTHON_MODULE:
// the CMake build (a plain shared library for C++ users) needs no Python.
#include <Python.h>
#endif

#include <torch/library.h>

TORCH_LIBRARY(multiflow, m) {
  // If torch needs a fake kernel and finds none, it points the user at the
  // module that registers them.
  m.set_python_module("multiflow_kernels.ops");

  // Calibration. acc[j] += sum over kept tokens t of float(x[t, j])^2, in float32.
  // x: (..., F) float32/float16/bfloat16; acc: float32 (F,), contiguous, same device;
  // token_mask: None (keep every token) or bool of shape x.shape[:-1].
  m.def("sq_sum_accumulate_(Tensor(a!) acc, Tensor x, Tensor? token_mask) -> ()");
}

#if defined(MULTIFLOW_PYTHON_MODULE)
// `import multiflow_kernels._C` loads this library, and loading it runs the
// static registrations above. The module itself is empty: every op is reached
// through torch.ops.multiflow.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",     // m_name
      nullptr,  // m_doc
      -1,       // m_size
      nullptr,  // m_methods
  };
  return PyModule_Create(&module_def);
}
#endif
