// Autograd for the linear ops over the inference formats, bitmap_linear and
// sparse24_linear (masked_linear, the fine-tuning format, has its own: ops.py).
//
// Without it, a model whose sparse layers are frozen would train nothing in
// front of them: gradients stopped at these ops (torch's fallback only warns),
// so an adapter, a prompt or a head before a sparsified layer got no gradient
// and the layer's bias none either. Here, for y = x @ W.T + bias:
//   grad_x    = grad_y @ W             (W decoded by the format's unpack op),
//   grad_bias = grad_y summed over the rows,
//   bitmap_linear only: grad_values = (grad_y^T @ x) at the kept places, in
//   values' order (row-major), so the kept weights can be fine-tuned in place
//   and the pruned ones stay pruned.
// sparse24_linear is not differentiable in its values: a 2:4 group keeping
// fewer than 2 weights fills its slots with zeros at unused positions, which
// look like kept zeros; asking for that gradient raises (fine-tune with
// format="masked"). Integer tensors (bits, offsets, metadata) get none.
// Products are summed in float32 and rounded once to the input's dtype, as
// the forward does. The backward is plain ATen (matmul, sum, masked_select)
// plus the unpack ops, so it runs on every device the formats run on.
//
// Registered at the Autograd key: a call where grad mode is off or no input
// requires grad goes straight to the device kernel (no autograd node).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/accumulate.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>

namespace multiflow {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using BitmapLinearFn = at::Tensor(
    const at::Tensor&,
    const at::Tensor&,
    const at::Tensor&,
    const at::Tensor&,
    const at::Tensor&,
    int64_t,
    const std::optional<at::Tensor>&);
using Sparse24LinearFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const std::optional<at::Tensor>&);

const c10::TypedOperatorHandle<BitmapLinearFn>& bitmap_linear_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("multiflow::bitmap_linear", "").typed<BitmapLinearFn>();
  return op;
}

const c10::TypedOperatorHandle<Sparse24LinearFn>& sparse24_linear_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("multiflow::sparse24_linear", "").typed<Sparse24LinearFn>();
  return op;
}

// Whether a call needs an autograd node: grad mode on and x, the values or the bias
// requiring grad (the integer tensors cannot).
bool needs_autograd(const at::Tensor& x, const at::Tensor& values, const std::optional<at::Tensor>& bias) {
  return at::GradMode::is_enabled() &&
         (x.requires_grad() || values.requires_grad() || (bias.has_value() && bias->defined() && bias->requires_grad()));
}

// grad_y as (rows of x, out) and x as (rows of x, in), whatever x's leading dims
// (reshape(-1, n) cannot size an empty tensor with n = 0).
int64_t leading_rows(const at::Tensor& x) {
  return c10::multiply_integers(x.sizes().slice(0, x.dim() - 1));
}

// Forward: what the shared backward half needs to know of the bias.
void save_bias(AutogradContext* ctx, const at::Tensor& x, const std::optional<at::Tensor>& bias) {
  const bool has_bias = bias.has_value() && bias->defined();
  ctx->saved_data["has_bias"] = has_bias;
  ctx->saved_data["bias_dtype"] = has_bias ? bias->scalar_type() : x.scalar_type();
}

// The gradients every linear op shares, each in its input's dtype (undefined where not
// needed): x's (grad_y @ W, W = decode(), called only then) and the bias's (variable
// input number bias_input when given). grad_y2: grad_y as (rows of x, out).
struct LinearGrads {
  at::Tensor grad_y2;
  at::Tensor x;
  at::Tensor bias;
};

template <typename Decode>
LinearGrads linear_grads(AutogradContext* ctx, const at::Tensor& grad_y, const at::Tensor& x, int64_t out,
                         size_t bias_input, Decode&& decode) {
  LinearGrads g;
  g.grad_y2 = grad_y.reshape({leading_rows(x), out});
  if (ctx->needs_input_grad(0)) {  // x is the first input of both ops
    g.x = at::matmul(g.grad_y2.to(at::kFloat), decode().to(at::kFloat)).to(x.scalar_type()).view(x.sizes());
  }
  if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(bias_input)) {
    g.bias = g.grad_y2.to(at::kFloat).sum(0).to(ctx->saved_data["bias_dtype"].toScalarType());
  }
  return g;
}

