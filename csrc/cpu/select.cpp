// The selection ops on CPU.
//
// k-th smallest, exactly and without a sort or a concatenation: a radix select
// on the order keys of select_key.h. The members (tensors, or flow-score
// layers whose scores are computed on the fly and never stored) are cut into
// work items of kItemElements; at::parallel_for runs the items, each counts
// into a local histogram and adds it into its group's histogram (a group is
// the whole list for kth_smallest_group, one tensor for the *_each ops, so
// every tensor's passes run together). Between passes the bucket holding the
// k-th element is picked per group on the host side.
//
// Passes over memory. Pass 0 reads every element. Where the picked bucket of
// a group holds few elements (at most 1/kCompactRatio of them, the usual case
// for weights and scores), one more read gathers their keys into a compact
// buffer and passes 1 and 2 run on it; otherwise (heavy ties) they read the
// members again. So two full reads typically, three at most.
//
// Determinism. Histograms hold integer counts, so their sums do not depend on
// the order in which items add them: the answer is the same for any thread
// count (the compact buffer's order may vary, which no count depends on).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "cpu/isa.h"
#include "cpu/select_tile.h"
#include "select.h"

namespace multiflow::cpu {
namespace {

// Elements per work item: enough to amortise a local histogram's merge
// (kRadixBuckets adds), small enough to spread over the threads.
constexpr int64_t kItemElements = int64_t{1} << 16;
// A group whose pass-0 bucket holds at most numel / kCompactRatio elements has
// its remaining passes run on a compact copy of those elements' keys.
constexpr int64_t kCompactRatio = 8;

const SelectTiles& tiles() {
  static const SelectTiles table = MULTIFLOW_ISA_TABLE(select_tiles);
  return table;
}

int dtype_index(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return 0;
    case at::kHalf:
      return 1;
    case at::kBFloat16:
      return 2;
    default:
      TORCH_CHECK(false, "multiflow selection: no CPU kernel for dtype ", dtype);
  }
}

// Where the elements of one member come from.
struct Source {
  enum class Kind { kValues, kFlow, kKeys };
  Kind kind = Kind::kValues;
  int64_t group = 0;
  int64_t numel = 0;
  const char* data = nullptr;  // values: flat buffer; flow: the weight; keys: uint32 keys
  int64_t elem_size = 4;
  int dtype = 0;               // index into the tile tables
  bool absolute = false;       // values: select on |v|
  // Flow: element e is (i, j) = (e / cols, e % cols) of the weight.
  int64_t cols = 0;
  int64_t row_stride = 0;
  const float* imp_out = nullptr;
  const float* imp_in = nullptr;
  float scale = 1.0f;
};

struct Item {
  int64_t source;
  int64_t begin;
  int64_t end;
};

std::vector<Item> items_of(const std::vector<Source>& sources, const std::vector<bool>& group_active) {
  std::vector<Item> items;
  for (size_t s = 0; s < sources.size(); ++s) {
    if (!group_active[sources[s].group]) {
      continue;
    }
    for (int64_t b = 0; b < sources[s].numel; b += kItemElements) {
      items.push_back({static_cast<int64_t>(s), b, std::min(sources[s].numel, b + kItemElements)});
    }
  }
  return items;
}

Source values_source(const at::Tensor& t, int64_t group, bool absolute) {
  Source s;
  s.kind = Source::Kind::kValues;
  s.group = group;
  s.numel = t.numel();
  s.data = static_cast<const char*>(t.const_data_ptr());
  s.elem_size = t.element_size();
  s.dtype = dtype_index(t.scalar_type());
  s.absolute = absolute;
  return s;
}

std::vector<Source> flow_sources(const FlowLayers& f) {
  const float* scales = f.w_scale.const_data_ptr<float>();
  std::vector<Source> sources;
  for (size_t l = 0; l < f.weights.size(); ++l) {
    const at::Tensor& w = f.weights[l];
    Source s;
    s.kind = Source::Kind::kFlow;
    s.group = static_cast<int64_t>(l);
    s.numel = w.numel();
    s.data = static_cast<const char*>(w.const_data_ptr());
    s.elem_size = w.element_size();
    s.dtype = dtype_index(w.scalar_type());
    s.cols = w.size(1);
    s.row_stride = w.stride(0);
    s.imp_out = f.imp_out[l].const_data_ptr<float>();
    s.imp_in = f.imp_in[l].const_data_ptr<float>();
    s.scale = scales[l];
    sources.push_back(s);
  }
  return sources;
}

// The float32 values (or flow scores) of elements [begin, begin + n) of s,
// n <= kSelectBlock: in s's own memory where it holds them as they are, else
// written to buf.
const float* floats_of(const Source& s, int64_t begin, int64_t n, float* buf) {
  const SelectTiles& t = tiles();
  if (s.kind == Source::Kind::kValues) {
    const char* p = s.data + begin * s.elem_size;
    if (s.dtype == 0 && !s.absolute) {
      return reinterpret_cast<const float*>(p);
    }
    t.to_float[s.dtype](p, n, s.absolute, buf);
    return buf;
  }
  // Flow: row by row, since imp_out changes with the row and imp_in restarts.
  for (int64_t done = 0; done < n;) {
    const int64_t e = begin + done;
    const int64_t i = e / s.cols;
    const int64_t j = e - i * s.cols;
    const int64_t len = std::min(s.cols - j, n - done);
    t.flow_score[s.dtype](
        s.data + (i * s.row_stride + j) * s.elem_size, len, s.imp_out[i], s.scale, s.imp_in + j, buf + done);
    done += len;
  }
  return buf;
}

// Scratch of one thread: a block of floats, one of keys, one of gathered
// keys, and the radix histogram copies of the item it is counting (44 KiB).
struct Scratch {
  float f[kSelectBlock];
  uint32_t keys[kSelectBlock];
  uint32_t matches[kSelectBlock];
  uint32_t hist[kHistogramCopies * kRadixBuckets];
};

// The order keys of elements [begin, begin + n) of s, n <= kSelectBlock.
const uint32_t* keys_of(const Source& s, int64_t begin, int64_t n, Scratch& scratch) {
  if (s.kind == Source::Kind::kKeys) {
    return reinterpret_cast<const uint32_t*>(s.data) + begin;
  }
  if (s.kind == Source::Kind::kValues && s.dtype == 0) {  // float32: keys straight from memory
    tiles().float_keys(reinterpret_cast<const float*>(s.data) + begin, n, s.absolute, scratch.keys);
    return scratch.keys;
  }
  tiles().float_keys(floats_of(s, begin, n, scratch.f), n, false, scratch.keys);
  return scratch.keys;
}

// Runs the items in parallel: body(item_index, source, scratch, pos, n) for
// each block [pos, pos + n) of each item (n <= kSelectBlock), then
// item_done(source, scratch) once the item's blocks are through.
template <typename Body, typename ItemDone>
void for_each_block(
    const std::vector<Source>& sources, const std::vector<Item>& items, const Body& body, const ItemDone& item_done) {
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t first, int64_t last) {
    Scratch scratch;
    for (int64_t it = first; it < last; ++it) {
      const Item& item = items[it];
      const Source& s = sources[item.source];
      for (int64_t pos = item.begin; pos < item.end; pos += kSelectBlock) {
        body(it, s, scratch, pos, std::min(kSelectBlock, item.end - pos));
      }
      item_done(s, scratch);
    }
  });
}

