// pyclipfast CUDA kernels: the plain C++ launch interface.
//
// Raw pointers, sizes, strides, a dtype enum and a cudaStream_t: no torch and no
// device code, so the binding (bindings.cpp, the only file that sees torch) and
// the kernels (*.cu, which never see torch) compile apart and in parallel.
//
// Every launcher returns the cudaError_t of its launch (cudaGetLastError()).
// Argument checking is the caller's job (bindings.cpp does it before any launch).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace pyclipfast {

// One tile of S = scale·A·Bᵀ is kBlockM rows × kBlockN columns; the host code
// (pyclipfast/cuda/_launch.py) reads these through pyclipfast._C.BLOCK_M/BLOCK_N.
constexpr int kBlockM = 64;
constexpr int kBlockN = 64;

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Which (i, j) are positive pairs: i == j, equal int64 ids, or none at all.
enum class PosMode : int { kDiagonal = 0, kIds = 1, kNone = 2 };

// A pair rule on the ids (rows only, the ids then select pairs instead of positives): the score of
// a selected pair becomes −∞ (kExcludeEqual: equal ids) or score + penalty·⟨A_i, B_j⟩
// (kPenaliseUnequal: ids differ, kPenaliseEqual: equal ids; no gradient through the penalty).
enum class PairRule : int { kNone = 0, kExcludeEqual = 1, kPenaliseUnequal = 2, kPenaliseEqual = 3 };

// Where the scores come from: A (n_rows × dim) and B (n_cols × dim), any strides.
struct ScoreParams {
  const void* a;
  const void* b;
  int64_t n_rows, n_cols, dim;
  int64_t stride_am, stride_ak, stride_bn, stride_bk;
  DType dtype;
  bool tf32;             // float32 only: TF32 tensor cores instead of IEEE FMA
  const float* scale;    // device scalar s
  PosMode pos_mode;
  const int64_t* row_ids;  // kIds only, n_rows of them
  const int64_t* col_ids;  // kIds only, n_cols of them
};

// InfoNCE forward sweep over a (row_groups × col_groups) grid of programs.
struct ClipForwardParams {
  ScoreParams s;
  float* row_max;  // [col_groups, n_rows]
  float* row_sum;
  float* row_pos;
  float* col_max;  // [row_groups, n_cols]; nullptr when rows only
  float* col_sum;
  float* col_pos;
  int row_groups, col_groups;
  int row_blocks_per_group, col_blocks_per_group;
  PairRule pair_rule;      // kNone: the plain InfoNCE; else rows only, ids in s.row_ids / s.col_ids
  float penalty;
  float* row_dot;  // [col_groups, n_rows] Σ exp(S − max)·S; nullptr: not computed (always with a pair rule)
  float* col_dot;  // [row_groups, n_cols]; nullptr when rows only or not computed
};

// InfoNCE gradient tiles of the block [row0, row1) × [col0, col1) of S.
struct ClipGradParams {
  ScoreParams s;
  const float* row_lse;    // each of these six: nullptr when absent
  const float* col_lse;
  const float* g_row;
  const float* g_col;
  const float* g_row_pos;
  const float* g_col_pos;
  const float* inv_norm;   // device scalar: G is stored multiplied by it
  void* g_out;             // (row1-row0) × (col1-col0), the input dtype; nullptr: not stored
  int64_t stride_gm, stride_gn;
  float* dscale_part;      // one per tile, row-major over the block's tiles
  int64_t row0, row1, col0, col1;
  PairRule pair_rule;      // as in ClipForwardParams (then only g_row and row_lse are read)
  float penalty;
};

// SigLIP loss / gradient tiles of the block [row0, row1) × [col0, col1) of S.
struct SiglipParams {
  ScoreParams s;
  const float* bias;       // device scalar b, or nullptr for no bias
  void* g_out;             // as in ClipGradParams (stored as is: |G| < 1)
  int64_t stride_gm, stride_gn;
  float* loss_part;        // one each per tile
  float* dscale_part;
  float* dbias_part;
  int64_t row0, row1, col0, col1;
};

