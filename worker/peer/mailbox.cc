#include "worker/peer/mailbox.h"

#include <algorithm>
#include <cstring>
#include <iterator>
#include <tuple>
#include <utility>

#include "absl/base/config.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

#ifndef ABSL_IS_LITTLE_ENDIAN
#error "PeerMessage.data is fp32 little-endian; big-endian hosts would swap"
#endif

namespace lmps {
namespace {

bool KnownKind(PeerKind kind) {
  return kind == ACTIVATION || kind == ACTIVATION_GRAD || kind == ALL_REDUCE;
}

// One piece of a transfer within a stream being delivered.
struct Piece {
  int64_t begin = 0;
  int64_t end = 0;
  const ByteSpans* data = nullptr;
};

// The pieces of one transfer within a stream.
struct Plan {
  int64_t total = 0;
  std::vector<Piece> pieces;
};

// The sender as shown in messages: escaped, and cut at 64 bytes (a hostile
// client may send megabytes).
std::string ShownSender(const std::string& sender) {
  constexpr size_t kMax = 64;
  if (sender.size() <= kMax) return absl::CHexEscape(sender);
  return absl::StrCat(absl::CHexEscape(sender.substr(0, kMax)), "... (",
                      sender.size(), " bytes)");
}

std::string From(const TransferKey& key) {
  return absl::StrCat(DescribeKey(key), " from ", ShownSender(key.sender));
}

}  // namespace

bool TransferKey::operator<(const TransferKey& other) const {
  return std::tie(kind, eval, step, micro_batch, seq, round, sender) <
         std::tie(other.kind, other.eval, other.step, other.micro_batch,
                  other.seq, other.round, other.sender);
}

bool TransferKey::operator==(const TransferKey& other) const {
  return std::tie(kind, eval, step, micro_batch, seq, round, sender) ==
         std::tie(other.kind, other.eval, other.step, other.micro_batch,
                  other.seq, other.round, other.sender);
}

TransferKey KeyOf(const PeerHeader& message) {
  TransferKey key;
  key.kind = message.kind;
  key.eval = message.eval;
  key.step = message.step;
  key.micro_batch = message.micro_batch;
  key.seq = message.seq;
  key.round = message.round;
  key.sender = message.sender;
  return key;
}

PeerHeader HeaderOf(const TransferKey& key, int64_t total_elements) {
  PeerHeader h;
  h.kind = key.kind;
  h.eval = key.eval;
  h.step = key.step;
  h.micro_batch = key.micro_batch;
  h.seq = key.seq;
  h.round = key.round;
  h.sender = key.sender;
  h.total_elements = total_elements;
  return h;
}

TransferKey KeyOf(const PeerMessage& message) {
  return KeyOf(ViewOf(message).header);
}

std::string DescribeKey(const TransferKey& key) {
  const std::string prefix = key.eval ? "eval " : "";
  switch (key.kind) {
    case ACTIVATION:
    case ACTIVATION_GRAD:
      return absl::StrCat(prefix, PeerKind_Name(key.kind), " of step ",
                          key.step, " micro-batch ", key.micro_batch);
    case ALL_REDUCE:
      return absl::StrCat(
          prefix, "ALL_REDUCE #", key.seq, " round ", key.round,
          key.micro_batch != 0 ? absl::StrCat(" piece ", key.micro_batch)
                               : std::string(),
          " of step ", key.step);
    default:
      return absl::StrCat(prefix, "transfer of unknown kind ",
                          static_cast<int>(key.kind), " of step ", key.step);
  }
}

absl::StatusOr<std::unique_ptr<PeerMailbox>> PeerMailbox::Create(
    const PeerMailboxOptions& options) {
  if (options.max_pending_bytes <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("PeerMailbox: max_pending_bytes must be positive, got ",
                     options.max_pending_bytes));
  }
  if (options.max_spare_bytes < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("PeerMailbox: max_spare_bytes must not be negative, "
                     "got ",
                     options.max_spare_bytes));
  }
  return std::unique_ptr<PeerMailbox>(new PeerMailbox(options));
}

