// SigLIP loss and gradient tiles, f16 features (kernels in siglip.cuh).
#include "siglip/siglip.cuh"

template cudaError_t pyclipfast::siglip<pyclipfast::DType::kFloat16>(const pyclipfast::SiglipParams&, cudaStream_t);
