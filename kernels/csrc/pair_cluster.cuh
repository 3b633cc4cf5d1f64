// A cluster of two CTAs (row blocks 2k and 2k + 1 of one kv head and part: they walk the same pages)
// shares each page load: a tile group is copied from L2 once, by TMA multicast into both CTAs'
// buffers, which halves the L2-to-SM traffic of the compute-bound shapes (2 or 4 row blocks read
// every page). A group may be overwritten only when both CTAs are done with it, so each CTA counts
// its release on rank 0's counter for that group, and the second to release issues the copy: no
// thread waits for the other CTA.
#pragma once
#include <cuda_runtime.h>

#include <cute/arch/cluster_sm90.hpp>

namespace kvpager::pair_cluster {

constexpr int kCtas = 2;

// Adds 1 to `counter` (a shared-memory word) in the cluster's rank-0 CTA; returns the old value.
// acq_rel at cluster scope: this CTA's reads of the released tiles (waited wgmmas) happen before the
// other CTA's copy that overwrites them, whichever of the two issues it.
__device__ __forceinline__ uint32_t count_release(uint32_t* counter) {
  const uint32_t local = static_cast<uint32_t>(__cvta_generic_to_shared(counter));
  uint32_t remote, old;
  asm volatile("mapa.shared::cluster.u32 %0, %1, 0;" : "=r"(remote) : "r"(local));
  asm volatile("atom.acq_rel.cluster.shared::cluster.add.u32 %0, [%1], 1;" : "=r"(old) : "r"(remote) : "memory");
  return old;
}

// Both CTAs release every group the same number of times (they take the same pair shapes), so a
// counter's old value is odd exactly for the second release of a load.
__device__ __forceinline__ bool second_release(uint32_t* counter) { return count_release(counter) & 1u; }

}  // namespace kvpager::pair_cluster
