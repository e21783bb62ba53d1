// Declarations shared by the CPU (stats_update.cpp) and CUDA (stats_update_cuda.cu) kernels of
// torch.ops.skillkern.stats_update and torch.ops.skillkern.stats_moments, so that both check their arguments
// with the same messages.

#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Optional.h>

namespace skillkern {

// Shapes, dtypes, contiguity of out, and devices: every tensor must be on out's device, whose type must
// be `device_type` (`kernel` names the kernel in the messages, e.g. "CPU"). Reads no tensor data, so it
// never synchronises; index ranges are checked by each kernel.
void check_stats_update_args(const at::Tensor& h, const at::Tensor& slot, const at::Tensor& label,
                             const at::Tensor& out, const c10::optional<at::Tensor>& threshold,
                             c10::DeviceType device_type, const char* kernel);

// The same for torch.ops.skillkern.stats_moments: h (rows, width) of a float dtype, slot (rows,) int64, out
// (slots, 3, width) float64 and contiguous, everything on out's device.
void check_stats_moments_args(const at::Tensor& h, const at::Tensor& slot, const at::Tensor& out,
                              c10::DeviceType device_type, const char* kernel);

}  // namespace skillkern
