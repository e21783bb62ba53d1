// Streaming statistics on CPU: torch.ops.skillkern.stats_update and torch.ops.skillkern.stats_moments.
//
// Same semantics as stats_update_reference in skillkern/ops/stats_update.py: for every row r with
// slot[r] = s >= 0 and label[r] = c,
//   threshold is None:  out[s, c, :] += double(h[r])                      (float64 sums)
//   else:               out[s, c, :] += double(h[r]) > threshold[s, :]    (int64 counts)
// and as stats_moments_reference in skillkern/ops/stats_moments.py: for every row r with slot[r] = s >= 0,
//   out[s, 0, :] += v,  out[s, 1, :] += v * v,  out[s, 2, :] += |v|       (v = double(h[r]); float64)
//
// Parallel over blocks of neurons, never over rows: each output element is then updated by one thread
// in row order, which is the order index_add_ uses, so float64 sums are bit-identical to the reference
// and independent of the thread count. Traffic: h is read once; each block of out stays in cache while
// the rows stream past it.
//
// The squares are rounded once and then added (setup.py builds with -ffp-contract=off: no fused multiply-add),
// as the reference's separate multiplication and addition do; for float32/16/bfloat16 h the square is exact in
// float64 anyway.
//
// The ops' schemas and the module init are in module.cpp; the CUDA kernels are in stats_update_cuda.cu.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include "stats_update.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace skillkern {

void check_stats_update_args(const at::Tensor& h, const at::Tensor& slot, const at::Tensor& label,
                             const at::Tensor& out, const c10::optional<at::Tensor>& threshold,
                             c10::DeviceType device_type, const char* kernel) {
  TORCH_CHECK(h.dim() == 2, "stats_update: h must be 2-D (rows, neurons), got ", h.dim(), "-D shape ", h.sizes());
  const auto st = h.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "stats_update: h must be float32, float64, float16 or bfloat16, got ", st);
  const int64_t rows = h.size(0), width = h.size(1);
  auto check_index = [&](const char* name, const at::Tensor& t) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == rows, "stats_update: ", name, " must have shape (", rows,
                ",) to match h ", h.sizes(), ", got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == at::kLong, "stats_update: ", name, " must be int64, got ", t.scalar_type());
  };
  check_index("slot", slot);
  check_index("label", label);
  TORCH_CHECK(out.dim() == 3 && out.size(2) == width, "stats_update: out must have shape (slots, classes, ",
              width, "), got ", out.sizes());
  TORCH_CHECK(out.is_contiguous(), "stats_update: out must be contiguous (it is updated in place)");
  if (threshold.has_value()) {
    const auto& thr = *threshold;
    TORCH_CHECK(out.scalar_type() == at::kLong, "stats_update: counts are accumulated in int64, got out of dtype ",
                out.scalar_type());
    TORCH_CHECK(thr.dim() == 2 && thr.size(0) == out.size(0) && thr.size(1) == width,
                "stats_update: threshold must have shape (", out.size(0), ", ", width, "), got ", thr.sizes());
    TORCH_CHECK(thr.scalar_type() == at::kDouble, "stats_update: threshold must be float64, got ", thr.scalar_type());
  } else {
    TORCH_CHECK(out.scalar_type() == at::kDouble, "stats_update: sums are accumulated in float64, got out of dtype ",
                out.scalar_type());
  }
  // out is updated in place, so everything else has to come to out's device.
  const c10::Device device = out.device();
  const std::string expected = c10::DeviceTypeName(device_type, /*lower_case=*/true);
  TORCH_CHECK(device.type() == device_type, "stats_update (", kernel, " kernel): out is on ", device, ", expected ",
              expected);
  auto check_device = [&](const char* name, const at::Tensor& t) {
    TORCH_CHECK(t.device() == device, "stats_update (", kernel, " kernel): ", name, " is on ", t.device(),
                ", expected ", device);
  };
  check_device("h", h);
  check_device("slot", slot);
  check_device("label", label);
  if (threshold.has_value()) check_device("threshold", *threshold);
}

