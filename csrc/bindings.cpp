// pyclipfast._C: the Python surface of the CUDA kernels.
//
// The only file that includes torch, and only the headers it needs (torch/extension.h
// alone is four times the compile time). Each function checks its arguments before
// any launch (metadata only, no device sync; shapes and dtypes first, devices last,
// so every check can be exercised without a GPU), fills the plain parameter
// structs of pyclipfast.h and calls the launcher on the current stream.
// Output buffers are allocated by the Python launchers (pyclipfast/cuda/*.py).
#include <cmath>
#include <initializer_list>
#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>  // the at::Tensor <-> torch.Tensor caster

#include "pyclipfast.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using pyclipfast::DType;
using pyclipfast::PosMode;

DType feature_dtype(const Tensor& t, const char* name) {
  const auto type = t.scalar_type();
  TORCH_CHECK_TYPE(type == at::kFloat || type == at::kHalf || type == at::kBFloat16, name,
                   " must be float32, float16 or bfloat16, got ", type);
  return type == at::kFloat ? DType::kFloat32 : type == at::kHalf ? DType::kFloat16 : DType::kBFloat16;
}

// A and B: non-empty (rows, dim) matrices of one supported dtype and one dim; any strides.
DType check_features(const Tensor& a, const Tensor& b) {
  const auto check_matrix = [](const Tensor& t, const char* name) {
    TORCH_CHECK_VALUE(t.dim() == 2, name, " must be 2-D (rows, dim), got shape ", t.sizes());
    TORCH_CHECK_VALUE(t.size(0) > 0 && t.size(1) > 0, name, " must be non-empty, got shape ", t.sizes());
  };
  check_matrix(a, "a");
  check_matrix(b, "b");
  const DType dtype = feature_dtype(a, "a");
  TORCH_CHECK_TYPE(b.scalar_type() == a.scalar_type(), "b has dtype ", b.scalar_type(), " but a has ",
                   a.scalar_type(), "; they must match");
  TORCH_CHECK_VALUE(b.size(1) == a.size(1), "b has feature dimension ", b.size(1), " but a has ", a.size(1),
                    "; they must match");
  return dtype;
}

// A contiguous float32 vector of `length` elements (a device scalar when length is 1).
void check_f32(const Tensor& t, const char* name, int64_t length) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() <= 1 && t.numel() == length, name, " must be a vector of ", length,
                    " elements, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

void check_f32(const OptTensor& t, const char* name, int64_t length) {
  if (t) check_f32(*t, name, length);
}

// A contiguous float32 matrix of the given shape.
void check_f32(const Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, name, " must have shape (", rows,
                    ", ", cols, "), got ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

// Positive-pair ids: both or neither, contiguous int64 of lengths N and M.
void check_ids(const OptTensor& row_ids, const OptTensor& col_ids, int64_t n, int64_t m) {
  TORCH_CHECK_VALUE(row_ids.has_value() == col_ids.has_value(), "row_ids and col_ids must be given together, got ",
                    row_ids ? "row_ids" : "col_ids", " alone");
  if (!row_ids) return;
  const auto check_one = [](const Tensor& t, const char* name, int64_t length) {
    TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, name, " must be int64, got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == length, name, " must have shape (", length, ",), got ",
                      t.sizes());
    TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
  };
  check_one(*row_ids, "row_ids", n);
  check_one(*col_ids, "col_ids", m);
}

// The gradient tile buffer: (rows, cols) in the features' dtype, any strides.
void check_g_out(const OptTensor& g_out, const Tensor& a, int64_t rows, int64_t cols) {
  if (!g_out) return;
  TORCH_CHECK_TYPE(g_out->scalar_type() == a.scalar_type(), "g_out must have the features' dtype ",
                   a.scalar_type(), ", got ", g_out->scalar_type());
  TORCH_CHECK_VALUE(g_out->dim() == 2 && g_out->size(0) == rows && g_out->size(1) == cols,
                    "g_out must have shape (", rows, ", ", cols, ") for the block, got ", g_out->sizes());
}