PeerMailbox::PeerMailbox(const PeerMailboxOptions& options)
    : options_(options) {}

PeerMailbox::~PeerMailbox() = default;

absl::StatusOr<int64_t> PeerMailbox::Deliver(
    const std::vector<PeerMessage>& stream) {
  std::vector<PeerMessageView> views;
  views.reserve(stream.size());
  for (const PeerMessage& m : stream) views.push_back(ViewOf(m));
  return Deliver(views);
}

absl::StatusOr<int64_t> PeerMailbox::Deliver(
    const std::vector<PeerMessageView>& stream) {
  const int64_t max_elements = options_.max_pending_bytes / 4;
  // 1. Each message on its own, and agreement within the stream.
  std::map<TransferKey, Plan> plans;
  int64_t elements = 0;
  for (size_t i = 0; i < stream.size(); ++i) {
    const PeerHeader& m = stream[i].header;
    const ByteSpans& data = stream[i].data;
    const TransferKey key = KeyOf(m);
    auto bad = [&](const std::string& what) {
      return absl::InvalidArgumentError(
          absl::StrCat("malformed peer stream: message ", i, " (",
                       From(key), "): ", what, "; nothing was stored"));
    };
    if (!KnownKind(m.kind)) {
      return bad(absl::StrCat("unknown kind ", static_cast<int>(m.kind)));
    }
    if (m.sender.empty()) return bad("empty sender");
    if (m.total_elements < 0 || m.total_elements > max_elements) {
      return bad(absl::StrCat("total_elements ", m.total_elements,
                              " outside [0, ", max_elements, "]"));
    }
    if (data.size() % 4 != 0) {
      return bad(absl::StrCat("data of ", data.size(),
                              " bytes is not a multiple of 4 (fp32)"));
    }
    const int64_t n = static_cast<int64_t>(data.size() / 4);
    if (m.offset < 0 || n > m.total_elements ||
        m.offset > m.total_elements - n) {
      return bad(absl::StrCat("elements [", m.offset, ", ", m.offset + n,
                              ") outside the transfer's ", m.total_elements,
                              " elements"));
    }
    auto [it, inserted] = plans.try_emplace(key);
    Plan& plan = it->second;
    if (inserted) {
      plan.total = m.total_elements;
    } else if (plan.total != m.total_elements) {
      return bad(absl::StrCat("total_elements ", m.total_elements,
                              " disagrees with ", plan.total,
                              " in an earlier message of the stream"));
    }
    plan.pieces.push_back(Piece{m.offset, m.offset + n, &data});
    elements += n;
  }

  absl::MutexLock lock(&mu_);
  if (shutdown_) {
    return absl::UnavailableError("peer mailbox is shut down");
  }
  // 2. Known senders, agreement with what is stored, overlaps and the
  //    memory cap.
  if (senders_.has_value()) {
    for (const auto& [key, plan] : plans) {
      if (senders_->count(key.sender) == 0) {
        return absl::PermissionDeniedError(absl::StrCat(
            "peer stream from '", ShownSender(key.sender),
            "', which is not a worker of this job (",
            absl::StrJoin(*senders_, ", "), "); nothing was stored"));
      }
    }
  }
  int64_t new_bytes = 0;
  for (auto& [key, plan] : plans) {
    auto bad = [&](const std::string& what) {
      return absl::InvalidArgumentError(
          absl::StrCat("malformed peer stream: ", From(key), ": ", what,
                       "; nothing was stored"));
    };
    const auto stored = transfers_.find(key);
    if (stored != transfers_.end()) {
      const Transfer& t = stored->second;
      if (t.total != plan.total) {
        return bad(absl::StrCat("total_elements ", plan.total,
                                " disagrees with ", t.total,
                                " of the pieces already received"));
      }
      if (t.complete()) {
        return bad("already delivered completely and not yet claimed");
      }
    } else {
      new_bytes += 4 * plan.total;
    }
    std::sort(plan.pieces.begin(), plan.pieces.end(),
              [](const Piece& a, const Piece& b) { return a.begin < b.begin; });
    int64_t covered_to = -1;  // end of the last non-empty piece
    for (const Piece& p : plan.pieces) {
      if (p.begin == p.end) continue;
      if (p.begin < covered_to) {
        return bad(absl::StrCat("elements [", p.begin, ", ", covered_to,
                                ") delivered twice within the stream"));
      }
      covered_to = p.end;
      if (stored == transfers_.end()) continue;
      const std::map<int64_t, int64_t>& ranges = stored->second.ranges;
      auto next = ranges.upper_bound(p.begin);
      const bool overlaps_prev =
          next != ranges.begin() && std::prev(next)->second > p.begin;
      const bool overlaps_next = next != ranges.end() && next->first < p.end;
      if (overlaps_prev || overlaps_next) {
        return bad(absl::StrCat("elements of [", p.begin, ", ", p.end,
                                ") were already received"));
      }
    }
  }
  if (new_bytes > options_.max_pending_bytes - pending_bytes_) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "peer mailbox full: storing ", new_bytes, " more bytes would exceed ",
        options_.max_pending_bytes, " bytes (", pending_bytes_,
        " bytes pending in ", transfers_.size(),
        " unclaimed transfers); nothing was stored"));
  }
  // 3. Store.
  bool any_completed = false;
  for (const auto& [key, plan] : plans) {
    auto [it, inserted] = transfers_.try_emplace(key);
    Transfer& t = it->second;
    if (inserted) {
      t.total = plan.total;
      t.data = TakeBuffer(static_cast<size_t>(plan.total));
      pending_bytes_ += 4 * plan.total;
    }
    for (const Piece& p : plan.pieces) {
      if (p.begin == p.end) continue;
      // Straight from the received buffer's slices (one copy).
      float* dst = t.data.data() + p.begin;
      p.data->ForEachElements(
          4, [dst](const char* bytes, int64_t first, int64_t n) {
            std::memcpy(dst + first, bytes, 4 * n);
          });
      t.received += p.end - p.begin;
      bytes_received_ += 4 * (p.end - p.begin);
      // Insert [begin, end) and coalesce with its neighbours.
      int64_t begin = p.begin;
      int64_t end = p.end;
      auto next = t.ranges.lower_bound(begin);
      if (next != t.ranges.end() && next->first == end) {
        end = next->second;
        next = t.ranges.erase(next);
      }
      if (next != t.ranges.begin() && std::prev(next)->second == begin) {
        std::prev(next)->second = end;
      } else {
        t.ranges.emplace_hint(next, begin, end);
      }
    }
    // It was incomplete or absent before (a complete one was refused).
    if (t.complete()) {
      ++transfers_completed_;
      any_completed = true;
    }
  }
  if (any_completed) completed_cv_.SignalAll();
  return elements;
}

