// InfoNCE forward statistics in one sweep over the tiles of S (math in pyclipfast/clip.py):
//
//     S_ij = s·⟨A_i, B_j⟩                                   (no bias: it cancels)
//     row_lse_i = logsumexp_j S_ij,   col_lse_j = logsumexp_i S_ij
//     row_pos_i = Σ_j pos_ij S_ij,    col_pos_j = Σ_i pos_ij S_ij
//     row_dot_i = Σ_j P^r_ij S_ij,    col_dot_j = Σ_i P^c_ij S_ij    (Dots only; P the row / column softmax)
//
// The grid is (row groups × column groups), the scheme of triton/clip.py
// `_clip_fwd_kernel`. A program sweeps its row blocks; for each it keeps the
// online (max, sum-exp, pos) of its rows in registers over its column blocks and
// writes them to its column group's slot of row_max/row_sum/row_pos
// [col_groups, N]. Each tile's column statistics are merged into the program's
// row-group slot of col_max/col_sum/col_pos [row_groups, M]. The host merges the
// slots (`merge_lse`). No atomics, deterministic, every tile computed once.
// With Dots (row_dot != nullptr) the sweep also keeps Σ exp(S − max)·S beside each
// sum-exp, rescaled with it (row_dot / col_dot, merged on the host with `merge_weighted`).
//
// kPairRule (ClipForwardParams::pair_rule set, rows only): each score passes through the pair
// rule on the ids (PairRules in tile.cuh) and no positives are summed; the positive sums keep
// only the NaN of a non-finite score, so a non-finite input still shows. A pair rule and Dots
// are never asked for together.
#pragma once

#include <type_traits>

#include "tile.cuh"