// The block [row0, row1) × [col0, col1) of the N × M score matrix; returns its tile count.
int64_t check_block(int64_t row0, int64_t row1, int64_t col0, int64_t col1, int64_t n, int64_t m) {
  TORCH_CHECK_VALUE(0 <= row0 && row0 < row1 && row1 <= n, "rows [row0, row1) = [", row0, ", ", row1,
                    ") must be a non-empty range within [0, ", n, ")");
  TORCH_CHECK_VALUE(0 <= col0 && col0 < col1 && col1 <= m, "columns [col0, col1) = [", col0, ", ", col1,
                    ") must be a non-empty range within [0, ", m, ")");
  const int64_t tiles = pyclipfast::block_tiles(row0, row1, col0, col1);
  TORCH_CHECK_VALUE(tiles <= INT32_MAX, "the block has ", tiles, " tiles, more than one launch takes (",
                    INT32_MAX, "); split it");
  return tiles;
}

// The forward grid: `groups` programs of `per_group` blocks each must cover all `blocks`.
void check_groups(const char* side, int64_t groups, int64_t per_group, int64_t blocks, int64_t max_groups) {
  TORCH_CHECK_VALUE(groups >= 1 && groups <= max_groups, side, "_groups must be in [1, ", max_groups, "], got ",
                    groups);
  TORCH_CHECK_VALUE(per_group >= 1 && per_group <= INT32_MAX && groups * per_group >= blocks, side, "_groups × ",
                    side, "_blocks_per_group = ", groups, " × ", per_group, " must cover the ", blocks, " ", side,
                    " blocks");
}

// Device checks run last: the first tensor on a CUDA device, every other given one on the same.
struct Named {
  const char* name;
  const Tensor* tensor;  // nullptr: an optional argument that was not given
  Named(const char* name, const Tensor& t) : name(name), tensor(&t) {}
  Named(const char* name, const OptTensor& t) : name(name), tensor(t ? &*t : nullptr) {}
};

void check_devices(const Named& first, std::initializer_list<Named> others) {
  const Tensor& x = *first.tensor;
  TORCH_CHECK_VALUE(x.is_cuda(), first.name, " must be a CUDA tensor, got device ", x.device());
  for (const Named& t : others) {
    TORCH_CHECK_VALUE(t.tensor == nullptr || t.tensor->device() == x.device(), t.name, " is on ", t.tensor->device(),
                      " but ", first.name, " is on ", x.device(), "; every tensor must be on ", first.name,
                      "'s CUDA device");
  }
}

template <typename T>
T* ptr_or_null(const OptTensor& t) {
  return t ? static_cast<T*>(t->data_ptr()) : nullptr;
}

pyclipfast::ScoreParams score_params(const Tensor& a, const Tensor& b, const Tensor& scale, DType dtype, bool tf32,
                                     PosMode pos_mode, const OptTensor& row_ids, const OptTensor& col_ids) {
  pyclipfast::ScoreParams s{};
  s.a = a.data_ptr();
  s.b = b.data_ptr();
  s.n_rows = a.size(0);
  s.n_cols = b.size(0);
  s.dim = a.size(1);
  s.stride_am = a.stride(0);
  s.stride_ak = a.stride(1);
  s.stride_bn = b.stride(0);
  s.stride_bk = b.stride(1);
  s.dtype = dtype;
  s.tf32 = tf32 && dtype == DType::kFloat32;
  s.scale = scale.data_ptr<float>();
  s.pos_mode = pos_mode;
  s.row_ids = ptr_or_null<const int64_t>(row_ids);
  s.col_ids = ptr_or_null<const int64_t>(col_ids);
  return s;
}

template <typename Params>
using Launcher = cudaError_t (*)(const Params&, cudaStream_t);

// Launch on x's device and current stream, with the launcher for the features' dtype.
template <typename Params>
void launch_for_dtype(const char* fn, const Tensor& x, DType dtype, const Params& p, Launcher<Params> f32,
                      Launcher<Params> f16, Launcher<Params> bf16) {
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  const Launcher<Params> f = dtype == DType::kFloat32 ? f32 : dtype == DType::kFloat16 ? f16 : bf16;
  const cudaError_t err = f(p, stream);
  TORCH_CHECK(err == cudaSuccess, "pyclipfast._C.", fn, ": kernel launch failed: ", cudaGetErrorString(err));
}

