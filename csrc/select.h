// The selection ops (kth_smallest_group, kth_smallest_each, count_at_most,
// flow_kth_each, flow_masks, nm_mask), the device-independent half: argument
// checks against the schemas' contract and the views every backend reads.
// The order key and radix digits every backend selects with: select_key.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "select_key.h"

namespace multiflow {

// A value list as each backend reads it: one flat, dense buffer per tensor.
// A tensor whose elements fill their memory without gaps (contiguous, or any
// permutation of it, e.g. a transposed weight) is read in place in memory
// order, which is fine since selection and counting ignore element order;
// anything else (an expand, a strided slice) is copied once.
struct FlatValues {
  std::vector<at::Tensor> tensors;  // each: numel elements at data_ptr(), in some order
  std::vector<int64_t> numels;
  at::Device device = at::kCPU;
};

// Checks every tensor is float32/float16/bfloat16 and all are on one device.
FlatValues prepare_values(const char* op, at::TensorList values);

// 1 <= k <= the total numel (TORCH_CHECK naming k and the valid range).
void check_group_k(const char* op, const FlatValues& v, int64_t k);

// ks has one entry per tensor and 0 <= ks[l] <= numel of tensor l.
void check_ks(const char* op, const std::vector<int64_t>& numels, at::IntArrayRef ks);

// threshold is a 0-d float32 tensor on `device`.
void check_threshold(const char* op, const at::Tensor& threshold, at::Device device);

// The flow ops' layers, checked: weights[l] (out, in) float32/float16/bfloat16
// with unit column stride (row stride free; a copy otherwise), imp_out[l] and
// imp_in[l] contiguous float32 of out and in elements, w_scale contiguous
// float32 (L,), all on one device.
struct FlowLayers {
  std::vector<at::Tensor> weights;
  std::vector<at::Tensor> imp_out;
  std::vector<at::Tensor> imp_in;
  at::Tensor w_scale;
  std::vector<int64_t> numels;
  at::Device device = at::kCPU;
};

FlowLayers prepare_flow(
    const char* op,
    at::TensorList weights,
    at::TensorList imp_out,
    at::TensorList imp_in,
    const at::Tensor& w_scale);

// thresholds is a float32 tensor of n_layers elements on `device`; returns it contiguous.
at::Tensor prepare_thresholds(const char* op, const at::Tensor& thresholds, int64_t n_layers, at::Device device);

// nm_mask's scores (R, C) float32/float16/bfloat16 with unit column stride (a
// copy otherwise); 0 <= n <= m, m >= 1, C % m == 0.
at::Tensor prepare_nm_scores(const at::Tensor& scores, int64_t n, int64_t m);

}  // namespace multiflow
