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

// A segment's blocks and tensors: tensor i of the segment owns blocks tensor_block_start[i] ..
// tensor_block_start[i + 1] - 1 (int32 [num_segment_tensors + 1], on the device: not read here)
// and is column tensor_offset + i of the device's tensor table (num_tensors columns). Returns
// tensor_block_start, which may be null only for a segment without blocks.
const int32_t* segment_of(const char* f, uintptr_t tensor_block_start, int64_t num_segment_tensors,
                          int64_t num_blocks, int64_t tensor_offset, int64_t num_tensors) {
  require_count(f, "num_blocks", num_blocks, kMaxGridX);
  require_count(f, "num_tensors", num_tensors, INT32_MAX);
  require_count(f, "num_segment_tensors", num_segment_tensors, INT32_MAX);
  if (num_blocks > 0 && num_segment_tensors == 0) fail(f, "num_segment_tensors must be >= 1 when num_blocks > 0");
  // Both counts are in [0, INT32_MAX]: the difference does not overflow.
  if (tensor_offset < 0 || tensor_offset > num_tensors - num_segment_tensors)
    fail(f, "tensor_offset + num_segment_tensors must lie within the tensor table's num_tensors columns, got "
            "tensor_offset " + std::to_string(tensor_offset) + ", num_segment_tensors " +
                std::to_string(num_segment_tensors) + ", num_tensors " + std::to_string(num_tensors));
  return pointer<const int32_t>(f, "tensor_block_start", tensor_block_start, /*nullable=*/num_blocks == 0);
}

