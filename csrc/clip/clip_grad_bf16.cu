// InfoNCE gradient tiles, bf16 features (kernels in clip_grad.cuh).
#include "clip/clip_grad.cuh"

template cudaError_t pyclipfast::clip_grad<pyclipfast::DType::kBFloat16>(const pyclipfast::ClipGradParams&, cudaStream_t);
