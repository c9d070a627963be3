// Fused pointwise parts of one LSTM / GRU time step, forward and backward.
//
// A DP recurrent layer (fastdp/layers/rnn.py) forms the gate pre-activations with two GEMMs,
// gx = x_t W_ih^T + b_ih and gh = h_{t-1} W_hh^T + b_hh; everything after that within a step is
// elementwise, and one kernel does it in a single pass over the gates (torch's reference runs
// about ten separate elementwise kernels). Gate order is torch's: LSTM (i, f, g, o), GRU (r, z, n).
//
// Layout: rows are samples. gx, gh, c_prev / h_prev may be row-strided views (a time step of a
// [B, T, G*H] tensor) as long as their last dimension is contiguous; every tensor a kernel writes
// is contiguous. Arithmetic is in at::opmath_type (float for half/bfloat16).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <vector>

namespace {

__device__ __forceinline__ float sigmoid_of(float x) { return 1.f / (1.f + expf(-x)); }
__device__ __forceinline__ double sigmoid_of(double x) { return 1.0 / (1.0 + exp(-x)); }
__device__ __forceinline__ float tanh_of(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_of(double x) { return tanh(x); }

constexpr int kThreads = 256;

int blocks_for(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t(1) << 16));
}

// Each kernel below is one grid-stride loop over the batch * hidden units of a [batch, hidden] state:
// for (idx = first_unit(); idx < batch * hidden; idx += unit_stride()), unit j of sample b at idx = b * hidden + j.
__device__ __forceinline__ int64_t first_unit() { return blockIdx.x * int64_t(blockDim.x) + threadIdx.x; }
__device__ __forceinline__ int64_t unit_stride() { return int64_t(gridDim.x) * blockDim.x; }

// Column k of row b of the gate pre-activations gx + gh (row-strided inputs), in acc_t.
template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t gate_input(const scalar_t* gx, int64_t gx_row, const scalar_t* gh, int64_t gh_row,
                                            int64_t b, int64_t k) {
  return acc_t(gx[b * gx_row + k]) + acc_t(gh[b * gh_row + k]);
}

// Row b of a contiguous [batch, 4 * hidden] buffer gets (v0, v1, v2, v3) at unit j of its four blocks.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_four(scalar_t* out, int64_t b, int64_t j, int64_t hidden, acc_t v0, acc_t v1,
                                           acc_t v2, acc_t v3) {
  scalar_t* row = out + b * 4 * hidden;
  row[j] = scalar_t(v0);
  row[j + hidden] = scalar_t(v1);
  row[j + 2 * hidden] = scalar_t(v2);
  row[j + 3 * hidden] = scalar_t(v3);
}

// ---- LSTM -------------------------------------------------------------------------------------
// Forward: c = f * c_prev + i * g, h = o * tanh(c); saves the activated gates (i, f, g, o) [B, 4H].
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void lstm_forward_kernel(const scalar_t* __restrict__ gx, int64_t gx_row,
                                    const scalar_t* __restrict__ gh, int64_t gh_row,
                                    const scalar_t* __restrict__ c_prev, int64_t c_row,
                                    scalar_t* __restrict__ h, scalar_t* __restrict__ c,
                                    scalar_t* __restrict__ gates, int64_t batch, int64_t hidden) {
  for (int64_t idx = first_unit(); idx < batch * hidden; idx += unit_stride()) {
    const int64_t b = idx / hidden, j = idx % hidden;
    const acc_t i = sigmoid_of(gate_input<acc_t>(gx, gx_row, gh, gh_row, b, j));
    const acc_t f = sigmoid_of(gate_input<acc_t>(gx, gx_row, gh, gh_row, b, j + hidden));
    const acc_t g = tanh_of(gate_input<acc_t>(gx, gx_row, gh, gh_row, b, j + 2 * hidden));
    const acc_t o = sigmoid_of(gate_input<acc_t>(gx, gx_row, gh, gh_row, b, j + 3 * hidden));
    const acc_t c_new = f * acc_t(c_prev[b * c_row + j]) + i * g;
    c[idx] = scalar_t(c_new);
    h[idx] = scalar_t(o * tanh_of(c_new));
    store_four(gates, b, j, hidden, i, f, g, o);
  }
}

