// Distillation gradient tiles, f16 features (kernels in distill_grad.cuh).
#include "distill/distill_grad.cuh"

template cudaError_t pyclipfast::distill_grad<pyclipfast::DType::kFloat16>(const pyclipfast::DistillGradParams&,
                                                                       cudaStream_t);
