// fusedopt._C: the pybind11 binding of the CUDA kernels, the only binding file.
//
// Python (python/fusedopt/cuda_backend.py) validates the tensors and passes raw device pointers
// (tensor.data_ptr()), sizes, dtype codes, the device index and the current CUDA stream handle;
// no torch C++ API is used, so the module builds without a CUDA build of torch and survives torch
// upgrades. The checks here guard the raw values (null pointers, negative sizes, bad codes) and
// name the offending argument; they run before any CUDA call, so they work without a GPU.
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "launchers.h"

namespace py = pybind11;
using fusedopt::Dtype;

namespace {

[[noreturn]] void fail(const std::string& function, const std::string& message) {
  throw py::value_error("fusedopt._C." + function + ": " + message);
}

template <typename P>
P* pointer(const char* function, const char* name, uintptr_t address, bool nullable = false) {
  if (address == 0 && !nullable) fail(function, std::string(name) + " must be a non-null device pointer");
  return reinterpret_cast<P*>(address);
}

void require_count(const char* function, const char* name, int64_t value, int64_t max) {
  if (value < 0 || value > max)
    fail(function, std::string(name) + " must be in [0, " + std::to_string(max) + "], got " + std::to_string(value));
}

// A row stride must at least span the row: rows of a [rows, length] array may not overlap.
void require_stride(const char* function, const char* name, int64_t stride, int64_t length) {
  if (stride < length)
    fail(function, std::string(name) + " must be >= " + std::to_string(length) + ", got " + std::to_string(stride));
}

Dtype dtype_of(const char* function, int code) {
  if (code < 0 || code > int(Dtype::kFloat16))
    fail(function, "dtype must be 0 (float32), 1 (bfloat16) or 2 (float16), got " + std::to_string(code));
  return Dtype(code);
}

// Grid dimensions are unsigned 32-bit; x up to 2^31 - 1 blocks covers 8.8e12 elements.
constexpr int64_t kMaxGridX = (int64_t(1) << 31) - 1;

// Runs the launch with `device` current and restores the caller's device: torch's current device
// may differ from the tensors' device, and a stream can only take work from its own device.
class DeviceGuard {
 public:
  DeviceGuard(const char* function, int device) {
    check(function, cudaGetDevice(&previous_));
    if (device != previous_) check(function, cudaSetDevice(device));
  }
  ~DeviceGuard() {
    int current = previous_;
    if (cudaGetDevice(&current) == cudaSuccess && current != previous_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  static void check(const char* function, cudaError_t err) {
    if (err != cudaSuccess)
      throw std::runtime_error(std::string("fusedopt._C.") + function + ": " + cudaGetErrorName(err) + ": " +
                               cudaGetErrorString(err));
  }
  int previous_ = 0;
};

cudaStream_t stream_of(uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

void grad_norm(uintptr_t grad, int dtype, int64_t num_blocks, uintptr_t block_tensor, uintptr_t tensor_end,
               uintptr_t tensor_group, uintptr_t scale, uintptr_t block_sums, int64_t block_sums_stride, int device,
               uintptr_t stream) {
  const char* f = "grad_norm";
  const Dtype dt = dtype_of(f, dtype);
  require_count(f, "num_blocks", num_blocks, kMaxGridX);
  const void* g = pointer<const void>(f, "grad", grad);
  auto* bt = pointer<const int32_t>(f, "block_tensor", block_tensor);
  auto* te = pointer<const int64_t>(f, "tensor_end", tensor_end);
  auto* tg = pointer<const int32_t>(f, "tensor_group", tensor_group);
  auto* sc = pointer<const float>(f, "scale", scale, /*nullable=*/true);
  auto* out = pointer<float>(f, "block_sums", block_sums);
  require_stride(f, "block_sums_stride", block_sums_stride, num_blocks);
  DeviceGuard guard(f, device);
  fusedopt::launch_grad_norm(g, dt, num_blocks, bt, te, tg, sc, out, block_sums_stride, stream_of(stream));
}

void tensor_reduce(uintptr_t block_values, int64_t values_stride, uintptr_t tensor_block_start, int64_t num_tensors,
                   const std::vector<int>& ops, uintptr_t out, int64_t out_stride, int64_t tensor_offset, int device,
                   uintptr_t stream) {
  const char* f = "tensor_reduce";
  require_count(f, "num_tensors", num_tensors, kMaxGridX);
  if (ops.empty() || ops.size() > size_t(fusedopt::kMaxColumns))
    fail(f, "ops must have 1 to " + std::to_string(fusedopt::kMaxColumns) + " entries, got " +
                std::to_string(ops.size()));
  std::vector<fusedopt::Reduce> reduce;
  for (size_t c = 0; c < ops.size(); ++c) {
    if (ops[c] < 0 || ops[c] > int(fusedopt::Reduce::kMax))
      fail(f, "ops[" + std::to_string(c) + "] must be 0 (sum), 1 (min) or 2 (max), got " + std::to_string(ops[c]));
    reduce.push_back(fusedopt::Reduce(ops[c]));
  }
  require_count(f, "values_stride", values_stride, INT64_MAX);
  if (tensor_offset < 0 || tensor_offset + num_tensors > out_stride)
    fail(f, "tensor_offset + num_tensors must lie within a row of out, got tensor_offset " +
                std::to_string(tensor_offset) + ", num_tensors " + std::to_string(num_tensors) + ", out_stride " +
                std::to_string(out_stride));
  auto* values = pointer<const float>(f, "block_values", block_values);
  auto* starts = pointer<const int32_t>(f, "tensor_block_start", tensor_block_start);
  auto* dst = pointer<float>(f, "out", out);
  DeviceGuard guard(f, device);
  fusedopt::launch_tensor_reduce(values, values_stride, starts, num_tensors, reduce, dst, out_stride, tensor_offset,
                                 stream_of(stream));
}

void finalize(uintptr_t tensor_sums, int64_t sums_stride, int64_t num_tensors_all, uintptr_t tensor_group,
              uintptr_t tensor_step,
              int64_t num_tensors_dev, uintptr_t globals, uintptr_t scale, uintptr_t growth_tracker,
              uintptr_t found_inf_in, double max_grad_norm, double growth_factor, double backoff_factor,
              int growth_interval, bool update_scale, int device, uintptr_t stream) {
  const char* f = "finalize";
  require_count(f, "num_tensors_all", num_tensors_all, INT64_MAX / 2);
  require_count(f, "num_tensors_dev", num_tensors_dev, INT64_MAX / 2);
  fusedopt::FinalizeArgs a{};
  a.tensor_sums = pointer<const float>(f, "tensor_sums", tensor_sums, /*nullable=*/num_tensors_all == 0);
  require_stride(f, "sums_stride", sums_stride, num_tensors_all);
  a.sums_stride = sums_stride;
  a.num_tensors_all = num_tensors_all;
  a.tensor_group = pointer<const int32_t>(f, "tensor_group", tensor_group, /*nullable=*/num_tensors_dev == 0);
  a.tensor_step = pointer<float>(f, "tensor_step", tensor_step, /*nullable=*/num_tensors_dev == 0);
  a.num_tensors_dev = num_tensors_dev;
  a.globals = pointer<float>(f, "globals", globals);
  a.scale = pointer<float>(f, "scale", scale, /*nullable=*/true);
  const bool scaling = a.scale != nullptr && update_scale;
  a.growth_tracker = pointer<int32_t>(f, "growth_tracker", growth_tracker, /*nullable=*/!scaling);
  a.found_inf_in = pointer<const float>(f, "found_inf_in", found_inf_in, /*nullable=*/true);
  a.max_grad_norm = float(max_grad_norm);
  if (scaling && growth_interval < 1) fail(f, "growth_interval must be >= 1, got " + std::to_string(growth_interval));
  a.growth_factor = growth_factor;
  a.backoff_factor = backoff_factor;
  a.growth_interval = growth_interval;
  a.update_scale = update_scale;
  DeviceGuard guard(f, device);
  fusedopt::launch_finalize(a, stream_of(stream));
}

void update(const std::string& optimizer, uintptr_t param, uintptr_t grad, int dtype, uintptr_t moment1,
            uintptr_t moment2, int64_t num_blocks, uintptr_t block_tensor, uintptr_t tensor_end,
            uintptr_t tensor_group, uintptr_t tensor_step, uintptr_t hyper, uintptr_t globals,
            uintptr_t stats_partials, int64_t stats_stride, int device, uintptr_t stream) {
  const char* f = "update";
  fusedopt::Optimizer opt;
  if (optimizer == "adam")
    opt = fusedopt::Optimizer::kAdam;
  else if (optimizer == "sgd")
    opt = fusedopt::Optimizer::kSgd;
  else
    fail(f, "optimizer must be 'adam' or 'sgd', got '" + optimizer + "'");
  const Dtype dt = dtype_of(f, dtype);
  require_count(f, "num_blocks", num_blocks, kMaxGridX);
  fusedopt::UpdateArgs a{};
  a.param = pointer<void>(f, "param", param);
  a.grad = pointer<const void>(f, "grad", grad);
  a.moment1 = pointer<float>(f, "moment1", moment1);
  const bool adam = opt == fusedopt::Optimizer::kAdam;
  a.moment2 = pointer<float>(f, "moment2", moment2, /*nullable=*/!adam);
  if (!adam && a.moment2 != nullptr) fail(f, "moment2 must be null (0) for sgd");
  a.num_blocks = num_blocks;
  a.block_tensor = pointer<const int32_t>(f, "block_tensor", block_tensor);
  a.tensor_end = pointer<const int64_t>(f, "tensor_end", tensor_end);
  a.tensor_group = pointer<const int32_t>(f, "tensor_group", tensor_group);
  a.tensor_step = pointer<const float>(f, "tensor_step", tensor_step);
  a.hyper = pointer<const float>(f, "hyper", hyper);
  a.globals = pointer<const float>(f, "globals", globals);
  a.stats_partials = pointer<float>(f, "stats_partials", stats_partials, /*nullable=*/true);
  if (a.stats_partials != nullptr) require_stride(f, "stats_stride", stats_stride, num_blocks);
  a.stats_stride = stats_stride;
  DeviceGuard guard(f, device);
  fusedopt::launch_update(opt, dt, a, stream_of(stream));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "fusedopt CUDA kernels (docs/kernel_contract.md) over raw device pointers; use them through "
      "fusedopt.cuda_backend, which validates the tensors.";
  m.attr("BLOCK") = fusedopt::kBlock;
  m.attr("NUM_GLOBALS") = int(fusedopt::kNumGlobals);
  m.attr("NUM_HYPER") = int(fusedopt::kNumHyper);
  // cudart is linked statically: this is the runtime the kernels run on, not torch's.
  m.attr("CUDART_VERSION") = CUDART_VERSION;
  m.def("grad_norm", &grad_norm, "Launch 1: per-block sum of (grad/scale)^2 and non-finite flag.", py::arg("grad"),
        py::arg("dtype"), py::arg("num_blocks"), py::arg("block_tensor"), py::arg("tensor_end"),
        py::arg("tensor_group"), py::arg("scale"), py::arg("block_sums"), py::arg("block_sums_stride"), py::arg("device"),
        py::arg("stream"));
  m.def("tensor_reduce", &tensor_reduce, "Launch 2: fold per-block values per tensor (0 sum, 1 min, 2 max).",
        py::arg("block_values"), py::arg("values_stride"), py::arg("tensor_block_start"), py::arg("num_tensors"),
        py::arg("ops"), py::arg("out"), py::arg("out_stride"), py::arg("tensor_offset"), py::arg("device"),
        py::arg("stream"));
  m.def("finalize", &finalize, "Launch 3: global norm, clip coefficient, found_inf, steps and loss scale.",
        py::arg("tensor_sums"), py::arg("sums_stride"), py::arg("num_tensors_all"), py::arg("tensor_group"), py::arg("tensor_step"),
        py::arg("num_tensors_dev"), py::arg("globals"), py::arg("scale"), py::arg("growth_tracker"),
        py::arg("found_inf_in"), py::arg("max_grad_norm"), py::arg("growth_factor"), py::arg("backoff_factor"),
        py::arg("growth_interval"), py::arg("update_scale"), py::arg("device"), py::arg("stream"));
  m.def("update", &update, "Launch 4: the optimizer step ('adam' or 'sgd') with optional statistics partials.",
        py::arg("optimizer"), py::arg("param"), py::arg("grad"), py::arg("dtype"), py::arg("moment1"),
        py::arg("moment2"), py::arg("num_blocks"), py::arg("block_tensor"), py::arg("tensor_end"),
        py::arg("tensor_group"), py::arg("tensor_step"), py::arg("hyper"), py::arg("globals"),
        py::arg("stats_partials"), py::arg("stats_stride"), py::arg("device"), py::arg("stream"));
}