namespace pyclipfast {
namespace clip_fwd_kernels {

using namespace tile;

constexpr int kRowsPerWarp = BM / kWarps;  // row pass: a warp reduces one row at a time
constexpr int kColsPerLane = BN / 32;
constexpr int kColSlices = kThreads / BN;  // column pass: kColSlices threads per column
constexpr int kRowsPerSlice = BM / kColSlices;

// (max, sum-exp, positive sum[, Σ exp(S − max)·S]) of the rows a warp owns, the same in all its lanes.
struct RowStats {
  float max[kRowsPerWarp], sum[kRowsPerWarp], pos[kRowsPerWarp], dot[kRowsPerWarp];
};

// One tile's column statistics per slice of rows, before they are merged.
struct ColScratch {
  float max[kColSlices][BN], sum[kColSlices][BN], pos[kColSlices][BN];
};

// With Dots, the tile's Σ exp(S − max)·S per slice of rows too.
struct ColDotScratch : ColScratch {
  float dot[kColSlices][BN];
};

// (max, sum) ← the log-sum-exp merge of (max, sum) and (other_max, other_sum).
__device__ __forceinline__ void merge_lse(float& max, float& sum, float other_max, float other_sum) {
  const float new_max = fmaxf(max, other_max);
  const float shift = finite_or_zero(new_max);
  sum = sum * expf(max - shift) + other_sum * expf(other_max - shift);
  max = new_max;
}

// Fold the tile sm.s into the running statistics of the warp's rows.
template <bool kPairRule, bool Dots, typename T>
__device__ __forceinline__ void row_pass(const TileSmem<T>& sm, RowStats& st, const Positives& pos, float scale,
                                         int64_t row0, int64_t n_rows, int64_t col0, int64_t n_cols,
                                         const PairRules& rules) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  bool col_ok[kColsPerLane];
  int64_t col_key[kColsPerLane];
  int64_t col_id[kColsPerLane];
#pragma unroll
  for (int q = 0; q < kColsPerLane; ++q) {
    const int64_t j = col0 + lane + 32 * q;
    col_ok[q] = j < n_cols;
    col_key[q] = col_ok[q] ? pos.col_key(j) : -1;
    col_id[q] = kPairRule && col_ok[q] ? rules.col_id(j) : -1;
  }
#pragma unroll
  for (int t = 0; t < kRowsPerWarp; ++t) {
    const int r = warp * kRowsPerWarp + t;
    const int64_t i = row0 + r;
    const bool row_ok = i < n_rows;
    const int64_t row_key = row_ok ? pos.row_key(i) : -1;
    const int64_t row_id = kPairRule && row_ok ? rules.row_id(i) : -1;
    float v[kColsPerLane];
    float tile_max = kNegInf, pos_sum = 0.0f;
#pragma unroll
    for (int q = 0; q < kColsPerLane; ++q) {
      const bool ok = row_ok && col_ok[q];
      const float score = ok ? sm.s[r][lane + 32 * q] * scale : kNegInf;
      v[q] = kPairRule && ok ? rules(score, sm.s[r][lane + 32 * q], row_id, col_id[q]) : score;
      tile_max = fmaxf(tile_max, v[q]);
      if (ok && pos.match(row_key, col_key[q])) pos_sum += v[q];
      else if (ok && !isfinite(score)) pos_sum = NAN;  // a −∞ score leaves no trace in the sum-exp
    }
    const float new_max = fmaxf(st.max[t], warp_max(tile_max));
    const float shift = finite_or_zero(new_max);  // rows past the end stay −inf; keep them NaN-free
    float e = 0.0f;
    if constexpr (Dots) {
      float dot = 0.0f;  // Σ e·S with the unmasked scores (0 out of range, where e = 0 too)
#pragma unroll
      for (int q = 0; q < kColsPerLane; ++q) {
        const float eq = expf(v[q] - shift);
        e += eq;
        dot += eq * (row_ok && col_ok[q] ? v[q] : 0.0f);
      }
      const float rescale = expf(st.max[t] - shift);
      st.sum[t] = st.sum[t] * rescale + warp_sum(e);
      st.dot[t] = st.dot[t] * rescale + warp_sum(dot);
    } else {
#pragma unroll
      for (int q = 0; q < kColsPerLane; ++q) e += expf(v[q] - shift);
      st.sum[t] = st.sum[t] * expf(st.max[t] - shift) + warp_sum(e);
    }
    st.max[t] = new_max;
    st.pos[t] += warp_sum(pos_sum);
  }
}

// Merge the tile's column statistics into this program's row-group slot (col_part).
template <bool Dots, typename T, typename Scratch>
__device__ __forceinline__ void col_pass(const TileSmem<T>& sm, Scratch& scratch, const ClipForwardParams& p,
                                         const Positives& pos, float scale, int64_t row0, int64_t col0,
                                         int64_t col_part) {
  const int c = threadIdx.x % BN, slice = threadIdx.x / BN;
  const int64_t j = col0 + c;
  const bool col_ok = j < p.s.n_cols;
  const int64_t col_key = col_ok ? pos.col_key(j) : -1;
  const int r_lo = slice * kRowsPerSlice;
  const int r_hi = static_cast<int>(min64(r_lo + kRowsPerSlice, col_ok ? p.s.n_rows - row0 : 0));
  float cmax = kNegInf;
  for (int r = r_lo; r < r_hi; ++r) cmax = fmaxf(cmax, sm.s[r][c] * scale);
  const float shift = finite_or_zero(cmax);
  float csum = 0.0f, cpos = 0.0f, cdot = 0.0f;
  for (int r = r_lo; r < r_hi; ++r) {
    const float v = sm.s[r][c] * scale;
    if constexpr (Dots) {
      const float e = expf(v - shift);
      csum += e;
      cdot += e * v;
    } else {
      csum += expf(v - shift);
    }
    if (pos.match(pos.row_key(row0 + r), col_key)) cpos += v;
    else if (!isfinite(v)) cpos = NAN;  // a −∞ score leaves no trace in the sum-exp
  }
  scratch.max[slice][c] = cmax;
  scratch.sum[slice][c] = csum;
  scratch.pos[slice][c] = cpos;
  if constexpr (Dots) scratch.dot[slice][c] = cdot;
  __syncthreads();
  if (slice == 0 && col_ok) {
    const int64_t at = col_part + j;
    float m = p.col_max[at], s = p.col_sum[at], ps = p.col_pos[at];
    if constexpr (Dots) {
      // (max, sum, dot) merged like the log-sum-exp: both sums rescale by exp(old max − new max).
      float d = p.col_dot[at];
#pragma unroll
      for (int q = 0; q < kColSlices; ++q) {
        const float new_max = fmaxf(m, scratch.max[q][c]);
        const float shift = finite_or_zero(new_max);
        const float mine = expf(m - shift), theirs = expf(scratch.max[q][c] - shift);
        s = s * mine + scratch.sum[q][c] * theirs;
        d = d * mine + scratch.dot[q][c] * theirs;
        m = new_max;
        ps += scratch.pos[q][c];
      }
      p.col_dot[at] = d;
    } else {
#pragma unroll
      for (int q = 0; q < kColSlices; ++q) {
        merge_lse(m, s, scratch.max[q][c], scratch.sum[q][c]);
        ps += scratch.pos[q][c];
      }
    }
    p.col_max[at] = m;
    p.col_sum[at] = s;
    p.col_pos[at] = ps;
  }
  // The next row block of this program reads these columns back, and rewrites
  // the scratch: make the stores visible block-wide first.
  __syncthreads();
}

template <bool Dots>
__device__ __forceinline__ void store_rows(const RowStats& st, const ClipForwardParams& p, int64_t row0,
                                           int64_t row_part) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane != 0) return;