// Distillation with adaptive angular margin (math in pyclipfast/distill.py): the teacher's side and the options.
struct DistillTeacher {
  const void* ta;          // Tᵃ (n_rows × dim), the student's dtype, any strides; nullptr: no teacher needed
  const void* tb;          // Tᵇ (n_cols × dim)
  int64_t dim;
  int64_t stride_am, stride_ak, stride_bn, stride_bk;
  const float* scale;      // device scalar t
};

enum class Kd : int { kOff = 0, kKl = 1, kCe = 2 };

struct DistillOptions {
  float margin;            // m ≥ 0; 0: ψ = c
  bool filter;             // drop negatives with α > threshold from the InfoNCE denominators
  float threshold;
  Kd kd;                   // which row/column cross term the forward accumulates
  float angle_eps;         // ε of the clamp c ∈ [−1+ε, 1−ε] (reference.ANGLE_EPS)
};

// Forward statistics, indices along dim 0 of the partial buffers (the first three without KD).
enum DistillStat : int { kZMax, kZSum, kZPos, kUMax, kUSum, kVMax, kVSum, kVCross, kDistillStats };
// Backward per-row / per-column vectors, indices along dim 0 (the first three without KD).
enum DistillVector : int { kLse, kGLse, kGPos, kStudentLse, kGStudentLse, kTeacherLse, kGCross, kDistillVectors };

struct DistillForwardParams {
  ScoreParams s;
  DistillTeacher t;
  DistillOptions o;
  float* row_part;         // [stats, col_groups, n_rows]
  float* col_part;         // [stats, row_groups, n_cols]; the Z_MAX/U_MAX/V_MAX slots start at −inf, others 0
  int row_groups, col_groups;
  int row_blocks_per_group, col_blocks_per_group;
};

struct DistillGradParams {
  ScoreParams s;
  DistillTeacher t;
  DistillOptions o;
  const float* row_vec;    // [vectors, n_rows]
  const float* col_vec;    // [vectors, n_cols]
  const float* inv_norm;   // device scalar: H is stored multiplied by it
  void* g_out;             // (row1-row0) × (col1-col0), the input dtype; nullptr: not stored
  int64_t stride_gm, stride_gn;
  float* dscale_part;      // one per tile
  int64_t row0, row1, col0, col1;
};

// Cosine loss rows (math in pyclipfast/cosine.py): cos_i and, when wanted, the gradients of grad_scale·Σ_i cos_i.
struct CosineParams {
  const void* online;      // p, (n_rows × dim), any strides
  const void* target;      // z, (n_rows × dim), any strides
  int64_t n_rows, dim;
  int64_t stride_pm, stride_pk, stride_zm, stride_zk;
  DType dtype;
  float* cos;              // n_rows
  void* d_online;          // contiguous (n_rows × dim) in the input dtype, or nullptr
  void* d_target;          // likewise
  float grad_scale;
  float eps;               // norms are clamped to at least eps (F.cosine_similarity)
};

inline int64_t cdiv(int64_t x, int64_t y) { return (x + y - 1) / y; }

// Tiles of a block, the length of its dscale/loss partial buffers.
inline int64_t block_tiles(int64_t row0, int64_t row1, int64_t col0, int64_t col1) {
  return cdiv(row1 - row0, kBlockM) * cdiv(col1 - col0, kBlockN);
}

// Per-dtype launchers, defined in <loss>/<kernel>.cuh and explicitly instantiated,
// one dtype per .cu file, so that nvcc compiles the instantiations in parallel.
template <DType D> cudaError_t clip_forward(const ClipForwardParams& p, cudaStream_t stream);
template <DType D> cudaError_t clip_grad(const ClipGradParams& p, cudaStream_t stream);
template <DType D> cudaError_t siglip(const SiglipParams& p, cudaStream_t stream);
template <DType D> cudaError_t cosine(const CosineParams& p, cudaStream_t stream);
template <DType D> cudaError_t distill_forward(const DistillForwardParams& p, cudaStream_t stream);
template <DType D> cudaError_t distill_grad(const DistillGradParams& p, cudaStream_t stream);

}  // namespace pyclipfast
