// Host-side launch helpers shared by the CUDA kernels: device facts that launch
// configurations need on every call, queried from the driver once per device.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>

namespace exml_fast {

// The number of SMs of CUDA device `device`. cudaDeviceGetAttribute is a driver
// call (about a microsecond); the value is asked once per device and kept.
// Thread-safe: threads racing on a device's first call each query it and store
// the same value. Devices past the cache's size are asked every time.
inline int cached_sm_count(int device) {
  constexpr int kCachedDevices = 64;
  static std::atomic<int> cache[kCachedDevices];  // static storage: zero, i.e. "not asked yet"
  const bool cached = device >= 0 && device < kCachedDevices;
  if (cached) {
    const int v = cache[device].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  sms = std::max(sms, 1);
  if (cached) cache[device].store(sms, std::memory_order_relaxed);
  return sms;
}

}  // namespace exml_fast
