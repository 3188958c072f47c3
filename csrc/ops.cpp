// The schema of every multiflow op, in one place.
//
// Backends register their kernels beside their code (csrc/cpu/, csrc/cuda/,
// multiflow_kernels/triton/); the Python entry points, fake kernels and
// autograd live in multiflow_kernels/ops.py.

#if defined(MULTIFLOW_PYTHON_MODULE)
// Python.h first, as Python asks. Only setup.py defines MULTIFLOW_PYTHON_MODULE:
// the CMake build (a plain shared library for C++ users) needs no Python.
#include <Python.h>

#include "python_eager.h"
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

  // Scoring (batched over layers; exact semantics in multiflow_kernels/reference.py).
  // weights[l]: (out, in) float32/float16/bfloat16; act_sq_norms[l]: float32 (in,).
  // w_scale[l] = 2^-e (e clamped to [-126, 126]) brings max|W_l| into [0.5, 1);
  // imp_out/imp_in are float64-accumulated means rounded once to float32.
  m.def("flow_importance(Tensor[] weights, Tensor[] act_sq_norms) -> (Tensor[] imp_out, Tensor[] imp_in, Tensor w_scale)");
  // score_l = (imp_out[:, None] * (|W_l| * w_scale[l])) * imp_in[None, :], float32.
  m.def("flow_scores(Tensor[] weights, Tensor[] act_sq_norms) -> Tensor[]");

  // Selection (exact: equal to torch.kthvalue on the float32 values / scores).
  // k-th smallest (1-based) of the union of values (|values| when absolute): 0-d float32.
  m.def("kth_smallest_group(Tensor[] values, int k, bool absolute=False) -> Tensor");
  // Per tensor: out[l] = k-th smallest of values[l] (ks[l] == 0 gives -inf): float32 (L,).
  m.def("kth_smallest_each(Tensor[] values, int[] ks, bool absolute=False) -> Tensor");
  // Per tensor: number of elements <= threshold (a 0-d float32): int64 (L,).
  m.def("count_at_most(Tensor[] values, Tensor threshold, bool absolute=False) -> Tensor");
  // flow_kth_each / flow_masks: the flow score computed on the fly from the importances
  // (never written to memory); k-th smallest per layer, and keep-masks score > threshold.
  m.def("flow_kth_each(Tensor[] weights, Tensor[] imp_out, Tensor[] imp_in, Tensor w_scale, int[] ks) -> Tensor");
  m.def("flow_masks(Tensor[] weights, Tensor[] imp_out, Tensor[] imp_in, Tensor w_scale, Tensor thresholds) -> Tensor[]");
  // N:M: keep the n largest of every m consecutive inputs of each row (ties: lower index).
  m.def("nm_mask(Tensor scores, int n, int m) -> Tensor");

  // Mask packing: bool (R, C) <-> int32 words (R, ceil(C / 32)); bit b of word w of row r
  // is mask[r, 32 * w + b]; padding bits are 0.
  m.def("pack_mask(Tensor mask) -> Tensor");
  m.def("unpack_mask(Tensor bits, int cols) -> Tensor");

  // Matmul. masked_linear: y = x @ (weight * mask).T + bias, the mask applied inside the
  // kernel; x (..., in), weight (out, in), mask_bits = pack_mask(mask) int32 (out, ceil(in/32)).
  m.def("masked_linear(Tensor x, Tensor weight, Tensor mask_bits, Tensor? bias) -> Tensor");
  // Gradients of masked_linear: grad_x = grad_out @ (W*M); grad_weight = (grad_out^T x) * M
  // (pruned weights get exactly 0); grad_bias = grad_out summed over the leading dims.
  m.def("masked_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor mask_bits, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  // Bitmap-compressed weights (formats.py): values = kept weights in row-major order (nnz,
  // at most 2^31 - 1), bits = pack_mask(mask) int32 (out, ceil(in/32)), row_ptr int32 (out+1,)
  // = index in values of each row's first kept weight, block_ptr int32 (out, ceil(in/512) - 1):
  // [r, b-1] = kept weights of row r before column 512*b, b >= 1 (so a 512-column tile finds
  // its values without a scan; block 0 starts at row_ptr[r]).
  m.def("bitmap_pack(Tensor weight, Tensor mask) -> (Tensor values, Tensor bits, Tensor row_ptr, Tensor block_ptr)");
  m.def("bitmap_unpack(Tensor values, Tensor bits, Tensor row_ptr, Tensor block_ptr, int in_features) -> Tensor");
  // y = x @ W.T + bias with W decoded from the bitmap format inside the kernel.
  m.def("bitmap_linear(Tensor x, Tensor values, Tensor bits, Tensor row_ptr, Tensor block_ptr, int in_features, Tensor? bias) -> Tensor");
  // bitmap_linear's contract, CUDA only, in CUDA C++ (csrc/cuda/bitmap.cu): the public op's CUDA
  // kernel (registered in C++ there) calls it unless MULTIFLOW_BITMAP_CUDA=triton.
  m.def("_bitmap_linear_cuda(Tensor x, Tensor values, Tensor bits, Tensor row_ptr, Tensor block_ptr, int in_features, Tensor? bias) -> Tensor");
  // The same contract, the Triton kernel (CUDA kernel registered in Python,
  // multiflow_kernels/triton): what the public op calls under MULTIFLOW_BITMAP_CUDA=triton.
  m.def("_bitmap_linear_triton(Tensor x, Tensor values, Tensor bits, Tensor row_ptr, Tensor block_ptr, int in_features, Tensor? bias) -> Tensor");

  // 2:4 semi-structured weights (csrc/sparse24.h): W (out, in), in % 4 == 0, keeps at most 2
  // of every 4 consecutive weights of a row. values (out, in/2), W's dtype: each chunk of 4
  // columns' kept weights in column order, filled up to 2 with zeros at the lowest unused
  // positions; metadata int16 (out, ceil(in/16)): 4 bits per chunk at bit 4*(q%4) of word
  // q/4, the two positions (first < second) in bits 0-1 and 2-3, as mma.sp reads them.
  // pack raises ValueError naming the rows where the mask is not 2:4.
  m.def("sparse24_pack(Tensor weight, Tensor mask) -> (Tensor values, Tensor metadata)");
  m.def("sparse24_unpack(Tensor values, Tensor metadata) -> Tensor");
  // y = x @ W.T + bias with W decoded from the 2:4 format inside the kernel (in = 2 * values.size(1)).
  m.def("sparse24_linear(Tensor x, Tensor values, Tensor metadata, Tensor? bias) -> Tensor");
}

#if defined(MULTIFLOW_PYTHON_MODULE)
// `import multiflow_kernels._C` loads this library, and loading it runs the
// static registrations above. Every op is reached through torch.ops.multiflow;
// the module's functions are the linear ops' eager entry points
// (csrc/python_eager.cpp), which multiflow_kernels/ops.py calls first.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",                        // m_name
      nullptr,                     // m_doc
      -1,                          // m_size
      multiflow::eager_methods(),  // m_methods
  };
  return PyModule_Create(&module_def);
}
#endif
