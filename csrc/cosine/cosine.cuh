// Non-contrastive cosine loss rows (math in pyclipfast/cosine.py), loss and gradients in one pass:
//
//     n_p = max(‖p‖, ε),  n_z = max(‖z‖, ε),  cos = ⟨p, z⟩ / (n_p n_z)
//     d cos/dp = z / (n_p n_z) − cos·p / (n_p‖p‖)      (second term 0 where p = 0)
//     d cos/dz = p / (n_p n_z) − cos·z / (n_z‖z‖)
//
// written for grad_scale·Σ_i cos_i (the scheme of triton/cosine.py). A group of G
// lanes owns a row. Rows of up to G·kVecs 16-byte vectors stay in registers: p and
// z are read once and the gradients written from the registers, the memory-bound
// minimum (one read of each input, one write of each gradient). Wider rows take two
// sweeps over D, the second re-reading p and z.
#pragma once

#include "tile.cuh"

namespace pyclipfast {
namespace cosine_kernels {

using tile::from_float;
using tile::kVec;
using tile::to_float;

constexpr int kThreads = 256;

// V = 16 / sizeof(T) consecutive elements of a row: one 16-byte vector.
template <typename T>
struct alignas(16) Pack {
  T x[kVec<T>];
};

template <typename T>
struct Rows {
  const T* ptr;
  int64_t stride_row, stride_k;
  bool vec_ok;  // unit k stride, 16-byte aligned base and rows
};

template <typename T>
__device__ __forceinline__ Rows<T> make_rows(const void* ptr, int64_t stride_row, int64_t stride_k) {
  const bool aligned = reinterpret_cast<uintptr_t>(ptr) % 16 == 0 &&
                       (stride_row * static_cast<int64_t>(sizeof(T))) % 16 == 0;
  return {static_cast<const T*>(ptr), stride_row, stride_k, aligned && stride_k == 1};
}

template <typename T>
__device__ __forceinline__ Pack<T> zero_pack() {
  Pack<T> out;
#pragma unroll
  for (int e = 0; e < kVec<T>; ++e) out.x[e] = from_float<T>(0.0f);
  return out;
}

// Elements [k, k + V) of a row, zeros past dim.
template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const Rows<T>& m, int64_t row, int64_t k, int64_t dim) {
  constexpr int V = kVec<T>;
  if (m.vec_ok && k + V <= dim) {
    Pack<T> out;
    *reinterpret_cast<uint4*>(out.x) = __ldg(reinterpret_cast<const uint4*>(m.ptr + row * m.stride_row + k));
    return out;
  }
  Pack<T> out;
#pragma unroll
  for (int e = 0; e < V; ++e) {
    out.x[e] = k + e < dim ? m.ptr[row * m.stride_row + (k + e) * m.stride_k] : from_float<T>(0.0f);
  }
  return out;
}

// out[k, k + V) of a contiguous row ← v (only the elements before dim).
template <typename T>
__device__ __forceinline__ void store_pack(T* row_ptr, int64_t k, int64_t dim, bool vec_ok,
                                           const float (&v)[kVec<T>]) {
  constexpr int V = kVec<T>;
  Pack<T> out;
#pragma unroll
  for (int e = 0; e < V; ++e) out.x[e] = from_float<T>(v[e]);
  if (vec_ok && k + V <= dim) {
    *reinterpret_cast<uint4*>(row_ptr + k) = *reinterpret_cast<const uint4*>(out.x);
    return;
  }
#pragma unroll
  for (int e = 0; e < V; ++e) {
    if (k + e < dim) row_ptr[k + e] = out.x[e];
  }
}

struct Sums {
  float pp = 0.0f, zz = 0.0f, pz = 0.0f;  // ‖p‖², ‖z‖², ⟨p, z⟩
};

template <typename T>
__device__ __forceinline__ void accumulate(Sums& s, const Pack<T>& p, const Pack<T>& z) {
#pragma unroll
  for (int e = 0; e < kVec<T>; ++e) {
    const float pe = to_float(p.x[e]), ze = to_float(z.x[e]);
    s.pp = fmaf(pe, pe, s.pp);
    s.zz = fmaf(ze, ze, s.zz);
    s.pz = fmaf(pe, ze, s.pz);
  }
}

// Sum over the G lanes of a row's group (every lane of the warp must call it).
template <int G>
__device__ __forceinline__ void group_sum(Sums& s) {
#pragma unroll
  for (int o = G / 2; o > 0; o /= 2) {
    s.pp += __shfl_xor_sync(0xffffffffu, s.pp, o);
    s.zz += __shfl_xor_sync(0xffffffffu, s.zz, o);
    s.pz += __shfl_xor_sync(0xffffffffu, s.pz, o);
  }
}

// dp = cross·z − p_own·p,  dz = cross·p − z_own·z  (grad_scale folded into the coefficients).
struct Coefficients {
  float cos, cross, p_own, z_own;
};

__device__ __forceinline__ Coefficients coefficients(const Sums& s, float grad_scale, float eps) {
  const float p_norm = sqrtf(s.pp), z_norm = sqrtf(s.zz);
  const float n_p = fmaxf(p_norm, eps), n_z = fmaxf(z_norm, eps);
  const float cos = s.pz / (n_p * n_z);
  // p = 0 has cos = 0 and no second term (the nonzero stand-in for its norm keeps 0/0 out)
  return {cos, grad_scale / (n_p * n_z), grad_scale * cos / (n_p * (p_norm > 0.0f ? p_norm : 1.0f)),
          grad_scale * cos / (n_z * (z_norm > 0.0f ? z_norm : 1.0f))};
}

struct Outputs {
  void* d_online;
  void* d_target;
  bool vec_ok;  // 16-byte stores: aligned bases and rows
};

template <typename T>
__device__ __forceinline__ void store_grads(const Outputs& out, const Coefficients& c, int64_t row, int64_t k,
                                            int64_t dim, const Pack<T>& p, const Pack<T>& z) {
  constexpr int V = kVec<T>;
  float v[V];
  if (out.d_online != nullptr) {
#pragma unroll
    for (int e = 0; e < V; ++e) v[e] = c.cross * to_float(z.x[e]) - c.p_own * to_float(p.x[e]);
    store_pack<T>(static_cast<T*>(out.d_online) + row * dim, k, dim, out.vec_ok, v);
  }
  if (out.d_target != nullptr) {
#pragma unroll
    for (int e = 0; e < V; ++e) v[e] = c.cross * to_float(p.x[e]) - c.z_own * to_float(z.x[e]);
    store_pack<T>(static_cast<T*>(out.d_target) + row * dim, k, dim, out.vec_ok, v);
  }
}

// Two blocks per SM (a 128-register cap), except for 64 16-bit elements per lane and tensor,
// which would spill under the cap: their 16 loads in flight per thread hide the latency anyway.
template <typename T, int kVecs>
constexpr int kMinBlocks = kVecs * kVec<T> >= 64 ? 1 : 2;

// G lanes per row; kVecs > 0: the row in registers (kVecs vectors per lane), 0: two sweeps.
template <typename T, int G, int kVecs>
__global__ void __launch_bounds__(kThreads, (kMinBlocks<T, kVecs>)) cosine_kernel(const CosineParams p) {
  constexpr int V = kVec<T>;
  const int lane = threadIdx.x % G;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / G) + threadIdx.x / G;
  const bool row_ok = row < p.n_rows;  // lanes past the end still join the shuffles
  const Rows<T> P = make_rows<T>(p.online, p.stride_pm, p.stride_pk);
  const Rows<T> Z = make_rows<T>(p.target, p.stride_zm, p.stride_zk);
  const bool out_aligned = (p.dim * static_cast<int64_t>(sizeof(T))) % 16 == 0 &&
                           reinterpret_cast<uintptr_t>(p.d_online) % 16 == 0 &&
                           reinterpret_cast<uintptr_t>(p.d_target) % 16 == 0;
  const Outputs out{p.d_online, p.d_target, out_aligned};
  Sums s;
  if constexpr (kVecs > 0) {
    Pack<T> pv[kVecs], zv[kVecs];
#pragma unroll
    for (int t = 0; t < kVecs; ++t) {
      const int64_t k = static_cast<int64_t>(lane + G * t) * V;
      const bool ok = row_ok && k < p.dim;
      pv[t] = ok ? load_pack(P, row, k, p.dim) : zero_pack<T>();
      zv[t] = ok ? load_pack(Z, row, k, p.dim) : zero_pack<T>();
      accumulate(s, pv[t], zv[t]);
    }
    group_sum<G>(s);
    const Coefficients c = coefficients(s, p.grad_scale, p.eps);
    if (!row_ok) return;
    if (lane == 0) p.cos[row] = c.cos;
#pragma unroll
    for (int t = 0; t < kVecs; ++t) {
      const int64_t k = static_cast<int64_t>(lane + G * t) * V;
      if (k < p.dim) store_grads(out, c, row, k, p.dim, pv[t], zv[t]);
    }
  } else {
    for (int64_t k = static_cast<int64_t>(lane) * V; row_ok && k < p.dim; k += G * V) {
      accumulate(s, load_pack(P, row, k, p.dim), load_pack(Z, row, k, p.dim));
    }
    group_sum<G>(s);
    const Coefficients c = coefficients(s, p.grad_scale, p.eps);
    if (!row_ok) return;
    if (lane == 0) p.cos[row] = c.cos;
    if (out.d_online == nullptr && out.d_target == nullptr) return;
    for (int64_t k = static_cast<int64_t>(lane) * V; k < p.dim; k += G * V) {
      store_grads(out, c, row, k, p.dim, load_pack(P, row, k, p.dim), load_pack(Z, row, k, p.dim));
    }
  }
}