void grad_norm(int dtype, uintptr_t tensor_block_start, int64_t num_segment_tensors, int64_t num_blocks,
               int64_t tensor_offset, uintptr_t tensor_table, int64_t num_tensors, uintptr_t scale,
               uintptr_t block_sums, int64_t block_sums_stride, int device, uintptr_t stream) {
  const char* f = "grad_norm";
  const Dtype dt = dtype_of(f, dtype);
  auto* starts = segment_of(f, tensor_block_start, num_segment_tensors, num_blocks, tensor_offset, num_tensors);
  const bool empty = num_blocks == 0;
  auto* table = pointer<const int64_t>(f, "tensor_table", tensor_table, /*nullable=*/empty);
  auto* sc = pointer<const float>(f, "scale", scale, /*nullable=*/true);
  auto* out = pointer<float>(f, "block_sums", block_sums, /*nullable=*/empty);
  require_stride(f, "block_sums_stride", block_sums_stride, num_blocks);
  // An empty segment launches nothing and needs no device.
  if (empty) return;
  DeviceGuard guard(f, device);
  fusedopt::launch_grad_norm(dt, starts, int32_t(num_segment_tensors), num_blocks, tensor_offset, table, num_tensors,
                             sc, out, block_sums_stride, stream_of(stream));
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

void finalize(uintptr_t tensor_sums, int64_t sums_stride, int64_t num_tensors_all, uintptr_t tensor_table,
              uintptr_t tensor_step, int64_t num_tensors_dev, uintptr_t globals, uintptr_t scale,
              uintptr_t growth_tracker, uintptr_t found_inf_in, double max_grad_norm, double growth_factor,
              double backoff_factor, int growth_interval, bool update_scale, int device, uintptr_t stream) {
  const char* f = "finalize";
  require_count(f, "num_tensors_all", num_tensors_all, INT64_MAX / 2);
  require_count(f, "num_tensors_dev", num_tensors_dev, INT64_MAX / fusedopt::kTableRows);
  fusedopt::FinalizeArgs a{};
  a.tensor_sums = pointer<const float>(f, "tensor_sums", tensor_sums, /*nullable=*/num_tensors_all == 0);
  require_stride(f, "sums_stride", sums_stride, num_tensors_all);
  a.sums_stride = sums_stride;
  a.num_tensors_all = num_tensors_all;
  a.tensor_table = pointer<const int64_t>(f, "tensor_table", tensor_table, /*nullable=*/num_tensors_dev == 0);
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

const fusedopt::AlgorithmSchema& algorithm_of(const char* function, const std::string& name) {
  std::string known;
  for (const auto& schema : fusedopt::algorithm_schemas()) {
    if (schema.name == name) return schema;
    known += (known.empty() ? "'" : ", '") + schema.name + "'";
  }
  fail(function, "algorithm must be one of " + known + ", got '" + name + "'");
}

// The state buffers' dtype: float32, bfloat16 (the low-precision tier's bf16 state) or uint8 (the
// codes of 8-bit state).
fusedopt::StateDtype state_dtype_of(const char* function, int code) {
  using fusedopt::StateDtype;
  if (code != int(StateDtype::kFloat32) && code != int(StateDtype::kBFloat16) && code != int(StateDtype::kUInt8))
    fail(function, "state_dtype must be 0 (float32), 1 (bfloat16) or 3 (uint8: 8-bit state), got " +
                       std::to_string(code));
  return StateDtype(code);
}

void update(const std::string& algorithm, int dtype, uintptr_t tensor_block_start, int64_t num_segment_tensors,
            int64_t num_blocks, int64_t tensor_offset, uintptr_t tensor_table, int64_t num_tensors, uintptr_t state1,
            uintptr_t state2, int state_dtype, uintptr_t tensor_step, uintptr_t hyper, uintptr_t globals,
            uintptr_t stats_partials, int64_t stats_stride, uintptr_t remainder, int master_bits, uintptr_t scale1,
            uintptr_t scale2, int device, uintptr_t stream) {
  const char* f = "update";
  const fusedopt::AlgorithmSchema& alg = algorithm_of(f, algorithm);
  const Dtype dt = dtype_of(f, dtype);
  fusedopt::UpdateArgs a{};
  a.tensor_block_start =
      segment_of(f, tensor_block_start, num_segment_tensors, num_blocks, tensor_offset, num_tensors);
  a.num_segment_tensors = int32_t(num_segment_tensors);
  a.tensor_offset = int32_t(tensor_offset);
  const bool empty = num_blocks == 0;
  a.tensor_table = pointer<const int64_t>(f, "tensor_table", tensor_table, /*nullable=*/empty);
  a.num_tensors = num_tensors;
  a.state1 = pointer<void>(f, "state1", state1, /*nullable=*/empty);
  a.state2 = pointer<void>(f, "state2", state2, /*nullable=*/empty || alg.states < 2);
  if (alg.states < 2 && a.state2 != nullptr)
    fail(f, "state2 must be null (0) for " + alg.name + " (one state buffer)");
  a.state_dtype = state_dtype_of(f, state_dtype);
  // 8-bit state: each state's group scale bytes beside its codes, and none for other storage.
  const bool int8 = a.state_dtype == fusedopt::StateDtype::kUInt8;
  a.scale1 = pointer<uint8_t>(f, "scale1", scale1, /*nullable=*/empty || !int8);
  a.scale2 = pointer<uint8_t>(f, "scale2", scale2, /*nullable=*/empty || !int8 || alg.states < 2);
  if (!int8 && (a.scale1 != nullptr || a.scale2 != nullptr))
    fail(f, "scale1 and scale2 must be null (0) unless state_dtype is 3 (uint8: 8-bit state)");
  if (alg.states < 2 && a.scale2 != nullptr)
    fail(f, "scale2 must be null (0) for " + alg.name + " (one state buffer)");
  // Master weights: bf16 params only, with their remainder (int16 for 32 bits, uint8 for 24).
  if (master_bits != 0 && master_bits != 24 && master_bits != 32)
    fail(f, "master_bits must be 0, 24 or 32, got " + std::to_string(master_bits));
  if (master_bits != 0 && dt != Dtype::kBFloat16)
    fail(f, "master_bits must be 0 for dtype " + std::to_string(dtype) +
                ": master weights are for bfloat16 (1) params");
  a.master_bits = master_bits;
  a.remainder = pointer<void>(f, "remainder", remainder, /*nullable=*/empty || master_bits == 0);
  if (master_bits == 0 && a.remainder != nullptr) fail(f, "remainder must be null (0) when master_bits is 0");
  a.tensor_step = pointer<const float>(f, "tensor_step", tensor_step, /*nullable=*/empty);
  a.hyper = pointer<const float>(f, "hyper", hyper, /*nullable=*/empty);
  a.globals = pointer<const float>(f, "globals", globals);
  a.stats_partials = pointer<float>(f, "stats_partials", stats_partials, /*nullable=*/true);
  if (a.stats_partials != nullptr) require_stride(f, "stats_stride", stats_stride, num_blocks);
  a.stats_stride = stats_stride;
  if (empty) return;
  DeviceGuard guard(f, device);
  fusedopt::launch_update(alg.code, dt, num_blocks, a, stream_of(stream));
}

// The schema numbers (layout.h and the algorithm structs) under the names of
// python/fusedopt/engine/layout.py and int8.py (under "int8"; each algorithm's 8-bit formats as
// "state_codes", its STATE_CODES), for tests/test_schema.py.
py::dict schema() {
  namespace fo = fusedopt;
  const auto ops_list = [](const std::vector<fo::Reduce>& ops) {
    py::list out;
    for (const fo::Reduce op : ops) out.append(int(op));
    return out;
  };
  py::dict table_rows;
  table_rows["param_addr"] = int(fo::kParamAddr);
  table_rows["grad_addr"] = int(fo::kGradAddr);
  table_rows["group"] = int(fo::kGroup);
  table_rows["numel"] = int(fo::kNumel);
  table_rows["state_start"] = int(fo::kStateStart);
  py::dict common_hyper;
  common_hyper["lr"] = int(fo::kLr);
  common_hyper["max_lr"] = int(fo::kMaxLr);
  common_hyper["weight_decay"] = int(fo::kWeightDecay);
  common_hyper["corrected"] = int(fo::kCorrected);
  py::dict globals;
  globals["grad_norm"] = int(fo::kGradNorm);
  globals["clip_coef"] = int(fo::kClipCoef);
  globals["found_inf"] = int(fo::kFoundInf);
  globals["inv_scale"] = int(fo::kInvScale);
  globals["skipped_steps"] = int(fo::kSkippedSteps);
  globals["scale"] = int(fo::kScale);
  py::dict ops;
  ops["sum"] = int(fo::Reduce::kSum);
  ops["min"] = int(fo::Reduce::kMin);
  ops["max"] = int(fo::Reduce::kMax);
  py::dict algorithms;
  for (const auto& alg : fo::algorithm_schemas()) {
    py::dict hyper;
    for (const fo::HyperColumn& column : alg.hyper) hyper[column.name] = column.column;
    py::dict entry;
    entry["code"] = int(alg.code);
    entry["hyper"] = hyper;
    entry["states"] = alg.states;
    entry["stats"] = int(alg.stat_ops.size());
    entry["stat_ops"] = ops_list(alg.stat_ops);
    py::list codes;
    for (const fo::StateCode code : alg.state_codes) codes.append(fo::state_code_name(code));
    entry["state_codes"] = codes;
    algorithms[py::str(alg.name)] = entry;
  }
  py::dict out;
  out["block"] = fo::kBlock;
  out["state_align"] = fo::kStateAlign;
  out["table_rows"] = table_rows;
  out["common_hyper"] = common_hyper;
  out["first_algorithm_column"] = int(fo::kFirstAlgorithmColumn);
  out["hyper_columns"] = int(fo::kNumHyper);
  out["globals"] = globals;
  out["global_slots"] = int(fo::kNumGlobals);
  out["ops"] = ops;
  out["grad_sum_ops"] = ops_list({fo::kGradSquaresOp, fo::kNonfiniteOp});
  out["algorithms"] = algorithms;
  out["max_stat_columns"] = fo::kMaxColumns;
  out["max_states"] = fo::kMaxStates;
  py::dict mantissa_bits;
  for (const fo::StateCode code : {fo::StateCode::kSigned, fo::StateCode::kSqrt})
    mantissa_bits[fo::state_code_name(code)] = fo::int8_mantissa_bits(code);
  py::dict int8;
  int8["group"] = fo::kInt8Group;
  int8["exponent_bits"] = fo::kInt8ExponentBits;
  int8["mantissa_bits"] = mantissa_bits;
  int8["min_scale"] = fo::kInt8MinScale;
  out["int8"] = int8;
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "fusedopt CUDA kernels (docs/kernel_contract.md) over raw device pointers; use them through "
      "fusedopt.cuda_backend, which validates the tensors.";
  // cudart is linked statically: this is the runtime the kernels run on, not torch's.
  m.attr("CUDART_VERSION") = CUDART_VERSION;
  m.def("schema", &schema,
        "The schema numbers the kernels are compiled with (csrc/layout.h, csrc/algorithms/), under "
        "fusedopt.engine.layout's names.");
  m.def("grad_norm", &grad_norm, "Launch 1: per-block sum of (grad/scale)^2 and non-finite flag.", py::arg("dtype"),
        py::arg("tensor_block_start"), py::arg("num_segment_tensors"), py::arg("num_blocks"), py::arg("tensor_offset"),
        py::arg("tensor_table"), py::arg("num_tensors"), py::arg("scale"), py::arg("block_sums"),
        py::arg("block_sums_stride"), py::arg("device"), py::arg("stream"));
  m.def("tensor_reduce", &tensor_reduce, "Launch 2: fold per-block values per tensor (0 sum, 1 min, 2 max).",
        py::arg("block_values"), py::arg("values_stride"), py::arg("tensor_block_start"), py::arg("num_tensors"),
        py::arg("ops"), py::arg("out"), py::arg("out_stride"), py::arg("tensor_offset"), py::arg("device"),
        py::arg("stream"));
  m.def("finalize", &finalize, "Launch 3: global norm, clip coefficient, found_inf, steps and loss scale.",
        py::arg("tensor_sums"), py::arg("sums_stride"), py::arg("num_tensors_all"), py::arg("tensor_table"),
        py::arg("tensor_step"), py::arg("num_tensors_dev"), py::arg("globals"), py::arg("scale"),
        py::arg("growth_tracker"), py::arg("found_inf_in"), py::arg("max_grad_norm"), py::arg("growth_factor"),
        py::arg("backoff_factor"), py::arg("growth_interval"), py::arg("update_scale"), py::arg("device"),
        py::arg("stream"));
  m.def("update", &update, "Launch 4: one algorithm's step over a segment (fp32, bf16 or 8-bit state, master weights "
        "for bf16 params), with optional statistics partials.",
        py::arg("algorithm"), py::arg("dtype"), py::arg("tensor_block_start"), py::arg("num_segment_tensors"),
        py::arg("num_blocks"), py::arg("tensor_offset"), py::arg("tensor_table"), py::arg("num_tensors"),
        py::arg("state1"), py::arg("state2"), py::arg("state_dtype"), py::arg("tensor_step"), py::arg("hyper"),
        py::arg("globals"), py::arg("stats_partials"), py::arg("stats_stride"), py::arg("remainder"),
        py::arg("master_bits"), py::arg("scale1"), py::arg("scale2"), py::arg("device"), py::arg("stream"));
}
