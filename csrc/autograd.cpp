// lora_kernels::cuda_lora_linear — the cuda backend's whole layer, its autograd in C++.
//
//   y = x W0ᵀ + b + s · (x ⊙ D) Aᵀ Bᵀ   for x (..., K): one call from Python per forward, none per
//   backward (the backward node is C++). It is lora_kernels.functional.LoRALinearFunction over
//   the same two ops, cuda_lora_forward and cuda_lora_backward, which it calls through the
//   dispatcher (so they keep their own kernels' registrations); the gradients are those of
//   lora_kernels/ops.py's backward (docs/design.md):
//     dx, dA, dB  from cuda_lora_backward (dx only where x needs it)
//     dW0 = dyᵀ x, db = Σ_rows dy  only where the frozen weights ask for them.
//
// NOTE: eager mode only: under torch.compile the Python ops (lora_kernels::lora_forward & co.,
// with their fake kernels) are traced instead; this op has no fake kernel on purpose.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor> forward_op(const at::Tensor& x, const at::Tensor& weight,
                                              const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                              const at::Tensor& lora_B, double scaling, double dropout_p,
                                              const at::Tensor& seed) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lora_kernels::cuda_lora_forward", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                 const at::Tensor&, const at::Tensor&, double, double, const at::Tensor&)>();
  return op.call(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_op(const at::Tensor& grad_out, const at::Tensor& x,
                                                           const at::Tensor& weight, const at::Tensor& lora_A,
                                                           const at::Tensor& lora_B, const at::Tensor& xa,
                                                           double scaling, double dropout_p, const at::Tensor& seed,
                                                           bool need_grad_x) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lora_kernels::cuda_lora_backward", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, const at::Tensor&, double, double, const at::Tensor&, bool)>();
  return op.call(grad_out, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, need_grad_x);
}

at::Tensor flat(const at::Tensor& t) { return t.dim() == 2 ? t : t.reshape({-1, t.size(-1)}); }

// y (M, N) in x's leading shape; NOTE: _unsafe_view, as torch.matmul does: y is not a view for
// autograd, so in-place ops on it treat it as the fresh tensor it is.
at::Tensor unflatten(const at::Tensor& y, const at::Tensor& x) {
  if (x.dim() == 2) return y;
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end() - 1);
  sizes.push_back(y.size(1));
  return at::_unsafe_view(y, sizes);
}

struct LoRALinearCuda : public torch::autograd::Function<LoRALinearCuda> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                            const at::Tensor& lora_B, double scaling, double dropout_p, const at::Tensor& seed) {
    const at::Tensor x2 = flat(x);
    auto [y, xa] = forward_op(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed);
    // Saved: x, xa (no mask, no dropped copy of x) and the weights, as lora_kernels/ops.py saves them.
    ctx->save_for_backward({x2, weight, lora_A, lora_B, xa, seed});
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->saved_data["x_sizes"] = x.sizes();
    // NOTE: as in Python: no zero-filled dy for a y that did not reach the loss.
    ctx->set_materialize_grads(false);
    return unflatten(y, x);
  }

  // Inputs (edges): x 0, weight 1, bias 2, lora_A 3, lora_B 4, seed 5; scaling, dropout_p have none.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(8);
    if (!grads[0].defined()) return out;
    const at::Tensor dy = flat(grads[0]).contiguous();
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &lora_A = saved[2], &lora_B = saved[3], &xa = saved[4],
                     &seed = saved[5];
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1),
               need_b = ctx->needs_input_grad(2), need_a = ctx->needs_input_grad(3),
               need_bb = ctx->needs_input_grad(4);
    if (need_x || need_a || need_bb) {
      auto [grad_x, grad_A, grad_B] = backward_op(dy, x, weight, lora_A, lora_B, xa, ctx->saved_data["scaling"].toDouble(),
                                                  ctx->saved_data["dropout_p"].toDouble(), seed, need_x);
      if (need_x) out[0] = grad_x.view(ctx->saved_data["x_sizes"].toIntVector());
      out[3] = grad_A;
      out[4] = grad_B;
    }
    if (need_w) out[1] = dy.t().mm(x);
    if (need_b && ctx->saved_data["has_bias"].toBool()) out[2] = dy.sum(0);
    return out;
  }
};

at::Tensor cuda_lora_linear_autograd(const at::Tensor& x, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                     const at::Tensor& lora_B, double scaling, double dropout_p,
                                     const at::Tensor& seed) {
  return LoRALinearCuda::apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed);
}

// Below autograd (inference mode): the forward alone.
at::Tensor cuda_lora_linear_forward(const at::Tensor& x, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                    const at::Tensor& lora_B, double scaling, double dropout_p, const at::Tensor& seed) {
  return unflatten(std::get<0>(forward_op(flat(x), weight, bias, lora_A, lora_B, scaling, dropout_p, seed)), x);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_kernels, Autograd, m) { m.impl("cuda_lora_linear", &cuda_lora_linear_autograd); }

TORCH_LIBRARY_IMPL(lora_kernels, CompositeExplicitAutograd, m) {
  m.impl("cuda_lora_linear", &cuda_lora_linear_forward);
}