template <typename Params>
void launch(const char* fn, const Tensor& a, const Params& p, Launcher<Params> f32, Launcher<Params> f16,
            Launcher<Params> bf16) {
  launch_for_dtype(fn, a, p.s.dtype, p, f32, f16, bf16);
}

void clip_forward(const Tensor& a, const Tensor& b, const Tensor& scale, const OptTensor& row_ids,
                  const OptTensor& col_ids, const Tensor& row_max, const Tensor& row_sum, const Tensor& row_pos,
                  const OptTensor& col_max, const OptTensor& col_sum, const OptTensor& col_pos, int64_t row_groups,
                  int64_t col_groups, int64_t row_blocks_per_group, int64_t col_blocks_per_group, bool tf32) {
  const DType dtype = check_features(a, b);
  const int64_t n = a.size(0), m = b.size(0);
  check_f32(scale, "scale", 1);
  check_ids(row_ids, col_ids, n, m);
  check_groups("row", row_groups, row_blocks_per_group, pyclipfast::cdiv(n, pyclipfast::kBlockM), INT32_MAX);
  check_groups("col", col_groups, col_blocks_per_group, pyclipfast::cdiv(m, pyclipfast::kBlockN), 65535);
  check_f32(row_max, "row_max", col_groups, n);
  check_f32(row_sum, "row_sum", col_groups, n);
  check_f32(row_pos, "row_pos", col_groups, n);
  const bool bidirectional = col_max.has_value();
  TORCH_CHECK_VALUE(col_sum.has_value() == bidirectional && col_pos.has_value() == bidirectional,
                    "col_max, col_sum and col_pos must be given together (bidirectional) or not at all");
  if (bidirectional) {
    check_f32(*col_max, "col_max", row_groups, m);
    check_f32(*col_sum, "col_sum", row_groups, m);
    check_f32(*col_pos, "col_pos", row_groups, m);
  }
  check_devices({"a", a}, {{"b", b}, {"scale", scale}, {"row_ids", row_ids}, {"col_ids", col_ids}, {"row_max", row_max},
                          {"row_sum", row_sum}, {"row_pos", row_pos}, {"col_max", col_max}, {"col_sum", col_sum},
                          {"col_pos", col_pos}});

  pyclipfast::ClipForwardParams p{};
  p.s = score_params(a, b, scale, dtype, tf32, row_ids ? PosMode::kIds : PosMode::kDiagonal, row_ids, col_ids);
  p.row_max = row_max.data_ptr<float>();
  p.row_sum = row_sum.data_ptr<float>();
  p.row_pos = row_pos.data_ptr<float>();
  p.col_max = ptr_or_null<float>(col_max);
  p.col_sum = ptr_or_null<float>(col_sum);
  p.col_pos = ptr_or_null<float>(col_pos);
  p.row_groups = static_cast<int>(row_groups);
  p.col_groups = static_cast<int>(col_groups);
  p.row_blocks_per_group = static_cast<int>(row_blocks_per_group);
  p.col_blocks_per_group = static_cast<int>(col_blocks_per_group);
  launch<pyclipfast::ClipForwardParams>("clip_forward", a, p, pyclipfast::clip_forward<DType::kFloat32>,
                                        pyclipfast::clip_forward<DType::kFloat16>,
                                        pyclipfast::clip_forward<DType::kBFloat16>);
}

