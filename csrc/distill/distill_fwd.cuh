// Distillation forward statistics in one sweep over the tiles (math in pyclipfast/distill.py):
//
//     row_lse_i = logsumexp_j Z_ij,  row_pos_i = Σ_j pos_ij Z_ij
//     student_row_lse_i = logsumexp_j U_ij,  teacher_row_lse_i = logsumexp_j V_ij
//     row_cross_i = Σ_j softmax_j(V_i·)_ij · W_ij,   W = U − V (kd="kl"), U (kd="ce")
//
// and the same down the columns, as (max, Σ exp, Σ exp·W) partials: the grid and
// partial scheme of clip_fwd.cuh and triton/distill.py `_distill_fwd_kernel`. Per tile,
// the student and teacher score tiles are turned into Z, U and V in shared memory
// once; then a pair of threads folds each row into statistics it keeps in registers,
// and each column's statistics are merged into the program's row-group slot of the
// column partials. No atomics, nothing N×M stored.
#pragma once

#include "distill/distill_tile.cuh"

namespace pyclipfast {
namespace distill_fwd_kernels {

using namespace tile;
using namespace distill_kernels;

constexpr int kColSlices = kThreads / BN;  // column pass: kColSlices threads per column
constexpr int kRowsPerSlice = BM / kColSlices;
static_assert(kThreads == 2 * BM, "the row pass gives each row a pair of threads");

template <typename T>
struct Smem {
  TileSmem<T> tile;                 // staging; tile.s holds c, then U = s·c
  alignas(128) ScoreTile alpha;     // α, then V = t·α
  alignas(128) ScoreTile z;         // Z
  uint32_t positive[BM][BN / 32];   // pos_ij as bits
  float scratch[kDistillStats][kColSlices][BN];
};

// (max, Σ exp, Σ exp·W) of Z, U and V along one row or column.
struct LineStats {
  float z_max = kNegInf, z_sum = 0.0f, z_pos = 0.0f;
  float u_max = kNegInf, u_sum = 0.0f;
  float v_max = kNegInf, v_sum = 0.0f, v_cross = 0.0f;
};

__device__ __forceinline__ float pair_max(float x) { return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1)); }
__device__ __forceinline__ float pair_sum(float x) { return x + __shfl_xor_sync(0xffffffffu, x, 1); }

// (max, sum, weighted) ← the merge with (other_max, other_sum, other_weighted).
__device__ __forceinline__ void merge(float& max, float& sum, float& weighted, float other_max, float other_sum,
                                      float other_weighted) {
  const float new_max = fmaxf(max, other_max);
  const float shift = finite_or_zero(new_max);
  const float f = expf(max - shift), g = expf(other_max - shift);
  sum = sum * f + other_sum * g;
  weighted = weighted * f + other_weighted * g;
  max = new_max;
}

__device__ __forceinline__ void merge(LineStats& s, const LineStats& o) {
  float unused = 0.0f;
  merge(s.z_max, s.z_sum, unused, o.z_max, o.z_sum, 0.0f);
  s.z_pos += o.z_pos;
  merge(s.u_max, s.u_sum, unused, o.u_max, o.u_sum, 0.0f);
  merge(s.v_max, s.v_sum, s.v_cross, o.v_max, o.v_sum, o.v_cross);
}

template <typename T>
__device__ __forceinline__ bool is_positive(const Smem<T>& sm, int r, int c) {
  return (sm.positive[r][c / 32] >> (c % 32)) & 1u;
}

// c and α of the tile → Z (sm.z), U (in place of c) and V (in place of α), and the positive bits.
template <typename T>
__device__ __forceinline__ void logits(Smem<T>& sm, const DistillForwardParams& p, const Positives& pos,
                                       bool teacher, float scale, float teacher_scale, int64_t row0, int64_t col0) {
  const bool kd = p.o.kd != Kd::kOff;
  for (int e = threadIdx.x; e < BM * BN; e += kThreads) {  // a warp covers 32 columns of one row
    const int r = e / BN, c = e % BN;
    const int64_t i = row0 + r, j = col0 + c;
    const bool valid = i < p.s.n_rows && j < p.s.n_cols;
    const bool positive = valid && pos(i, j);
    const unsigned bits = __ballot_sync(0xffffffffu, positive);
    if (threadIdx.x % 32 == 0) sm.positive[r][c / 32] = bits;
    if (!valid) continue;
    const float cs = sm.tile.s[r][c];
    const float alpha = teacher ? sm.alpha[r][c] : cs;
    sm.z[r][c] = margin_logit(p.o, cs, alpha, positive, scale).z;
    if (kd) {  // a −∞ U or V would drop out of its log-sum-exp and give an infinite KL: NaN instead
      sm.tile.s[r][c] = isfinite(cs) ? cs * scale : NAN;
      sm.alpha[r][c] = isfinite(alpha) ? alpha * teacher_scale : NAN;
    }
  }
  __syncthreads();
}