// Backward: from dL/dh, dL/dc (this step's outputs) to dL/d(gate pre-activations) [B, 4H], which is
// both dL/dgx and dL/dgh, and dL/dc_prev [B, H].
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void lstm_backward_kernel(const scalar_t* __restrict__ grad_h, const scalar_t* __restrict__ grad_c,
                                     const scalar_t* __restrict__ gates, const scalar_t* __restrict__ c_prev,
                                     int64_t c_row, const scalar_t* __restrict__ c,
                                     scalar_t* __restrict__ grad_gates, scalar_t* __restrict__ grad_c_prev,
                                     int64_t batch, int64_t hidden) {
  for (int64_t idx = first_unit(); idx < batch * hidden; idx += unit_stride()) {
    const int64_t b = idx / hidden, j = idx % hidden;
    const scalar_t* saved = gates + b * 4 * hidden;
    const acc_t i = saved[j], f = saved[j + hidden], g = saved[j + 2 * hidden], o = saved[j + 3 * hidden];
    const acc_t tanh_c = tanh_of(acc_t(c[idx]));
    const acc_t dh = grad_h[idx];
    const acc_t dc = acc_t(grad_c[idx]) + dh * o * (acc_t(1) - tanh_c * tanh_c);
    store_four(grad_gates, b, j, hidden, dc * g * i * (acc_t(1) - i), dc * acc_t(c_prev[b * c_row + j]) * f * (acc_t(1) - f),
               dc * i * (acc_t(1) - g * g), dh * tanh_c * o * (acc_t(1) - o));
    grad_c_prev[idx] = scalar_t(dc * f);
  }
}

// ---- GRU --------------------------------------------------------------------------------------
// Forward: r, z = sigmoid(gx + gh), n = tanh(gx_n + r * gh_n), h = n + z * (h_prev - n);
// saves (r, z, n, gh_n) [B, 4H].
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void gru_forward_kernel(const scalar_t* __restrict__ gx, int64_t gx_row,
                                   const scalar_t* __restrict__ gh, int64_t gh_row,
                                   const scalar_t* __restrict__ h_prev, int64_t h_row,
                                   scalar_t* __restrict__ h, scalar_t* __restrict__ saved_all,
                                   int64_t batch, int64_t hidden) {
  for (int64_t idx = first_unit(); idx < batch * hidden; idx += unit_stride()) {
    const int64_t b = idx / hidden, j = idx % hidden;
    const acc_t r = sigmoid_of(gate_input<acc_t>(gx, gx_row, gh, gh_row, b, j));
    const acc_t z = sigmoid_of(gate_input<acc_t>(gx, gx_row, gh, gh_row, b, j + hidden));
    const acc_t hidden_n = gh[b * gh_row + j + 2 * hidden];
    const acc_t cand = tanh_of(acc_t(gx[b * gx_row + j + 2 * hidden]) + r * hidden_n);
    h[idx] = scalar_t(cand + z * (acc_t(h_prev[b * h_row + j]) - cand));
    store_four(saved_all, b, j, hidden, r, z, cand, hidden_n);
  }
}