void clip_grad(const Tensor& a, const Tensor& b, const Tensor& scale, const OptTensor& row_ids,
               const OptTensor& col_ids, const OptTensor& row_lse, const OptTensor& col_lse, const OptTensor& g_row,
               const OptTensor& g_col, const OptTensor& g_row_pos, const OptTensor& g_col_pos,
               const Tensor& inv_norm, const OptTensor& g_out, const Tensor& dscale_part, int64_t row0,
               int64_t row1, int64_t col0, int64_t col1, bool tf32) {
  const DType dtype = check_features(a, b);
  const int64_t n = a.size(0), m = b.size(0);
  check_f32(scale, "scale", 1);
  check_ids(row_ids, col_ids, n, m);
  TORCH_CHECK_VALUE(!g_row || row_lse, "g_row needs row_lse");
  TORCH_CHECK_VALUE(!g_col || col_lse, "g_col needs col_lse");
  check_f32(row_lse, "row_lse", n);
  check_f32(col_lse, "col_lse", m);
  check_f32(g_row, "g_row", n);
  check_f32(g_col, "g_col", m);
  check_f32(g_row_pos, "g_row_pos", n);
  check_f32(g_col_pos, "g_col_pos", m);
  check_f32(inv_norm, "inv_norm", 1);
  const int64_t tiles = check_block(row0, row1, col0, col1, n, m);
  check_g_out(g_out, a, row1 - row0, col1 - col0);
  check_f32(dscale_part, "dscale_part", tiles);
  check_devices({"a", a}, {{"b", b}, {"scale", scale}, {"row_ids", row_ids}, {"col_ids", col_ids},
                          {"row_lse", row_lse}, {"col_lse", col_lse}, {"g_row", g_row}, {"g_col", g_col},
                          {"g_row_pos", g_row_pos}, {"g_col_pos", g_col_pos}, {"inv_norm", inv_norm},
                          {"g_out", g_out}, {"dscale_part", dscale_part}});

  pyclipfast::ClipGradParams p{};
  p.s = score_params(a, b, scale, dtype, tf32, row_ids ? PosMode::kIds : PosMode::kDiagonal, row_ids, col_ids);
  p.row_lse = ptr_or_null<const float>(row_lse);
  p.col_lse = ptr_or_null<const float>(col_lse);
  p.g_row = ptr_or_null<const float>(g_row);
  p.g_col = ptr_or_null<const float>(g_col);
  p.g_row_pos = ptr_or_null<const float>(g_row_pos);
  p.g_col_pos = ptr_or_null<const float>(g_col_pos);
  p.inv_norm = inv_norm.data_ptr<float>();
  p.g_out = g_out ? g_out->data_ptr() : nullptr;
  p.stride_gm = g_out ? g_out->stride(0) : 0;
  p.stride_gn = g_out ? g_out->stride(1) : 0;
  p.dscale_part = dscale_part.data_ptr<float>();
  p.row0 = row0;
  p.row1 = row1;
  p.col0 = col0;
  p.col1 = col1;
  launch<pyclipfast::ClipGradParams>("clip_grad", a, p, pyclipfast::clip_grad<DType::kFloat32>,
                                     pyclipfast::clip_grad<DType::kFloat16>, pyclipfast::clip_grad<DType::kBFloat16>);
}

void siglip(const Tensor& a, const Tensor& b, const Tensor& scale, const OptTensor& bias, const OptTensor& row_ids,
            const OptTensor& col_ids, bool negative_only, const OptTensor& g_out, const Tensor& loss_part,
            const Tensor& dscale_part, const Tensor& dbias_part, int64_t row0, int64_t row1, int64_t col0,
            int64_t col1, bool tf32) {
  const DType dtype = check_features(a, b);
  const int64_t n = a.size(0), m = b.size(0);
  check_f32(scale, "scale", 1);
  check_f32(bias, "bias", 1);
  check_ids(row_ids, col_ids, n, m);
  const int64_t tiles = check_block(row0, row1, col0, col1, n, m);
  check_g_out(g_out, a, row1 - row0, col1 - col0);
  check_f32(loss_part, "loss_part", tiles);
  check_f32(dscale_part, "dscale_part", tiles);
  check_f32(dbias_part, "dbias_part", tiles);
  check_devices({"a", a}, {{"b", b}, {"scale", scale}, {"bias", bias}, {"row_ids", row_ids}, {"col_ids", col_ids},
                          {"g_out", g_out}, {"loss_part", loss_part}, {"dscale_part", dscale_part},
                          {"dbias_part", dbias_part}});

  const PosMode pos_mode = negative_only ? PosMode::kNone : row_ids ? PosMode::kIds : PosMode::kDiagonal;
  pyclipfast::SiglipParams p{};
  p.s = score_params(a, b, scale, dtype, tf32, pos_mode, row_ids, col_ids);
  p.bias = ptr_or_null<const float>(bias);
  p.g_out = g_out ? g_out->data_ptr() : nullptr;
  p.stride_gm = g_out ? g_out->stride(0) : 0;
  p.stride_gn = g_out ? g_out->stride(1) : 0;
  p.loss_part = loss_part.data_ptr<float>();
  p.dscale_part = dscale_part.data_ptr<float>();
  p.dbias_part = dbias_part.data_ptr<float>();
  p.row0 = row0;
  p.row1 = row1;
  p.col0 = col0;
  p.col1 = col1;
  launch<pyclipfast::SiglipParams>("siglip", a, p, pyclipfast::siglip<DType::kFloat32>,
                                   pyclipfast::siglip<DType::kFloat16>, pyclipfast::siglip<DType::kBFloat16>);
}

