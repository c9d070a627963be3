// Python bindings of fastdp's CUDA extension (one module: fastdp._C when built by setup.py,
// a JIT-built module of the same contents otherwise; see fastdp/csrc/__init__.py).

#include <torch/extension.h>

#include <vector>

std::vector<at::Tensor> lstm_cell_forward(const at::Tensor& gx, const at::Tensor& gh, const at::Tensor& c_prev);
std::vector<at::Tensor> lstm_cell_backward(const at::Tensor& grad_h, const at::Tensor& grad_c, const at::Tensor& gates,
                                           const at::Tensor& c_prev, const at::Tensor& c);
std::vector<at::Tensor> gru_cell_forward(const at::Tensor& gx, const at::Tensor& gh, const at::Tensor& h_prev);
std::vector<at::Tensor> gru_cell_backward(const at::Tensor& grad_h, const at::Tensor& saved, const at::Tensor& h_prev);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lstm_cell_forward", &lstm_cell_forward, "LSTM step, pointwise part: (gx, gh, c_prev) -> [h, c, gates]");
  m.def("lstm_cell_backward", &lstm_cell_backward,
        "(grad_h, grad_c, gates, c_prev, c) -> [grad of the gate pre-activations, grad_c_prev]");
  m.def("gru_cell_forward", &gru_cell_forward, "GRU step, pointwise part: (gx, gh, h_prev) -> [h, saved]");
  m.def("gru_cell_backward", &gru_cell_backward, "(grad_h, saved, h_prev) -> [grad_gx, grad_gh, grad_h_prev (direct part)]");
}
