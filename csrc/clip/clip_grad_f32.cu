// InfoNCE gradient tiles, f32 features (kernels in clip_grad.cuh).
#include "clip/clip_grad.cuh"

template cudaError_t pyclipfast::clip_grad<pyclipfast::DType::kFloat32>(const pyclipfast::ClipGradParams&, cudaStream_t);