absl::StatusOr<std::vector<float>> PeerMailbox::Receive(
    const TransferKey& key, absl::Duration timeout,
    const std::string& peer_description,
    const std::function<absl::Status()>& stop) {
  const absl::Time deadline = absl::Now() + timeout;
  absl::MutexLock lock(&mu_);
  while (true) {
    if (shutdown_) {
      return absl::UnavailableError(
          absl::StrCat("peer mailbox shut down while waiting for ",
                       DescribeKey(key), " from ", peer_description));
    }
    if (stop) {
      absl::Status stopped = stop();
      if (!stopped.ok()) return stopped;
    }
    auto it = transfers_.find(key);
    if (it != transfers_.end() && it->second.complete()) {
      std::vector<float> data = std::move(it->second.data);
      pending_bytes_ -= 4 * it->second.total;
      transfers_.erase(it);
      return data;
    }
    if (absl::Now() >= deadline) {
      std::string arrived = "nothing arrived";
      if (it != transfers_.end()) {
        arrived = absl::StrCat(it->second.received, " of ", it->second.total,
                               " elements arrived");
      }
      // Other transfers from the same sender hint at mismatched tags.
      std::string others;
      int listed = 0;
      for (const auto& [k, t] : transfers_) {
        if (k.sender != key.sender) continue;
        if (listed++ == 3) {
          absl::StrAppend(&others, ", ...");
          break;
        }
        absl::StrAppend(&others, listed == 1 ? "" : ", ", DescribeKey(k));
      }
      if (!others.empty()) {
        others = absl::StrCat("; stored from that sender: ", others);
      }
      return absl::DeadlineExceededError(absl::StrCat(
          "timed out after ", absl::FormatDuration(timeout), " waiting for ",
          DescribeKey(key), " from ", peer_description, " (", arrived, ")",
          others));
    }
    completed_cv_.WaitWithDeadline(&mu_, deadline);
  }
}

