// The C interface (pyclipfast_c.h): fills the parameter structs of pyclipfast.h from plain
// arguments, then either launches the per-dtype kernel on the given device and stream or, in
// record mode, writes the struct's fields out for the caller to compare with what it passed.
#include "pyclipfast_c.h"

#include <cinttypes>
#include <cstdio>
#include <string>

#include <cuda_runtime_api.h>

#include "pyclipfast.h"

namespace {

using namespace pyclipfast;

thread_local std::string last_error;
thread_local std::string last_record;
thread_local bool record_only = false;

// "name=value" lines of one launch: what the kernel would have received.
class Record {
 public:
  explicit Record(const char* fn) { line("fn", fn); }
  void ptr(const char* name, const void* p) { num(name, "%" PRIuPTR, reinterpret_cast<uintptr_t>(p)); }
  void i64(const char* name, int64_t v) { num(name, "%" PRId64, v); }
  void f32(const char* name, float v) { num(name, "%.9g", static_cast<double>(v)); }  // round-trips a float
  void flag(const char* name, bool v) { i64(name, v ? 1 : 0); }
  void done() { last_record = text_; }

 private:
  template <typename T>
  void num(const char* name, const char* format, T v) {
    char buf[64];
    std::snprintf(buf, sizeof buf, format, v);
    line(name, buf);
  }
  void line(const char* name, const char* value) { text_ += std::string(name) + "=" + value + "\n"; }
  std::string text_;
};

void record(Record& r, const ScoreParams& s) {
  r.i64("dtype", static_cast<int>(s.dtype));
  r.ptr("a", s.a);
  r.ptr("b", s.b);
  r.i64("n_rows", s.n_rows);
  r.i64("n_cols", s.n_cols);
  r.i64("dim", s.dim);
  r.i64("stride_am", s.stride_am);
  r.i64("stride_ak", s.stride_ak);
  r.i64("stride_bn", s.stride_bn);
  r.i64("stride_bk", s.stride_bk);
  r.flag("tf32", s.tf32);
  r.ptr("scale", s.scale);
  r.i64("pos_mode", static_cast<int>(s.pos_mode));
  r.ptr("row_ids", s.row_ids);
  r.ptr("col_ids", s.col_ids);
}

void record(Record& r, const DistillTeacher& t) {
  r.ptr("ta", t.ta);
  r.ptr("tb", t.tb);
  r.i64("teacher_dim", t.dim);
  r.i64("stride_tam", t.stride_am);
  r.i64("stride_tak", t.stride_ak);
  r.i64("stride_tbn", t.stride_bn);
  r.i64("stride_tbk", t.stride_bk);
  r.ptr("teacher_scale", t.scale);
}

void record(Record& r, const DistillOptions& o) {
  r.f32("margin", o.margin);
  r.flag("filter", o.filter);
  r.f32("threshold", o.threshold);
  r.i64("kd", static_cast<int>(o.kd));
  r.f32("angle_eps", o.angle_eps);
}

void record_block(Record& r, int64_t row0, int64_t row1, int64_t col0, int64_t col1) {
  r.i64("row0", row0);
  r.i64("row1", row1);
  r.i64("col0", col0);
  r.i64("col1", col1);
}

void record_launch(Record& r, int device, void* stream) {
  r.i64("device", device);
  r.ptr("stream", stream);
}

ScoreParams score_params(int dtype, const void* a, const void* b, int64_t n_rows, int64_t n_cols, int64_t dim,
                         int64_t stride_am, int64_t stride_ak, int64_t stride_bn, int64_t stride_bk, int tf32,
                         const float* scale, int pos_mode, const int64_t* row_ids, const int64_t* col_ids) {
  ScoreParams s{};
  s.a = a;
  s.b = b;
  s.n_rows = n_rows;
  s.n_cols = n_cols;
  s.dim = dim;
  s.stride_am = stride_am;
  s.stride_ak = stride_ak;
  s.stride_bn = stride_bn;
  s.stride_bk = stride_bk;
  s.dtype = static_cast<DType>(dtype);
  s.tf32 = tf32 != 0;
  s.scale = scale;
  s.pos_mode = static_cast<PosMode>(pos_mode);
  s.row_ids = row_ids;
  s.col_ids = col_ids;
  return s;
}

#define PCF_SCORE_VALUES \
  dtype, a, b, n_rows, n_cols, dim, stride_am, stride_ak, stride_bn, stride_bk, tf32, scale, pos_mode, row_ids, col_ids

DistillTeacher teacher_params(PCF_TEACHER_ARGS) {
  DistillTeacher t{};
  t.ta = ta;
  t.tb = tb;
  t.dim = teacher_dim;
  t.stride_am = stride_tam;
  t.stride_ak = stride_tak;
  t.stride_bn = stride_tbn;
  t.stride_bk = stride_tbk;
  t.scale = teacher_scale;
  return t;
}

#define PCF_TEACHER_VALUES ta, tb, teacher_dim, stride_tam, stride_tak, stride_tbn, stride_tbk, teacher_scale

DistillOptions distill_options(PCF_DISTILL_OPTION_ARGS) {
  DistillOptions o{};
  o.margin = margin;
  o.filter = filter != 0;
  o.threshold = threshold;
  o.kd = static_cast<Kd>(kd);
  o.angle_eps = angle_eps;
  return o;
}

#define PCF_DISTILL_OPTION_VALUES margin, filter, threshold, kd, angle_eps

// Switches the calling thread to `device` for a launch and back.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    err_ = cudaGetDevice(&previous_);
    if (err_ == cudaSuccess && previous_ != device) err_ = cudaSetDevice(device);
    else previous_ = -1;  // nothing to restore
  }
  ~DeviceGuard() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }
  cudaError_t error() const { return err_; }

 private:
  int previous_ = -1;
  cudaError_t err_;
};