void check_stats_moments_args(const at::Tensor& h, const at::Tensor& slot, const at::Tensor& out,
                              c10::DeviceType device_type, const char* kernel) {
  TORCH_CHECK(h.dim() == 2, "stats_moments: h must be 2-D (rows, neurons), got ", h.dim(), "-D shape ", h.sizes());
  const auto st = h.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "stats_moments: h must be float32, float64, float16 or bfloat16, got ", st);
  const int64_t rows = h.size(0), width = h.size(1);
  TORCH_CHECK(slot.dim() == 1 && slot.size(0) == rows, "stats_moments: slot must have shape (", rows,
              ",) to match h ", h.sizes(), ", got ", slot.sizes());
  TORCH_CHECK(slot.scalar_type() == at::kLong, "stats_moments: slot must be int64, got ", slot.scalar_type());
  TORCH_CHECK(out.dim() == 3 && out.size(1) == 3 && out.size(2) == width,
              "stats_moments: out must have shape (slots, 3, ", width, "), got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == at::kDouble, "stats_moments: moments are accumulated in float64, got out of dtype ",
              out.scalar_type());
  TORCH_CHECK(out.is_contiguous(), "stats_moments: out must be contiguous (it is updated in place)");
  const c10::Device device = out.device();
  const std::string expected = c10::DeviceTypeName(device_type, /*lower_case=*/true);
  TORCH_CHECK(device.type() == device_type, "stats_moments (", kernel, " kernel): out is on ", device, ", expected ",
              expected);
  TORCH_CHECK(h.device() == device, "stats_moments (", kernel, " kernel): h is on ", h.device(), ", expected ", device);
  TORCH_CHECK(slot.device() == device, "stats_moments (", kernel, " kernel): slot is on ", slot.device(), ", expected ",
              device);
}

namespace {

// 64 doubles = 512 bytes: block boundaries fall on cache lines, so two threads never write the same
// line of out (as long as each (slot, class) row of out starts on one, i.e. D % 8 == 0).
constexpr int64_t kBlock = 64;
// Below this many element updates per task, threads cost more than they save.
constexpr int64_t kMinWorkPerTask = 1 << 15;

// A tracked row: where it lives in h and which (slot, class) row of out it adds into.
struct RowRef {
  int64_t row;
  int64_t group;  // slot * classes + label
};

// Validates every index (a bad one would be an out-of-bounds write) and lists the tracked rows. Without labels
// (stats_moments) every row's group is its slot.
std::vector<RowRef> tracked_rows(const at::Tensor& slot, const at::Tensor* label, int64_t slots, int64_t classes,
                                 const char* op) {
  const int64_t rows = slot.size(0);
  const int64_t* s_ptr = slot.data_ptr<int64_t>();
  const int64_t* l_ptr = label != nullptr ? label->data_ptr<int64_t>() : nullptr;
  std::vector<RowRef> refs;
  refs.reserve(rows);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t s = s_ptr[r];
    if (s == -1) continue;
    TORCH_CHECK(s >= 0 && s < slots, op, ": slot index ", s, " at row ", r, " out of range for ", slots,
                " slots (use -1 for untracked rows)");
    const int64_t c = l_ptr != nullptr ? l_ptr[r] : 0;
    TORCH_CHECK(c >= 0 && c < classes, op, ": label ", c, " at row ", r, " out of range [0, ", classes, ")");
    refs.push_back({r, s * classes + c});
  }
  return refs;
}