template <typename Body>
void for_each_block(const std::vector<Source>& sources, const std::vector<Item>& items, const Body& body) {
  for_each_block(sources, items, body, [](const Source&, Scratch&) {});
}

// Relaxed atomic add on a plain int64_t; returns the previous value. std::atomic_ref is
// C++20, and torch releases before 2.14 build extensions as C++17.
int64_t fetch_add_relaxed(int64_t& target, int64_t value) {
#if defined(__cpp_lib_atomic_ref)
  return std::atomic_ref<int64_t>(target).fetch_add(value, std::memory_order_relaxed);
#else
  return __atomic_fetch_add(&target, value, __ATOMIC_RELAXED);
#endif
}

// Per group: the state of its radix select.
struct RadixState {
  std::vector<int64_t> k;        // rank still sought inside the current prefix (1-based)
  std::vector<uint32_t> prefix;  // key bits chosen so far
  std::vector<int64_t> count;    // elements that share the prefix
  std::vector<bool> active;      // k >= 1
};

// Pass `pass` over `items`: counts the digit of every key that shares its
// group's prefix, then extends each active group's prefix by the digit of the
// bucket where the k-th element lies.
void radix_pass(const std::vector<Source>& sources, const std::vector<Item>& items, int pass, RadixState& st) {
  const int bits = kRadixBits[pass];
  const int shift = kRadixShift[pass];
  const int high_shift = shift + bits;
  const int64_t n_buckets = int64_t{1} << bits;
  const uint32_t digit_mask = static_cast<uint32_t>(n_buckets - 1);
  const auto n_groups = static_cast<int64_t>(st.k.size());
  std::vector<int64_t> hist(n_groups * kRadixBuckets, 0);

  for_each_block(
      sources,
      items,
      [&](int64_t it, const Source& s, Scratch& scratch, int64_t pos, int64_t n) {
        if (pos == items[it].begin) {
          std::fill(std::begin(scratch.hist), std::end(scratch.hist), 0u);
        }
        tiles().histogram(
            keys_of(s, pos, n, scratch), n, high_shift, st.prefix[s.group], shift, digit_mask, scratch.hist);
      },
      // The item's counts go into its group's histogram: integer sums, so the
      // order in which items add them does not matter.
      [&](const Source& s, Scratch& scratch) {
        int64_t* group_hist = hist.data() + s.group * kRadixBuckets;
        for (int64_t b = 0; b < n_buckets; ++b) {
          int64_t sum = 0;
          for (int64_t c = 0; c < kHistogramCopies; ++c) {
            sum += scratch.hist[c * kRadixBuckets + b];
          }
          if (sum != 0) {
            fetch_add_relaxed(group_hist[b], sum);
          }
        }
      });

  for (int64_t g = 0; g < n_groups; ++g) {
    if (!st.active[g]) {
      continue;
    }
    const int64_t* h = hist.data() + g * kRadixBuckets;
    int64_t below = 0;
    int64_t b = 0;
    while (b < n_buckets - 1 && below + h[b] < st.k[g]) {
      below += h[b++];
    }
    st.k[g] -= below;
    st.prefix[g] = (st.prefix[g] << bits) | static_cast<uint32_t>(b);
    st.count[g] = h[b];
  }
}