// A contiguous float32 tensor of shape (d0, d1, d2).
void check_f32(const Tensor& t, const char* name, int64_t d0, int64_t d1, int64_t d2) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 3 && t.size(0) == d0 && t.size(1) == d1 && t.size(2) == d2, name,
                    " must have shape (", d0, ", ", d1, ", ", d2, "), got ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

// The teacher of distill: ta (N × Dt) and tb (M × Dt) in a's dtype and its scale, needed for a
// margin, a filter or KD; returns the teacher part of the kernel parameters.
pyclipfast::DistillTeacher check_teacher(const OptTensor& ta, const OptTensor& tb, const OptTensor& teacher_scale,
                                         const Tensor& a, const Tensor& b, bool needed) {
  pyclipfast::DistillTeacher t{};
  TORCH_CHECK_VALUE(ta.has_value() == tb.has_value() && ta.has_value() == teacher_scale.has_value(),
                    "ta, tb and teacher_scale must be given together or not at all");
  TORCH_CHECK_VALUE(ta || !needed, "ta, tb and teacher_scale (the teacher) are needed for a margin, a filter or kd");
  if (!ta) return t;
  for (const auto* x : {&*ta, &*tb}) {
    const char* name = x == &*ta ? "ta" : "tb";
    const int64_t rows = x == &*ta ? a.size(0) : b.size(0);
    TORCH_CHECK_VALUE(x->dim() == 2 && x->size(0) == rows && x->size(1) > 0, name, " must have shape (", rows,
                      ", teacher_dim), got ", x->sizes());
    TORCH_CHECK_TYPE(x->scalar_type() == a.scalar_type(), name, " has dtype ", x->scalar_type(), " but a has ",
                     a.scalar_type(), "; they must match");
  }
  TORCH_CHECK_VALUE(tb->size(1) == ta->size(1), "tb has feature dimension ", tb->size(1), " but ta has ",
                    ta->size(1), "; they must match");
  check_f32(*teacher_scale, "teacher_scale", 1);
  t.ta = ta->data_ptr();
  t.tb = tb->data_ptr();
  t.dim = ta->size(1);
  t.stride_am = ta->stride(0);
  t.stride_ak = ta->stride(1);
  t.stride_bn = tb->stride(0);
  t.stride_bk = tb->stride(1);
  t.scale = teacher_scale->data_ptr<float>();
  return t;
}

pyclipfast::DistillOptions distill_options(double margin, std::optional<double> threshold, int64_t kd,
                                           double angle_eps) {
  TORCH_CHECK_VALUE(margin >= 0 && std::isfinite(margin), "margin must be a finite number >= 0, got ", margin);
  TORCH_CHECK_VALUE(!threshold || std::isfinite(*threshold), "threshold must be finite, got ", *threshold);
  TORCH_CHECK_VALUE(kd >= 0 && kd <= 2, "kd must be 0 (off), 1 (kl) or 2 (ce), got ", kd);
  TORCH_CHECK_VALUE(angle_eps > 0 && angle_eps < 0.5, "angle_eps must be in (0, 0.5), got ", angle_eps);
  pyclipfast::DistillOptions o{};
  o.margin = static_cast<float>(margin);
  o.filter = threshold.has_value();
  o.threshold = threshold ? static_cast<float>(*threshold) : 0.0f;
  o.kd = static_cast<pyclipfast::Kd>(kd);
  o.angle_eps = static_cast<float>(angle_eps);
  return o;
}