// Fold sm's lines [lo, hi) of row/column `line` (along_row: row `line`, else column `line`)
// into statistics relative to the given shifts... computed in two sweeps: maxima, then sums.
template <typename T, bool kAlongRow>
__device__ __forceinline__ LineStats line_stats(const Smem<T>& sm, int line, int lo, int hi, int step, Kd kd,
                                                const LineStats& running, bool pair) {
  auto at = [&](const ScoreTile& tile, int k) { return kAlongRow ? tile[line][k] : tile[k][line]; };
  LineStats t;
  for (int k = lo; k < hi; k += step) {
    t.z_max = fmaxf(t.z_max, at(sm.z, k));
    if (kd != Kd::kOff) {
      t.u_max = fmaxf(t.u_max, at(sm.tile.s, k));
      t.v_max = fmaxf(t.v_max, at(sm.alpha, k));
    }
  }
  if (pair) {
    t.z_max = pair_max(t.z_max);
    t.u_max = pair_max(t.u_max);
    t.v_max = pair_max(t.v_max);
  }
  // Sums relative to the merged maxima: the new running maxima (rows) or the tile's own (columns).
  t.z_max = fmaxf(t.z_max, running.z_max);
  t.u_max = fmaxf(t.u_max, running.u_max);
  t.v_max = fmaxf(t.v_max, running.v_max);
  const float z_shift = finite_or_zero(t.z_max), u_shift = finite_or_zero(t.u_max);
  const float v_shift = finite_or_zero(t.v_max);
  for (int k = lo; k < hi; k += step) {
    const float z = at(sm.z, k);
    t.z_sum += expf(z - z_shift);
    if (kAlongRow ? is_positive(sm, line, k) : is_positive(sm, k, line)) t.z_pos += z;
    if (kd != Kd::kOff) {
      const float u = at(sm.tile.s, k), v = at(sm.alpha, k);
      const float e = expf(v - v_shift);
      t.u_sum += expf(u - u_shift);
      t.v_sum += e;
      t.v_cross += e * (kd == Kd::kKl ? u - v : u);
    }
  }
  if (pair) {
    t.z_sum = pair_sum(t.z_sum);
    t.z_pos = pair_sum(t.z_pos);
    t.u_sum = pair_sum(t.u_sum);
    t.v_sum = pair_sum(t.v_sum);
    t.v_cross = pair_sum(t.v_cross);
  }
  return t;
}

// Each row is folded by a pair of threads (interleaved columns) into its running statistics.
template <typename T>
__device__ __forceinline__ void row_pass(const Smem<T>& sm, LineStats& st, Kd kd, int rows, int cols) {
  const int r = threadIdx.x / 2, half = threadIdx.x % 2;
  const LineStats t = line_stats<T, true>(sm, r, half, r < rows ? cols : 0, 2, kd, st, true);
  merge(st, t);  // t's maxima already include st's: the merge only rescales st's sums
}

// Each column's slices are folded, then merged into this program's slot of the column partials.
template <typename T>
__device__ __forceinline__ void col_pass(Smem<T>& sm, const DistillForwardParams& p, int rows, int cols,
                                         int64_t col0) {
  const int c = threadIdx.x % BN, slice = threadIdx.x / BN;
  const int lo = slice * kRowsPerSlice;
  const int hi = c < cols ? min(lo + kRowsPerSlice, rows) : lo;
  const LineStats t = line_stats<T, false>(sm, c, lo, hi, 1, p.o.kd, LineStats{}, false);
  const float parts[kDistillStats] = {t.z_max, t.z_sum, t.z_pos, t.u_max, t.u_sum, t.v_max, t.v_sum, t.v_cross};
#pragma unroll
  for (int q = 0; q < kDistillStats; ++q) sm.scratch[q][slice][c] = parts[q];
  __syncthreads();
  if (slice == 0 && c < cols) {
    const int stats = p.o.kd != Kd::kOff ? kDistillStats : kZPos + 1;
    const int64_t stride = static_cast<int64_t>(p.row_groups) * p.s.n_cols;
    float* part = p.col_part + static_cast<int64_t>(blockIdx.x) * p.s.n_cols + col0 + c;
    float v[kDistillStats] = {kNegInf, 0.0f, 0.0f, kNegInf, 0.0f, kNegInf, 0.0f, 0.0f};
#pragma unroll
    for (int q = 0; q < kDistillStats; ++q) {
      if (q < stats) v[q] = part[q * stride];
    }
    LineStats s{v[kZMax], v[kZSum], v[kZPos], v[kUMax], v[kUSum], v[kVMax], v[kVSum], v[kVCross]};
#pragma unroll
    for (int k = 0; k < kColSlices; ++k) {
      merge(s, LineStats{sm.scratch[kZMax][k][c], sm.scratch[kZSum][k][c], sm.scratch[kZPos][k][c],
                         sm.scratch[kUMax][k][c], sm.scratch[kUSum][k][c], sm.scratch[kVMax][k][c],
                         sm.scratch[kVSum][k][c], sm.scratch[kVCross][k][c]});
    }
    const float out[kDistillStats] = {s.z_max, s.z_sum, s.z_pos, s.u_max, s.u_sum, s.v_max, s.v_sum, s.v_cross};
#pragma unroll
    for (int q = 0; q < kDistillStats; ++q) {
      if (q < stats) part[q * stride] = out[q];
    }
  }
  // The next row block of this program reads these columns back, and rewrites the
  // scratch: make the stores visible block-wide first.
  __syncthreads();
}

