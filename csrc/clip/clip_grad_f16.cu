// InfoNCE gradient tiles, f16 features (kernels in clip_grad.cuh).
#include "clip/clip_grad.cuh"

template cudaError_t pyclipfast::clip_grad<pyclipfast::DType::kFloat16>(const pyclipfast::ClipGradParams&, cudaStream_t);
