// Distillation forward statistics, f32 features (kernels in distill_fwd.cuh).
#include "distill/distill_fwd.cuh"

template cudaError_t pyclipfast::distill_forward<pyclipfast::DType::kFloat32>(const pyclipfast::DistillForwardParams&,
                                                                          cudaStream_t);
