// The selection ops on CUDA.
//
// Members. Every op reads a list of members (value tensors or flow-score
// layers) through one small device table of Source records (pointer, numel,
// dtype, group, and for flow layers the importances and scale), and its work
// as a table of Items (a member and an element range): one block per item,
// so a single launch covers every tensor of every dtype.
//
// k-th smallest: the radix select of select_key.h. Per pass, one launch
// counts digits into a shared-memory histogram per block and adds it into
// its group's global histogram (atomics), then a tiny kernel, one thread per
// group, picks the bucket holding the k-th element and extends the group's
// prefix, on the device: the host never waits between passes, and the answer
// stays on the device. Unlike the CPU kernel there is no compaction: three
// full reads, which a GPU streams fast.
//
// Determinism: histograms and counts are integers, so the atomics' order does
// not change them; masks are elementwise.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "ceil_div.h"
#include "select.h"

// The keys fold -0.0 into +0.0 with an add and keep subnormals apart from 0:
// never build this file with --use_fast_math (flush-to-zero would make the
// selection differ from torch.kthvalue; nvcc 13 defines no macro to test for it).

namespace multiflow::cuda {
namespace {

constexpr int kThreads = 256;
// Elements per item (per block): about 64 per thread.
constexpr int64_t kItemElements = int64_t{1} << 14;

enum DType : int32_t { kF32 = 0, kF16 = 1, kBF16 = 2 };

struct Source {
  const void* data;       // values: flat buffer; flow: the weight, (i, j) at i * row_stride + j
  int64_t numel;
  int64_t cols;           // flow
  int64_t row_stride;     // flow
  const float* imp_out;   // flow: (rows,)
  const float* imp_in;    // flow: (cols,)
  const float* scale;     // flow: &w_scale[l]
  bool* mask;             // flow_masks: the layer's output, row-major contiguous
  int32_t group;
  int32_t dtype;
  int32_t is_flow;
  int32_t absolute;
};

struct Item {
  int64_t begin;
  int64_t end;
  int32_t source;
  int32_t pad;
};

int32_t dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return kF32;
    case at::kHalf:
      return kF16;
    case at::kBFloat16:
      return kBF16;
    default:
      TORCH_CHECK(false, "multiflow selection: no CUDA kernel for dtype ", t);
  }
}

