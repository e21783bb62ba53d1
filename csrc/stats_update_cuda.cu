// Streaming statistics on CUDA: the CUDA kernels of torch.ops.skillkern.stats_update and stats_moments.
//
// Same semantics as the CPU kernels (stats_update.cpp), stats_update_reference in skillkern/ops/stats_update.py
// and stats_moments_reference in skillkern/ops/stats_moments.py: for every row r with slot[r] = s >= 0 and
// label[r] = c,
//   stats_update, threshold is None:  out[s, c, :] += double(h[r])                      (float64 sums)
//   stats_update, else:               out[s, c, :] += double(h[r]) > threshold[s, :]    (int64 counts)
//   stats_moments:                    out[s, 0/1/2, :] += v, v * v, |v|  (v = double(h[r]); float64 moments)
// The moments' products and additions use the round-to-nearest intrinsics (__dmul_rn, __dadd_rn), which nvcc
// never contracts into a fused multiply-add: the same roundings as the CPU kernel.
//
// Deterministic, and float64 sums bit-identical to the CPU kernel: every element out[g, d] is owned by
// one thread, which keeps it in a register and adds its rows in row order, exactly the sequence of
// float64 roundings the CPU kernel makes (no atomics, no tree reduction). The price is parallelism:
// at most neurons x (slots * classes) threads, which is plenty while scoring many slots but leaves a GPU
// under-occupied for one slot and two classes; a faster variant that splits rows over threads would need
// float64 atomics, whose order (hence sums) changes from run to run, so it is not here.
//
// Work: two launches.
//   1. row_groups_kernel: one thread per row turns (slot, label) into the int32 group slot*classes+label
//      (stats_moments: no label, the group is the slot; -1: untracked) and checks the indices on the device
//      (no host sync: a bad index is a device-side assert, as in PyTorch's own CUDA index ops, and is never
//      written through).
//   2. stats_update_kernel: a block is 128 neuron columns x one group; each thread owns one column (its sum,
//      count, or three moments in registers).
//      Each warp scans the group array 32 rows at a time (one coalesced 128-byte load + one ballot), and
//      for the rows of its group reads h[r, d0:d0+32] (coalesced across the warp's columns), several rows'
//      loads in flight before their additions, which stay in row order.
// Traffic: h is read once (each row by the blocks of its own group), out read and written once; the
// group array (4 bytes a row) is re-read by every warp, from L2.
//
// Build time: the kernels use only CUDA's own headers, and everything that needs torch's headers (the host
// wrapper and its registration) sits in `#ifndef __CUDA_ARCH__`, so nvcc's per-architecture device passes
// never parse torch: only the host passes do, once. The kernel templates are therefore instantiated
// explicitly, outside that block, for every dtype the host wrapper dispatches to: a device pass does not
// see the launches.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cassert>
#include <cstdint>
#include <cstdio>

#ifndef __CUDA_ARCH__
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>

#include "stats_update.h"
#endif  // __CUDA_ARCH__

// A device-side check that stays on under NDEBUG, as torch's CUDA_KERNEL_ASSERT_MSG (which needs torch's
// headers): a failure ends the kernel with "device-side assert triggered".
#if defined(__GNUC__) && !defined(_WIN32)
#define SKILLKERN_KERNEL_ASSERT(cond, msg)                                                   \
  do {                                                                                       \
    if (!(cond)) __assert_fail(msg, __FILE__, static_cast<unsigned int>(__LINE__), __func__); \
  } while (0)
#else
#define SKILLKERN_KERNEL_ASSERT(cond, msg) assert((cond) && msg)
#endif

