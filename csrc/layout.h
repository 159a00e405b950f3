// The schema of python/fusedopt/engine/layout.py, repeated for the compiler: block size, tensor-table
// rows, hyperparameter columns, global slots, reduction ops and algorithm codes
// (docs/kernel_contract.md), and the 8-bit state's constants of python/fusedopt/engine/int8.py.
// Each algorithm's own hyperparameter columns, state count, 8-bit formats and statistics are in
// csrc/algorithms/<name>.cuh. fusedopt._C.schema() exports these numbers and tests/test_schema.py
// compares them with layout.py and int8.py name by name, so a number changed on one side only
// fails a CPU test.
//
// Host and device code include this header (bindings.cpp through launchers.h, every kernel through
// common.cuh): constants and enums only, no device code.
#pragma once

namespace fusedopt {

// Elements per thread block: 16 KB of fp32. A tensor takes whole blocks of its segment, so no block
// spans two tensors.
constexpr int kBlock = 4096;

// A tensor's state starts at a multiple of kStateAlign elements of its segment's state buffers:
// 128 bytes of fp32, so 16-byte vector loads of the state stay aligned.
constexpr int kStateAlign = 32;

// 8-bit state (state_dtype="int8", python/fusedopt/engine/int8.py, the specification): one code
// byte per element and one scale byte per group of kInt8Group consecutive elements of a state
// buffer.
// A code is a tiny float relative to its group's scale: kInt8ExponentBits of exponent field, the
// format's mantissa bits (int8_mantissa_bits), a sign bit for kSigned; a group whose largest
// magnitude has an exponent field below kInt8MinScale is stored as zeros.
constexpr int kInt8Group = 32;
constexpr int kInt8ExponentBits = 3;
constexpr int kInt8MinScale = 32;
static_assert(kStateAlign % kInt8Group == 0, "no group of 8-bit state spans two tensors");

// The format of each of an algorithm's states in 8-bit storage (int8.MANTISSA_BITS's names; the
// algorithm struct's kCodes, python/fusedopt/algorithms/<name>.py's STATE_CODES): kSigned for
// first moments and momentum, kSqrt for Adam's second moment (coded on sqrt(v)).
enum class StateCode : int { kSigned = 0, kSqrt = 1 };

constexpr const char* state_code_name(StateCode code) { return code == StateCode::kSqrt ? "sqrt" : "signed"; }

// Mantissa bits of a format: 4 beside the sign bit, 5 on sqrt(v) (v's rounding error adds up over
// ~1000 steps at beta2 = 0.999, m's fades within ~10).
constexpr int int8_mantissa_bits(StateCode code) { return code == StateCode::kSqrt ? 5 : 4; }

// Rows of the per-device tensor table, int64 [kTableRows, T_dev] (column t = tensor t). A
// segment's kernel block finds its tensor in the segment's tensor_block_start (block_owner in
// common.cuh), not in this table.
enum TableRow : int {
  kParamAddr = 0,   // p.data_ptr(): storage dtype, dense in memory
  kGradAddr = 1,    // the gradient's data_ptr(), same strides as the param; 0 without a gradient
  kGroup = 2,       // param group, -1 when the tensor has no gradient this step
  kNumel = 3,       // elements of the tensor
  kStateStart = 4,  // element offset of the tensor's state in the segment's state buffers
                    // (a multiple of kStateAlign)
  kTableRows = 5,
};

// Columns of the per-group hyperparameter table, float32 [G, kNumHyper]: these four are common to
// every algorithm, the algorithm's own follow from kFirstAlgorithmColumn.
enum Hyper : int {
  kLr = 0,
  kMaxLr = 1,
  kWeightDecay = 2,
  kCorrected = 3,
  kFirstAlgorithmColumn = 4,
  kNumHyper = 8,
};

// Slots of the per-device globals, float32 [kNumGlobals].
enum Global : int {
  kGradNorm = 0,
  kClipCoef = 1,
  kFoundInf = 2,
  kInvScale = 3,
  kSkippedSteps = 4,
  kScale = 5,
  kNumGlobals = 8,
};

// Per-column reductions of tensor_reduce.
enum class Reduce : int { kSum = 0, kMin = 1, kMax = 2 };

// How tensor_reduce folds grad_norm's two per-block figures (layout.GRAD_SUM_OPS): the sum of
// g^2 adds up, the non-finite flag (0 or 1) is set if any block's is.
constexpr Reduce kGradSquaresOp = Reduce::kSum;
constexpr Reduce kNonfiniteOp = Reduce::kMax;

// Kernel codes of the algorithms (layout.ALGORITHMS order); update.cu maps each to its struct.
enum class Algorithm : int { kAdamW = 0, kSgd = 1, kLion = 2 };

// Most statistic columns an algorithm may declare; tensor_reduce folds at most this many.
constexpr int kMaxColumns = 8;
// Most state buffers an algorithm may own: update takes state1 and state2.
constexpr int kMaxStates = 2;

// One of an algorithm's own hyperparameter columns, by the name its Python module gives it
// (fusedopt/algorithms/<name>.py, HYPER).
struct HyperColumn {
  const char* name;
  int column;
};

}  // namespace fusedopt