__device__ __forceinline__ float load_float(const void* p, int64_t i, int32_t dtype) {
  switch (dtype) {
    case kF16:
      return __half2float(static_cast<const __half*>(p)[i]);
    case kBF16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

// f(e, v) for this thread's elements e of an item (item.begin + threadIdx.x,
// then every blockDim.x-th, below item.end), v = the float32 value of element e
// of s (|value| when absolute) or its flow score. A flow source's (row, column)
// is stepped, not divided out per element (64-bit division has no instruction
// on the GPU: ~70 of them per element).
template <typename F>
__device__ __forceinline__ void for_each_value(const Source& s, const Item& item, F&& f) {
  const int64_t step = blockDim.x;
  int64_t e = item.begin + threadIdx.x;
  if (!s.is_flow) {
    for (; e < item.end; e += step) {
      const float v = load_float(s.data, e, s.dtype);
      f(e, s.absolute ? fabsf(v) : v);
    }
    return;
  }
  if (e >= item.end) {
    return;
  }
  const int64_t cols = s.cols;  // >= 1: the source has elements
  int64_t i = e / cols;
  int64_t j = e - i * cols;
  const int64_t di = step / cols;
  const int64_t dj = step - di * cols;
  const float scale = *s.scale;
  for (; e < item.end; e += step) {
    const float w = fabsf(load_float(s.data, i * s.row_stride + j, s.dtype));
    // The reference's order, each product rounded (__fmul_rn is never fused).
    f(e, __fmul_rn(__fmul_rn(s.imp_out[i], __fmul_rn(w, scale)), s.imp_in[j]));
    i += di;
    j += dj;
    if (j >= cols) {
      j -= cols;
      ++i;
    }
  }
}

// One radix pass (see select_key.h): block = one item.
__global__ void __launch_bounds__(kThreads) radix_histogram_kernel(
    const Source* __restrict__ sources,
    const Item* __restrict__ items,
    const uint32_t* __restrict__ prefix,  // per group
    int high_shift,
    int shift,
    uint32_t digit_mask,
    unsigned long long* __restrict__ hist) {  // (groups, kRadixBuckets)
  __shared__ uint32_t local[kRadixBuckets];
  for (int b = threadIdx.x; b <= static_cast<int>(digit_mask); b += blockDim.x) {
    local[b] = 0;
  }
  __syncthreads();
  const Item item = items[blockIdx.x];
  const Source s = sources[item.source];
  const uint32_t want = high_shift < 32 ? prefix[s.group] : 0u;
  for_each_value(s, item, [&](int64_t, float v) {
    const uint32_t key = key_of_float(v);
    if (high_shift >= 32 || (key >> high_shift) == want) {
      atomicAdd(&local[(key >> shift) & digit_mask], 1u);
    }
  });
  __syncthreads();
  unsigned long long* group_hist = hist + static_cast<int64_t>(s.group) * kRadixBuckets;
  for (int b = threadIdx.x; b <= static_cast<int>(digit_mask); b += blockDim.x) {
    if (local[b] != 0) {
      atomicAdd(&group_hist[b], static_cast<unsigned long long>(local[b]));
    }
  }
}

// One warp per group: the bucket holding the k-th element extends the prefix.
// Each lane sums its own run of buckets (loads in parallel, not one dependent
// walk over up to 2048 buckets), a warp scan finds the lane whose run holds
// the k-th element, and that lane walks its run only. After the last pass it
// writes the answer (or -inf where k == 0).
constexpr int kWarp = 32;

__global__ void radix_pick_kernel(
    const unsigned long long* __restrict__ hist,
    int64_t n_groups,
    int bits,
    int64_t* __restrict__ k,
    uint32_t* __restrict__ prefix,
    float* __restrict__ out) {  // non-null after the last pass
  const int64_t g = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  if (g >= n_groups) {
    return;  // g is the same for the whole warp: all of its lanes leave together
  }
  const int64_t rank = k[g];
  if (rank < 1) {
    if (lane == 0 && out != nullptr) {
      out[g] = -CUDART_INF_F;
    }
    return;
  }
  const unsigned long long* h = hist + g * kRadixBuckets;
  const int n_buckets = 1 << bits;
  const int per_lane = (n_buckets + kWarp - 1) / kWarp;
  const int b_begin = min(lane * per_lane, n_buckets);
  const int b_end = min(b_begin + per_lane, n_buckets);
  long long run = 0;
  for (int b = b_begin; b < b_end; ++b) {
    run += static_cast<long long>(h[b]);
  }
  long long inclusive = run;  // buckets of lanes 0..lane
  for (int offset = 1; offset < kWarp; offset <<= 1) {
    const long long t = __shfl_up_sync(0xFFFFFFFFu, inclusive, offset);
    if (lane >= offset) {
      inclusive += t;
    }
  }
  const unsigned reached = __ballot_sync(0xFFFFFFFFu, inclusive >= rank);
  // The first lane whose buckets reach the rank; none (k past the count, which
  // the host checks): the last lane with buckets, whose walk stops at the last
  // bucket, as a walk from bucket 0 would.
  const int owner = reached != 0u ? __ffs(static_cast<int>(reached)) - 1 : (n_buckets - 1) / per_lane;
  if (lane != owner) {
    return;
  }
  long long below = inclusive - run;
  int b = b_begin;
  while (b < n_buckets - 1 && below + static_cast<long long>(h[b]) < rank) {
    below += static_cast<long long>(h[b++]);
  }
  k[g] = rank - below;
  const uint32_t p = (prefix[g] << bits) | static_cast<uint32_t>(b);
  prefix[g] = p;
  if (out != nullptr) {
    out[g] = float_of_key(p);
  }
}

__global__ void __launch_bounds__(kThreads) count_at_most_kernel(
    const Source* __restrict__ sources,
    const Item* __restrict__ items,
    const float* __restrict__ threshold,
    unsigned long long* __restrict__ counts) {  // (groups,)
  __shared__ unsigned int block_count;
  if (threadIdx.x == 0) {
    block_count = 0;
  }
  __syncthreads();
  const Item item = items[blockIdx.x];
  const Source s = sources[item.source];
  const float t = *threshold;
  unsigned int count = 0;
  for_each_value(s, item, [&](int64_t, float v) { count += v <= t ? 1u : 0u; });
  atomicAdd(&block_count, count);
  __syncthreads();
  if (threadIdx.x == 0 && block_count != 0) {
    atomicAdd(&counts[s.group], static_cast<unsigned long long>(block_count));
  }
}

__global__ void __launch_bounds__(kThreads) flow_masks_kernel(
    const Source* __restrict__ sources,
    const Item* __restrict__ items,
    const float* __restrict__ thresholds) {
  const Item item = items[blockIdx.x];
  const Source s = sources[item.source];
  const float t = thresholds[s.group];
  for_each_value(s, item, [&](int64_t e, float v) { s.mask[e] = v > t; });
}

// One thread per (row, group of m): keep the n largest keys, lower index first
// among equal ones (rank by counting; the m keys stay in cache).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) nm_mask_kernel(
    const scalar_t* __restrict__ scores,
    int64_t rows,
    int64_t cols,
    int64_t row_stride,
    int64_t n,
    int64_t m,
    bool* __restrict__ keep) {
  const int64_t groups_per_row = cols / m;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= rows * groups_per_row) {
    return;
  }
  const int64_t r = t / groups_per_row;
  const int64_t c0 = (t - r * groups_per_row) * m;
  const scalar_t* u = scores + r * row_stride + c0;
  for (int64_t j = 0; j < m; ++j) {
    const uint32_t kj = key_of_float(static_cast<float>(u[j]));
    int64_t rank = 0;
    for (int64_t i = 0; i < m && rank < n; ++i) {
      const uint32_t ki = key_of_float(static_cast<float>(u[i]));
      rank += (ki > kj || (ki == kj && i < j)) ? 1 : 0;
    }
    keep[r * cols + c0 + j] = rank < n;
  }
}

