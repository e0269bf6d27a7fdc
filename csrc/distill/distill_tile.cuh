// Distillation tiles (math in pyclipfast/distill.py): the student tile c = A·Bᵀ, the teacher tile α = Tᵃ·Tᵇᵀ and
// the InfoNCE logits with the adaptive angular margin (derivation in pyclipfast/distill.py):
//
//     μ = m·(1 − α),   θ > μ  ⇔  μ < 0, or μ < π and c < cos μ          (c clamped to [−1+ε, 1−ε])
//     ψ  = c·cos μ + sin θ·sin μ   where θ > μ, else 1
//     ψ' = cos μ − c·sin μ / sin θ  where θ > μ and c lies inside the clamp, else 0
//     ψ = c, ψ' = 1 on positives;   Z = s·ψ, −∞ on negatives with α > φ;   U = s·c,  V = t·α
#pragma once

#include "tile.cuh"

namespace pyclipfast {
namespace distill_kernels {

using namespace tile;

constexpr float kPi = 3.14159265358979323846f;
constexpr float kInvPi = 0.318309886183790671538f;

struct MarginLogit {
  float z;      // Z_ij
  float psi;    // ψ_ij
  float slope;  // ψ'_ij = dψ/dc
};

__device__ __forceinline__ MarginLogit margin_logit(const DistillOptions& o, float c, float alpha, bool positive,
                                                    float scale) {
  float psi = c, slope = 1.0f;
  if (o.margin > 0.0f && !positive) {
    const float cc = fminf(fmaxf(c, -1.0f + o.angle_eps), 1.0f - o.angle_eps);
    const float sin_theta = sqrtf((1.0f - cc) * (1.0f + cc));
    const float mu = o.margin * (1.0f - alpha);
    // Not sincosf: --use_fast_math turns it into __sincosf, whose ~4e-7 absolute error in sin μ
    // the 1/sin θ of ψ' amplifies ~700-fold for near-duplicates (|c| ≈ 1). sincospif keeps its
    // accuracy under fast math (a few ulp, relative), and μ/π costs one more rounding.
    float sin_mu, cos_mu;
    sincospif(mu * kInvPi, &sin_mu, &cos_mu);
    const bool active = mu < 0.0f || (mu < kPi && cc < cos_mu);
    psi = active ? cc * cos_mu + sin_theta * sin_mu : 1.0f;
    slope = active && c == cc ? cos_mu - cc * sin_mu / sin_theta : 0.0f;
    // The clamp and the comparisons would turn a non-finite score into a finite ψ: keep it non-finite.
    if (!isfinite(c) || !isfinite(alpha)) psi = c + alpha + NAN;
  }
  float z = psi * scale;
  if (o.filter && !positive && alpha > o.threshold) z = kNegInf;
  // A non-finite score or teacher score can leave no trace in Z (clamped into ψ, filtered, or a
  // −∞ dropped by the log-sum-exp): make Z NaN.
  if (!isfinite(c) || !isfinite(alpha)) z = c + alpha + NAN;
  return {z, psi, slope};
}

// Launch a kernel whose shared memory (sizeof(Smem), over 48 KB in fp32) is dynamic.
template <typename Smem, typename Params>
cudaError_t launch_with_smem(void (*kernel)(Params), dim3 grid, const Params& p, cudaStream_t stream) {
  const int bytes = static_cast<int>(sizeof(Smem));
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err != cudaSuccess) return err;
  kernel<<<grid, kThreads, bytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace distill_kernels
}  // namespace pyclipfast
