// Distillation gradient tiles (derivation in pyclipfast/distill.py), for upstream
// gradients g of the forward's statistics (P the row/column softmax of Z, q of U, p of V):
//
//     ∂/∂Z_ij = g_row_lse_i·Pʳ_ij + g_col_lse_j·Pᶜ_ij + pos_ij·(g_row_pos_i + g_col_pos_j)
//     ∂/∂U_ij = g_student_row_lse_i·qʳ_ij + g_student_col_lse_j·qᶜ_ij + g_row_cross_i·pʳ_ij + g_col_cross_j·pᶜ_ij
//     H_ij    = ∂/∂Z_ij·ψ'_ij + ∂/∂U_ij,   dA = s·H·B,  dB = s·Hᵀ·A,  dscale = Σ_ij (∂/∂Z_ij·ψ_ij + ∂/∂U_ij·c_ij)
//
// One program per tile of the block [row0, row1) × [col0, col1) (the scheme of
// triton/distill.py `_distill_grad_kernel`): recompute c and α, write H·inv_norm in the
// input dtype and the tile's dscale partial; the host runs dA and dB as GEMMs.
#pragma once

#include "distill/distill_tile.cuh"

namespace pyclipfast {
namespace distill_grad_kernels {

using namespace tile;
using namespace distill_kernels;

template <typename T>
struct Smem {
  TileSmem<T> tile;              // staging; tile.s holds c
  alignas(128) ScoreTile alpha;  // α
  float scratch[1][kWarps];
};

// g_row_i·exp(x − row_lse_i) + g_col_j·exp(x − col_lse_j), from the packed vectors LSE_AT and G_AT.
__device__ __forceinline__ float softmax_grad(const DistillGradParams& p, int lse_at, int g_at, int64_t i, int64_t j,
                                              float x) {
  const int64_t n = p.s.n_rows, m = p.s.n_cols;
  return __ldg(p.row_vec + g_at * n + i) * expf(x - __ldg(p.row_vec + lse_at * n + i)) +
         __ldg(p.col_vec + g_at * m + j) * expf(x - __ldg(p.col_vec + lse_at * m + j));
}

struct Entry {
  float h;   // H_ij
  float ds;  // its dscale term
};

__device__ __forceinline__ Entry grad_entry(const DistillGradParams& p, const Positives& pos, int64_t i, int64_t j,
                                            float c, float alpha, float scale, float teacher_scale) {
  const bool positive = pos(i, j);
  const MarginLogit z = margin_logit(p.o, c, alpha, positive, scale);
  float g_z = softmax_grad(p, kLse, kGLse, i, j, z.z);
  if (positive) g_z += __ldg(p.row_vec + kGPos * p.s.n_rows + i) + __ldg(p.col_vec + kGPos * p.s.n_cols + j);
  Entry e{g_z * z.slope, g_z * z.psi};
  if (p.o.kd != Kd::kOff) {
    const float g_u = softmax_grad(p, kStudentLse, kGStudentLse, i, j, c * scale) +
                      softmax_grad(p, kTeacherLse, kGCross, i, j, alpha * teacher_scale);
    e.h += g_u;
    e.ds += g_u * c;
  }
  return e;
}

template <typename T, Mma M>
__global__ void __launch_bounds__(kThreads) distill_grad_kernel(const DistillGradParams p) {
  extern __shared__ __align__(128) unsigned char smem[];
  Smem<T>& sm = *reinterpret_cast<Smem<T>*>(smem);
  const ScoreParams& s = p.s;
  const int64_t tile = blockIdx.x;
  const int64_t col_tiles = ceil_div(p.col1 - p.col0, BN);
  const int64_t row0 = p.row0 + tile / col_tiles * BM;
  const int64_t col0 = p.col0 + tile % col_tiles * BN;
  const Operand<T> a = make_operand<T>(s.a, s.stride_am, s.stride_ak);
  const Operand<T> b = make_operand<T>(s.b, s.stride_bn, s.stride_bk);
  score_tile<T, M>(sm.tile, sm.tile.s, a, b, row0, p.row1, col0, p.col1, s.dim);
  const bool teacher = p.t.ta != nullptr;
  if (teacher) {
    const Operand<T> ta = make_operand<T>(p.t.ta, p.t.stride_am, p.t.stride_ak);
    const Operand<T> tb = make_operand<T>(p.t.tb, p.t.stride_bn, p.t.stride_bk);
    score_tile<T, M>(sm.tile, sm.alpha, ta, tb, row0, p.row1, col0, p.col1, p.t.dim);
  }
  const Positives pos = positives(s);
  const float scale = __ldg(s.scale);
  const float teacher_scale = teacher ? __ldg(p.t.scale) : 0.0f;
  T* g_out = static_cast<T*>(p.g_out);
  const float inv_norm = g_out != nullptr ? __ldg(p.inv_norm) : 0.0f;
  float dscale[1] = {0.0f};
  for (int e = threadIdx.x; e < BM * BN; e += kThreads) {
    const int r = e / BN, c = e % BN;
    const int64_t i = row0 + r, j = col0 + c;
    if (i >= p.row1 || j >= p.col1) continue;
    const float cs = sm.tile.s[r][c];
    const Entry h = grad_entry(p, pos, i, j, cs, teacher ? sm.alpha[r][c] : cs, scale, teacher_scale);
    dscale[0] += h.ds;
    if (g_out != nullptr) g_out[(i - p.row0) * p.stride_gm + (j - p.col0) * p.stride_gn] = from_float<T>(h.h * inv_norm);
  }
  block_sum<1>(dscale, sm.scratch);
  if (threadIdx.x == 0) p.dscale_part[tile] = dscale[0];
}

template <typename T, Mma M>
struct Launch {
  static cudaError_t run(const DistillGradParams& p, cudaStream_t stream) {
    const int64_t tiles = block_tiles(p.row0, p.row1, p.col0, p.col1);
    return launch_with_smem<Smem<T>>(distill_grad_kernel<T, M>, dim3(static_cast<unsigned>(tiles)), p, stream);
  }
};

}  // namespace distill_grad_kernels

template <DType D>
cudaError_t distill_grad(const DistillGradParams& p, cudaStream_t stream) {
  return tile::launch_for<typename tile::Storage<D>::T, distill_grad_kernels::Launch>(p, stream);
}

}  // namespace pyclipfast