Source values_source(const at::Tensor& t, int32_t group, bool absolute) {
  Source s{};
  s.data = t.const_data_ptr();
  s.numel = t.numel();
  s.group = group;
  s.dtype = dtype_of(t.scalar_type());
  s.absolute = absolute ? 1 : 0;
  return s;
}

std::vector<Source> flow_sources(const FlowLayers& f) {
  std::vector<Source> sources;
  const float* scales = f.w_scale.const_data_ptr<float>();
  for (size_t l = 0; l < f.weights.size(); ++l) {
    const at::Tensor& w = f.weights[l];
    Source s{};
    s.data = w.const_data_ptr();
    s.numel = w.numel();
    s.cols = w.size(1);
    s.row_stride = w.stride(0);
    s.imp_out = f.imp_out[l].const_data_ptr<float>();
    s.imp_in = f.imp_in[l].const_data_ptr<float>();
    s.scale = scales + l;
    s.group = static_cast<int32_t>(l);
    s.dtype = dtype_of(w.scalar_type());
    s.is_flow = 1;
    sources.push_back(s);
  }
  return sources;
}

// The ranks (select_each's k per group, which radix_pick_kernel counts down),
// the sources, and the items of the groups with use_group[g], on the device in
// one upload. The host tables are pinned and the copy is queued without
// waiting: a copy from pageable memory makes the host wait for everything
// queued on the stream (one cudaStreamSynchronize per op, the GPU then idle
// while the host prepares the next launch). The caching host allocator keeps
// the pinned block until the copy has run. The returned tensor owns the tables.
struct DeviceTables {
  at::Tensor blob;
  int64_t* ranks = nullptr;
  const Source* sources = nullptr;
  const Item* items = nullptr;
  int64_t n_items = 0;
};

// The blob is [ranks | sources | items]: each part starts 8-byte aligned.
static_assert(alignof(Source) <= alignof(int64_t) && alignof(Item) <= alignof(int64_t));
static_assert(sizeof(Source) % alignof(int64_t) == 0, "the items must stay aligned after the sources");

