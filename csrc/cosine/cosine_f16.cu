// Cosine loss rows, f16 features (kernels in cosine.cuh).
#include "cosine/cosine.cuh"

template cudaError_t pyclipfast::cosine<pyclipfast::DType::kFloat16>(const pyclipfast::CosineParams&, cudaStream_t);
