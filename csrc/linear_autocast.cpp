// Autocast for the linear ops (masked_linear, bitmap_linear, sparse24_linear): the
// lower_precision_fp policy of at::linear.
//
// The kernels take x, the weight (or its kept values) and the bias in one dtype. Under
// torch.autocast an nn.Linear casts all three to the autocast dtype and returns that dtype,
// so a float32 SparseLinear after it gets a bfloat16 / float16 x, on which the op alone
// raises (dtype mismatch). Here, as autocast does for at::linear, every floating-point tensor
// argument on the autocast device is cast to the device's autocast dtype, the integer tensors
// (mask bits, offsets, metadata) pass untouched, and the op is called again with the Autocast
// key excluded. The casts are ordinary differentiable ops, and autograd sits below Autocast
// (linear_autograd.cpp; masked_linear's in ops.py): it records the op on the cast tensors, so
// the gradients reach float32 master weights in float32 through the casts' backward.
// cached_cast casts a float32 leaf that requires grad (a master weight) once per autocast
// region, as for nn.Linear. Outside autocast (or with enabled=False) the Autocast key is off
// and none of this runs.
//
// One boxed kernel serves the three ops: the policy looks only at the arguments' types.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace multiflow {
namespace {

template <c10::DeviceType device_type>
void lower_precision_fp(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(device_type));
  const at::ScalarType to_type = at::autocast::get_lower_precision_fp_from_device_type(device_type);
  // The op's arguments are the top of the stack; a None bias is no tensor. cached_cast
  // leaves alone what autocast would: integer, float64 and other devices' tensors.
  const size_t num_args = op.schema().arguments().size();
  for (auto arg = stack->end() - static_cast<std::ptrdiff_t>(num_args); arg != stack->end(); ++arg) {
    if (arg->isTensor()) {
      *arg = at::autocast::cached_cast(to_type, arg->toTensor(), device_type);
    }
  }
  op.callBoxed(stack);
}

// The three ops' kernels for one device's Autocast key.
template <c10::DeviceType device_type>
void register_autocast(torch::Library& m) {
  for (const char* name : {"masked_linear", "bitmap_linear", "sparse24_linear"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&lower_precision_fp<device_type>>());
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(multiflow, AutocastCPU, m) {
  register_autocast<c10::DeviceType::CPU>(m);
}

// Registered for CUDA in every build: masked_linear's and bitmap_linear's CUDA kernels
// may come from Python (multiflow_kernels/triton) when csrc/cuda is not compiled.
TORCH_LIBRARY_IMPL(multiflow, AutocastCUDA, m) {
  register_autocast<c10::DeviceType::CUDA>(m);
}

}  // namespace multiflow