// After pass 0: the groups whose bucket is small get their remaining elements'
// keys copied into compact buffers, which replace their sources.
void compact_small_buckets(
    std::vector<Source>& sources,
    const std::vector<int64_t>& group_numel,
    const RadixState& st,
    std::vector<std::vector<uint32_t>>& buffers) {
  const auto n_groups = static_cast<int64_t>(st.k.size());
  std::vector<bool> compact(n_groups, false);
  bool any = false;
  for (int64_t g = 0; g < n_groups; ++g) {
    compact[g] = st.active[g] && st.count[g] <= group_numel[g] / kCompactRatio;
    any = any || compact[g];
  }
  if (!any) {
    return;
  }
  buffers.assign(n_groups, {});
  std::vector<int64_t> cursor(n_groups, 0);
  for (int64_t g = 0; g < n_groups; ++g) {
    if (compact[g]) {
      buffers[g].resize(st.count[g]);
    }
  }
  const int high_shift = kRadixShift[0];
  const std::vector<Item> items = items_of(sources, compact);
  for_each_block(sources, items, [&](int64_t, const Source& s, Scratch& scratch, int64_t pos, int64_t n) {
    const int64_t found =
        tiles().gather(keys_of(s, pos, n, scratch), n, high_shift, st.prefix[s.group], scratch.matches);
    if (found > 0) {
      const int64_t offset = fetch_add_relaxed(cursor[s.group], found);
      std::memcpy(buffers[s.group].data() + offset, scratch.matches, found * sizeof(uint32_t));
    }
  });

  std::vector<Source> kept;
  for (const Source& s : sources) {
    if (!compact[s.group]) {
      kept.push_back(s);
    }
  }
  for (int64_t g = 0; g < n_groups; ++g) {
    if (compact[g]) {
      Source s;
      s.kind = Source::Kind::kKeys;
      s.group = g;
      s.numel = st.count[g];
      s.data = reinterpret_cast<const char*>(buffers[g].data());
      kept.push_back(s);
    }
  }
  sources = std::move(kept);
}