#pragma unroll
  for (int t = 0; t < kRowsPerWarp; ++t) {
    const int64_t i = row0 + warp * kRowsPerWarp + t;
    if (i < p.s.n_rows) {
      p.row_max[row_part + i] = st.max[t];
      p.row_sum[row_part + i] = st.sum[t];
      p.row_pos[row_part + i] = st.pos[t];
      if constexpr (Dots) p.row_dot[row_part + i] = st.dot[t];
    }
  }
}

template <typename T, Mma M, bool kPairRule, bool Dots>
__global__ void __launch_bounds__(kThreads) clip_fwd_kernel(const ClipForwardParams p) {
  __shared__ TileSmem<T> sm;
  __shared__ std::conditional_t<Dots, ColDotScratch, ColScratch> scratch;
  const ScoreParams& s = p.s;
  const Operand<T> a = make_operand<T>(s.a, s.stride_am, s.stride_ak);
  const Operand<T> b = make_operand<T>(s.b, s.stride_bn, s.stride_bk);
  const Positives pos = positives(s);
  const PairRules rules = pair_rules(p);
  const float scale = __ldg(s.scale);
  const bool bidirectional = p.col_max != nullptr;
  const int64_t rb_lo = static_cast<int64_t>(blockIdx.x) * p.row_blocks_per_group;
  const int64_t rb_hi = min64(rb_lo + p.row_blocks_per_group, ceil_div(s.n_rows, BM));
  const int64_t cb_lo = static_cast<int64_t>(blockIdx.y) * p.col_blocks_per_group;
  const int64_t cb_hi = min64(cb_lo + p.col_blocks_per_group, ceil_div(s.n_cols, BN));
  const int64_t col_part = static_cast<int64_t>(blockIdx.x) * s.n_cols;
  const int64_t row_part = static_cast<int64_t>(blockIdx.y) * s.n_rows;
  for (int64_t rb = rb_lo; rb < rb_hi; ++rb) {
    const int64_t row0 = rb * BM;
    RowStats st;
#pragma unroll
    for (int t = 0; t < kRowsPerWarp; ++t) {
      st.max[t] = kNegInf;
      st.sum[t] = 0.0f;
      st.pos[t] = 0.0f;
      st.dot[t] = 0.0f;
    }
    for (int64_t cb = cb_lo; cb < cb_hi; ++cb) {
      const int64_t col0 = cb * BN;
      score_tile<T, M>(sm, sm.s, a, b, row0, s.n_rows, col0, s.n_cols, s.dim);
      row_pass<kPairRule, Dots>(sm, st, pos, scale, row0, s.n_rows, col0, s.n_cols, rules);
      if (bidirectional) col_pass<Dots>(sm, scratch, p, pos, scale, row0, col0, col_part);
    }
    store_rows<Dots>(st, p, row0, row_part);
  }
}

template <typename T, Mma M>
struct Launch {
  static cudaError_t run(const ClipForwardParams& p, cudaStream_t stream) {
    const dim3 grid(p.row_groups, p.col_groups);
    if (p.pair_rule != PairRule::kNone && p.row_dot != nullptr) return cudaErrorInvalidValue;
    if (p.pair_rule != PairRule::kNone) clip_fwd_kernel<T, M, true, false><<<grid, kThreads, 0, stream>>>(p);
    else if (p.row_dot != nullptr) clip_fwd_kernel<T, M, false, true><<<grid, kThreads, 0, stream>>>(p);
    else clip_fwd_kernel<T, M, false, false><<<grid, kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  }
};

}  // namespace clip_fwd_kernels

template <DType D>
cudaError_t clip_forward(const ClipForwardParams& p, cudaStream_t stream) {
  return tile::launch_for<typename tile::Storage<D>::T, clip_fwd_kernels::Launch>(p, stream);
}

}  // namespace pyclipfast