// Kernels outside an anonymous namespace: a device pass sees no launch, and nothing should tempt it to drop
// an unreferenced internal kernel.
namespace skillkern {
namespace stats_update_cuda_kernels {

constexpr int kColumnsPerBlock = 128;  // 4 warps, one neuron column per thread
constexpr int kLoadsInFlight = 8;      // rows of h whose loads a thread issues before adding them
constexpr unsigned kFullMask = 0xffffffffu;

// h is converted to float64 exactly, as on CPU (c10::Half and c10::BFloat16 go through float there too).
__device__ __forceinline__ double to_double(float x) { return static_cast<double>(x); }
__device__ __forceinline__ double to_double(double x) { return x; }
__device__ __forceinline__ double to_double(__half x) { return static_cast<double>(__half2float(x)); }
__device__ __forceinline__ double to_double(__nv_bfloat16 x) { return static_cast<double>(__bfloat162float(x)); }

// label may be null (stats_moments): every row is then of class 0 of 1.
__global__ void row_groups_kernel(const int64_t* __restrict__ slot, const int64_t* __restrict__ label,
                                  int64_t rows, int64_t slots, int64_t classes, int32_t* __restrict__ group) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  const int64_t s = slot[r];
  int32_t g = -1;
  if (s != -1) {
    const int64_t c = label != nullptr ? label[r] : 0;
    const bool valid = s >= 0 && s < slots && c >= 0 && c < classes;
    if (!valid) {
      printf("stats_update: row %lld has slot %lld and label %lld; slots must be -1 or in [0, %lld), labels in "
             "[0, %lld)\n", static_cast<long long>(r), static_cast<long long>(s), static_cast<long long>(c),
             static_cast<long long>(slots), static_cast<long long>(classes));
    }
    SKILLKERN_KERNEL_ASSERT(valid, "stats_update: slot or label index out of range");
    // Where device asserts are compiled out, the row is skipped: never an out-of-bounds write.
    if (valid) g = static_cast<int32_t>(s * classes + c);
  }
  group[r] = g;
}

// What a launch accumulates: float64 sums of h (first pass), int64 counts of h > threshold (second pass), or
// the float64 moments sum, sum of squares and sum of |h| (stats_moments; out (groups, 3, width)).
enum Mode : int { kSums = 0, kCounts = 1, kMoments = 2 };

template <typename scalar_t, int kMode>
__global__ void __launch_bounds__(kColumnsPerBlock)
stats_update_kernel(const scalar_t* __restrict__ h, const int32_t* __restrict__ group, int64_t rows,
                    int64_t width, int64_t groups, int64_t classes, const double* __restrict__ threshold,
                    double* __restrict__ sums, int64_t* __restrict__ counts) {
  const int lane = threadIdx.x % 32;
  const int64_t d = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  // Columns past the end stay in the loop (the ballots need the whole warp) but touch no memory.
  const bool active = d < width;
  for (int64_t g = blockIdx.y; g < groups; g += gridDim.y) {
    double sum = 0.0, sumsq = 0.0, sumabs = 0.0, thr = 0.0;
    int64_t count = 0;
    if (active) {
      if constexpr (kMode == kCounts) {
        count = counts[g * width + d];
        thr = threshold[(g / classes) * width + d];
      } else if constexpr (kMode == kMoments) {
        sum = sums[(g * 3) * width + d];
        sumsq = sums[(g * 3 + 1) * width + d];
        sumabs = sums[(g * 3 + 2) * width + d];
      } else {
        sum = sums[g * width + d];
      }
    }
    for (int64_t r0 = 0; r0 < rows; r0 += 32) {
      const int64_t r = r0 + lane;
      unsigned mask = __ballot_sync(kFullMask, r < rows && group[r] == g);  // warp-uniform from here on
      while (mask != 0u) {
        // Issue up to kLoadsInFlight loads (independent of the accumulator), then add in row order.
        double v[kLoadsInFlight];
        int n = 0;
#pragma unroll
        for (int k = 0; k < kLoadsInFlight; ++k) {
          if (mask != 0u) {
            const int64_t row = r0 + __ffs(mask) - 1;  // lowest set bit first: row order
            mask &= mask - 1u;
            v[k] = active ? to_double(h[row * width + d]) : 0.0;
            n = k + 1;
          }
        }
#pragma unroll
        for (int k = 0; k < kLoadsInFlight; ++k) {
          if (k < n) {
            // Skip, never add 0: (-0.0) + 0.0 would turn a -0.0 sum into +0.0.
            if constexpr (kMode == kCounts) {
              count += static_cast<int64_t>(v[k] > thr);
            } else if constexpr (kMode == kMoments) {
              sum = __dadd_rn(sum, v[k]);
              sumsq = __dadd_rn(sumsq, __dmul_rn(v[k], v[k]));
              sumabs = __dadd_rn(sumabs, fabs(v[k]));
            } else {
              sum += v[k];
            }
          }
        }
      }
    }
    if (active) {
      if constexpr (kMode == kCounts) {
        counts[g * width + d] = count;
      } else if constexpr (kMode == kMoments) {
        sums[(g * 3) * width + d] = sum;
        sums[(g * 3 + 1) * width + d] = sumsq;
        sums[(g * 3 + 2) * width + d] = sumabs;
      } else {
        sums[g * width + d] = sum;
      }
    }
  }
}

#define SKILLKERN_INSTANTIATE(scalar_t, mode)                                                                 \
  template __global__ void stats_update_kernel<scalar_t, mode>(const scalar_t*, const int32_t*, int64_t, int64_t, \
                                                               int64_t, int64_t, const double*, double*, int64_t*);
#define SKILLKERN_INSTANTIATE_MODES(scalar_t) \
  SKILLKERN_INSTANTIATE(scalar_t, kSums)      \
  SKILLKERN_INSTANTIATE(scalar_t, kCounts)    \
  SKILLKERN_INSTANTIATE(scalar_t, kMoments)
SKILLKERN_INSTANTIATE_MODES(float)
SKILLKERN_INSTANTIATE_MODES(double)
SKILLKERN_INSTANTIATE_MODES(__half)
SKILLKERN_INSTANTIATE_MODES(__nv_bfloat16)
#undef SKILLKERN_INSTANTIATE_MODES
#undef SKILLKERN_INSTANTIATE

}  // namespace stats_update_cuda_kernels

