// flow_importance and flow_scores on CPU: every layer of the list is cut into
// tiles, and each pass runs the tiles of all layers in one at::parallel_for,
// so many small layers and one huge layer both keep every thread busy.
//
// Passes (a tile is a block of rows x at most kFlowColBlock columns of one
// layer, ~kTileElements elements; see flow_tile.h):
//   1. per tile: max |w|                                  -> tile_max
//   2. per layer: w_scale from its tile maxima (in tile order) and the scaled
//      r = sqrt(max(a, 0)) * pow2_scale(r) (all zero stays all zero: then every
//      score of the layer is 0, and the tie rule prunes the whole layer, as the
//      contract's formulas say; the sqrt is torch's own, see there)
//   3. per tile: A = (|w| * w_scale) * r; float64 row sums and column sums of
//      the tile                                           -> row / column partials
//   4. per output element: its partials added in tile order, divided by the
//      count in float64, rounded once to float32          -> imp_out, imp_in
//   5. (flow_scores) per tile: (imp_out_i * (|w_ij| * w_scale)) * imp_in_j
//
// Determinism. The tiling depends only on the shapes, never on the thread
// count, and every sum runs in an order fixed by the tiling, so the results are
// bitwise the same with 1 or 64 threads.
//
// Exactness against the reference (torch.equal, not just close). The float32
// products A_ij are the reference's bit for bit (flow_tile_impl.h). Their sums
// are float64 in both, in different orders: two orders can differ by at most
// about n * 2^-53 relative (n terms, all >= 0 so nothing cancels), typically
// sqrt(n) * 2^-53, while float32 rounding points are 2^-24 apart. The float32
// results differ only if a rounding point falls between the two float64 sums:
// odds of roughly sqrt(n) * 2^-29 per element (~1e-7 for n = 3072), and in
// practice far less, because sums of 24-bit products spanning few binades are
// often exact in float64 whatever the order. Tests compare with torch.equal on
// many random shapes.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "ceil_div.h"
#include "cpu/dispatch_activation.h"
#include "cpu/flow_tile.h"
#include "cpu/isa.h"
#include "flow.h"

namespace multiflow::cpu {
namespace {

// Elements per tile: big enough that a tile costs far more than its dispatch
// and its partial sums (one double per row and per column) are small next to
// its data, small enough that a 768 x 768 layer still makes ~9 tiles.
constexpr int64_t kTileElements = int64_t{1} << 16;
// Below about this many elements a parallel region costs more than it saves.
constexpr int64_t kMinParallelElements = int64_t{1} << 15;
// pow2_scale's exponent range: 2^-e stays a normal float32.
constexpr int kMaxExp = 126;

const FlowTiles& tiles() {
  static const FlowTiles table = MULTIFLOW_ISA_TABLE(flow_tiles);
  return table;
}

const FlowTileFns& fns_for(at::ScalarType dtype) {
  return for_activation_dtype("multiflow flow ops (weights)", tiles(), dtype);
}

// reference.pow2_scale given max|t| (NaN when t has a NaN): 2^-e with
// max|t| * 2^-e in [0.5, 1), e clamped to [-126, 126]; 1 for 0 or non-finite.
float pow2_scale_of_max(float m) {
  if (m == 0.0f || !std::isfinite(m)) {
    return 1.0f;
  }
  int e = 0;
  std::frexp(m, &e);
  e = std::clamp(e, -kMaxExp, kMaxExp);
  return std::ldexp(1.0f, -e);
}

// NaN-propagating max, as torch.max.
float nan_max(float a, float b) {
  return (std::isnan(a) || a >= b) ? a : b;
}

// One layer's tiling and its slices of the shared buffers.
struct LayerPlan {
  const char* w = nullptr;
  int64_t elem_size = 0;
  const FlowTileFns* fns = nullptr;
  at::Tensor a;  // act_sq_norms[l], contiguous float32 (cols,)
  int64_t rows = 0, cols = 0, row_stride = 0;
  int64_t block_rows = 0, block_cols = 0;
  int64_t n_rb = 0, n_cb = 0;  // row blocks, column blocks (0 for an empty weight)
  int64_t tile_begin = 0;      // index of its first tile among all layers' tiles
  int64_t r_off = 0;           // its r: cols floats
  int64_t row_part_off = 0;    // its row partials: n_cb x rows doubles
  int64_t col_part_off = 0;    // its column partials: n_rb x cols doubles

  const char* tile_ptr(int64_t r0, int64_t c0) const {
    return w + (r0 * row_stride + c0) * elem_size;
  }
};

struct Tile {
  const LayerPlan* layer;
  int64_t rb, cb;        // block coordinates
  int64_t r0, c0;        // first row / column
  int64_t rows, cols;    // extent
};

struct FlowPlan {
  std::vector<LayerPlan> layers;
  std::vector<int64_t> tile_begins;  // layers[l].tile_begin, for the tile -> layer search
  int64_t n_tiles = 0;
  int64_t n_elements = 0;
  int64_t r_size = 0, row_part_size = 0, col_part_size = 0;

