// sjlt on CUDA with a shared-memory histogram per thread block.
// Each block owns a span of columns and a tile of rows; per column it hashes (key, band, column)
// exactly like sketchfisher/compress/hashing.py, then adds ±x[r, c] into its shared bins[r][bucket]
// with shared-memory atomics, and finally adds its bins into the output with global atomics.
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

__device__ __forceinline__ uint32_t fmix32(uint32_t h) {
  h ^= h >> 16; h *= 0x85EBCA6Bu; h ^= h >> 13; h *= 0xC2B2AE35u; h ^= h >> 16; return h;
}

template <typename T> __device__ __forceinline__ float to_float(T v) { return static_cast<float>(v); }
template <> __device__ __forceinline__ float to_float<at::BFloat16>(at::BFloat16 v) { return static_cast<float>(v); }
template <> __device__ __forceinline__ float to_float<at::Half>(at::Half v) { return static_cast<float>(v); }

template <typename T>
__global__ void sjlt_kernel(const T* __restrict__ x, float* __restrict__ out, int n, int64_t size, int64_t stride,
                            int k, int s, uint32_t lo, uint32_t hi, int64_t span, int rows_per_block) {
  extern __shared__ float bins[];
  const int band = k / s;
  const int r0 = blockIdx.y * rows_per_block;
  const int nr = min(rows_per_block, n - r0);
  for (int t = threadIdx.x; t < nr * k; t += blockDim.x) bins[t] = 0.f;
  __syncthreads();
  const int64_t c0 = blockIdx.x * span;
  const int64_t c1 = min(size, c0 + span);
  for (int64_t c = c0 + threadIdx.x; c < c1; c += blockDim.x) {
    for (int b = 0; b < s; ++b) {
      const uint32_t h = fmix32(fmix32(static_cast<uint32_t>(c * s + b) ^ lo) ^ hi);
      const int bucket = b * band + static_cast<int>((h & 0x7FFFFFFFu) % static_cast<uint32_t>(band));
      const float sign = (h >> 31) ? -1.f : 1.f;
      for (int r = 0; r < nr; ++r) atomicAdd(&bins[r * k + bucket], sign * to_float(x[(r0 + r) * stride + c]));
    }
  }
  __syncthreads();
  for (int t = threadIdx.x; t < nr * k; t += blockDim.x) atomicAdd(&out[(r0 + t / k) * k + t % k], bins[t]);
}

torch::Tensor sjlt(torch::Tensor x, int64_t k, int64_t s, int64_t lo, int64_t hi, int64_t span, int64_t rows_per_block,
                   int64_t threads) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2, "sjlt: x must be a 2-D CUDA tensor");
  x = x.contiguous();
  const int n = x.size(0);
  const int64_t size = x.size(1);
  auto out = torch::zeros({n, k}, x.options().dtype(torch::kFloat32));
  const int rpb = static_cast<int>(std::min<int64_t>(rows_per_block, n));
  dim3 grid((size + span - 1) / span, (n + rpb - 1) / rpb);
  const size_t smem = static_cast<size_t>(rpb) * k * sizeof(float);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sjlt", [&] {
    auto kern = sjlt_kernel<scalar_t>;
    if (smem > 48 * 1024) cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    kern<<<grid, threads, smem, stream>>>(x.data_ptr<scalar_t>(), out.data_ptr<float>(), n, size, x.stride(0), k, s,
                                          static_cast<uint32_t>(lo), static_cast<uint32_t>(hi), span, rpb);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("sjlt", &sjlt, "sjlt sketch (CUDA, shared histogram per block)"); }