// Backward: dL/dgx [B, 3H], dL/dgh [B, 3H] (they differ in the n block by the factor r) and the
// direct part of dL/dh_prev [B, H] (the part through gh is the caller's GEMM).
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void gru_backward_kernel(const scalar_t* __restrict__ grad_h, const scalar_t* __restrict__ saved_all,
                                    const scalar_t* __restrict__ h_prev, int64_t h_row,
                                    scalar_t* __restrict__ grad_gx, scalar_t* __restrict__ grad_gh,
                                    scalar_t* __restrict__ grad_h_prev, int64_t batch, int64_t hidden) {
  for (int64_t idx = first_unit(); idx < batch * hidden; idx += unit_stride()) {
    const int64_t b = idx / hidden, j = idx % hidden;
    const scalar_t* saved = saved_all + b * 4 * hidden;
    const acc_t r = saved[j], z = saved[j + hidden], cand = saved[j + 2 * hidden], hidden_n = saved[j + 3 * hidden];
    const acc_t dh = grad_h[idx];
    const acc_t d_cand_pre = dh * (acc_t(1) - z) * (acc_t(1) - cand * cand);
    const acc_t d_z_pre = dh * (acc_t(h_prev[b * h_row + j]) - cand) * z * (acc_t(1) - z);
    const acc_t d_r_pre = d_cand_pre * hidden_n * r * (acc_t(1) - r);
    scalar_t* dx = grad_gx + b * 3 * hidden;
    scalar_t* dy = grad_gh + b * 3 * hidden;
    dx[j] = dy[j] = scalar_t(d_r_pre);
    dx[j + hidden] = dy[j + hidden] = scalar_t(d_z_pre);
    dx[j + 2 * hidden] = scalar_t(d_cand_pre);
    dy[j + 2 * hidden] = scalar_t(d_cand_pre * r);
    grad_h_prev[idx] = scalar_t(dh * z);
  }
}

// ---- checks -----------------------------------------------------------------------------------
void check_rows(const at::Tensor& t, const char* name, const at::Tensor& like, int64_t batch, int64_t width) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == like.device(), name, " must be on ", like.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " must have dtype ", like.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == batch && t.size(1) == width, name, " must have shape [", batch, ", ",
              width, "], got ", t.sizes());
  TORCH_CHECK(t.stride(1) == 1 || width <= 1, name, " must be contiguous in its last dimension");
}