bool needs_teacher(const pyclipfast::DistillOptions& o) {
  return o.margin > 0 || o.filter || o.kd != pyclipfast::Kd::kOff;
}

void distill_forward(const Tensor& a, const Tensor& b, const Tensor& scale, const OptTensor& ta, const OptTensor& tb,
                     const OptTensor& teacher_scale, const OptTensor& row_ids, const OptTensor& col_ids,
                     const Tensor& row_part, const Tensor& col_part, int64_t row_groups, int64_t col_groups,
                     int64_t row_blocks_per_group, int64_t col_blocks_per_group, double margin,
                     std::optional<double> threshold, int64_t kd, double angle_eps, bool tf32) {
  const DType dtype = check_features(a, b);
  const int64_t n = a.size(0), m = b.size(0);
  check_f32(scale, "scale", 1);
  const pyclipfast::DistillOptions o = distill_options(margin, threshold, kd, angle_eps);
  const pyclipfast::DistillTeacher t = check_teacher(ta, tb, teacher_scale, a, b, needs_teacher(o));
  check_ids(row_ids, col_ids, n, m);
  check_groups("row", row_groups, row_blocks_per_group, pyclipfast::cdiv(n, pyclipfast::kBlockM), INT32_MAX);
  check_groups("col", col_groups, col_blocks_per_group, pyclipfast::cdiv(m, pyclipfast::kBlockN), 65535);
  const int64_t stats = o.kd != pyclipfast::Kd::kOff ? pyclipfast::kDistillStats : pyclipfast::kZPos + 1;
  check_f32(row_part, "row_part", stats, col_groups, n);
  check_f32(col_part, "col_part", stats, row_groups, m);
  check_devices({"a", a}, {{"b", b}, {"scale", scale}, {"ta", ta}, {"tb", tb}, {"teacher_scale", teacher_scale},
                          {"row_ids", row_ids}, {"col_ids", col_ids}, {"row_part", row_part},
                          {"col_part", col_part}});

  pyclipfast::DistillForwardParams p{};
  p.s = score_params(a, b, scale, dtype, tf32, row_ids ? PosMode::kIds : PosMode::kDiagonal, row_ids, col_ids);
  p.t = needs_teacher(o) ? t : pyclipfast::DistillTeacher{};
  p.o = o;
  p.row_part = row_part.data_ptr<float>();
  p.col_part = col_part.data_ptr<float>();
  p.row_groups = static_cast<int>(row_groups);
  p.col_groups = static_cast<int>(col_groups);
  p.row_blocks_per_group = static_cast<int>(row_blocks_per_group);
  p.col_blocks_per_group = static_cast<int>(col_blocks_per_group);
  launch<pyclipfast::DistillForwardParams>("distill_forward", a, p, pyclipfast::distill_forward<DType::kFloat32>,
                                           pyclipfast::distill_forward<DType::kFloat16>,
                                           pyclipfast::distill_forward<DType::kBFloat16>);
}