  Tile tile(int64_t t) const {
    const auto l = std::upper_bound(tile_begins.begin(), tile_begins.end(), t) - tile_begins.begin() - 1;
    const LayerPlan& p = layers[l];
    const int64_t local = t - p.tile_begin;
    const int64_t rb = local / p.n_cb, cb = local % p.n_cb;
    const int64_t r0 = rb * p.block_rows, c0 = cb * p.block_cols;
    return Tile{&p, rb, cb, r0, c0, std::min(p.block_rows, p.rows - r0), std::min(p.block_cols, p.cols - c0)};
  }

  // Grain of a parallel_for over tiles: chunks of at least kMinParallelElements.
  int64_t tile_grain() const {
    return n_elements == 0 ? 1 : std::max<int64_t>(1, kMinParallelElements * n_tiles / n_elements);
  }
};

FlowPlan plan_flow(const std::vector<FlowLayer>& layers) {
  FlowPlan plan;
  plan.layers.reserve(layers.size());
  for (const FlowLayer& in : layers) {
    LayerPlan p;
    p.w = static_cast<const char*>(in.w.const_data_ptr());
    p.elem_size = in.w.element_size();
    p.fns = &fns_for(in.w.scalar_type());
    p.a = in.a;
    p.rows = in.rows;
    p.cols = in.cols;
    p.row_stride = in.row_stride;
    if (p.rows > 0 && p.cols > 0) {
      p.block_cols = std::min(p.cols, kFlowColBlock);
      p.block_rows = std::max<int64_t>(1, kTileElements / p.block_cols);
      p.n_rb = ceil_div(p.rows, p.block_rows);
      p.n_cb = ceil_div(p.cols, p.block_cols);
    }
    p.tile_begin = plan.n_tiles;
    p.r_off = plan.r_size;
    p.row_part_off = plan.row_part_size;
    p.col_part_off = plan.col_part_size;
    plan.n_tiles += p.n_rb * p.n_cb;
    plan.n_elements += p.rows * p.cols;
    plan.r_size += p.cols;
    plan.row_part_size += p.n_cb * p.rows;
    plan.col_part_size += p.n_rb * p.cols;
    plan.tile_begins.push_back(p.tile_begin);
    plan.layers.push_back(p);
  }
  return plan;
}

// Passes 1-4. imp_out / imp_in / w_scale are written in place.
void importance(
    const FlowPlan& plan,
    const std::vector<at::Tensor>& imp_out,
    const std::vector<at::Tensor>& imp_in,
    const at::Tensor& w_scale) {
  const auto n_layers = static_cast<int64_t>(plan.layers.size());
  const at::TensorOptions f32 = at::TensorOptions().dtype(at::kFloat);
  const at::TensorOptions f64 = at::TensorOptions().dtype(at::kDouble);

  // 1. max |w| per tile.
  std::vector<float> tile_max(plan.n_tiles);
  at::parallel_for(0, plan.n_tiles, plan.tile_grain(), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const Tile tile = plan.tile(t);
      const LayerPlan& p = *tile.layer;
      tile_max[t] = p.fns->abs_max(p.tile_ptr(tile.r0, tile.c0), p.row_stride, tile.rows, tile.cols);
    }
  });

