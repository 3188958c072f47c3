// flow_importance / flow_scores, the device-independent half: argument checks
// and the per-layer views that every backend's kernel reads.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace multiflow {

struct FlowLayer {
  // weights[l] as (rows, cols) with contiguous columns: element (i, j) is at
  // w.data_ptr() + i * row_stride + j. A view of the caller's weight whenever
  // its columns are contiguous; a contiguous copy otherwise.
  at::Tensor w;
  // act_sq_norms[l]: contiguous float32 (cols,).
  at::Tensor a;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t row_stride = 0;
};

// Checks weights / act_sq_norms against the schema's contract (TORCH_CHECK,
// naming the argument and the index at fault; `op` prefixes the messages):
// equal lengths; weights[l] 2-D float32/float16/bfloat16; act_sq_norms[l]
// float32 of shape (weights[l].shape[1],); every tensor on weights[0]'s device.
std::vector<FlowLayer> prepare_flow(
    const char* op,
    at::TensorList weights,
    at::TensorList act_sq_norms);

}  // namespace multiflow
