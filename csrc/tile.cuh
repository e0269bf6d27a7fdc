// Shared tile machinery: one kBlockM × kBlockN tile of ⟨A_i, B_j⟩ in shared memory.
//
//     acc_ij = ⟨A_i, B_j⟩   (fp32 accumulation; rows/columns past the end read as zeros)
//
// Every fused loss kernel is "score tile + an epilogue": `score_tile` leaves the
// unscaled fp32 tile in shared memory (TileSmem::s, or another ScoreTile), visible
// to the whole block, and the loss's kernel adds only what it does with it. Three ways to multiply, chosen at compile
// time: WMMA tensor cores for fp16/bf16 (m16n16k16, fp32 accumulate), TF32 WMMA
// for fp32 when torch.backends.cuda.matmul.allow_tf32 is set (m16n16k8), and IEEE
// fp32 FMA otherwise. D need not be a multiple of anything: the K tail is zero-padded
// in shared memory. Offsets into A and B are 64-bit (N·D may exceed 2^31), and rows
// are fetched with 16-byte vector loads when the strides and the base allow.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include "pyclipfast.h"

namespace pyclipfast {
namespace tile {

constexpr int kThreads = 128;               // 4 warps per block
constexpr int kWarps = kThreads / 32;
constexpr int BM = kBlockM;                 // tile rows
constexpr int BN = kBlockN;                 // tile columns
constexpr int BK = 32;                      // depth of one shared-memory stage
constexpr float kNegInf = -INFINITY;

__device__ __forceinline__ int64_t ceil_div(int64_t x, int64_t y) { return (x + y - 1) / y; }
__device__ __forceinline__ int64_t min64(int64_t x, int64_t y) { return x < y ? x : y; }

enum class Mma { kFma, kTf32, kWmma16 };

// ---------------------------------------------------------------- element types

template <DType D> struct Storage;
template <> struct Storage<DType::kFloat32> { using T = float; };
template <> struct Storage<DType::kFloat16> { using T = __half; };
template <> struct Storage<DType::kBFloat16> { using T = __nv_bfloat16; };

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Elements per 16-byte vector, and the shared-memory row padding (one vector:
// keeps rows 16-byte aligned, WMMA's ldm legal and the FMA reads conflict-free).
template <typename T> constexpr int kVec = 16 / sizeof(T);

constexpr int kLds = BN + 4;  // leading dimension of a score tile (WMMA: a multiple of 4 floats)
using ScoreTile = float[BM][kLds];
using ScoreRows = float (*)[kLds];

template <typename T>
struct TileSmem {
  static constexpr int kLd = BK + kVec<T>;   // leading dimension of a and b
  alignas(128) T a[BM][kLd];                 // A rows of this tile, BK deep
  alignas(128) T b[BN][kLd];                 // B rows of this tile, BK deep
  alignas(128) ScoreTile s;                  // the score tile acc_ij
};

// ---------------------------------------------------------------- operands

// Rows of a (rows × dim) matrix in global memory.
template <typename T>
struct Operand {
  const T* ptr;
  int64_t stride_row, stride_k;
  bool vec_ok;  // 16-byte vector loads are legal: unit k stride, aligned base and rows
};

template <typename T>
__device__ __forceinline__ Operand<T> make_operand(const void* ptr, int64_t stride_row, int64_t stride_k) {
  const bool aligned = reinterpret_cast<uintptr_t>(ptr) % 16 == 0 &&
                       (stride_row * static_cast<int64_t>(sizeof(T))) % 16 == 0;
  return {static_cast<const T*>(ptr), stride_row, stride_k, aligned && stride_k == 1};
}

// dst[r][kk] = X[row0 + r][k0 + kk] for r < ROWS, kk < BK; zeros past row_end or dim.
template <typename T, int ROWS>
__device__ __forceinline__ void load_rows(T (*dst)[TileSmem<T>::kLd], const Operand<T>& x, int64_t row0,
                                          int64_t row_end, int64_t k0, int64_t dim) {
  constexpr int V = kVec<T>;
  constexpr int kVecsPerRow = BK / V;
  for (int v = threadIdx.x; v < ROWS * kVecsPerRow; v += kThreads) {
    const int r = v / kVecsPerRow;
    const int kk = (v % kVecsPerRow) * V;
    const int64_t row = row0 + r;
    const int64_t k = k0 + kk;
    T* out = &dst[r][kk];
    if (row < row_end && x.vec_ok && k + V <= dim) {
      *reinterpret_cast<uint4*>(out) = __ldg(reinterpret_cast<const uint4*>(x.ptr + row * x.stride_row + k));
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e) {
        out[e] = (row < row_end && k + e < dim) ? x.ptr[row * x.stride_row + (k + e) * x.stride_k]
                                                : from_float<T>(0.0f);
      }
    }
  }
}

// ---------------------------------------------------------------- products

// IEEE fp32: each thread owns a 4 × 8 micro-tile, rows ty + 16·i, columns tx + 8·j.
struct FmaTile {
  static constexpr int kTy = kThreads / 8, kRows = BM / kTy, kCols = BN / 8;
  float acc[kRows][kCols];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < kRows; ++i)
#pragma unroll
      for (int j = 0; j < kCols; ++j) acc[i][j] = 0.0f;
  }

