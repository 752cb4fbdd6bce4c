"""The design document's example, exactly as a user writes it."""

import torch

import dynbatch as ds

batch_processor = ds.DynamicBatchProcessor(max_batch_size=64, min_batch_size=8)


class SimpleModel(torch.nn.Module):
    def __init__(self):
        super(SimpleModel, self).__init__()  # noqa: UP008 - kept as the design document has it
        self.fc = torch.nn.Linear(784, 10)

    def forward(self, x):
        return self.fc(x)


model = SimpleModel()
input_data = [torch.randn(784) for _ in range(100)]
for batch in batch_processor(input_data):
    output = model(batch)
    print(f"Processed batch of size {len(batch)}")
print(batch_processor.stats())