void distill_grad(const Tensor& a, const Tensor& b, const Tensor& scale, const OptTensor& ta, const OptTensor& tb,
                  const OptTensor& teacher_scale, const OptTensor& row_ids, const OptTensor& col_ids,
                  const Tensor& row_vec, const Tensor& col_vec, const Tensor& inv_norm, const OptTensor& g_out,
                  const Tensor& dscale_part, int64_t row0, int64_t row1, int64_t col0, int64_t col1, double margin,
                  std::optional<double> threshold, int64_t kd, double angle_eps, bool tf32) {
  const DType dtype = check_features(a, b);
  const int64_t n = a.size(0), m = b.size(0);
  check_f32(scale, "scale", 1);
  const pyclipfast::DistillOptions o = distill_options(margin, threshold, kd, angle_eps);
  const pyclipfast::DistillTeacher t = check_teacher(ta, tb, teacher_scale, a, b, needs_teacher(o));
  check_ids(row_ids, col_ids, n, m);
  const int64_t vectors = o.kd != pyclipfast::Kd::kOff ? pyclipfast::kDistillVectors : pyclipfast::kGPos + 1;
  check_f32(row_vec, "row_vec", vectors, n);
  check_f32(col_vec, "col_vec", vectors, m);
  check_f32(inv_norm, "inv_norm", 1);
  const int64_t tiles = check_block(row0, row1, col0, col1, n, m);
  check_g_out(g_out, a, row1 - row0, col1 - col0);
  check_f32(dscale_part, "dscale_part", tiles);
  check_devices({"a", a}, {{"b", b}, {"scale", scale}, {"ta", ta}, {"tb", tb}, {"teacher_scale", teacher_scale},
                          {"row_ids", row_ids}, {"col_ids", col_ids}, {"row_vec", row_vec}, {"col_vec", col_vec},
                          {"inv_norm", inv_norm}, {"g_out", g_out}, {"dscale_part", dscale_part}});

  pyclipfast::DistillGradParams p{};
  p.s = score_params(a, b, scale, dtype, tf32, row_ids ? PosMode::kIds : PosMode::kDiagonal, row_ids, col_ids);
  p.t = needs_teacher(o) ? t : pyclipfast::DistillTeacher{};
  p.o = o;
  p.row_vec = row_vec.data_ptr<float>();
  p.col_vec = col_vec.data_ptr<float>();
  p.inv_norm = inv_norm.data_ptr<float>();
  p.g_out = g_out ? g_out->data_ptr() : nullptr;
  p.stride_gm = g_out ? g_out->stride(0) : 0;
  p.stride_gn = g_out ? g_out->stride(1) : 0;
  p.dscale_part = dscale_part.data_ptr<float>();
  p.row0 = row0;
  p.row1 = row1;
  p.col0 = col0;
  p.col1 = col1;
  launch<pyclipfast::DistillGradParams>("distill_grad", a, p, pyclipfast::distill_grad<DType::kFloat32>,
                                        pyclipfast::distill_grad<DType::kFloat16>,
                                        pyclipfast::distill_grad<DType::kBFloat16>);
}

// The gradient buffers of the cosine loss: contiguous (rows, dim) in the features' dtype.
void check_grad_out(const OptTensor& g, const char* name, const Tensor& like) {
  if (!g) return;
  TORCH_CHECK_TYPE(g->scalar_type() == like.scalar_type(), name, " must have the features' dtype ",
                   like.scalar_type(), ", got ", g->scalar_type());
  TORCH_CHECK_VALUE(g->sizes() == like.sizes(), name, " must have shape ", like.sizes(), ", got ", g->sizes());
  TORCH_CHECK_VALUE(g->is_contiguous(), name, " must be contiguous");
}