  __device__ __forceinline__ void step(const TileSmem<float>& sm) {
    const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;
#pragma unroll 8
    for (int kk = 0; kk < BK; ++kk) {
      float av[kRows], bv[kCols];
#pragma unroll
      for (int i = 0; i < kRows; ++i) av[i] = sm.a[ty + kTy * i][kk];
#pragma unroll
      for (int j = 0; j < kCols; ++j) bv[j] = sm.b[tx + 8 * j][kk];
#pragma unroll
      for (int i = 0; i < kRows; ++i)
#pragma unroll
        for (int j = 0; j < kCols; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
  }

  __device__ __forceinline__ void store(ScoreRows out) const {
    const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;
#pragma unroll
    for (int i = 0; i < kRows; ++i)
#pragma unroll
      for (int j = 0; j < kCols; ++j) out[ty + kTy * i][tx + 8 * j] = acc[i][j];
  }
};

// Tensor cores: the 4 warps form a 2 × 2 grid, each warp a 32 × 32 sub-tile of
// 2 × 2 fragments. T = __half / __nv_bfloat16 (K = 16) or float as TF32 (K = 8).
template <typename T>
struct WmmaTile {
  static constexpr bool kTf32 = std::is_same<T, float>::value;
  static constexpr int K = kTf32 ? 8 : 16;
  using In = typename std::conditional<kTf32, nvcuda::wmma::precision::tf32, T>::type;
  using FragA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, K, In, nvcuda::wmma::row_major>;
  using FragB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, K, In, nvcuda::wmma::col_major>;
  using FragC = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, K, float>;
  static constexpr int kWarpRows = BM / 2, kWarpCols = BN / 2;
  static constexpr int kFm = kWarpRows / 16, kFn = kWarpCols / 16;
  FragC acc[kFm][kFn];

  __device__ __forceinline__ int warp_row() const { return (threadIdx.x / 32) / 2 * kWarpRows; }
  __device__ __forceinline__ int warp_col() const { return (threadIdx.x / 32) % 2 * kWarpCols; }

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < kFm; ++i)
#pragma unroll
      for (int j = 0; j < kFn; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.0f);
  }

  template <typename Frag>
  __device__ __forceinline__ static void round_tf32(Frag& f) {
    if constexpr (kTf32) {
#pragma unroll
      for (int t = 0; t < f.num_elements; ++t) f.x[t] = nvcuda::wmma::__float_to_tf32(f.x[t]);
    }
  }

  __device__ __forceinline__ void step(const TileSmem<T>& sm) {
    constexpr int ld = TileSmem<T>::kLd;
#pragma unroll
    for (int kk = 0; kk < BK; kk += K) {
      FragA fa[kFm];
      FragB fb[kFn];
#pragma unroll
      for (int i = 0; i < kFm; ++i) {
        nvcuda::wmma::load_matrix_sync(fa[i], &sm.a[warp_row() + 16 * i][kk], ld);
        round_tf32(fa[i]);
      }
#pragma unroll
      for (int j = 0; j < kFn; ++j) {
        // B^T (K × N) column-major is B's rows: element (k, n) at b[n][k].
        nvcuda::wmma::load_matrix_sync(fb[j], &sm.b[warp_col() + 16 * j][kk], ld);
        round_tf32(fb[j]);
      }
#pragma unroll
      for (int i = 0; i < kFm; ++i)
#pragma unroll
        for (int j = 0; j < kFn; ++j) nvcuda::wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }

  __device__ __forceinline__ void store(ScoreRows out) const {
#pragma unroll
    for (int i = 0; i < kFm; ++i)
#pragma unroll
      for (int j = 0; j < kFn; ++j)
        nvcuda::wmma::store_matrix_sync(&out[warp_row() + 16 * i][warp_col() + 16 * j], acc[i][j], kLds,
                                        nvcuda::wmma::mem_row_major);
  }
};

template <typename T, Mma M>
using TileMma = typename std::conditional<M == Mma::kFma, FmaTile, WmmaTile<T>>::type;

// out[r][c] = ⟨A[row0 + r], B[col0 + c]⟩ for the whole block (rows ≥ row_end or
// columns ≥ col_end give 0); sm.a and sm.b are the staging buffers. Starts and ends
// with a barrier, so the caller's previous epilogue may still be reading `out` when
// it is called, and the new tile is visible to every thread when it returns.
template <typename T, Mma M>
__device__ __forceinline__ void score_tile(TileSmem<T>& sm, ScoreRows out, const Operand<T>& a, const Operand<T>& b,
                                           int64_t row0, int64_t row_end, int64_t col0, int64_t col_end,
                                           int64_t dim) {
  static_assert(M != Mma::kFma || std::is_same<T, float>::value, "the FMA path is for float32");
  static_assert(M == Mma::kWmma16 ? !std::is_same<T, float>::value : std::is_same<T, float>::value,
                "16-bit WMMA for fp16/bf16, FMA or TF32 for float32");
  TileMma<T, M> mma;
  mma.zero();
  for (int64_t k0 = 0; k0 < dim; k0 += BK) {
    __syncthreads();  // the previous stage (and the previous epilogue) is done with sm
    load_rows<T, BM>(sm.a, a, row0, row_end, k0, dim);
    load_rows<T, BN>(sm.b, b, col0, col_end, k0, dim);
    __syncthreads();
    mma.step(sm);
  }
  mma.store(out);
  __syncthreads();
}

// ---------------------------------------------------------------- epilogue helpers

struct Positives {
  PosMode mode;
  const int64_t* row_ids;
  const int64_t* col_ids;

