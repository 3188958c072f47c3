// The ops without a derivative (statistics, scores, selection, packing): an Autograd kernel
// that makes a backward through them raise ("the derivative for multiflow::flow_scores is
// not implemented") instead of torch's default for custom ops, which only warns and treats
// their outputs as constants, so a gradient that should have reached a weight silently came
// back None. Called with nothing that requires grad (how the pruning code and the formats
// call them: detached weights, bool masks), the kernel only redispatches. An in-place op
// (sq_sum_accumulate_) on a leaf that requires grad is refused as torch refuses it for its
// own in-place ops.
//
// The differentiable ops have their own formulas: masked_linear, masked_linear_backward and
// bitmap_unpack in multiflow_kernels/ops.py, bitmap_linear and sparse24_linear in
// linear_autograd.cpp (sparse24_unpack stays here: 2:4 values are not differentiable).
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

TORCH_LIBRARY_IMPL(multiflow, Autograd, m) {
  for (const char* name :
       {"sq_sum_accumulate_", "flow_importance", "flow_scores", "kth_smallest_group", "kth_smallest_each",
        "count_at_most", "flow_kth_each", "flow_masks", "nm_mask", "pack_mask", "unpack_mask", "bitmap_pack",
        "_bitmap_linear_cuda", "_bitmap_linear_triton", "sparse24_pack", "sparse24_unpack"}) {
    m.impl(name, torch::autograd::autogradNotImplementedFallback());
  }
}