DeviceTables upload(
    const std::vector<Source>& sources,
    const std::vector<bool>& use_group,
    at::Device device,
    const std::vector<int64_t>& ranks = {}) {
  std::vector<Item> items;
  for (size_t i = 0; i < sources.size(); ++i) {
    if (!use_group[sources[i].group]) {
      continue;
    }
    for (int64_t b = 0; b < sources[i].numel; b += kItemElements) {
      items.push_back({b, std::min(sources[i].numel, b + kItemElements), static_cast<int32_t>(i), 0});
    }
  }
  TORCH_CHECK(
      static_cast<int64_t>(items.size()) <= std::numeric_limits<int32_t>::max(),
      "multiflow selection: too many elements for one launch");
  const size_t rank_bytes = ranks.size() * sizeof(int64_t);
  const size_t src_bytes = sources.size() * sizeof(Source);
  const size_t item_bytes = items.size() * sizeof(Item);
  const auto n_bytes = static_cast<int64_t>(rank_bytes + src_bytes + item_bytes);
  at::Tensor host = at::empty({n_bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  uint8_t* h = host.mutable_data_ptr<uint8_t>();
  const auto put = [&](size_t offset, const void* data, size_t bytes) {
    if (bytes != 0) {  // an empty vector's data() may be null, which memcpy must not see
      std::memcpy(h + offset, data, bytes);
    }
  };
  put(0, ranks.data(), rank_bytes);
  put(rank_bytes, sources.data(), src_bytes);
  put(rank_bytes + src_bytes, items.data(), item_bytes);
  DeviceTables t;
  t.blob = at::empty({n_bytes}, at::TensorOptions().dtype(at::kByte).device(device));
  t.blob.copy_(host, /*non_blocking=*/true);
  uint8_t* base = t.blob.mutable_data_ptr<uint8_t>();
  t.ranks = reinterpret_cast<int64_t*>(base);
  t.sources = reinterpret_cast<const Source*>(base + rank_bytes);
  t.items = reinterpret_cast<const Item*>(base + rank_bytes + src_bytes);
  t.n_items = static_cast<int64_t>(items.size());
  return t;
}

// out[g] = the ks[g]-th smallest (1-based) of group g's elements, -inf where ks[g] == 0.
at::Tensor select_each(const std::vector<Source>& sources, const std::vector<int64_t>& ks, at::Device device) {
  const auto n_groups = static_cast<int64_t>(ks.size());
  const auto dev = at::TensorOptions().device(device);
  at::Tensor out = at::empty({n_groups}, dev.dtype(at::kFloat));
  if (n_groups == 0) {
    return out;
  }
  std::vector<bool> active(n_groups);
  for (int64_t g = 0; g < n_groups; ++g) {
    active[g] = ks[g] >= 1;
  }
  const DeviceTables tables = upload(sources, active, device, ks);
  at::Tensor prefix = at::zeros({n_groups}, dev.dtype(at::kInt));
  at::Tensor hist = at::zeros({kRadixPasses, n_groups, kRadixBuckets}, dev.dtype(at::kLong));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  auto* hist_ptr = reinterpret_cast<unsigned long long*>(hist.mutable_data_ptr<int64_t>());
  auto* prefix_ptr = reinterpret_cast<uint32_t*>(prefix.mutable_data_ptr<int32_t>());
  for (int pass = 0; pass < kRadixPasses; ++pass) {
    const int bits = kRadixBits[pass];
    const int shift = kRadixShift[pass];
    unsigned long long* pass_hist = hist_ptr + pass * n_groups * kRadixBuckets;
    if (tables.n_items > 0) {
      radix_histogram_kernel<<<static_cast<unsigned>(tables.n_items), kThreads, 0, stream>>>(
          tables.sources, tables.items, prefix_ptr, shift + bits, shift, (1u << bits) - 1u, pass_hist);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    radix_pick_kernel<<<static_cast<unsigned>(ceil_div(n_groups * kWarp, kThreads)), kThreads, 0, stream>>>(
        pass_hist, n_groups, bits, tables.ranks, prefix_ptr,
        pass == kRadixPasses - 1 ? out.mutable_data_ptr<float>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

at::Tensor kth_smallest_group_cuda(at::TensorList values, int64_t k, bool absolute) {
  constexpr const char* op = "multiflow::kth_smallest_group";
  const FlatValues v = prepare_values(op, values);
  check_group_k(op, v, k);
  const c10::cuda::CUDAGuard guard(v.device);
  std::vector<Source> sources;
  for (const at::Tensor& t : v.tensors) {
    sources.push_back(values_source(t, 0, absolute));
  }
  return select_each(sources, {k}, v.device).reshape({});
}

at::Tensor kth_smallest_each_cuda(at::TensorList values, at::IntArrayRef ks, bool absolute) {
  constexpr const char* op = "multiflow::kth_smallest_each";
  const FlatValues v = prepare_values(op, values);
  check_ks(op, v.numels, ks);
  const c10::cuda::CUDAGuard guard(v.device);
  std::vector<Source> sources;
  for (size_t l = 0; l < v.tensors.size(); ++l) {
    sources.push_back(values_source(v.tensors[l], static_cast<int32_t>(l), absolute));
  }
  return select_each(sources, std::vector<int64_t>(ks.begin(), ks.end()), v.device);
}

at::Tensor flow_kth_each_cuda(
    at::TensorList weights,
    at::TensorList imp_out,
    at::TensorList imp_in,
    const at::Tensor& w_scale,
    at::IntArrayRef ks) {
  constexpr const char* op = "multiflow::flow_kth_each";
  const FlowLayers f = prepare_flow(op, weights, imp_out, imp_in, w_scale);
  check_ks(op, f.numels, ks);
  const c10::cuda::CUDAGuard guard(f.device);
  return select_each(flow_sources(f), std::vector<int64_t>(ks.begin(), ks.end()), f.device);
}

at::Tensor count_at_most_cuda(at::TensorList values, const at::Tensor& threshold, bool absolute) {
  constexpr const char* op = "multiflow::count_at_most";
  const FlatValues v = prepare_values(op, values);
  check_threshold(op, threshold, values.empty() ? threshold.device() : v.device);
  const c10::cuda::CUDAGuard guard(threshold.device());
  const auto n = static_cast<int64_t>(v.tensors.size());
  at::Tensor counts = at::zeros({n}, threshold.options().dtype(at::kLong));
  std::vector<Source> sources;
  for (int64_t l = 0; l < n; ++l) {
    sources.push_back(values_source(v.tensors[l], static_cast<int32_t>(l), absolute));
  }
  const DeviceTables tables = upload(sources, std::vector<bool>(n, true), threshold.device());
  if (tables.n_items > 0) {
    count_at_most_kernel<<<static_cast<unsigned>(tables.n_items), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        tables.sources, tables.items, threshold.const_data_ptr<float>(),
        reinterpret_cast<unsigned long long*>(counts.mutable_data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return counts;
}

std::vector<at::Tensor> flow_masks_cuda(
    at::TensorList weights,
    at::TensorList imp_out,
    at::TensorList imp_in,
    const at::Tensor& w_scale,
    const at::Tensor& thresholds) {
  constexpr const char* op = "multiflow::flow_masks";
  const FlowLayers f = prepare_flow(op, weights, imp_out, imp_in, w_scale);
  const auto n_layers = static_cast<int64_t>(f.weights.size());
  const at::Tensor th = prepare_thresholds(op, thresholds, n_layers, f.device);
  const c10::cuda::CUDAGuard guard(f.device);
  std::vector<Source> sources = flow_sources(f);
  std::vector<at::Tensor> masks;
  for (int64_t l = 0; l < n_layers; ++l) {
    masks.push_back(at::empty(f.weights[l].sizes(), f.weights[l].options().dtype(at::kBool)));
    sources[l].mask = masks.back().mutable_data_ptr<bool>();
  }
  const DeviceTables tables = upload(sources, std::vector<bool>(n_layers, true), f.device);
  if (tables.n_items > 0) {
    flow_masks_kernel<<<static_cast<unsigned>(tables.n_items), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        tables.sources, tables.items, th.const_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return masks;
}

at::Tensor nm_mask_cuda(const at::Tensor& scores, int64_t n, int64_t m) {
  const at::Tensor s = prepare_nm_scores(scores, n, m);
  const c10::cuda::CUDAGuard guard(s.device());
  const int64_t rows = s.size(0);
  const int64_t cols = s.size(1);
  at::Tensor keep = at::empty({rows, cols}, s.options().dtype(at::kBool));
  const int64_t n_threads = rows * (cols / m);
  if (n_threads == 0) {
    return keep;
  }
  const auto blocks = static_cast<unsigned>(ceil_div(n_threads, kThreads));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto launch = [&](auto dtype_tag) {
    using scalar_t = decltype(dtype_tag);
    nm_mask_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(s.const_data_ptr()), rows, cols, s.stride(0), n, m,
        keep.mutable_data_ptr<bool>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  switch (s.scalar_type()) {  // prepare_nm_scores has already rejected the rest
    case at::kFloat:
      launch(float{});
      break;
    case at::kHalf:
      launch(c10::Half{});
      break;
    default:
      launch(c10::BFloat16{});
      break;
  }
  return keep;
}

}  // namespace

TORCH_LIBRARY_IMPL(multiflow, CUDA, m) {
  m.impl("kth_smallest_group", &kth_smallest_group_cuda);
  m.impl("kth_smallest_each", &kth_smallest_each_cuda);
  m.impl("count_at_most", &count_at_most_cuda);
  m.impl("flow_kth_each", &flow_kth_each_cuda);
  m.impl("flow_masks", &flow_masks_cuda);
  m.impl("nm_mask", &nm_mask_cuda);
}

}  // namespace multiflow::cuda
