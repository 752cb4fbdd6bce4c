#pragma once
// Exports one leaf of a collated batch as a DLPack tensor that shares the staging buffer.
//
// Contract: the returned tensor holds a reference to the lease; its deleter (called by the
// consuming framework, from any thread, without the GIL) drops that reference, and the slot
// returns to its pool once the batch and all its exported leaves are gone.

#include <cstddef>
#include <memory>

#include "dynbatch/collator.hpp"
#include "dynbatch/dlpack_abi.hpp"
#include "dynbatch/staging_pool.hpp"

namespace dynbatch {

// A padded leaf is exported as [batch_size, padded_length, *sample_shape[1:]].
dlpack::DLManagedTensor *export_leaf(const std::shared_ptr<SlotLease> &lease,
                                     const BatchLayout &layout, std::size_t leaf_index,
                                     std::size_t batch_size, std::size_t padded_length = 0);

} // namespace dynbatch
