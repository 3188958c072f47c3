// The ops without a derivative (statistics, scores, selection, packing): an Autograd kernel
// that makes a backward through them raise ("the derivative for multiflow::flow_scores is
// not implemented") instead of torch's default for custom ops, which only warns and treats
// their outputs as constants, so a gradient that should have reached a weight silently came
// back None. Called with nothing that requires grad (how the pruning code and the formats
// call them: detached weights, bool masks), the kernel only redispatches. The in-place
// sq_sum_accumulate_ has a kernel of its own (below): refused when x or acc requires grad.
//
// The differentiable ops have their own formulas: masked_linear, masked_linear_backward and
// bitmap_unpack in multiflow_kernels/ops.py, bitmap_linear and sparse24_linear in
// linear_autograd.cpp (sparse24_unpack stays here: 2:4 values are not differentiable).
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

namespace {

// sq_sum_accumulate_(acc, x, token_mask) returns nothing, so the fallback above has no output
// to attach a "not implemented" node to: with x requiring grad it ran and the x**2 it added
// to acc silently carried no gradient. Refused instead, whenever grad mode is on and x or acc
// requires grad; otherwise a redispatch, with acc's version bumped (it is written in place).
void sq_sum_accumulate_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  const auto n = stack->size();
  const at::Tensor acc = (*stack)[n - 3].toTensor();
  const at::Tensor& x = (*stack)[n - 2].toTensor();
  TORCH_CHECK(!at::GradMode::is_enabled() || !(x.requires_grad() || acc.requires_grad()),
              "multiflow::sq_sum_accumulate_ is not differentiable (it adds sum(x**2) into acc in place, a "
              "statistic): call it on x.detach() or under torch.no_grad(); x.requires_grad=", x.requires_grad(),
              ", acc.requires_grad=", acc.requires_grad());
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(ks & c10::after_ADInplaceOrView_keyset, stack);
  }
  acc.unsafeGetTensorImpl()->bump_version();
}

}  // namespace

TORCH_LIBRARY_IMPL(multiflow, Autograd, m) {
  m.impl("sq_sum_accumulate_", torch::CppFunction::makeFromBoxedFunction<&sq_sum_accumulate_autograd>());
  for (const char* name :
       {"flow_importance", "flow_scores", "kth_smallest_group", "kth_smallest_each",
        "count_at_most", "flow_kth_each", "flow_masks", "nm_mask", "pack_mask", "unpack_mask", "bitmap_pack",
        "_bitmap_linear_cuda", "_bitmap_linear_triton", "sparse24_pack", "sparse24_unpack"}) {
    m.impl(name, torch::autograd::autogradNotImplementedFallback());
  }
}
