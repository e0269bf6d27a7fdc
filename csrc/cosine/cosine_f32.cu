// Cosine loss rows, f32 features (kernels in cosine.cuh).
#include "cosine/cosine.cuh"

template cudaError_t pyclipfast::cosine<pyclipfast::DType::kFloat32>(const pyclipfast::CosineParams&, cudaStream_t);
