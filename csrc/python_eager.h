#pragma once
// The methods of the multiflow_kernels._C Python module (csrc/python_eager.cpp);
// Python builds only (MULTIFLOW_PYTHON_MODULE).
#if defined(MULTIFLOW_PYTHON_MODULE)
#include <Python.h>

namespace multiflow {
// Eager entry points of masked_linear, bitmap_linear and sparse24_linear.
PyMethodDef* eager_methods();
}  // namespace multiflow
#endif