// For every group g with ks[g] >= 1: the key of the ks[g]-th smallest (1-based)
// element of the group's sources; 0 for the others.
std::vector<uint32_t> select_keys(std::vector<Source> sources, const std::vector<int64_t>& ks) {
  const auto n_groups = static_cast<int64_t>(ks.size());
  RadixState st{ks, std::vector<uint32_t>(n_groups, 0), std::vector<int64_t>(n_groups, 0), std::vector<bool>(n_groups)};
  std::vector<int64_t> group_numel(n_groups, 0);
  for (const Source& s : sources) {
    group_numel[s.group] += s.numel;
  }
  for (int64_t g = 0; g < n_groups; ++g) {
    st.active[g] = ks[g] >= 1;
  }
  std::vector<std::vector<uint32_t>> buffers;  // owns the compact keys
  for (int pass = 0; pass < kRadixPasses; ++pass) {
    if (pass == 1) {
      compact_small_buckets(sources, group_numel, st, buffers);
    }
    radix_pass(sources, items_of(sources, st.active), pass, st);
  }
  return st.prefix;
}

// out[g] = the float of keys[g], or -inf where ks[g] == 0.
at::Tensor floats_of_keys(const std::vector<uint32_t>& keys, const std::vector<int64_t>& ks) {
  at::Tensor out = at::empty({static_cast<int64_t>(keys.size())}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.mutable_data_ptr<float>();
  for (size_t g = 0; g < keys.size(); ++g) {
    o[g] = ks[g] >= 1 ? float_of_key(keys[g]) : -std::numeric_limits<float>::infinity();
  }
  return out;
}

at::Tensor kth_smallest_group_cpu(at::TensorList values, int64_t k, bool absolute) {
  constexpr const char* op = "multiflow::kth_smallest_group";
  const FlatValues v = prepare_values(op, values);
  check_group_k(op, v, k);
  std::vector<Source> sources;
  for (const at::Tensor& t : v.tensors) {
    sources.push_back(values_source(t, 0, absolute));
  }
  const std::vector<int64_t> ks{k};
  return floats_of_keys(select_keys(std::move(sources), ks), ks).reshape({});
}

at::Tensor kth_smallest_each_cpu(at::TensorList values, at::IntArrayRef ks, bool absolute) {
  constexpr const char* op = "multiflow::kth_smallest_each";
  const FlatValues v = prepare_values(op, values);
  check_ks(op, v.numels, ks);
  std::vector<Source> sources;
  for (size_t l = 0; l < v.tensors.size(); ++l) {
    sources.push_back(values_source(v.tensors[l], static_cast<int64_t>(l), absolute));
  }
  const std::vector<int64_t> k(ks.begin(), ks.end());
  return floats_of_keys(select_keys(std::move(sources), k), k);
}

at::Tensor flow_kth_each_cpu(
    at::TensorList weights,
    at::TensorList imp_out,
    at::TensorList imp_in,
    const at::Tensor& w_scale,
    at::IntArrayRef ks) {
  constexpr const char* op = "multiflow::flow_kth_each";
  const FlowLayers f = prepare_flow(op, weights, imp_out, imp_in, w_scale);
  check_ks(op, f.numels, ks);
  const std::vector<int64_t> k(ks.begin(), ks.end());
  return floats_of_keys(select_keys(flow_sources(f), k), k);
}

at::Tensor count_at_most_cpu(at::TensorList values, const at::Tensor& threshold, bool absolute) {
  constexpr const char* op = "multiflow::count_at_most";
  const FlatValues v = prepare_values(op, values);
  check_threshold(op, threshold, values.empty() ? threshold.device() : v.device);
  const float t = threshold.item<float>();
  const auto n_tensors = static_cast<int64_t>(v.tensors.size());
  std::vector<Source> sources;
  for (int64_t l = 0; l < n_tensors; ++l) {
    sources.push_back(values_source(v.tensors[l], l, absolute));
  }
  const std::vector<Item> items = items_of(sources, std::vector<bool>(n_tensors, true));
  std::vector<int64_t> item_counts(items.size(), 0);
  for_each_block(sources, items, [&](int64_t it, const Source& s, Scratch& scratch, int64_t pos, int64_t n) {
    item_counts[it] += tiles().count_at_most(floats_of(s, pos, n, scratch.f), n, t);
  });
  at::Tensor out = at::zeros({n_tensors}, at::TensorOptions().dtype(at::kLong));
  int64_t* o = out.mutable_data_ptr<int64_t>();
  for (size_t it = 0; it < items.size(); ++it) {
    o[sources[items[it].source].group] += item_counts[it];
  }
  return out;
}

std::vector<at::Tensor> flow_masks_cpu(
    at::TensorList weights,
    at::TensorList imp_out,
    at::TensorList imp_in,
    const at::Tensor& w_scale,
    const at::Tensor& thresholds) {
  constexpr const char* op = "multiflow::flow_masks";
  const FlowLayers f = prepare_flow(op, weights, imp_out, imp_in, w_scale);
  const auto n_layers = static_cast<int64_t>(f.weights.size());
  const at::Tensor th = prepare_thresholds(op, thresholds, n_layers, f.device);
  const float* t = th.const_data_ptr<float>();
  std::vector<at::Tensor> masks;
  std::vector<bool*> out;
  for (const at::Tensor& w : f.weights) {
    masks.push_back(at::empty(w.sizes(), w.options().dtype(at::kBool)));
    out.push_back(masks.back().mutable_data_ptr<bool>());
  }
  const std::vector<Source> sources = flow_sources(f);
  const std::vector<Item> items = items_of(sources, std::vector<bool>(n_layers, true));
  for_each_block(sources, items, [&](int64_t, const Source& s, Scratch& scratch, int64_t pos, int64_t n) {
    tiles().greater_than(floats_of(s, pos, n, scratch.f), n, t[s.group], out[s.group] + pos);
  });
  return masks;
}

// One group of m > kNmRankMaxM keys: keep the n largest, by a stable sort.
void nm_group_by_sort(const uint32_t* u, int64_t n, int64_t m, std::vector<int64_t>& order, bool* keep) {
  order.resize(m);
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(), [u](int64_t a, int64_t b) { return u[a] > u[b]; });
  for (int64_t r = 0; r < m; ++r) {
    keep[order[r]] = r < n;
  }
}