  // Keys are compared for equality: the index itself on the diagonal, the id otherwise.
  // Call only with in-range indices.
  __device__ __forceinline__ int64_t row_key(int64_t i) const {
    return mode == PosMode::kIds ? __ldg(row_ids + i) : i;
  }
  __device__ __forceinline__ int64_t col_key(int64_t j) const {
    return mode == PosMode::kIds ? __ldg(col_ids + j) : j;
  }
  __device__ __forceinline__ bool match(int64_t row_key, int64_t col_key) const {
    return mode != PosMode::kNone && row_key == col_key;
  }
  __device__ __forceinline__ bool operator()(int64_t i, int64_t j) const {
    return mode != PosMode::kNone && row_key(i) == col_key(j);
  }
};

__device__ __forceinline__ Positives positives(const ScoreParams& s) {
  return {s.pos_mode, s.row_ids, s.col_ids};
}

// A pair rule on the ids (PairRule in pyclipfast.h). Call only with in-range indices.
struct PairRules {
  PairRule rule;
  float penalty;
  const int64_t* row_ids;
  const int64_t* col_ids;

  __device__ __forceinline__ int64_t row_id(int64_t i) const { return __ldg(row_ids + i); }
  __device__ __forceinline__ int64_t col_id(int64_t j) const { return __ldg(col_ids + j); }
  // The score s = scale·dot of pair (row_id, col_id) under the rule.
  __device__ __forceinline__ float operator()(float s, float dot, int64_t row_id, int64_t col_id) const {
    const bool selected = (row_id == col_id) != (rule == PairRule::kPenaliseUnequal);
    if (rule == PairRule::kNone || !selected) return s;
    return rule == PairRule::kExcludeEqual ? kNegInf : s + penalty * dot;
  }
};

template <typename Params>
__device__ __forceinline__ PairRules pair_rules(const Params& p) {
  return {p.pair_rule, p.penalty, p.s.row_ids, p.s.col_ids};
}

// x where finite, 0 where x = −inf: a safe shift for exp(v − shift) when every v is −inf.
__device__ __forceinline__ float finite_or_zero(float x) { return x == kNegInf ? 0.0f : x; }

// log(1 + e^z) without overflow.
__device__ __forceinline__ float softplus(float z) { return fmaxf(z, 0.0f) + log1pf(expf(-fabsf(z))); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sums each of K per-thread values over the block, in a fixed order (deterministic).
// The totals are valid in thread 0 only. scratch: K × kWarps floats of shared memory.
template <int K>
__device__ __forceinline__ void block_sum(float (&v)[K], float (*scratch)[kWarps]) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int q = 0; q < K; ++q) {
    v[q] = warp_sum(v[q]);
    if (lane == 0) scratch[q][warp] = v[q];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int q = 0; q < K; ++q) {
      v[q] = 0.0f;
      for (int w = 0; w < kWarps; ++w) v[q] += scratch[q][w];
    }
  }
}

// The Mma to use for storage type T (fp32: FMA, or TF32 when asked).
template <typename T, template <typename, Mma> class Launch, typename Params>
cudaError_t launch_for(const Params& p, cudaStream_t stream) {
  if constexpr (std::is_same<T, float>::value) {
    return p.s.tf32 ? Launch<float, Mma::kTf32>::run(p, stream) : Launch<float, Mma::kFma>::run(p, stream);
  } else {
    return Launch<T, Mma::kWmma16>::run(p, stream);
  }
}

}  // namespace tile
}  // namespace pyclipfast