  // 2. w_scale and r per layer (O(cols) each: small next to the weights).
  // sqrt(clamp_min(a, 0)) is torch's own, called per layer exactly as the
  // reference calls it: torch's CPU sqrt is not always correctly rounded (MKL /
  // vectorised math, ~15% of float32 inputs 1 ulp off here), and A must
  // equal the reference's bit for bit. Called here, outside any parallel region.
  std::vector<at::Tensor> root_a(n_layers);
  for (int64_t l = 0; l < n_layers; ++l) {
    root_a[l] = at::sqrt(at::clamp_min(plan.layers[l].a, 0));
  }
  at::Tensor r_buf = at::empty({plan.r_size}, f32);
  float* r_all = r_buf.mutable_data_ptr<float>();
  float* scale = w_scale.mutable_data_ptr<float>();
  at::parallel_for(0, n_layers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t l = begin; l < end; ++l) {
      const LayerPlan& p = plan.layers[l];
      float m = 0.0f;
      for (int64_t t = p.tile_begin; t < p.tile_begin + p.n_rb * p.n_cb; ++t) {
        m = nan_max(m, tile_max[t]);
      }
      scale[l] = pow2_scale_of_max(m);

      // r scaled by a power of two (exact; an all-zero r stays zero).
      const float* root = root_a[l].const_data_ptr<float>();
      float* r = r_all + p.r_off;
      float r_max = 0.0f;
      for (int64_t j = 0; j < p.cols; ++j) {
        r_max = nan_max(r_max, root[j]);
      }
      const float r_scale = pow2_scale_of_max(r_max);
      for (int64_t j = 0; j < p.cols; ++j) {
        r[j] = root[j] * r_scale;
      }
    }
  });

  // 3. float64 row and column sums of A per tile.
  at::Tensor row_buf = at::empty({plan.row_part_size}, f64);
  at::Tensor col_buf = at::empty({plan.col_part_size}, f64);
  double* row_part = row_buf.mutable_data_ptr<double>();
  double* col_part = col_buf.mutable_data_ptr<double>();
  at::parallel_for(0, plan.n_tiles, plan.tile_grain(), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const Tile tile = plan.tile(t);
      const LayerPlan& p = *tile.layer;
      p.fns->importance(
          p.tile_ptr(tile.r0, tile.c0),
          p.row_stride,
          tile.rows,
          tile.cols,
          scale[&p - plan.layers.data()],
          r_all + p.r_off + tile.c0,
          row_part + p.row_part_off + tile.cb * p.rows + tile.r0,
          col_part + p.col_part_off + tile.rb * p.cols + tile.c0);
    }
  });

  // 4. Means. Output element e of a segment (one imp_out or imp_in vector) is
  // the sum of its n_parts partials (parts[k * len + e], k in order) divided by
  // count in float64, then rounded to float32, as the reference does.
  struct Segment {
    const double* parts;
    int64_t n_parts, len, count;
    float* out;
  };
  std::vector<Segment> segments;
  std::vector<int64_t> seg_begins;
  int64_t n_out = 0;
  for (int64_t l = 0; l < n_layers; ++l) {
    const LayerPlan& p = plan.layers[l];
    for (const Segment& s : {
             Segment{row_part + p.row_part_off, p.n_cb, p.rows, std::max<int64_t>(p.cols, 1),
                     imp_out[l].mutable_data_ptr<float>()},
             Segment{col_part + p.col_part_off, p.n_rb, p.cols, std::max<int64_t>(p.rows, 1),
                     imp_in[l].mutable_data_ptr<float>()},
         }) {
      segments.push_back(s);
      seg_begins.push_back(n_out);
      n_out += s.len;
    }
  }
  at::parallel_for(0, n_out, kMinParallelElements / 8, [&](int64_t begin, int64_t end) {
    auto seg = std::upper_bound(seg_begins.begin(), seg_begins.end(), begin) - seg_begins.begin() - 1;
    for (int64_t e = begin; e < end; ++e) {
      while (e - seg_begins[seg] >= segments[seg].len) {
        ++seg;  // skips empty segments too
      }
      const Segment& s = segments[seg];
      const int64_t i = e - seg_begins[seg];
      double sum = 0.0;
      for (int64_t k = 0; k < s.n_parts; ++k) {
        sum += s.parts[k * s.len + i];
      }
      s.out[i] = static_cast<float>(sum / static_cast<double>(s.count));
    }
  });
}

struct Importances {
  std::vector<at::Tensor> imp_out, imp_in;
  at::Tensor w_scale;
};

Importances run_importance(const FlowPlan& plan) {
  const at::TensorOptions f32 = at::TensorOptions().dtype(at::kFloat);
  Importances out;
  for (const LayerPlan& p : plan.layers) {
    out.imp_out.push_back(at::empty({p.rows}, f32));
    out.imp_in.push_back(at::empty({p.cols}, f32));
  }
  out.w_scale = at::empty({static_cast<int64_t>(plan.layers.size())}, f32);
  importance(plan, out.imp_out, out.imp_in, out.w_scale);
  return out;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor> flow_importance_cpu(
    at::TensorList weights,
    at::TensorList act_sq_norms) {
  const std::vector<FlowLayer> layers = prepare_flow("multiflow::flow_importance", weights, act_sq_norms);
  Importances imp = run_importance(plan_flow(layers));
  return {std::move(imp.imp_out), std::move(imp.imp_in), std::move(imp.w_scale)};
}

std::vector<at::Tensor> flow_scores_cpu(at::TensorList weights, at::TensorList act_sq_norms) {
  const std::vector<FlowLayer> layers = prepare_flow("multiflow::flow_scores", weights, act_sq_norms);
  const FlowPlan plan = plan_flow(layers);
  const Importances imp = run_importance(plan);

  std::vector<at::Tensor> scores;
  std::vector<float*> out;
  for (const LayerPlan& p : plan.layers) {
    scores.push_back(at::empty({p.rows, p.cols}, at::TensorOptions().dtype(at::kFloat)));
    out.push_back(scores.back().mutable_data_ptr<float>());
  }
  const float* scale = imp.w_scale.const_data_ptr<float>();
  // 5. Scores per tile.
  at::parallel_for(0, plan.n_tiles, plan.tile_grain(), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const Tile tile = plan.tile(t);
      const LayerPlan& p = *tile.layer;
      const int64_t l = &p - plan.layers.data();
      p.fns->scores(
          p.tile_ptr(tile.r0, tile.c0),
          p.row_stride,
          tile.rows,
          tile.cols,
          scale[l],
          imp.imp_out[l].const_data_ptr<float>() + tile.r0,
          imp.imp_in[l].const_data_ptr<float>() + tile.c0,
          out[l] + tile.r0 * p.cols + tile.c0,
          p.cols);
    }
  });
  return scores;
}

}  // namespace

TORCH_LIBRARY_IMPL(multiflow, CPU, m) {
  m.impl("flow_importance", &flow_importance_cpu);
  m.impl("flow_scores", &flow_scores_cpu);
}

}  // namespace multiflow::cpu