void PeerMailbox::WakeReceivers() {
  absl::MutexLock lock(&mu_);
  completed_cv_.SignalAll();
}

void PeerMailbox::Shutdown() {
  absl::MutexLock lock(&mu_);
  shutdown_ = true;
  completed_cv_.SignalAll();
}

void PeerMailbox::DropBefore(int64_t step) {
  absl::MutexLock lock(&mu_);
  for (auto it = transfers_.begin(); it != transfers_.end();) {
    if (!it->first.eval && it->first.step < step) {
      pending_bytes_ -= 4 * it->second.total;
      it = transfers_.erase(it);
    } else {
      ++it;
    }
  }
}

std::vector<float> PeerMailbox::TakeBuffer(size_t n) {
  auto best = spares_.end();
  for (auto it = spares_.begin(); it != spares_.end(); ++it) {
    if (it->capacity() >= n &&
        (best == spares_.end() || it->capacity() < best->capacity())) {
      best = it;
    }
  }
  if (best == spares_.end()) return std::vector<float>(n);
  std::vector<float> buffer = std::move(*best);
  spares_.erase(best);
  spare_bytes_ -= static_cast<int64_t>(4 * buffer.capacity());
  // Shrinking writes nothing; growing within the capacity zeroes the
  // growth only. Every element is overwritten before the transfer is
  // complete.
  buffer.resize(n);
  return buffer;
}

void PeerMailbox::Recycle(std::vector<float> buffer) {
  const int64_t bytes = static_cast<int64_t>(4 * buffer.capacity());
  if (bytes == 0) return;
  absl::MutexLock lock(&mu_);
  if (spare_bytes_ + bytes > options_.max_spare_bytes) return;
  spare_bytes_ += bytes;
  spares_.push_back(std::move(buffer));
}

void PeerMailbox::SetSenders(const std::vector<std::string>& ids) {
  absl::MutexLock lock(&mu_);
  senders_.emplace(ids.begin(), ids.end());
  for (auto it = transfers_.begin(); it != transfers_.end();) {
    if (senders_->count(it->first.sender) == 0) {
      pending_bytes_ -= 4 * it->second.total;
      it = transfers_.erase(it);
    } else {
      ++it;
    }
  }
}

int64_t PeerMailbox::bytes_received() const {
  absl::MutexLock lock(&mu_);
  return bytes_received_;
}

int64_t PeerMailbox::transfers_completed() const {
  absl::MutexLock lock(&mu_);
  return transfers_completed_;
}

int64_t PeerMailbox::pending_bytes() const {
  absl::MutexLock lock(&mu_);
  return pending_bytes_;
}

int64_t PeerMailbox::pending_transfers() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int64_t>(transfers_.size());
}

int64_t PeerMailbox::spare_bytes() const {
  absl::MutexLock lock(&mu_);
  return spare_bytes_;
}

}  // namespace lmps