class BitmapLinearFunction : public torch::autograd::Function<BitmapLinearFunction> {
 public:
  static at::Tensor forward(
      AutogradContext* ctx,
      const at::Tensor& x,
      const at::Tensor& values,
      const at::Tensor& bits,
      const at::Tensor& row_ptr,
      const at::Tensor& block_ptr,
      int64_t in_features,
      const std::optional<at::Tensor>& bias) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor y = bitmap_linear_op().call(x, values, bits, row_ptr, block_ptr, in_features, bias);
    ctx->save_for_backward({x, values, bits, row_ptr, block_ptr});
    ctx->saved_data["in_features"] = in_features;
    save_bias(ctx, x, bias);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &values = saved[1], &bits = saved[2], &row_ptr = saved[3], &block_ptr = saved[4];
    const int64_t in_features = ctx->saved_data["in_features"].toInt();
    // Variable inputs in order: x, values, bits, row_ptr, block_ptr, then bias if given.
    const LinearGrads g = linear_grads(ctx, grad_outputs[0], x, bits.size(0), 5, [&] {
      static const auto unpack = c10::Dispatcher::singleton()
                                     .findSchemaOrThrow("multiflow::bitmap_unpack", "")
                                     .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                       const at::Tensor&, int64_t)>();
      return unpack.call(values, bits, row_ptr, block_ptr, in_features);
    });
    at::Tensor grad_values;
    if (ctx->needs_input_grad(1)) {
      static const auto unpack_mask = c10::Dispatcher::singleton()
                                          .findSchemaOrThrow("multiflow::unpack_mask", "")
                                          .typed<at::Tensor(const at::Tensor&, int64_t)>();
      const at::Tensor keep = unpack_mask.call(bits.contiguous(), in_features);
      const at::Tensor grad_w =
          at::matmul(g.grad_y2.to(at::kFloat).t(), x.reshape({g.grad_y2.size(0), in_features}).to(at::kFloat));
      grad_values = grad_w.masked_select(keep).to(values.scalar_type());
    }
    // One entry per argument: x, values, bits, row_ptr, block_ptr, in_features, bias.
    return {g.x, grad_values, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), g.bias};
  }
};

class Sparse24LinearFunction : public torch::autograd::Function<Sparse24LinearFunction> {
 public:
  static at::Tensor forward(
      AutogradContext* ctx,
      const at::Tensor& x,
      const at::Tensor& values,
      const at::Tensor& metadata,
      const std::optional<at::Tensor>& bias) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor y = sparse24_linear_op().call(x, values, metadata, bias);
    ctx->save_for_backward({x, values, metadata});
    save_bias(ctx, x, bias);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &values = saved[1], &metadata = saved[2];
    // Variable inputs in order: x, values, metadata, then bias if given.
    TORCH_CHECK(!ctx->needs_input_grad(1),
                "multiflow::sparse24_linear is not differentiable with respect to values: a 2:4 group keeping fewer "
                "than 2 weights stores zeros at unused positions, indistinguishable from kept zeros. Fine-tune with "
                "format=\"masked\" and convert the layer with SparseLinear.to_format(\"2:4\") afterwards.");
    const LinearGrads g = linear_grads(ctx, grad_outputs[0], x, values.size(0), 3, [&] {
      static const auto unpack = c10::Dispatcher::singleton()
                                     .findSchemaOrThrow("multiflow::sparse24_unpack", "")
                                     .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
      return unpack.call(values, metadata);
    });
    // One entry per argument: x, values, metadata, bias.
    return {g.x, at::Tensor(), at::Tensor(), g.bias};
  }
};

at::Tensor bitmap_linear_autograd(
    const at::Tensor& x,
    const at::Tensor& values,
    const at::Tensor& bits,
    const at::Tensor& row_ptr,
    const at::Tensor& block_ptr,
    int64_t in_features,
    const std::optional<at::Tensor>& bias) {
  if (!needs_autograd(x, values, bias)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return bitmap_linear_op().call(x, values, bits, row_ptr, block_ptr, in_features, bias);
  }
  return BitmapLinearFunction::apply(x, values, bits, row_ptr, block_ptr, in_features, bias);
}

at::Tensor sparse24_linear_autograd(
    const at::Tensor& x,
    const at::Tensor& values,
    const at::Tensor& metadata,
    const std::optional<at::Tensor>& bias) {
  if (!needs_autograd(x, values, bias)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return sparse24_linear_op().call(x, values, metadata, bias);
  }
  return Sparse24LinearFunction::apply(x, values, metadata, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(multiflow, Autograd, m) {
  m.impl("bitmap_linear", &bitmap_linear_autograd);
  m.impl("sparse24_linear", &sparse24_linear_autograd);
}

}  // namespace multiflow
