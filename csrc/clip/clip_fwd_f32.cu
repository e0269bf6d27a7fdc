// InfoNCE forward statistics, f32 features (kernels in clip_fwd.cuh).
#include "clip/clip_fwd.cuh"

template cudaError_t pyclipfast::clip_forward<pyclipfast::DType::kFloat32>(const pyclipfast::ClipForwardParams&,
                                                                        cudaStream_t);