template <typename T, int G, int kVecs>
cudaError_t run(const CosineParams& p, cudaStream_t stream) {
  constexpr int kRowsPerBlock = kThreads / G;
  const int64_t blocks = (p.n_rows + kRowsPerBlock - 1) / kRowsPerBlock;
  cosine_kernel<T, G, kVecs><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// The narrowest lane group that covers a row, and the fewest vectors per lane.
template <typename T>
cudaError_t launch(const CosineParams& p, cudaStream_t stream) {
  const int64_t packs = (p.dim + kVec<T> - 1) / kVec<T>;
  if (packs <= 8) return run<T, 8, 1>(p, stream);
  if (packs <= 16) return run<T, 16, 1>(p, stream);
  if (packs <= 32) return run<T, 32, 1>(p, stream);
  if (packs <= 64) return run<T, 32, 2>(p, stream);
  if (packs <= 128) return run<T, 32, 4>(p, stream);
  if (packs <= 256) return run<T, 32, 8>(p, stream);
  return run<T, 32, 0>(p, stream);
}

}  // namespace cosine_kernels

template <DType D>
cudaError_t cosine(const CosineParams& p, cudaStream_t stream) {
  return cosine_kernels::launch<typename tile::Storage<D>::T>(p, stream);
}

}  // namespace pyclipfast
