// SigLIP loss and gradient tiles, f32 features (kernels in siglip.cuh).
#include "siglip/siglip.cuh"

template cudaError_t pyclipfast::siglip<pyclipfast::DType::kFloat32>(const pyclipfast::SiglipParams&, cudaStream_t);
