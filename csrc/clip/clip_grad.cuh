// InfoNCE gradient tiles (math in pyclipfast/clip.py), for upstream gradients of the forward's four vectors:
//
//     G_ij = g_row_i·exp(S_ij − row_lse_i) + g_col_j·exp(S_ij − col_lse_j) + pos_ij·(g_row_pos_i + g_col_pos_j)
//     dA = s·G·B,   dB = s·Gᵀ·A,   dscale = Σ_ij G_ij⟨A_i, B_j⟩
//
// One program per tile of the block [row0, row1) × [col0, col1) of S (the scheme
// of triton/clip.py `_clip_grad_kernel`): recompute the tile, write G·inv_norm in
// the input dtype (|G·inv_norm| ≤ 1, so 16-bit storage keeps its precision) and the
// tile's dscale partial Σ G_ij⟨A_i, B_j⟩. The host runs dA and dB as GEMMs on the
// block of G (pyclipfast._blocks.blocked_grads).
//
// kPairRule (ClipGradParams::pair_rule set, rows only): S_ij passes through the pair rule on the
// ids (PairRules in tile.cuh) and G_ij = g_row_i·exp(S_ij − row_lse_i), 0 on excluded pairs and on
// rows whose every pair is excluded (row_lse −∞); dA, dB and dscale as above (no gradient
// through the penalty).
#pragma once

#include "tile.cuh"

namespace pyclipfast {
namespace clip_grad_kernels {

using namespace tile;

// G_ij from the recomputed score S_ij (absent upstream gradients count as zero).
template <bool kPairRule>
__device__ __forceinline__ float grad_entry(const ClipGradParams& p, const Positives& pos, int64_t i, int64_t j,
                                            float s) {
  float g = 0.0f;
  if (p.g_row != nullptr) {
    const float lse = __ldg(p.row_lse + i);  // −∞ only for a row with every pair excluded: G = 0
    g += __ldg(p.g_row + i) * expf(s - (kPairRule ? finite_or_zero(lse) : lse));
  }
  if (p.g_col != nullptr) g += __ldg(p.g_col + j) * expf(s - __ldg(p.col_lse + j));
  if ((p.g_row_pos != nullptr || p.g_col_pos != nullptr) && pos(i, j)) {
    float wp = 0.0f;
    if (p.g_row_pos != nullptr) wp += __ldg(p.g_row_pos + i);
    if (p.g_col_pos != nullptr) wp += __ldg(p.g_col_pos + j);
    g += wp;
  }
  return g;
}

template <typename T, Mma M, bool kPairRule>
__global__ void __launch_bounds__(kThreads) clip_grad_kernel(const ClipGradParams p) {
  __shared__ TileSmem<T> sm;
  __shared__ float scratch[1][kWarps];
  const ScoreParams& s = p.s;
  const int64_t tile = blockIdx.x;
  const int64_t col_tiles = ceil_div(p.col1 - p.col0, BN);
  const int64_t row0 = p.row0 + tile / col_tiles * BM;
  const int64_t col0 = p.col0 + tile % col_tiles * BN;
  const Operand<T> a = make_operand<T>(s.a, s.stride_am, s.stride_ak);
  const Operand<T> b = make_operand<T>(s.b, s.stride_bn, s.stride_bk);
  score_tile<T, M>(sm, sm.s, a, b, row0, p.row1, col0, p.col1, s.dim);
  const Positives pos = positives(s);
  const PairRules rules = pair_rules(p);
  const float scale = __ldg(s.scale);
  T* g_out = static_cast<T*>(p.g_out);
  const float inv_norm = g_out != nullptr ? __ldg(p.inv_norm) : 0.0f;
  float dscale[1] = {0.0f};
  for (int e = threadIdx.x; e < BM * BN; e += kThreads) {
    const int r = e / BN, c = e % BN;
    const int64_t i = row0 + r, j = col0 + c;
    if (i >= p.row1 || j >= p.col1) continue;
    const float acc = sm.s[r][c];
    const float score = kPairRule ? rules(acc * scale, acc, rules.row_id(i), rules.col_id(j)) : acc * scale;
    const float g = grad_entry<kPairRule>(p, pos, i, j, score);
    dscale[0] += g * acc;
    if (g_out != nullptr) g_out[(i - p.row0) * p.stride_gm + (j - p.col0) * p.stride_gn] = from_float<T>(g * inv_norm);
  }
  block_sum<1>(dscale, scratch);
  if (threadIdx.x == 0) p.dscale_part[tile] = dscale[0];
}

template <typename T, Mma M>
struct Launch {
  static cudaError_t run(const ClipGradParams& p, cudaStream_t stream) {
    const int64_t tiles = block_tiles(p.row0, p.row1, p.col0, p.col1);
    const unsigned grid = static_cast<unsigned>(tiles);
    if (p.pair_rule != PairRule::kNone) clip_grad_kernel<T, M, true><<<grid, kThreads, 0, stream>>>(p);
    else clip_grad_kernel<T, M, false><<<grid, kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  }
};

}  // namespace clip_grad_kernels

template <DType D>
cudaError_t clip_grad(const ClipGradParams& p, cudaStream_t stream) {
  return tile::launch_for<typename tile::Storage<D>::T, clip_grad_kernels::Launch>(p, stream);
}

}  // namespace pyclipfast