__device__ __forceinline__ void store_row(const LineStats& st, const DistillForwardParams& p, int64_t i) {
  const int stats = p.o.kd != Kd::kOff ? kDistillStats : kZPos + 1;
  const int64_t stride = static_cast<int64_t>(p.col_groups) * p.s.n_rows;
  float* part = p.row_part + static_cast<int64_t>(blockIdx.y) * p.s.n_rows + i;
  const float out[kDistillStats] = {st.z_max, st.z_sum, st.z_pos, st.u_max, st.u_sum, st.v_max, st.v_sum, st.v_cross};
#pragma unroll
  for (int q = 0; q < kDistillStats; ++q) {
    if (q < stats) part[q * stride] = out[q];
  }
}

template <typename T, Mma M>
__global__ void __launch_bounds__(kThreads) distill_fwd_kernel(const DistillForwardParams p) {
  extern __shared__ __align__(128) unsigned char smem[];
  Smem<T>& sm = *reinterpret_cast<Smem<T>*>(smem);
  const ScoreParams& s = p.s;
  const Operand<T> a = make_operand<T>(s.a, s.stride_am, s.stride_ak);
  const Operand<T> b = make_operand<T>(s.b, s.stride_bn, s.stride_bk);
  const bool teacher = p.t.ta != nullptr;
  const Operand<T> ta = make_operand<T>(p.t.ta, p.t.stride_am, p.t.stride_ak);
  const Operand<T> tb = make_operand<T>(p.t.tb, p.t.stride_bn, p.t.stride_bk);
  const Positives pos = positives(s);
  const float scale = __ldg(s.scale);
  const float teacher_scale = teacher ? __ldg(p.t.scale) : 0.0f;
  const int64_t rb_lo = static_cast<int64_t>(blockIdx.x) * p.row_blocks_per_group;
  const int64_t rb_hi = min64(rb_lo + p.row_blocks_per_group, ceil_div(s.n_rows, BM));
  const int64_t cb_lo = static_cast<int64_t>(blockIdx.y) * p.col_blocks_per_group;
  const int64_t cb_hi = min64(cb_lo + p.col_blocks_per_group, ceil_div(s.n_cols, BN));
  for (int64_t rb = rb_lo; rb < rb_hi; ++rb) {
    const int64_t row0 = rb * BM;
    const int rows = static_cast<int>(min64(BM, s.n_rows - row0));
    LineStats st;
    for (int64_t cb = cb_lo; cb < cb_hi; ++cb) {
      const int64_t col0 = cb * BN;
      const int cols = static_cast<int>(min64(BN, s.n_cols - col0));
      score_tile<T, M>(sm.tile, sm.tile.s, a, b, row0, s.n_rows, col0, s.n_cols, s.dim);
      if (teacher) score_tile<T, M>(sm.tile, sm.alpha, ta, tb, row0, s.n_rows, col0, s.n_cols, p.t.dim);
      logits(sm, p, pos, teacher, scale, teacher_scale, row0, col0);
      row_pass(sm, st, p.o.kd, rows, cols);
      col_pass(sm, p, rows, cols, col0);
    }
    const int r = threadIdx.x / 2;
    if (threadIdx.x % 2 == 0 && r < rows) store_row(st, p, row0 + r);
  }
}

template <typename T, Mma M>
struct Launch {
  static cudaError_t run(const DistillForwardParams& p, cudaStream_t stream) {
    return launch_with_smem<Smem<T>>(distill_fwd_kernel<T, M>, dim3(p.row_groups, p.col_groups), p, stream);
  }
};

}  // namespace distill_fwd_kernels

template <DType D>
cudaError_t distill_forward(const DistillForwardParams& p, cudaStream_t stream) {
  return tile::launch_for<typename tile::Storage<D>::T, distill_fwd_kernels::Launch>(p, stream);
}

}  // namespace pyclipfast
