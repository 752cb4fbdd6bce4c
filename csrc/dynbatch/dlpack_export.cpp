#include "dynbatch/dlpack_export.hpp"

#include <algorithm>
#include <vector>

namespace dynbatch {
namespace {

struct ExportContext {
  dlpack::DLManagedTensor tensor{};
  std::shared_ptr<SlotLease> lease;
  std::vector<std::int64_t> shape;
  std::vector<std::int64_t> strides;
};

void delete_export(dlpack::DLManagedTensor *tensor) {
  delete static_cast<ExportContext *>(tensor->manager_ctx);
}

} // namespace

dlpack::DLManagedTensor *export_leaf(const std::shared_ptr<SlotLease> &lease,
                                     const BatchLayout &layout, std::size_t leaf_index,
                                     std::size_t batch_size, std::size_t padded_length) {
  const LeafLayout &leaf = layout.leaf(leaf_index);
  auto context = std::make_unique<ExportContext>();
  context->lease = lease;
  context->shape.reserve(leaf.sample_shape.size() + 1);
  context->shape.push_back(static_cast<std::int64_t>(batch_size));
  context->shape.insert(context->shape.end(), leaf.sample_shape.begin(), leaf.sample_shape.end());
  if (leaf.padded) {
    context->shape[1] = static_cast<std::int64_t>(padded_length);
  }
  // Explicit compact strides: some consumers reject the null-strides shorthand.
  context->strides.assign(context->shape.size(), 1);
  for (std::size_t dim = context->shape.size(); dim-- > 1;) {
    context->strides[dim - 1] =
        context->strides[dim] * std::max<std::int64_t>(context->shape[dim], 1);
  }

  dlpack::DLTensor &tensor = context->tensor.dl_tensor;
  tensor.data = lease->data() + layout.leaf_offset(leaf_index, batch_size, padded_length);
  tensor.device = {dlpack::kDLCPU, 0};
  tensor.ndim = static_cast<std::int32_t>(context->shape.size());
  tensor.dtype = leaf.dtype;
  tensor.shape = context->shape.data();
  tensor.strides = context->strides.data();
  tensor.byte_offset = 0;
  context->tensor.manager_ctx = context.get();
  context->tensor.deleter = delete_export;
  return &context.release()->tensor;
}

} // namespace dynbatch