void cosine(const Tensor& online, const Tensor& target, const Tensor& cos, const OptTensor& d_online,
            const OptTensor& d_target, double grad_scale, double eps) {
  TORCH_CHECK_VALUE(online.dim() == 2 && online.size(0) > 0 && online.size(1) > 0,
                    "online must be a non-empty 2-D (rows, dim) tensor, got shape ", online.sizes());
  const DType dtype = feature_dtype(online, "online");
  const int64_t n = online.size(0), d = online.size(1);
  TORCH_CHECK_TYPE(target.scalar_type() == online.scalar_type(), "target has dtype ", target.scalar_type(),
                   " but online has ", online.scalar_type(), "; they must match");
  TORCH_CHECK_VALUE(target.sizes() == online.sizes(), "target must have shape (", n, ", ", d,
                    ") like online, got ", target.sizes());
  check_f32(cos, "cos", n);
  check_grad_out(d_online, "d_online", online);
  check_grad_out(d_target, "d_target", online);
  TORCH_CHECK_VALUE(eps > 0, "eps must be > 0, got ", eps);
  check_devices({"online", online}, {{"target", target}, {"cos", cos}, {"d_online", d_online},
                                     {"d_target", d_target}});

  pyclipfast::CosineParams p{};
  p.online = online.data_ptr();
  p.target = target.data_ptr();
  p.n_rows = n;
  p.dim = d;
  p.stride_pm = online.stride(0);
  p.stride_pk = online.stride(1);
  p.stride_zm = target.stride(0);
  p.stride_zk = target.stride(1);
  p.dtype = dtype;
  p.cos = cos.data_ptr<float>();
  p.d_online = d_online ? d_online->data_ptr() : nullptr;
  p.d_target = d_target ? d_target->data_ptr() : nullptr;
  p.grad_scale = static_cast<float>(grad_scale);
  p.eps = static_cast<float>(eps);
  launch_for_dtype<pyclipfast::CosineParams>("cosine", online, dtype, p, pyclipfast::cosine<DType::kFloat32>,
                                             pyclipfast::cosine<DType::kFloat16>, pyclipfast::cosine<DType::kBFloat16>);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "pyclipfast CUDA kernels (see csrc/); called by pyclipfast/cuda/*.py";
  m.attr("BLOCK_M") = pyclipfast::kBlockM;
  m.attr("BLOCK_N") = pyclipfast::kBlockN;
  m.def("clip_forward", &clip_forward,
        "InfoNCE forward sweep: per-group (max, sum-exp, positive sum) of rows and columns of S = s·A·Bᵀ",
        py::arg("a"), py::arg("b"), py::arg("scale"), py::arg("row_ids"), py::arg("col_ids"), py::arg("row_max"),
        py::arg("row_sum"), py::arg("row_pos"), py::arg("col_max"), py::arg("col_sum"), py::arg("col_pos"),
        py::arg("row_groups"), py::arg("col_groups"), py::arg("row_blocks_per_group"),
        py::arg("col_blocks_per_group"), py::arg("tf32"));
  m.def("clip_grad", &clip_grad,
        "InfoNCE gradient tiles G·inv_norm of one block of S and their dscale partials", py::arg("a"), py::arg("b"),
        py::arg("scale"), py::arg("row_ids"), py::arg("col_ids"), py::arg("row_lse"), py::arg("col_lse"),
        py::arg("g_row"), py::arg("g_col"), py::arg("g_row_pos"), py::arg("g_col_pos"), py::arg("inv_norm"),
        py::arg("g_out"), py::arg("dscale_part"), py::arg("row0"), py::arg("row1"), py::arg("col0"),
        py::arg("col1"), py::arg("tf32"));
  m.def("siglip", &siglip, "SigLIP loss/dscale/dbias partials and gradient tile G of one block of S",
        py::arg("a"), py::arg("b"), py::arg("scale"), py::arg("bias"), py::arg("row_ids"), py::arg("col_ids"),
        py::arg("negative_only"), py::arg("g_out"), py::arg("loss_part"), py::arg("dscale_part"),
        py::arg("dbias_part"), py::arg("row0"), py::arg("row1"), py::arg("col0"), py::arg("col1"), py::arg("tf32"));
  m.def("cosine", &cosine, "Cosine loss rows: cos_i and the gradients of grad_scale·Σ cos_i in one pass",
        py::arg("online"), py::arg("target"), py::arg("cos"), py::arg("d_online"), py::arg("d_target"),
        py::arg("grad_scale"), py::arg("eps"));
  m.def("distill_forward", &distill_forward,
        "Distillation forward sweep: per-group statistics of Z, U and V along rows and columns (see csrc/distill/)",
        py::arg("a"), py::arg("b"), py::arg("scale"), py::arg("ta"), py::arg("tb"), py::arg("teacher_scale"),
        py::arg("row_ids"), py::arg("col_ids"), py::arg("row_part"), py::arg("col_part"), py::arg("row_groups"),
        py::arg("col_groups"), py::arg("row_blocks_per_group"), py::arg("col_blocks_per_group"), py::arg("margin"),
        py::arg("threshold"), py::arg("kd"), py::arg("angle_eps"), py::arg("tf32"));
  m.def("distill_grad", &distill_grad, "Distillation gradient tiles H·inv_norm of one block and dscale partials",
        py::arg("a"), py::arg("b"), py::arg("scale"), py::arg("ta"), py::arg("tb"), py::arg("teacher_scale"),
        py::arg("row_ids"), py::arg("col_ids"), py::arg("row_vec"), py::arg("col_vec"), py::arg("inv_norm"),
        py::arg("g_out"), py::arg("dscale_part"), py::arg("row0"), py::arg("row1"), py::arg("col0"), py::arg("col1"),
        py::arg("margin"), py::arg("threshold"), py::arg("kd"), py::arg("angle_eps"), py::arg("tf32"));
}
