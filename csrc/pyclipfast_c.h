/* pyclipfast CUDA kernels: the C interface of libpyclipfast_cuda.so.
 *
 * Plain C: raw device pointers, sizes, strides (in elements), scalars and a
 * cudaStream_t (passed as void*), so the library depends on no torch, no Python
 * and no C++ runtime of the caller, and loads with any of them (Python uses
 * ctypes: pyclipfast/cuda/_library.py). The CUDA runtime is linked statically.
 *
 * Every launcher switches to `device` for the launch (and back), enqueues its
 * kernel on `stream` and returns 0, or a non-zero code whose message
 * pcf_last_error() returns (per thread). Arguments are NOT checked here: the
 * caller checks shapes, dtypes, lengths and devices first (pyclipfast/cuda/_kernels.py).
 *
 * Record mode (pcf_set_record_only(1), per thread) launches nothing and touches no
 * device: each launcher fills its kernel's parameter struct as usual and stores it,
 * field by field, as "name=value" lines that pcf_last_record() returns. Tests compare
 * those fields with what the caller passed, on a machine without a GPU.
 */
#ifndef PYCLIPFAST_C_H_
#define PYCLIPFAST_C_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define PCF_ABI_VERSION 3

/* The library is built with hidden symbols; these are the ones it exports. */
#if defined(__GNUC__)
#define PCF_API __attribute__((visibility("default")))
#else
#define PCF_API
#endif

/* dtype codes of the features: 0 float32, 1 float16, 2 bfloat16.
 * pos_mode: 0 the diagonal, 1 equal int64 ids (row_ids, col_ids), 2 no positives.
 * pair_rule (InfoNCE, rows only; the ids then select pairs and pos_mode is 2): 0 none, 1 a pair
 * with equal ids scores −∞, 2 (3) a pair whose ids differ (are equal) scores s·⟨A_i, B_j⟩ +
 * penalty·⟨A_i, B_j⟩, with no gradient through the penalty. */

/* The scores S = scale·A·Bᵀ: A is n_rows × dim, B is n_cols × dim, any strides. */
#define PCF_SCORE_ARGS                                                                                  \
  int dtype, const void *a, const void *b, int64_t n_rows, int64_t n_cols, int64_t dim,                 \
      int64_t stride_am, int64_t stride_ak, int64_t stride_bn, int64_t stride_bk, int tf32,             \
      const float *scale, int pos_mode, const int64_t *row_ids, const int64_t *col_ids

/* The teacher of the distillation loss: Tᵃ (n_rows × teacher_dim), Tᵇ (n_cols × teacher_dim)
 * in the features' dtype, and its scale; all NULL when no option reads the teacher. */
#define PCF_TEACHER_ARGS                                                                                \
  const void *ta, const void *tb, int64_t teacher_dim, int64_t stride_tam, int64_t stride_tak,          \
      int64_t stride_tbn, int64_t stride_tbk, const float *teacher_scale

/* Options of the distillation loss: margin m >= 0, the false-negative filter (filter != 0:
 * threshold φ), kd 0 off / 1 kl / 2 ce, and ε of the clamp c ∈ [−1+ε, 1−ε]. */
#define PCF_DISTILL_OPTION_ARGS float margin, int filter, float threshold, int kd, float angle_eps

PCF_API int pcf_abi_version(void);
PCF_API int pcf_block_m(void); /* rows of one tile of S */
PCF_API int pcf_block_n(void); /* columns of one tile of S */
PCF_API const char *pcf_last_error(void);
PCF_API void pcf_set_record_only(int on);
PCF_API const char *pcf_last_record(void);

/* InfoNCE forward sweep on a row_groups × col_groups grid: per-group (max, sum-exp, positive
 * sum) of rows ([col_groups, n_rows] each) and columns ([row_groups, n_cols]; NULL: rows only).
 * With a pair_rule: rows only, and row_pos holds 0 (or NaN for a non-finite score).
 * row_dot, col_dot: the per-group Σ exp(S − max)·S beside each sum-exp (NULL: not computed;
 * col_dot NULL when rows only; both NULL with a pair_rule). */
PCF_API int pcf_clip_forward(int device, void *stream, PCF_SCORE_ARGS, float *row_max, float *row_sum,
                     float *row_pos, float *col_max, float *col_sum, float *col_pos, int row_groups,
                     int col_groups, int row_blocks_per_group, int col_blocks_per_group, int pair_rule,
                     float penalty, float *row_dot, float *col_dot);

/* InfoNCE gradient tiles G·inv_norm of the block [row0, row1) × [col0, col1) of S into g_out
 * (features' dtype, strides stride_gm/stride_gn; NULL: not stored) and one dscale partial per
 * tile. The six vectors may each be NULL; with a pair_rule only row_lse and g_row are read. */
PCF_API int pcf_clip_grad(int device, void *stream, PCF_SCORE_ARGS, const float *row_lse, const float *col_lse,
                  const float *g_row, const float *g_col, const float *g_row_pos, const float *g_col_pos,
                  const float *inv_norm, void *g_out, int64_t stride_gm, int64_t stride_gn,
                  float *dscale_part, int64_t row0, int64_t row1, int64_t col0, int64_t col1, int pair_rule,
                  float penalty);

/* SigLIP loss / dscale / dbias partials (one per tile) and the gradient tile G of one block;
 * bias NULL: no bias. */
PCF_API int pcf_siglip(int device, void *stream, PCF_SCORE_ARGS, const float *bias, void *g_out,
               int64_t stride_gm, int64_t stride_gn, float *loss_part, float *dscale_part,
               float *dbias_part, int64_t row0, int64_t row1, int64_t col0, int64_t col1);

/* Distillation forward sweep: per-group statistics [stats, col_groups, n_rows] and
 * [stats, row_groups, n_cols] (stats = 3, or 8 with kd). */
PCF_API int pcf_distill_forward(int device, void *stream, PCF_SCORE_ARGS, PCF_TEACHER_ARGS, PCF_DISTILL_OPTION_ARGS,
                        float *row_part, float *col_part, int row_groups, int col_groups,
                        int row_blocks_per_group, int col_blocks_per_group);

/* Distillation gradient tiles H·inv_norm of one block and their dscale partials;
 * row_vec [vectors, n_rows], col_vec [vectors, n_cols] (vectors = 3, or 7 with kd). */
PCF_API int pcf_distill_grad(int device, void *stream, PCF_SCORE_ARGS, PCF_TEACHER_ARGS, PCF_DISTILL_OPTION_ARGS,
                     const float *row_vec, const float *col_vec, const float *inv_norm, void *g_out,
                     int64_t stride_gm, int64_t stride_gn, float *dscale_part, int64_t row0, int64_t row1,
                     int64_t col0, int64_t col1);

/* Cosine loss rows: cos (n_rows floats) and the gradients of grad_scale·Σ cos_i into the
 * contiguous d_online / d_target (NULL: not wanted); norms clamped to at least eps. */
PCF_API int pcf_cosine(int device, void *stream, int dtype, const void *online, const void *target, int64_t n_rows,
               int64_t dim, int64_t stride_pm, int64_t stride_pk, int64_t stride_zm, int64_t stride_zk,
               float *cos, void *d_online, void *d_target, float grad_scale, float eps);

#ifdef __cplusplus
}
#endif

#endif /* PYCLIPFAST_C_H_ */