#ifndef __CUDA_ARCH__
namespace {

using namespace stats_update_cuda_kernels;

constexpr int kRowsPerGroupsBlock = 256;
constexpr int64_t kMaxGridY = 65535;  // the limit of gridDim.y; blocks loop over further groups

// The CUDA type with the layout of each dtype the host wrapper dispatches to.
template <typename T>
struct Native {
  using type = T;
};
template <>
struct Native<c10::Half> {
  using type = __half;
};
template <>
struct Native<c10::BFloat16> {
  using type = __nv_bfloat16;
};

void stats_update_cuda(const at::Tensor& h_in, const at::Tensor& slot_in, const at::Tensor& label_in,
                       at::Tensor& out, const c10::optional<at::Tensor>& threshold) {
  check_stats_update_args(h_in, slot_in, label_in, out, threshold, c10::DeviceType::CUDA, "CUDA");
  const int64_t rows = h_in.size(0), slots = out.size(0), classes = out.size(1), width = out.size(2);
  const int64_t groups = slots * classes;
  TORCH_CHECK(groups <= std::numeric_limits<int32_t>::max(), "stats_update (CUDA kernel): slots * classes = ",
              groups, " does not fit the int32 group index");
  if (rows == 0) return;
  const c10::cuda::CUDAGuard device_guard(out.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor h = h_in.contiguous(), slot = slot_in.contiguous(), label = label_in.contiguous();

  // 1. Groups of the rows, and the index checks (these run even when there is nothing to add, as on CPU).
  at::Tensor group = at::empty({rows}, slot.options().dtype(at::kInt));
  const auto groups_blocks = static_cast<unsigned>((rows + kRowsPerGroupsBlock - 1) / kRowsPerGroupsBlock);
  row_groups_kernel<<<groups_blocks, kRowsPerGroupsBlock, 0, stream>>>(
      slot.const_data_ptr<int64_t>(), label.const_data_ptr<int64_t>(), rows, slots, classes,
      group.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (width == 0 || groups == 0) return;

  // 2. The statistics.
  const dim3 grid(static_cast<unsigned>((width + kColumnsPerBlock - 1) / kColumnsPerBlock),
                  static_cast<unsigned>(std::min(groups, kMaxGridY)));
  at::Tensor thr;
  if (threshold.has_value()) thr = threshold->contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "stats_update_cuda", [&] {
    using native_t = typename Native<scalar_t>::type;
    static_assert(sizeof(native_t) == sizeof(scalar_t), "dtype and CUDA type must share their layout");
    // Only the explicitly instantiated kernels have device code (tests/test_csrc_cuda.py checks it too).
    static_assert(std::is_same_v<native_t, float> || std::is_same_v<native_t, double> ||
                      std::is_same_v<native_t, __half> || std::is_same_v<native_t, __nv_bfloat16>,
                  "add SKILLKERN_INSTANTIATE lines for a new dtype");
    const auto* h_ptr = reinterpret_cast<const native_t*>(h.const_data_ptr<scalar_t>());
    if (thr.defined()) {
      stats_update_kernel<native_t, kCounts><<<grid, kColumnsPerBlock, 0, stream>>>(
          h_ptr, group.const_data_ptr<int32_t>(), rows, width, groups, classes, thr.const_data_ptr<double>(), nullptr,
          out.data_ptr<int64_t>());
    } else {
      stats_update_kernel<native_t, kSums><<<grid, kColumnsPerBlock, 0, stream>>>(
          h_ptr, group.const_data_ptr<int32_t>(), rows, width, groups, classes, nullptr, out.data_ptr<double>(),
          nullptr);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void stats_moments_cuda(const at::Tensor& h_in, const at::Tensor& slot_in, at::Tensor& out) {
  check_stats_moments_args(h_in, slot_in, out, c10::DeviceType::CUDA, "CUDA");
  const int64_t rows = h_in.size(0), slots = out.size(0), width = out.size(2);
  TORCH_CHECK(slots <= std::numeric_limits<int32_t>::max(), "stats_moments (CUDA kernel): ", slots,
              " slots do not fit the int32 group index");
  if (rows == 0) return;
  const c10::cuda::CUDAGuard device_guard(out.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor h = h_in.contiguous(), slot = slot_in.contiguous();

  // 1. The rows' slots (one class: the group is the slot), and the index checks.
  at::Tensor group = at::empty({rows}, slot.options().dtype(at::kInt));
  const auto groups_blocks = static_cast<unsigned>((rows + kRowsPerGroupsBlock - 1) / kRowsPerGroupsBlock);
  row_groups_kernel<<<groups_blocks, kRowsPerGroupsBlock, 0, stream>>>(
      slot.const_data_ptr<int64_t>(), nullptr, rows, slots, 1, group.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (width == 0 || slots == 0) return;

  // 2. The moments.
  const dim3 grid(static_cast<unsigned>((width + kColumnsPerBlock - 1) / kColumnsPerBlock),
                  static_cast<unsigned>(std::min(slots, kMaxGridY)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "stats_moments_cuda", [&] {
    using native_t = typename Native<scalar_t>::type;
    static_assert(sizeof(native_t) == sizeof(scalar_t), "dtype and CUDA type must share their layout");
    const auto* h_ptr = reinterpret_cast<const native_t*>(h.const_data_ptr<scalar_t>());
    stats_update_kernel<native_t, kMoments><<<grid, kColumnsPerBlock, 0, stream>>>(
        h_ptr, group.const_data_ptr<int32_t>(), rows, width, slots, 1, nullptr, out.data_ptr<double>(), nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
#endif  // __CUDA_ARCH__

}  // namespace skillkern

#ifndef __CUDA_ARCH__
TORCH_LIBRARY_IMPL(skillkern, CUDA, m) {
  m.impl("stats_update", &skillkern::stats_update_cuda);
  m.impl("stats_moments", &skillkern::stats_moments_cuda);
}
#endif  // __CUDA_ARCH__