template <typename scalar_t>
void accumulate(const scalar_t* h, const std::vector<RowRef>& refs, int64_t width, const double* thr,
                int64_t classes, double* sums, int64_t* counts) {
  const int64_t n = static_cast<int64_t>(refs.size());
  const int64_t blocks = (width + kBlock - 1) / kBlock;
  const int64_t grain = std::max<int64_t>(1, kMinWorkPerTask / std::max<int64_t>(1, n * kBlock));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    const int64_t d0 = b0 * kBlock, d1 = std::min(width, b1 * kBlock);
    for (const RowRef& ref : refs) {  // row order: keeps each element's additions sequential
      const scalar_t* hr = h + ref.row * width;
      if (sums != nullptr) {
        double* o = sums + ref.group * width;
        for (int64_t d = d0; d < d1; ++d) o[d] += static_cast<double>(hr[d]);
      } else {
        int64_t* o = counts + ref.group * width;
        const double* t = thr + (ref.group / classes) * width;
        for (int64_t d = d0; d < d1; ++d) o[d] += static_cast<int64_t>(static_cast<double>(hr[d]) > t[d]);
      }
    }
  });
}

void stats_update_cpu(const at::Tensor& h_in, const at::Tensor& slot_in, const at::Tensor& label_in, at::Tensor& out,
                      const c10::optional<at::Tensor>& threshold) {
  check_stats_update_args(h_in, slot_in, label_in, out, threshold, c10::DeviceType::CPU, "CPU");
  const at::Tensor h = h_in.contiguous(), slot = slot_in.contiguous(), label = label_in.contiguous();
  const int64_t slots = out.size(0), classes = out.size(1), width = out.size(2);
  const std::vector<RowRef> refs = tracked_rows(slot, &label, slots, classes, "stats_update");
  if (refs.empty() || width == 0) return;
  at::Tensor thr;
  if (threshold.has_value()) thr = threshold->contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "stats_update_cpu", [&] {
    if (thr.defined()) {
      accumulate<scalar_t>(h.const_data_ptr<scalar_t>(), refs, width, thr.const_data_ptr<double>(), classes, nullptr,
                           out.data_ptr<int64_t>());
    } else {
      accumulate<scalar_t>(h.const_data_ptr<scalar_t>(), refs, width, nullptr, classes, out.data_ptr<double>(),
                           nullptr);
    }
  });
}

// The moments of the tracked rows, by neuron blocks as `accumulate`, each element's rows in row order.
template <typename scalar_t>
void accumulate_moments(const scalar_t* h, const std::vector<RowRef>& refs, int64_t width, double* out) {
  const int64_t n = static_cast<int64_t>(refs.size());
  const int64_t blocks = (width + kBlock - 1) / kBlock;
  const int64_t grain = std::max<int64_t>(1, kMinWorkPerTask / std::max<int64_t>(1, 3 * n * kBlock));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    const int64_t d0 = b0 * kBlock, d1 = std::min(width, b1 * kBlock);
    for (const RowRef& ref : refs) {
      const scalar_t* hr = h + ref.row * width;
      double* sum = out + ref.group * 3 * width;  // group = slot here
      double* sumsq = sum + width;
      double* sumabs = sumsq + width;
      for (int64_t d = d0; d < d1; ++d) {
        const double v = static_cast<double>(hr[d]);
        sum[d] += v;
        sumsq[d] += v * v;
        sumabs[d] += std::fabs(v);
      }
    }
  });
}

void stats_moments_cpu(const at::Tensor& h_in, const at::Tensor& slot_in, at::Tensor& out) {
  check_stats_moments_args(h_in, slot_in, out, c10::DeviceType::CPU, "CPU");
  const at::Tensor h = h_in.contiguous(), slot = slot_in.contiguous();
  const int64_t slots = out.size(0), width = out.size(2);
  const std::vector<RowRef> refs = tracked_rows(slot, nullptr, slots, 1, "stats_moments");
  if (refs.empty() || width == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "stats_moments_cpu", [&] {
    accumulate_moments<scalar_t>(h.const_data_ptr<scalar_t>(), refs, width, out.data_ptr<double>());
  });
}

}  // namespace
}  // namespace skillkern

TORCH_LIBRARY_IMPL(skillkern, CPU, m) {
  m.impl("stats_update", &skillkern::stats_update_cpu);
  m.impl("stats_moments", &skillkern::stats_moments_cpu);
}
