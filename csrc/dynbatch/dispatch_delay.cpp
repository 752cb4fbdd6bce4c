#include "dynbatch/dispatch_delay.hpp"

#include <algorithm>

namespace dynbatch {

void DispatchDelay::record(Nanoseconds delay_ns) {
  std::lock_guard lock(mutex_);
  recent_[next_] = std::clamp<Nanoseconds>(delay_ns, 0, max_slack_ns);
  next_ = (next_ + 1) % window;
  count_ = std::min(count_ + 1, window);
  const Nanoseconds longest = *std::max_element(recent_.begin(), recent_.begin() + count_);
  slack_.store(std::clamp(longest + longest / 2, min_slack_ns, max_slack_ns),
               std::memory_order_relaxed); // a value on its own: pairs with nothing
}

} // namespace dynbatch
