// Cosine loss rows, bf16 features (kernels in cosine.cuh).
#include "cosine/cosine.cuh"

template cudaError_t pyclipfast::cosine<pyclipfast::DType::kBFloat16>(const pyclipfast::CosineParams&, cudaStream_t);