at::Tensor nm_mask_cpu(const at::Tensor& scores, int64_t n, int64_t m) {
  const at::Tensor s = prepare_nm_scores(scores, n, m);
  const int64_t rows = s.size(0);
  const int64_t cols = s.size(1);
  at::Tensor keep = at::empty({rows, cols}, s.options().dtype(at::kBool));
  if (keep.numel() == 0) {
    return keep;
  }
  const char* base = static_cast<const char*>(s.const_data_ptr());
  const int64_t elem_size = s.element_size();
  const int64_t row_stride = s.stride(0);
  const int dtype = dtype_index(s.scalar_type());
  bool* out = keep.mutable_data_ptr<bool>();
  const int64_t grain = std::max<int64_t>(1, kItemElements / cols);
  at::parallel_for(0, rows, grain, [&](int64_t first, int64_t last) {
    float buf[kSelectBlock];
    std::vector<uint32_t> keys(cols);
    std::vector<int64_t> order;
    for (int64_t r = first; r < last; ++r) {
      const char* row = base + r * row_stride * elem_size;
      for (int64_t c = 0; c < cols; c += kSelectBlock) {
        const int64_t len = std::min(kSelectBlock, cols - c);
        tiles().to_float[dtype](row + c * elem_size, len, false, buf);
        tiles().float_keys(buf, len, false, keys.data() + c);
      }
      bool* keep_row = out + r * cols;
      if (m <= kNmRankMaxM) {
        tiles().nm_row(keys.data(), cols / m, n, m, keep_row);
      } else {
        for (int64_t g = 0; g < cols / m; ++g) {
          nm_group_by_sort(keys.data() + g * m, n, m, order, keep_row + g * m);
        }
      }
    }
  });
  return keep;
}

}  // namespace

TORCH_LIBRARY_IMPL(multiflow, CPU, m) {
  m.impl("kth_smallest_group", &kth_smallest_group_cpu);
  m.impl("kth_smallest_each", &kth_smallest_each_cpu);
  m.impl("count_at_most", &count_at_most_cpu);
  m.impl("flow_kth_each", &flow_kth_each_cpu);
  m.impl("flow_masks", &flow_masks_cpu);
  m.impl("nm_mask", &nm_mask_cpu);
}

}  // namespace multiflow::cpu
