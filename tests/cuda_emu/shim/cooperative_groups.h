// Emulated cooperative_groups.h: the cluster group of the running block (tests/cuda_emu/emu.h).
#pragma once

namespace cooperative_groups {

class cluster_group {
 public:
  static void sync() { ::emu::cluster_sync(); }
  static unsigned block_rank() { return ::emu::cluster_block_rank(); }
  static unsigned num_blocks() { return ::emu::cluster_num_blocks(); }
};

inline cluster_group this_cluster() { return cluster_group(); }

}  // namespace cooperative_groups
