// Sigmoid (SigLIP) loss and gradient tiles in one sweep (math in pyclipfast/siglip.py):
//
//     S_ij = s·⟨A_i, B_j⟩ + b,  y_ij = +1 on positives, −1 elsewhere,  z_ij = −y_ij·S_ij
//     loss_sum = Σ_ij softplus(z_ij)
//     G_ij = −y_ij·σ(z_ij),  dA = s·G·B,  dB = s·Gᵀ·A,  dscale = Σ G_ij⟨A_i, B_j⟩,  dbias = Σ G_ij
//
// One program per tile of the block [row0, row1) × [col0, col1) of S (the scheme
// of triton/siglip.py `_siglip_kernel`): its share of the loss, dscale and dbias
// (per-tile partials, summed on the host: deterministic), and, when gradients are
// wanted, the tile of G in the input dtype (|G| < 1). The host runs dA and dB as
// GEMMs on each block of G (pyclipfast._blocks.blocked_grads).
#pragma once

#include "tile.cuh"

namespace pyclipfast {
namespace siglip_kernels {

using namespace tile;

template <typename T, Mma M>
__global__ void __launch_bounds__(kThreads) siglip_kernel(const SiglipParams p) {
  __shared__ TileSmem<T> sm;
  __shared__ float scratch[3][kWarps];
  const ScoreParams& s = p.s;
  const int64_t tile = blockIdx.x;
  const int64_t col_tiles = ceil_div(p.col1 - p.col0, BN);
  const int64_t row0 = p.row0 + tile / col_tiles * BM;
  const int64_t col0 = p.col0 + tile % col_tiles * BN;
  const Operand<T> a = make_operand<T>(s.a, s.stride_am, s.stride_ak);
  const Operand<T> b = make_operand<T>(s.b, s.stride_bn, s.stride_bk);
  score_tile<T, M>(sm, sm.s, a, b, row0, p.row1, col0, p.col1, s.dim);
  const Positives pos = positives(s);
  const float scale = __ldg(s.scale);
  const float bias = p.bias != nullptr ? __ldg(p.bias) : 0.0f;
  T* g_out = static_cast<T*>(p.g_out);
  float part[3] = {0.0f, 0.0f, 0.0f};  // loss, dscale, dbias
  for (int e = threadIdx.x; e < BM * BN; e += kThreads) {
    const int r = e / BN, c = e % BN;
    const int64_t i = row0 + r, j = col0 + c;
    if (i >= p.row1 || j >= p.col1) continue;
    const float acc = sm.s[r][c];
    const bool positive = pos(i, j);
    const float z = positive ? -(acc * scale + bias) : acc * scale + bias;
    const float sig = 1.0f / (1.0f + expf(-z));
    const float g = positive ? -sig : sig;
    part[0] += isfinite(z) ? softplus(z) : NAN;  // softplus(±∞) is ∞ or 0: an infinite score gives NaN
    part[1] += g * acc;
    part[2] += g;
    if (g_out != nullptr) g_out[(i - p.row0) * p.stride_gm + (j - p.col0) * p.stride_gn] = from_float<T>(g);
  }
  block_sum<3>(part, scratch);
  if (threadIdx.x == 0) {
    p.loss_part[tile] = part[0];
    p.dscale_part[tile] = part[1];
    p.dbias_part[tile] = part[2];
  }
}

template <typename T, Mma M>
struct Launch {
  static cudaError_t run(const SiglipParams& p, cudaStream_t stream) {
    const int64_t tiles = block_tiles(p.row0, p.row1, p.col0, p.col1);
    siglip_kernel<T, M><<<static_cast<unsigned>(tiles), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  }
};

}  // namespace siglip_kernels

template <DType D>
cudaError_t siglip(const SiglipParams& p, cudaStream_t stream) {
  return tile::launch_for<typename tile::Storage<D>::T, siglip_kernels::Launch>(p, stream);
}

}  // namespace pyclipfast