template <typename Params>
using Launcher = cudaError_t (*)(const Params&, cudaStream_t);

// Launch the dtype's instantiation on `device` and `stream`; 0, or an error code and message.
template <typename Params>
int launch(const char* fn, int device, void* stream, DType dtype, const Params& p, Launcher<Params> f32,
           Launcher<Params> f16, Launcher<Params> bf16) {
  const Launcher<Params> f = dtype == DType::kFloat32   ? f32
                             : dtype == DType::kFloat16  ? f16
                             : dtype == DType::kBFloat16 ? bf16
                                                         : nullptr;
  if (f == nullptr) {
    last_error = std::string(fn) + ": unknown dtype code " + std::to_string(static_cast<int>(dtype));
    return -1;
  }
  const DeviceGuard guard(device);
  cudaError_t err = guard.error();
  if (err == cudaSuccess) err = f(p, static_cast<cudaStream_t>(stream));
  if (err != cudaSuccess) {
    last_error = std::string(fn) + " on cuda:" + std::to_string(device) + ": " + cudaGetErrorName(err) + ": " +
                 cudaGetErrorString(err);
    return static_cast<int>(err);
  }
  return 0;
}

}  // namespace

extern "C" {

int pcf_abi_version(void) { return PCF_ABI_VERSION; }
int pcf_block_m(void) { return kBlockM; }
int pcf_block_n(void) { return kBlockN; }
const char* pcf_last_error(void) { return last_error.c_str(); }
void pcf_set_record_only(int on) { record_only = on != 0; }
const char* pcf_last_record(void) { return last_record.c_str(); }

int pcf_clip_forward(int device, void* stream, PCF_SCORE_ARGS, float* row_max, float* row_sum, float* row_pos,
                     float* col_max, float* col_sum, float* col_pos, int row_groups, int col_groups,
                     int row_blocks_per_group, int col_blocks_per_group, int pair_rule, float penalty,
                     float* row_dot, float* col_dot) {
  ClipForwardParams p{};
  p.s = score_params(PCF_SCORE_VALUES);
  p.row_max = row_max;
  p.row_sum = row_sum;
  p.row_pos = row_pos;
  p.col_max = col_max;
  p.col_sum = col_sum;
  p.col_pos = col_pos;
  p.row_groups = row_groups;
  p.col_groups = col_groups;
  p.row_blocks_per_group = row_blocks_per_group;
  p.col_blocks_per_group = col_blocks_per_group;
  p.pair_rule = static_cast<PairRule>(pair_rule);
  p.penalty = penalty;
  p.row_dot = row_dot;
  p.col_dot = col_dot;
  if (record_only) {
    Record r("clip_forward");
    record_launch(r, device, stream);
    record(r, p.s);
    r.ptr("row_max", p.row_max);
    r.ptr("row_sum", p.row_sum);
    r.ptr("row_pos", p.row_pos);
    r.ptr("col_max", p.col_max);
    r.ptr("col_sum", p.col_sum);
    r.ptr("col_pos", p.col_pos);
    r.i64("row_groups", p.row_groups);
    r.i64("col_groups", p.col_groups);
    r.i64("row_blocks_per_group", p.row_blocks_per_group);
    r.i64("col_blocks_per_group", p.col_blocks_per_group);
    r.i64("pair_rule", static_cast<int>(p.pair_rule));
    r.f32("penalty", p.penalty);
    r.ptr("row_dot", p.row_dot);
    r.ptr("col_dot", p.col_dot);
    r.done();
    return 0;
  }
  return launch<ClipForwardParams>("clip_forward", device, stream, p.s.dtype, p, clip_forward<DType::kFloat32>,
                                   clip_forward<DType::kFloat16>, clip_forward<DType::kBFloat16>);
}

int pcf_clip_grad(int device, void* stream, PCF_SCORE_ARGS, const float* row_lse, const float* col_lse,
                  const float* g_row, const float* g_col, const float* g_row_pos, const float* g_col_pos,
                  const float* inv_norm, void* g_out, int64_t stride_gm, int64_t stride_gn, float* dscale_part,
                  int64_t row0, int64_t row1, int64_t col0, int64_t col1, int pair_rule, float penalty) {
  ClipGradParams p{};
  p.s = score_params(PCF_SCORE_VALUES);
  p.row_lse = row_lse;
  p.col_lse = col_lse;
  p.g_row = g_row;
  p.g_col = g_col;
  p.g_row_pos = g_row_pos;
  p.g_col_pos = g_col_pos;
  p.inv_norm = inv_norm;
  p.g_out = g_out;
  p.stride_gm = stride_gm;
  p.stride_gn = stride_gn;
  p.dscale_part = dscale_part;
  p.row0 = row0;
  p.row1 = row1;
  p.col0 = col0;
  p.col1 = col1;
  p.pair_rule = static_cast<PairRule>(pair_rule);
  p.penalty = penalty;
  if (record_only) {
    Record r("clip_grad");
    record_launch(r, device, stream);
    record(r, p.s);
    r.ptr("row_lse", p.row_lse);
    r.ptr("col_lse", p.col_lse);
    r.ptr("g_row", p.g_row);
    r.ptr("g_col", p.g_col);
    r.ptr("g_row_pos", p.g_row_pos);
    r.ptr("g_col_pos", p.g_col_pos);
    r.ptr("inv_norm", p.inv_norm);
    r.ptr("g_out", p.g_out);
    r.i64("stride_gm", p.stride_gm);
    r.i64("stride_gn", p.stride_gn);
    r.ptr("dscale_part", p.dscale_part);
    record_block(r, p.row0, p.row1, p.col0, p.col1);
    r.i64("pair_rule", static_cast<int>(p.pair_rule));
    r.f32("penalty", p.penalty);
    r.done();
    return 0;
  }
  return launch<ClipGradParams>("clip_grad", device, stream, p.s.dtype, p, clip_grad<DType::kFloat32>,
                                clip_grad<DType::kFloat16>, clip_grad<DType::kBFloat16>);
}

int pcf_siglip(int device, void* stream, PCF_SCORE_ARGS, const float* bias, void* g_out, int64_t stride_gm,
               int64_t stride_gn, float* loss_part, float* dscale_part, float* dbias_part, int64_t row0,
               int64_t row1, int64_t col0, int64_t col1) {
  SiglipParams p{};
  p.s = score_params(PCF_SCORE_VALUES);
  p.bias = bias;
  p.g_out = g_out;
  p.stride_gm = stride_gm;
  p.stride_gn = stride_gn;
  p.loss_part = loss_part;
  p.dscale_part = dscale_part;
  p.dbias_part = dbias_part;
  p.row0 = row0;
  p.row1 = row1;
  p.col0 = col0;
  p.col1 = col1;
  if (record_only) {
    Record r("siglip");
    record_launch(r, device, stream);
    record(r, p.s);
    r.ptr("bias", p.bias);
    r.ptr("g_out", p.g_out);
    r.i64("stride_gm", p.stride_gm);
    r.i64("stride_gn", p.stride_gn);
    r.ptr("loss_part", p.loss_part);
    r.ptr("dscale_part", p.dscale_part);
    r.ptr("dbias_part", p.dbias_part);
    record_block(r, p.row0, p.row1, p.col0, p.col1);
    r.done();
    return 0;
  }
  return launch<SiglipParams>("siglip", device, stream, p.s.dtype, p, siglip<DType::kFloat32>,
                              siglip<DType::kFloat16>, siglip<DType::kBFloat16>);
}

int pcf_distill_forward(int device, void* stream, PCF_SCORE_ARGS, PCF_TEACHER_ARGS, PCF_DISTILL_OPTION_ARGS,
                        float* row_part, float* col_part, int row_groups, int col_groups, int row_blocks_per_group,
                        int col_blocks_per_group) {
  DistillForwardParams p{};
  p.s = score_params(PCF_SCORE_VALUES);
  p.t = teacher_params(PCF_TEACHER_VALUES);
  p.o = distill_options(PCF_DISTILL_OPTION_VALUES);
  p.row_part = row_part;
  p.col_part = col_part;
  p.row_groups = row_groups;
  p.col_groups = col_groups;
  p.row_blocks_per_group = row_blocks_per_group;
  p.col_blocks_per_group = col_blocks_per_group;
  if (record_only) {
    Record r("distill_forward");
    record_launch(r, device, stream);
    record(r, p.s);
    record(r, p.t);
    record(r, p.o);
    r.ptr("row_part", p.row_part);
    r.ptr("col_part", p.col_part);
    r.i64("row_groups", p.row_groups);
    r.i64("col_groups", p.col_groups);
    r.i64("row_blocks_per_group", p.row_blocks_per_group);
    r.i64("col_blocks_per_group", p.col_blocks_per_group);
    r.done();
    return 0;
  }
  return launch<DistillForwardParams>("distill_forward", device, stream, p.s.dtype, p,
                                      distill_forward<DType::kFloat32>, distill_forward<DType::kFloat16>,
                                      distill_forward<DType::kBFloat16>);
}

int pcf_distill_grad(int device, void* stream, PCF_SCORE_ARGS, PCF_TEACHER_ARGS, PCF_DISTILL_OPTION_ARGS,
                     const float* row_vec, const float* col_vec, const float* inv_norm, void* g_out,
                     int64_t stride_gm, int64_t stride_gn, float* dscale_part, int64_t row0, int64_t row1,
                     int64_t col0, int64_t col1) {
  DistillGradParams p{};
  p.s = score_params(PCF_SCORE_VALUES);
  p.t = teacher_params(PCF_TEACHER_VALUES);
  p.o = distill_options(PCF_DISTILL_OPTION_VALUES);
  p.row_vec = row_vec;
  p.col_vec = col_vec;
  p.inv_norm = inv_norm;
  p.g_out = g_out;
  p.stride_gm = stride_gm;
  p.stride_gn = stride_gn;
  p.dscale_part = dscale_part;
  p.row0 = row0;
  p.row1 = row1;
  p.col0 = col0;
  p.col1 = col1;
  if (record_only) {
    Record r("distill_grad");
    record_launch(r, device, stream);
    record(r, p.s);
    record(r, p.t);
    record(r, p.o);
    r.ptr("row_vec", p.row_vec);
    r.ptr("col_vec", p.col_vec);
    r.ptr("inv_norm", p.inv_norm);
    r.ptr("g_out", p.g_out);
    r.i64("stride_gm", p.stride_gm);
    r.i64("stride_gn", p.stride_gn);
    r.ptr("dscale_part", p.dscale_part);
    record_block(r, p.row0, p.row1, p.col0, p.col1);
    r.done();
    return 0;
  }
  return launch<DistillGradParams>("distill_grad", device, stream, p.s.dtype, p, distill_grad<DType::kFloat32>,
                                   distill_grad<DType::kFloat16>, distill_grad<DType::kBFloat16>);
}

int pcf_cosine(int device, void* stream, int dtype, const void* online, const void* target, int64_t n_rows,
               int64_t dim, int64_t stride_pm, int64_t stride_pk, int64_t stride_zm, int64_t stride_zk, float* cos,
               void* d_online, void* d_target, float grad_scale, float eps) {
  CosineParams p{};
  p.online = online;
  p.target = target;
  p.n_rows = n_rows;
  p.dim = dim;
  p.stride_pm = stride_pm;
  p.stride_pk = stride_pk;
  p.stride_zm = stride_zm;
  p.stride_zk = stride_zk;
  p.dtype = static_cast<DType>(dtype);
  p.cos = cos;
  p.d_online = d_online;
  p.d_target = d_target;
  p.grad_scale = grad_scale;
  p.eps = eps;
  if (record_only) {
    Record r("cosine");
    record_launch(r, device, stream);
    r.i64("dtype", static_cast<int>(p.dtype));
    r.ptr("online", p.online);
    r.ptr("target", p.target);
    r.i64("n_rows", p.n_rows);
    r.i64("dim", p.dim);
    r.i64("stride_pm", p.stride_pm);
    r.i64("stride_pk", p.stride_pk);
    r.i64("stride_zm", p.stride_zm);
    r.i64("stride_zk", p.stride_zk);
    r.ptr("cos", p.cos);
    r.ptr("d_online", p.d_online);
    r.ptr("d_target", p.d_target);
    r.f32("grad_scale", p.grad_scale);
    r.f32("eps", p.eps);
    r.done();
    return 0;
  }
  return launch<CosineParams>("cosine", device, stream, p.dtype, p, cosine<DType::kFloat32>, cosine<DType::kFloat16>,
                              cosine<DType::kBFloat16>);
}

}  // extern "C"
