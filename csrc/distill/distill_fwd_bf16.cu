// Distillation forward statistics, bf16 features (kernels in distill_fwd.cuh).
#include "distill/distill_fwd.cuh"

template cudaError_t pyclipfast::distill_forward<pyclipfast::DType::kBFloat16>(const pyclipfast::DistillForwardParams&,
                                                                          cudaStream_t);