void check_contiguous(const at::Tensor& t, const char* name, const at::Tensor& like, int64_t batch, int64_t width) {
  check_rows(t, name, like, batch, width);
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// The [batch, hidden] state that the other arguments are checked against (rows may be strided).
void check_state(const at::Tensor& state, const char* name) {
  TORCH_CHECK(state.dim() == 2, name, " must be 2-D [batch, hidden], got ", state.sizes());
  check_rows(state, name, state, state.size(0), state.size(1));
}

// A forward step's inputs: the state [batch, hidden] and gx, gh (the two halves of the gate
// pre-activations) [batch, gates * hidden] each, all row-strided at most.
void check_forward_inputs(const at::Tensor& gx, const at::Tensor& gh, const at::Tensor& state, const char* state_name,
                          int64_t gates) {
  check_state(state, state_name);
  check_rows(gx, "gx", state, state.size(0), gates * state.size(1));
  check_rows(gh, "gh", state, state.size(0), gates * state.size(1));
}

// Launches one of the kernels above over `units` = batch * hidden units on the current stream (none: nothing to do).
template <typename... KernelArgs, typename... Args>
void launch(void (*kernel)(KernelArgs...), int64_t units, Args... args) {
  if (units == 0) {
    return;
  }
  kernel<<<blocks_for(units), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::vector<at::Tensor> lstm_cell_forward(const at::Tensor& gx, const at::Tensor& gh, const at::Tensor& c_prev) {
  check_forward_inputs(gx, gh, c_prev, "c_prev", 4);
  const int64_t batch = c_prev.size(0), hidden = c_prev.size(1);
  const c10::cuda::CUDAGuard guard(c_prev.device());
  auto h = at::empty({batch, hidden}, c_prev.options());
  auto c = at::empty({batch, hidden}, c_prev.options());
  auto gates = at::empty({batch, 4 * hidden}, c_prev.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c_prev.scalar_type(), "lstm_cell_forward", [&] {
    launch(lstm_forward_kernel<scalar_t>, batch * hidden, gx.data_ptr<scalar_t>(), gx.stride(0), gh.data_ptr<scalar_t>(),
           gh.stride(0), c_prev.data_ptr<scalar_t>(), c_prev.stride(0), h.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(),
           gates.data_ptr<scalar_t>(), batch, hidden);
  });
  return {h, c, gates};
}

std::vector<at::Tensor> lstm_cell_backward(const at::Tensor& grad_h, const at::Tensor& grad_c, const at::Tensor& gates,
                                           const at::Tensor& c_prev, const at::Tensor& c) {
  check_state(c, "c");
  const int64_t batch = c.size(0), hidden = c.size(1);
  check_contiguous(c, "c", c, batch, hidden);
  check_contiguous(grad_h, "grad_h", c, batch, hidden);
  check_contiguous(grad_c, "grad_c", c, batch, hidden);
  check_contiguous(gates, "gates", c, batch, 4 * hidden);
  check_rows(c_prev, "c_prev", c, batch, hidden);
  const c10::cuda::CUDAGuard guard(c.device());
  auto grad_gates = at::empty({batch, 4 * hidden}, c.options());
  auto grad_c_prev = at::empty({batch, hidden}, c.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "lstm_cell_backward", [&] {
    launch(lstm_backward_kernel<scalar_t>, batch * hidden, grad_h.data_ptr<scalar_t>(), grad_c.data_ptr<scalar_t>(),
           gates.data_ptr<scalar_t>(), c_prev.data_ptr<scalar_t>(), c_prev.stride(0), c.data_ptr<scalar_t>(),
           grad_gates.data_ptr<scalar_t>(), grad_c_prev.data_ptr<scalar_t>(), batch, hidden);
  });
  return {grad_gates, grad_c_prev};
}

std::vector<at::Tensor> gru_cell_forward(const at::Tensor& gx, const at::Tensor& gh, const at::Tensor& h_prev) {
  check_forward_inputs(gx, gh, h_prev, "h_prev", 3);
  const int64_t batch = h_prev.size(0), hidden = h_prev.size(1);
  const c10::cuda::CUDAGuard guard(h_prev.device());
  auto h = at::empty({batch, hidden}, h_prev.options());
  auto saved = at::empty({batch, 4 * hidden}, h_prev.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h_prev.scalar_type(), "gru_cell_forward", [&] {
    launch(gru_forward_kernel<scalar_t>, batch * hidden, gx.data_ptr<scalar_t>(), gx.stride(0), gh.data_ptr<scalar_t>(),
           gh.stride(0), h_prev.data_ptr<scalar_t>(), h_prev.stride(0), h.data_ptr<scalar_t>(), saved.data_ptr<scalar_t>(),
           batch, hidden);
  });
  return {h, saved};
}

std::vector<at::Tensor> gru_cell_backward(const at::Tensor& grad_h, const at::Tensor& saved, const at::Tensor& h_prev) {
  check_state(h_prev, "h_prev");
  const int64_t batch = h_prev.size(0), hidden = h_prev.size(1);
  check_contiguous(grad_h, "grad_h", h_prev, batch, hidden);
  check_contiguous(saved, "saved", h_prev, batch, 4 * hidden);
  const c10::cuda::CUDAGuard guard(h_prev.device());
  auto grad_gx = at::empty({batch, 3 * hidden}, h_prev.options());
  auto grad_gh = at::empty({batch, 3 * hidden}, h_prev.options());
  auto grad_h_prev = at::empty({batch, hidden}, h_prev.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h_prev.scalar_type(), "gru_cell_backward", [&] {
    launch(gru_backward_kernel<scalar_t>, batch * hidden, grad_h.data_ptr<scalar_t>(), saved.data_ptr<scalar_t>(),
           h_prev.data_ptr<scalar_t>(), h_prev.stride(0), grad_gx.data_ptr<scalar_t>(), grad_gh.data_ptr<scalar_t>(),
           grad_h_prev.data_ptr<scalar_t>(), batch, hidden);
  });
  return {grad_gx, grad_gh, grad_h_prev};
}
