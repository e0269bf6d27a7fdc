// SigLIP loss and gradient tiles, bf16 features (kernels in siglip.cuh).
#include "siglip/siglip.cuh"

template cudaError_t pyclipfast::siglip<pyclipfast::DType::kBFloat16>(const pyclipfast::SiglipParams&, cudaStream_t);
